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
import json
import math
import os
import sys
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
    """Run a script's `main()`, turning `DistillError` into one clear message and exit status 2 (or the error's
    `exit_status`: 128 + the signal for a run a signal stopped, see checkpoints.Preempted)."""
    try:
        main()
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_status", 2))


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
    parser.add_argument("--allow-duplicates", action="store_true",
                        help="train every --data row even when rows repeat (the same id, or the same prompt and "
                             "completion); by default a repeat is trained once and the repeats are reported")
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
# --kl names the divergence D of token_level.py and on_policy.py; --beta only weighs the JSD.
HIGHER_IS_BETTER = ("eval_exact_match",)  # --save-best: the eval_* metrics where higher is better


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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_source(name: str, what: str, *, model: bool = False) -> None:
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
        check_source(name, "--dataset")
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


def load_distill_rows(path: str | Path, *, what: str = "--data", allow_duplicates: bool = False) -> list[dict]:
    """Rows of a generate_data.py JSONL, validated: each needs `messages` (a list of {"role", "content"} with text
    in both) and `completion` (str). Rows with an empty completion are skipped and counted: they would train
    nothing but the end-of-turn token. A row repeating an earlier one (`drop_duplicates`) is left out and
    reported, unless `allow_duplicates` (--allow-duplicates)."""
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
    return rows if allow_duplicates else drop_duplicates(rows, f"{what} {path}")


def drop_duplicates(rows: list[dict], where: str) -> list[dict]:
    """`rows` without the repeats of an earlier row: the same id, or the same prompt and completion (two
    generate_data.py outputs concatenated; a row trained twice weighs double, and a repeated id makes a
    --teacher-cache entry ambiguous). The count and the first ids are printed."""
    seen_ids, seen_content, kept, repeats = set(), set(), [], []
    for row in rows:
        content = row_fingerprint(row)
        if (row.get("id") is not None and row["id"] in seen_ids) or content in seen_content:
            repeats.append(str(row.get("id")))
            continue
        seen_ids.add(row.get("id"))
        seen_content.add(content)
        kept.append(row)
    if repeats and is_main_process():
        shown = ", ".join(repeats[:5]) + (", ..." if len(repeats) > 5 else "")
        print(f"{where}: {len(repeats)} of {len(rows)} rows repeat an earlier row (the same id, or the same prompt "
              f"and completion; ids {shown}): each is kept once (--allow-duplicates keeps every row)")
    return kept


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


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
