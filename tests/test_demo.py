"""demo.py: the CI smoke test of the whole pipeline, and the pieces of its report checked against direct computation."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from pathlib import Path

import common
import demo
import generation
import stepcheck


def test_demo_quick_runs_every_stage(kit, tmp_path):
    """`python demo.py --quick`: pretraining, teacher, data, four methods with held-out tracking, table, picture.
    In this process, with the session's tiny kit in place of the one the demo would build (the same build: the
    demo only uses its tokenizers)."""
    shutil.copytree(kit["student"].parent, tmp_path / "demo" / "models")
    demo.main(["--quick", "--out", str(tmp_path / "demo")])
    out = tmp_path / "demo" / "quick"
    report = (out / "results.md").read_text()
    rows = {}
    for line in report.splitlines():
        match = re.match(r"\| (.+?) \| ([\d.]+)% \[([\d.]+), ([\d.]+)\] \| ([\d.]+)% \[([\d.]+), ([\d.]+)\] \|", line)
        if match:
            rows[match.group(1)] = [float(x) for x in match.groups()[1:]]
    names = ["teacher (pretrained, then instruction-tuned)", "base student (pretrained only)",
             "base 2nd student (other tokenizer)", "sequence_level", "token_level (forward KL, T=2)",
             "on_policy (lmbda=0.5, reverse KL)", "cross_tokenizer (ULD, other tokenizer)",
             "on_policy (other tokenizer, lmbda=0.5, hybrid ULD)",
             "sequence_level, first 4 steps only", "sequence_level 4 steps → on_policy 4 steps"]
    assert list(rows) == names
    results = json.loads((out / "results.json").read_text())
    problems = common.load_prompt_dataset(str(out / "task_test.jsonl"))
    for result, (name, (strict, lo, hi, lenient, llo, lhi)) in zip(results, rows.items()):
        assert result["name"] == name
        # the printed interval is the Wilson interval of the printed score over the test problems
        want = generation.wilson_interval(round(result["exact_match"] * result["n"]), result["n"])
        assert (lo, hi) == (round(100 * want[0], 1), round(100 * want[1], 1)), name
        assert lo <= strict <= hi and llo <= lenient <= lhi and strict <= lenient + 1e-9
        assert result["n"] == len(problems)
    # every reply is saved, and the strict score recomputed from the saved replies is the table's
    for result, path in zip(results, ["teacher", "student_base", "student_other_tokenizer_base",
                                      "sequence_level-seed0", "token_level-seed0", "on_policy-seed0",
                                      "cross_tokenizer-seed0", "on_policy_other_tokenizer-seed0", "sft_half-seed0",
                                      "sft_then_on_policy-seed0"]):
        saved = common.read_jsonl(out / "predictions" / f"{path}.jsonl")
        assert len(saved) == len(problems)
        assert math.isclose(sum(r["strict_ok"] for r in saved) / len(saved), result["exact_match"])
        # the first-wrong-step shares, recomputed from the saved replies and the test problems' solutions
        assert result["steps"] == stepcheck.summarize([r["reply"] for r in saved], [p["answer"] for p in problems])
    assert "| sequence_level 4 steps → on_policy 4 steps | " in report.split("Where the first wrong step")[1]
    # the students (not the teacher and the bases) are also scored on sampled replies: maj@k and pass@k
    assert [("maj_at_k" in r) for r in results] == [False] * 3 + [True] * (len(names) - 3)
    for result in results[3:]:
        assert result["samples"] == demo.SAMPLES and 0 <= result["maj_at_k"] <= result["pass_at_k"] <= 1
        assert demo.evaluate.format_score(result["maj_at_k"], result["maj_at_k_ci"]) in report
    # held-out exact match was tracked during training, at every --eval-every step and the last
    for run in ("sequence_level", "token_level", "on_policy", "cross_tokenizer", "on_policy_other_tokenizer"):
        metrics = common.read_jsonl(out / run / "metrics.jsonl")
        steps = [m["step"] for m in metrics if "eval_exact_match" in m]
        assert steps == [4, 8], (run, steps)
    assert (out / "results.png").stat().st_size > 10_000
    # SFT, then on-policy: the other rows' total of 8 steps as 4 + 4, on_policy from the SFT stage's model with
    # the on_policy row's settings
    two_stage = json.loads((out / "sft_then_on_policy" / "run_config.json").read_text())
    alone = json.loads((out / "on_policy" / "run_config.json").read_text())
    assert Path(two_stage["student"]) == out / "sft_half"
    assert json.loads((out / "sft_half" / "run_config.json").read_text())["student"] == alone["student"]
    for key in ("teacher", "lmbda", "kl", "temperature", "max_new_tokens", "lr", "batch_size", "data"):
        assert two_stage[key] == alone[key], key
    for run in ("sft_half", "sft_then_on_policy"):  # 4 steps each, held-out exact match tracked at the last
        metrics = common.read_jsonl(out / run / "metrics.jsonl")
        assert [m["step"] for m in metrics if "eval_exact_match" in m] == [len(metrics)] == [4], run
    # explain.py's figures of the run's own models, each with the numbers behind it
    for name in ("mechanisms", "alignment", "logit_lens", "attention_heads", "first_token", "stepmix"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 5_000, name
        assert json.loads((out / "figures" / f"{name}.json").read_text()), name
    stepmix = json.loads((out / "figures" / "stepmix.json").read_text())
    on_policy = [m["on_policy"] for m in common.read_jsonl(out / "on_policy" / "metrics.jsonl") if "on_policy" in m]
    assert (stepmix["steps"], stepmix["on_policy"]) == (len(on_policy), sum(on_policy))


def test_pretraining_text_is_not_the_chat_task():
    """The base models' corpus holds the facts but none of the task's conventions."""
    rng = random.Random(0)
    texts = [demo.make_pretraining_text(rng) for _ in range(2000)]
    task = [demo.make_problem(random.Random(i))[0] for i in range(200)]
    assert not any("####" in t or demo.SYSTEM_PROMPT in t or "<|im_start|>" in t for t in texts)
    assert not any(question in text for question in task for text in texts)  # the task's questions are unseen
    for kind in ("+", "-", "*", "/"):  # every fact the task asks about is in the corpus
        assert any(f" {kind} " in t for t in texts)


def test_seeds_report_is_mean_and_sample_std():
    per_seed = [[{"name": "a", "exact_match": v}] for v in (0.5, 0.6, 0.7)]
    line = demo.seeds_report(per_seed).splitlines()[-1]
    assert line.startswith("| a | 60.0% ± 10.0% |")
