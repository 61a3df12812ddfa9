"""Shared building blocks for the distill scripts.

Everything the four training scripts would otherwise repeat lives here, in the order a run needs it:

1. errors and flags        - `DistillError`, `run_main`, `add_train_args`, `add_divergence_args`
2. models and tokenizers   - `load_model`, `load_tokenizer`, `maybe_lora`, `student_hidden_states`,
                             `teacher_hidden_states`, `load_teacher`
3. data                    - `read_jsonl`, `load_prompt_dataset`, `load_distill_rows`
4. chat templates, masks   - `render_chat`, `encode_chat`, `end_of_turn_ids`, `pad_batch`, `shift_for_next_token`
5. losses (pure functions) - `masked_ce`, `generalized_jsd_per_position`, `masked_kl`, `masked_jsd`,
                             `fused_head_loss` (the teacher cache's losses live in cache_teacher.py)
6. teacher/student checks  - `check_finite_logits`, `agreement`, `preflight`, `shared_vocab_size`,
                             `warn_template_mismatch`; each as a `Check` record (OK/WARN/FAIL) that doctor.py prints
                             and the scripts' pre-flight acts on (`raise_or_warn`): `vocabulary_checks`,
                             `head_rows_check`, `template_match_check`, `special_tokens_check`,
                             `loss_mask_checks` (+ `show_loss_mask`)
7. the training loop kit   - `TrainLoop` (accelerate, accumulation by global token count, logging, saving,
                             held-out evaluation: `load_held_out`, `TrainLoop.evaluate`)
8. answer scoring          - `extract_answer`, `judge_answer`, `score_answers`, `wilson_interval`
9. generation              - `generate`, `answer_problems`, `VLLMSampler`

Conventions used everywhere:
- `loss_mask` is aligned with `input_ids`: 1 on the tokens the student is trained to *predict* (the assistant
  completion, whitespace the template writes around it, and the end-of-turn token that closes it, which a row cut
  at --max-new-tokens leaves out: see `encode_chat`). Logits at position i predict token i+1, so losses pair
  `hidden[:, :-1]` with `input_ids[:, 1:]` and `loss_mask[:, 1:]` (see `shift_for_next_token`).
- Every loss is a *sum* over masked positions divided by `num_tokens`, the number of masked tokens in the whole
  optimizer step (all micro-batches, all processes). That makes the result independent of how the global batch
  is split by gradient accumulation or data parallelism.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful math tutor. Reason through the problem step by step, showing each calculation, "
    "then give the final numeric answer on its own last line in the form '#### <number>'."
)

# The blog's setup is every script's default, so that `python generate_data.py` then `python token_level.py` runs
# its experiment: a Qwen2.5-0.5B base student, a Qwen2.5-3B-Instruct teacher (SmolLM2-1.7B-Instruct for
# cross_tokenizer, whose tokenizer differs from Qwen's), greedy teacher answers to the first 500 GSM8K training
# problems, scored on the first 100 test problems.
BLOG_STUDENT = "Qwen/Qwen2.5-0.5B"
BLOG_TEACHER = "Qwen/Qwen2.5-3B-Instruct"
ULD_TEACHER = "HuggingFaceTB/SmolLM2-1.7B-Instruct"
DEFAULT_DATA = "data/teacher.jsonl"
BLOG_TRAIN_PROBLEMS = 500
BLOG_TEST_PROBLEMS = 100


# ----------------------------------------------------------------------------------------------------------------
# 1. errors and flags


class DistillError(Exception):
    """A problem with the user's input (file, row, flag). `run_main` prints it as one line, no traceback."""


class ModelError(DistillError):
    """A problem with a model itself (no chat template), the same for every row: reported without a row."""


def first_line(err: BaseException) -> str:
    """A library error's first line: the one-line reports here never carry a multi-line message."""
    return (str(err).splitlines() or [type(err).__name__])[0]


def run_main(main) -> None:
    """Run a script's `main()`, turning `DistillError` into one clear message and exit status 2."""
    try:
        main()
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def bounded(kind: type = float, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False, note: str = ""):
    """An argparse `type=` that also checks the value's range: every numeric flag is declared with one, so a value
    that would silently mean something else (a negative --max-grad-norm turns clipping into gradient ascent, a
    negative --max-steps saves an untrained model) stops the script as it parses its command line, with one line
    naming the flag: `error: argument --lr: must be a number >= 0, got '-1'`. NaN and infinities never pass.

    kind: int or float; low/high: the bounds, inclusive unless low_open/high_open; note: what the edge values
    mean, appended to the message (e.g. " (0 = off)").
    """
    show = str if kind is int else "{:g}".format
    if low is not None and high is not None:
        rule = f"in {'(' if low_open else '['}{show(low)}, {show(high)}{')' if high_open else ']'}"
    elif low is not None:
        rule = f"{'>' if low_open else '>='} {show(low)}"
    else:
        rule = f"{'<' if high_open else '<='} {show(high)}"
    what = f"{'an integer' if kind is int else 'a number'} {rule}{note}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        ok = math.isfinite(value)
        if low is not None:
            ok = ok and (value > low if low_open else value >= low)
        if high is not None:
            ok = ok and (value < high if high_open else value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # what argparse calls the type in its own messages
    return parse


# The ranges most flags share.
POSITIVE_INT = bounded(int, 1)
NON_NEGATIVE = bounded(float, 0)
FRACTION = bounded(float, 0, 1)
POSITIVE_FRACTION = bounded(float, 0, 1, low_open=True)  # top-p 0 would keep no token at all


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every script that loads a model (training, generation, evaluation)."""
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype to load weights in; 'auto' = bfloat16 for models that are only run (teacher, "
                             "generation, evaluation) on a GPU that supports it, float32 otherwise. A trained "
                             "student stays float32 under 'auto' (AdamW on bf16 weights loses small updates): add "
                             "--bf16 for mixed-precision compute")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow model/tokenizer code from the hub repo to run (off by default: it executes code)")
    parser.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0,
                        help="seed for python, numpy and torch RNGs (0 to 2^32-1, numpy's range)")


def add_train_args(parser: argparse.ArgumentParser, *, teacher: bool, student_default: str, output_dir: str,
                   teacher_default: str | None = None, lr: float = 1e-5) -> None:
    """The flags every training script shares (the conventions later scripts rely on).

    output_dir: the default --output-dir, a template filled from the parsed flags ("runs/token_level-{kl}");
    the script calls `fill_train_defaults` after parsing.
    """
    add_model_args(parser)
    parser.add_argument("--student", default=student_default, help="student model: hub id or local folder")
    if teacher:
        parser.add_argument("--teacher", default=teacher_default, help="teacher model: hub id or local folder")
        parser.add_argument("--teacher-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                            help="dtype for the frozen teacher (default: same as --dtype)")
    else:
        parser.add_argument("--teacher", default=None,
                            help="the teacher that wrote --data; only recorded in run_config.json (never loaded)")
    parser.add_argument("--data", default=None,
                        help="JSONL written by generate_data.py (messages + completion); default: the file "
                             f"generate_data.py writes for --teacher ({DEFAULT_DATA} for {BLOG_TEACHER}, "
                             "data/teacher_<name>.jsonl for another, see default_data_path)")
    parser.add_argument("--output-dir", default=None, help="where the trained model and metrics.jsonl go "
                                                            f"(default: {output_dir.format_map(_Shown())})")
    parser.output_dir_template = output_dir  # filled in from the parsed flags by fill_train_defaults
    parser.add_argument("--max-steps", type=bounded(int, 1, note=" (leave it out to train for --epochs)"),
                        default=None, help="optimizer steps to run (overrides --epochs; unset = --epochs)")
    parser.add_argument("--epochs", type=bounded(float, 0, low_open=True), default=1.0,
                        help="passes over the data when --max-steps is unset (fractions allowed)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=4, help="sequences per micro-batch per process")
    parser.add_argument("--grad-accum", type=POSITIVE_INT, default=1,
                        help="micro-batches accumulated per optimizer step")
    parser.add_argument("--lr", type=NON_NEGATIVE, default=lr, help="peak learning rate (AdamW)")
    parser.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0, help="AdamW weight decay")
    parser.add_argument("--warmup-ratio", type=FRACTION, default=0.03,
                        help="fraction of steps of linear warmup (0..1)")
    parser.add_argument("--max-grad-norm", type=bounded(float, 0, note=" (0 = off)"), default=1.0,
                        help="clip the global gradient norm (0 = off)")
    parser.add_argument("--max-length", type=bounded(int, 2), default=1024,
                        help="max tokens of prompt + completion; longer rows are skipped and counted")
    parser.add_argument("--truncated", default="no-eos", choices=["no-eos", "skip"],
                        help="rows generate_data.py cut at --max-new-tokens (finish_reason 'length'): 'no-eos' "
                             "trains on their text without the end-of-turn token, so the student never learns to "
                             "stop mid-answer (what TRL and most SFT do with a cut sequence); 'skip' leaves them "
                             "out, losing the longest answers. Counted in the end-of-run report either way")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the student (GPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute the student's activations in backward to save memory")
    parser.add_argument("--chunk-size", type=bounded(int, 0, note=" (0 = automatic)"), default=0,
                        help="positions per chunk when projecting hidden states to the vocabulary in the loss "
                             "(0 = automatic: ~128 MB per [chunk, vocab] float32 buffer)")
    parser.add_argument("--log-every", type=POSITIVE_INT, default=1, help="print a metrics line every N steps")
    parser.add_argument("--report-to", default="none", choices=["none", "tensorboard", "wandb"],
                        help="also send each step's metrics to this tracker through accelerate (metrics.jsonl is "
                             "always written); tensorboard logs go to OUTPUT_DIR/runs")
    parser.add_argument("--save-every", type=bounded(int, 0, note=" (0 = never)"), default=0,
                        help="write a resumable checkpoint (weights, optimizer, schedule, RNG, data position) "
                             "every N optimizer steps to OUTPUT_DIR/checkpoint-N (0 = never)")
    parser.add_argument("--resume", default=None,
                        help="continue from a checkpoint folder, or from the latest complete checkpoint in a folder; "
                             "refused if the data, models or loss differ from the checkpoint's run")
    parser.add_argument("--overwrite", action="store_true",
                        help="clear a non-empty --output-dir holding an earlier run first (without it, or --resume, "
                             "a non-empty --output-dir is refused)")
    parser.add_argument("--save-total-limit", type=bounded(int, 0, note=" (0 = keep all)"), default=0, metavar="N",
                        help="keep only the newest N checkpoints of --save-every, deleting older ones (0 = keep all)")
    parser.add_argument("--eval-data", default=None,
                        help="held-out JSONL in --data's format (messages + completion): every --eval-every steps "
                             "log eval_loss (this script's training objective on it), eval_ce and the script's other "
                             "eval_* terms")
    parser.add_argument("--eval-every", type=bounded(int, 0, note=" (0 = never)"), default=0,
                        help="evaluate on --eval-data/--eval-problems every N optimizer steps and after the last "
                             "(0 = never); eval_* keys join that step's metrics.jsonl row")
    parser.add_argument("--eval-problems", default=None,
                        help="held-out problems (.jsonl with question/answer, like GSM8K): also log "
                             "eval_exact_match, the strict score of the student's greedy answers")
    parser.add_argument("--eval-max-new-tokens", type=POSITIVE_INT, default=256,
                        help="max tokens per greedy answer to --eval-problems")
    parser.add_argument("--eval-batch-size", type=POSITIVE_INT, default=None,
                        help="rows per held-out forward and prompts per generate call (default: --batch-size)")
    parser.add_argument("--eval-system-prompt", default=None,
                        help="system message for --eval-problems ('' for none; default: the system message of the "
                             "first --data row, so problems are asked as the data was generated, else the "
                             "generate_data.py default)")
    parser.add_argument("--save-best", default=None, metavar="METRIC",
                        help=f"keep the model of the best evaluation in OUTPUT_DIR/best, with best.json naming its "
                             f"step and value; METRIC is an eval_* key this run logs ({', '.join(HIGHER_IS_BETTER)} "
                             "higher is better, every other one (eval_loss, eval_ce, eval_kl, ...) lower)")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights (peft)")
    parser.add_argument("--lora-r", type=POSITIVE_INT, default=16, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=POSITIVE_INT, default=32,
                        help="LoRA scaling alpha (the update is scaled by alpha / r)")
    parser.add_argument("--lora-dropout", type=bounded(float, 0, 1, high_open=True), default=0.05,
                        help="LoRA dropout probability")
    parser.add_argument("--lora-target-modules", default="all-linear",
                        help="comma-separated module names for LoRA, or 'all-linear'")


class _Shown(dict):
    """Shows a template's fields in upper case in --help: 'runs/token_level-{kl}' -> 'runs/token_level-KL'."""

    def __missing__(self, key: str) -> str:
        return key.upper()


def default_data_path(teacher: str | None) -> str:
    """The file generate_data.py writes for `teacher` when --output is left out, which is also the --data a
    training script reads for its --teacher: DEFAULT_DATA for the blog's teacher (and for sequence_level, which
    loads none), data/teacher_<name>.jsonl for any other, <name> being the last part of its id or folder,
    lower-cased. One file per teacher, so that one teacher's answers are never trained on as another's."""
    if teacher is None or teacher == BLOG_TEACHER:
        return DEFAULT_DATA
    import re

    name = re.sub(r"[^a-z0-9._-]+", "-", Path(teacher.rstrip("/\\")).name.lower()).strip("-.") or "teacher"
    return f"data/teacher_{name}.jsonl"


def generate_command(teacher: str | None) -> str:
    """The generate_data.py command line that writes `default_data_path(teacher)`."""
    import shlex

    return "python generate_data.py" + ("" if teacher in (None, BLOG_TEACHER) else f" --teacher {shlex.quote(teacher)}")


def fill_default_data(args) -> None:
    """Fill a --data left out with `default_data_path(args.teacher)`, and stop when that file does not exist yet,
    with one line naming the command that writes it; called as the flags are parsed, before any model loads. An
    explicit --data is left to the usual checks (and their own message)."""
    if args.data is not None:
        return
    args.data = default_data_path(args.teacher)
    if not Path(args.data).is_file():
        raise DistillError(f"--data: no teacher data at the default '{args.data}' yet: run `"
                           f"{generate_command(args.teacher)}` first to write it (or pass --data FILE)")


def fill_train_defaults(parser: argparse.ArgumentParser, args) -> None:
    """--output-dir and --data when left out: the script's own folder under runs/ (see add_train_args) and the
    default teacher data (see `fill_default_data`)."""
    if args.output_dir is None:
        args.output_dir = parser.output_dir_template.format(**vars(args))
    fill_default_data(args)


# --save-best: these held-out metrics improve upwards; every other eval_* key is a loss or a divergence.
HIGHER_IS_BETTER = ("eval_exact_match",)


def eval_metric_names(args, stats: tuple[str, ...]) -> list[str]:
    """The eval_* keys a run logs: eval_loss and eval_<stat> for each of the script's held-out `stats` with
    --eval-data, eval_exact_match with --eval-problems."""
    names = ["eval_loss", *(f"eval_{stat}" for stat in stats)] if args.eval_data else []
    return names + (["eval_exact_match"] if args.eval_problems else [])


# --kl names the divergence D of token_level.py and on_policy.py; --beta only weighs the JSD.
KL_BETA = {"forward": 0.0, "reverse": 1.0}
DEFAULT_JSD_BETA = 0.5


def add_divergence_args(parser: argparse.ArgumentParser, *, default: str, bare_beta_alias: bool = False) -> None:
    """--kl forward|reverse|jsd and --beta, the same flags wherever a script trains on a token-level divergence.

    Both default to None so that `resolve_divergence` can tell a bare --beta (on_policy.py's old spelling, kept for
    one release where `bare_beta_alias`) from --kl jsd --beta.
    """
    parser.add_argument("--kl", default=None, choices=["forward", "reverse", "jsd"],
                        help=f"the divergence D: forward = KL(teacher||student), mode covering; reverse = "
                             f"KL(student||teacher), mode seeking (MiniLLM, GKD); jsd = generalized JSD weighted "
                             f"by --beta (default: {default})")
    alias = (" Without --kl (deprecated, one release): --beta 0 means forward, 1 reverse, else jsd"
             if bare_beta_alias else "")
    parser.add_argument("--beta", type=FRACTION, default=None,
                        help=f"JSD mixture weight of the teacher, 0..1, with --kl jsd (default {DEFAULT_JSD_BETA})."
                             + alias)


def resolve_divergence(args, *, default: str, bare_beta_alias: bool = False) -> None:
    """Fill --kl and --beta in place (see add_divergence_args); `divergence_beta(args)` is then the loss's beta."""
    if args.kl is None and args.beta is not None and bare_beta_alias:
        args.kl = {0.0: "forward", 1.0: "reverse"}.get(args.beta, "jsd")
        spelling = f"--kl {args.kl}" + (f" --beta {args.beta:g}" if args.kl == "jsd" else "")
        print(f"note: --beta without --kl is deprecated and will be removed; this run is {spelling}")
    args.kl = args.kl or default
    if args.beta is None:
        args.beta = DEFAULT_JSD_BETA
    if bare_beta_alias:  # on_policy.py recorded the loss's beta (run_config.json, --resume's checks): keep doing so
        args.beta = divergence_beta(args)


def divergence_beta(args) -> float:
    """The generalized-JSD beta of --kl/--beta: 0 is forward KL, 1 reverse KL (see generalized_jsd_per_position)."""
    return KL_BETA.get(args.kl, args.beta)


def divergence_name(beta: float) -> str:
    """How the logs name D_beta."""
    return {0.0: "KL(teacher||student)", 1.0: "reverse KL(student||teacher)"}.get(beta, f"JSD(beta={beta:g})")


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


_COUNT = bounded(int, 1, note=" or 'all'")


def count_or_all(text: str) -> int | None:
    """--num-examples: a positive count, or 'all' (None: every row)."""
    return None if text.strip().lower() == "all" else _COUNT(text)


def add_prompt_dataset_args(parser: argparse.ArgumentParser, *, split: str, num_examples: int) -> None:
    """Flags naming a dataset of prompts (generate_data.py, eval.py); `prompts_from_args` reads them.
    num_examples: how many of the split's first problems are used by default (the blog's 500 train, 100 test)."""
    parser.add_argument("--dataset", default="openai/gsm8k", help="hub dataset id or local .jsonl/.json/.parquet/.csv")
    parser.add_argument("--dataset-config", default="main", help="hub dataset config name (gsm8k: 'main')")
    parser.add_argument("--split", default=split, help="dataset split")
    parser.add_argument("--prompt-field", default="question", help="field holding the prompt (problem) text")
    parser.add_argument("--answer-field", default="answer", help="field with the reference answer ('' for none)")
    parser.add_argument("--num-examples", type=count_or_all, default=num_examples,
                        help=f"use only the first N prompts (default {num_examples}; 'all' for every one)")
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                        help="system message ('' for none); folded into the user turn if the template has no "
                             "system role. generate_data.py and eval.py share the default")


def prompts_from_args(args) -> list[dict]:
    return load_prompt_dataset(args.dataset, config=args.dataset_config or None, split=args.split,
                               prompt_field=args.prompt_field, answer_field=args.answer_field or None,
                               num_examples=args.num_examples, trust_remote_code=args.trust_remote_code)


def add_vllm_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the optional vLLM sampling backend (generate_data.py, on_policy.py)."""
    parser.add_argument("--vllm", action="store_true",
                        help="sample with vLLM instead of transformers' generate (needs vllm and a CUDA GPU)")
    parser.add_argument("--vllm-gpu-memory", type=POSITIVE_FRACTION, default=0.3,
                        help="fraction of GPU memory vLLM may take (weights + KV cache)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# 2. models and tokenizers


def resolve_dtype(name: str | None, device: torch.device | str = "cpu") -> torch.dtype:
    if name in (None, "auto"):
        on_gpu = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if on_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _check_source(name: str, what: str, *, model: bool = False) -> None:
    """A path-looking name that does not exist would otherwise become a confusing hub lookup, and a local folder
    that cannot hold what is asked of it (empty, a tokenizer without a model) a transformers traceback."""
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    folder = Path(name).expanduser()
    if looks_local and not folder.exists():
        raise DistillError(f"{what} '{name}' not found: no such local folder")
    if not folder.is_dir():
        return
    files = sorted(p.name for p in folder.iterdir())
    if not files:
        raise DistillError(f"{what} '{name}' is an empty folder")
    if model and "adapter_config.json" in files:  # a peft adapter: transformers loads its base model by name
        return
    if model and "config.json" not in files:
        if any(f in files for f in _TOKENIZER_FILES):
            raise DistillError(f"{what} '{name}' holds a tokenizer but no model (no config.json): pass the folder "
                               "that holds the model's config.json and weights")
        raise DistillError(f"{what} '{name}' holds no config.json, so it is not a model folder "
                           f"(it has: {', '.join(files[:8])}{', ...' if len(files) > 8 else ''})")
    if model and not any(f.endswith((".safetensors", ".bin")) for f in files):
        raise DistillError(f"{what} '{name}' has a config.json but no weights (*.safetensors or *.bin)")


def load_tokenizer(name: str, *, trust_remote_code: bool = False, what: str = "model"):
    from transformers import AutoTokenizer

    _check_source(name, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # ValueError: a folder without tokenizer files, an unknown model type
        raise DistillError(f"cannot load the tokenizer of {what} '{name}': {first_line(err)}") from None
    # render_chat names the flag when the template is missing or rejects a row
    tokenizer.distill_flag = what
    if tokenizer.pad_token_id is None:
        # Padding is always masked by position (attention_mask / loss_mask), never by token id, so reusing EOS as
        # the pad token cannot hide the real EOS from the loss (the TRL <1.9 pad==eos bug).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, *, dtype: str | None = "auto", trust_remote_code: bool = False,
               device: torch.device | str = "cpu", what: str = "model"):
    """Load a causal LM and its tokenizer from a hub id or a local folder."""
    from transformers import AutoModelForCausalLM

    _check_source(name, what, model=True)
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code, what=what)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code)
    except OSError as err:
        raise DistillError(f"cannot load {what} '{name}': {err}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


# What of a model folder decides its outputs: weights, config, tokenizer and template (not READMEs).
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".index.json", ".jinja", ".model")
_MODEL_FILE_NAMES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json")


def model_fingerprint(name: str) -> str:
    """A cheap content fingerprint of a model (hub id or folder): equal means the same weights and tokenizer.

    Small files are hashed whole; each weight file by its size, its first and last MiB (a safetensors header names
    every tensor's shape and dtype) and 128 blocks of 4 KiB spread over it, so a 15 GB checkpoint costs
    milliseconds. Training changes nearly every weight, so two fine-tunes of one base never share the samples.
    A hub id is fingerprinted from its cached snapshot; one not cached locally by its name alone.
    """
    folder = Path(name).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name, local_files_only=True))
        except Exception:  # not cached (or not a hub id): nothing local to read
            return fingerprint(f"hub:{name}")
    digest = hashlib.sha1()
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not (path.name in _MODEL_FILE_NAMES or path.name.endswith(_MODEL_FILE_SUFFIXES)):
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}\n".encode())
        with path.open("rb") as f:
            if size <= 4 * 2**20:
                digest.update(f.read())
                continue
            offsets = [0, size - 2**20] + [size * i // 129 for i in range(1, 129)]
            for offset in offsets:
                f.seek(offset)
                digest.update(f.read(2**20 if offset in offsets[:2] else 4096))
    return digest.hexdigest()[:16]


def maybe_lora(model, args):
    """Wrap the student in a LoRA adapter when --lora is given (peft is only imported then)."""
    if not getattr(args, "lora", False):
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise DistillError("--lora needs peft: pip install peft") from None
    targets = args.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


def output_head(model) -> torch.nn.Module:
    """The vocabulary projection (lm_head) of a causal LM, through DDP/peft wrappers."""
    inner = getattr(model, "module", model)
    return inner.get_output_embeddings()


def student_hidden_states(model, input_ids, attention_mask) -> torch.Tensor:
    """Hidden states after the final norm, [B, T, H], of the model being trained, keeping autograd.

    We go through the top-level forward (so DDP/FSDP hooks run) and ask it to project only the last position
    (`logits_to_keep=1`); the loss then projects masked positions chunk by chunk itself.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


def teacher_hidden_states(model, input_ids, attention_mask) -> torch.Tensor:
    """Final hidden states [B, T, H] of a model not being trained (the teacher; a student under evaluation).

    Callers run it under inference mode. It calls the backbone directly: such a model is never wrapped by DDP, so
    no hooks are skipped, and the per-layer hidden states that `output_hidden_states` would keep alive are never
    collected. The student's training forward cannot take this shortcut (see `student_hidden_states`).
    """
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):  # a peft-wrapped student
        inner = inner.get_base_model()
    return inner.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def frozen_teacher(model) -> torch.nn.Module:
    """Put the teacher in eval mode with no gradients; it is never wrapped for training."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_teacher(args, device):
    """The frozen teacher (--teacher, in --teacher-dtype or --dtype) on `device`, and its tokenizer."""
    teacher, tokenizer = load_model(args.teacher, dtype=args.teacher_dtype or args.dtype, device=device,
                                    what="--teacher", trust_remote_code=args.trust_remote_code)
    return frozen_teacher(teacher), tokenizer


def fingerprint(text: str) -> str:
    """A short content hash (of weights listings, templates, rows, vocabularies) for equality checks."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# 3. data


def read_jsonl(path: str | Path, *, what: str = "--data") -> list[dict]:
    """Read a JSONL file; a malformed line raises one error naming the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{what}: file '{path}' not found")
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:  # decoded line by line, so that a bad byte is reported by line instead of as a traceback
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DistillError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[err.start]:#04x} at column "
                                   f"{err.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DistillError(f"{path}:{lineno}: malformed JSON line ({err.msg})") from None
            if not isinstance(row, dict):
                raise DistillError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def load_prompt_dataset(name: str, *, config: str | None = None, split: str = "train",
                        prompt_field: str = "question", answer_field: str | None = "answer",
                        num_examples: int | None = None, trust_remote_code: bool = False) -> list[dict]:
    """Prompts (and reference answers) from a hub dataset or a local .json/.jsonl/.parquet/.csv file.

    Returns rows {"index", "prompt", "answer"} in dataset order; `answer` is None when the field is absent.
    """
    import datasets

    local = Path(name).expanduser()
    if local.exists():
        suffix = local.suffix.lower()
        if local.is_dir():
            try:
                ds = datasets.load_from_disk(str(local))
                ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            except FileNotFoundError:
                ds = datasets.load_dataset(str(local), config, split=split)
        elif suffix in (".jsonl", ".json"):
            # Read it ourselves so a bad line is reported by number instead of as a pyarrow traceback.
            if suffix == ".json" and _read_text(local).lstrip().startswith("["):
                try:
                    ds = datasets.Dataset.from_list(json.loads(_read_text(local)))
                except json.JSONDecodeError as err:
                    raise DistillError(f"{local}: malformed JSON ({err})") from None
            else:
                ds = datasets.Dataset.from_list(read_jsonl(local, what="--dataset"))
        elif suffix in (".parquet", ".csv"):
            try:
                ds = datasets.load_dataset(suffix[1:], data_files=str(local), split="train")
            except Exception as err:  # pyarrow/pandas raise many types (bad encoding, malformed file)
                raise DistillError(f"--dataset '{name}': cannot read it: {first_line(err)}") from None
        else:
            raise DistillError(f"--dataset '{name}': unsupported file type (use .jsonl, .json, .parquet or .csv)")
    else:
        _check_source(name, "--dataset")
        try:
            ds = datasets.load_dataset(name, config, split=split, trust_remote_code=trust_remote_code) \
                if trust_remote_code else datasets.load_dataset(name, config, split=split)
        except Exception as err:  # datasets raises many types (offline, missing config, bad split)
            raise DistillError(f"cannot load dataset '{name}' (config={config}, split={split}): {err}") from None
    if prompt_field not in ds.column_names:
        raise DistillError(f"dataset '{name}' has no field '{prompt_field}' (--prompt-field); "
                           f"fields: {', '.join(ds.column_names)}")
    has_answer = bool(answer_field) and answer_field in ds.column_names
    if num_examples is not None:
        ds = ds.select(range(min(num_examples, len(ds))))
    rows = []
    for i, ex in enumerate(ds):
        prompt = ex[prompt_field]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DistillError(f"dataset '{name}' row {i}: field '{prompt_field}' is empty or not text")
        rows.append({"index": i, "prompt": prompt, "answer": ex[answer_field] if has_answer else None})
    return rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DistillError(f"{path}: not valid UTF-8 (byte {err.object[err.start]:#04x} at offset {err.start}); "
                           "save the file as UTF-8") from None


def load_distill_rows(path: str | Path, *, what: str = "--data") -> list[dict]:
    """Rows of a generate_data.py JSONL, validated: each needs `messages` (a list of {"role", "content"} with text
    in both) and `completion` (str). Rows with an empty completion are skipped and counted: they would train
    nothing but the end-of-turn token."""
    rows = read_jsonl(path, what=what)
    if not rows:
        raise DistillError(f"{what} '{path}' holds no rows")
    for lineno, row in enumerate(rows, 1):
        where = f"{path}: row {lineno} (id={row.get('id')})"
        for field, kind in (("messages", list), ("completion", str)):
            if not isinstance(row.get(field), kind):
                raise DistillError(f"{where} has no '{field}' ({kind.__name__}); was it written by generate_data.py?")
        for i, message in enumerate(row["messages"]):
            if not isinstance(message, dict):
                raise DistillError(f"{where}: messages[{i}] is {type(message).__name__}, not an object with "
                                   "'role' and 'content'")
            for key in ("role", "content"):
                value = message.get(key)
                if not isinstance(value, str):  # a null content would be rendered as the text "None"
                    shown = "missing" if key not in message else f"{json.dumps(value)[:40]}, not text"
                    raise DistillError(f"{where}: messages[{i}].{key} is {shown}")
    empty = [row for row in rows if not row["completion"].strip()]
    if len(empty) == len(rows):
        raise DistillError(f"{what} '{path}': every completion is empty")
    if empty:
        ids = ", ".join(str(row.get("id")) for row in empty[:5]) + (", ..." if len(empty) > 5 else "")
        if is_main_process():
            print(f"{what} {path}: skipping {len(empty)} of {len(rows)} rows with an empty completion (ids {ids}); "
                  "they would train only the end-of-turn token")
        rows = [row for row in rows if row["completion"].strip()]
    return rows


def row_fingerprint(row: dict) -> str:
    """What a cached teacher row was scored on: the row's messages and completion."""
    return fingerprint(json.dumps([row["messages"], row["completion"]], ensure_ascii=False, sort_keys=True))


# ----------------------------------------------------------------------------------------------------------------
# 4. chat templates and the assistant mask


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    """Render messages with the tokenizer's own chat template.

    Templates without a system role (Gemma, Mistral v0.1) raise on one; we then fold the system prompt into the
    first user turn, which is what those models' authors recommend.
    """
    import jinja2

    name, flag = getattr(tokenizer, "name_or_path", "?"), getattr(tokenizer, "distill_flag", "model")
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"{flag} '{name}' has no chat template (a base model?): use an Instruct/chat checkpoint, or save a copy "
            f"with one to a new folder (tokenizer.chat_template = ...; model and tokenizer .save_pretrained(NEW)) "
            f"and pass NEW as {flag}")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.exceptions.TemplateError as err:
        error = err
    if messages and messages[0]["role"] == "system":
        system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
        if rest and rest[0]["role"] == "user":
            rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
        try:
            return tokenizer.apply_chat_template(rest, tokenize=False, add_generation_prompt=add_generation_prompt)
        except jinja2.exceptions.TemplateError as err:
            error = err
    roles = ", ".join(dict.fromkeys(m["role"] for m in messages))
    raise DistillError(f"the chat template of {flag} '{name}' rejects these messages (roles: {roles}): {error}")


@contextlib.contextmanager
def about_row(row: dict, index: int, what: str | None = "--data"):
    """Prefix a DistillError raised while encoding a row with the row it is about."""
    try:
        yield
    except ModelError:
        raise
    except DistillError as err:
        where = f"row {index + 1} (id={row.get('id')})"
        raise DistillError(f"{what + ' ' if what else ''}{where}: {err}") from None


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return ids


def encode_chat(tokenizer, messages: list[dict], completion: str, max_length: int | None = None, *,
                end_of_turn: bool = True) -> dict | None:
    """Tokenize prompt + completion with the tokenizer's template and build the assistant mask.

    The completion is located by *character offsets* in the rendered text (no `{% generation %}` markers and no
    guessing of header token ids needed). `loss_mask[i] = 1` for every token overlapping the completion's
    characters, plus the first special token after it: the end-of-turn token that closes the turn (`<|im_end|>`,
    `<|eot_id|>`, `</s>`), which is how the student learns to stop. Whitespace-only tokens the template puts
    between the generation prompt and the completion, or between the completion and the end-of-turn token
    (Llama-2-chat renders `' ' + content.strip() + ' ' + eos_token` after `[/INST]`), are masked too: the model
    writes them itself when it answers. Everything else (system/user text, headers, what the template appends
    after the end-of-turn token, padding) is 0. With `end_of_turn=False` (an answer cut at --max-new-tokens) the
    closing whitespace and the end-of-turn token stay 0: the text did not end there.

    Returns {"input_ids", "loss_mask", "completion_offsets"}, or None when longer than `max_length`.
    `completion_offsets` gives, for each masked token in order, its (start, end) characters in `completion`.
    """
    prompt_text = render_chat(tokenizer, messages, add_generation_prompt=True)
    full_text = render_chat(tokenizer, messages + [{"role": "assistant", "content": completion}],
                            add_generation_prompt=False)
    # The completion starts after the shared prefix of "prompt + generation header" and "full conversation".
    prefix = os.path.commonprefix([prompt_text, full_text])
    start, lead, original_length = full_text.find(completion, len(prefix)), 0, len(completion)
    if start < 0:  # templates such as Llama-3's trim the content
        lead = len(completion) - len(completion.lstrip())
        completion = completion.strip()
        start = full_text.find(completion, len(prefix))
    if start < 0:
        raise DistillError("the chat template does not render the assistant completion verbatim; "
                           "cannot locate it to build the loss mask")
    end = start + len(completion)
    enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids, offsets = enc["input_ids"], enc["offset_mapping"]
    # Whitespace between the generation prompt and the completion: no prompt holds it, so the model writes it.
    opening = len(prefix) if full_text[len(prefix):start].isspace() else start
    loss_mask = [1 if (s < end and e > start) or (opening <= s < e <= start) else 0 for s, e in offsets]
    after = next((i for i, (s, e) in enumerate(offsets) if s >= end and e > s), len(offsets))
    closing = []  # whitespace-only tokens before the end-of-turn token
    while after < len(offsets) and full_text[offsets[after][0]:offsets[after][1]].isspace():
        closing.append(after)
        after += 1
    if after == len(offsets) or input_ids[after] not in _special_ids(tokenizer):
        raise DistillError(f"tokenizer '{tokenizer.name_or_path}': the chat template closes the assistant turn "
                           "with no special end-of-turn token, so the student could never learn to stop")
    if end_of_turn:
        for i in (*closing, after):
            loss_mask[i] = 1
    # The first token can never be a target (nothing predicts it).
    loss_mask[0] = 0
    if max_length is not None and len(input_ids) > max_length:
        return None
    # Character spans of the masked tokens relative to the completion string the caller passed (cross-tokenizer
    # alignment); the end-of-turn token covers a virtual character just past the completion's end, so that both
    # tokenizers' end-of-turn tokens pair with each other and not with the last word. Whitespace the template
    # adds around the completion is clamped to an empty span at the completion's start or end (never past the
    # end, where it would take the end-of-turn token's place).
    spans = [(min(max(s - start, 0), len(completion)) + lead, min(max(e - start, 0), len(completion)) + lead)
             for (s, e), m in zip(offsets, loss_mask) if m]
    if end_of_turn:
        spans[-1] = (original_length, original_length + 1)
    return {"input_ids": input_ids, "loss_mask": loss_mask, "completion_offsets": spans}


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the template's end-of-turn token and the tokenizer's EOS."""
    probe = [{"role": "user", "content": "hi"}]
    enc = encode_chat(tokenizer, probe, "ok")
    eot = enc["input_ids"][max(i for i, m in enumerate(enc["loss_mask"]) if m)]
    ids = [eot]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id != eot:
        ids.append(tokenizer.eos_token_id)
    return ids


def is_cut(row: dict) -> bool:
    """Whether generate_data.py stopped this row's completion at --max-new-tokens rather than at end of turn."""
    return row.get("finish_reason") == "length"


def encode_rows(rows: list[dict], tokenizer, max_length: int, what: str | None = "--data", *,
                truncated: str = "no-eos") -> tuple[list[dict], int]:
    """Encode generate_data rows for training; returns (examples, number skipped for exceeding max_length).
    An error names the row (`what` row N (id=...)).

    truncated (--truncated): what to do with rows cut at --max-new-tokens (`is_cut`): "no-eos" encodes them
    without the end-of-turn token in the mask, "skip" leaves them out (not counted in the number returned; see
    `cut_rows_note`). Training on a cut answer's end-of-turn token would teach the student to stop mid-sentence.
    """
    from tqdm.auto import tqdm

    examples, skipped, cut = [], 0, 0
    for index, row in enumerate(tqdm(rows, desc="tokenize", disable=len(rows) < 2000 or not is_main_process())):
        if is_cut(row) and truncated == "skip":
            cut += 1
            continue
        with about_row(row, index, what):
            enc = encode_chat(tokenizer, row["messages"], row["completion"], max_length, end_of_turn=not is_cut(row))
        if enc is None:
            skipped += 1
            continue
        enc["id"], enc["row"] = row.get("id"), index  # the row's place in `rows`, for scripts that need more of it
        enc["row_fingerprint"] = row_fingerprint(row)  # pairs the row with its --teacher-cache entry
        examples.append(enc)
    if not examples and cut:
        raise DistillError(f"no row left to train on: {cut} cut at --max-new-tokens (--truncated skip), {skipped} "
                           f"longer than --max-length {max_length}; use --truncated no-eos")
    if not examples:
        raise DistillError(f"every row is longer than --max-length {max_length}; raise it")
    if what == "--data":  # the training data: doctor.py's mask and prompt checks on its first row
        first = rows[examples[0]["row"]]
        raise_or_warn(loss_mask_checks(tokenizer, first, f"tokenizer '{tokenizer.name_or_path}'")[0])
    return examples, skipped


def cut_rows_note(rows: list[dict], truncated: str) -> str | None:
    """The end-of-run report's line about rows cut at --max-new-tokens (None when there are none)."""
    cut = sum(is_cut(row) for row in rows)
    if not cut:
        return None
    where = "cut at --max-new-tokens by generate_data.py (finish_reason 'length'"
    if truncated == "skip":
        return f"skipped {cut} of {len(rows)} rows {where}; --truncated skip)"
    return f"{cut} of {len(rows)} rows were {where}): trained without their end-of-turn token (--truncated no-eos)"


def pad_batch(examples: list[dict], pad_id: int, *, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad `input_ids` (and `loss_mask` when present) to the longest example.

    Padded positions get attention_mask 0 and loss_mask 0. Right padding for training, left for generation
    (so every sequence's next token is at the same column).
    """
    width = max(len(ex["input_ids"]) for ex in examples)
    out = {"input_ids": [], "attention_mask": [], "loss_mask": []}
    for ex in examples:
        n = len(ex["input_ids"])
        pad = [0] * (width - n)

        def place(seq, fill, pad=pad):
            filled = [fill] * len(pad)
            return filled + list(seq) if side == "left" else list(seq) + filled

        out["input_ids"].append(place(ex["input_ids"], pad_id))
        out["attention_mask"].append(place([1] * n, 0))
        out["loss_mask"].append(place(ex.get("loss_mask", [0] * n), 0))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def shift_for_next_token(hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair each position's hidden state with the token it predicts; keep only masked positions.

    Returns (hidden [N, H], targets [N]) where N = number of masked target tokens in the batch.
    """
    mask = batch["loss_mask"][:, 1:].bool()
    return hidden[:, :-1][mask], batch["input_ids"][:, 1:][mask]


# ----------------------------------------------------------------------------------------------------------------
# 5. losses
#
# Reference implementations take logits and are what the tests and the readers check the formulas against; their
# names say what they return: `generalized_jsd_per_position` one value per position, `masked_ce`, `masked_kl` and
# `masked_jsd` a masked sum / num_tokens. Training uses `fused_head_loss`, which computes the same numbers from
# hidden states chunk by chunk so that [tokens, vocab] logits never exist for a whole batch.


def _normalize(total: torch.Tensor, mask: torch.Tensor, num_tokens) -> torch.Tensor:
    return total / (mask.sum() if num_tokens is None else num_tokens)


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, num_tokens=None) -> torch.Tensor:
    """Cross-entropy on masked positions: sum_i mask_i * -log softmax(logits_i)[targets_i] / num_tokens.

    logits [..., V], targets [...], mask [...] (0/1). `num_tokens` defaults to mask.sum(); pass the global count
    of masked tokens in the optimizer step to make gradient accumulation exact.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    nll = F.cross_entropy(logits.flatten(0, -2).to(dtype), targets.flatten(), reduction="none")
    return _normalize(torch.where(mask.flatten().bool(), nll, 0.0).sum(), mask, num_tokens)


def generalized_jsd_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-position generalized Jensen-Shannon divergence, T^2-scaled. Shapes: [..., V] -> [...].

    With p = softmax(teacher_logits / T), q = softmax(student_logits / T) and m = beta*p + (1-beta)*q:

        D_beta = T^2 * ( beta * KL(p || m) + (1 - beta) * KL(q || m) )       for 0 < beta < 1
        D_0    = T^2 * KL(p || q) = T^2 * sum_v p(v) (log p(v) - log q(v))     forward KL (mode covering)
        D_1    = T^2 * KL(q || p)                                              reverse KL (mode seeking)

    The interior formula tends to 0 at both ends, so the endpoints are defined as the two KLs, as in GKD
    (Agarwal et al., 2024, "On-Policy Distillation of Language Models") and TRL. The T^2 factor (Hinton et al.,
    2015) keeps gradient magnitudes comparable across temperatures: d/dz of the soft loss scales as 1/T.
    Computed in float32 (or the input dtype if wider); zero-probability entries contribute 0.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)

    def kl_div(log_a, log_b):  # sum_v a (log a - log b), with 0 log 0 = 0
        a = log_a.exp()
        return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)

    if beta == 0:
        d = kl_div(t, s)
    elif beta == 1:
        d = kl_div(s, t)
    else:
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
        d = beta * kl_div(t, m) + (1 - beta) * kl_div(s, m)
    return d * temperature**2


def masked_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
              direction: str = "forward", temperature: float = 1.0, num_tokens=None) -> torch.Tensor:
    """Masked mean KL at temperature T, T^2-scaled (Hinton et al., 2015).

    forward: T^2 * sum_i mask_i * KL(p_i || q_i) / num_tokens   (KL(teacher || student), mode covering)
    reverse: T^2 * sum_i mask_i * KL(q_i || p_i) / num_tokens   (KL(student || teacher), mode seeking; MiniLLM)
    p = softmax(teacher_logits / T), q = softmax(student_logits / T). Shapes: logits [..., V], mask [...].
    """
    beta = {"forward": 0.0, "reverse": 1.0}[direction]
    return masked_jsd(student_logits, teacher_logits, mask, beta=beta, temperature=temperature, num_tokens=num_tokens)


def masked_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *, beta: float,
               temperature: float = 1.0, num_tokens=None) -> torch.Tensor:
    """Masked mean of `generalized_jsd_per_position` over positions: sum_i mask_i * D_beta(i) / num_tokens."""
    d = generalized_jsd_per_position(student_logits, teacher_logits, beta, temperature)
    # where, not multiply: a masked position holding inf/nan (e.g. padding) must not turn the sum into nan.
    return _normalize(torch.where(mask.bool(), d, 0.0).sum(), mask, num_tokens)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[i, v] * b[i, v] for each row, without a [C, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _chunk_loss_and_grad(logits, teacher_logits, targets, alpha: float, beta: float, temperature: float,
                         pool: list[torch.Tensor]):
    """CE and T^2 * D_beta summed over one chunk's positions, and d(alpha*CE + (1-alpha)*T^2*D)/d logits.

    Closed-form gradients, with u = z / T, q = softmax(u), s = log q, p = softmax(teacher / T), t = log p:
      CE:                d/dz = softmax(z) - onehot(target)
      forward (beta=0):  dD/du = q - p
      reverse (beta=1):  dD/du = q * (s - t - KL(q||p))
      interior:          dD/du = (1 - beta) * q * (s - log m - KL(q||m)),  m = beta*p + (1-beta)*q
    (in the interior JSD the p-terms cancel because beta*p + (1-beta)*q = m), and d(T^2 D)/dz = T * dD/du.

    `logits` and `teacher_logits` are consumed; `pool` holds preallocated free [C, V] buffers (see
    `_spare_buffers`). Every [C, V] result is written into a pooled buffer and every consumed input goes back to
    the pool, so a chunk allocates nothing of vocabulary size (on CPU, fresh memory is page-faulted each time).
    Log-probabilities are clamped to the dtype's finite minimum so that 0 * log 0 gives 0.
    """
    tiny = torch.finfo(logits.dtype).min

    def log_softmax(x, scale):  # into a pooled buffer; x goes back to the pool
        out = torch.log_softmax(x.div_(scale) if scale != 1 else x, dim=-1, out=pool.pop())
        pool.append(x)
        return out.clamp_(min=tiny)

    log_q1 = torch.log_softmax(logits, dim=-1, out=pool.pop())  # at T = 1, for the CE term
    ce_sum = -log_q1.gather(1, targets[:, None]).sum()
    grad = None
    if alpha > 0:
        grad = log_q1.exp_().mul_(alpha)  # alpha * (softmax(z) - onehot)
        grad[torch.arange(len(targets), device=grad.device), targets] -= alpha
        if alpha == 1:
            return ce_sum, torch.zeros_like(ce_sum), grad
        s = log_softmax(logits, temperature)
    elif temperature == 1:
        s = log_q1.clamp_(min=tiny)
        pool.append(logits)
    else:
        pool.append(log_q1)
        s = log_softmax(logits, temperature)  # log q
    t = log_softmax(teacher_logits, temperature)  # log p
    if beta == 0:
        p = torch.exp(t, out=pool.pop())
        soft = _rowdot(p, t.sub_(s))  # KL(p || q)
        soft_grad = s.exp_().sub_(p)  # q - p
    elif beta == 1:
        q = torch.exp(s, out=pool.pop())
        d = s.sub_(t)  # s - t
        soft = _rowdot(q, d)  # KL(q || p)
        soft_grad = d.sub_(soft[:, None]).mul_(q)
    else:
        p, q = torch.exp(t, out=pool.pop()), torch.exp(s, out=pool.pop())
        log_m = torch.mul(p, beta, out=pool.pop()).add_(q, alpha=1 - beta)
        log_m = log_m.clamp_(min=torch.finfo(q.dtype).tiny).log_()
        kl_pm = _rowdot(p, t.sub_(log_m))  # KL(p || m)
        d = s.sub_(log_m)  # s - log m
        kl_qm = _rowdot(q, d)  # KL(q || m)
        soft = beta * kl_pm + (1 - beta) * kl_qm
        soft_grad = d.sub_(kl_qm[:, None]).mul_(q).mul_(1 - beta)
    scale = (1 - alpha) * temperature  # d(T^2 D)/dz = T dD/du, times the soft weight
    grad = soft_grad.mul_(scale) if grad is None else grad.add_(soft_grad, alpha=scale)
    return ce_sum, soft.sum() * temperature**2, grad


def _spare_buffers(alpha: float, beta: float) -> int:
    """[C, V] buffers `_chunk_loss_and_grad` needs in its pool, besides the student's and teacher's logits."""
    if alpha == 1:
        return 1
    return 1 + (alpha > 0) + (0 if beta in (0, 1) else 2)


def _project(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """out = hidden @ weight.T, in the weight's dtype, written into a float32/float64 buffer."""
    hidden = hidden.to(weight.dtype)
    if weight.dtype == out.dtype:
        torch.matmul(hidden, weight.T, out=out)
    else:  # a bf16/fp16 head: the product is rounded to its dtype, then widened for the softmax math
        out.copy_(hidden @ weight.T)


def _fused_head_forward(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, num_tokens,
                        alpha, beta, temperature, chunk_size, vocab, *, need_hidden: bool, need_weight: bool):
    """The chunk loop of `fused_head_loss`: (loss, ce_sum, soft_sum, grad_hidden, grad_weight), each gradient None
    when not needed. Without gradients (held-out evaluation) the two gradient matmuls per chunk and the head-sized
    gradient buffer are skipped; the values are computed exactly as with them."""
    n, device = student_hidden.shape[0], student_hidden.device
    acc = torch.promote_types(student_hidden.dtype, torch.float32)  # fp32 math for bf16 models, fp64 in tests
    grad_hidden = torch.empty(student_hidden.shape, dtype=acc, device=device) if need_hidden else None
    grad_weight = torch.zeros(student_weight.shape, dtype=acc, device=device) if need_weight else None
    w = student_weight[:vocab]
    rows = min(chunk_size, n)
    # Allocated once and reused by every chunk: [rows, vocab] each.
    buffers = [torch.empty(rows, vocab, dtype=acc, device=device)
               for _ in range(1 + (alpha < 1) + _spare_buffers(alpha, beta))]
    ce_sum = torch.zeros((), dtype=acc, device=device)
    soft_sum = torch.zeros_like(ce_sum)
    # Autocast (--bf16) would rewrite the matmuls below and reject their out= buffers; precision is explicit.
    with torch.autocast(device_type=device.type, enabled=False):
        for lo in range(0, n, chunk_size):
            h = student_hidden[lo:lo + chunk_size].to(w.dtype)
            logits, teacher_logits, *spare = (buf[:h.shape[0]] for buf in buffers)
            _project(h, w, out=logits)
            if alpha < 1:
                _project(teacher_hidden[lo:lo + chunk_size], teacher_weight[:vocab], out=teacher_logits)
            else:
                spare.append(teacher_logits)
            ce, soft, grad_logits = _chunk_loss_and_grad(logits, teacher_logits, targets[lo:lo + chunk_size],
                                                         alpha, beta, temperature, spare)
            ce_sum += ce
            soft_sum += soft
            if need_hidden or need_weight:
                grad_logits = grad_logits.div_(num_tokens)
            if need_hidden:
                grad_hidden[lo:lo + chunk_size] = grad_logits.to(w.dtype) @ w
            if need_weight:
                grad_weight[:vocab].addmm_(grad_logits.T, h.to(acc))
    del buffers
    loss = (alpha * ce_sum + (1 - alpha) * soft_sum) / num_tokens
    return loss, ce_sum, soft_sum, grad_hidden, grad_weight


class _FusedHeadLoss(torch.autograd.Function):
    """Project hidden states to logits and compute the loss chunk by chunk, with gradients taken in forward.

    Each chunk's [C, V] logits exist only while that chunk is processed; the gradients w.r.t. the hidden states and
    the head weight are accumulated during the forward pass (closed form, see `_chunk_loss_and_grad`), so backward
    is a multiplication by the incoming scalar and nothing is recomputed (cf. Liger-Kernel's fused linear losses).
    """

    @staticmethod
    def forward(ctx, *inputs):
        loss, ce_sum, soft_sum, grad_hidden, grad_weight = _fused_head_forward(
            *inputs, need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype, ctx.weight_dtype = inputs[0].dtype, inputs[1].dtype
        ctx.mark_non_differentiable(ce_sum, soft_sum)
        return loss, ce_sum, soft_sum

    @staticmethod
    def backward(ctx, grad_loss, _ce, _soft):
        # In place: a second head-sized copy would double the largest buffer (the graph is used once).
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden.mul_(grad_loss).to(ctx.hidden_dtype) if grad_hidden is not None else None
        gw = grad_weight.mul_(grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None, None, None, None, None, None


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole [V, H] output-head weight, checked before the chunked losses read it directly.

    Plain and DDP: the parameter. FSDP2: the root module's parameters (lm_head, tied embeddings) stay gathered
    from the root's forward until its backward, so right after `student_hidden_states` this is a full tensor and
    FSDP reduce-scatters its gradient (tests/test_distributed.py checks every gradient against one process).
    A weight still sharded at that point (a DTensor: lm_head wrapped on its own, or the root resharded) or an
    empty placeholder (DeepSpeed ZeRO-3, FSDP1 flat parameters) would need a gather whose backward fights the
    engine's own hooks: refused with the way out, not guessed at.
    """
    sharded = weight.dim() != 2 or weight.numel() == 0
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        sharded = sharded or isinstance(weight, DTensor)
    if sharded:
        raise DistillError(f"the output head's weight is sharded when the loss reads it ({type(weight).__name__}, "
                           f"shape {tuple(weight.shape)}): DeepSpeed ZeRO-3, FSDP1 and an lm_head wrapped apart from "
                           "the root are not supported by the chunked losses; use configs/fsdp.yaml (FSDP2, "
                           "transformer-layer wrapping) or configs/deepspeed_zero2.yaml")
    return weight


def auto_chunk_size(vocab: int) -> int:
    """Positions per chunk so that one [chunk, vocab] float32 buffer is ~128 MB (~220 rows at Qwen's 151,936).

    Large enough for efficient matmuls, small enough that the 3-5 buffers of a chunk stay far below a
    materialized [tokens, vocab] loss. The same on every device: a fixed size keeps a run's chunking, and so its
    floating-point sums, the same wherever it runs.
    """
    budget = 128 * 2**20
    return max(16, budget // (4 * vocab))


def fused_head_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, targets: torch.Tensor,
                    num_tokens, *, teacher_hidden: torch.Tensor | None = None,
                    teacher_weight: torch.Tensor | None = None, alpha: float = 1.0, beta: float = 0.0,
                    temperature: float = 1.0, chunk_size: int = 0, vocab: int | None = None):
    """alpha * CE + (1 - alpha) * T^2 * D_beta(teacher, student), summed over positions / num_tokens.

    Same value and gradients as `alpha * masked_ce(...) + (1 - alpha) * masked_jsd(...)` on materialized logits,
    but computed from hidden states in chunks of `chunk_size` positions (0 = `auto_chunk_size`), so peak extra
    memory is a few [chunk_size, vocab] buffers plus one head-sized gradient instead of several [N, vocab] copies.

    student_hidden [N, H] (only masked positions), student_weight [V_s, H] (lm_head.weight), targets [N],
    teacher_hidden [N, H_t], teacher_weight [V_t, H_t]; `vocab` is the shared real vocabulary (logits beyond it,
    e.g. padded head rows, are ignored). Returns (loss, ce_sum, soft_sum): the last two detached sums for logging.
    """
    if alpha < 1 and (teacher_hidden is None or teacher_weight is None):
        raise ValueError("alpha < 1 needs teacher_hidden and teacher_weight")
    student_weight = full_weight(student_weight)
    vocab = vocab or student_weight.shape[0]
    chunk_size = chunk_size or auto_chunk_size(vocab)
    if teacher_hidden is None:
        teacher_hidden = teacher_weight = student_hidden.new_zeros(0)
    else:
        teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    num_tokens = max(float(num_tokens), 1.0)
    inputs = (student_hidden, student_weight, teacher_hidden, teacher_weight, targets, num_tokens, alpha, beta,
              temperature, chunk_size, vocab)
    if torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad):
        return _FusedHeadLoss.apply(*inputs)
    # Under no_grad autograd still reports needs_input_grad = True, so the Function would fill its gradients anyway.
    loss, ce_sum, soft_sum, _, _ = _fused_head_forward(*inputs, need_hidden=False, need_weight=False)
    return loss, ce_sum, soft_sum


# ----------------------------------------------------------------------------------------------------------------
# 6. teacher and student checks: finite logits, agreement, pre-flight, matching vocabularies and templates


def check_finite_logits(logits: torch.Tensor, what: str, where: str, dtype_flag: str = "--dtype") -> None:
    """Stop when a model's logits [..., V] hold NaN or +inf, or a row is all -inf (no distribution at all).

    Computed on them, a KL comes out 0 (NaN > 0 is false, so every term is dropped), an argmax picks an arbitrary
    token, and a sample is garbage: nothing downstream would notice. A -inf for *some* tokens is fine (masked
    vocabulary entries). One reduction: amax propagates NaN.
    """
    if not torch.isfinite(logits.amax(-1)).all():
        raise nonfinite_logits_error(what, where, dtype_flag)


def nonfinite_logits_error(what: str, where: str, dtype_flag: str = "--dtype") -> DistillError:
    return DistillError(f"{what}'s logits are not finite (NaN or inf) {where}: its weights hold NaN/inf or its "
                        f"forward overflows; load it in float32 or bfloat16 instead of float16 ({dtype_flag}), or "
                        "check the checkpoint")


@torch.no_grad()
def agreement(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
              teacher_weight: torch.Tensor, *, vocab: int, temperature: float = 1.0, chunk_size: int = 0,
              beta: float = 0.0, names: tuple[str, str] = ("the student", "the teacher"), where: str = "",
              dtype_flags: tuple[str, str] = ("--dtype", "--dtype")) -> dict[str, float]:
    """Sums over positions of KL(teacher || student) at temperature T (T^2-scaled) and of top-1 agreement.

    Shapes as in `fused_head_loss`. Returns {"kl_sum", "div_sum" (D_beta at T), "top1_sum", "count"}; divide by
    count for means (kept as
    sums so callers can add them across batches and processes). Chunked: no [N, vocab] tensor is formed.
    Non-finite logits raise DistillError naming the model (`names`: student's, teacher's), `where` and the flag
    that sets its dtype (`dtype_flags`).
    """
    out = {"kl_sum": 0.0, "div_sum": 0.0, "top1_sum": 0.0, "count": float(student_hidden.shape[0])}
    chunk_size = chunk_size or auto_chunk_size(vocab)
    dtype = torch.promote_types(student_hidden.dtype, torch.float32)  # fp32 for bf16 models, fp64 in tests
    for lo in range(0, student_hidden.shape[0], chunk_size):
        s = (student_hidden[lo:lo + chunk_size] @ student_weight[:vocab].T).to(dtype)
        t = (teacher_hidden[lo:lo + chunk_size] @ teacher_weight[:vocab].T).to(dtype)
        check_finite_logits(t, names[1], where, dtype_flags[1])
        check_finite_logits(s, names[0], where, dtype_flags[0])
        kl = generalized_jsd_per_position(s, t, 0.0, temperature).sum().item()
        out["kl_sum"] += kl
        out["div_sum"] += kl if beta == 0.0 else generalized_jsd_per_position(s, t, beta, temperature).sum().item()
        out["top1_sum"] += (s.argmax(-1) == t.argmax(-1)).sum().item()
    return out


def preflight(student_hidden, student_weight, teacher_hidden, teacher_weight, *, vocab: int,
              temperature: float, beta: float = 0.0) -> dict[str, float]:
    """Print how far apart teacher and student start, on the first batch (a sanity check before hours of GPU):
    the divergence this run minimizes (D_beta at T), the forward KL at T and top-1 agreement.
    Non-finite logits of either model stop the run here, naming it, before any update."""
    stats = agreement(student_hidden.detach(), student_weight.detach(), teacher_hidden, teacher_weight,
                      vocab=vocab, temperature=temperature, beta=beta, names=("--student", "--teacher"),
                      where="on the first batch (pre-flight)", dtype_flags=("--dtype", "--teacher-dtype"))
    count = max(stats["count"], 1.0)
    result = {"div": stats["div_sum"] / count, "kl": stats["kl_sum"] / count, "top1": stats["top1_sum"] / count}
    if is_main_process():
        minimized = "" if beta == 0.0 else (f"{divergence_name(beta)} at T={temperature:g} = {result['div']:.4f} "
                                            "(the divergence this run minimizes); ")
        note = " (the divergence this run minimizes)" if beta == 0.0 else ""
        print(f"pre-flight on the first batch ({int(count)} completion tokens): {minimized}"
              f"KL(teacher||student) at T={temperature:g} = {result['kl']:.4f}, top-1 agreement = {result['top1']:.1%}"
              f"{note}")
    return result


@dataclass
class Check:
    """One finding of a teacher/student check: `status` OK, WARN or FAIL (INFO for a measurement, SKIP for a check
    that does not apply), the `topic` it is about, a one-line `message` and optional `detail` lines under it.

    doctor.py prints every one of them; the training scripts' pre-flight runs the same functions and stops on a
    FAIL, prints a WARN and keeps quiet about the rest (`raise_or_warn`): one implementation of each check.
    """
    status: str
    topic: str
    message: str
    detail: str = ""


def raise_or_warn(checks: list[Check]) -> None:
    """How a training script acts on checks: the first FAIL stops the run (DistillError), each WARN is printed."""
    for check in checks:
        if check.status == "FAIL":
            raise DistillError(check.message)
    for check in checks:
        if check.status == "WARN" and is_main_process():
            print(f"warning: {check.message}")


def template_match_check(student_tokenizer, teacher_tokenizer) -> Check:
    """WARN when teacher and student would not format or end a conversation the same way.

    Both models read the *student's* rendering in the token-level scripts; a teacher fed another template scores
    text off its own distribution (a base student with an instruct teacher), and a different end-of-turn token
    teaches the student a stop signal its own generate() will not use.
    """
    problems = []
    if student_tokenizer.chat_template != teacher_tokenizer.chat_template:
        problems.append("chat templates differ")
    if end_of_turn_ids(student_tokenizer) != end_of_turn_ids(teacher_tokenizer):
        problems.append("end-of-turn/EOS tokens differ")
    if problems:
        return Check("WARN", "templates", f"teacher and student {' and '.join(problems)}; the teacher scores text "
                     "rendered with the student's template. Prefer a student whose template matches the teacher's "
                     "(e.g. the Instruct one).")
    return Check("OK", "templates", "teacher and student share one chat template and end-of-turn token")


def warn_template_mismatch(student_tokenizer, teacher_tokenizer) -> bool:
    """Print `template_match_check`'s warning; True when there was one."""
    check = template_match_check(student_tokenizer, teacher_tokenizer)
    raise_or_warn([check])
    return check.status != "OK"


def head_rows_check(who: str, tokens: int, rows: int) -> Check:
    """A model's output head against its tokenizer. Checkpoints often pad the head (Qwen2.5: 151,936 or 152,064
    rows for 151,665 tokens); those rows are not tokens: the token-level losses read only the first
    `shared_vocab_size` logits and `generate` never samples them. Fewer rows than tokens leaves ids without a logit.
    """
    if rows < tokens:
        return Check("WARN", "head", f"the {who}'s output head has {rows} rows for {tokens} tokenizer tokens: ids "
                     f"{rows}..{tokens - 1} have no logit")
    if rows > tokens:
        return Check("OK", "head", f"{who}: {rows} logit rows for {tokens} tokens; the {rows - tokens} padding rows "
                     f"are not tokens: the losses and generation read only the first {tokens} logits")
    return Check("OK", "head", f"{who}: {rows} logit rows = {tokens} tokens (no padding rows)")


def vocabulary_checks(student_tokenizer, teacher_tokenizer, student_rows: int,
                      teacher_rows: int) -> tuple[int | None, list[Check]]:
    """Whether token-level losses can compare the two models' distributions, and over which logits.

    Returns (the shared vocabulary size, None when there is none, and the checks): each head against its tokenizer
    (`head_rows_check`), the shared ids' strings on both sides (a vocabulary that differs in a few ids would
    silently compare different tokens), the sizes. Different vocabularies are a WARN here: cross_tokenizer.py
    applies (doctor.py); `shared_vocab_size` refuses them.
    """
    checks = [head_rows_check("student", len(student_tokenizer), student_rows),
              head_rows_check("teacher", len(teacher_tokenizer), teacher_rows)]
    n = min(len(student_tokenizer), len(teacher_tokenizer))
    if n > min(student_rows, teacher_rows):
        checks.append(Check("FAIL", "vocabulary", f"a tokenizer has more tokens ({n}) than a model has logit rows "
                            f"(student {student_rows}, teacher {teacher_rows})"))
        return None, checks
    ids = list(range(n))
    s_tokens = student_tokenizer.convert_ids_to_tokens(ids)
    t_tokens = teacher_tokenizer.convert_ids_to_tokens(ids)
    mismatch = [i for i in ids if s_tokens[i] != t_tokens[i]]
    if mismatch:
        i = mismatch[0]
        checks.append(Check("WARN", "vocabulary", (
            f"teacher and student vocabularies differ ({len(mismatch)} of {n} shared ids map to different tokens, "
            f"e.g. id {i}: student {s_tokens[i]!r} vs teacher {t_tokens[i]!r}). Token-level KL needs one "
            "vocabulary; use cross_tokenizer.py for different tokenizers")))
        return None, checks
    if len(student_tokenizer) != len(teacher_tokenizer):
        checks.append(Check("WARN", "vocabulary", f"tokenizers have {len(student_tokenizer)} (student) and "
                            f"{len(teacher_tokenizer)} (teacher) tokens; comparing distributions over the {n} "
                            "shared ids"))
    else:
        checks.append(Check("OK", "vocabulary", f"same vocabulary: all {n} ids map to the same tokens on both "
                            "sides (token_level.py, on_policy.py, cache_teacher.py apply)"))
    return n, checks


def shared_vocab_size(student_tokenizer, teacher_tokenizer, student_rows: int, teacher_rows: int) -> int:
    """The logit range on which teacher and student distributions can be compared (`vocabulary_checks`): the
    real shared ids, padded head rows left out. Different vocabularies are refused; a WARN is printed."""
    vocab, checks = vocabulary_checks(student_tokenizer, teacher_tokenizer, student_rows, teacher_rows)
    if vocab is None:  # a FAIL, or different vocabularies: no token-level loss is defined
        raise DistillError(next(c for c in checks if c.status == "FAIL" or c.topic == "vocabulary").message)
    raise_or_warn(checks)
    return vocab


def special_tokens_check(tokenizer, who: str, example: dict | None = None) -> Check:
    """BOS/EOS/pad of a tokenizer; WARN when pad == eos (Llama-3 Instruct ships no pad token, `load_tokenizer` then
    uses EOS). Here padding is masked by position (attention_mask, loss_mask), never by id, so the end-of-turn token
    stays trained: `example` (an `encode_chat` row) shows it. A tool that masks `labels == pad_id` drops it and its
    student never learns to stop."""
    def show(name: str) -> str:
        token, index = getattr(tokenizer, f"{name}_token"), getattr(tokenizer, f"{name}_token_id")
        return f"{name} none" if token is None else f"{name} {token!r}={index}"

    text = f"{who}: {', '.join(show(name) for name in ('bos', 'eos', 'pad'))}"
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id != tokenizer.eos_token_id:
        return Check("OK", "specials", text)
    shown = ""
    if example is not None:
        last = max(i for i, m in enumerate(example["loss_mask"]) if m)
        token = example["input_ids"][last]
        shown = (f" (here: the row below ends its trained span with {tokenizer.convert_ids_to_tokens(token)!r}, id "
                 f"{token}, loss_mask 1)")
    return Check("WARN", "specials", f"{text}: pad == eos. distill masks padding by position, so the end-of-turn "
                 f"token stays trained{shown}; tools that mask labels equal to the pad id drop it, and their student "
                 "never learns to stop")


def loss_mask_checks(tokenizer, row: dict, who: str, *, color: bool = False) -> tuple[list[Check], dict | None]:
    """A data row through `encode_chat`, as training encodes it, checked against what generation feeds the model.

    FAIL when the template cannot give a loss mask (it does not render the completion verbatim, or closes the turn
    without a special end-of-turn token), when prompt tokens would be trained, or when the generation prompt that
    generate_data.py, eval.py and on-policy sampling render (`render_chat(..., add_generation_prompt=True)`) is not
    the training text's prefix (inference then continues a context training never saw); WARN when it only
    tokenizes differently there, or when tokens between it and the completion are left untrained. The first check's
    detail is the row with its trained tokens marked (`show_loss_mask`). Returns (checks, the encoded row or None).
    """
    try:
        enc = encode_chat(tokenizer, row["messages"], row["completion"])
    except DistillError as err:
        return [Check("FAIL", "mask", f"{who}'s template: {err}")], None
    ids, mask = enc["input_ids"], enc["loss_mask"]
    masked = [i for i, m in enumerate(mask) if m]
    prompt = render_chat(tokenizer, row["messages"], add_generation_prompt=True)
    full = render_chat(tokenizer, [*row["messages"], {"role": "assistant", "content": row["completion"]}],
                       add_generation_prompt=False)
    end = tokenizer.convert_ids_to_tokens(ids[masked[-1]])
    checks = [Check("OK", "mask", f"{who}: {len(masked)} of {len(ids)} tokens trained: the completion and the "
                    f"end-of-turn token {end!r}", detail=show_loss_mask(tokenizer, full, enc, color=color))]
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:
        checks.append(Check("FAIL", "mask", f"{who}: the training text starts with two BOS tokens"))
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    where = "the generation prompt (as generate_data.py, eval.py and on-policy sampling render it)"
    if not full.startswith(prompt):
        at = len(os.path.commonprefix([prompt, full]))
        checks.append(Check("FAIL", "prompt", f"{who}: {where} is not a prefix of the training text: they part at "
                            f"character {at} ({prompt[at:at + 30]!r} vs {full[at:at + 30]!r}); at inference the "
                            "model continues a context it never trained on"))
    elif ids[:len(prompt_ids)] != prompt_ids:
        checks.append(Check("WARN", "prompt", f"{who}: {where} tokenizes differently alone than inside the training "
                            "text: at inference the model continues other tokens than it trained on"))
    elif masked[0] < len(prompt_ids):
        checks.append(Check("FAIL", "prompt", f"{who}: {len(prompt_ids) - masked[0]} prompt tokens are trained"))
    elif masked[0] > len(prompt_ids):
        gap = tokenizer.decode(ids[len(prompt_ids):masked[0]])
        checks.append(Check("WARN", "prompt", f"{who}: {masked[0] - len(prompt_ids)} tokens between {where} and the "
                            f"completion ({gap!r}) are never trained, though the model must write them itself"))
    else:
        checks.append(Check("OK", "prompt", f"{who}: {where} is the training text's first {len(prompt_ids)} "
                            "tokens; the trained tokens start right after it"))
    return checks, enc


def show_loss_mask(tokenizer, text: str, example: dict, *, color: bool = False, keep: int = 300) -> str:
    """`text` (the rendered row) with the tokens `example` trains (loss_mask 1) in [brackets], or in bold green on
    a terminal (`color`). An untrained stretch longer than 2 * `keep` characters is elided in its middle."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    runs, pos = [], 0  # [(trained, text)], merging neighbours; a character split over two tokens is shown once
    for (start, stop), m in zip(offsets, example["loss_mask"]):
        piece, pos = text[max(start, pos):stop], max(pos, stop)
        if runs and runs[-1][0] == m:
            runs[-1] = (m, runs[-1][1] + piece)
        else:
            runs.append((m, piece))
    out = []
    for trained, piece in runs:
        if trained:
            out.append(f"\x1b[1;32m{piece}\x1b[0m" if color else f"[{piece}]")
        else:
            out.append(piece if len(piece) <= 2 * keep else f"{piece[:keep]} ... {piece[-keep:]}")
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------------
# 7. the training loop kit


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# -- output folders: checks, locks, checkpoint files --------------------------------------------------------------

LOCK_NAME = ".lock"  # in a run's --output-dir (and a cache folder), held while the run lives
_HELD_LOCKS: dict[str, int] = {}  # resolved lock path -> open descriptor, for the locks this process holds


def check_output_path(path: Path, flag: str, *, folder: bool) -> None:
    """Refuse, before any work is done, an output that cannot be written: a file where a folder is wanted (or
    the reverse), a parent that is a file, a place without write permission."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise DistillError(f"{flag} '{path}' is a file, not a folder")
        if not folder and path.is_dir():
            raise DistillError(f"{flag} '{path}' is a folder; give the path of a file to write")
        target = path
    else:
        target = path.absolute().parent
        while not target.exists():
            target = target.parent
        if not target.is_dir():
            raise DistillError(f"{flag} '{path}': '{target}' is a file, so no folder can be made there")
    if not os.access(target, os.W_OK | (os.X_OK if target.is_dir() else 0)):
        raise DistillError(f"{flag} '{path}': no permission to write to '{target}'")


def lock_output(lock_path: Path, flag: str, output: Path, *, record_pid: bool = True) -> None:
    """Hold an exclusive lock on `lock_path` (created if absent) until `unlock_output` or the end of this process,
    so that a second run writing the same output is refused instead of interleaving its files with this one's.
    An advisory lock (flock): the kernel drops it when the process dies, so a killed run leaves no stale lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX: runs are not guarded against each other
        return
    # A run of this process that ended in an exception (a test, a notebook) may still hold it: take it back.
    unlock_output(lock_path)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() if record_pid else ""
        os.close(fd)
        raise DistillError(f"{flag} '{output}' is in use by another run{f' (pid {holder})' if holder else ''}: "
                           f"wait for it to end, or choose another {flag}") from None
    if record_pid:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    _HELD_LOCKS[str(Path(lock_path).resolve())] = fd


def unlock_output(lock_path: Path) -> None:
    fd = _HELD_LOCKS.pop(str(Path(lock_path).resolve()), None)
    if fd is not None:
        os.close(fd)


def file_fingerprint(path: str | Path) -> str:
    """A hash of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def save_state(obj, folder: Path, name: str) -> None:
    """Write `obj` as NAME.json, with its tensors in NAME.tensors (safetensors format). No pickle: reading it back
    (`load_state`) can only build dicts, lists, tuples, numbers, strings, numpy arrays and tensors, never run code
    from the file. Holds what optimizer, scheduler and RNG states are made of (dicts with int keys included)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def encode(x):
        if torch.is_tensor(x):
            key = str(len(tensors))
            tensors[key] = x.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {k: encode(v) for k, v in x.items()}
            return {"__items__": [[encode(k), encode(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [encode(v) for v in x]}
        if isinstance(x, list):
            return [encode(v) for v in x]
        if type(x).__module__ == "numpy":
            return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)} if hasattr(x, "shape") and x.shape else x.item()
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"save_state: cannot store a {type(x).__name__}")

    text = json.dumps(encode(obj))
    save_file(tensors, folder / f"{name}.tensors")
    (folder / f"{name}.json").write_text(text)


def load_state(folder: Path, name: str):
    """Read what `save_state` wrote."""
    from safetensors.torch import load_file

    tensors = load_file(folder / f"{name}.tensors")

    def decode(x):
        if isinstance(x, list):
            return [decode(v) for v in x]
        if not isinstance(x, dict):
            return x
        if x.keys() == {"__tensor__"}:
            return tensors[x["__tensor__"]]
        if x.keys() == {"__tuple__"}:
            return tuple(decode(v) for v in x["__tuple__"])
        if x.keys() == {"__items__"}:
            return {decode(k): decode(v) for k, v in x["__items__"]}
        if x.keys() == {"__ndarray__", "dtype"}:
            import numpy as np

            return np.array(x["__ndarray__"], dtype=np.dtype(x["dtype"]))
        return {k: decode(v) for k, v in x.items()}

    try:
        return decode(json.loads((folder / f"{name}.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DistillError(f"--resume '{folder}': {name} is damaged ({type(err).__name__}: {err})") from None


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoint-N folders in `folder`, oldest first."""
    found = [p for p in Path(folder).glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(path: str | Path) -> Path:
    """--resume PATH: PATH itself when it is a checkpoint, else the latest complete checkpoint in it."""
    folder = Path(path)
    older = ("was written by an older version as a pickle (trainer_state.pt), which is not loaded: unpickling a "
             "file can run any code in it. Continue it with the version that wrote it, or start a new run")
    if (folder / "trainer_state.json").exists():
        return folder
    if (folder / "trainer_state.pt").exists():
        raise DistillError(f"--resume '{folder}' {older}")
    found = complete_checkpoints(folder)
    if found:
        return found[-1]
    if any((p / "trainer_state.pt").exists() for p in folder.glob("checkpoint-*")):
        raise DistillError(f"--resume '{folder}': its checkpoints {older}")
    raise DistillError(f"--resume '{path}': no complete checkpoint there (checkpoint-N with trainer_state.json)")


# --resume compares the new run's settings (`TrainLoop._run_settings`) with the checkpoint's. Where and how often
# to write, and paths whose content is compared instead, are not compared; the schedule, evaluation and numerics
# may change (applied, reported, recorded); every other difference changes what is trained and is refused.
_RESUME_IGNORED = {"output_dir", "resume", "overwrite", "save_every", "save_total_limit", "log_every", "report_to",
                   "chunk_size", "eval_batch_size", "gradient_checkpointing", "trust_remote_code", "vllm",
                   "vllm_gpu_memory", "min_exact_alignment"}
_RESUME_ADJUSTABLE = {"lr", "weight_decay", "warmup_ratio", "max_steps", "epochs", "max_grad_norm", "eval_every",
                      "eval_data", "eval_data_content", "eval_problems", "eval_max_new_tokens", "eval_system_prompt",
                      "save_best", "dtype", "teacher_dtype", "bf16", "data", "student", "teacher", "teacher_cache"}
_SETTING_NAMES = {"data_content": "--data content", "eval_data_content": "--eval-data content",
                  "student_content": "--student weights/tokenizer", "teacher_content": "--teacher weights/tokenizer",
                  "teacher_cache_content": "--teacher-cache teacher/store/K/dtype", "training_rows": "training rows",
                  "processes": "processes"}


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
            raise ValueError("--eval-every: pass held_out=common.load_held_out(...) to TrainLoop")
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


def _get_rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    with contextlib.suppress(ImportError):
        import numpy as np

        state["numpy"] = np.random.get_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


# ----------------------------------------------------------------------------------------------------------------
# 8. answer scoring (TrainLoop's --eval-problems, eval.py, demo.py)


# A number as written in a solution: an optional sign (ASCII '-' or the Unicode minus) touching it, an optional
# '$', digits with thousands separators and decimals. Not preceded by a word character, so identifiers such as
# 'x2' or 'Qwen2' hold no number. Whether the sign really is a sign is decided by `_is_sign` (it needs context).
_NUMBER = r"(?P<sign>[-\u2212])?(?P<body>(?:\$\s*)?(?<!\w)\d[\d,]*(?:\.\d+)?)"
# An operand ends here, so a '-' after it (spaces allowed) is the binary operator: '12 - 5', '(3+4)-2', '50%-5'.
_OPERAND_END = ")]}%"


def _is_sign(text: str, minus: int) -> bool:
    """Whether the '-' at `minus` (directly followed by the number) is a sign rather than a subtraction.

    A sign where it cannot be a binary operator: at the start; after an operator or opening punctuation such as
    '(', '=', ':', ',', '+', '*', '#' ('x = -3', '(-2)', '5 * -3', '#### -3'); after a word only with a space
    in between ('is -3', but 'n-5' and 'COVID-19' are not negative). Never after a number or a closing bracket
    or '%', with or without spaces ('12 - 5', '12 -5', '12-5', '(3)-5' all subtract).
    """
    before = text[:minus].rstrip()
    if not before:
        return True
    last = before[-1]
    if last.isdigit() or last in _OPERAND_END:
        return False
    if last.isalpha() or last == "_":
        return text[minus - 1].isspace()
    return True


def _number(text: str, match) -> str | None:
    sign = match.group("sign")
    negative = sign is not None and _is_sign(text, match.start("sign"))
    return _normalize_number(("-" if negative else "") + match.group("body"))


def extract_answer(text: str, *, strict: bool = False) -> str | None:
    """The final numeric answer of a solution, or None.

    strict: only an explicit final answer counts, '#### N' first, then \\boxed{N}; a reply without one (cut off
    mid-way, or that never states its answer) is None, so it scores as wrong. Lenient (strict=False): the same,
    then a fallback to the last number in the text, which also credits a reply that was cut off right after
    computing the right number, or ends on a number that merely looks like the answer. Report strict as the
    primary score; the gap to lenient measures how often answers lack the final format.

    A '-' counts as a sign only where it cannot be a subtraction (see `_is_sign`): 'She has 12 - 5 left' -> '5',
    '#### -3' -> '-3'. Normalized so that equal numbers compare equal as strings: thousands separators, '$',
    '%' and spaces are dropped and a trailing '.0' is removed ('$1,234.00' -> '1234').
    """
    import re

    for marker in (r"####\s*(?:\$\s*)?", r"\\boxed\{\s*(?:\$\s*)?"):
        match = re.search(marker + _NUMBER, text)
        if match:
            return _number(text, match)
    if strict:
        return None
    numbers = list(re.finditer(_NUMBER, text))
    return _number(text, numbers[-1]) if numbers else None


def _normalize_number(raw: str) -> str | None:
    cleaned = raw.replace(",", "").replace("$", "").replace("%", "").replace(" ", "").strip().rstrip(".")
    if not cleaned or cleaned == "-":
        return None
    if "." in cleaned:
        cleaned = cleaned.rstrip("0").rstrip(".")
    return "0" if cleaned in ("-0", "") else cleaned


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% with the default z = 1.96).

    With p = successes / n:  (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n).
    Preferred to the normal approximation p ± z·sqrt(p(1-p)/n), which collapses to a zero-width interval at 0%
    and 100%, can leave [0, 1], and undercovers for small n; Wilson's stays inside [0, 1] and keeps close to its
    nominal coverage there, which is where small held-out sets and weak students live. n == 0 -> (0.0, 1.0).
    """
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = successes / n, z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def judge_answer(prediction: str, reference: str | None) -> dict:
    """One prediction against its reference: the strict and lenient answers extracted from the prediction, the
    reference's answer (lenient rule: references are trusted data such as GSM8K's '#### N', None when it holds
    no number) and whether each matches. A problem without a reference number is never correct."""
    ref = extract_answer(reference) if reference is not None else None
    strict, lenient = extract_answer(prediction, strict=True), extract_answer(prediction)
    return {"strict": strict, "lenient": lenient, "reference": ref,
            "strict_ok": ref is not None and strict == ref, "lenient_ok": ref is not None and lenient == ref}


def score_answers(predictions: list[str], references: list[str | None]) -> dict:
    """Exact match of `predictions` against `references`, strict and lenient (see `extract_answer`).

    Only problems whose reference holds a number are scored; `n` counts them. Returns n, strict_correct and
    lenient_correct (counts), strict and lenient (fractions of n) and strict_ci and lenient_ci (Wilson 95%
    intervals, see `wilson_interval`). Raises DistillError when no reference holds a number.
    """
    if len(predictions) != len(references):
        raise DistillError(f"{len(predictions)} predictions for {len(references)} references")
    judged = [judge_answer(p, r) for p, r in zip(predictions, references)]
    judged = [j for j in judged if j["reference"] is not None]
    if not judged:
        raise DistillError("no problem has a reference answer with a number (check --answer-field)")
    n = len(judged)
    strict = sum(j["strict_ok"] for j in judged)
    lenient = sum(j["lenient_ok"] for j in judged)
    return {"n": n, "strict_correct": strict, "lenient_correct": lenient, "strict": strict / n,
            "lenient": lenient / n, "strict_ci": wilson_interval(strict, n), "lenient_ci": wilson_interval(lenient, n)}


# ----------------------------------------------------------------------------------------------------------------
# 9. generation (teacher data, on-policy samples, evaluation)


# Tokens the decode loop runs between two host reads of its stop and non-finite flags. Each read waits for the
# device, so reading every token would keep a GPU idle behind Python; a batch that has finished runs at most this
# many tokens too many (dropped: nothing after a row's stop token is returned).
STOP_CHECK_EVERY = 8
# Eager decode steps before a CUDA graph is captured (the first runs lazily initialize kernels and workspaces; they
# are real steps, their tokens are kept).
_GRAPH_WARMUP = 2
# On CUDA the static KV cache is sized up to a multiple of this, so that later calls with prompts a little longer
# (on-policy steps, eval batches) still fit it and replay its captured decode step.
_CACHE_LEN_MULTIPLE = 256
# On CPU, below this many multiply-adds per decode step (prompts x parameters), one thread decodes faster than
# several: the step is hundreds of small ops, and each one that goes parallel pays a fork and a join, which cost
# more than the op (on a machine whose cores are busy, a wait for a core each time).
_ONE_THREAD_BELOW = 50_000_000


@torch.no_grad()  # not inference_mode: a model that updates a buffer here (dynamic RoPE) trains next
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_ids: list[int] | None = None, what: str = "the model") -> list[dict]:
    """Batched, left-padded sampling with a KV cache; stops once every row has produced a stop token.
    Logits with NaN or inf raise DistillError naming the model (`what`, e.g. "--teacher") and the token: sampled
    from, they would give garbage that looks like text. Only real token ids are drawn: rows past len(tokenizer) pad
    the head (Qwen2.5: 151,936 rows for 151,665 tokens); a sample there decodes to nothing and indexes past the
    loss's vocabulary (on_policy.py).

    Returns one dict per prompt: `tokens` (new tokens up to and including the first stop token) and `finished`
    (False when cut at max_new_tokens). Only the settings given here apply (temperature 0 = greedy; top-p
    nucleus sampling otherwise), not a repetition penalty or top_k a checkpoint's generation_config may carry.

    Not `model.generate`: the one-token step runs on a preallocated (static) KV cache with every per-token decision
    (sampling, stop tokens, the non-finite check) on the device, and the host looks at the flags only every
    STOP_CHECK_EVERY tokens. On CUDA that step is captured once as a CUDA graph and replayed: a ~1,000-kernel step
    costs one launch instead of ~1,000 from Python (`_Decoder`). Greedy output is identical to `model.generate`
    (tests/test_generate.py).
    """
    stop_ids = stop_ids or end_of_turn_ids(tokenizer)
    if max_new_tokens <= 0:
        return [{"tokens": [], "finished": False} for _ in prompts]
    device = next(model.parameters()).device
    batch = pad_batch([{"input_ids": p} for p in prompts], tokenizer.pad_token_id, side="left")
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    settings = dict(max_new_tokens=max_new_tokens, vocab=len(tokenizer), temperature=temperature, top_p=top_p,
                    stop_ids=tuple(stop_ids), pad_id=tokenizer.pad_token_id)
    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    if device.type == "cpu" and len(prompts) * sum(p.numel() for p in model.parameters()) < _ONE_THREAD_BELOW:
        torch.set_num_threads(1)
    try:
        rows = _decoder(model, ids.shape, device, **settings).run(model, ids, mask, what)
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)
    results = []
    for row in rows:
        end = next((i for i, tok in enumerate(row) if tok in stop_ids), None)
        results.append({"tokens": row[:end + 1] if end is not None else row, "finished": end is not None})
    return results


def draw_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next token ids [B] from float logits [B, V]: the argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top-p nucleus (the smallest set of most likely tokens whose
    mass reaches top_p; ties at its edge are broken by the sort). Draws by the exponential race: token i wins
    argmax(log p_i - log E_i), E_i ~ Exp(1), with probability p_i, so no normalization is needed and nothing waits
    for the host (no multinomial, no data-dependent shape): the whole draw fits in a CUDA graph."""
    if temperature <= 0:
        return logits.argmax(-1)
    scores = logits / temperature
    # log E with E = -log U, U ~ Uniform[0, 1): several times cheaper than exponential_() on CPU
    log_arrival = torch.rand_like(scores).log_().neg_().log_()
    if top_p >= 1:
        return (scores - log_arrival).argmax(-1)
    sorted_scores, order = scores.sort(dim=-1, descending=True)  # [B, V]
    sorted_probs = sorted_scores.softmax(-1)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # the mass before it already reaches top_p
    race = sorted_scores.masked_fill(outside, -math.inf) - log_arrival
    return order.gather(-1, race.argmax(-1, keepdim=True)).squeeze(-1)


def _static_cache_fits(model) -> bool:
    """Whether `_Decoder` can drive this model with a static cache and its own 4D attention masks: every layer
    attends to the whole past (a sliding-window layer keeps a rolling cache our mask does not describe), and the
    attention takes a boolean (sdpa) or additive (eager) 4D mask as it is (not flash-attention's varlen path)."""
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False) or config._attn_implementation not in ("sdpa", "eager"):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return getattr(config, "sliding_window", None) is None
    return set(layer_types) == {"full_attention"}


def _graphs_fit(model, device: torch.device) -> bool:
    """CUDA graphs replay fixed addresses: only for plain parameters on one CUDA device (not FSDP2's DTensor shards,
    whose forward gathers them through collectives, nor a model spread over devices), and not inside an autocast
    region: its cache of low-precision weight copies would be read by the graph instead of recast on every replay.
    (Autocast inside the forward, as accelerate's mixed-precision wrapper does, is fine: it ends within the step.)"""
    if device.type != "cuda" or torch.is_autocast_enabled("cuda"):
        return False
    tensors = [*model.parameters(), *model.buffers()]
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device == device for t in tensors)


def _graph_key(model) -> tuple:
    """What a captured step depends on beyond its buffers: the weights' addresses (moved or reloaded weights are
    new memory) and the adapters' switches (a merged, disabled or switched LoRA adapter runs other code)."""
    switches = tuple((getattr(m, "merged", None), getattr(m, "disable_adapters", None),
                      tuple(getattr(m, "active_adapters", ()) or ())) for m in model.modules() if hasattr(m, "merged"))
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers())), switches


def _decoder(model, shape: torch.Size, device: torch.device, **settings) -> _Decoder:
    """The decode state for a batch of this shape: on CUDA the last one this model used when it has the same batch
    size and settings and a cache long enough (its captured step is then replayed at once), else a new one."""
    batch_size, prompt_len = shape
    cache_len = prompt_len + settings["max_new_tokens"]
    static = _static_cache_fits(model)
    graphs = static and _graphs_fit(model, device)
    if not graphs:
        return _Decoder(model, batch_size, cache_len, device, static=static, graphs=False, **settings)
    import weakref  # here rather than at the top: this section moves to its own module as a whole

    by_model = _DECODERS.setdefault("by_model", weakref.WeakKeyDictionary())
    key = (batch_size, _graph_key(model), tuple(sorted(settings.items())))
    cached = by_model.get(model)
    if cached is None or cached.key != key or cached.cache_len < cache_len:
        cache_len = -(-cache_len // _CACHE_LEN_MULTIPLE) * _CACHE_LEN_MULTIPLE
        cached = by_model[model] = _Decoder(model, batch_size, cache_len, device, static=True, graphs=True,
                                             key=key, **settings)
    return cached


class _Decoder:
    """Decode state on preallocated tensors: the KV cache, the next input token and its position, the attention
    mask, the tokens so far, and the flags the host reads every STOP_CHECK_EVERY tokens (all rows finished; the
    first token whose logits were not finite). `_step` (the forward of the newest token, then `_pick`) reads and
    writes only these tensors, in place, with no host sync, so on CUDA it is captured once as a graph and
    replayed for every later token, and for later calls of the same shape (`_DECODERS`).

    The static path (`_static_cache_fits`) passes transformers' StaticCache and its own 4D mask (models return a
    4D mask as it is): prefill [B, 1, P, L], one token [B, 1, 1, L] (L = the cache length; True or 0 = attend).
    Other models (sliding-window layers, flash attention) run the same loop on a DynamicCache and a 2D mask,
    eagerly. On CPU the static path is also the faster one (no mask building, no cache concatenation per token).
    """

    def __init__(self, model, batch_size: int, cache_len: int, device: torch.device, *, static: bool, graphs: bool,
                 max_new_tokens: int, vocab: int, temperature: float, top_p: float, stop_ids: tuple, pad_id: int,
                 key: tuple | None = None):
        self.static, self.graphs, self.key = static, graphs, key
        self.max_new_tokens, self.vocab, self.temperature, self.top_p = max_new_tokens, vocab, temperature, top_p
        self.pad_id, self.cache_len = pad_id, cache_len
        # a peft wrapper passes **kwargs on to the model it wraps, whose signature names the cache argument
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.cache_arg = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
        long = dict(dtype=torch.long, device=device)
        self.stops = torch.tensor(stop_ids, **long)
        self.tokens = torch.full((batch_size, max_new_tokens), pad_id, **long)  # [B, N] generated so far
        self.token = torch.zeros(batch_size, 1, **long)  # [B, 1] the newest token: the next forward's input
        self.position = torch.zeros(batch_size, 1, **long)  # [B, 1] its position (left padding: real tokens from 0)
        self.count = torch.zeros(1, **long)  # tokens generated so far
        self.bad_at = torch.zeros(1, **long)  # the first generated token (1-based) drawn from non-finite logits
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.graph, self.graph_failed = None, False
        if static:
            from transformers import StaticCache

            self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
            eager = model.config.get_text_config(decoder=True)._attn_implementation == "eager"
            dtype = model.get_input_embeddings().weight.dtype
            # sdpa takes a boolean mask (True = attend), eager attention adds its mask to the scores
            self.attend, self.ignore = (0.0, torch.finfo(dtype).min) if eager else (True, False)
            self.mask = torch.full((batch_size, 1, 1, cache_len), self.ignore,
                                   dtype=dtype if eager else torch.bool, device=device)  # [B, 1, 1, L]
            self.write_at = torch.zeros(1, **long)  # the cache slot the next forward writes

    def run(self, model, ids: torch.Tensor, mask: torch.Tensor, what: str) -> list[list[int]]:
        """Prefill the prompts (ids, mask: [B, P], left padded), then decode; the generated ids of every row, up to
        the last token computed (rows that finished earlier hold pad_id after their stop token)."""
        # a graph is captured and replayed on the streams of the model's device, whichever device is current
        with torch.cuda.device(ids.device) if ids.device.type == "cuda" else contextlib.nullcontext():
            return self._run(model, ids, mask, what)

    def _run(self, model, ids: torch.Tensor, mask: torch.Tensor, what: str) -> list[list[int]]:
        self._start(model, ids, mask)
        done, checked = 1, 1
        while True:
            if done == self.max_new_tokens or done - checked >= STOP_CHECK_EVERY:
                all_finished, bad_at = torch.cat([self.finished.all().long()[None], self.bad_at]).tolist()
                checked = done
                if bad_at:
                    raise nonfinite_logits_error(what, f"at generated token {bad_at}")
                if all_finished or done == self.max_new_tokens:
                    break
            if self.graphs and self.graph is None and not self.graph_failed:
                done += self._capture(model, self.max_new_tokens - done)
            elif self.graph is not None:
                self.graph.replay()
                done += 1
            else:
                self._step(model)
                done += 1
        return self.tokens[:, :done].tolist()

    def _forward(self, model, input_ids, attention_mask, position_ids, **kwargs):
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                     **{self.cache_arg: self.cache}, **kwargs)

    def _start(self, model, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Reset the state in place (a captured graph keeps reading the same tensors), prefill, pick token 1."""
        batch_size, prompt_len = ids.shape
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # [B, P]
        self.tokens.fill_(self.pad_id)
        self.finished.zero_()
        self.count.zero_()
        self.bad_at.zero_()
        self.position.copy_(positions[:, -1:])
        if self.static:
            self.cache.reset()  # zeros: a stale NaN in a masked slot would still reach the output (0 * NaN)
            real = mask.bool()  # [B, P]
            self.mask.fill_(self.ignore)
            self.mask[:, 0, 0, :prompt_len].masked_fill_(real, self.attend)
            self.write_at.fill_(prompt_len)
            # prompt token i sees the real tokens up to i; a left-pad token sees itself (a row of nothing but
            # masked keys would give NaN, and its key/value is never seen by a real token anyway)
            causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=ids.device).tril()
            allowed = (causal & real[:, None, :]) | torch.eye(prompt_len, dtype=torch.bool, device=ids.device)
            prefill_mask = torch.full((batch_size, 1, prompt_len, self.cache_len), self.ignore,
                                      dtype=self.mask.dtype, device=ids.device)  # [B, 1, P, L]
            prefill_mask[:, 0, :, :prompt_len].masked_fill_(allowed, self.attend)
            out = self._forward(model, ids, prefill_mask, positions, logits_to_keep=1)
        else:
            self.cache = None
            # grown by slicing: the mask of the prompt and every token generated so far
            self.mask = torch.cat([mask, mask.new_ones(batch_size, self.max_new_tokens)], dim=1)
            self.mask_len = prompt_len
            out = self._forward(model, ids, mask, positions, logits_to_keep=1)
            self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        self._pick(out.logits)

    def _step(self, model) -> None:
        """The forward of the newest token, then `_pick`: the unit a CUDA graph captures."""
        if self.static:
            out = self._forward(model, self.token, self.mask, self.position)
        else:
            self.mask_len += 1
            out = self._forward(model, self.token, self.mask[:, :self.mask_len], self.position)
            self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        self._pick(out.logits)

    def _pick(self, logits: torch.Tensor) -> None:
        """Draw the next token from the last position's logits [B, 1 or more, rows] and update the state."""
        logits = logits[:, -1, :self.vocab].float()  # [B, V]
        self.count += 1
        # NaN/inf in a row still writing (amax propagates NaN); the first such token is kept for the error
        bad = ~(torch.isfinite(logits.amax(-1)) | self.finished).all()
        self.bad_at.copy_(torch.where(bad & (self.bad_at == 0), self.count, self.bad_at))
        token = torch.where(self.finished, self.pad_id, draw_tokens(logits, self.temperature, self.top_p))
        self.tokens.index_copy_(1, self.count - 1, token[:, None])
        self.finished |= (token[:, None] == self.stops).any(-1)
        self.token.copy_(token[:, None])
        self.position += 1
        if self.static:  # the next forward writes its key/value at write_at: let every row attend to it
            self.mask.index_fill_(-1, self.write_at, self.attend)
            self.write_at += 1

    def _capture(self, model, steps_left: int) -> int:
        """Run _GRAPH_WARMUP eager steps (real ones) on a side stream, then capture `_step` as a CUDA graph.
        Returns the steps run. A model whose step cannot be captured (a host sync inside its forward, e.g. dynamic
        RoPE) keeps decoding eagerly, with one warning."""
        warmup = min(_GRAPH_WARMUP, steps_left)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._step(model)
        torch.cuda.current_stream().wait_stream(stream)
        if warmup < _GRAPH_WARMUP:  # too few steps left to be worth a capture; the next call captures
            return warmup
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step(model)
        except Exception as error:  # noqa: BLE001 - any failure to capture leaves the eager loop, still correct
            self.graph_failed = True
            print(f"warning: decoding without a CUDA graph ({type(error).__name__}: {str(error)[:200]}); "
                  "generation is correct but slower")
            return warmup
        self.graph = graph
        return warmup


# "by_model": the last `_Decoder` each model used on CUDA, with its captured step (on-policy steps and eval batches
# call `generate` with the same shapes again and again); weak keys, so a model's graph and cache go with it.
_DECODERS: dict = {}


def answer_problems(model, tokenizer, problems: list[dict], *, system_prompt: str, max_new_tokens: int,
                    batch_size: int, desc: str = "answer", what: str = "the model") -> list[str]:
    """Greedy replies to each problem's `prompt`, rendered with this tokenizer's own chat template (the same way
    generate_data.py renders prompts), decoded without special tokens. Used by eval.py and held-out evaluation
    during training. `what` names the model when its logits are not finite."""
    from tqdm.auto import tqdm

    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    stop_ids = end_of_turn_ids(tokenizer)
    texts = []
    for lo in tqdm(range(0, len(problems), batch_size), desc=desc, leave=False):
        prompts = [tokenizer(render_chat(tokenizer, [*system, {"role": "user", "content": p["prompt"]}],
                                         add_generation_prompt=True), add_special_tokens=False)["input_ids"]
                   for p in problems[lo:lo + batch_size]]
        for result in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                               what=what):
            tokens = result["tokens"][:-1] if result["finished"] else result["tokens"]
            texts.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return texts


class VLLMSampler:
    """Optional vLLM backend for `generate` (--vllm): same inputs and outputs, at serving speed on a GPU.

    Used by generate_data.py (a fixed teacher) and on_policy.py (the student, whose new weights are pushed in with
    `load_weights` before every on-policy step). It runs vLLM in this process (V1 engine without its
    multiprocessing), tensor parallel size 1, next to the training model on the same GPU.
    """

    def __init__(self, model: str, *, dtype: str = "auto", gpu_memory_utilization: float = 0.3, seed: int = 0,
                 trust_remote_code: bool = False):
        try:
            import vllm
        except ImportError:
            raise DistillError("--vllm needs the vllm package (pip install vllm) and a CUDA GPU") from None
        if not torch.cuda.is_available():
            raise DistillError("--vllm needs a CUDA GPU; drop --vllm to sample with transformers")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keeps the engine reachable for weight sync
        self.vllm = vllm
        self.llm = vllm.LLM(model=model, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                            trust_remote_code=trust_remote_code, tensor_parallel_size=1)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop_ids: list[int]) -> list[dict]:
        from vllm.inputs import TokensPrompt

        params = self.vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                          top_p=top_p if temperature > 0 else 1.0, stop_token_ids=stop_ids,
                                          detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        stops, results = set(stop_ids), []
        for out in outputs:
            tokens = list(out.outputs[0].token_ids)
            end = next((i for i, tok in enumerate(tokens) if tok in stops), None)
            results.append({"tokens": tokens[:end + 1] if end is not None else tokens, "finished": end is not None})
        return results

    def load_weights(self, model) -> None:
        """Copy a (possibly peft-wrapped) Hugging Face model's current weights into the vLLM engine."""
        if hasattr(model, "merge_and_unload"):
            raise DistillError("--vllm with --lora is not supported: the adapter would have to be merged each step")
        engine = self.llm.llm_engine
        for path in ("model_executor.driver_worker.worker.model_runner.model",
                     "model_executor.driver_worker.model_runner.model",
                     "engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model"):
            target = engine
            for name in path.split("."):
                target = getattr(target, name, None)
                if target is None:
                    break
            if target is not None and hasattr(target, "load_weights"):
                target.load_weights(weights=((n, p.detach()) for n, p in model.state_dict().items()))
                return
        raise DistillError("this vLLM version does not expose the model for in-process weight loading; "
                           "use on_policy.py without --vllm")
