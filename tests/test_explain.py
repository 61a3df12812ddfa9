"""explain.py: every subcommand draws a PNG on the tiny kit, and the numbers behind each figure are checked against
direct computation (plain forward passes, a brute-force alignment, an unmerged LoRA model)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import common
import cross_tokenizer
import explain
import models
from conftest import write_rows

TOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("explain_data") / "rows.jsonl", 8, seed=3)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("figures")


def check_png(path, *, limit=200_000):
    assert path.exists() and 5_000 < path.stat().st_size < limit, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def completion_logits(model, tokenizer, row):
    """One row alone (no padding): its encoding and the logits at every position."""
    enc = common.encode_chat(tokenizer, row["messages"], row["completion"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0].float()
    return enc, logits


@pytest.fixture(scope="module")
def mechanisms(kit, data, out):
    return explain.mechanisms(str(kit["teacher"]), str(kit["student"]), str(data), out / "mech", rows=4,
                              toy_steps=300, device="cpu")


def test_mechanisms_picks_the_max_entropy_position_and_shows_its_probabilities(kit, data, mechanisms):
    check_png(mechanisms["png"])
    numbers = json.loads(mechanisms["json"].read_text())
    teacher, tokenizer = models.load_model(str(kit["teacher"]))
    student, _ = models.load_model(str(kit["student"]))
    rows = common.load_distill_rows(data)[:4]
    best = (-1.0, None)
    for r, row in enumerate(rows):
        enc, logits = completion_logits(teacher, tokenizer, row)
        for i in range(len(enc["input_ids"]) - 1):
            if enc["loss_mask"][i + 1]:
                p = F.softmax(logits[i], -1)
                entropy = float(-(p * p.log()).sum())
                if entropy > best[0]:
                    best = (entropy, (r, i))
    entropy, (r, i) = best
    assert (numbers["row"], numbers["position"]) == (r, i)
    assert math.isclose(numbers["entropy"], entropy, abs_tol=1e-4)
    enc, t_logits = completion_logits(teacher, tokenizer, rows[r])
    _, s_logits = completion_logits(student, tokenizer, rows[r])
    assert numbers["data_next_token"] == enc["input_ids"][i + 1]
    ids = numbers["token_ids"]
    assert ids == t_logits[i].topk(len(ids)).indices.tolist()
    assert numbers["teacher_argmax"] == ids[0] == int(t_logits[i].argmax())
    for t in (1.0, 2.0):
        for who, logits in (("teacher", t_logits), ("student", s_logits)):
            want = F.softmax(logits[i] / t, -1)[ids]
            assert torch.allclose(torch.tensor(numbers[f"{who}_T{t:g}"]), want, atol=TOL), (who, t)
    assert numbers["tokens"][0] == explain.token_text(tokenizer, ids[0])


def test_toy_fit_forward_kl_covers_both_modes_reverse_kl_picks_one(mechanisms):
    toy = json.loads(mechanisms["json"].read_text())["toy"]
    forward, reverse = toy["forward"], toy["reverse"]
    assert forward["std"] > 2 * reverse["std"]
    assert abs(forward["mean"]) < 0.3  # between the two modes at -2.5 and +2.5
    assert abs(abs(reverse["mean"]) - 2.5) < 0.2 and abs(reverse["std"] - 0.6) < 0.1
    # the fitted losses are our loss function's values at the fitted parameters
    grid = torch.linspace(-6, 6, 121)
    for beta, fit in ((0.0, forward), (1.0, reverse)):
        student = -(grid - fit["mean"]) ** 2 / (2 * fit["std"] ** 2)
        loss = common.generalized_jsd_per_position(student, explain.toy_teacher(grid), beta)
        assert math.isclose(float(loss), fit["loss"], rel_tol=1e-2, abs_tol=1e-3)
    assert reverse["loss"] == pytest.approx(math.log(2), abs=0.01)  # one of two equal modes: KL = log 2


def brute_force_alignment(student_offsets, teacher_offsets):
    """For each student token, the teacher token with the closest end offset; ties to the earlier one."""
    return [min(range(len(teacher_offsets)), key=lambda j: (abs(teacher_offsets[j][1] - end), j))
            for _, end in student_offsets]


def test_alignment_pairs_are_the_closest_end_offsets(kit, data, out):
    result = explain.alignment(str(kit["teacher"]), str(kit["student_nosys"]), str(data), out / "align", rows=6,
                               top_k=10, device="cpu")
    check_png(result["png"])
    numbers = json.loads(result["json"].read_text())
    t_tok = models.load_tokenizer(str(kit["teacher"]))
    s_tok = models.load_tokenizer(str(kit["student_nosys"]))
    rows = common.load_distill_rows(data)
    row = rows[numbers["row"]]
    s_enc = common.encode_chat(s_tok, row["messages"], row["completion"])
    t_enc = common.encode_chat(t_tok, row["messages"], row["completion"])
    s_offsets, t_offsets = s_enc["completion_offsets"], t_enc["completion_offsets"]
    assert [(t["start"], t["end"]) for t in numbers["student_tokens"]] == [tuple(o) for o in s_offsets]
    assert [(t["start"], t["end"]) for t in numbers["teacher_tokens"]] == [tuple(o) for o in t_offsets]
    pairs = brute_force_alignment(s_offsets, t_offsets)
    assert numbers["pairs"] == pairs
    misaligned = [i for i, j in enumerate(pairs) if s_offsets[i][1] != t_offsets[j][1]]
    assert numbers["misaligned"] == misaligned and misaligned  # these two tokenizers do disagree somewhere
    # the drawn row is the one with the most misaligned tokens among the rows read
    counts = []
    for r in rows[:6]:
        s = common.encode_chat(s_tok, r["messages"], r["completion"])["completion_offsets"]
        t = common.encode_chat(t_tok, r["messages"], r["completion"])["completion_offsets"]
        counts.append(sum(s[i][1] != t[j][1] for i, j in enumerate(brute_force_alignment(s, t))))
    assert numbers["row"] == counts.index(max(counts))
    # coverage over the rows read: the share of student tokens ending exactly where their partner ends
    total = sum(len(common.encode_chat(s_tok, r["messages"], r["completion"])["completion_offsets"])
                for r in rows[:6])
    assert numbers["stats"]["student_tokens"] == total
    assert math.isclose(numbers["stats"]["exact_end_fraction"], 1 - sum(counts) / total)
    # the sorted top-K + tail vectors at the chosen pair, from direct forward passes
    teacher, _ = models.load_model(str(kit["teacher"]))
    student, _ = models.load_model(str(kit["student_nosys"]))
    i, j = numbers["pair"], pairs[numbers["pair"]]
    s_pos = [n for n, m in enumerate(s_enc["loss_mask"]) if m][i]
    t_pos = [n for n, m in enumerate(t_enc["loss_mask"]) if m][j]
    with torch.no_grad():
        s_logits = student(input_ids=torch.tensor([s_enc["input_ids"]])).logits[0, s_pos - 1]
        t_logits = teacher(input_ids=torch.tensor([t_enc["input_ids"]])).logits[0, t_pos - 1]
    t = numbers["temperature"]
    p = F.softmax(t_logits / t, -1).sort(descending=True).values
    q = F.softmax(s_logits / t, -1).sort(descending=True).values
    k = numbers["top_k"]
    assert k == 10
    assert torch.allclose(torch.tensor(numbers["teacher_sorted"]), torch.cat([p[:k], p[k:].sum()[None]]), atol=TOL)
    assert torch.allclose(torch.tensor(numbers["student_sorted"]), torch.cat([q[:k], q[k:].sum()[None]]), atol=TOL)
    want = cross_tokenizer.uld_loss(s_logits[None], t_logits[None], k=k, temperature=t)
    assert math.isclose(numbers["uld_kl"], float(want), rel_tol=1e-4, abs_tol=1e-6)
    # the vocabulary match (--uld-match hybrid): the matched probability at the chosen pair, from the same passes
    match = cross_tokenizer.match_pair(s_tok, t_tok)
    shown = numbers["vocab_match"]
    assert shown["matched_tokens"] == len(match.student_ids) > 0
    assert math.isclose(shown["teacher_matched_mass"][i], float(F.softmax(t_logits / t, -1)[match.teacher_ids].sum()),
                        rel_tol=1e-4)
    assert math.isclose(shown["student_matched_mass"][i], float(F.softmax(s_logits / t, -1)[match.student_ids].sum()),
                        rel_tol=1e-4)
    assert shown["row_same_span"] == [tuple(s_offsets[a]) == tuple(t_offsets[b]) for a, b in enumerate(pairs)]


@pytest.fixture(scope="module")
def lora_adapter(kit, tmp_path_factory):
    """A LoRA adapter on the kit's student with non-zero (random) B matrices, as a saved adapter folder."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = models.load_model(str(kit["student"]))
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=1.0)
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inside(kit, data, out, lora_adapter):
    return explain.inside(str(kit["student"]), [str(kit["student_padded"]), str(lora_adapter)], str(data),
                          out / "inside", labels=["padded", "lora"], rows=4, device="cpu")


def reference_probs(model, tokenizer, rows):
    """p(reference next token) at every completion position of every row, from the model's own output."""
    values = []
    for row in rows:
        enc, logits = completion_logits(model, tokenizer, row)
        probs = F.softmax(logits, -1)
        values += [float(probs[i, enc["input_ids"][i + 1]]) for i in range(len(enc["input_ids"]) - 1)
                   if enc["loss_mask"][i + 1]]
    return values


def test_inside_logit_lens_last_layer_is_the_models_output(kit, data, inside, lora_adapter):
    for key in ("logit_lens", "attention_heads", "first_token"):
        check_png(inside[key])
    numbers = json.loads(inside["json"].read_text())
    lens = numbers["logit_lens"]
    rows = common.load_distill_rows(data)[:4]
    base, tokenizer = models.load_model(str(kit["student"]))
    padded, _ = models.load_model(str(kit["student_padded"]))
    from peft import PeftModel

    unmerged = PeftModel.from_pretrained(models.load_model(str(kit["student"]))[0], str(lora_adapter)).eval()
    want = {}
    for label, model in (("base", base), ("padded", padded), ("lora", unmerged)):
        assert len(lens[label]) == base.config.num_hidden_layers + 1  # embeddings, then every layer
        want[label] = reference_probs(model, tokenizer, rows)
        assert math.isclose(lens[label][-1], sum(want[label]) / len(want[label]), abs_tol=TOL), label
    # the adapter changes the outputs, so the match above means it was merged, not dropped
    assert max(abs(a - b) for a, b in zip(want["lora"], want["base"])) > 100 * TOL
    # the first layer's value by hand: the embeddings through the final norm and the head
    values = []
    for row in rows:
        enc = common.encode_chat(tokenizer, row["messages"], row["completion"])
        with torch.no_grad():
            hidden = base.model.embed_tokens(torch.tensor(enc["input_ids"]))
            probs = F.softmax(base.lm_head(base.model.norm(hidden)), -1)
        values += [float(probs[i, enc["input_ids"][i + 1]]) for i in range(len(enc["input_ids"]) - 1)
                   if enc["loss_mask"][i + 1]]
    assert math.isclose(lens["base"][0], sum(values) / len(values), abs_tol=TOL)
    # a padded batch gives the same lens as one row at a time
    batch, _ = explain.encode_batch(rows, tokenizer, "cpu")
    assert explain.logit_lens(base, batch) == pytest.approx(lens["base"], abs=TOL)


def eager_model(kit, name):
    """A kit model with eager attention, which returns the attention maps explain.py reads."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(kit[name]), attn_implementation="eager").eval()


def test_inside_most_changed_head_and_first_token(kit, data, inside):

    numbers = json.loads(inside["json"].read_text())
    rows = common.load_distill_rows(data)[:4]
    tokenizer = models.load_tokenizer(str(kit["student"]))

    base, padded = eager_model(kit, "student"), eager_model(kit, "student_padded")
    total, count = None, 0
    for row in rows:  # one row at a time: no padding anywhere
        enc = common.encode_chat(tokenizer, row["messages"], row["completion"])
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            a = base(input_ids=ids, output_attentions=True).attentions
            b = padded(input_ids=ids, output_attentions=True).attentions
        queries = [i for i in range(len(enc["input_ids"]) - 1) if enc["loss_mask"][i + 1]]
        change = torch.stack([(x[0] - y[0]).abs().sum(-1)[:, queries].sum(-1) for x, y in zip(a, b)])
        total = change if total is None else total + change
        count += len(queries)
    change = total / count
    head = numbers["heads"]["padded"]
    assert torch.allclose(torch.tensor(head["change"]), change, atol=1e-4)
    assert (head["layer"], head["head"]) == divmod(int(change.argmax()), change.shape[1])
    assert set(numbers["heads"]) == {"padded", "lora"}
    # first answer token: the mean next-token distribution after each generation prompt
    first = numbers["first_token"]
    mean = 0
    for row in rows:
        prompt = common.render_chat(tokenizer, row["messages"], add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            mean = mean + F.softmax(padded(input_ids=torch.tensor([ids])).logits[0, -1, :len(tokenizer)], -1)
    mean = mean / len(rows)
    assert torch.allclose(torch.tensor(first["probs"]["padded"]), mean[first["token_ids"]], atol=TOL)
    assert len(first["data_first_tokens"]) == len(rows)


def test_stepmix_counts_the_logged_steps(tmp_path, out):
    run = tmp_path / "run"
    run.mkdir()
    flags = [False, True, True, False, True, False, False, True, True, True]
    with (run / "metrics.jsonl").open("w") as f:
        for step, flag in enumerate(flags, 1):
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "on_policy": flag}) + "\n")
            if step % 5 == 0:  # an evaluation row without the key is not a step of either kind
                f.write(json.dumps({"step": step, "eval_loss": 0.5}) + "\n")
    (run / "run_config.json").write_text(json.dumps({"lmbda": 0.5}))
    result = explain.main(["stepmix", str(run), "--out", str(out / "stepmix")])
    check_png(result["png"])
    numbers = json.loads(result["json"].read_text())
    assert (numbers["steps"], numbers["on_policy"], numbers["off_policy"]) == (10, 6, 4)
    assert numbers["on_policy_steps"] == [s for s, f in enumerate(flags, 1) if f] and numbers["lmbda"] == 0.5


def test_stepmix_of_a_run_without_on_policy_steps_is_one_clear_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(common.DistillError, match="on_policy"):
        explain.stepmix(tmp_path, tmp_path / "figs")


def test_token_text_is_readable(kit):
    tokenizer = models.load_tokenizer(str(kit["teacher"]))
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert explain.token_text(tokenizer, newline[0]) == "↵"
    sentencepiece = models.load_tokenizer(str(kit["student_nosys"]))
    word = sentencepiece("hello apples", add_special_tokens=False)["input_ids"]
    assert any(explain.token_text(sentencepiece, i).startswith("␣") for i in word[1:])


def test_inside_first_token_shift_and_attention_layer(kit, data, inside, lora_adapter):
    from peft import PeftModel

    for key in ("first_token_shift", "attention_layer"):
        check_png(inside[key])
    numbers = json.loads(inside["json"].read_text())
    rows = common.load_distill_rows(data)[:4]
    tokenizer = models.load_tokenizer(str(kit["student"]))

    base, padded = eager_model(kit, "student"), eager_model(kit, "student_padded")
    lora = PeftModel.from_pretrained(eager_model(kit, "student"), str(lora_adapter)).eval()
    mean = {}
    for label, model in (("base", base), ("padded", padded), ("lora", lora)):
        total = 0
        for row in rows:
            prompt = common.render_chat(tokenizer, row["messages"], add_generation_prompt=True)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                total = total + F.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1, :len(tokenizer)], -1)
        mean[label] = total / len(rows)
    shift = numbers["first_token_shift"]
    moved = torch.maximum((mean["padded"] - mean["base"]).abs(), (mean["lora"] - mean["base"]).abs())
    ids = shift["token_ids"]
    assert len(ids) == 12 and set(shift["shift"]) == {"padded", "lora"}
    # the tokens shown are those that moved most: none left out moved more than the least of them
    rest = torch.ones_like(moved, dtype=torch.bool)
    rest[ids] = False
    assert float(moved[rest].max()) <= float(moved[ids].min()) + TOL
    for label in ("padded", "lora"):
        want = (mean[label] - mean["base"])[ids]
        assert torch.allclose(torch.tensor(shift["shift"][label]), want, atol=TOL), label
    assert shift["tokens"] == [explain.token_text(tokenizer, i) for i in ids]

    # every head of one layer: by default the layer of the largest head change in any student
    grid = numbers["attention_layer"]
    changes = {label: torch.tensor(h["change"]) for label, h in numbers["heads"].items()}
    best = max(changes.values(), key=lambda c: float(c.max()))
    assert grid["layer"] == int(best.argmax()) // best.shape[1]
    enc = common.encode_chat(tokenizer, rows[0]["messages"], rows[0]["completion"])
    length = len(enc["input_ids"])
    assert grid["row_tokens"] == length and grid["window"] == min(length, 32)
    for label, model in (("base", base), ("padded", padded)):
        with torch.no_grad():
            attn = model(input_ids=torch.tensor([enc["input_ids"]]), output_attentions=True).attentions[grid["layer"]]
        rows_shown = attn[0, :, length - grid["window"]:].double()  # [heads, window, T]
        entropy = -(rows_shown * rows_shown.clamp_min(1e-300).log()).sum(-1).mean(-1)
        assert torch.allclose(torch.tensor(grid["entropy"][label], dtype=torch.float64), entropy, atol=1e-4), label


def test_inside_layer_flag_is_checked_before_any_work(kit, data, tmp_path):
    with pytest.raises(common.DistillError, match="--layer 7: the base has 2 layers"):
        explain.main(["inside", "--base", str(kit["student"]), "--models", str(kit["student_padded"]), "--data",
                      str(data), "--layer", "7", "--out", str(tmp_path), "--device", "cpu"])
    result = explain.main(["inside", "--base", str(kit["student"]), "--models", str(kit["student_padded"]),
                           "--data", str(data), "--rows", "2", "--layer", "-1", "--out", str(tmp_path),
                           "--device", "cpu"])
    assert result["numbers"]["attention_layer"]["layer"] == 1
