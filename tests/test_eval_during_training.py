"""Held-out evaluation during training (--eval-data, --eval-every, --eval-problems, --save-best): logged at the
right steps, equal to an independent computation, without changing the training, and the best model kept."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import common
import cross_tokenizer
import generation
import losses
import models
import on_policy
import sequence_level
import tiny
import token_level
from conftest import SYSTEM, read_metrics, write_rows


def eval_rows(path, n=5, seed=7):
    """Held-out rows with ids of their own (a teacher cache holds training and held-out rows side by side)."""
    write_rows(path, n, seed=seed)
    rows = [{**json.loads(line), "id": f"heldout-{i}"} for i, line in enumerate(path.read_text().splitlines())]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def eval_keys(row):
    return {k for k in row if k.startswith("eval_")}


def test_eval_rows_are_logged_every_n_steps_and_at_the_last(kit, tmp_path):
    out = tmp_path / "run"
    sequence_level.main(["--student", str(kit["student"]), "--data", str(write_rows(tmp_path / "d.jsonl", 8)),
                         "--eval-data", str(eval_rows(tmp_path / "e.jsonl")), "--eval-every", "3",
                         "--max-steps", "7", "--batch-size", "2", "--lr", "1e-3", "--output-dir", str(out)])
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 8))
    assert [m["step"] for m in metrics if eval_keys(m)] == [3, 6, 7]
    for m in metrics:
        if eval_keys(m):
            assert eval_keys(m) == {"eval_loss", "eval_ce"}
            assert m["eval_loss"] == pytest.approx(m["eval_ce"], rel=1e-12)  # sequence_level's loss is the CE


def reference_metrics(student_dir, teacher_dir, rows_file, *, alpha, beta, temperature):
    """eval_loss, eval_ce, eval_div and eval_kl from their formulas: float64, plain log_softmax, one row at a time."""
    student, tokenizer = models.load_model(str(student_dir))
    teacher, _ = models.load_model(str(teacher_dir))
    student, teacher = student.double().eval(), teacher.double().eval()
    examples, _ = common.encode_rows(common.load_distill_rows(rows_file), tokenizer, 1024)
    ce = soft = kl = count = 0.0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        mask = torch.tensor(ex["loss_mask"][1:], dtype=torch.bool)
        with torch.no_grad():
            s, t = student(ids).logits[0, :-1][mask], teacher(ids).logits[0, :-1][mask]
        targets = ids[0, 1:][mask]
        ce += -s.log_softmax(-1).gather(-1, targets[:, None]).sum().item()
        log_q, log_p = (s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1)
        if beta == 0:
            d = (log_p.exp() * (log_p - log_q)).sum(-1)
        elif beta == 1:
            d = (log_q.exp() * (log_q - log_p)).sum(-1)
        else:
            log_m = (beta * log_p.exp() + (1 - beta) * log_q.exp()).log()
            d = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
        soft += temperature**2 * d.sum().item()
        log_q1, log_p1 = s.log_softmax(-1), t.log_softmax(-1)
        kl += (log_p1.exp() * (log_p1 - log_q1)).sum().item()
        count += mask.sum().item()
    return {"eval_loss": (alpha * ce + (1 - alpha) * soft) / count, "eval_ce": ce / count, "eval_div": soft / count,
            "eval_kl": kl / count}


@pytest.mark.parametrize("script", ["token_level", "on_policy"])
def test_eval_loss_and_kl_equal_their_formulas_on_the_saved_model(kit, tmp_path, script):
    """--eval-every = the number of steps: the one evaluation is of the final model, which is saved."""
    held_out = eval_rows(tmp_path / "e.jsonl", n=5)
    out = tmp_path / "run"
    args = ["--student", str(kit["student"]), "--teacher", str(kit["teacher"]), "--data",
            str(write_rows(tmp_path / "d.jsonl", 8)), "--eval-data", str(held_out), "--eval-every", "3",
            "--eval-batch-size", "2", "--max-steps", "3", "--batch-size", "4", "--lr", "3e-3", "--output-dir", str(out)]
    if script == "token_level":
        settings = dict(alpha=0.3, beta=1.0, temperature=2.0)
        token_level.main([*args, "--kl", "reverse", "--alpha", "0.3", "--temperature", "2"])
    else:  # trains on its own samples; evaluates on the teacher's held-out text
        settings = dict(alpha=0.0, beta=0.5, temperature=1.5)
        on_policy.main([*args, "--lmbda", "1", "--kl", "jsd", "--beta", "0.5", "--temperature", "1.5",
                        "--max-new-tokens", "8"])
    logged = read_metrics(out)[-1]
    assert eval_keys(logged) == {"eval_loss", "eval_ce", "eval_div", "eval_kl"}
    want = reference_metrics(out, kit["teacher"], held_out, **settings)
    for key, value in want.items():
        assert logged[key] == pytest.approx(value, rel=1e-5), key
    assert logged["eval_kl"] != pytest.approx(logged["eval_loss"], rel=1e-3)  # the T=1 KL is not the loss term


def fixed_answer_rows(path, n=8):
    """Problems whose 'teacher' always answers '#### 7': a student learns that within a few steps."""
    rng = random.Random(0)
    rows = [{"id": f"r{i}", "messages": [{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": tiny.make_problem(rng)[0]}],
             "completion": "#### 7"} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def problems_file(path, answers):
    rng = random.Random(1)
    path.write_text("".join(json.dumps({"question": tiny.make_problem(rng)[0], "answer": f"so\n#### {a}"}) + "\n"
                            for a in answers))
    return path


def test_exact_match_equals_scoring_the_saved_models_answers(kit, tmp_path):
    problems = problems_file(tmp_path / "p.jsonl", ["7", "5", "7", "12", "7"])
    out = tmp_path / "run"
    sequence_level.main(["--student", str(kit["student"]), "--data", str(fixed_answer_rows(tmp_path / "d.jsonl")),
                         "--eval-problems", str(problems), "--eval-every", "16", "--eval-max-new-tokens", "12",
                         "--eval-batch-size", "2", "--max-steps", "16", "--batch-size", "4", "--lr", "1e-2",
                         "--warmup-ratio", "0", "--output-dir", str(out)])
    logged = read_metrics(out)[-1]
    assert eval_keys(logged) == {"eval_exact_match"}
    model, tokenizer = models.load_model(str(out))
    rows = common.load_prompt_dataset(str(problems))
    # The default system prompt is the training data's: the one its rows were generated with.
    replies = generation.answer_problems(model, tokenizer, rows, system_prompt=SYSTEM, max_new_tokens=12, batch_size=5)
    want = generation.score_answers(replies, [p["answer"] for p in rows])["strict"]
    assert logged["eval_exact_match"] == want
    assert 0 < want < 1, replies  # the comparison can tell right from wrong answers


def test_training_is_the_same_with_and_without_evaluation(kit, tmp_path):
    """on_policy samples with the torch RNG and flips its own coin, and LoRA dropout draws from the RNG in
    train mode only: evaluation (eval mode, greedy answers) must leave the RNGs and the mode as they were."""
    pytest.importorskip("peft")
    data, held_out = write_rows(tmp_path / "d.jsonl", 8), eval_rows(tmp_path / "e.jsonl", n=3)
    problems = problems_file(tmp_path / "p.jsonl", ["7", "5"])
    args = ["--student", str(kit["student"]), "--teacher", str(kit["teacher"]), "--data", str(data),
            "--max-steps", "4", "--batch-size", "2", "--lr", "3e-3", "--lmbda", "0.5", "--max-new-tokens", "6",
            "--seed", "2", "--lora", "--lora-r", "4", "--lora-dropout", "0.5"]
    # The LoRA weights are drawn before TrainLoop seeds the RNGs: start both runs from the same state.
    models.seed_everything(0)
    on_policy.main([*args, "--output-dir", str(tmp_path / "plain")])
    models.seed_everything(0)
    on_policy.main([*args, "--output-dir", str(tmp_path / "eval"), "--eval-data", str(held_out), "--eval-problems",
                    str(problems), "--eval-every", "1", "--eval-max-new-tokens", "4"])
    plain, evaluated = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "eval")
    assert all(eval_keys(m) == {"eval_loss", "eval_ce", "eval_div", "eval_kl", "eval_exact_match"} for m in evaluated)
    assert [m["on_policy"] for m in evaluated] == [m["on_policy"] for m in plain]
    assert len({m["on_policy"] for m in plain}) == 2  # both kinds of step happened
    for key in ("loss", "gen_len", "grad_norm", "tokens"):
        assert [m.get(key) for m in evaluated] == [m.get(key) for m in plain], key
    want = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    got = load_file(tmp_path / "eval" / "adapter_model.safetensors")
    assert all(torch.equal(got[name], want[name]) for name in want)


def best_args(kit, tmp_path, out):
    """Four training rows learned by heart: the held-out loss falls, then climbs back (overfitting)."""
    return ["--student", str(kit["student"]), "--data", str(write_rows(tmp_path / "d.jsonl", 4)),
            "--eval-data", str(eval_rows(tmp_path / "e.jsonl", n=6, seed=1)), "--eval-every", "2",
            "--save-best", "eval_loss", "--save-every", "2", "--max-steps", "24", "--batch-size", "4",
            "--lr", "2e-2", "--warmup-ratio", "0", "--output-dir", str(out)]


def test_save_best_keeps_the_step_with_the_lowest_eval_loss(kit, tmp_path):
    out = tmp_path / "run"
    sequence_level.main(best_args(kit, tmp_path, out))
    evaluated = [m for m in read_metrics(out) if "eval_loss" in m]
    best = json.loads((out / "best" / "best.json").read_text())
    lowest = min(evaluated, key=lambda m: m["eval_loss"])
    assert best == {"metric": "eval_loss", "step": lowest["step"], "value": lowest["eval_loss"], "better": "lower"}
    assert 2 < best["step"] < 24, "the run must overfit for this test to tell best from last"
    want, got = load_file(out / f"checkpoint-{best['step']}" / "model.safetensors"), load_file(
        out / "best" / "model.safetensors")
    assert all(torch.equal(got[name], want[name]) for name in want)
    assert (out / "best" / "tokenizer_config.json").exists() and (out / "model.safetensors").exists()


def test_the_best_so_far_survives_a_resume(kit, tmp_path):
    """Resumed at the best step, a run must not take its first (worse) evaluation after the resume for the best."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    sequence_level.main(best_args(kit, tmp_path, full))
    best = json.loads((full / "best" / "best.json").read_text())
    assert best["step"] < 24
    # What a run killed right after the best step leaves behind: that checkpoint and OUTPUT_DIR/best.
    resumed.mkdir()
    shutil.copytree(full / f"checkpoint-{best['step']}", resumed / f"checkpoint-{best['step']}")
    shutil.copytree(full / "best", resumed / "best")
    sequence_level.main([*best_args(kit, tmp_path, resumed), "--resume", str(resumed)])
    assert json.loads((resumed / "best" / "best.json").read_text()) == best
    evaluated = {run: {m["step"]: m["eval_loss"] for m in read_metrics(run) if "eval_loss" in m}
                 for run in (full, resumed)}
    assert evaluated[resumed] == pytest.approx(evaluated[full], rel=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--eval-data", "{e}"], "--eval-data needs --eval-every"),
    (["--eval-problems", "{p}"], "--eval-problems needs --eval-every"),
    (["--save-best", "eval_loss"], "--save-best needs --eval-every"),
    (["--eval-every", "2"], "--eval-every needs --eval-data and/or --eval-problems"),
    (["--eval-every", "2", "--eval-data", "{e}", "--save-best", "eval_exact_match"],
     "--save-best eval_exact_match: not a metric this run logs (it logs eval_loss, eval_ce)"),
    (["--eval-every", "2", "--eval-problems", "{p}", "--save-best", "eval_kl"],
     "--save-best eval_kl: not a metric this run logs (it logs eval_exact_match)"),
    (["--eval-every", "2", "--eval-data", "missing.jsonl"], "--eval-data 'missing.jsonl': no such file"),
])
def test_held_out_flags_are_checked_before_anything_loads(tmp_path, capsys, flags, message):
    files = {"e": write_rows(tmp_path / "e.jsonl", 2), "p": problems_file(tmp_path / "p.jsonl", ["1"])}
    with pytest.raises(SystemExit) as exit_info:
        sequence_level.parse_args(["--data", "d.jsonl", "--output-dir", "out", *[f.format(**files) for f in flags]])
    assert exit_info.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err.strip().splitlines()[-1]


def test_which_metrics_each_script_offers_to_save_best(tmp_path):
    e = str(write_rows(tmp_path / "e.jsonl", 2))
    base = ["--data", e, "--output-dir", "out", "--eval-every", "1", "--eval-data", e]
    assert token_level.parse_args([*base, "--save-best", "eval_kl"]).save_best == "eval_kl"
    assert on_policy.parse_args([*base, "--save-best", "eval_kl"]).save_best == "eval_kl"
    assert cross_tokenizer.parse_args([*base, "--save-best", "eval_div"]).save_best == "eval_div"
    for script, flags in ((token_level, ["--teacher-cache", "c"]), (cross_tokenizer, []), (sequence_level, [])):
        with pytest.raises(SystemExit):  # no same-vocabulary teacher in memory: no eval_kl
            script.parse_args([*base, *flags, "--save-best", "eval_kl"])


def test_cross_tokenizer_evaluates_its_uld_objective(kit, tmp_path):
    out, held_out = tmp_path / "run", eval_rows(tmp_path / "e.jsonl", 3)
    cross_tokenizer.main(["--student", str(kit["student"]), "--teacher", str(kit["teacher_llama"]), "--data",
                          str(write_rows(tmp_path / "d.jsonl", 4)), "--eval-data", str(held_out),
                          "--eval-every", "2", "--max-steps", "2", "--batch-size", "2", "--alpha", "0.4",
                          "--output-dir", str(out)])
    logged = read_metrics(out)[-1]
    assert eval_keys(logged) == {"eval_loss", "eval_ce", "eval_div"}
    assert logged["eval_loss"] == pytest.approx(0.4 * logged["eval_ce"] + 0.6 * logged["eval_div"], rel=1e-6)


@pytest.mark.parametrize("script", ["token_level", "cross_tokenizer"])
def test_teacher_cache_runs_evaluate_from_the_cache(kit, tmp_path, script):
    import cache_teacher

    teacher = kit["teacher"] if script == "token_level" else kit["teacher_llama"]
    data, held_out, cache = write_rows(tmp_path / "d.jsonl", 4), eval_rows(tmp_path / "e.jsonl", 3), tmp_path / "c"
    cache_teacher.main(["--teacher", str(teacher), "--data", str(data), "--output", str(cache), "--top-k", "8"])
    module = token_level if script == "token_level" else cross_tokenizer
    args = ["--student", str(kit["student"]), "--data", str(data), "--teacher-cache", str(cache), "--eval-data",
            str(held_out), "--eval-every", "1", "--max-steps", "1", "--batch-size", "2"]
    if script == "cross_tokenizer":
        args += ["--top-k", "8"]
    with pytest.raises(common.DistillError, match="absent from"):
        module.main([*args, "--output-dir", str(tmp_path / "refused")])
    cache_teacher.main(["--teacher", str(teacher), "--data", str(held_out), "--output", str(cache), "--top-k", "8"])
    module.main([*args, "--output-dir", str(tmp_path / "run")])
    assert eval_keys(read_metrics(tmp_path / "run")[-1]) == {"eval_loss", "eval_ce", "eval_div"}


def test_fused_loss_without_gradients_gives_the_same_values():
    """Under no_grad the loss skips its gradient work (no head-sized buffer) and must not change a number."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(37, 8, dtype=torch.float64), torch.randn(50, 8, dtype=torch.float64)
    teacher_hidden, teacher_weight = torch.randn(37, 6, dtype=torch.float64), torch.randn(50, 6, dtype=torch.float64)
    targets = torch.randint(0, 50, (37,))
    kwargs = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, alpha=0.2, beta=0.3,
                  temperature=1.7, chunk_size=8)
    with_grad = losses.fused_head_loss(hidden.requires_grad_(), weight.requires_grad_(), targets, 40, **kwargs)
    with torch.no_grad():
        without = losses.fused_head_loss(hidden, weight, targets, 40, **kwargs)
    assert not without[0].requires_grad
    for a, b in zip(with_grad, without):
        assert torch.equal(a.detach(), b)
    logits, teacher_logits = hidden.detach() @ weight.detach().T, teacher_hidden @ teacher_weight.T
    want = 0.2 * F.cross_entropy(logits, targets, reduction="sum") + 0.8 * common.generalized_jsd_per_position(
        logits, teacher_logits, 0.3, 1.7).sum()
    torch.testing.assert_close(without[0], want / 40)
