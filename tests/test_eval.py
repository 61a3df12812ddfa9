"""extract_answer on realistic strings, and eval.py end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

import common
import eval as evaluate
import sequence_level
from conftest import write_rows


@pytest.mark.parametrize("text,want", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("She earns 12 * 5 = $60.\n#### $1,080", "1080"),
    ("The answer is \\boxed{1,234}.", "1234"),
    ("so the total is \\boxed{ -7 } dollars", "-7"),
    ("First 3 + 4 = 7, then 7 * 2 = 14. So she has 14 apples.", "14"),
    ("#### -3", "-3"),
    ("The price went down by 12.50 dollars.\n#### 12.50", "12.5"),
    ("#### 18.0", "18"),
    ("It is 45%.", "45"),
    ("about 1,000,000 people", "1000000"),
    ("#### 5 apples (not 6)", "5"),
    ("There is no number here.", None),
    ("", None),
])
def test_extract_answer(text, want):
    assert common.extract_answer(text) == want


def test_equal_numbers_compare_equal():
    assert common.extract_answer("#### 1,080.00") == common.extract_answer("The answer is 1080")


def test_eval_on_a_tiny_model(kit, tmp_path, capsys):
    # A student that has memorized the answers to these exact problems scores 100%; the untrained one ~0%.
    data = write_rows(tmp_path / "d.jsonl", 4, system=common.DEFAULT_SYSTEM_PROMPT)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": r["messages"][-1]["content"], "answer": r["completion"]})
                                + "\n" for r in rows))
    trained = tmp_path / "trained"
    sequence_level.main(["--student", str(kit["student"]), "--data", str(data), "--output-dir", str(trained),
                         "--max-steps", "150", "--batch-size", "4", "--lr", "1e-2", "--warmup-ratio", "0"])
    out = tmp_path / "results.jsonl"
    for model, name in ((kit["student"], "untrained"), (trained, "trained")):
        evaluate.main(["--model", str(model), "--name", name, "--dataset", str(problems), "--output", str(out),
                       "--max-new-tokens", "64", "--teacher", str(trained)])
    results = {r["name"]: r for r in common.read_jsonl(out)}
    assert results["trained"]["exact_match"] == 1.0 and results["untrained"]["exact_match"] == 0.0
    assert results["trained"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)  # it *is* the teacher
    assert results["trained"]["top1_agreement"] == 1.0
    assert results["untrained"]["kl_to_teacher"] > 1.0
    table = capsys.readouterr().out
    assert "| trained | 100.0% | 0.000 | 100.0% | 4 |" in table


def test_demo_quick_prints_every_row(tmp_path):
    """`python demo.py --quick`: the CI smoke test of the whole pipeline (all four methods, eval, table, plot)."""
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--quick", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "demo" / "quick" / "results.md").read_text()
    for row in ("teacher", "student before distillation", "2nd student before (other tokenizer)", "sequence_level",
                "token_level", "on_policy", "cross_tokenizer"):
        assert f"| {row}" in report, row
    assert (tmp_path / "demo" / "quick" / "results.png").stat().st_size > 10_000
