"""generate_data.py (resume after a kill, torn last line) and one clear error for each kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common
import generate_data
import sequence_level
from conftest import ROOT


def write_prompts(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"What is {i} + {i + 1}?", "answer": f"#### {2 * i + 1}"}) + "\n")
    return path


def gen_args(kit, prompts, output, *extra):
    return ["--teacher", str(kit["teacher"]), "--dataset", str(prompts), "--output", str(output),
            "--max-new-tokens", "6", "--temperature", "0", "--batch-size", "4", *extra]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_rows_have_the_documented_fields(kit, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 5)
    out = tmp_path / "out.jsonl"
    generate_data.main(gen_args(kit, prompts, out))
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [f"train-{i}" for i in range(5)]
    row = rows[0]
    assert row["messages"][0] == {"role": "system", "content": common.DEFAULT_SYSTEM_PROMPT}
    assert row["messages"][1] == {"role": "user", "content": "What is 0 + 1?"}
    assert row["answer"] == "#### 1" and row["teacher"] == str(kit["teacher"])
    assert row["generation"]["max_new_tokens"] == 6 and row["finish_reason"] in ("stop", "length")
    assert isinstance(row["completion"], str)
    # Lengths come from our decode loop: "length" means exactly --max-new-tokens tokens, "stop" fewer (the
    # end-of-turn token that ended it is not part of the completion).
    for r in rows:
        assert (r["completion_tokens"] == 6) if r["finish_reason"] == "length" else (r["completion_tokens"] < 6)


def test_resume_repairs_a_torn_line_and_never_duplicates(kit, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", 10)
    out = tmp_path / "out.jsonl"
    generate_data.main(gen_args(kit, prompts, out))
    full = out.read_text().splitlines(keepends=True)
    # A kill mid-write: five whole rows and half of the sixth.
    out.write_text("".join(full[:5]) + full[5][: len(full[5]) // 2])
    generate_data.main(gen_args(kit, prompts, out))
    assert "torn last line" in capsys.readouterr().out
    lines = out.read_text().splitlines(keepends=True)
    assert lines[:5] == full[:5]
    ids = [json.loads(line)["id"] for line in lines]
    assert sorted(ids) == sorted(f"train-{i}" for i in range(10)) and len(set(ids)) == 10
    # A third run has nothing to do and leaves the file alone.
    before = out.read_bytes()
    generate_data.main(gen_args(kit, prompts, out))
    assert out.read_bytes() == before


def test_resume_after_sigkill(kit, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 40)
    out = tmp_path / "out.jsonl"
    args = [sys.executable, str(ROOT / "generate_data.py"), *gen_args(kit, prompts, out, "--batch-size", "2",
                                                                         "--max-new-tokens", "24")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = out.read_text().count("\n")
    assert 3 <= written < 40, "the kill should land mid-run"
    generate_data.main(args[2:])  # the resumed run, in this process
    ids = [row["id"] for row in read_rows(out)]
    assert len(ids) == 40 and len(set(ids)) == 40


def test_resume_refuses_an_output_written_for_other_prompts(kit, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "out.jsonl"
    generate_data.main(gen_args(kit, prompts, out))
    with pytest.raises(common.DistillError, match="different prompt"):
        generate_data.main(gen_args(kit, prompts, out, "--system-prompt", "Another system prompt"))


# ---- bad input: one clear message each ------------------------------------------------------------------------


def test_missing_data_file(kit, tmp_path):
    with pytest.raises(common.DistillError, match="missing.jsonl' not found"):
        sequence_level.main(["--student", str(kit["student"]), "--data", str(tmp_path / "missing.jsonl"),
                             "--output-dir", str(tmp_path / "run")])


def test_malformed_jsonl_line_names_file_and_line(kit, tmp_path, rows_file):
    lines = rows_file.read_text().splitlines()
    lines[2] = lines[2][:-5]
    rows_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(common.DistillError, match=r"data.jsonl:3: malformed JSON"):
        sequence_level.main(["--student", str(kit["student"]), "--data", str(rows_file),
                             "--output-dir", str(tmp_path / "run")])


def test_missing_field_in_data_rows(kit, tmp_path, rows_file):
    rows = read_rows(rows_file)
    del rows[4]["completion"]
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(common.DistillError, match=r"row 5 \(id=train-4\) has no 'completion'"):
        sequence_level.main(["--student", str(kit["student"]), "--data", str(rows_file),
                             "--output-dir", str(tmp_path / "run")])


def test_missing_prompt_field_names_the_flag(kit, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    with pytest.raises(common.DistillError, match=r"no field 'prompt' \(--prompt-field\); fields: question, answer"):
        generate_data.main(gen_args(kit, prompts, tmp_path / "o.jsonl", "--prompt-field", "prompt"))


def test_missing_dataset_file(kit, tmp_path):
    with pytest.raises(common.DistillError, match="not found"):
        generate_data.main(gen_args(kit, tmp_path / "nope.jsonl", tmp_path / "o.jsonl"))


def test_tokenizer_without_chat_template(kit, tmp_path, rows_file):
    model = tmp_path / "no_template"
    shutil.copytree(kit["student"], model)
    (model / "chat_template.jinja").unlink()
    with pytest.raises(common.DistillError, match="has no chat template"):
        sequence_level.main(["--student", str(model), "--data", str(rows_file), "--output-dir", str(tmp_path / "r")])


def test_too_long_rows_are_skipped_counted_and_reported(kit, tmp_path, rows_file, capsys):
    rows = read_rows(rows_file)
    rows[1]["completion"] = "many words " * 200
    rows[7]["completion"] = "many words " * 200
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sequence_level.main(["--student", str(kit["student"]), "--data", str(rows_file), "--output-dir",
                         str(tmp_path / "run"), "--max-length", "256", "--max-steps", "1"])
    assert "skipped 2 of 16 rows longer than --max-length 256" in capsys.readouterr().out


def test_cli_prints_one_line_not_a_traceback(kit, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "messages": [], "completion": "x"}\nnot json\n')
    proc = subprocess.run([sys.executable, str(ROOT / "sequence_level.py"), "--student", str(kit["student"]),
                           "--data", str(bad), "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}:2: malformed JSON line (Expecting value)"
