"""Launched once by tests/test_distributed.py under `accelerate launch` (2 processes, DDP over gloo): runs a plan
of training runs one after another in the same two processes, as the scripts run them (each script's `main()`),
so that the suite pays for one launch and one process group instead of one per run.

    python tests/ddp_worker.py PLAN.json

PLAN.json is a list of runs: {"script": "token_level", "argv": [...]} runs that script's main(argv);
"count_allreduce": OUT adds a DDP communication hook that counts the gradient all-reduces and writes each
process's count to OUT.RANK.json; {"fsdp": [STUDENT, TEACHER, OUT]} runs tests/fsdp_worker.py's check.

Between runs the process group stays up (a script's `accelerator.end_training()` would destroy it) and
accelerate's process-wide state is reset, so every run starts as it would in a process of its own.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accelerate  # noqa: E402
import torch.distributed as dist  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # noqa: E402

import fsdp_worker  # noqa: E402
import training  # noqa: E402


def end_training_keeping_the_group(self) -> None:
    for tracker in self.trackers:
        tracker.finish()


def counting_all_reduces(out: Path):
    """TrainLoop.__init__ that registers a hook counting the gradient buckets all-reduced; returns (init, calls)."""
    init, calls = training.TrainLoop.__init__, [0]

    def counting_hook(state, bucket):  # one call per gradient bucket all-reduced
        calls[0] += 1
        return allreduce_hook(state, bucket)

    def init_with_hook(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.model.register_comm_hook(dist.group.WORLD, counting_hook)

    return init_with_hook, calls


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    accelerate.Accelerator.end_training = end_training_keeping_the_group
    plain_init = training.TrainLoop.__init__
    for run in plan:
        if "fsdp" in run:
            fsdp_worker.main(*run["fsdp"])
            continue
        calls = None
        if run.get("count_allreduce"):
            training.TrainLoop.__init__, calls = counting_all_reduces(Path(run["count_allreduce"]))
        importlib.import_module(run["script"]).main(run["argv"])
        training.TrainLoop.__init__ = plain_init
        if calls is not None:
            Path(run["count_allreduce"]).with_suffix(f".{os.environ['RANK']}.json").write_text(json.dumps(calls[0]))
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
