"""The training-loop kit: `TrainLoop` (accelerate, accumulation by global token count, logging, saving, exact
resume) and held-out evaluation (`load_held_out`, `TrainLoop.evaluate`). Not a trainer to subclass: each script
iterates the loop and writes its own step."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoints import (
    _RESUME_ADJUSTABLE,
    _RESUME_IGNORED,
    _SETTING_NAMES,
    LOCK_NAME,
    _get_rng_state,
    _set_rng_state,
    check_output_path,
    complete_checkpoints,
    file_fingerprint,
    find_checkpoint,
    load_state,
    lock_output,
    save_state,
    unlock_output,
)
from common import (
    DEFAULT_SYSTEM_PROMPT,
    HIGHER_IS_BETTER,
    DistillError,
    cut_rows_note,
    encode_rows,
    fingerprint,
    is_main_process,
    load_distill_rows,
    load_prompt_dataset,
    pad_batch,
)
from generation import answer_problems, extract_answer, score_answers
from models import model_fingerprint, seed_everything


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
    default system prompt of --eval-problems: the one the training data was generated with.
    """
    if not args.eval_every:
        return None
    examples = []
    if args.eval_data:
        eval_rows = load_distill_rows(args.eval_data, what="--eval-data")
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
    system_prompt = args.eval_system_prompt
    if system_prompt is None:
        first = rows[0]["messages"][0] if rows and rows[0]["messages"] else {}
        system_prompt = first["content"] if first.get("role") == "system" else DEFAULT_SYSTEM_PROMPT
    return HeldOut(tokenizer=tokenizer, examples=examples, problems=problems, system_prompt=system_prompt)


class TrainLoop:
    """What every training script needs around its own loss: accelerate, optimizer, schedule, accumulation,
    logging and saving. Not a trainer to subclass: the script iterates it and writes the step itself::

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

    `args` is the parsed namespace of `add_train_args` (whose flags these are). The loop reads: output_dir,
    overwrite, resume, save_every, save_total_limit, save_best, seed, bf16, report_to, gradient_checkpointing,
    batch_size, grad_accum, epochs, max_steps, lr, weight_decay, warmup_ratio, max_grad_norm, log_every,
    max_length, truncated, eval_data, eval_problems, eval_every, eval_batch_size, eval_max_new_tokens, and for
    --resume's checks data, student, teacher, teacher_dtype and teacher_cache; it also records every flag
    (vars(args)) so that --resume can refuse a changed run.
    """

    def __init__(self, args, model, examples: list[dict], pad_id: int, collate=None, held_out: HeldOut | None = None):
        from accelerate import Accelerator
        from transformers import get_cosine_schedule_with_warmup

        self.args = args
        report_to = args.report_to
        if report_to != "none" and importlib.util.find_spec(report_to) is None:
            raise DistillError(f"--report-to {report_to}: the package is not installed (pip install {report_to})")
        self.output_dir = Path(args.output_dir)
        self.accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no",
                                       log_with=None if report_to == "none" else report_to,
                                       project_dir=self.output_dir / "runs")
        seed_everything(args.seed)
        if (args.save_every or args.resume) and self.accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
            raise DistillError("--save-every/--resume: exact-resume checkpoints cover one process and DDP; under "
                               f"{self.accelerator.distributed_type.name} the optimizer state is sharded and is not "
                               "saved by this loop yet")
        self.examples, self.pad_id = examples, pad_id
        # Everything is checked before anything is written: the folder, the lock, the checkpoint to continue.
        resume_from = self._claim_output_dir()
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.collate = collate or (lambda exs: pad_batch(exs, pad_id))
        per_epoch = math.ceil(len(examples) / (args.batch_size * self.accelerator.num_processes))
        self.steps_per_epoch = math.ceil(per_epoch / args.grad_accum)
        self.total_steps = args.max_steps or max(1, math.ceil(self.steps_per_epoch * args.epochs))
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # Not prepared: accelerate would step it once per process; we step it once per optimizer step.
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, int(args.warmup_ratio * self.total_steps), self.total_steps)
        self.device = self.accelerator.device
        self.step_num = 0
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self._stats: dict[str, float] = {}
        if args.eval_every and held_out is None:
            raise ValueError("--eval-every: pass held_out=training.load_held_out(...) to TrainLoop")
        self.held_out = held_out
        self.best: dict | None = None  # --save-best: {"metric", "step", "value"} so far; checkpointed
        self._resume_state = self._load_checkpoint(resume_from) if resume_from else None
        if self.accelerator.is_main_process:
            config = vars(args) | ({"resume_history": self._history} if self._history else {})
            (self.output_dir / "run_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        if report_to != "none":  # trackers take flat scalars only
            self.accelerator.init_trackers(self.output_dir.name, config={
                k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()})

    # -- the output folder --------------------------------------------------------------------------------------

    def _claim_output_dir(self) -> Path | None:
        """Check --output-dir, --resume and --overwrite, lock the folder for this run's lifetime, clear it on
        --overwrite; returns the checkpoint folder to continue from, or None. The main process decides and every
        process raises the same error, so no process waits forever on one that has given up."""
        acc = self.accelerator
        error, folder = None, None
        self._settings, self._history, self._changes = None, [], []
        if acc.is_main_process:
            try:
                folder = self._claim_on_main()
            except DistillError as err:
                error = str(err)
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            error, folder = broadcast_object_list([error, None if folder is None else str(folder)])
        if error:
            raise DistillError(error)
        return None if folder is None else Path(folder)

    def _claim_on_main(self) -> Path | None:
        args, out = self.args, self.output_dir
        overwrite = getattr(args, "overwrite", False)
        if getattr(args, "save_total_limit", 0) < 0:
            raise DistillError("--save-total-limit must be >= 0 (0 = keep every checkpoint)")
        check_output_path(out, "--output-dir", folder=True)
        existed = out.is_dir()
        if existed:  # before looking inside: a run writing there now would change what we see
            lock_output(out / LOCK_NAME, "--output-dir", out)
        try:
            self._settings = self._run_settings()
            folder = find_checkpoint(args.resume) if args.resume else None
            inside = folder is not None and folder.resolve().parent == out.resolve()
            if folder is not None:
                self._check_resume_settings(folder)
            present = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if existed else []
            if inside and overwrite:
                raise DistillError(f"--overwrite with --resume {args.resume}: clearing --output-dir would delete the "
                                   "checkpoint being resumed; drop --overwrite")
            if present and not inside:
                listed = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
                if not overwrite:
                    raise DistillError(f"--output-dir '{out}' is not empty ({listed}): pass --resume {out} to continue "
                                       "the run there, --overwrite to clear it first, or choose another --output-dir")
                self._check_overwrite(present)
        except DistillError:
            if existed:
                unlock_output(out / LOCK_NAME)
            raise
        if not existed:
            out.mkdir(parents=True)
            lock_output(out / LOCK_NAME, "--output-dir", out)
        elif present and overwrite:
            for name in present:
                path = out / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            print(f"--overwrite: cleared {len(present)} entries of {out}")
        return folder

    def _check_overwrite(self, present: list[str]) -> None:
        """--overwrite clears only a folder that holds a run, and never one holding this run's inputs or the
        working directory (`--output-dir . --overwrite` must not empty a project)."""
        out = self.output_dir.resolve()
        if "run_config.json" not in present:
            raise DistillError(f"--overwrite: '{self.output_dir}' holds no run_config.json, so it is not a run folder "
                               "this tool wrote; not clearing it (empty it yourself or choose another --output-dir)")
        protected = {"the working directory": Path.cwd(), "your home folder": Path.home()}
        for key in ("data", "eval_data", "eval_problems", "student", "teacher", "teacher_cache", "resume"):
            value = getattr(self.args, key, None)
            if value and Path(value).expanduser().exists():
                protected[f"--{key.replace('_', '-')} '{value}'"] = Path(value).expanduser()
        for what, path in protected.items():
            path = path.resolve()
            if path == out or out in path.parents:
                raise DistillError(f"--overwrite: '{self.output_dir}' holds {what}; not clearing it")

    # -- what a checkpoint continues ----------------------------------------------------------------------------

    def _run_settings(self) -> dict:
        """What this run trains, for --resume to compare: the flags, plus content fingerprints of the data, models
        and teacher cache (a path may stay the same while what it holds changes, or move while it does not)."""
        args = self.args
        settings = json.loads(json.dumps(vars(args), default=str))
        settings["data_content"] = file_fingerprint(args.data) if Path(args.data).is_file() else None
        if getattr(args, "eval_data", None):
            settings["eval_data_content"] = file_fingerprint(args.eval_data)
        settings["student_content"] = model_fingerprint(args.student)
        cache = getattr(args, "teacher_cache", None)
        if cache:
            manifest = json.loads((Path(cache) / "cache.json").read_text()) if (Path(cache) / "cache.json").exists() \
                else {}
            keys = ["teacher_fingerprint", "top_k", "vocab_fingerprint", "logprob_dtype"]
            if manifest.get("store") == "hidden":  # (top-K caches keep the fingerprint they had before --store)
                keys += ["store", "hidden_dtype"]
            settings["teacher_cache_content"] = fingerprint(json.dumps([manifest.get(k) for k in keys]))
        elif hasattr(args, "teacher_dtype") and args.teacher:  # a script that loads --teacher
            settings["teacher_content"] = model_fingerprint(args.teacher)
        settings["training_rows"] = len(self.examples)
        settings["processes"] = self.accelerator.num_processes
        return settings

    def _check_resume_settings(self, folder: Path) -> None:
        """Refuse to continue a checkpoint with a change to what is trained (data, models, loss, batch layout):
        the run would silently be two runs in one. The schedule and evaluation may change: applied, reported
        and recorded in run_config.json's resume_history."""
        try:
            old = json.loads((folder / "trainer_state.json").read_text()).get("settings") or {}
        except (OSError, json.JSONDecodeError) as err:
            raise DistillError(f"--resume '{folder}': cannot read trainer_state.json ({err})") from None
        refused, changed = [], []
        for key in {**old, **self._settings}:
            value, before = self._settings.get(key), old.get(key)
            # A flag unknown to one side is a version difference; a content key on one side only is a different
            # kind of run (a live teacher against a --teacher-cache)
            if key in _RESUME_IGNORED or value == before or (key not in _SETTING_NAMES and (key not in old or
                                                                                           key not in self._settings)):
                continue
            name = _SETTING_NAMES.get(key, f"--{key.replace('_', '-')}")
            (changed if key in _RESUME_ADJUSTABLE else refused).append(f"{name} {value} (checkpoint: {before})")
        if refused:
            raise DistillError(f"--resume '{folder}': this run would train something else than the checkpoint's: "
                               f"{'; '.join(refused)}. Use the checkpoint's settings, or start a new run (another "
                               "--output-dir, or --overwrite)")
        if changed:
            print(f"--resume: continuing {folder} with changed settings, applied from its step on: "
                  f"{'; '.join(changed)}")
        self._changes = changed

    # -- data ---------------------------------------------------------------------------------------------------

    def _micro_batches(self):
        """Endless stream of this process's micro-batches: reshuffled every epoch, sharded across processes."""
        acc = self.accelerator
        epoch = 0
        while True:
            order = list(range(len(self.examples)))
            random.Random(self.args.seed + epoch).shuffle(order)
            per_step = self.args.batch_size * acc.num_processes
            for lo in range(0, len(order), per_step):
                chunk = order[lo:lo + per_step][acc.process_index::acc.num_processes]
                if chunk:
                    yield self.collate([self.examples[i] for i in chunk])
            epoch += 1

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
        while self.step_num < self.total_steps:
            batches = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in next(stream).items()}
                       for _ in range(self.args.grad_accum)]
            yield batches, self.count_tokens(batches)
        self.bar.close()

    def count_tokens(self, batches: list[dict]) -> float:
        """Global number of masked target tokens in this optimizer step (all micro-batches, all processes)."""
        local = sum(b["loss_mask"][:, 1:].sum() for b in batches).float()
        return self.accelerator.reduce(local, reduction="sum").item()

    # -- the step -----------------------------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor, **stats: float) -> None:
        """Backpropagate one micro-batch's share of the step loss (already divided by the global token count).

        DDP averages gradients over processes; the loss is a share of a global *sum*, so scale it back up.
        """
        self.accelerator.backward(loss * self.accelerator.num_processes)
        self._stats["loss"] = self._stats.get("loss", 0.0) + loss.detach().float().item()
        for key, value in stats.items():
            self._stats[key] = self._stats.get(key, 0.0) + float(value)

    def step(self, num_tokens: float, *, evaluate=None, **extra) -> dict:
        """Clip, update, advance the schedule, evaluate when due (--eval-every, and after the last step) and log
        one metrics.jsonl row. `evaluate` is the script's objective for held-out rows (see `TrainLoop.evaluate`)."""
        acc = self.accelerator
        grad_norm = None
        if acc.sync_gradients:  # clipping at infinity (--max-grad-norm 0) changes nothing but measures the norm
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm or math.inf)
        lr = self.scheduler.get_last_lr()[0]
        # Reduced before the update, so that every process sees the same values and stops together.
        summed = {k: acc.reduce(torch.tensor(v, device=self.device), reduction="sum").item()
                  for k, v in sorted(self._stats.items())}
        self._stats = {}
        self._check_finite_step(summed.get("loss"), None if grad_norm is None else float(grad_norm), lr)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_num += 1
        row = {"step": self.step_num, **summed, "lr": lr, "tokens": int(num_tokens),
               "grad_norm": None if grad_norm is None else float(grad_norm),
               "elapsed_s": round(time.time() - self.start_time, 3), **extra}
        evaluated = bool(self.args.eval_every) and (self.step_num % self.args.eval_every == 0
                                                    or self.step_num == self.total_steps)
        if evaluated:
            row.update(self.evaluate(evaluate))
            self._keep_best(row)
        acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=self.step_num)
        if acc.is_main_process:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}")
            if self.step_num % self.args.log_every == 0 or self.step_num == self.total_steps or evaluated:
                self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in row.items() if v is not None))
        if self.args.save_every and self.step_num % self.args.save_every == 0 and self.step_num < self.total_steps:
            self.check_weights_finite(f"checkpoint-{self.step_num}")
            self.save_checkpoint()
        return row

    def _check_finite_step(self, loss: float | None, grad_norm: float | None, lr: float) -> None:
        """Stop before an update with a non-finite loss or gradient norm: AdamW would write NaN into every weight
        it touches, and the run would go on to save them with exit status 0."""
        bad = [f"{name} is {value}" for name, value in (("loss", loss), ("gradient norm", grad_norm))
               if value is not None and not math.isfinite(value)]
        if not bad:
            return
        teacher = bool(getattr(self.args, "teacher", None)) and hasattr(self.args, "teacher_dtype")
        models, dtypes = ("--student's or --teacher's", "--dtype, --teacher-dtype") if teacher else (
            "--student's", "--dtype")
        raise DistillError(
            f"step {self.step_num + 1}: --student's {' and '.join(bad)} (not finite): training stopped before this "
            f"update and nothing was saved. The run diverged, or a forward pass overflowed ({models}): try a lower "
            f"--lr (this step's: {lr:.3g}), --max-grad-norm 1, or float32/bfloat16 ({dtypes}) instead of float16")

    def check_weights_finite(self, what: str) -> None:
        """Refuse to save weights holding NaN or inf (`what`: the model or checkpoint about to be written).

        A step whose loss and gradient were finite can still overflow the weights (a huge --lr, float16 weights).
        Only trainable parameters can have changed; each process counts its own (its shard under FSDP) and the
        counts are summed, so all processes stop together.
        """
        names, counts = [], [torch.zeros((), dtype=torch.long, device=self.device)]
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                local = param.detach()
                local = local.to_local() if hasattr(local, "to_local") else local
                names.append(name)
                counts.append(torch.isfinite(local).logical_not_().sum().to(self.device))
        counts = torch.stack(counts)
        total = int(self.accelerator.reduce(counts.sum(), reduction="sum").item())
        if total:
            local_bad = counts[1:].nonzero().flatten().tolist()
            first = names[local_bad[0]] if local_bad else None
            raise DistillError(
                f"not saving {what}: {total} weights of --student are not finite after step {self.step_num}"
                f"{f' (first: {first})' if first else ''}; the updates overflowed them. Try a lower --lr "
                "(or more --warmup-ratio), --max-grad-norm 1, or float32/bfloat16 weights (--dtype) instead of "
                "float16")

    # -- held-out evaluation ------------------------------------------------------------------------------------

    def evaluate(self, objective=None) -> dict[str, float]:
        """eval_* metrics of the model as it is now, on --eval-data and --eval-problems.

        `objective(batch, num_tokens, held_out=True) -> (loss, stats)` is the script's per-micro-batch training
        objective. Summed over the held-out batches with `num_tokens` = every held-out masked token, `loss` gives
        eval_loss (the training formula and normalization, on held-out rows) and each stat eval_<stat>; with
        held_out=True a script may report other stats than in training (token_level: KL at T=1 as eval_kl).
        eval_exact_match is the strict `score_answers` score of greedy answers to --eval-problems.
        Rows and problems are sharded across processes and the sums reduced, so the values are a one-process run's.
        No gradients, eval mode (no dropout); the train mode and every RNG state are put back afterwards, so a run
        takes the same training steps with or without evaluation.
        """
        model, rng = self.model, _get_rng_state()
        # Module by module: a peft model trains with its base in eval mode and its LoRA dropout in train mode,
        # which model.train() afterwards would not give back.
        modes = [(module, module.training) for module in model.modules()]
        metrics: dict[str, float] = {}
        model.eval()
        try:
            with torch.no_grad():
                if self.held_out.examples:
                    if objective is None:
                        raise ValueError("--eval-data: this script's loop.step() must pass evaluate=objective")
                    metrics.update(self._held_out_sums(objective))
                if self.held_out.problems:
                    metrics["eval_exact_match"] = self._held_out_exact_match()
        finally:
            for module, training in modes:
                module.training = training
            _set_rng_state(rng)
        return metrics

    @property
    def eval_batch_size(self) -> int:
        return self.args.eval_batch_size or self.args.batch_size

    def _held_out_sums(self, objective) -> dict[str, float]:
        acc, examples = self.accelerator, self.held_out.examples
        num_tokens = float(sum(sum(ex["loss_mask"][1:]) for ex in examples))
        per_round = self.eval_batch_size * acc.num_processes
        totals: dict[str, float] = {}
        for lo in range(0, len(examples), per_round):
            mine = examples[lo:lo + per_round][acc.process_index::acc.num_processes]
            # Every process joins every forward (DDP syncs buffers, FSDP gathers weights in it): one left without
            # rows in the last round runs the first row again and drops the result.
            weight = 1.0 if mine else 0.0
            batch = self.collate(mine or examples[:1])
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss, stats = objective(batch, num_tokens, held_out=True)
            for key, value in {"loss": loss, **stats}.items():
                totals[key] = totals.get(key, 0.0) + weight * float(value)
        keys = sorted(totals)
        summed = acc.reduce(torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=self.device),
                            reduction="sum")
        return {f"eval_{key}": value for key, value in zip(keys, summed.tolist())}

    def _held_out_exact_match(self) -> float:
        acc, problems = self.accelerator, self.held_out.problems
        mine = problems[acc.process_index::acc.num_processes]
        # The unwrapped model, as on_policy samples: generation runs a different number of forwards per process.
        replies = answer_problems(acc.unwrap_model(self.model), self.held_out.tokenizer, mine,
                                  system_prompt=self.held_out.system_prompt,
                                  max_new_tokens=self.args.eval_max_new_tokens, batch_size=self.eval_batch_size,
                                  desc="eval answers")
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            replies = [reply for _, reply in sorted(gather_object([(p["index"], r) for p, r in zip(mine, replies)]))]
        return float(score_answers(replies, [p["answer"] for p in problems])["strict"])

    def _keep_best(self, row: dict) -> None:
        """--save-best: when this evaluation beats every earlier one, save the model to OUTPUT_DIR/best."""
        metric = self.args.save_best
        if metric is None:
            return
        if metric not in row:
            raise DistillError(f"--save-best {metric}: the evaluation logged only "
                               f"{', '.join(k for k in row if k.startswith('eval_'))}")
        value = row[metric]
        if value != value:  # NaN never counts as an improvement
            return
        if self.best is not None:
            higher = metric in HIGHER_IS_BETTER
            if not (value > self.best["value"] if higher else value < self.best["value"]):
                return
        self.best = {"metric": metric, "step": self.step_num, "value": value,
                     "better": "higher" if metric in HIGHER_IS_BETTER else "lower"}
        acc = self.accelerator
        final, tmp = self.output_dir / "best", self.output_dir / ".best.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.save(self.held_out.tokenizer, tmp)
        if acc.is_main_process:  # renamed when complete: OUTPUT_DIR/best is never half written
            (tmp / "best.json").write_text(json.dumps(self.best, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self.bar.write(f"best {metric} so far: {value:.6g} at step {self.step_num}, saved to {final}")
        acc.wait_for_everyone()

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """OUTPUT_DIR/checkpoint-N: weights (or adapter), optimizer, schedule, RNG of every process, data position,
        the run's settings and metrics so far. Written under a temporary name and renamed when complete, so a run
        killed while saving never leaves a checkpoint that --resume would pick up. The state is JSON plus
        safetensors (`save_state`): resuming never unpickles, so a checkpoint from elsewhere cannot run code.
        With --save-total-limit N only the newest N checkpoints are kept."""
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{self.step_num}"
        tmp = self.output_dir / f".checkpoint-{self.step_num}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        save_state({"rng": _get_rng_state()}, tmp, f"rng_{acc.process_index}")
        if acc.is_main_process:
            acc.unwrap_model(self.model).save_pretrained(tmp, save_function=acc.save)
            save_state({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "step": self.step_num, "elapsed_s": time.time() - self.start_time, "best": self.best,
                        "settings": self._settings, "history": self._history}, tmp, "trainer_state")
            shutil.copy(self.metrics_path, tmp / "metrics.jsonl")
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            limit = getattr(self.args, "save_total_limit", 0)
            for old in complete_checkpoints(self.output_dir)[:-limit] if limit else []:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def _load_checkpoint(self, folder: Path) -> dict:
        """Weights, optimizer, schedule, data position and --save-best's best so far from `folder` (found and
        checked by `_claim_output_dir`); the RNG states are returned for `__iter__` to restore."""
        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(self.model)
        if (folder / "adapter_model.safetensors").exists():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        else:
            weights = {}
            for shard in folder.glob("*.safetensors"):
                weights.update(load_file(shard))
            missing, unexpected = model.load_state_dict(weights, strict=False)
            tied = {k for k in missing if "lm_head" in k and getattr(model.config, "tie_word_embeddings", False)}
            if set(missing) - tied or unexpected:
                raise DistillError(f"--resume '{folder}': weights do not match the model "
                                   f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
        state = load_state(folder, "trainer_state")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The checkpoint's optimizer carries its own peak lr and weight decay: this run's flags win (a changed one
        # was reported by _check_resume_settings). Unchanged, this recomputes exactly the lr the schedule had.
        groups = self.optimizer.param_groups
        for group, decay in zip(groups, (self.args.weight_decay, 0.0)):
            group["initial_lr"], group["weight_decay"] = self.args.lr, decay
        self.scheduler.base_lrs = [self.args.lr] * len(groups)
        self.scheduler._last_lr = [self.args.lr * fn(self.scheduler.last_epoch) for fn in self.scheduler.lr_lambdas]
        for group, lr in zip(groups, self.scheduler._last_lr):
            group["lr"] = lr
        self.step_num = state["step"]
        best = state.get("best")  # --save-best's best so far: a resumed run saves only improvements on it
        self.best = best if best and best["metric"] == self.args.save_best else None
        self._history = list(state.get("history") or []) + (
            [{"step": self.step_num, "checkpoint": str(folder), "changed": self._changes}] if self._changes else [])
        rng_name = f"rng_{self.accelerator.process_index}"
        if not (folder / f"{rng_name}.json").exists():
            raise DistillError(f"--resume '{folder}': no {rng_name}.json (saved by fewer processes than this run)")
        rng = load_state(folder, rng_name)
        if self.accelerator.is_main_process:
            shutil.copy(folder / "metrics.jsonl", self.metrics_path)
            print(f"resuming from {folder} at step {self.step_num}")
            if folder.resolve().parent == self.output_dir.resolve():
                # Later checkpoints belong to the trajectory this run replaces; left there, a later --resume
                # would pick one of them up.
                for later in complete_checkpoints(self.output_dir):
                    if int(later.name.split("-")[1]) > self.step_num:
                        shutil.rmtree(later)
                        print(f"removed {later}: later than the checkpoint this run continues")
        return {"rng": rng["rng"], "elapsed_s": state["elapsed_s"]}

    def finish(self, tokenizer, *, skipped: int, total: int, rows: list[dict] | None = None) -> None:
        """End the run: save the final model with `tokenizer` (see `save`), then report where things are and what
        was left out of training, and release --output-dir. `rows` (the --data rows) adds how many were cut at
        --max-new-tokens and what --truncated did with them."""
        self.save(tokenizer)
        self.accelerator.end_training()  # flushes and closes the trackers
        if not self.accelerator.is_main_process:
            return
        unlock_output(self.output_dir / LOCK_NAME)
        print(f"done: {self.step_num} steps in {time.time() - self.start_time:.1f}s; "
              f"model in {self.output_dir}, metrics in {self.metrics_path}")
        if skipped:
            print(f"skipped {skipped} of {total} rows longer than --max-length {self.args.max_length}")
        note = cut_rows_note(rows or [], getattr(self.args, "truncated", "no-eos"))
        if note:
            print(note)

    def save(self, tokenizer, path: str | Path | None = None) -> Path:
        """Save the student (or its LoRA adapter) and tokenizer as a normal Hugging Face folder; never weights that
        hold NaN or inf (DistillError instead, see `check_weights_finite`)."""
        path = Path(path or self.output_dir)
        acc = self.accelerator
        self.check_weights_finite(str(path))
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(self.model)  # a collective under FSDP/DeepSpeed: gathered to rank 0
        if acc.is_main_process:
            acc.unwrap_model(self.model).save_pretrained(path, state_dict=state_dict, save_function=acc.save)
            tokenizer.save_pretrained(path)
        acc.wait_for_everyone()
        return path



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
