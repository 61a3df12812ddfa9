"""Teacher/student checks: finite logits, agreement, the pre-flight, matching vocabularies, templates and masks.

Each check returns a `Check` record (OK/WARN/FAIL); doctor.py prints every one of them and the training scripts'
pre-flight (`raise_or_warn`) stops on a FAIL and prints a WARN: one implementation of each check.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from common import (
    DistillError,
    check_finite_logits,
    divergence_name,
    encode_chat,
    end_of_turn_ids,
    generalized_jsd_per_position,
    is_main_process,
    render_chat,
)
from losses import auto_chunk_size


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


def preflight_terms(stats: dict, count: float, teacher: str = "--teacher") -> dict[str, float]:
    """The pre-flight where the teacher's full distribution is not at hand (a top-K or sampled cache, a teacher
    with another vocabulary): print the objective's terms on the first batch (`stats`: "ce" and "div", means over
    its `count` completion tokens) and stop the run if either is not finite, naming the side it comes from: the
    cross-entropy reads only the student's logits, so a finite ce with a non-finite div points at `teacher`."""
    result = {name: float(value) for name, value in stats.items() if name in ("ce", "div")}
    if not math.isfinite(result["ce"]):
        raise DistillError("--student's logits are not finite (NaN or inf) on the first batch (pre-flight): its "
                           "weights hold NaN/inf or its --dtype overflows")
    if not math.isfinite(result["div"]):
        raise DistillError(f"the divergence from {teacher} is not finite on the first batch (pre-flight) while the "
                           f"student's cross-entropy is: {teacher}'s log-probabilities hold NaN/inf")
    if is_main_process():
        print(f"pre-flight on the first batch ({int(count)} completion tokens): divergence term = {result['div']:.4f} "
              f"(the one this run minimizes), student cross-entropy = {result['ce']:.4f}")
    return result


def objective_preflight(objective, teacher: str = "--teacher", **options):
    """The pre-flight check (for `training.preflight`) of a script whose teacher gives no full distribution: its
    own `objective(batch, num_tokens, **options)` on the first batch, per completion token, through
    `preflight_terms`."""
    def check(batch: dict) -> dict[str, float]:
        count = batch["loss_mask"][:, 1:].sum().item()
        return preflight_terms(objective(batch, count, **options)[1], count, teacher)

    return check


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


def check_training_data(tokenizer, rows: list[dict], examples: list[dict]) -> None:
    """doctor.py's loss-mask and generation-prompt checks on the first training row that was kept (`examples` from
    `encode_rows`), and its unknown-token check on every one: stop on a FAIL, print a WARN, before anything is
    trained on a mask that is wrong or on targets the student's tokenizer cannot spell."""
    first = rows[examples[0]["row"]]
    raise_or_warn([*loss_mask_checks(tokenizer, first, f"tokenizer '{tokenizer.name_or_path}'")[0],
                   unknown_targets_check(tokenizer, rows, examples)])


# Above this share of completion tokens, targets mapped to the unknown token stop a run: a few are a rare symbol,
# more mean a tokenizer that cannot write the teacher's text (the issue seen: 84 of 537, 16%).
UNKNOWN_TARGETS_MAX = 0.01


def unknown_targets_check(tokenizer, rows: list[dict], examples: list[dict]) -> Check:
    """How many training targets (loss_mask 1 in `examples`) are the tokenizer's unknown token, and which
    characters of the completions in `rows` it maps there. A tokenizer without byte fallback (SentencePiece or
    BPE with an <unk>) turns characters it never saw into <unk>: the student then learns to write <unk>, and the
    text is lost. WARN for any, FAIL above `UNKNOWN_TARGETS_MAX` of the targets."""
    unk, name = tokenizer.unk_token_id, f"tokenizer '{tokenizer.name_or_path}'"
    # GPT-2-style byte-level tokenizers name their end-of-text token as unk too: they never produce it for text
    if unk is None or unk in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id):
        return Check("OK", "unknown", f"{name} has no unknown token of its own: it can write any text")
    total = sum(sum(ex["loss_mask"]) for ex in examples)
    count = sum(sum(1 for i, m in zip(ex["input_ids"], ex["loss_mask"]) if m and i == unk)
                for ex in examples if unk in ex["input_ids"])
    if not count:
        return Check("OK", "unknown", f"{name}: none of the {total} completion tokens is its unknown token")
    chars = sorted(set().union(*(set(row["completion"]) for row in rows)))
    encoded = tokenizer(chars, add_special_tokens=False)["input_ids"]
    unknown = "".join(ch for ch, ids in zip(chars, encoded) if unk in ids)
    share = count / max(total, 1)
    message = (f"{name} maps {count} of {total} completion tokens ({share:.1%}) to its unknown token "
               f"{tokenizer.unk_token!r}: it cannot write {unknown[:20]!r}{'...' if len(unknown) > 20 else ''} "
               f"(no byte fallback), so the student learns to write {tokenizer.unk_token!r} there")
    if share > UNKNOWN_TARGETS_MAX:
        return Check("FAIL", "unknown", f"{message}; above {UNKNOWN_TARGETS_MAX:.0%}, not training: use a student "
                     "whose tokenizer covers this text (byte-level, or with byte fallback), or clean --data")
    return Check("WARN", "unknown", message)


def check_unknown_targets(tokenizer, rows: list[dict], examples: list[dict]) -> None:
    """`unknown_targets_check` as a training script acts on it: stop above the limit, else report any."""
    raise_or_warn([unknown_targets_check(tokenizer, rows, examples)])


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
