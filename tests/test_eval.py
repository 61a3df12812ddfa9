"""Answer extraction (strict and lenient, signs vs subtraction), Wilson intervals, scoring, and eval.py end to end
on a tiny model (its table, its CI and --save-predictions)."""

from __future__ import annotations

import json
import math

import pytest

import common
import eval as evaluate
import generation
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
    assert generation.extract_answer(text) == want


def test_equal_numbers_compare_equal():
    assert generation.extract_answer("#### 1,080.00") == generation.extract_answer("The answer is 1080")


# Replies as models write them, each with (strict, lenient): strict needs '#### N' or \boxed{N}.
CUT_OFF_IN_CODE = ("Each friend gets the same number of slices.\n```python\npizzas = 3\nslices_total = pizzas * 8\n"
                   "friends = 12\nslices_per_friend = 2")
SHOWS_WORK_THEN_ANSWERS = "apples_bought = 5\napples_given = 7\ntotal = apples_bought + apples_given\n#### 12"


@pytest.mark.parametrize("text,strict,lenient", [
    (CUT_OFF_IN_CODE, None, "2"),
    (SHOWS_WORK_THEN_ANSWERS, "12", "12"),
    ("She has 12 - 5 left", None, "5"),
    ("#### -3", "-3", "-3"),
    ("The answer is \\boxed{1,080}.", "1080", "1080"),
    ("The answer is 42.", None, "42"),
    ("#### 7\nThat is 8 more than before.", "7", "7"),   # the marked answer wins over a later number
    ("So \\boxed{9}, i.e. 9 + 1 = 10", "9", "9"),
])
def test_strict_and_lenient(text, strict, lenient):
    assert generation.extract_answer(text, strict=True) == strict
    assert generation.extract_answer(text) == lenient


@pytest.mark.parametrize("text,want", [
    # A '-' after a number or a closing bracket is subtraction, with any spacing.
    ("She has 12 - 5 left", "5"),
    ("12 -5", "5"),
    ("12-5", "5"),
    ("(3 + 4) -2", "2"),
    ("50%-5", "5"),
    ("12 \u2212 5", "5"),          # the Unicode minus too
    ("n-5", "5"),                   # glued to a word: a hyphen or an operator, not a sign
    ("COVID-19", "19"),
    ("3 - -4", "-4"),               # a sign right after an operator
    # A sign where no operand precedes it.
    ("-7 degrees", "-7"),
    ("x = -3", "-3"),
    ("x=-3", "-3"),
    ("(-2)", "-2"),
    ("5 * -3", "-3"),
    ("values: 3, -4", "-4"),
    ("The temperature is -6.", "-6"),
    ("It is \u22124 degrees", "-4"),
    ("#### -3", "-3"),
    ("####-3", "-3"),
    ("#### $-5", "-5"),
    ("\\boxed{-12}", "-12"),
    # '- 5' with a space is never a sign; digits inside an identifier are not a number.
    ("x = - 5", "5"),
    ("Qwen2 says", None),
    ("Qwen2.5 says 7", "7"),
])
def test_minus_is_a_sign_only_where_it_cannot_subtract(text, want):
    assert generation.extract_answer(text) == want


def _wilson_by_quadratic(k: int, n: int, z: float) -> tuple[float, float]:
    # Independently of common's closed form: the interval is the set of p with (k/n - p)^2 <= z^2 p (1 - p) / n,
    # i.e. between the roots of (1 + z^2/n) p^2 - (2k/n + z^2/n) p + (k/n)^2 = 0.
    phat = k / n
    a, b, c = 1 + z * z / n, -(2 * phat + z * z / n), phat * phat
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize("k,n", [(0, 10), (5, 10), (10, 10), (1, 3), (62, 100), (313, 500), (499, 500), (0, 1)])
@pytest.mark.parametrize("z", [1.96, 1.0, 2.576])
def test_wilson_interval_matches_the_quadratic(k, n, z):
    assert generation.wilson_interval(k, n, z) == pytest.approx(_wilson_by_quadratic(k, n, z), abs=1e-12)


def test_wilson_interval_reference_values():
    assert generation.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert generation.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert generation.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert generation.wilson_interval(0, 0) == (0.0, 1.0)
    low, high = generation.wilson_interval(250, 500)
    assert high - low == pytest.approx(2 * 0.0437, abs=1e-3)  # the docstring's '+-4.4 points on 500'
    with pytest.raises(ValueError):
        generation.wilson_interval(11, 10)


def test_judge_answer():
    assert generation.judge_answer(CUT_OFF_IN_CODE, "... #### 2") == {
        "strict": None, "lenient": "2", "reference": "2", "strict_ok": False, "lenient_ok": True}
    assert generation.judge_answer(SHOWS_WORK_THEN_ANSWERS, "5 + 7 = 12\n#### 12") == {
        "strict": "12", "lenient": "12", "reference": "12", "strict_ok": True, "lenient_ok": True}
    # No reference number: nothing can be correct, not even a reply without a number.
    assert generation.judge_answer("no idea", None)["lenient_ok"] is False
    assert generation.judge_answer("no idea", "none given")["strict_ok"] is False


def test_score_answers_counts():
    predictions = ["#### 3", "3", CUT_OFF_IN_CODE, "She has 12 - 5 left", "#### 4", "#### 1", "#### 9"]
    references = ["#### 3", "#### 3", "#### 2", "#### -5", "#### 5", None, "no number"]
    scores = generation.score_answers(predictions, references)
    # The last two have no reference number and are not scored; of the 5 others, 1 is strictly right and 3
    # leniently ('3' and the cut-off '2'); '12 - 5' is not -5.
    assert {k: scores[k] for k in ("n", "strict_correct", "lenient_correct")} == {
        "n": 5, "strict_correct": 1, "lenient_correct": 3}
    assert scores["strict"] == 1 / 5 and scores["lenient"] == 3 / 5
    assert scores["strict_ci"] == generation.wilson_interval(1, 5)
    assert scores["lenient_ci"] == generation.wilson_interval(3, 5)
    with pytest.raises(common.DistillError, match="reference answer with a number"):
        generation.score_answers(["#### 1"], ["no number"])
    with pytest.raises(common.DistillError, match="predictions"):
        generation.score_answers(["#### 1"], ["#### 1", "#### 2"])


def test_table_shows_the_ci_and_still_reads_old_rows():
    new = {"name": "new", **evaluate.score_row(["#### 5"] * 5 + ["5"] * 3, ["#### 5"] * 8)}
    old = {"name": "old", "exact_match": 0.5, "n": 10, "kl_to_teacher": 0.25, "top1_agreement": 0.5}
    oldest = {"name": "oldest", "exact_match": 0.5}
    table = evaluate.markdown_table([new, old, oldest])
    low, high = generation.wilson_interval(5, 8)
    assert f"| new | 62.5% [{100 * low:.1f}, {100 * high:.1f}] | 100.0% [67.6, 100.0] | - | - | 8 |" in table
    # An old row's single number fell back to the last number: shown as lenient (with a CI from n), never strict.
    assert "| old | - | 50.0% [23.7, 76.3] † | 0.250 | 50.0% | 10 |" in table
    assert "| oldest | - | 50.0% † | - | - | - |" in table
    assert "† written before strict scoring" in table


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
                       "--max-new-tokens", "64", "--teacher", str(trained),
                       "--save-predictions", str(tmp_path / f"{name}.predictions.jsonl")])
    results = {r["name"]: r for r in common.read_jsonl(out)}
    assert results["trained"]["exact_match"] == 1.0 and results["untrained"]["exact_match"] == 0.0
    assert results["trained"]["correct"] == results["trained"]["correct_lenient"] == 4
    assert results["trained"]["exact_match_ci"] == pytest.approx(list(generation.wilson_interval(4, 4)))
    assert results["trained"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)  # it *is* the teacher
    assert results["trained"]["top1_agreement"] == 1.0
    assert results["untrained"]["kl_to_teacher"] > 1.0
    table = capsys.readouterr().out
    assert "| trained | 100.0% [51.0, 100.0] | 100.0% [51.0, 100.0] | 0.000 | 100.0% | 4 |" in table

    # The saved predictions let a reader re-check each row's number by hand.
    questions = [r["messages"][-1]["content"] for r in rows]
    for name, row in results.items():
        saved = common.read_jsonl(row["predictions"])
        assert [p["prompt"] for p in saved] == questions and {p["name"] for p in saved} == {name}
        assert [p["reference_text"] for p in saved] == [r["completion"] for r in rows]
        assert [p["reference"] for p in saved] == [r["answer"] for r in rows]
        for p in saved:
            assert p["strict"] == generation.extract_answer(p["reply"], strict=True)
            assert p["lenient"] == generation.extract_answer(p["reply"])
            assert p["strict_ok"] == (p["strict"] == p["reference"])
            assert p["lenient_ok"] == (p["lenient"] == p["reference"])
        assert sum(p["strict_ok"] for p in saved) / len(saved) == row["exact_match"]
        assert sum(p["lenient_ok"] for p in saved) / len(saved) == row["exact_match_lenient"]
        assert sum(p["strict_ok"] for p in saved) == row["correct"]
