"""Data that trains or measures something else than it seems to, said in one line: repeated rows (trained once
unless --allow-duplicates), held-out rows that are training rows, and completion text the student's tokenizer can
only write as its unknown token."""

from __future__ import annotations

import json

import pytest

import checks
import common
import cross_tokenizer
import doctor
import models
import sequence_level
from conftest import read_metrics, write_rows


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(kit, data, out, *extra, student="student"):
    sequence_level.main(["--student", str(kit[student]), "--data", str(data), "--output-dir", str(out),
                         "--batch-size", "4", "--log-every", "100", *extra])


# -- duplicates ---------------------------------------------------------------------------------------------------

def test_repeated_rows_are_reported_and_trained_once(kit, tmp_path, capsys):
    rows = rows_of(write_rows(tmp_path / "d.jsonl", 8))
    copy = {**rows[5], "id": "copy-5"}  # the same prompt and completion under another id
    other = {**rows[6], "completion": rows[6]["completion"] + " (again)"}  # the same id, another answer
    # two generate_data outputs concatenated (rows 0-3 twice), and the two above
    data = write(tmp_path / "both.jsonl", rows + rows[:4] + [copy, other])
    kept = common.load_distill_rows(data)
    assert [r["id"] for r in kept] == [r["id"] for r in rows] and kept[6] == rows[6]
    assert (f"{data}: 6 of 14 rows repeat an earlier row (the same id, or the same prompt and completion; ids "
            "train-0, train-1, train-2, train-3, copy-5, ...): each is kept once") in capsys.readouterr().out
    assert len(common.load_distill_rows(data, allow_duplicates=True)) == 14

    train(kit, data, tmp_path / "once", "--epochs", "1")
    assert len(read_metrics(tmp_path / "once")) == 2  # 8 rows in batches of 4
    assert "6 of 14 rows repeat an earlier row" in capsys.readouterr().out
    train(kit, data, tmp_path / "every", "--epochs", "1", "--allow-duplicates")
    assert len(read_metrics(tmp_path / "every")) == 4  # 14 rows
    assert "rows repeat an earlier row" not in capsys.readouterr().out


def test_rows_without_ids_repeat_only_by_content(tmp_path, capsys):
    rows = [{k: v for k, v in r.items() if k != "id"} for r in rows_of(write_rows(tmp_path / "d.jsonl", 3))]
    data = write(tmp_path / "n.jsonl", rows + rows[:1])
    assert len(common.load_distill_rows(data)) == 3
    assert "1 of 4 rows repeat an earlier row (the same id, or the same prompt and completion; ids None)" in \
        capsys.readouterr().out


# -- held-out rows that are training rows -------------------------------------------------------------------------

def test_held_out_rows_that_are_training_rows(kit, tmp_path, capsys):
    data = write_rows(tmp_path / "d.jsonl", 8)
    copy = write(tmp_path / "copy.jsonl", [{**r, "id": f"h{i}"} for i, r in enumerate(rows_of(data))])
    with pytest.raises(common.DistillError, match=rf"--eval-data {copy}: all 8 held-out prompts are also --data "
                                                  "prompts, so its numbers would be training numbers"):
        train(kit, data, tmp_path / "run", "--max-steps", "1", "--eval-data", str(copy), "--eval-every", "1")
    assert not (tmp_path / "run").exists(), "refused before anything is written"

    # Two of five, one under another system prompt and other spacing: still the same question.
    held_out = rows_of(write_rows(tmp_path / "e.jsonl", 3, seed=7))
    leaked = [{**r, "id": f"leak-{i}"} for i, r in enumerate(rows_of(data)[:2])]
    leaked[0]["messages"][0]["content"] = "Another system prompt."
    leaked[1]["messages"][-1]["content"] = "  " + leaked[1]["messages"][-1]["content"].replace(" ", "  ")
    mixed = write(tmp_path / "mixed.jsonl", held_out + leaked)
    train(kit, data, tmp_path / "run", "--max-steps", "1", "--eval-data", str(mixed), "--eval-every", "1")
    assert (f"warning: --eval-data {mixed}: 2 of 5 held-out prompts are also --data prompts (leak-0, leak-1); "
            "their numbers are training numbers") in capsys.readouterr().out


def test_held_out_problems_that_are_training_prompts(kit, tmp_path, capsys):
    data = write_rows(tmp_path / "d.jsonl", 4)
    questions = [r["messages"][-1]["content"] for r in rows_of(data)]
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"question": q, "answer": "#### 1"}) + "\n" for q in questions))
    args = ["--max-steps", "1", "--eval-problems", str(problems), "--eval-every", "1", "--eval-max-new-tokens", "2"]
    with pytest.raises(common.DistillError, match="--eval-problems .*: all 4 held-out prompts are also --data"):
        train(kit, data, tmp_path / "run", *args)
    problems.write_text("".join(json.dumps({"question": q, "answer": "#### 1"}) + "\n"
                                for q in [questions[2], "What is 2 + 2?"]))
    train(kit, data, tmp_path / "run", *args)
    assert f"--eval-problems {problems}: 1 of 2 held-out prompts are also --data prompts (row 1)" in \
        capsys.readouterr().out


# -- unknown tokens -----------------------------------------------------------------------------------------------

def nosys_rows(path, n, unknown: str, every: int = 1):
    """Rows the "nosys" student (SentencePiece-like, an <unk> for unseen characters, no system role) can read,
    with `unknown` appended to the completion of every `every`-th row."""
    rows = rows_of(write_rows(path, n, system=None))
    for i, row in enumerate(rows):
        if i % every == 0:
            row["completion"] += f" {unknown}"
    return write(path, rows)


def test_unknown_targets_stop_cross_tokenizer_naming_the_tokenizer(kit, tmp_path):
    data = nosys_rows(tmp_path / "d.jsonl", 6, "♞⚗ ☃ £5")
    with pytest.raises(common.DistillError, match=rf"tokenizer '{kit['student_nosys']}' maps \d+ of \d+ completion "
                                                  r"tokens \(\d+\.\d%\) to its unknown token '<unk>': it cannot "
                                                  r"write '£☃♞⚗' .* above 1%, not training"):
        cross_tokenizer.main(["--student", str(kit["student_nosys"]), "--teacher", str(kit["teacher"]), "--data",
                              str(data), "--output-dir", str(tmp_path / "run"), "--max-steps", "1"])
    assert not (tmp_path / "run").exists()


def test_unknown_targets_are_counted_exactly(kit, tmp_path):
    tokenizer = models.load_tokenizer(str(kit["student_nosys"]))
    rows = common.load_distill_rows(nosys_rows(tmp_path / "d.jsonl", 6, "☃", every=3))
    examples, _ = common.encode_rows(rows, tokenizer, 1024)
    unk = tokenizer.unk_token_id
    # by hand: the unknown token's ids among the trained positions
    want = sum(1 for ex in examples for i, m in zip(ex["input_ids"], ex["loss_mask"]) if m and i == unk)
    total = sum(sum(ex["loss_mask"]) for ex in examples)
    assert want == 2  # rows 0 and 3, one snowman each
    check = checks.unknown_targets_check(tokenizer, rows, examples)
    assert check.status == ("FAIL" if want / total > checks.UNKNOWN_TARGETS_MAX else "WARN")
    assert f"maps {want} of {total} completion tokens ({want / total:.1%})" in check.message
    assert "cannot write '☃'" in check.message
    clean = common.load_distill_rows(write_rows(tmp_path / "c.jsonl", 4, system=None))
    assert checks.unknown_targets_check(tokenizer, clean, common.encode_rows(clean, tokenizer, 1024)[0]).status == "OK"
    # a byte-level tokenizer has no unknown token
    chatml = models.load_tokenizer(str(kit["student"]))
    assert checks.unknown_targets_check(chatml, rows, common.encode_rows(rows, chatml, 1024)[0]).status == "OK"


def test_a_few_unknown_targets_are_reported_and_trained(kit, tmp_path, capsys):
    rows = rows_of(write_rows(tmp_path / "d.jsonl", 40, system=None))
    rows[3]["completion"] += " ☃"
    data = write(tmp_path / "d.jsonl", rows)
    train(kit, data, tmp_path / "run", "--max-steps", "1", student="student_nosys")
    out = capsys.readouterr().out
    assert f"warning: tokenizer '{kit['student_nosys']}' maps 1 of " in out and "cannot write '☃'" in out
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_doctor_shows_unknown_targets(kit, tmp_path):
    data = nosys_rows(tmp_path / "d.jsonl", 4, "☃ ☃")
    report = doctor.run_checks(doctor.parse_args(["--teacher", str(kit["teacher"]), "--student",
                                                  str(kit["student_nosys"]), "--data", str(data), "--color",
                                                  "never"]))
    found = [c for c in report if c.topic == "unknown"]
    assert len(found) == 1 and found[0].status == "FAIL" and "cannot write '☃'" in found[0].message
