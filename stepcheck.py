"""Where in a worked answer the first wrong step is: its calculations checked one by one, then its answer line.

A reply to a GSM8K-style problem is read as a sequence of steps: every line that holds a calculation
('7 * 8 = 56', GSM8K's '<<48/2=24>>' annotations, chains such as '2 * 3 = 6 * 4 = 24'), in order, then the answer
line ('#### N', which ends the reply: anything after it is not read). `first_wrong_step` names the first step
that is wrong and why:

- "arithmetic": a calculation whose result is not the value of its left side (rounded or truncated to the
  decimals written on the right: '10 / 3 = 3.33' and '= 3.3' are right, '= 3.4' and '= 3' are not);
- "off the reference": the arithmetic is right but the reply's final answer is wrong and this result is none of
  the numbers the reference solution computes (its calculations' results and its answer): the reply went off
  the reference's path here, e.g. it copied a wrong number from the question. Only counted when the final
  answer is wrong, so that a correct answer reached by another route has no wrong step;
- "wrong answer": every calculation is right (and on the reference's path), but '#### N' states another number;
- "no answer line": the same, but the reply never states '#### N' (cut off, or it stopped without one).

A reply whose calculations are right and whose answer line is the reference's has no wrong step. Prose lines
(without '=') are not steps. `summarize` counts the kinds over many replies and where the first wrong step sits.
"""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction

import generation

KINDS = ("arithmetic", "off the reference", "wrong answer", "no answer line")
# A number as written in a calculation: digits with optional thousands separators and decimals, maybe a '$'.
_NUMBER = r"\$?\s*\d+(?:,\d{3})*(?:\.\d+)?"
# What a calculation's left side may hold: numbers, operators, brackets, spaces ('x' and '×' multiply).
_EXPRESSION_CHARS = set("0123456789.,$ ()+-*/x×÷")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _value(text: str) -> Fraction:
    return Fraction(text.replace("$", "").replace(",", "").replace(" ", ""))


def _evaluate(expression: str) -> Fraction | None:
    """The exact value of `expression` (numbers, + - * / and brackets), or None if it is not such an expression
    or holds no operator (a bare number or a name is no calculation)."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", expression).replace("$", "")
    text = text.replace("×", "*").replace("÷", "/").replace("x", "*")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.BinOp):
        return None

    def walk(node) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value,
                                                                                                    bool):
            return Fraction(ast.get_source_segment(text.strip(), node) or str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ZeroDivisionError
            return _OPERATORS[type(node.op)](left, right)
        raise ValueError(ast.dump(node))

    try:
        return walk(tree)
    except (ValueError, ZeroDivisionError):
        return None


def calculations(line: str) -> list[tuple[Fraction, Fraction, int]]:
    """The calculations of one line: (value of the left side, result written on the right, decimals written).

    GSM8K's '<<expr=result>>' annotations are read where a line has them (the text around them repeats the same
    numbers); otherwise each '=' with an arithmetic expression on its left and a number on its right is one.
    """
    annotated = re.findall(r"<<([^<>=]+)=([^<>=]+)>>", line)
    if annotated:
        pairs = [(left, right) for left, right in annotated]
    else:
        pairs, parts = [], line.split("=")
        for left, right in zip(parts, parts[1:]):
            # the longest run of expression characters that ends at this '='
            start = len(left)
            while start > 0 and left[start - 1] in _EXPRESSION_CHARS:
                start -= 1
            expression = left[start:].lstrip(" .,x×*/÷+)")
            # a comma that is no thousands separator separates the expression from earlier text
            expression = re.split(r",(?!\d{3}\b)", expression)[-1]
            pairs.append((expression, right))
    found = []
    for expression, right in pairs:
        value, written = _evaluate(expression), re.match(r"\s*(-?\s*" + _NUMBER + ")", right)
        if value is None or written is None:
            continue
        result = written.group(1)
        decimals = len(result.split(".")[1]) if "." in result else 0
        found.append((value, _value(result.replace("-", "")) * (-1 if "-" in result else 1), decimals))
    return found


def _arithmetic_ok(value: Fraction, result: Fraction, decimals: int) -> bool:
    if decimals == 0:
        return value == result
    unit = Fraction(1, 10**decimals)  # the value rounded, or truncated, to the decimals written
    return abs(value - result) <= unit / 2 or 0 <= value - result < unit


def _steps(text: str) -> tuple[list[list[tuple[Fraction, Fraction, int]]], str | None]:
    """The calculation lines of `text` before its answer line, and the answer it states (None without one)."""
    answer = generation.extract_answer(text, strict=True)
    marker = re.search(r"####|\\boxed\{", text)
    body = text[:marker.start()] if marker else text
    lines = [calculations(line) for line in body.splitlines()]
    return [line for line in lines if line], answer


def first_wrong_step(reply: str, reference: str) -> dict:
    """The first wrong step of `reply` against the `reference` solution (see the module docstring).

    Returns {"step": 1-based index of the first wrong step or None, "steps": how many steps the reply has (its
    calculation lines, plus one for the answer line, present or missing), "kind": one of KINDS or None}.
    """
    reply_lines, answer = _steps(reply)
    reference_lines, reference_answer = _steps(reference)
    if reference_answer is None:
        reference_answer = generation.extract_answer(reference)
    on_path = {result for line in reference_lines for _, result, _ in line}
    if reference_answer is not None:
        on_path.add(_value(reference_answer))
    answer_right = answer is not None and answer == reference_answer
    steps = len(reply_lines) + 1
    for index, line in enumerate(reply_lines, start=1):
        if not all(_arithmetic_ok(*calc) for calc in line):
            return {"step": index, "steps": steps, "kind": "arithmetic"}
        if not answer_right and not any(result in on_path for _, result, _ in line):
            return {"step": index, "steps": steps, "kind": "off the reference"}
    if answer_right:
        return {"step": None, "steps": steps, "kind": None}
    return {"step": steps, "steps": steps, "kind": "no answer line" if answer is None else "wrong answer"}


def summarize(replies: list[str], references: list[str]) -> dict:
    """Over many replies: the share with no wrong step, the share whose first wrong step is of each kind, and
    where the first wrong step sits (the share at the first step, and its mean index) among those with one."""
    verdicts = [first_wrong_step(reply, reference) for reply, reference in zip(replies, references, strict=True)]
    wrong = [v for v in verdicts if v["step"] is not None]
    n = len(verdicts)
    return {"n": n, "no_wrong_step": (n - len(wrong)) / n if n else 0.0,
            **{kind: sum(v["kind"] == kind for v in wrong) / n if n else 0.0 for kind in KINDS},
            "at_first_step": sum(v["step"] == 1 for v in wrong) / len(wrong) if wrong else None,
            "mean_step": sum(v["step"] for v in wrong) / len(wrong) if wrong else None}
