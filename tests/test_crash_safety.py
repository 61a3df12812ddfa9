"""Runs that go wrong mid-way: a damaged newest checkpoint is passed over for the newest complete one, two runs
started at the same instant into one new --output-dir get one owner and one clear refusal, SIGTERM or Ctrl-C
saves a checkpoint after the step in progress, and a full disk ends a save in one line."""

from __future__ import annotations

import errno
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import common
import sequence_level
import training
from conftest import ROOT, read_metrics, write_rows


def train(kit, data, out, *extra):
    sequence_level.main(["--student", str(kit["student"]), "--data", str(data), "--output-dir", str(out),
                         "--batch-size", "4", "--lr", "3e-3", "--log-every", "100", "--seed", "3", *extra])


def assert_same_weights(got_dir, want_dir):
    want, got = load_file(want_dir / "model.safetensors"), load_file(got_dir / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)


# -- a damaged checkpoint ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_with_checkpoints(kit, tmp_path_factory):
    """A finished 3-step run with checkpoint-1 and checkpoint-2."""
    root = tmp_path_factory.mktemp("ckpt")
    train(kit, write_rows(root / "d.jsonl", 8), root / "run", "--max-steps", "3", "--save-every", "1")
    return root / "run"


CHECKPOINT_FILES = ["config.json", "generation_config.json", "metrics.jsonl", "model.safetensors", "rng_0.json",
                    "rng_0.tensors", "trainer_state.json", "trainer_state.tensors"]


def damage(path, how):
    size = path.stat().st_size
    os.truncate(path, 0 if how == "empty" else size // 2)


def test_the_checkpoint_files_listed_are_all_a_checkpoint_holds(run_with_checkpoints):
    assert sorted(p.name for p in (run_with_checkpoints / "checkpoint-2").iterdir()) == CHECKPOINT_FILES


@pytest.mark.parametrize("how", ["truncated", "empty"])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_damaged_newest_checkpoint_is_passed_over_in_one_line(run_with_checkpoints, tmp_path, capsys, name, how):
    run = shutil.copytree(run_with_checkpoints, tmp_path / "run")
    assert checkpoints.find_checkpoint(run) == run / "checkpoint-2"
    damage(run / "checkpoint-2" / name, how)
    assert checkpoints.find_checkpoint(run) == run / "checkpoint-1"
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(f"--resume: checkpoint-2 is damaged ({name}: ")
    assert said[0].endswith("resuming from checkpoint-1, the newest complete checkpoint")
    # Named itself, it is refused, naming the one to use instead.
    with pytest.raises(common.DistillError, match=rf"this checkpoint is damaged \({name}: .*\); the newest "
                                                  rf"complete one is {run / 'checkpoint-1'}$"):
        checkpoints.find_checkpoint(run / "checkpoint-2")
    damage(run / "checkpoint-1" / name, how)
    with pytest.raises(common.DistillError, match=rf"no complete checkpoint there: checkpoint-2 is damaged "
                                                  rf"\({name}: .*\); checkpoint-1 is damaged \({name}: "):
        checkpoints.find_checkpoint(run)


def test_resume_past_a_damaged_checkpoint_ends_as_the_uninterrupted_run(kit, tmp_path, capsys):
    data, out = write_rows(tmp_path / "d.jsonl", 16), tmp_path / "run"
    argv = ["--max-steps", "6", "--save-every", "2"]
    train(kit, data, out, *argv)
    full = tmp_path / "full"
    shutil.copytree(out, full)
    # A power cut after the rename, before the data reached the disk: the trainer state's tensors are empty.
    damage(out / "checkpoint-4" / "trainer_state.tensors", "empty")
    capsys.readouterr()
    train(kit, data, out, *argv, "--resume", str(out))
    said = capsys.readouterr().out
    assert "--resume: checkpoint-4 is damaged (trainer_state.tensors: empty file): resuming from checkpoint-2" in said
    assert "resuming from" in said and f"{out / 'checkpoint-2'} at step 2" in said
    assert_same_weights(out, full)
    assert [m["loss"] for m in read_metrics(out)] == pytest.approx([m["loss"] for m in read_metrics(full)], rel=1e-6)


# -- two runs into one new folder ---------------------------------------------------------------------------------

def claim_at_once(args, barrier, results, hold):
    """One run's claim of --output-dir, started when the other's is (a forked child)."""
    folder = checkpoints.RunFolder(args, SimpleNamespace(is_main_process=True, num_processes=1),
                                   checkpoints.RunInputs(), training_rows=4)
    barrier.wait()
    try:
        folder.claim()
        results.put("claimed")
        hold.wait(60)  # a run holds its folder while it lives
    except common.DistillError as err:
        results.put(f"refused: {err}")
    except Exception as err:  # noqa: BLE001 -- what the test must never see
        results.put(f"crashed: {type(err).__name__}: {err}")


def test_two_runs_started_at_once_into_one_new_folder(kit, tmp_path):
    ctx = multiprocessing.get_context("fork")
    data = write_rows(tmp_path / "d.jsonl", 4)
    for round_ in range(20):
        out = tmp_path / f"new{round_}" / "run"
        args = sequence_level.parse_args(["--student", str(kit["student"]), "--data", str(data), "--output-dir",
                                          str(out)])
        barrier, results, hold = ctx.Barrier(2), ctx.Queue(), ctx.Event()
        runs = [ctx.Process(target=claim_at_once, args=(args, barrier, results, hold)) for _ in range(2)]
        for run in runs:
            run.start()
        outcomes = sorted(results.get(timeout=60) for _ in runs)
        hold.set()
        for run in runs:
            run.join(60)
        assert outcomes[0] == "claimed", outcomes
        assert outcomes[1].startswith(f"refused: --output-dir '{out}' is in use by another run"), outcomes
        assert [p.name for p in out.iterdir()] == [".lock"]


def test_a_run_refused_at_start_leaves_no_new_folder_behind(kit, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 4)
    with pytest.raises(common.DistillError, match="no complete checkpoint"):
        train(kit, data, tmp_path / "new" / "run", "--max-steps", "1", "--resume", str(tmp_path))
    assert not (tmp_path / "new").exists()


# -- a signal to stop ---------------------------------------------------------------------------------------------

def error_lines(stderr: str) -> list[str]:
    """What run_main printed (tqdm may redraw its bar after it, when the interpreter exits)."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def launch(args, **kwargs):
    return subprocess.Popen([sys.executable, str(ROOT / "sequence_level.py"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kwargs)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_in_progress_and_resume_redoes_nothing(kit, tmp_path, monkeypatch, capsys, signum):
    data = write_rows(tmp_path / "d.jsonl", 24)
    # --save-every beyond the run: the only checkpoint is the one the signal asks for.
    argv = ["--max-steps", "10", "--save-every", "100"]
    train(kit, data, tmp_path / "full", *argv)
    out = tmp_path / "run"
    count_tokens, before = training.TrainLoop.count_tokens, signal.getsignal(signum)

    def signal_in_step_4(loop, batches):  # the signal lands while step 4 is in progress
        if loop.step_num == 3 and loop.signals.received is None:
            os.kill(os.getpid(), signum)
        return count_tokens(loop, batches)

    monkeypatch.setattr(training.TrainLoop, "count_tokens", signal_in_step_4)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        common.run_main(lambda: train(kit, data, out, *argv))
    assert stopped.value.code == 128 + signum  # 143 for SIGTERM, 130 for Ctrl-C, as a shell reports them
    name = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT (Ctrl-C)"}[signum]
    assert error_lines(capsys.readouterr().err) == [
        f"error: stopped by {name} after step 4 of 10: saved {out / 'checkpoint-4'}; --resume {out} continues from it"]
    assert signal.getsignal(signum) == before, "the run's handler is gone with the run"
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    assert checkpoints.checkpoint_damage(out / "checkpoint-4") is None and not (out / "model.safetensors").exists()
    monkeypatch.undo()
    train(kit, data, out, *argv, "--resume", str(out))
    assert f"resuming from {out / 'checkpoint-4'} at step 4" in capsys.readouterr().out
    assert_same_weights(out, tmp_path / "full")
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in read_metrics(tmp_path / "full")],
                                                         rel=1e-6)


def test_sigterm_from_outside_stops_a_run_in_one_line_with_a_checkpoint(kit, tmp_path):
    """What a scheduler does: SIGTERM to the process at any moment; it exits 143 with the step it was in saved."""
    out = tmp_path / "run"
    proc = launch(["--student", str(kit["student"]), "--data", str(write_rows(tmp_path / "d.jsonl", 24)),
                   "--max-steps", "200", "--batch-size", "4", "--save-every", "1000", "--output-dir", str(out)])
    deadline = time.time() + 120
    while time.time() < deadline and (not (out / "metrics.jsonl").exists()
                                      or (out / "metrics.jsonl").read_text().count("\n") < 2):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    steps = len(read_metrics(out))
    assert 2 <= steps < 200
    assert error_lines(err) == [f"error: stopped by SIGTERM after step {steps} of 200: saved "
                                f"{out / f'checkpoint-{steps}'}; --resume {out} continues from it"]
    assert checkpoints.checkpoint_damage(out / f"checkpoint-{steps}") is None


# -- a full disk --------------------------------------------------------------------------------------------------

def test_a_full_disk_while_saving_names_the_checkpoint_and_the_intact_one(kit, tmp_path, monkeypatch):
    data, out = write_rows(tmp_path / "d.jsonl", 16), tmp_path / "run"
    real = checkpoints.save_state

    def full_disk(obj, folder, name):
        if folder.name == ".checkpoint-4.tmp" and name == "trainer_state":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, folder, name)

    monkeypatch.setattr(checkpoints, "save_state", full_disk)
    with pytest.raises(common.DistillError) as caught:
        train(kit, data, out, "--max-steps", "6", "--save-every", "2")
    assert str(caught.value) == (f"cannot write checkpoint {out / 'checkpoint-4'}: No space left on device; the newest "
                                 f"intact checkpoint is {out / 'checkpoint-2'} (free space, then --resume {out} "
                                 "continues from it)")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint-2", "metrics.jsonl", "run_config.json"]
    monkeypatch.undo()
    train(kit, data, out, "--max-steps", "6", "--save-every", "2", "--resume", str(out))
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 7))


def test_a_file_too_large_for_the_disk_ends_in_one_line(kit, tmp_path):
    """A real EFBIG (Python ignores SIGXFSZ): a file-size limit below the trainer state's size but above the
    weights'."""
    data, out = write_rows(tmp_path / "d.jsonl", 8), tmp_path / "run"
    weights = (kit["student"] / "model.safetensors").stat().st_size
    limit = weights + weights // 4  # the optimizer's two moments make the trainer state twice the weights
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(common.DistillError) as caught:
            train(kit, data, out, "--max-steps", "3", "--save-every", "1")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(caught.value) == (f"cannot write checkpoint {out / 'checkpoint-1'}: File too large (os error 27); no "
                                 "checkpoint was written before it, so nothing can be resumed")
    assert not list(out.glob("*checkpoint-*"))
