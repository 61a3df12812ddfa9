"""--resume never unpickles: a checkpoint's state is JSON + safetensors, so a crafted checkpoint cannot run code,
and the state still round-trips exactly (the exact-resume test is tests/test_resume.py)."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch

import checkpoints
import common
import sequence_level
from conftest import read_metrics, write_rows


class Payload:
    """Unpickling this creates `marker`: what a crafted trainer_state.pt could do with any code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_pickles(folder, marker):
    for name in ("trainer_state.pt", "rng_0.pt"):
        torch.save({"optimizer": Payload(marker)}, folder / name)


def test_a_pickled_checkpoint_is_refused_without_running_it(kit, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 4)
    crafted = tmp_path / "crafted" / "checkpoint-2"
    crafted.mkdir(parents=True)
    shutil.copy(kit["student"] / "model.safetensors", crafted / "model.safetensors")  # weights that load fine
    marker = tmp_path / "pwned"
    plant_pickles(crafted, marker)
    with pytest.raises(common.DistillError, match="pickle .* not loaded"):
        sequence_level.main(["--student", str(kit["student"]), "--data", str(data), "--output-dir",
                             str(tmp_path / "run"), "--max-steps", "3", "--resume", str(tmp_path / "crafted")])
    assert not marker.exists(), "the checkpoint's pickle was executed"


def test_pickles_beside_a_checkpoint_are_never_opened(kit, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 8)
    argv = ["--student", str(kit["student"]), "--data", str(data), "--max-steps", "3", "--batch-size", "4",
            "--save-every", "2", "--output-dir", str(tmp_path / "run")]
    sequence_level.main(argv)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert {p.name for p in checkpoint.iterdir()} >= {"trainer_state.json", "trainer_state.tensors", "rng_0.json"}
    assert not list(checkpoint.glob("*.pt"))
    marker = tmp_path / "pwned"
    plant_pickles(checkpoint, marker)
    full = read_metrics(tmp_path / "run")
    sequence_level.main([*argv, "--resume", str(checkpoint)])
    assert not marker.exists()
    assert [m["loss"] for m in read_metrics(tmp_path / "run")] == pytest.approx([m["loss"] for m in full], rel=1e-6)


def test_state_round_trip_is_exact(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": np.random.get_state(), "best": {"metric": "eval_loss", "value": 0.25}, "none": None}
    checkpoints.save_state(state, tmp_path, "s")
    back = checkpoints.load_state(tmp_path, "s")
    assert back["python"] == state["python"] and back["best"] == state["best"] and back["none"] is None
    assert torch.equal(back["torch"], state["torch"])
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert back["numpy"][2:] == state["numpy"][2:]
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for key, values in state["optimizer"]["state"].items():  # int keys survive
        for name, tensor in values.items():
            assert torch.equal(back["optimizer"]["state"][key][name], tensor)
    random.setstate(back["python"])
    np.random.set_state(back["numpy"])
