"""Where the teacher's side of a batch comes from: a teacher model in memory, or a cache_teacher.py folder.

token_level.py and cross_tokenizer.py train through one loop whatever the teacher's source. The objective asks the
source for the teacher's side of a batch, `teacher = source(batch)`, and hands it to the loss, which then sees

    teacher_hidden [N, H_t], teacher_weight [V_t, H_t]   LiveTeacher, HiddenCache: the teacher's final hidden states
                                                        and head, so its logits h @ W^T are the live teacher's
    cached_rows {name: [N, ...]}                        CachedRows: a top-K or sampled cache's rows
                                                        (`cache_teacher.collate_rows`), an approximation of the
                                                        teacher explained where the loss computes it

    cached_rows {name: [N, ...]}                        ServedRows: a vLLM server's top-K rows (--teacher-url,
                                                        served_teacher.py), fetched per batch in a top-K
                                                        cache's layout

N counts the batch's positions in `common.shift_for_next_token`'s order (cross_tokenizer.py: the teacher positions
aligned to them). `full` says whether the source gives the teacher's whole next-token distribution, which the
held-out eval_kl and the full pre-flight (`checks.preflight`) need. The loop calls `source.prefetch(micro_batches)`
once a step's micro-batches are known (on_policy.py: after sampling): a served teacher sends the step's requests
then; the others have nothing to do.
"""

from __future__ import annotations

import torch

import cache_teacher
import models
import served_teacher
from common import DistillError
from training import stop_on_teacher_failure


class Source:
    """What every source has: `full` and a `prefetch` hook."""

    full = True

    def prefetch(self, micro_batches: list[dict]) -> None:
        pass


class LiveTeacher(Source):
    """A teacher model in memory: its final hidden states at the batch's positions (no gradient), and its head.

    `inputs`: the batch's keys of the teacher's token ids and attention mask; `select(hidden, batch)` picks the
    [N, H_t] rows the loss pairs with the student's positions from the teacher's [B, L, H_t] hidden states.
    """

    def __init__(self, model, select, inputs: tuple[str, str] = ("input_ids", "attention_mask")):
        self.model, self.select, self.inputs = model, select, inputs
        self.weight = models.output_head(model).weight

    def __call__(self, batch: dict) -> dict:
        with torch.inference_mode():
            hidden = models.teacher_hidden_states(self.model, batch[self.inputs[0]], batch[self.inputs[1]])
            rows = self.select(hidden, batch)  # [N, H_t]
        # A normal tensor, not an inference one: the chunked losses save their inputs for backward.
        return {"teacher_hidden": rows.clone(), "teacher_weight": self.weight}


class HiddenCache(Source):
    """A cache_teacher.py --store hidden folder: the batch carries the teacher's hidden states at its positions
    (collated from the cache); the head comes from the cache's teacher_head file. Exact up to the cache's dtype."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, batch: dict) -> dict:
        # a bf16/fp16 cache, widened to the head's dtype (the live teacher's states')
        return {"teacher_hidden": batch["teacher_hidden"].to(self.weight.dtype), "teacher_weight": self.weight}


class CachedRows(Source):
    """A cache_teacher.py --store topk or --store sampled folder: the batch carries the cached rows at its
    positions under `names` (`cache_teacher.collate_rows`'s keys). Not the full distribution."""

    full = False

    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def __call__(self, batch: dict) -> dict:
        return {"cached_rows": {name: batch[name] for name in self.names}}


def from_cache(folder, manifest: dict, device) -> HiddenCache | CachedRows:
    """The source a cache_teacher.py folder gives (`cache_teacher.open_cache`'s manifest): a hidden store's head on
    `device`, or the names of a top-K or sampled store's batch tensors."""
    store = cache_teacher.store_of(manifest)
    if store == "hidden":
        return HiddenCache(cache_teacher.load_head(folder, manifest).to(device))
    return CachedRows(cache_teacher.BATCH_TENSORS[store])


class ServedRows(Source):
    """A teacher behind an OpenAI-compatible vLLM server (--teacher-url; `served_teacher.ServedTeacher`): its top-K
    log-probabilities and T=1 tail at the batch's positions, in a top-K cache's layout. `prefetch` sends a step's
    requests and, with `look_ahead`, the next step's at once, so the teacher answers for the next batches while the
    student trains (on_policy.py turns it off when a step may be sampled: the next step's data batches would be
    asked for in vain); a batch not prefetched (held-out rows, the pre-flight) is fetched when asked. A server that
    stays unreachable after its retries in mid-step stops the run with a checkpoint of the last complete step
    (`training.stop_on_teacher_failure`; `--resume` redoes the step)."""

    full = False

    def __init__(self, served, loop, look_ahead: bool = True):
        self.served, self.loop, self.look_ahead, self._pending = served, loop, look_ahead, {}

    def prefetch(self, micro_batches: list[dict]) -> None:
        """This step's requests (those not sent a step ago) and, with `look_ahead`, the next step's
        (`TrainLoop.upcoming`), so that the teacher works on step k+1 while the student trains on step k."""
        pending = {}
        for batch in [*micro_batches, *(self.loop.upcoming if self.look_ahead else [])]:
            key = self._key(batch)
            pending[key] = self._pending.pop(key, None) or self.served.prefetch(*served_teacher.batch_request(batch))
        self._pending = pending  # a request no step asks for any more is dropped

    @staticmethod
    def _key(batch: dict) -> tuple:
        ids = batch["input_ids"]
        return tuple(ids.shape), ids.cpu().numpy().tobytes(), batch["loss_mask"].cpu().numpy().tobytes()

    def __call__(self, batch: dict) -> dict:
        pending = self._pending.pop(self._key(batch), None)
        try:
            rows = pending.result() if pending is not None else self.served.batch_rows(batch)
        except DistillError as error:
            if pending is None or not str(error).startswith("--teacher-url"):
                raise
            stop_on_teacher_failure(self.loop, error)
        return {"cached_rows": served_teacher.stack_rows(rows, self.loop.device)}
