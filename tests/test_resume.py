"""Checkpoints: a run killed with SIGKILL and resumed ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_metrics, write_rows


def launch(script, args):
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("script", ["sequence_level", "token_level"])
def test_sigkill_then_resume_matches_uninterrupted(kit, tmp_path, script):
    data = write_rows(tmp_path / "d.jsonl", 24)
    common_args = ["--student", str(kit["student"]), "--data", str(data), "--max-steps", "20", "--batch-size", "4",
                   "--grad-accum", "2", "--lr", "3e-3", "--save-every", "4", "--seed", "3"]
    if script == "token_level":
        common_args += ["--teacher", str(kit["teacher"]), "--kl", "reverse"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    main = importlib.import_module(script).main
    main([*common_args, "--output-dir", str(full)])  # the uninterrupted run, in this process

    proc = launch(f"{script}.py", [*common_args, "--output-dir", str(killed)])  # only a process can be SIGKILLed
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoint-4").exists():
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the kill must land before the run finishes"
    # A checkpoint being written when the kill landed is only a hidden temp folder: never resumed from.
    (killed / ".checkpoint-99.tmp").mkdir(exist_ok=True)
    main([*common_args, "--output-dir", str(killed), "--resume", str(killed)])

    want, got = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    full_metrics, resumed_metrics = read_metrics(full), read_metrics(killed)
    assert [m["step"] for m in resumed_metrics] == list(range(1, 21))
    assert [m["loss"] for m in resumed_metrics] == pytest.approx([m["loss"] for m in full_metrics], rel=1e-6)


def test_resume_without_a_checkpoint_is_a_clear_error(kit, tmp_path):
    import common
    import sequence_level

    data = write_rows(tmp_path / "d.jsonl", 4)
    (tmp_path / "empty" / "checkpoint-3").mkdir(parents=True)  # incomplete: no trainer_state.pt
    with pytest.raises(common.DistillError, match="no complete checkpoint"):
        sequence_level.main(["--student", str(kit["student"]), "--data", str(data), "--output-dir",
                             str(tmp_path / "run"), "--resume", str(tmp_path / "empty")])
