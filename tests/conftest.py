"""Shared fixtures: the tiny offline kit (built once per session) and small distillation data files."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core (pytest-xdist): each, and every script it launches, uses one torch
    # thread, or the workers' thread pools fight over the same cores and everything runs many times slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tiny  # noqa: E402

SYSTEM = "Solve the problem. End with '#### <number>'."


@pytest.fixture(scope="session")
def kit(tmp_path_factory) -> dict[str, Path]:
    return tiny.build_kit(tmp_path_factory.mktemp("kit") / "tiny")


def write_rows(path: Path, n: int, seed: int = 0, system: str | None = SYSTEM) -> Path:
    """A generate_data-style JSONL whose 'teacher completions' are the procedural reference solutions."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            question, solution, answer = tiny.make_problem(rng)
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": question}]
            f.write(json.dumps({"id": f"train-{i}", "messages": messages, "completion": solution,
                                "answer": answer}) + "\n")
    return path


@pytest.fixture
def rows_file(tmp_path) -> Path:
    return write_rows(tmp_path / "data.jsonl", 16)


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def trained_teacher(kit, tmp_path_factory):
    """The kit's teacher after a little SFT, so its distributions are peaked and worth imitating."""
    import sequence_level

    root = tmp_path_factory.mktemp("teacher")
    data = write_rows(root / "d.jsonl", 64, seed=10)
    sequence_level.main(["--student", str(kit["teacher"]), "--data", str(data), "--output-dir", str(root / "t"),
                         "--max-steps", "60", "--batch-size", "8", "--lr", "3e-3", "--log-every", "100"])
    return root / "t"


# The files whose tests take longest (`pytest --durations`, idle 2-core machine), longest first. `make test` hands
# whole files to its workers in collection order (--dist loadfile --no-loadscope-reorder): started first, the long
# ones run beside the many short files instead of after them, when one worker would be left running alone.
LONGEST_FIRST = ["test_demo.py", "test_distributed.py", "test_resume.py", "test_notebook.py", "test_cache_hidden.py",
                 "test_blog.py", "test_copy.py", "test_data.py", "test_eval.py", "test_training.py"]


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's own order is kept
