"""stepcheck.py: the first wrong step of hand-written replies, each case written out by hand."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

import demo
import stepcheck

DEMO_REFERENCE = "5 + 3 = 8\n#### 8"  # the demo's reference solutions: one calculation, then the answer line
GSM8K_REFERENCE = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                   "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


@pytest.mark.parametrize("reply, want", [
    ("5 + 3 = 8\n#### 8", (None, 2, None)),
    ("#### 8", (None, 1, None)),  # no calculation shown: nothing is wrong
    ("5 + 3 = 9\n#### 9", (1, 2, "arithmetic")),
    ("5 + 3 = 9\n#### 8", (1, 2, "arithmetic")),  # a slip is wrong even when the answer line is right
    ("5 + 4 = 9\n#### 9", (1, 2, "off the reference")),  # copied a wrong number from the question
    ("5 + 3 = 8\n#### 9", (2, 2, "wrong answer")),
    ("5 + 3 = 8", (2, 2, "no answer line")),  # stopped (or was cut) before its answer line
    ("5 + 3 = 8\n", (2, 2, "no answer line")),
    ("The answer is 8.", (1, 1, "no answer line")),  # prose is no step
    ("#### 9", (1, 1, "wrong answer")),
    ("5 + 3 = 8\n#### 8\n2 + 2 = 5", (None, 2, None)),  # nothing after the answer line is read
    ("Ana has 5 apples and gets 3 more, so 5 + 3 = 8 apples.\n#### 8", (None, 2, None)),
])
def test_first_wrong_step_on_the_demos_replies(reply, want):
    verdict = stepcheck.first_wrong_step(reply, DEMO_REFERENCE)
    assert (verdict["step"], verdict["steps"], verdict["kind"]) == want


@pytest.mark.parametrize("reply, want", [
    (GSM8K_REFERENCE, (None, 3, None)),
    ("48 / 2 = 24\n48 + 24 = 72\n#### 72", (None, 3, None)),
    # another route to the right answer: no wrong step, though 2 * 36 is not the reference's calculation
    ("48 * 1.5 = 72\n#### 72", (None, 2, None)),
    ("48 / 2 = 24\n48 + 24 = 62\n#### 62", (2, 3, "arithmetic")),
    ("48 / 2 = 12\n48 + 12 = 60\n#### 60", (1, 3, "arithmetic")),
    ("48 * 2 = 96\n48 + 96 = 144\n#### 144", (1, 3, "off the reference")),
    ("48 / 2 = 24\n24 + 24 = 48\n#### 48", (2, 3, "off the reference")),
    ("48 / 2 = 24\n48 + 24 = 72\n#### 70", (3, 3, "wrong answer")),
    ("48 / 2 = 24\n48 + 24 =", (2, 2, "no answer line")),  # cut off mid-calculation: the half line is no step
    ("She sold 48/2 = <<48/2=24>>24 clips.\n#### 24", (1, 2, "off the reference")),  # 24 is on the path...
])
def test_first_wrong_step_on_gsm8k_style_replies(reply, want):
    verdict = stepcheck.first_wrong_step(reply, GSM8K_REFERENCE)
    if reply.endswith("#### 24"):  # ...so the wrong step is the answer line, not the calculation
        want = (2, 2, "wrong answer")
    assert (verdict["step"], verdict["steps"], verdict["kind"]) == want


@pytest.mark.parametrize("line, want", [
    ("7 * 8 = 56", [(56, 56, 0)]),
    ("7 x 8 = 56 and 7 × 8 = 56", [(56, 56, 0), (56, 56, 0)]),
    ("2 * 3 = 6 * 4 = 24", [(6, 6, 0), (24, 24, 0)]),  # a chain: each '=' checked with its own left side
    ("(3 + 4) * 2 = 14", [(14, 14, 0)]),
    ("$1,200 / 4 = $300", [(300, 300, 0)]),
    ("10 / 3 = 3.33", [(Fraction(10, 3), Fraction(333, 100), 2)]),
    ("In 2 weeks, 7 * 2 = 14 days.", [(14, 14, 0)]),  # the '2' of '2 weeks' is not part of the calculation
    ("12 - 5 = 7", [(7, 7, 0)]),
    ("5 - 8 = -3", [(-3, -3, 0)]),
    ("x = 5", []),  # no operator: not a calculation
    ("total = 12", []),
    ("<<6*4=24>> and 1 + 1 = 3", [(24, 24, 0)]),  # annotations, when a line has them, are its calculations
])
def test_calculations_of_one_line(line, want):
    assert stepcheck.calculations(line) == want


@pytest.mark.parametrize("reply, ok", [("10 / 3 = 3.33\n#### 3.33", True), ("10 / 3 = 3.3\n#### 3.3", True),
                                       ("10 / 3 = 3.4\n#### 3.4", False), ("10 / 3 = 3\n#### 3", False)])
def test_rounding_to_the_written_decimals_is_not_an_arithmetic_error(reply, ok):
    verdict = stepcheck.first_wrong_step(reply, "10 / 3 = 3.33\n#### 3.33")
    assert (verdict["kind"] != "arithmetic") == ok


def test_summarize_counts_kinds_and_where():
    replies = ["5 + 3 = 8\n#### 8", "5 + 3 = 9\n#### 9", "5 + 4 = 9\n#### 9", "5 + 3 = 8\n#### 7", "5 + 3 = 8"]
    summary = stepcheck.summarize(replies, [DEMO_REFERENCE] * len(replies))
    assert summary["n"] == 5 and summary["no_wrong_step"] == pytest.approx(1 / 5)
    assert [summary[kind] for kind in stepcheck.KINDS] == pytest.approx([1 / 5] * 4)
    assert summary["at_first_step"] == pytest.approx(2 / 4)  # arithmetic and off-reference: step 1 of 2
    assert summary["mean_step"] == pytest.approx((1 + 1 + 2 + 2) / 4)
    assert stepcheck.summarize([], [])["mean_step"] is None


def test_the_demos_reference_solutions_have_no_wrong_step():
    rng = random.Random(0)
    for _ in range(200):
        _, solution = demo.make_problem(rng)
        assert stepcheck.first_wrong_step(solution, solution)["step"] is None
        # and the same calculation with its result off by one is an arithmetic error at step 1
        calculation, answer = solution.split("\n")
        left, result = calculation.split(" = ")
        wrong = f"{left} = {int(result) + 1}\n#### {int(result) + 1}"
        assert stepcheck.first_wrong_step(wrong, solution)["kind"] == "arithmetic"
