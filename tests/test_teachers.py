"""teachers.py's served source asks for the next step's rows while a step trains (TrainLoop.upcoming), and each
batch's rows are fetched once; the loop's look-ahead leaves the data and its order unchanged."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace

import torch

import sequence_level
import teachers
import training
from conftest import write_rows


def test_upcoming_is_the_next_steps_micro_batches(kit, tmp_path, monkeypatch):
    seen = []
    iterate = training.TrainLoop.__iter__

    def spy(loop):
        for batches, num_tokens in iterate(loop):
            seen.append(([b["input_ids"].clone() for b in batches], [b["input_ids"].clone() for b in loop.upcoming]))
            yield batches, num_tokens

    monkeypatch.setattr(training.TrainLoop, "__iter__", spy)
    sequence_level.main(["--student", str(kit["student"]), "--data", str(write_rows(tmp_path / "d.jsonl", 12)),
                         "--output-dir", str(tmp_path / "run"), "--max-steps", "5", "--batch-size", "2",
                         "--grad-accum", "2"])
    assert len(seen) == 5
    for (_, upcoming), (later, _) in zip(seen, seen[1:]):
        assert len(upcoming) == 2 and all(torch.equal(a, b) for a, b in zip(upcoming, later))
    assert seen[-1][1] == []  # nothing is read past the last step


class FakeServer:
    """Records every request; answers with K=2 rows per completion position (the values do not matter here)."""

    def __init__(self):
        self.requests = []

    def prefetch(self, sequences, masks):
        self.requests.append(sequences)
        done = Future()
        done.set_result(self.rows(sequences, masks))
        return done

    def batch_rows(self, batch):
        raise AssertionError("every training batch was prefetched")

    @staticmethod
    def rows(sequences, masks):
        out = []
        for mask in masks:
            n = sum(mask[1:])
            out.append({"topk_ids": torch.zeros(n, 2, dtype=torch.long), "topk_logprobs": torch.full((n, 2), -1.0),
                        "tail_logmass": torch.full((n, 1), -0.5)})
        return out


def batch(first_token: int) -> dict:
    ids = torch.tensor([[first_token, 5, 6, 7]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.tensor([[0, 0, 1, 1]])}


def test_served_rows_ask_for_the_next_step_once_and_early():
    server, loop = FakeServer(), SimpleNamespace(upcoming=[batch(2), batch(3)], device="cpu")
    source = teachers.ServedRows(server, loop)
    source.prefetch([batch(0), batch(1)])  # step 1: its two micro-batches and step 2's, before step 1 trains
    assert [r[0][0] for r in server.requests] == [0, 1, 2, 3]
    assert source(batch(0))["cached_rows"]["topk_ids"].shape == (2, 2)
    source(batch(1))
    loop.upcoming = [batch(4)]
    source.prefetch([batch(2), batch(3)])  # step 2 (collated anew: equal tensors, other objects) and step 3's
    assert [r[0][0] for r in server.requests] == [0, 1, 2, 3, 4]  # step 2's were sent a step ago, not again
    source(batch(2))
    source(batch(3))


def test_served_rows_without_look_ahead_ask_for_this_step_only():
    """on_policy.py with --lmbda > 0: a step's batches may be replaced by samples, so the next step's data batches
    are not asked for early."""
    server, loop = FakeServer(), SimpleNamespace(upcoming=[batch(2), batch(3)], device="cpu")
    source = teachers.ServedRows(server, loop, look_ahead=False)
    source.prefetch([batch(0), batch(1)])
    assert [r[0][0] for r in server.requests] == [0, 1]
    source(batch(0))
    source(batch(1))
    source.prefetch([batch(2), batch(3)])
    assert [r[0][0] for r in server.requests] == [0, 1, 2, 3]
