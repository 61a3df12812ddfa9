"""doctor.py: a clean tiny pair passes with no WARN or FAIL, and each silent objective change is caught by a crafted
pair: different vocabularies (wholly, or in two ids), pad == eos, a padded head, templates that break the mask or
the generation prompt, a cache from another teacher or missing rows. The numbers it prints are checked against
direct computation."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import cache_teacher
import checks
import common
import doctor
import models
import reference
from conftest import write_rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("doctor") / "d.jsonl", 8, seed=4)


def run(kit_or_paths, data, *flags, teacher="teacher", student="student"):
    """doctor's checks as a list, for --teacher/--student given as kit names or paths."""
    pick = (lambda name: str(kit_or_paths[name]) if name in kit_or_paths else str(name))
    args = doctor.parse_args(["--teacher", pick(teacher), "--student", pick(student), "--data", str(data),
                              "--color", "never", *flags])
    return doctor.run_checks(args)


def find(report, status, topic):
    return [c for c in report if c.status == status and c.topic == topic]


def problems(report):
    return [(c.status, c.topic, c.message) for c in report if c.status in ("WARN", "FAIL")]


def copy_model(kit, name, dest):
    shutil.copytree(kit[name], dest)
    return dest


# -- a clean pair -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clean(kit, data):
    return run(kit, data, "--time", "--kl", "jsd")


def test_clean_pair_has_no_warning_and_exits_0(kit, data, clean, capsys):
    assert problems(clean) == []
    assert {c.status for c in clean} <= {"OK", "INFO"}
    report = doctor.main(["--teacher", str(kit["teacher"]), "--student", str(kit["student"]), "--data", str(data),
                          "--color", "never"])  # returns instead of exiting 1
    out = capsys.readouterr().out
    assert "0 FAIL, 0 WARN" in out and not re.search(r"^(WARN|FAIL)", out, re.M)
    assert [c.topic for c in report if c.status == "OK"][:3] == ["head", "head", "vocabulary"]


def test_mask_is_shown_on_the_text_with_the_end_of_turn_token_inside(clean):
    mask = find(clean, "OK", "mask")[0]
    assert "<|im_start|>assistant\n[" in mask.detail  # the prompt and its header are not trained
    assert mask.detail.rstrip().endswith("<|im_end|>]")  # the end-of-turn token is
    assert mask.detail.count("[") == 1  # one trained span
    assert find(clean, "OK", "prompt") and find(clean, "OK", "templates")


def test_printed_agreement_is_the_direct_computation(kit, data, clean):
    """KL(teacher||student) at T=2 over the first batch's completion tokens, from full logits in float64."""
    student, tok = models.load_model(str(kit["student"]))
    teacher, _ = models.load_model(str(kit["teacher"]))
    batch, _ = doctor.first_batch(doctor.parse_args(["--data", str(data)]), common.load_distill_rows(data)[:8], tok)
    with torch.no_grad():
        s = student.double()(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher.double()(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["loss_mask"][:, 1:].bool()
    p, log_q = torch.softmax(t[mask] / 2, -1), torch.log_softmax(s[mask] / 2, -1)
    kl = 4 * (p * (p.log() - log_q)).sum(-1).mean().item()
    top1 = (s[mask].argmax(-1) == t[mask].argmax(-1)).double().mean().item()
    message = find(clean, "INFO", "agreement")[0].message
    shown_kl = float(re.search(r"KL\(teacher\|\|student\) at T=2 = ([\d.]+)", message).group(1))
    assert shown_kl == pytest.approx(kl, abs=2e-4)
    assert float(re.search(r"top-1 agreement ([\d.]+)%", message).group(1)) == pytest.approx(100 * top1, abs=0.1)
    assert "JSD(beta=0.5)" in message
    errors = [float(e) for e in re.findall(r"(\d\.\de-\d\d)", find(clean, "OK", "fused loss")[0].message)[:3]]
    assert len(errors) == 3 and max(errors) < 1e-4
    assert find(clean, "OK", "self-KL") and find(clean, "INFO", "memory") and find(clean, "INFO", "time")


def test_reference_loss_is_the_formula():
    torch.manual_seed(0)
    hidden, weight = torch.randn(7, 5, dtype=torch.float64), torch.randn(12, 5, dtype=torch.float64)
    teacher_hidden = torch.randn(7, 5, dtype=torch.float64)
    targets = torch.randint(0, 10, (7,))
    logits, teacher_logits = hidden @ weight[:10].T, teacher_hidden @ weight[:10].T
    ones = torch.ones(7)
    for beta in (0.0, 1.0, 0.3):
        want = 0.2 * reference.masked_ce(logits, targets, ones) + 0.8 * reference.masked_jsd(
            logits, teacher_logits, ones, beta=beta, temperature=1.5)
        got = doctor.reference_loss(hidden, weight, teacher_hidden @ weight.T, targets, vocab=10, alpha=0.2,
                                    beta=beta, temperature=1.5)
        torch.testing.assert_close(got, want)


def test_one_model_as_teacher_and_student_has_zero_kl(kit, data):
    report = run(kit, data, teacher="student")
    assert find(report, "OK", "same model") and problems(report) == []
    message = find(report, "INFO", "agreement")[0].message
    assert "KL(teacher||student) at T=2 = 0.0000, top-1 agreement 100.0%" in message


# -- crafted pairs --------------------------------------------------------------------------------------------------

def test_different_vocabularies_point_to_cross_tokenizer(kit, data):
    report = run(kit, data, student="student_nosys")
    warn = find(report, "WARN", "vocabulary")
    assert warn and "use cross_tokenizer.py" in warn[0].message
    assert find(report, "INFO", "scripts") and find(report, "OK", "alignment") and find(report, "SKIP", "numbers")
    assert not find(report, "FAIL", "mask")  # each model's own template still gives a good mask
    # the tokens both vocabularies hold: the same numbers cross_tokenizer.py's hybrid loss uses
    import cross_tokenizer

    student, teacher = (models.load_tokenizer(str(kit[name])) for name in ("student_nosys", "teacher"))
    match = cross_tokenizer.match_pair(student, teacher)
    message = find(report, "INFO", "vocabulary match")[0].message
    assert cross_tokenizer.describe_match(match) in message and "cover exactly their teacher token" in message
    masses = re.findall(r"the (student|teacher) (\d+\.\d)%", find(report, "INFO", "matched mass")[0].message)
    assert [who for who, _ in masses] == ["student", "teacher"]
    args = doctor.parse_args(["--teacher", str(kit["teacher"]), "--student", str(kit["student_nosys"]), "--data",
                              str(data)])
    for (who, shown), tok, ids in zip(masses, (student, teacher), (match.student_ids, match.teacher_ids)):
        model, _ = models.load_model(str(kit["student_nosys" if who == "student" else "teacher"]))
        batch, _ = doctor.first_batch(args, common.load_distill_rows(data)[:args.rows], tok)
        with torch.no_grad():
            probs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)
        mask = batch["loss_mask"][:, 1:].bool()
        want = probs[:, :-1][mask][:, ids].sum(-1).mean().item()
        assert float(shown) == pytest.approx(100 * want, abs=0.051)


def test_a_vocabulary_differing_in_two_ids_is_caught(kit, data, tmp_path):
    student = copy_model(kit, "student", tmp_path / "swapped")
    spec = json.loads((student / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    by_id = {i: token for token, i in vocab.items()}
    vocab[by_id[300]], vocab[by_id[301]] = 301, 300
    (student / "tokenizer.json").write_text(json.dumps(spec))
    report = run(kit, data, student=student)
    assert "2 of 512 shared ids map to different tokens" in find(report, "WARN", "vocabulary")[0].message
    with pytest.raises(common.DistillError, match="vocabularies differ"):  # what the training scripts do with it
        tok, teacher_tok = models.load_tokenizer(str(student)), models.load_tokenizer(str(kit["teacher"]))
        checks.shared_vocab_size(tok, teacher_tok, 512, 512)


def test_pad_equal_to_eos_is_warned_and_the_end_of_turn_stays_trained(kit, data, tmp_path):
    student = copy_model(kit, "student", tmp_path / "pad_eos")
    config = json.loads((student / "tokenizer_config.json").read_text())
    config["pad_token"] = config["eos_token"]
    (student / "tokenizer_config.json").write_text(json.dumps(config))
    report = run(kit, data, student=student)
    assert [c.topic for c in report if c.status in ("WARN", "FAIL")] == ["specials"]
    assert "pad == eos" in find(report, "WARN", "specials")[0].message
    # the end-of-turn token (= pad) is trained, and padding after it is not: masked by position, not by id
    tok = models.load_tokenizer(str(student))
    assert tok.pad_token_id == tok.eos_token_id
    rows = common.load_distill_rows(data)
    short, long = (common.encode_chat(tok, r["messages"], r["completion"]) for r in rows[:2])
    batch = common.pad_batch([short, long], tok.pad_token_id)
    for i, ex in enumerate((short, long)):
        last = max(j for j, m in enumerate(ex["loss_mask"]) if m)
        assert ex["input_ids"][last] == tok.pad_token_id and batch["loss_mask"][i, last] == 1
        assert batch["loss_mask"][i, len(ex["input_ids"]):].sum() == 0


def test_padded_head_is_reported_and_handled(kit, data):
    report = run(kit, data, student="student_padded")
    head = find(report, "OK", "head")[0].message
    assert "64 padding rows" in head and "read only the first 512" in head
    assert find(report, "OK", "fused loss") and problems(report) == []
    # with another vocabulary cross_tokenizer.py applies, which leaves padding rows out too
    report = run(kit, data, student="student_nosys", teacher="student_padded")
    assert any("64 padding rows" in c.message for c in find(report, "OK", "head")) and not find(report, "WARN", "head")


@pytest.mark.parametrize("edit,topic,says", [
    # the assistant turn is closed by a plain newline: no end-of-turn token to learn to stop with
    ("{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
     "('\\n' if message['role'] == 'assistant' else '<|im_end|>') + '\\n' }}",
     "mask", "no special end-of-turn token"),
    # the completion is not rendered verbatim: no mask can be built from it
    ("{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] | upper) + '<|im_end|>' + '\\n' }}",
     "mask", "does not render the assistant completion verbatim"),
])
def test_a_template_that_breaks_the_mask_fails(kit, data, tmp_path, capsys, edit, topic, says):
    student = copy_model(kit, "student", tmp_path / "broken")
    template = (student / "chat_template.jinja").read_text()
    line = "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    assert line in template
    (student / "chat_template.jinja").write_text(template.replace(line, edit))
    with pytest.raises(SystemExit) as exit_info:
        doctor.main(["--teacher", str(kit["teacher"]), "--student", str(student), "--data", str(data),
                     "--color", "never"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert re.search(rf"^FAIL  {topic} +student's template: .*{says}", out, re.M), out
    assert "SKIP  numbers" in out


def test_a_generation_prompt_the_training_text_does_not_start_with_fails(kit, data, tmp_path):
    """Like a thinking template: the generation prompt opens an empty think block the training text lacks."""
    student = copy_model(kit, "student", tmp_path / "think")
    template = (student / "chat_template.jinja").read_text()
    prompt = "{{- '<|im_start|>assistant\\n' }}"
    assert prompt in template
    (student / "chat_template.jinja").write_text(template.replace(prompt, "{{- '<|im_start|>assistant\\nOK.\\n' }}"))
    report = run(kit, data, student=student)
    fail = find(report, "FAIL", "prompt")
    assert fail and "not a prefix of the training text" in fail[0].message


# -- the teacher cache ----------------------------------------------------------------------------------------------

def make_cache(kit, data, folder, k):
    cache_teacher.main(["--teacher", str(kit["teacher"]), "--data", str(data), "--output", str(folder),
                        "--top-k", str(k)])
    return folder


@pytest.fixture(scope="module")
def cache(kit, data, tmp_path_factory):  # every token cached: the cache is the live teacher (up to float16)
    return make_cache(kit, data, tmp_path_factory.mktemp("doctor_cache") / "c", 512)


def gap_values(check):
    return [float(x) for x in re.search(r"tail ([\d.]+), from the live teacher ([\d.]+)", check.message).groups()]


def test_a_matching_cache_is_clean_and_its_gap_measured(kit, data, cache):
    report = run(kit, data, "--teacher-cache", str(cache))
    assert problems(report) == []
    assert find(report, "OK", "coverage")[0].message.startswith("8 of 8 rows")
    cached, live = gap_values(find(report, "INFO", "cache gap")[0])
    assert cached == pytest.approx(live, abs=2e-3)


def test_a_top_k_cache_far_from_the_live_teacher_is_warned(kit, data, tmp_path):
    """The kit's untrained teacher is near uniform: 16 of 512 tokens leave most of its mass in the tail bucket."""
    small = make_cache(kit, data, tmp_path / "c16", 16)
    at_1 = find(run(kit, data, "--teacher-cache", str(small), "--temperature", "1"), "WARN", "cache gap")[0]
    cached, live = gap_values(at_1)
    assert cached < live  # merging tokens into one bucket can only lose divergence (data processing)
    at_2 = find(run(kit, data, "--teacher-cache", str(small)), "WARN", "cache gap")[0]
    cached, live = gap_values(at_2)
    assert cached < live and "merged into one bucket" in at_2.message  # at T=2 too: the tail's exact tempered mass
    missing = find(run(kit, data, "--teacher-cache", str(small), "--temperature", "3"), "FAIL", "cache gap")[0]
    assert "not --temperature 3; write one that does: python cache_teacher.py" in missing.message


def test_a_sampled_cache_gap_is_sampling_noise(kit, data, tmp_path):
    """--store sampled: an unbiased estimate, so its gap to the live forward KL is within a few standard errors;
    reverse KL from draws is what token_level.py refuses, and so does the doctor."""
    folder = tmp_path / "s"
    cache_teacher.main(["--teacher", str(kit["teacher"]), "--data", str(data), "--output", str(folder),
                        "--store", "sampled", "--samples", "64", "--logprob-dtype", "float32"])
    report = run(kit, data, "--teacher-cache", str(folder))
    assert problems(report) == []
    gap = find(report, "INFO", "cache gap")[0].message
    cached, live, z = (float(x) for x in re.search(
        r"per token ([\d.]+), from the live teacher ([\d.]+) \(gap [-+\d.]+ = ([-+\d.]+) standard", gap).groups())
    assert abs(z) < 4 and cached != live
    reverse = find(run(kit, data, "--teacher-cache", str(folder), "--kl", "reverse"), "FAIL", "cache gap")[0]
    assert "trains forward KL only" in reverse.message


def test_a_cache_from_another_teacher_or_missing_rows_is_caught(kit, cache, tmp_path):
    more = write_rows(tmp_path / "more.jsonl", 10, seed=4)  # the cached 8 rows and 2 more
    report = run(kit, more, "--teacher-cache", str(cache), teacher="teacher_llama")
    assert find(report, "FAIL", "cache")  # teacher fingerprint
    assert find(report, "WARN", "coverage")[0].message.startswith("8 of 10 rows")
    assert "differ from the live teacher's" in find(report, "WARN", "cache gap")[0].message


def test_a_hidden_state_cache_is_exact_on_the_first_batch(kit, data, tmp_path):
    """--store hidden keeps the teacher's final hidden states and head: the rebuilt logits give the live divergence
    (float32 storage: to rounding), at T=2 and in reverse KL where a top-K cache is furthest off."""
    folder = tmp_path / "h"
    cache_teacher.main(["--teacher", str(kit["teacher"]), "--data", str(data), "--output", str(folder),
                        "--store", "hidden", "--hidden-dtype", "float32"])
    report = run(kit, data, "--teacher-cache", str(folder), "--kl", "reverse")
    assert problems(report) == []
    gap = find(report, "INFO", "cache gap")[0].message
    cached, live = (float(x) for x in re.search(r"\) ([\d.]+), from the live teacher ([\d.]+)", gap).groups())
    assert cached == pytest.approx(live, rel=1e-5) and live > 0
