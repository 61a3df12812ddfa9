"""A run owns its output: a finished run is never overwritten without --overwrite, a run refused at start writes
nothing, two writers of one output are refused (training, generate_data.py, cache_teacher.py), and
--save-total-limit rotates checkpoints."""

from __future__ import annotations

import fcntl
import json
import os

import pytest

import cache_teacher
import common
import generate_data
import sequence_level
from conftest import write_rows


def train(kit, data, out, *extra):
    sequence_level.main(["--student", str(kit["student"]), "--data", str(data), "--output-dir", str(out),
                         "--batch-size", "4", "--lr", "3e-3", "--log-every", "100", *extra])


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_is_refused_untouched_then_replaced_only_with_overwrite(kit, tmp_path):
    data, out = write_rows(tmp_path / "d.jsonl", 8), tmp_path / "run"
    train(kit, data, out, "--max-steps", "3", "--save-every", "1")
    before = snapshot(out)
    assert "checkpoint-2/model.safetensors" in before
    with pytest.raises(common.DistillError, match=f"--output-dir '{out}' is not empty .*--resume .*--overwrite"):
        train(kit, data, out, "--max-steps", "1", "--lr", "1e-3")
    assert snapshot(out) == before, "a refused run must not write anything (run_config.json included)"

    train(kit, data, out, "--max-steps", "1", "--lr", "1e-3", "--overwrite")
    assert not list(out.glob("checkpoint-*")), "the old run's checkpoints must go with it"
    assert json.loads((out / "run_config.json").read_text())["lr"] == 1e-3
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    # so a later --resume cannot continue the replaced run
    with pytest.raises(common.DistillError, match="no complete checkpoint"):
        train(kit, data, tmp_path / "other", "--max-steps", "2", "--resume", str(out))


def test_overwrite_clears_only_a_run_folder_that_holds_no_input(kit, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 4)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(common.DistillError, match="holds no run_config.json"):
        train(kit, data, foreign, "--max-steps", "1", "--overwrite")
    assert (foreign / "notes.txt").read_text() == "mine"
    # a run folder that also holds this run's --data
    inside = tmp_path / "run"
    train(kit, data, inside, "--max-steps", "1")
    (inside / "d.jsonl").write_text(data.read_text())
    with pytest.raises(common.DistillError, match="holds --data"):
        train(kit, inside / "d.jsonl", inside, "--max-steps", "1", "--overwrite")
    assert (inside / "d.jsonl").exists() and (inside / "model.safetensors").exists()


def hold_lock(path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process's lock, as far as flock is concerned
    return fd


def test_a_second_writer_of_the_same_output_is_refused(kit, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 4)
    out = tmp_path / "run"
    out.mkdir()
    fd = hold_lock(out / ".lock")
    try:
        with pytest.raises(common.DistillError, match="is in use by another run"):
            train(kit, data, out, "--max-steps", "1")
        assert [p.name for p in out.iterdir()] == [".lock"]
    finally:
        os.close(fd)
    train(kit, data, out, "--max-steps", "1")  # released: the folder is free again
    assert (out / "model.safetensors").exists()

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "#### 2"}) + "\n")
    generated = tmp_path / "gen.jsonl"
    fd = hold_lock(generated)
    try:
        with pytest.raises(common.DistillError, match="--output .* is in use by another run"):
            generate_data.main(["--teacher", str(kit["teacher"]), "--dataset", str(prompts), "--output",
                                str(generated), "--max-new-tokens", "4", "--temperature", "0"])
    finally:
        os.close(fd)
    assert generated.read_text() == ""

    cache = tmp_path / "cache"
    cache.mkdir()
    fd = hold_lock(cache / ".lock")
    try:
        with pytest.raises(common.DistillError, match="--output .* is in use by another run"):
            cache_teacher.main(["--teacher", str(kit["teacher"]), "--data", str(data), "--output", str(cache)])
    finally:
        os.close(fd)
    assert not (cache / "cache.json").exists()


def test_save_total_limit_keeps_the_newest_checkpoints(kit, tmp_path):
    data, out = write_rows(tmp_path / "d.jsonl", 8), tmp_path / "run"
    train(kit, data, out, "--max-steps", "5", "--save-every", "1", "--save-total-limit", "2")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
