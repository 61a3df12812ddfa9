"""on_policy.py with a teacher of another tokenizer: sampled text decoded, re-rendered by the teacher's template and
aligned by characters; what cannot be aligned trimmed and counted; the step against cross_tokenizer.py's."""

from __future__ import annotations

import json

import pytest

import common
import cross_tokenizer
import generation
import models
import on_policy
from conftest import read_metrics, write_rows

MESSAGES = [{"role": "user", "content": "Ana has 3 cups."}]
TIMING = ("elapsed_s", "gen_s", "teacher_s", "student_s")


@pytest.fixture(scope="module")
def tokenizers(kit):
    return {name: models.load_tokenizer(str(kit[name])) for name in ("student", "student_llama3", "student_nosys")}


def prompt_ids(tokenizer, messages=MESSAGES) -> list[int]:
    return tokenizer(common.render_chat(tokenizer, messages, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]


def completion_ids(tokenizer, text: str, messages=MESSAGES) -> tuple[list[int], list[tuple[int, int]]]:
    """The tokens and character spans `common.encode_chat` gives a completion (its end-of-turn token last)."""
    enc = common.encode_chat(tokenizer, messages, text)
    return [t for t, m in zip(enc["input_ids"], enc["loss_mask"]) if m], enc["completion_offsets"]


@pytest.mark.parametrize("name", ["student", "student_llama3", "student_nosys"])
def test_decoded_spans_are_the_fast_tokenizers_offsets(tokenizers, name):
    """Whole characters: the spans from decoding prefixes are the tokenizer's own offsets (an independent route),
    and the text is the completion."""
    tok = tokenizers[name]
    text = "Chloé gave 12 apples.\n#### 7"
    tokens, offsets = completion_ids(tok, text)
    decoded = on_policy.decode_sample(tok, prompt_ids(tok), tokens, finished=True)
    assert decoded["text"] == text and decoded["trimmed"] is None and decoded["finished"]
    assert decoded["spans"] == offsets and decoded["tokens"] == tokens


def test_a_sample_ending_inside_a_multibyte_character_is_trimmed(tokenizers):
    tok = tokenizers["student"]  # byte-level: '€' is three byte tokens in the kit's vocabulary
    tokens, offsets = completion_ids(tok, "It costs 5 €")
    body = tokens[:-1]
    euro = [i for i, (s, e) in enumerate(offsets) if (s, e) == (11, 12)]
    assert len(euro) == 3, "the test needs '€' split into byte tokens"
    prompt = prompt_ids(tok)
    # cut after the first byte of '€', and the same followed by the end-of-turn token
    for sample, finished in ((body[:euro[1]], False), (body[:euro[1]] + tokens[-1:], True)):
        decoded = on_policy.decode_sample(tok, prompt, sample, finished)
        assert decoded["trimmed"] == "partial_char" and not decoded["finished"]
        assert decoded["text"] == "It costs 5 " and decoded["tokens"] == body[:euro[0]]
    # whole, the split character's tokens keep the character's span but are not clean (no identity comparison)
    decoded = on_policy.decode_sample(tok, prompt, tokens, True)
    assert decoded["trimmed"] is None and decoded["spans"] == offsets
    assert [i for i, c in enumerate(decoded["clean"]) if not c] == euro
    # bytes that are not UTF-8 inside the text (a lone continuation byte): cut before them
    lone = tok.convert_tokens_to_ids("Ĥ")  # byte 0x82
    decoded = on_policy.decode_sample(tok, prompt, body[:euro[0]] + [lone] + body[:3], False)
    assert decoded["trimmed"] == "partial_char" and decoded["text"] == "It costs 5 "


def test_a_special_token_inside_a_sample_cuts_it(tokenizers):
    tok = tokenizers["student"]
    tokens, _ = completion_ids(tok, "Ana gave 2")
    start = tok.convert_tokens_to_ids("<|im_start|>")
    decoded = on_policy.decode_sample(tok, prompt_ids(tok), tokens[:2] + [start] + tokens[2:], True)
    assert decoded["trimmed"] == "special" and not decoded["finished"] and decoded["tokens"] == tokens[:2]
    assert decoded["text"] == tok.decode(tokens[:2])


def test_a_template_that_changes_the_text_is_trimmed_not_misaligned(tokenizers):
    """Llama 3's template trims the content: the student's leading and trailing whitespace is not the teacher's
    text, so those student tokens and the end-of-turn token after them are not trained; a verbatim template keeps
    all of them."""
    tok = tokenizers["student"]
    text = " Ana gave 2 cups.\n"
    tokens, offsets = completion_ids(tok, text)
    prompt = prompt_ids(tok)
    decoded = on_policy.decode_sample(tok, prompt, tokens, True)
    verbatim, counts = on_policy.pair_sample(tokenizers["student_nosys"], MESSAGES, prompt, decoded)
    assert counts["trimmed"] is None and sum(verbatim["loss_mask"]) == len(tokens)
    trimmed, counts = on_policy.pair_sample(tokenizers["student_llama3"], MESSAGES, prompt, decoded)
    assert counts["trimmed"] == "template" and not counts["dropped"]
    trained = [offsets[i] for i, m in enumerate(trimmed["loss_mask"][len(prompt):]) if m]
    assert trained and all(s >= 1 and e <= len(text) - 1 for s, e in trained)  # inside "Ana gave 2 cups."
    assert trimmed["input_ids"][-1] != tokens[-1]  # no end-of-turn target
    assert counts["tokens"] == len(trained) == len(trimmed["teacher_targets"])
    # each aligned teacher token is one the teacher writes for this text, ending where the student's ends or nearby
    teacher_tok = tokenizers["student_llama3"]
    for (_, end), j in zip(trained, trimmed["teacher_targets"]):
        written = teacher_tok.decode(trimmed["teacher_ids"][:j + 1])
        assert text[1:end] in written or written.endswith(text[1:end][:-2])


def test_nothing_left_is_dropped_and_counted(tokenizers):
    tok = tokenizers["student"]
    tokens, offsets = completion_ids(tok, "€")
    decoded = on_policy.decode_sample(tok, prompt_ids(tok), tokens[:1], False)
    assert decoded["tokens"] == [] and decoded["trimmed"] == "partial_char"
    example, counts = on_policy.pair_sample(tokenizers["student_nosys"], MESSAGES, prompt_ids(tok), decoded)
    assert counts["dropped"] and example["teacher_targets"] == [] and not any(example["loss_mask"])


def run_args(kit, student, teacher, data, out, *extra):
    return ["--teacher", str(kit[teacher]), "--student", str(kit[student]), "--data", str(data), "--output-dir",
            str(out), "--batch-size", "4", "--max-new-tokens", "16", "--log-every", "100", *extra]


@pytest.mark.parametrize("student,teacher", [("student_nosys", "teacher"), ("student", "student_nosys")])
def test_a_sampled_step_equals_cross_tokenizer_on_the_same_text(kit, tmp_path, monkeypatch, student, teacher):
    """The on-policy route (sample -> decode -> the teacher's template -> character alignment) against
    cross_tokenizer.py's (both templates render the row; tokenizer offsets): when the student 'samples' exactly the
    tokens its template gives the teacher's completions, the step's loss, token count and alignment are
    cross_tokenizer.py's with --alpha 0 at the same temperature and divergence."""
    data = write_rows(tmp_path / "d.jsonl", 4, system=None)
    rows = common.read_jsonl(data)
    tok = models.load_tokenizer(str(kit[student]))
    by_prompt = {tuple(prompt_ids(tok, r["messages"])): completion_ids(tok, r["completion"], r["messages"])[0]
                 for r in rows}

    def replay(model, tokenizer, prompts, **_):  # the teacher's completions, as the student's template has them
        return [{"tokens": by_prompt[tuple(p)], "finished": True} for p in prompts]

    monkeypatch.setattr(generation, "generate", replay)
    common_flags = ["--lr", "0", "--max-steps", "1", "--kl", "reverse", "--top-k", "20"]
    on_policy.main(run_args(kit, student, teacher, data, tmp_path / "op", "--lmbda", "1", *common_flags))
    cross_tokenizer.main(["--teacher", str(kit[teacher]), "--student", str(kit[student]), "--data", str(data),
                          "--output-dir", str(tmp_path / "ct"), "--batch-size", "4", "--alpha", "0",
                          "--temperature", "1", *common_flags])
    ours, theirs = read_metrics(tmp_path / "op")[0], read_metrics(tmp_path / "ct")[0]
    alignment = json.loads((tmp_path / "ct" / "alignment.json").read_text())
    assert ours["on_policy"] is True and ours["samples_trimmed"] == ours["samples_dropped"] == 0
    assert ours["tokens"] == theirs["tokens"] == alignment["student_tokens"]
    assert ours["exact_end_fraction"] == pytest.approx(alignment["exact_end_fraction"])
    assert ours["same_span_fraction"] == pytest.approx(alignment["same_span_fraction"])
    for key in ("loss", "div", "ce", "matched_mass_teacher", "matched_mass_student"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key


def test_off_policy_steps_are_cross_tokenizer_with_alpha_zero(kit, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 8)
    flags = ["--lr", "0", "--max-steps", "1", "--top-k", "20", "--uld-match", "sorted"]
    on_policy.main(run_args(kit, "student_nosys", "teacher", data, tmp_path / "op", "--lmbda", "0", *flags))
    cross_tokenizer.main(["--teacher", str(kit["teacher"]), "--student", str(kit["student_nosys"]), "--data",
                          str(data), "--output-dir", str(tmp_path / "ct"), "--batch-size", "4", "--alpha", "0",
                          "--temperature", "1", *flags])
    ours, theirs = read_metrics(tmp_path / "op")[0], read_metrics(tmp_path / "ct")[0]
    assert ours["on_policy"] is False and ours["tokens"] == theirs["tokens"]
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)


def test_sampling_end_to_end_logs_alignment_and_reports_counts(kit, tmp_path, capsys):
    data, held_out = write_rows(tmp_path / "d.jsonl", 8), write_rows(tmp_path / "e.jsonl", 4, seed=99)
    out = tmp_path / "run"
    on_policy.main(run_args(kit, "student_nosys", "teacher", data, out, "--lmbda", "1", "--max-steps", "2",
                            "--lr", "1e-3", "--eval-data", str(held_out), "--eval-every", "2"))
    metrics = read_metrics(out)
    for row in metrics:
        assert row["on_policy"] is True and row["tokens"] > 0
        assert 0 <= row["same_span_fraction"] <= row["exact_end_fraction"] <= 1
        assert row["samples_trimmed"] + row["samples_dropped"] <= 4
    assert {"eval_loss", "eval_ce", "eval_div"} <= set(metrics[-1]) and "eval_kl" not in metrics[-1]
    assert "on-policy samples: 8 drawn" in capsys.readouterr().out
    with pytest.raises(common.DistillError, match="eval_kl"):
        on_policy.main(run_args(kit, "student_nosys", "teacher", data, tmp_path / "bad", "--eval-data", str(held_out),
                                "--eval-every", "1", "--save-best", "eval_kl"))


def test_a_served_teacher_of_another_vocabulary_is_refused(kit, tmp_path):
    """--teacher-url gives top-K rows by the student's token ids: with a --teacher of another tokenizer the run
    stops before anything is loaded or asked of the server (it used to drop --teacher-url and load the teacher)."""
    with pytest.raises(common.DistillError, match="--teacher-url: --teacher .* has another vocabulary"):
        on_policy.main(run_args(kit, "student_nosys", "teacher", write_rows(tmp_path / "d.jsonl", 4), tmp_path / "run",
                                "--teacher-url", "http://127.0.0.1:9", "--temperature", "1"))
    assert not (tmp_path / "run").exists()


def test_a_step_whose_samples_are_all_dropped_trains_nothing(kit, tmp_path, monkeypatch):
    data = write_rows(tmp_path / "d.jsonl", 4)
    tok = models.load_tokenizer(str(kit["student"]))
    partial = completion_ids(tok, "€")[0][:1]  # the first byte of a three-byte character, then cut
    monkeypatch.setattr(generation, "generate", lambda model, tokenizer, prompts, **_: [
        {"tokens": partial, "finished": False} for _ in prompts])
    on_policy.main(run_args(kit, "student", "student_nosys", data, tmp_path / "run", "--lmbda", "1",
                            "--max-steps", "1", "--lr", "1e-3"))
    row = read_metrics(tmp_path / "run")[0]
    assert row["samples_dropped"] == 4 and row["tokens"] == 0 and row["loss"] == 0


def test_the_uld_flags_leave_a_same_tokenizer_run_unchanged(kit, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 8)
    logged = []
    for name, extra in (("plain", []), ("flags", ["--top-k", "3", "--uld-match", "sorted", "--uld-loss",
                                                  "wasserstein", "--uld-weighting", "vocab"])):
        on_policy.main(run_args(kit, "student", "teacher", data, tmp_path / name, "--lmbda", "0.5", "--max-steps",
                                "3", "--lr", "1e-3", *extra))
        logged.append([{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(tmp_path / name)])
    assert logged[0] == logged[1]
    assert "exact_end_fraction" not in logged[0][-1]
