"""The ground floor of the distill scripts: what every script reads its data and flags with.

1. errors and flags        - `DistillError`, `run_main`, `add_train_args` (in --help's groups),
                             `add_divergence_args`, `bounded`
2. data                    - `read_jsonl`, `load_prompt_dataset`, `load_distill_rows`
3. chat templates, masks   - `render_chat`, `encode_chat`, `encode_rows`, `end_of_turn_ids`, `pad_batch`,
                             `shift_for_next_token`
4. the divergence          - `generalized_jsd_per_position` (on logits, per position); the chunked training loss
                             built on the same formula is losses.py's `fused_head_loss`

The floors above it, each importing only those below: models.py (loading, LoRA, hidden states), losses.py (the
chunked loss), checks.py (teacher/student checks, the pre-flight), generation.py (decoding, answer scoring),
checkpoints.py (run folders, checkpoint files, --resume's comparison), training.py (TrainLoop, held-out
evaluation). common.py imports none of them.

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


def add_model_args(parser) -> None:
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
                   teacher_default: str | None = None, lr: float = 1e-5):
    """The flags every training script shares (the conventions later scripts rely on), in --help's groups; returns
    the group where the script adds the flags of its method.

    output_dir: the default --output-dir, a template filled from the parsed flags ("runs/token_level-{kl}");
    the script calls `fill_train_defaults` after parsing.
    """
    models = parser.add_argument_group("models")
    data = parser.add_argument_group("data")
    optimization = parser.add_argument_group("optimization")
    method = parser.add_argument_group("the method")
    evaluation = parser.add_argument_group("held-out evaluation")
    output = parser.add_argument_group("checkpoints and output")
    add_model_args(models)
    models.add_argument("--student", default=student_default, help="student model: hub id or local folder")
    if teacher:
        models.add_argument("--teacher", default=teacher_default, help="teacher model: hub id or local folder")
        models.add_argument("--teacher-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                            help="dtype for the frozen teacher (default: same as --dtype)")
    else:
        models.add_argument("--teacher", default=None,
                            help="the teacher that wrote --data; only recorded in run_config.json (never loaded)")
    data.add_argument("--data", default=None,
                      help="JSONL written by generate_data.py (messages + completion); default: the file "
                           f"generate_data.py writes for --teacher ({DEFAULT_DATA} for {BLOG_TEACHER}, "
                           "data/teacher_<name>.jsonl for another, see default_data_path)")
    output.add_argument("--output-dir", default=output_dir, help="where the trained model and metrics.jsonl go "
                                                              f"(default: {output_dir.format_map(_Shown())})")
    optimization.add_argument("--max-steps", type=bounded(int, 1, note=" (leave it out to train for --epochs)"),
                              default=None, help="optimizer steps to run (overrides --epochs; unset = --epochs)")
    optimization.add_argument("--epochs", type=bounded(float, 0, low_open=True), default=1.0,
                              help="passes over the data when --max-steps is unset (fractions allowed)")
    optimization.add_argument("--batch-size", type=POSITIVE_INT, default=4,
                              help="sequences per micro-batch per process")
    optimization.add_argument("--grad-accum", type=POSITIVE_INT, default=1,
                              help="micro-batches accumulated per optimizer step")
    optimization.add_argument("--lr", type=NON_NEGATIVE, default=lr, help="peak learning rate (AdamW)")
    optimization.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0, help="AdamW weight decay")
    optimization.add_argument("--warmup-ratio", type=FRACTION, default=0.03,
                              help="fraction of steps of linear warmup (0..1)")
    optimization.add_argument("--max-grad-norm", type=bounded(float, 0, note=" (0 = off)"), default=1.0,
                              help="clip the global gradient norm (0 = off)")
    data.add_argument("--max-length", type=bounded(int, 2), default=1024,
                      help="max tokens of prompt + completion; longer rows are skipped and counted")
    data.add_argument("--allow-duplicates", action="store_true",
                      help="train every --data row even when rows repeat (the same id, or the same prompt and "
                           "completion); by default a repeat is trained once and the repeats are reported")
    data.add_argument("--truncated", default="no-eos", choices=["no-eos", "skip"],
                      help="rows generate_data.py cut at --max-new-tokens (finish_reason 'length'): 'no-eos' "
                           "trains on their text without the end-of-turn token, so the student never learns to "
                           "stop mid-answer (what TRL and most SFT do with a cut sequence); 'skip' leaves them "
                           "out, losing the longest answers. Counted in the end-of-run report either way")
    models.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the student (GPU)")
    models.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute the student's activations in backward to save memory")
    optimization.add_argument("--chunk-size", type=bounded(int, 0, note=" (0 = automatic)"), default=0,
                              help="positions per chunk when projecting hidden states to the vocabulary in the loss "
                                   "(0 = automatic: ~128 MB per [chunk, vocab] float32 buffer)")
    output.add_argument("--log-every", type=POSITIVE_INT, default=1, help="print a metrics line every N steps")
    output.add_argument("--report-to", default="none", choices=["none", "tensorboard", "wandb"],
                        help="also send each step's metrics to this tracker through accelerate (metrics.jsonl is "
                             "always written); tensorboard logs go to OUTPUT_DIR/runs")
    output.add_argument("--save-every", type=bounded(int, 0, note=" (0 = never)"), default=0,
                        help="write a resumable checkpoint (weights, optimizer, schedule, RNG, data position) "
                             "every N optimizer steps to OUTPUT_DIR/checkpoint-N (0 = never)")
    output.add_argument("--resume", default=None,
                        help="continue from a checkpoint folder, or from the latest complete checkpoint in a folder; "
                             "refused if the data, models or loss differ from the checkpoint's run")
    output.add_argument("--overwrite", action="store_true",
                        help="clear a non-empty --output-dir holding an earlier run first (without it, or --resume, "
                             "a non-empty --output-dir is refused)")
    output.add_argument("--save-total-limit", type=bounded(int, 0, note=" (0 = keep all)"), default=0, metavar="N",
                        help="keep only the newest N checkpoints of --save-every, deleting older ones (0 = keep all)")
    evaluation.add_argument("--eval-data", default=None,
                            help="held-out JSONL in --data's format (messages + completion): every --eval-every steps "
                                 "log eval_loss (this script's training objective on it), eval_ce and the script's "
                                 "other eval_* terms")
    evaluation.add_argument("--eval-every", type=bounded(int, 0, note=" (0 = never)"), default=0,
                            help="evaluate on --eval-data/--eval-problems every N optimizer steps and after the last "
                                 "(0 = never); eval_* keys join that step's metrics.jsonl row")
    evaluation.add_argument("--eval-problems", default=None,
                            help="held-out problems (.jsonl with question/answer, like GSM8K): also log "
                                 "eval_exact_match, the strict score of the student's greedy answers")
    evaluation.add_argument("--eval-max-new-tokens", type=POSITIVE_INT, default=256,
                            help="max tokens per greedy answer to --eval-problems")
    evaluation.add_argument("--eval-batch-size", type=POSITIVE_INT, default=None,
                            help="rows per held-out forward and prompts per generate call (default: --batch-size)")
    evaluation.add_argument("--eval-system-prompt", default=None,
                            help="system message for --eval-problems ('' for none; default: the system message of the "
                                 "first --data row, so problems are asked as the data was generated, else the "
                                 "generate_data.py default)")
    evaluation.add_argument("--save-best", default=None, metavar="METRIC",
                            help=f"keep the model of the best evaluation in OUTPUT_DIR/best, with best.json naming its "
                                 f"step and value; METRIC is an eval_* key this run logs "
                                 f"({', '.join(HIGHER_IS_BETTER)} "
                                 "higher is better, every other one (eval_loss, eval_ce, eval_kl, ...) lower)")
    models.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights (peft)")
    models.add_argument("--lora-r", type=POSITIVE_INT, default=16, help="LoRA rank")
    models.add_argument("--lora-alpha", type=POSITIVE_INT, default=32,
                        help="LoRA scaling alpha (the update is scaled by alpha / r)")
    models.add_argument("--lora-dropout", type=bounded(float, 0, 1, high_open=True), default=0.05,
                        help="LoRA dropout probability")
    models.add_argument("--lora-target-modules", default="all-linear",
                        help="comma-separated module names for LoRA, or 'all-linear'")
    return method


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
    if args.output_dir == parser.get_default("output_dir"):  # the template add_train_args was given
        args.output_dir = args.output_dir.format(**vars(args))
    fill_default_data(args)


# --save-best: these held-out metrics improve upwards; every other eval_* key is a loss or a divergence.
# --kl names the divergence D of token_level.py and on_policy.py; --beta only weighs the JSD.
HIGHER_IS_BETTER = ("eval_exact_match",)  # --save-best: the eval_* metrics where higher is better


KL_BETA = {"forward": 0.0, "reverse": 1.0}
DEFAULT_JSD_BETA = 0.5


def add_divergence_args(parser, *, default: str, bare_beta_alias: bool = False) -> None:
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
# 2. data


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
# 3. chat templates and the assistant mask


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    """Render messages with the tokenizer's own chat template.

    Templates without a system role (Gemma, Mistral v0.1) raise on one; we then fold the system prompt into the
    first user turn, which is what those models' authors recommend.
    """
    import jinja2

    name = getattr(tokenizer, "name_or_path", "?")  # the path or hub id the user passed
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"'{name}' has no chat template (a base model?): use an Instruct/chat checkpoint, or save a copy "
            f"with one to a new folder (tokenizer.chat_template = ...; model and tokenizer .save_pretrained(NEW)) "
            f"and pass NEW instead")
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
    raise DistillError(f"the chat template of '{name}' rejects these messages (roles: {roles}): {error}")


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
# 4. the divergence
#
# `generalized_jsd_per_position` is the divergence on logits, one value per position (what the checks and the
# figures read). Training uses `fused_head_loss`, which computes the same numbers from hidden states chunk by chunk
# so that [tokens, vocab] logits never exist for a whole batch; tests/reference.py holds the materialized
# references it is checked against.


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
