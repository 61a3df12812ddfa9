"""Data and folders that cannot be right are named in one line (file, row, flag), or skipped and counted: never
trained on silently, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest

import checkpoints
import common
import generate_data
import models
import sequence_level
from conftest import write_rows


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(kit, data, out, *extra, student=None):
    sequence_level.main(["--student", str(student or kit["student"]), "--data", str(data), "--output-dir", str(out),
                         "--max-steps", "1", "--batch-size", "4", *extra])


@pytest.mark.parametrize(("content", "shown"), [(None, "null"), (7, "7")])
def test_message_content_that_is_not_text_names_the_row(kit, tmp_path, content, shown):
    rows = rows_of(write_rows(tmp_path / "d.jsonl", 4))
    rows[2]["messages"][1]["content"] = content  # null used to become the prompt "None"
    data = write(tmp_path / "d.jsonl", rows)
    with pytest.raises(common.DistillError, match=rf"row 3 \(id=train-2\): messages\[1\].content is {shown}, not text"):
        train(kit, data, tmp_path / "run")


def test_empty_completions_are_skipped_and_counted(tmp_path, capsys):
    rows = rows_of(write_rows(tmp_path / "d.jsonl", 6))
    rows[1]["completion"], rows[4]["completion"] = "", "  \n"
    data = write(tmp_path / "d.jsonl", rows)
    kept = common.load_distill_rows(data)
    assert [r["id"] for r in kept] == ["train-0", "train-2", "train-3", "train-5"]
    assert "skipping 2 of 6 rows with an empty completion (ids train-1, train-4)" in capsys.readouterr().out
    for row in rows:
        row["completion"] = ""
    with pytest.raises(common.DistillError, match="every completion is empty"):
        common.load_distill_rows(write(data, rows))


def test_invalid_utf8_names_the_line(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 4)
    lines = data.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"Solve", b"Solv\xe9")  # latin-1, not UTF-8
    data.write_bytes(b"\n".join(lines))
    with pytest.raises(common.DistillError, match=r"d.jsonl:3: not valid UTF-8 \(byte 0xe9 at column \d+\)"):
        common.load_distill_rows(data)
    prompts = tmp_path / "p.json"
    prompts.write_bytes(b'[{"question": "caf\xe9?"}]')
    with pytest.raises(common.DistillError, match=r"p.json: not valid UTF-8"):
        common.load_prompt_dataset(str(prompts))


def test_a_role_the_template_rejects_names_the_row(kit, tmp_path):
    rows = rows_of(write_rows(tmp_path / "d.jsonl", 4))
    rows[1]["messages"].append({"role": "tool", "content": "42"})
    data = write(tmp_path / "d.jsonl", rows)
    with pytest.raises(common.DistillError, match=r"--data row 2 \(id=train-1\): the chat template of .*student_nosys. "
                                                  r"rejects these messages \(roles: system, user, tool\): Only"):
        train(kit, data, tmp_path / "run", student=kit["student_nosys"])


def test_model_folders_that_hold_no_model(kit, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(common.DistillError, match=f"--student '{empty}' is an empty folder"):
        train(kit, data, tmp_path / "run", student=empty)
    tokenizer_only = tmp_path / "tok"
    models.load_tokenizer(str(kit["student"])).save_pretrained(tokenizer_only)
    with pytest.raises(common.DistillError, match="holds a tokenizer but no model"):
        train(kit, data, tmp_path / "run", student=tokenizer_only)


def test_a_model_without_chat_template_is_named_and_not_saved_over(kit, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 4)
    model = tmp_path / "no_template"
    shutil.copytree(kit["student"], model)
    (model / "chat_template.jinja").unlink()
    with pytest.raises(common.DistillError, match=f"'{model}' has no chat template") as caught:
        train(kit, data, tmp_path / "run", student=model)
    assert "pass NEW instead" in str(caught.value)
    assert str(model) not in str(caught.value).split("has no chat template")[1], "never suggest saving over it"


def test_an_output_that_cannot_be_written_is_refused_before_any_work(kit, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 4)
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(common.DistillError, match=f"--output-dir '{a_file}' is a file, not a folder"):
        train(kit, data, a_file)
    with pytest.raises(common.DistillError, match="is a file, so no folder can be made there"):
        train(kit, data, a_file / "run")
    # checked before the teacher is even looked for: a missing one would be the error otherwise
    with pytest.raises(common.DistillError, match=f"--output '{tmp_path}' is a folder"):
        generate_data.main(["--teacher", str(tmp_path / "missing"), "--dataset", str(data), "--output",
                            str(tmp_path)])


def test_an_output_without_write_permission_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints.os, "access", lambda path, mode: False)  # root may write anywhere: pretend
    with pytest.raises(common.DistillError, match=f"--output '{tmp_path}/sub/out.jsonl': no permission to write to "
                                                  f"'{tmp_path}'"):
        checkpoints.check_output_path(tmp_path / "sub" / "out.jsonl", "--output", folder=False)
