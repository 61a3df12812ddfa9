"""The training-loop kit: `TrainLoop` (accelerate, accumulation by global token count, logging, saving, exact
resume) and held-out evaluation (`load_held_out`, `TrainLoop.evaluate`). Not a trainer to subclass: each script
iterates the loop and writes its own step."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoints import Preempted, RunFolder, RunInputs, StopSignals, _get_rng_state, _set_rng_state, write_or_stop
from common import (
    DEFAULT_SYSTEM_PROMPT,
    HIGHER_IS_BETTER,
    DistillError,
    cut_rows_note,
    encode_rows,
    is_main_process,
    load_distill_rows,
    load_prompt_dataset,
    pad_batch,
)
from generation import answer_problems, extract_answer, score_answers
from models import seed_everything


@dataclass
class HeldOut:
    """What a run is evaluated on while it trains (--eval-data, --eval-problems); see `TrainLoop.evaluate`."""

    tokenizer: object  # the student's: answers --eval-problems, saved with --save-best's model
    examples: list[dict]  # --eval-data encoded like the training rows (same collate)
    problems: list[dict]  # --eval-problems rows {"index", "prompt", "answer"}
    system_prompt: str  # what --eval-problems are asked with


def load_held_out(args, rows: list[dict], tokenizer, encode=None) -> HeldOut | None:
    """The held-out rows and problems of a run, or None without --eval-every.

    `encode(rows) -> (examples, skipped)` turns --eval-data rows into examples exactly as the script encodes its
    training rows (default: `encode_rows` with the student's tokenizer). `rows` (the training rows) give the
    default system prompt of --eval-problems, the one the training data was generated with, and the prompts that
    held-out rows must not repeat (`check_leakage`).
    """
    if not args.eval_every:
        return None
    examples = []
    trained = {_user_turns(row["messages"]) for row in rows}
    if args.eval_data:
        eval_rows = load_distill_rows(args.eval_data, what="--eval-data")
        check_leakage("--eval-data", args.eval_data, [(row.get("id"), _user_turns(row["messages"]))
                                                      for row in eval_rows], trained)
        try:
            examples, skipped = (encode or (lambda r: encode_rows(r, tokenizer, args.max_length, None,
                                                                  truncated=args.truncated)))(eval_rows)
        except DistillError as err:
            raise DistillError(f"--eval-data {args.eval_data}: {err}") from None
        if skipped and is_main_process():
            print(f"--eval-data: skipped {skipped} of {len(eval_rows)} rows longer than --max-length "
                  f"{args.max_length}; evaluating on {len(examples)}")
    problems = []
    if args.eval_problems:
        problems = load_prompt_dataset(args.eval_problems)
        unscorable = [p["index"] for p in problems if p["answer"] is None or extract_answer(p["answer"]) is None]
        if unscorable:
            raise DistillError(f"--eval-problems {args.eval_problems}: every row needs 'question' and an 'answer' "
                               f"holding a number, like GSM8K's (rows {unscorable[:5]} do not)")
        check_leakage("--eval-problems", args.eval_problems, [(f"row {p['index'] + 1}", _user_turns(
            [{"role": "user", "content": p["prompt"]}])) for p in problems], trained)
    system_prompt = args.eval_system_prompt
    if system_prompt is None:
        first = rows[0]["messages"][0] if rows and rows[0]["messages"] else {}
        system_prompt = first["content"] if first.get("role") == "system" else DEFAULT_SYSTEM_PROMPT
    return HeldOut(tokenizer=tokenizer, examples=examples, problems=problems, system_prompt=system_prompt)


def _user_turns(messages: list[dict]) -> tuple[str, ...]:
    """What a row asks: its user messages, whitespace-normalized (the system prompt may differ: the question is
    still the same)."""
    return tuple(" ".join(m["content"].split()) for m in messages if m["role"] == "user")


def check_leakage(flag: str, path: str, held_out: list[tuple[object, tuple[str, ...]]], trained: set) -> None:
    """Held-out rows `(id, user turns)` whose prompt is also a training prompt (`trained`) measure memory, not
    generalization: reported with their count; all of them stop the run, whose held-out numbers would be
    training numbers."""
    leaked = [str(name) for name, prompt in held_out if prompt in trained]
    if not leaked:
        return
    if len(leaked) == len(held_out):
        raise DistillError(f"{flag} {path}: all {len(held_out)} held-out prompts are also --data prompts, so its "
                           "numbers would be training numbers; hold out prompts that are not in --data")
    if is_main_process():
        shown = ", ".join(leaked[:5]) + (", ..." if len(leaked) > 5 else "")
        print(f"warning: {flag} {path}: {len(leaked)} of {len(held_out)} held-out prompts are also --data prompts "
              f"({shown}); their numbers are training numbers, not held-out ones")


class Evaluator:
    """Held-out evaluation while a run trains (--eval-data, --eval-problems, --save-best), for `TrainLoop`.

    eval_loss and eval_<stat> come from the script's own objective on --eval-data (the training formula and
    normalization, on held-out rows); eval_exact_match is the strict `score_answers` score of greedy answers to
    --eval-problems. Rows and problems are sharded across processes and the sums reduced, so the values are a
    one-process run's. No gradients, eval mode (no dropout); the train mode and every RNG state are put back
    afterwards, so a run takes the same training steps with or without evaluation.
    """

    def __init__(self, loop: TrainLoop, held_out: HeldOut):
        self.loop, self.held_out, self.args = loop, held_out, loop.args
        self.best: dict | None = None  # --save-best: {"metric", "step", "value", "better"} so far; checkpointed

    @property
    def batch_size(self) -> int:
        return self.args.eval_batch_size or self.args.batch_size

    def __call__(self, objective=None) -> dict[str, float]:
        """`objective(batch, num_tokens, held_out=True) -> (loss, stats)` is the script's per-micro-batch objective;
        with held_out=True a script may report other stats than in training (token_level: KL at T=1 as eval_kl)."""
        metrics: dict[str, float] = {}
        with side_effect_free(self.loop.model):
            if self.held_out.examples:
                if objective is None:
                    raise ValueError("--eval-data: this script's loop.step() must pass evaluate=objective")
                metrics.update(self._sums(objective))
            if self.held_out.problems:
                metrics["eval_exact_match"] = self._exact_match()
        return metrics

    def _sums(self, objective) -> dict[str, float]:
        loop, examples = self.loop, self.held_out.examples
        acc = loop.accelerator
        num_tokens = float(sum(sum(ex["loss_mask"][1:]) for ex in examples))
        per_round = self.batch_size * acc.num_processes
        totals: dict[str, float] = {}
        for lo in range(0, len(examples), per_round):
            mine = examples[lo:lo + per_round][acc.process_index::acc.num_processes]
            # Every process joins every forward (DDP syncs buffers, FSDP gathers weights in it): one left without
            # rows in the last round runs the first row again and drops the result.
            weight = 1.0 if mine else 0.0
            batch = loop.to_device(loop.collate(mine or examples[:1]))
            loss, stats = objective(batch, num_tokens, held_out=True)
            for key, value in {"loss": loss, **stats}.items():
                totals[key] = totals.get(key, 0.0) + weight * float(value)
        keys = sorted(totals)
        summed = acc.reduce(torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=loop.device),
                            reduction="sum")
        return {f"eval_{key}": value for key, value in zip(keys, summed.tolist())}

    def _exact_match(self) -> float:
        acc, problems = self.loop.accelerator, self.held_out.problems
        mine = problems[acc.process_index::acc.num_processes]
        # The unwrapped model, as on_policy samples: generation runs a different number of forwards per process.
        replies = answer_problems(acc.unwrap_model(self.loop.model), self.held_out.tokenizer, mine,
                                  system_prompt=self.held_out.system_prompt,
                                  max_new_tokens=self.args.eval_max_new_tokens, batch_size=self.batch_size,
                                  desc="eval answers")
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            replies = [reply for _, reply in sorted(gather_object([(p["index"], r) for p, r in zip(mine, replies)]))]
        return float(score_answers(replies, [p["answer"] for p in problems])["strict"])

    def keep_best(self, row: dict) -> None:
        """--save-best: when this evaluation beats every earlier one, save the model to OUTPUT_DIR/best."""
        metric, loop = self.args.save_best, self.loop
        if metric is None:
            return
        if metric not in row:
            raise DistillError(f"--save-best {metric}: the evaluation logged only "
                               f"{', '.join(k for k in row if k.startswith('eval_'))}")
        value = row[metric]
        if value != value:  # NaN never counts as an improvement
            return
        higher = metric in HIGHER_IS_BETTER
        if self.best is not None and not (value > self.best["value"] if higher else value < self.best["value"]):
            return
        self.best = {"metric": metric, "step": loop.step_num, "value": value, "better": "higher" if higher else "lower"}
        acc = loop.accelerator
        final, tmp = loop.output_dir / "best", loop.output_dir / ".best.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        loop.save(self.held_out.tokenizer, tmp)
        if acc.is_main_process:  # renamed when complete: OUTPUT_DIR/best is never half written
            (tmp / "best.json").write_text(json.dumps(self.best, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            loop.bar.write(f"best {metric} so far: {value:.6g} at step {loop.step_num}, saved to {final}")
        acc.wait_for_everyone()


def adamw(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with weight decay on the matrices only (not on norms and biases)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}], lr=lr)


def record_run(args, acc, output_dir: Path, history: list | None) -> None:
    """run_config.json (every flag, and the runs this one resumed), and the trackers' config (flat scalars only)."""
    if acc.is_main_process:
        config = vars(args) | ({"resume_history": history} if history else {})
        (output_dir / "run_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    if args.report_to != "none":
        acc.init_trackers(output_dir.name, config={
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()})


class TrainLoop:
    """What every training script needs around its own loss: accelerate, optimizer, schedule, accumulation,
    logging, saving and exact resume. Not a trainer to subclass: the script iterates it and writes the step::

        loop = TrainLoop(args, student, examples, pad_id, held_out=load_held_out(args, rows, tokenizer))

        def objective(batch, num_tokens, held_out=False):   # the script's loss on one micro-batch
            ...
            return loss, {"ce": ce_sum / num_tokens}        # sum over masked tokens / global count

        for micro_batches, num_tokens in loop:      # one optimizer step
            for batch in micro_batches:
                loss, stats = objective(batch, num_tokens)
                loop.backward(loss, **stats)
            loop.step(num_tokens, evaluate=objective)   # clip, optimizer, schedule, held-out eval when due, log
        loop.finish(tokenizer, skipped=skipped, total=len(rows), rows=rows)   # save the model, report, unlock

    `num_tokens` is the number of masked target tokens in *all* micro-batches of the step on *all* processes,
    counted before the first forward, so every micro-batch's loss uses the same denominator.

    The loop reads only the flags of `add_train_args` from `args` (and records all of them, so that --resume can
    refuse a changed run). What else a script's run depends on comes in as arguments: `inputs` (what --resume
    compares beyond those flags: a teacher's or a cache's fingerprint, the script's own flags), `models` (the
    models whose forward passes feed the loss, with their dtype flags, named when a step overflows), `collate`
    and `held_out`. The logged values are the stats the script passes to `backward`.
    """

    def __init__(self, args, model, examples: list[dict], pad_id: int, collate=None, held_out: HeldOut | None = None,
                 *, inputs: RunInputs | None = None, models: dict[str, str] | None = None):
        from accelerate import Accelerator
        from transformers import get_cosine_schedule_with_warmup

        self.args, report_to = args, args.report_to
        if report_to != "none" and importlib.util.find_spec(report_to) is None:
            raise DistillError(f"--report-to {report_to}: the package is not installed (pip install {report_to})")
        self.output_dir = Path(args.output_dir)
        self.accelerator = acc = Accelerator(mixed_precision="bf16" if args.bf16 else "no",
                                             log_with=None if report_to == "none" else report_to,
                                             project_dir=self.output_dir / "runs")
        seed_everything(args.seed)
        if (args.save_every or args.resume) and acc.distributed_type.name in ("FSDP", "DEEPSPEED"):
            raise DistillError("--save-every/--resume: exact-resume checkpoints cover one process and DDP; under "
                               f"{acc.distributed_type.name} the optimizer state is sharded and is not "
                               "saved by this loop yet")
        self.examples, self.models = examples, models or {"--student": "--dtype"}
        # Everything is checked before anything is written: the folder, the lock, the checkpoint to continue.
        self.folder = RunFolder(args, acc, inputs or RunInputs(), training_rows=len(examples))
        resume_from = self.folder.claim()
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.collate = collate or (lambda exs: pad_batch(exs, pad_id))
        self.steps_per_epoch, self.total_steps = count_steps(len(examples), args, acc.num_processes)
        self.model, self.optimizer = acc.prepare(model, adamw(model, args.lr, args.weight_decay))
        # Not prepared: accelerate would step it once per process; we step it once per optimizer step.
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, int(args.warmup_ratio * self.total_steps), self.total_steps)
        self.device, self.step_num = acc.device, 0
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self._stats: dict[str, torch.Tensor] = {}  # summed on the device, read once per step
        self.upcoming: list[dict] = []  # the next step's micro-batches, while a step runs (see __iter__)
        self.step_rng: dict | None = None  # every RNG state as the step in progress began (see __iter__)
        self._micro, self._micro_total = 0, 1
        if args.eval_every and held_out is None:
            raise ValueError("--eval-every: pass held_out=training.load_held_out(...) to TrainLoop")
        self.evaluator = Evaluator(self, held_out) if held_out is not None else None
        self.signals = StopSignals(listen=bool(args.save_every), announce=acc.is_main_process)  # `stop_on_signal`
        self._resume_state = None
        if resume_from:
            state = self._resume_state = self.folder.load_checkpoint(resume_from, self.model, self.optimizer,
                                                                     self.scheduler, self.metrics_path)
            self.step_num = state["step"]
            best = state.get("best")  # --save-best's best so far: a resumed run saves only improvements on it
            if self.evaluator is not None and best and best["metric"] == args.save_best:
                self.evaluator.best = best
        record_run(args, acc, self.output_dir, self.folder.history)

    # -- data ---------------------------------------------------------------------------------------------------

    def _micro_batches(self):
        """Endless stream of this process's micro-batches: reshuffled every epoch, sharded across processes."""
        acc, epoch = self.accelerator, 0
        while True:
            order = list(range(len(self.examples)))
            random.Random(self.args.seed + epoch).shuffle(order)
            per_step = self.args.batch_size * acc.num_processes
            for lo in range(0, len(order), per_step):
                chunk = order[lo:lo + per_step][acc.process_index::acc.num_processes]
                if chunk:
                    yield self.collate([self.examples[i] for i in chunk])
            epoch += 1

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def first_batch(self) -> dict:
        """This process's first micro-batch of the run as it would be trained (the pre-flight's batch), without
        advancing the data stream or any RNG; the same batch on a resumed run."""
        return self.to_device(next(self._micro_batches()))  # a fresh stream: epoch 0's first micro-batch

    def __iter__(self):
        from tqdm.auto import tqdm

        stream = self._micro_batches()
        self.start_time = time.time()
        if self._resume_state is not None:
            for _ in range(self.step_num * self.args.grad_accum):  # the data position: skip what was consumed
                next(stream)
            self.start_time -= self._resume_state["elapsed_s"]
            _set_rng_state(self._resume_state["rng"])
        elif self.accelerator.is_main_process:
            self.metrics_path.write_text("")
        self.bar = tqdm(total=self.total_steps, desc="train", disable=not self.accelerator.is_main_process)
        with self.signals:  # listening while the loop runs
            ahead = [next(stream) for _ in range(self.args.grad_accum)]
            while self.step_num < self.total_steps:
                batches = [self.to_device(batch) for batch in ahead]
                # The next step's micro-batches, collated one step early (on the CPU): a served teacher sends their
                # requests while this step trains (teachers.ServedRows). The data and its order are unchanged.
                more = self.step_num + 1 < self.total_steps
                ahead = self.upcoming = [next(stream) for _ in range(self.args.grad_accum)] if more else []
                self._micro, self._micro_total = 0, len(batches)
                self._gradient_sync(len(batches) == 1)
                num_tokens = self.count_tokens(batches)
                # What a checkpoint of the last complete step holds, should this one fail before its update
                # (`stop_on_teacher_failure`): the step may draw samples or dropout masks before it fails.
                self.step_rng = _get_rng_state()
                yield batches, num_tokens
        self.bar.close()

    def count_tokens(self, batches: list[dict]) -> float:
        """Global number of masked target tokens in this optimizer step (all micro-batches, all processes)."""
        local = sum(b["loss_mask"][:, 1:].sum() for b in batches).float()
        return self.accelerator.reduce(local, reduction="sum").item()

    # -- the step -----------------------------------------------------------------------------------------------

    def _gradient_sync(self, sync: bool) -> None:
        """Whether the next forward+backward all-reduces gradients: only the step's last micro-batch does (DDP
        reads this flag in forward, FSDP2 in backward); the others accumulate locally, so one step costs one
        all-reduce whatever --grad-accum is."""
        model = self.model
        if hasattr(model, "require_backward_grad_sync"):  # DistributedDataParallel
            model.require_backward_grad_sync = sync
        elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(sync)

    def backward(self, loss: torch.Tensor, **stats) -> None:
        """Backpropagate one micro-batch's share of the step loss (already divided by the global token count).

        DDP averages gradients over processes; the loss is a share of a global *sum*, so scale it back up. The
        logged values stay on the device until `step` reads them all at once.
        """
        self.accelerator.backward(loss * self.accelerator.num_processes)
        self._micro += 1
        if self._micro == self._micro_total - 1:
            self._gradient_sync(True)
        for key, value in {"loss": loss.detach(), **stats}.items():
            value = value.detach().double() if torch.is_tensor(value) else torch.tensor(float(value),
                                                                                        dtype=torch.float64)
            self._stats[key] = self._stats.get(key, 0.0) + value.to(self.device)

    def step(self, num_tokens: float, *, evaluate=None, **extra) -> dict:
        """Clip, update, advance the schedule, evaluate when due (--eval-every, and after the last step) and log
        one metrics.jsonl row. `evaluate` is the script's objective for held-out rows (see `Evaluator`)."""
        acc = self.accelerator
        # clipping at infinity (--max-grad-norm 0) changes nothing but measures the norm
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm or math.inf)
        lr = self.scheduler.get_last_lr()[0]
        # One reduction and one read for every logged value and for a stop signal (`stop_on_signal`), before the
        # update, so that every process sees the same values and stops together.
        keys = sorted(self._stats)
        *values, signalled = acc.reduce(torch.stack([*(self._stats[k] for k in keys), self.signals.flag(self.device)]),
                                        reduction="sum").tolist()
        summed, grad_norm = dict(zip(keys, values)), float(grad_norm)
        self._stats = {}
        check_finite_step(summed.get("loss"), grad_norm, lr, self.step_num + 1, self.models)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_num += 1
        row = {"step": self.step_num, **summed, "lr": lr, "tokens": int(num_tokens), "grad_norm": grad_norm,
               "elapsed_s": round(time.time() - self.start_time, 3), **extra}
        evaluated = bool(self.args.eval_every) and (self.step_num % self.args.eval_every == 0
                                                    or self.step_num == self.total_steps)
        if evaluated:
            row.update(self.evaluator(evaluate))
            self.evaluator.keep_best(row)
        acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=self.step_num)
        if acc.is_main_process:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}")
            if self.step_num % self.args.log_every == 0 or self.step_num == self.total_steps or evaluated:
                self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in row.items() if v is not None))
        saved = self.args.save_every and self.step_num % self.args.save_every == 0 and self.step_num < self.total_steps
        if saved:
            self.save_checkpoint()
        if signalled or (acc.num_processes == 1 and self.signals.received is not None):
            stop_on_signal(self, saved)
        return row

    # -- saving -------------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """OUTPUT_DIR/checkpoint-N, everything --resume needs to continue exactly (see `RunFolder.save_checkpoint`)."""
        check_weights_finite(self, f"checkpoint-{self.step_num}")
        best = self.evaluator.best if self.evaluator is not None else None
        state = {"elapsed_s": time.time() - self.start_time, "best": best}
        return self.folder.save_checkpoint(self.step_num, self.model, self.optimizer, self.scheduler, state,
                                           self.metrics_path)

    def finish(self, tokenizer, *, skipped: int, total: int, rows: list[dict] | None = None) -> None:
        """End the run: save the final model with `tokenizer` (see `save`), then report where things are and what
        was left out of training, and release --output-dir. `rows` (the --data rows) adds how many were cut at
        --max-new-tokens and what --truncated did with them."""
        self.save(tokenizer)
        processes = self.accelerator.num_processes
        self.accelerator.end_training()  # flushes and closes the trackers
        if processes > 1:
            # gloo's worker thread may still be dropping the last collective's tensors, which takes the GIL, when
            # main() returns and the DDP reducer tears the process group down holding the GIL while it joins that
            # thread: a deadlock seen at the end of 2-process CPU runs under load (py-spy: ~ProcessGroupGloo in
            # std::thread::join, the worker in ~AsyncBarrierWork waiting for the GIL). Let the worker finish first.
            time.sleep(0.5)
        if not self.accelerator.is_main_process:
            return
        self.folder.release()
        print(f"done: {self.step_num} steps in {time.time() - self.start_time:.1f}s; "
              f"model in {self.output_dir}, metrics in {self.metrics_path}")
        if skipped:
            print(f"skipped {skipped} of {total} rows longer than --max-length {self.args.max_length}")
        note = cut_rows_note(rows or [], self.args.truncated)
        if note:
            print(note)

    def save(self, tokenizer, path: str | Path | None = None) -> Path:
        """Save the student (or its LoRA adapter) and tokenizer as a normal Hugging Face folder; never weights that
        hold NaN or inf (DistillError instead, see `check_weights_finite`)."""
        path = Path(path or self.output_dir)
        acc = self.accelerator
        check_weights_finite(self, str(path))
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(self.model)  # a collective under FSDP/DeepSpeed: gathered to rank 0

        def write():
            if acc.is_main_process:
                acc.unwrap_model(self.model).save_pretrained(path, state_dict=state_dict, save_function=acc.save)
                tokenizer.save_pretrained(path)

        write_or_stop(acc, write, f"the model to {path}", self.output_dir)
        acc.wait_for_everyone()
        return path


def stop_on_signal(loop: TrainLoop, saved: bool) -> None:
    """After the optimizer step in progress when SIGTERM or a first Ctrl-C came (only runs with --save-every listen,
    see `StopSignals`): save a checkpoint of this step (unless the step just saved one) and stop in one line, so
    --resume redoes nothing. The last step is not stopped: the run ends and saves its model as usual."""
    if loop.step_num >= loop.total_steps:
        return
    path = loop.output_dir / f"checkpoint-{loop.step_num}" if saved else loop.save_checkpoint()
    signum = loop.signals.received or signal.SIGTERM  # another process may have taken it
    loop.signals.restore()
    loop.bar.close()
    loop.accelerator.end_training()
    loop.folder.release()
    raise Preempted(f"stopped by {StopSignals.NAMES[signum]} after step {loop.step_num} of {loop.total_steps}: "
                    f"saved {path}; --resume {loop.output_dir} continues from it", signum)


def stop_on_teacher_failure(loop: TrainLoop, error: DistillError) -> None:
    """A served teacher (--teacher-url) failed mid-step after its retries: save a checkpoint of the last complete
    step, with the RNG as that step left it (`TrainLoop.step_rng`, recorded as the failed step began: it may have
    drawn samples since), and stop in one line, so that --resume redoes exactly the failed step. Nothing of it was
    applied: gradients accumulated so far are dropped. Raises a DistillError."""
    if loop.step_num == 0:
        loop.folder.release()
        raise DistillError(f"{error}; nothing was trained yet") from None
    _set_rng_state(loop.step_rng)
    path = loop.save_checkpoint()
    loop.bar.close()
    loop.accelerator.end_training()
    loop.folder.release()
    raise DistillError(f"{error}; stopped after step {loop.step_num} of {loop.total_steps}: saved {path}; "
                       f"--resume {loop.output_dir} continues from it once the teacher is back") from None


def count_steps(rows: int, args, processes: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps this run takes): an epoch is every row once, in micro-batches of
    --batch-size per process (the last one may be short) grouped --grad-accum to a step (the last step may have
    fewer); --epochs may be fractional (rounded up to a whole step, at least one); --max-steps overrides it."""
    micro_batches = math.ceil(rows / (args.batch_size * processes))
    per_epoch = math.ceil(micro_batches / args.grad_accum)
    return per_epoch, args.max_steps or max(1, math.ceil(per_epoch * args.epochs))


def preflight(loop: TrainLoop, check) -> None:
    """The pre-flight, an explicit step before the first update (and again after --resume): `check(batch)` runs
    on the run's first micro-batch (`TrainLoop.first_batch`) without gradients, in eval mode, and every RNG state
    is put back afterwards, so the run trains exactly as it would without it. A check stops the run by raising."""
    with side_effect_free(loop.model):
        check(loop.first_batch())


@contextlib.contextmanager
def side_effect_free(model):
    """No gradients and eval mode inside; every module's train mode and every RNG state put back afterwards, so
    that what runs inside (held-out evaluation, the pre-flight) leaves the training run exactly as it was.
    Module by module: a peft model trains with its base in eval mode and its LoRA dropout in train mode, which
    model.train() afterwards would not give back."""
    rng, modes = _get_rng_state(), [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        _set_rng_state(rng)


def check_finite_step(loss: float | None, grad_norm: float | None, lr: float, step: int,
                      models: dict[str, str]) -> None:
    """Stop before an update with a non-finite loss or gradient norm: AdamW would write NaN into every weight it
    touches, and the run would go on to save them with exit status 0. `models`: the models whose forward passes
    feed the loss, with their dtype flags (`TrainLoop`'s)."""
    bad = [f"{name} is {value}" for name, value in (("loss", loss), ("gradient norm", grad_norm))
           if value is not None and not math.isfinite(value)]
    if not bad:
        return
    overflowed = " or ".join(f"{name}'s" for name in models)
    dtypes = ", ".join(dict.fromkeys(models.values()))
    raise DistillError(
        f"step {step}: --student's {' and '.join(bad)} (not finite): training stopped before this update and "
        f"nothing was saved. The run diverged, or a forward pass overflowed ({overflowed}): try a lower --lr (this "
        f"step's: {lr:.3g}), --max-grad-norm 1, or float32/bfloat16 ({dtypes}) instead of float16")


def check_weights_finite(loop: TrainLoop, what: str) -> None:
    """Refuse to save weights holding NaN or inf (`what`: the model or checkpoint about to be written).

    A step whose loss and gradient were finite can still overflow the weights (a huge --lr, float16 weights).
    Only trainable parameters can have changed; each process counts its own (its shard under FSDP) and the
    counts are summed, so all processes stop together.
    """
    names, counts = [], [torch.zeros((), dtype=torch.long, device=loop.device)]
    for name, param in loop.model.named_parameters():
        if param.requires_grad:
            local = param.detach()
            local = local.to_local() if hasattr(local, "to_local") else local
            names.append(name)
            counts.append(torch.isfinite(local).logical_not_().sum().to(loop.device))
    counts = torch.stack(counts)
    total = int(loop.accelerator.reduce(counts.sum(), reduction="sum").item())
    if total:
        local_bad = counts[1:].nonzero().flatten().tolist()
        first = names[local_bad[0]] if local_bad else None
        raise DistillError(
            f"not saving {what}: {total} weights of --student are not finite after step {loop.step_num}"
            f"{f' (first: {first})' if first else ''}; the updates overflowed them. Try a lower --lr "
            "(or more --warmup-ratio), --max-grad-norm 1, or float32/bfloat16 weights (--dtype) instead of "
            "float16")

def eval_metric_names(args, stats: tuple[str, ...]) -> list[str]:
    """The eval_* keys a run logs: eval_loss and eval_<stat> for each of the script's held-out `stats` with
    --eval-data, eval_exact_match with --eval-problems."""
    names = ["eval_loss", *(f"eval_{stat}" for stat in stats)] if args.eval_data else []
    return names + (["eval_exact_match"] if args.eval_problems else [])


def check_eval_args(parser: argparse.ArgumentParser, args, stats: tuple[str, ...]) -> None:
    """Refuse held-out flags that would be ignored or that name a metric this run will not log, before any model
    is loaded. `stats` are the terms the script's objective reports on held-out rows besides eval_loss."""
    for flag, path in (("--eval-data", args.eval_data), ("--eval-problems", args.eval_problems)):
        if path is not None and not Path(path).is_file():
            parser.error(f"{flag} '{path}': no such file")
    given = [flag for flag, value in (("--eval-data", args.eval_data), ("--eval-problems", args.eval_problems),
                                      ("--save-best", args.save_best)) if value is not None]
    if given and not args.eval_every:
        parser.error(f"{given[0]} needs --eval-every N (how many optimizer steps between evaluations)")
    if args.eval_every and not (args.eval_data or args.eval_problems):
        parser.error("--eval-every needs --eval-data and/or --eval-problems (what to evaluate on)")
    logged = eval_metric_names(args, stats)
    if args.save_best is not None and args.save_best not in logged:
        parser.error(f"--save-best {args.save_best}: not a metric this run logs (it logs {', '.join(logged)})")
