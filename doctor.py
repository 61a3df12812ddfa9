r"""Check a teacher/student pair and its data before training: one line per check, OK / WARN / FAIL, exit status 1
on any FAIL. The run "working" is not enough: a pad token equal to EOS, padded head rows, a template that renders
differently at training and at inference, or a vocabulary that differs in a few ids each train the wrong thing
without an error.

    # the blog's pair on its data (every flag at its default, as token_level.py would run)
    python doctor.py

    # your pair on the first 8 rows of your data, a batch of 4 at --max-length 1024, a bf16 teacher, and a
    # 3-step timing of the real training step
    python doctor.py --teacher ./my_teacher --student ./my_student --data data/mine.jsonl \
        --teacher-dtype bfloat16 --time

    # with the teacher cache token_level.py would read: fingerprints, coverage, cached-vs-live divergence gap
    python doctor.py --teacher-cache data/teacher.top64

What it checks, in order (the shared checks are common.py's section 6 functions, which the training scripts'
pre-flight calls too):
- tokenizers: same vocabulary or not, which script applies (token_level.py / on_policy.py, or cross_tokenizer.py),
  each head's rows against its tokenizer (padding rows and how they are handled), BOS/EOS/pad, pad == eos;
- templates: the first data row rendered by each model's template with the loss mask shown on the text ([trained]
  tokens, or green on a terminal), the end-of-turn token inside it, and the generation prompt generate_data.py and
  eval.py render being exactly the prefix the training text starts with;
- the first batch (same vocabulary): finite logits, the teacher's KL with itself = 0 (and the student's with the
  teacher when they are one model), teacher-student divergence and top-1 agreement (what the pre-flight prints),
  the chunked fused loss and its gradients against a float64 reference materialized from the formula;
  (different vocabularies) the alignment cross_tokenizer.py trains on, the tokens both vocabularies hold (their
  share of each vocabulary and of each model's probability mass) and finite logits;
- cost: an estimate of peak memory for --batch-size x --max-length (weights, gradients, AdamW states,
  activations, loss buffers) and, with --time, three timed training steps (with the measured peak on a GPU);
- with --teacher-cache: fingerprints against --teacher and the student, the rows of --data it covers, and on the
  first batch the divergence token_level.py would train on from the cache (top-K + tail, the sampled estimate, or
  the hidden states' logits) against the one from the live teacher.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import textwrap
import time
from pathlib import Path

import torch

import cache_teacher
import checks
import common
import cross_tokenizer
import losses
import models

# The fused loss against its float64 reference: relative error allowed, by the student's dtype. float32 differs
# only by summation order; bf16/fp16 heads round each logit to their dtype before the float32 softmax math.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 3e-2, torch.float16: 1e-2}
REFERENCE_TOKENS = 256  # positions of the first batch the float64 reference materializes ([N, vocab] float64)
ALIGNMENT_WARN = 0.5  # cross_tokenizer.py's --min-exact-alignment default
CACHE_GAP_WARN = 0.10  # |cached - live divergence| above this share of the live one (+ 0.01) is a WARN
CACHE_DRIFT_WARN = 0.05  # cached vs live teacher log-probabilities; float16 storage rounds by < 0.016 above -32
CACHE_SAMPLING_Z = 4.0  # a sampled cache's gap beyond this many standard errors is not sampling noise
COLORS = {"OK": "32", "WARN": "33", "FAIL": "31", "INFO": "36", "SKIP": "2"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(parser)
    parser.add_argument("--teacher", default=common.BLOG_TEACHER, help="teacher model: hub id or local folder")
    parser.add_argument("--student", default=common.BLOG_STUDENT, help="student model: hub id or local folder")
    parser.add_argument("--teacher-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype for the frozen teacher (default: same as --dtype)")
    parser.add_argument("--data", default=None,
                        help="JSONL written by generate_data.py (messages + completion); default: the file "
                             f"generate_data.py writes for --teacher ({common.DEFAULT_DATA} for {common.BLOG_TEACHER})")
    parser.add_argument("--teacher-cache", default=None,
                        help="a cache_teacher.py folder to check against --teacher, the student and --data")
    parser.add_argument("--rows", type=common.POSITIVE_INT, default=8,
                        help="first rows of --data to encode (the first batch is taken from them)")
    parser.add_argument("--batch-size", type=common.POSITIVE_INT, default=4,
                        help="sequences in the first batch and in the memory estimate (as the training run's)")
    parser.add_argument("--max-length", type=common.bounded(int, 2), default=1024,
                        help="max tokens of prompt + completion: longer rows are skipped; the memory estimate "
                             "assumes every sequence this long")
    common.add_divergence_args(parser, default="forward")
    parser.add_argument("--temperature", type=common.bounded(float, 0, low_open=True), default=2.0,
                        help="softmax temperature of the divergence (as token_level.py's)")
    parser.add_argument("--alpha", type=common.FRACTION, default=0.1,
                        help="weight of the cross-entropy term in the checked loss (as token_level.py's)")
    parser.add_argument("--chunk-size", type=common.bounded(int, 0, note=" (0 = automatic)"), default=0,
                        help="positions per chunk of the fused loss (0 = automatic, as in training)")
    parser.add_argument("--bf16", action="store_true",
                        help="estimate activations in bfloat16 (training's --bf16 autocast), and time with it")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="estimate activations as training's --gradient-checkpointing keeps them")
    parser.add_argument("--time", action="store_true",
                        help="also time 3 training steps on the first batch (AdamW at lr 0: nothing changes)")
    parser.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                        help="colour the report and the loss mask (auto: when printing to a terminal; otherwise "
                             "trained tokens are shown in [brackets])")
    args = parser.parse_args(argv)
    common.resolve_divergence(args, default="forward")
    common.fill_default_data(args)
    return args


class Report(list):
    """The checks so far, each printed as it is added."""

    def __init__(self, color: bool):
        super().__init__()
        self.color = color

    def section(self, title: str) -> None:
        print(f"\n{title}", flush=True)

    def add(self, *found: checks.Check) -> None:
        for check in found:
            self.append(check)
            status = f"{check.status:<4}"
            if self.color:
                status = f"\x1b[{COLORS.get(check.status, '0')}m{status}\x1b[0m"
            print(f"{status}  {check.topic:<10} {check.message}", flush=True)
            if check.detail:
                print(textwrap.indent(check.detail.rstrip(), " " * 8, lambda line: True), flush=True)


def main(argv=None) -> Report:
    args = parse_args(argv)
    report = run_checks(args)
    fails, warns = (sum(c.status == s for c in report) for s in ("FAIL", "WARN"))
    print(f"\n{fails} FAIL, {warns} WARN, {sum(c.status == 'OK' for c in report)} OK")
    if fails:
        sys.exit(1)
    return report


def run_checks(args) -> Report:
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    report = Report(color)
    models.seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = common.load_distill_rows(args.data)
    first = rows[:args.rows]
    # Loaded as the training scripts load them: the student on the CPU in --dtype ('auto' = float32), then moved.
    student, tokenizer = models.load_model(args.student, dtype=args.dtype, what="--student",
                                           trust_remote_code=args.trust_remote_code)
    student = student.to(device)
    teacher, teacher_tokenizer = models.load_teacher(args, device)

    report.section(f"tokenizers: --student {args.student}, --teacher {args.teacher}")
    vocab = check_tokenizers(report, first, student, tokenizer, teacher, teacher_tokenizer)
    report.section(f"templates: --data {args.data}, row 1 (id={first[0].get('id')})")
    template_ok = check_templates(report, first, tokenizer, teacher_tokenizer, vocab, color)
    if template_ok:
        check_unknown_targets(report, args, first, tokenizer)
    report.section(f"first batch: the first {args.batch_size} of the first {len(first)} rows")
    batch = examples = None
    try:
        if not template_ok:
            report.add(checks.Check("SKIP", "numbers", "the loss mask above cannot be built"))
        elif vocab is None:
            check_cross_tokenizer(report, args, first, student, tokenizer, teacher, teacher_tokenizer)
        else:
            batch, examples = first_batch(args, first, tokenizer)
            check_first_batch(report, args, student, teacher, batch, vocab)
    except common.DistillError as err:  # e.g. every first row longer than --max-length
        report.add(checks.Check("FAIL", "numbers", str(err)))
    report.section("cost")
    report.add(memory_estimate(args, student, teacher, vocab or len(tokenizer)))
    if args.time:
        report.add(time_steps(args, student, teacher, batch, vocab) if batch is not None else
                   checks.Check("SKIP", "time", "times token_level.py's step on the first batch: needs one "
                                "vocabulary and a loss mask"))
    if args.teacher_cache:
        report.section(f"teacher cache: {args.teacher_cache}")
        check_cache(report, args, rows, (student, tokenizer), (teacher, teacher_tokenizer), vocab, batch, examples)
    return report


# -- tokenizers and templates ---------------------------------------------------------------------------------

def check_tokenizers(report: Report, rows: list[dict], student, tokenizer, teacher, teacher_tokenizer) -> int | None:
    rows_s, rows_t = (models.output_head(m).weight.shape[0] for m in (student, teacher))
    vocab, found = checks.vocabulary_checks(tokenizer, teacher_tokenizer, rows_s, rows_t)
    report.add(*found)
    if vocab is None:
        report.add(checks.Check("INFO", "scripts", "different vocabularies: cross_tokenizer.py applies "
                                "(token_level.py, on_policy.py and a top-K --teacher-cache need one vocabulary)"))
    row = next((r for r in rows if not common.is_cut(r)), rows[0])
    for who, tok in (("student", tokenizer), ("teacher", teacher_tokenizer)):
        try:
            example = common.encode_chat(tok, row["messages"], row["completion"])
        except common.DistillError:
            example = None  # the template check below reports it
        report.add(checks.special_tokens_check(tok, who, example))
    return vocab


def check_templates(report: Report, rows: list[dict], tokenizer, teacher_tokenizer, vocab: int | None,
                    color: bool) -> bool:
    """Each model's template on the first uncut row (the token-level scripts render both models' input with the
    student's; the teacher's is what generate_data.py prompted it with, and what cross_tokenizer.py feeds it)."""
    row = next((r for r in rows if not common.is_cut(r)), None)
    if row is None:
        report.add(checks.Check("WARN", "mask", f"all {len(rows)} first rows were cut at --max-new-tokens: none ends "
                                "with an end-of-turn token to show"))
        row = rows[0]
    ok = True  # whether the training text can be encoded: the student's template, and the teacher's too when
    for who, tok in (("student", tokenizer), ("teacher", teacher_tokenizer)):  # it reads its own (cross_tokenizer)
        found, _ = checks.loss_mask_checks(tok, row, who, color=color)
        report.add(*found)
        if who == "student" or vocab is None:
            ok = ok and all(c.status != "FAIL" for c in found)
    if vocab is not None and ok:
        # a teacher template that cannot close a turn raises here: its mask check above said so
        with contextlib.suppress(common.DistillError):
            report.add(checks.template_match_check(tokenizer, teacher_tokenizer))
    generation = row.get("generation") or {}
    if "temperature" in generation:
        report.add(checks.Check("INFO", "temperature", f"the data was sampled at temperature "
                                f"{generation['temperature']:g} (generate_data.py); the loss's --temperature is "
                                "separate and applies to both models' logits alike"))
    return ok


def check_unknown_targets(report: Report, args, rows: list[dict], tokenizer) -> None:
    """The training scripts' unknown-token check (`checks.unknown_targets_check`) on the first rows: how many of
    their completion tokens the student's tokenizer maps to its unknown token, and which characters."""
    try:
        examples, _ = common.encode_rows(rows, tokenizer, args.max_length, truncated="no-eos")
    except common.DistillError:
        return  # every row too long: the first batch's check says so
    report.add(checks.unknown_targets_check(tokenizer, rows, examples))


# -- the first batch -----------------------------------------------------------------------------------------

def first_batch(args, rows: list[dict], tokenizer) -> tuple[dict, list[dict]]:
    """The first --batch-size rows as training encodes and pads them, and their encoded examples."""
    examples, _ = common.encode_rows(rows, tokenizer, args.max_length, truncated="no-eos")
    examples = examples[:args.batch_size]
    return common.pad_batch(examples, tokenizer.pad_token_id), examples


def hidden_pair(student, teacher, batch: dict):
    """(student_hidden [N, H], teacher_hidden [N, H_t], targets [N]) on the batch's completion tokens, no grad."""
    device = models.output_head(student).weight.device
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        hidden = models.student_hidden_states(student, batch["input_ids"], batch["attention_mask"])
        student_hidden, targets = common.shift_for_next_token(hidden, batch)
        hidden = models.teacher_hidden_states(teacher, batch["input_ids"], batch["attention_mask"])
        teacher_hidden, _ = common.shift_for_next_token(hidden, batch)
    return student_hidden, teacher_hidden, targets


def check_first_batch(report: Report, args, student, teacher, batch: dict, vocab: int) -> None:
    beta, temperature = common.divergence_beta(args), args.temperature
    student_hidden, teacher_hidden, targets = hidden_pair(student, teacher, batch)
    head, teacher_head = models.output_head(student).weight.detach(), models.output_head(teacher).weight
    n = targets.shape[0]
    try:
        itself = checks.agreement(teacher_hidden, teacher_head, teacher_hidden, teacher_head, vocab=vocab,
                                  temperature=temperature, names=("--teacher", "--teacher"),
                                  where="on the first batch", dtype_flags=("--teacher-dtype", "--teacher-dtype"))
        stats = checks.agreement(student_hidden, head, teacher_hidden, teacher_head, vocab=vocab,
                                 temperature=temperature, beta=beta, chunk_size=args.chunk_size,
                                 names=("--student", "--teacher"), where="on the first batch",
                                 dtype_flags=("--dtype", "--teacher-dtype"))
    except common.DistillError as err:
        report.add(checks.Check("FAIL", "finite", str(err)))
        return
    report.add(checks.Check("OK", "finite", f"student and teacher logits are finite on the {n} completion tokens"))
    self_kl = itself["kl_sum"] / max(n, 1)
    report.add(checks.Check("OK" if abs(self_kl) < 1e-6 else "FAIL", "self-KL",
                            f"KL(teacher||teacher) at T={temperature:g} = {self_kl:.2e} (must be 0)"))
    kl, div, top1 = (stats[k] / max(n, 1) for k in ("kl_sum", "div_sum", "top1_sum"))
    if models.model_fingerprint(args.student) == models.model_fingerprint(args.teacher) and head.dtype == \
            teacher_head.dtype:  # one model read twice: the training and the inference forward must agree
        same = kl < 1e-5 and top1 == 1.0
        report.add(checks.Check("OK" if same else "FAIL", "same model", f"--student and --teacher are one model: "
                                f"KL = {kl:.2e}, top-1 agreement {top1:.1%} (must be 0 and 100%)"))
    minimized = "" if beta == 0 else f"{common.divergence_name(beta)} = {div:.4f}, "
    report.add(checks.Check("INFO", "agreement", f"{minimized}KL(teacher||student) at T={temperature:g} = {kl:.4f}, "
                            f"top-1 agreement {top1:.1%} (the pre-flight token_level.py prints)"))
    report.add(fused_loss_check(student_hidden, head, teacher_hidden, teacher_head, targets, vocab=vocab,
                                alpha=args.alpha, beta=beta, temperature=temperature, chunk_size=args.chunk_size))


def reference_loss(hidden, weight, teacher_logits, targets, *, vocab: int, alpha: float, beta: float,
                   temperature: float) -> torch.Tensor:
    """alpha * CE + (1 - alpha) * T^2 * D_beta(p, q), mean over positions, written out from the formula on
    materialized logits (every input is used in its given dtype: pass float64)."""
    logits, teacher_logits = hidden @ weight[:vocab].T, teacher_logits[:, :vocab]
    log_q = torch.log_softmax(logits / temperature, -1)  # student
    log_p = torch.log_softmax(teacher_logits / temperature, -1)  # teacher
    p, q = log_p.exp(), log_q.exp()
    if beta == 0:
        d = (p * (log_p - log_q)).sum(-1)
    elif beta == 1:
        d = (q * (log_q - log_p)).sum(-1)
    else:
        log_m = (beta * p + (1 - beta) * q).log()
        d = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    ce = -torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    return (alpha * ce + (1 - alpha) * temperature**2 * d).mean()


def fused_loss_check(student_hidden, head, teacher_hidden, teacher_head, targets, *, vocab: int, alpha: float,
                     beta: float, temperature: float, chunk_size: int) -> checks.Check:
    """losses.fused_head_loss and its gradients (hidden states, head) against `reference_loss` in float64, on the
    batch's first REFERENCE_TOKENS completion tokens. The tolerance follows the student head's dtype."""
    n = min(targets.shape[0], REFERENCE_TOKENS)
    inputs = [student_hidden[:n].detach().clone(), head.detach().clone()]
    teacher_hidden, targets = teacher_hidden[:n].clone(), targets[:n]
    fused = [x.clone().requires_grad_() for x in inputs]
    loss, _, _ = losses.fused_head_loss(*fused, targets, n, teacher_hidden=teacher_hidden,
                                        teacher_weight=teacher_head, alpha=alpha, beta=beta,
                                        temperature=temperature, chunk_size=chunk_size, vocab=vocab)
    loss.backward()
    exact = [x.double().requires_grad_() for x in inputs]
    # The teacher's logits as the loss receives them (a bf16 teacher's rounded to bf16): its input, not its math.
    teacher_logits = (teacher_hidden.to(teacher_head.dtype) @ teacher_head[:vocab].T).double()
    want = reference_loss(*exact, teacher_logits, targets, vocab=vocab, alpha=alpha, beta=beta,
                          temperature=temperature)
    want.backward()

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()

    errors = {"loss": rel(loss.detach(), want.detach()), "d/d hidden": rel(fused[0].grad, exact[0].grad),
              "d/d head": rel(fused[1].grad, exact[1].grad)}
    tolerance = TOLERANCE.get(head.dtype, 3e-2)
    bad = [name for name, e in errors.items() if not e <= tolerance]
    shown = ", ".join(f"{name} {e:.1e}" for name, e in errors.items())
    return checks.Check("FAIL" if bad else "OK", "fused loss",
                        f"chunked loss and gradients vs a float64 reference on {n} tokens: relative error {shown} "
                        f"({'above' if bad else 'within'} {tolerance:.0e} for {str(head.dtype).split('.')[-1]})")


def check_cross_tokenizer(report: Report, args, rows, student, tokenizer, teacher, teacher_tokenizer) -> None:
    """What applies to a pair with different vocabularies: the alignment cross_tokenizer.py would train on, and
    finite logits on both sides (each model on its own tokens)."""
    examples, _, alignment = cross_tokenizer.encode_pairs(rows, tokenizer, teacher_tokenizer, args.max_length)
    exact = alignment["exact_end_fraction"]
    report.add(checks.Check("OK" if exact >= ALIGNMENT_WARN else "WARN", "alignment",
                            f"{exact:.1%} of {alignment['student_tokens']} student completion tokens end where a "
                            f"teacher token ends (mean gap {alignment['mean_end_gap_chars']:.2f} characters)"))
    vocabs = [min(len(tok), models.output_head(model).weight.shape[0])
              for model, tok in ((student, tokenizer), (teacher, teacher_tokenizer))]
    match = cross_tokenizer.match_pair(tokenizer, teacher_tokenizer, *vocabs)
    report.add(checks.Check("INFO", "vocabulary match", (
        f"{cross_tokenizer.describe_match(match)}; {alignment['same_span_fraction']:.1%} of the student completion "
        "tokens cover exactly their teacher token's characters: cross_tokenizer.py --uld-match hybrid compares those "
        "by token identity on the matched tokens, the rest by sorted ULD")))
    masses = []
    for who, model, tok in (("--student", student, tokenizer), ("--teacher", teacher, teacher_tokenizer)):
        batch, _ = first_batch(args, rows, tok)
        device = models.output_head(model).weight.device
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            hidden = models.teacher_hidden_states(model, batch["input_ids"], batch["attention_mask"])
            hidden, _ = common.shift_for_next_token(hidden, batch)
            weight = models.output_head(model).weight[:len(tok)]
            chunk = args.chunk_size or losses.auto_chunk_size(len(tok))
            ids = (match.student_ids if who == "--student" else match.teacher_ids).to(weight.device)
            mass = 0.0
            try:
                for lo in range(0, hidden.shape[0], chunk):
                    logits = hidden[lo:lo + chunk] @ weight.T
                    common.check_finite_logits(logits, who, "on the first batch")
                    mass += float(logits.float().softmax(-1)[:, ids].sum())
            except common.DistillError as err:
                report.add(checks.Check("FAIL", "finite", str(err)))
                continue
            masses.append(f"the {who.strip('-')} {mass / max(hidden.shape[0], 1):.1%}")
        report.add(checks.Check("OK", "finite", f"{who}'s logits are finite on its first batch"))
    if masses:
        report.add(checks.Check("INFO", "matched mass", "mean probability (T=1) on the matched tokens over each "
                                f"model's own completion positions of the first batch: {', '.join(masses)}"))
    report.add(checks.Check("SKIP", "numbers", "teacher-student KL, top-1 agreement and the fused loss need one "
                            "vocabulary (cross_tokenizer.py compares the two by alignment)"))


# -- cost --------------------------------------------------------------------------------------------------------

def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def memory_estimate(args, student, teacher, vocab: int) -> checks.Check:
    """Peak memory of a training step, an estimate from counts (one process, full fine-tuning, torch AdamW):

    weights, gradients and 2 AdamW states (exp_avg, exp_avg_sq) in the student's dtype, no separate master copy
    (float32 weights are their own master); the teacher's weights; student activations kept for backward,
    batch * length * layers * (8 * hidden + 3 * intermediate) values in the compute dtype (q/k/v/o and norm inputs,
    the SwiGLU MLP's three intermediate tensors; SDPA/flash attention keeps no [T, T] matrix), or one hidden vector
    per layer plus one layer's set with --gradient-checkpointing; the teacher's forward (its output hidden states
    plus one layer's temporaries); the fused loss's [chunk, vocab] float32 buffers and its head-sized float32
    gradient (losses.fused_head_loss).
    """
    tokens = args.batch_size * args.max_length
    s_params = sum(p.numel() for p in student.parameters())
    s_bytes = next(student.parameters()).element_size()
    t_bytes = next(teacher.parameters()).element_size()
    s_cfg, t_cfg = student.config.get_text_config(), teacher.config.get_text_config()
    act_bytes = 2 if args.bf16 else s_bytes
    per_layer = 8 * s_cfg.hidden_size + 3 * s_cfg.intermediate_size
    if args.gradient_checkpointing:
        activations = tokens * (s_cfg.num_hidden_layers * s_cfg.hidden_size + per_layer) * act_bytes
    else:
        activations = tokens * s_cfg.num_hidden_layers * per_layer * act_bytes
    teacher_forward = tokens * (2 * t_cfg.hidden_size + 3 * t_cfg.intermediate_size) * t_bytes
    chunk = min(args.chunk_size or losses.auto_chunk_size(vocab), tokens)
    beta = common.divergence_beta(args)
    # the buffer count fused_head_loss allocates (its private helper: one definition of it)
    buffers = 1 + (args.alpha < 1) + losses._spare_buffers(args.alpha, beta)
    head_rows, hidden = models.output_head(student).weight.shape
    parts = {
        "student weights": s_params * s_bytes,
        "gradients": s_params * s_bytes,
        "AdamW states (2 per weight)": 2 * s_params * s_bytes,
        "teacher weights": sum(p.numel() * p.element_size() for p in teacher.parameters()),
        "student activations": activations,
        "teacher forward": teacher_forward,
        f"loss buffers ({buffers} x [{chunk}, {vocab}] fp32 + grads)": (buffers * chunk * vocab + tokens * hidden
                                                                        + head_rows * hidden) * 4,
    }
    total = sum(parts.values())
    detail = "\n".join(f"{name:<44} {gib(value):>12}" for name, value in parts.items())
    return checks.Check("INFO", "memory", f"~{gib(total)} peak for batch {args.batch_size} x {args.max_length} "
                        f"tokens (an estimate: {s_params / 1e6:.1f}M student parameters in "
                        f"{str(next(student.parameters()).dtype).split('.')[-1]}; no CUDA context, allocator slack "
                        "or DDP buffers)", detail=detail)


def time_steps(args, student, teacher, batch: dict, vocab: int, steps: int = 3) -> checks.Check:
    """Three full training steps on the first batch (teacher forward, student forward, fused loss, backward,
    AdamW at lr 0), timed; with the peak memory measured on a GPU."""
    device = models.output_head(student).weight.device
    batch = {k: v.to(device) for k, v in batch.items()}
    teacher_head = models.output_head(teacher).weight
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    student.train()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            teacher_hidden = models.teacher_hidden_states(teacher, batch["input_ids"], batch["attention_mask"])
            teacher_hidden, _ = common.shift_for_next_token(teacher_hidden, batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            hidden = models.student_hidden_states(student, batch["input_ids"], batch["attention_mask"])
        student_hidden, targets = common.shift_for_next_token(hidden, batch)
        loss, _, _ = losses.fused_head_loss(student_hidden, models.output_head(student).weight, targets,
                                            targets.shape[0], teacher_hidden=teacher_hidden.clone(),
                                            teacher_weight=teacher_head, alpha=args.alpha,
                                            beta=common.divergence_beta(args), temperature=args.temperature,
                                            chunk_size=args.chunk_size, vocab=vocab,
                                            compute_dtype=torch.bfloat16 if args.bf16 else None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    student.eval()
    del optimizer
    peak = f", measured peak {gib(torch.cuda.max_memory_allocated(device))}" if device.type == "cuda" else ""
    shape = tuple(batch["input_ids"].shape)
    return checks.Check("INFO", "time", f"{steps} steps on the first batch {shape}: "
                        f"{', '.join(f'{t:.2f}s' for t in times)} (the first includes warm-up){peak}")


# -- the teacher cache -------------------------------------------------------------------------------------------

def check_cache(report: Report, args, rows, student_pair, teacher_pair, vocab, batch, examples) -> None:
    """A cache_teacher.py folder against --teacher, the student and --data; the gap on the first batch."""
    (student, tokenizer), (teacher, teacher_tokenizer) = student_pair, teacher_pair
    folder = args.teacher_cache
    try:
        manifest = cache_teacher.read_manifest(folder)
    except common.DistillError as err:
        report.add(checks.Check("FAIL", "cache", str(err)))
        return
    expected = [
        ("teacher_fingerprint", models.model_fingerprint(args.teacher), "FAIL",
         f"written by teacher '{manifest.get('teacher')}' with other weights or tokenizer than --teacher"),
        ("vocab_fingerprint", cache_teacher.vocab_fingerprint(teacher_tokenizer), "FAIL",
         "written with another vocabulary than --teacher's"),
        ("template_fingerprint", common.fingerprint(tokenizer.chat_template or ""), "WARN",
         "scored with another chat template than the student's: rows whose tokens differ are skipped"),
    ]
    for key, mine, status, problem in expected:
        if key == "template_fingerprint" and vocab is None:
            continue  # cross_tokenizer.py reads the teacher's own tokens and offsets from the cache
        same = manifest.get(key) == mine
        report.add(checks.Check("OK" if same else status, "cache",
                                f"{key.replace('_', ' ')} matches" if same else problem))
    if not manifest.get("complete"):
        report.add(checks.Check("WARN", "cache", "incomplete (cache_teacher.py was interrupted; re-run it to "
                                "finish)"))
    try:
        cached = {row_id: fp for row_id, _, _, fp in cache_teacher.cached_rows(Path(folder))}
    except Exception as err:  # noqa: BLE001 (a layout this doctor does not know: say so rather than guess)
        report.add(checks.Check("WARN", "coverage", f"cannot read the cached rows: {common.first_line(err)}"))
        return
    covered = sum(cached.get(row.get("id")) == common.row_fingerprint(row) for row in rows)
    status = "OK" if covered == len(rows) else "FAIL" if covered == 0 else "WARN"
    report.add(checks.Check(status, "coverage", f"{covered} of {len(rows)} rows of --data are cached as they are "
                            "now (same id, messages and completion); training skips the others"))
    if vocab is None or batch is None:
        report.add(checks.Check("SKIP", "cache gap", "the cached-vs-live gap is measured for token_level.py's "
                                "loss on the first batch (one vocabulary, a loss mask)"))
    else:
        report.add(cache_gap(args, folder, student, teacher, batch, examples, vocab))


def hidden_cache_gap(folder, manifest, student_logits, teacher_logits, hidden, beta, temperature) -> checks.Check:
    """A --store hidden cache: the teacher's logits rebuilt from the cached hidden states and head against the
    live teacher's, through the divergence token_level.py trains on (equal up to the storage dtype)."""
    head = cache_teacher.load_head(folder, manifest).to(hidden.device)
    cached_logits = (hidden.to(head.dtype) @ head[:teacher_logits.shape[1]].T).float()
    from_cache = common.generalized_jsd_per_position(student_logits, cached_logits, beta, temperature).mean().item()
    live = common.generalized_jsd_per_position(student_logits, teacher_logits, beta, temperature).mean().item()
    rel = abs(from_cache - live) / max(abs(live), 1e-12)
    gap = f"{common.divergence_name(beta)} at T={temperature:g} over {hidden.shape[0]} tokens: from the cached " \
          f"hidden states ({manifest.get('hidden_dtype')}) {from_cache:.4f}, from the live teacher {live:.4f} " \
          f"({rel:.2%})"
    if not math.isfinite(from_cache) or rel > 0.02:
        return checks.Check("WARN", "cache gap", f"{gap}: an exact cache should agree; written by another teacher, "
                            "dtype or template?")
    return checks.Check("INFO", "cache gap", f"{gap}: the exact cache trains the live objective")


def sampled_cache_gap(manifest, student_logits, teacher_logits, cache: dict, temperature) -> checks.Check:
    """A --store sampled cache: its per-token estimate of forward KL against the live value. The estimate is
    unbiased, so the gap is judged in standard errors of the per-token differences; a larger one means draws from
    another distribution (teacher, dtype, template) than the live teacher's."""
    estimate = cache_teacher.sampled_forward_kl(student_logits, cache["draw_ids"], cache["draw_counts"],
                                                cache["draw_logprobs"], temperature)
    live = common.generalized_jsd_per_position(student_logits, teacher_logits, 0.0, temperature)
    diff = (estimate - live).double()
    n = diff.numel()
    error = diff.std().item() / math.sqrt(n) if n > 1 else float("inf")
    z = diff.mean().item() / max(error, 1e-12)
    live_logprobs = (teacher_logits.float() / temperature).log_softmax(-1).gather(1, cache["draw_ids"])
    present = cache["draw_counts"] > 0
    drift = torch.where(present, (live_logprobs - cache["draw_logprobs"].float()).abs(), 0.0).max().item()
    gap = f"KL(teacher||student) at T={temperature:g} over {n} tokens: from {manifest.get('samples')} cached draws " \
          f"per token {estimate.mean().item():.4f}, from the live teacher {live.mean().item():.4f} (gap " \
          f"{diff.mean().item():+.4f} = {z:+.1f} standard errors of the sampling)"
    problems = []
    if not math.isfinite(drift) or drift > CACHE_DRIFT_WARN:
        problems.append(f"cached log-probabilities of the drawn tokens differ from the live teacher's by up to "
                        f"{drift:.3f}: written by another teacher, dtype or template?")
    if not math.isfinite(z) or abs(z) > CACHE_SAMPLING_Z:
        problems.append("an unbiased estimate should be within a few standard errors of the live value: the draws "
                        "come from another distribution than this teacher's")
    if problems:
        return checks.Check("WARN", "cache gap", f"{gap}; {'; '.join(problems)}")
    return checks.Check("INFO", "cache gap", f"{gap}: an unbiased estimate of the live objective (its gradient too); "
                        f"cached log-probabilities within {drift:.3f} of the live teacher's")


def cache_gap(args, folder, student, teacher, batch: dict, examples: list[dict], vocab: int) -> checks.Check:
    """On the first batch's cached rows: the divergence token_level.py trains on from the cache (top-K + tail,
    cache_teacher.topk_bucket_divergence; the sampled estimate; or the hidden states' logits) against the same
    divergence from the live teacher, and how far the cached log-probabilities are from the live teacher's."""
    beta, temperature = common.divergence_beta(args), args.temperature
    try:  # what token_level.py refuses with this cache (a temperature it lacks, reverse KL from draws, ...)
        cache_teacher.open_cache(folder, stores=cache_teacher.STORES, temperature=temperature, beta=beta)
    except common.DistillError as err:
        return checks.Check("FAIL", "cache gap", str(err))
    manifest, cached = cache_teacher.load_cache(folder)
    store = cache_teacher.store_of(manifest)
    student_hidden, teacher_hidden, targets = hidden_pair(student, teacher, batch)
    counts = batch["loss_mask"][:, 1:].sum(1).tolist()
    keep, parts, first = [], [], 0
    for example, count in zip(examples, counts):  # positions come out row by row (shift_for_next_token)
        entry = cached.get(example["id"])
        span = list(range(first, first + count))
        first += count
        if entry is not None and entry["token_ids"].tolist() == targets[span].tolist() and \
                entry["row_fingerprint"] == example["row_fingerprint"]:
            keep += span
            parts.append(entry)
    if not keep:
        return checks.Check("WARN", "cache gap", "no row of the first batch is in the cache: gap not measured")
    device = student_hidden.device
    idx = torch.tensor(keep, device=device)
    cache = {k: v.to(device) for k, v in cache_teacher.collate_rows(parts, manifest, temperature).items()}
    head, teacher_head = models.output_head(student).weight, models.output_head(teacher).weight
    with torch.no_grad():
        logits = (student_hidden[idx] @ head[:vocab].T).float()
        teacher_logits = (teacher_hidden[idx] @ teacher_head[:vocab].T).float()
        if store == "hidden":
            return hidden_cache_gap(folder, manifest, logits, teacher_logits, cache["teacher_hidden"], beta,
                                    temperature)
        if store == "sampled":
            return sampled_cache_gap(manifest, logits, teacher_logits, cache, temperature)
        from_cache = cache_teacher.topk_bucket_divergence(logits, cache["topk_ids"], cache["topk_logprobs"],
                                                          cache["tail_logmass"], beta, temperature).mean().item()
        live = common.generalized_jsd_per_position(logits, teacher_logits, beta, temperature).mean().item()
        live_logprobs = teacher_logits.log_softmax(-1).gather(1, cache["topk_ids"])
        drift = (live_logprobs - cache["topk_logprobs"].float()).abs().max().item()
    k = cache["topk_ids"].shape[1]
    gap = f"{common.divergence_name(beta)} at T={temperature:g} over {len(keep)} tokens: from the cached top-{k} + " \
          f"tail {from_cache:.4f}, from the live teacher {live:.4f} (gap {from_cache - live:+.4f}, " \
          f"{abs(from_cache - live) / max(abs(live), 1e-12):.1%})"
    problems = []
    if not math.isfinite(drift) or drift > CACHE_DRIFT_WARN:
        problems.append(f"cached log-probabilities differ from the live teacher's by up to {drift:.3f}: written by "
                        "another teacher, dtype or template?")
    if abs(from_cache - live) > CACHE_GAP_WARN * abs(live) + 0.01:
        why = "the tail merged into one bucket on both sides" + (
            ": the student's mass outside the teacher's top K is not penalized token by token" if beta else "")
        problems.append(f"from this cache the run trains another objective than with the live teacher ({why}): "
                        "raise cache_teacher.py's --top-k or use its --store hidden" +
                        ("" if beta else " or --store sampled (unbiased)"))
    if problems:
        return checks.Check("WARN", "cache gap", f"{gap}; {'; '.join(problems)}")
    return checks.Check("INFO", "cache gap", f"{gap}; cached log-probabilities within {drift:.3f} of the live "
                        "teacher's")

if __name__ == "__main__":
    common.run_main(main)
