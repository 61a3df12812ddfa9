"""Launched by tests/test_distributed.py under `accelerate launch` (2 processes, DDP over gloo): runs
sequence_level.py's main() with a DDP communication hook that counts the gradient all-reduces, and writes the
count of each process to OUT.RANK.json.

    python tests/ddp_worker.py OUT -- SEQUENCE_LEVEL_ARGS...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # noqa: E402

import sequence_level  # noqa: E402
import training  # noqa: E402


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[3:]
    calls = [0]

    def counting_hook(state, bucket):  # one call per gradient bucket all-reduced
        calls[0] += 1
        return allreduce_hook(state, bucket)

    init = training.TrainLoop.__init__

    def init_with_hook(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.model.register_comm_hook(dist.group.WORLD, counting_hook)

    training.TrainLoop.__init__ = init_with_hook
    sequence_level.main(argv)  # ends the process group (accelerate's end_training): each process writes its own
    out.with_suffix(f".{os.environ['RANK']}.json").write_text(json.dumps(calls[0]))


if __name__ == "__main__":
    main()
