r"""Cross-tokenizer distillation (ULD): learn from a teacher whose vocabulary is different from the student's.

    # the blog's setup, every flag at its default: the SmolLM2-1.7B-Instruct teacher (another tokenizer than
    # Qwen's) for the Qwen2.5-0.5B student, on that teacher's own answers (first run
    # `python generate_data.py --teacher HuggingFaceTB/SmolLM2-1.7B-Instruct`, which writes
    # data/teacher_smollm2-1.7b-instruct.jsonl); top-50 + tail at T=2, 10% cross-entropy; into runs/cross_tokenizer
    python cross_tokenizer.py

    # another pair: the data must come from the same teacher
    python generate_data.py --teacher meta-llama/Llama-3.2-1B-Instruct   # -> data/teacher_llama-3.2-1b-instruct.jsonl
    python cross_tokenizer.py --teacher meta-llama/Llama-3.2-1B-Instruct --output-dir runs/uld_llama

    # from a teacher cache (`python cache_teacher.py --teacher HuggingFaceTB/SmolLM2-1.7B-Instruct`)
    python cross_tokenizer.py --teacher-cache data/teacher_smollm2-1.7b-instruct.top64 --output-dir runs/uld_cached
    # from an exact one (the same with `--store hidden`): the live teacher's loss at any --temperature
    python cross_tokenizer.py --teacher-cache data/teacher_smollm2-1.7b-instruct.hidden --output-dir runs/uld_exact

    # held-out ULD objective and CE every 50 steps (eval_loss, eval_ce, eval_div), keeping the best eval_loss
    python cross_tokenizer.py --eval-data data/teacher_smol_heldout.jsonl --eval-every 50 --save-best eval_loss \
        --output-dir runs/uld_eval

    # the ULD paper's loss (sorted L1 = closed-form Wasserstein-1), several GPUs
    accelerate launch cross_tokenizer.py --uld-loss wasserstein --bf16 --output-dir runs/uld_w1

Token-level KL needs one vocabulary. ULD (Boizard et al., 2024, "Towards Cross-Tokenizer Distillation: the
Universal Logit Distillation Loss for LLMs") compares the *shape* of the two next-token distributions instead:

1. Alignment. Each model reads the conversation rendered by its *own* chat template. On the completion text only,
   every student token is paired with the teacher token whose end character offset is closest (ties: the earlier
   teacher token); the end-of-turn tokens are paired with each other. `align_by_end_offsets` does this.
2. Loss at each pair: the top-K probabilities of each side at temperature T, sorted in decreasing order, plus one
   tail bucket holding the mass outside the top K, so nothing vanishes: `--uld-loss kl` is KL(teacher || student)
   between the two (K+1)-vectors, `--uld-loss wasserstein` is sum_k |p_(k) - q_(k)| (both T^2-scaled).
Total: alpha * CE (student's own tokens of the teacher's completion) + (1 - alpha) * ULD, each a sum over the
student's completion tokens divided by their number in the whole optimizer step.

The log reports how good the alignment is: the share of student tokens whose teacher partner ends at exactly the
same character, and the mean end-offset gap in characters. Held-out rows (--eval-data) are encoded and aligned the
same way and log eval_loss (this objective), eval_ce and eval_div (the ULD term; metrics.jsonl's div in training,
the key every script uses for its divergence term); from a --teacher-cache they must be cached too.

A top-K cache (cache_teacher.py --store topk) gives the teacher's bucket vector exactly, at each temperature it holds
(cache_teacher.py --temperatures; `cache_teacher.cached_teacher_log_buckets`). A hidden cache (--store hidden)
holds the teacher's final hidden states h and head W; the teacher's logits h @ W^T then go through the same ULD
code as the live teacher's, so the loss is the live one at any temperature (up to the cache's dtype rounding of h).
"""

from __future__ import annotations

import argparse
import bisect
import json

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import cache_teacher
import common


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_train_args(parser, teacher=True, student_default=common.BLOG_STUDENT,
                          teacher_default=common.ULD_TEACHER, output_dir="runs/cross_tokenizer")
    parser.add_argument("--top-k", type=common.POSITIVE_INT, default=50,
                        help="probabilities compared per position (plus a tail)")
    parser.add_argument("--temperature", type=common.bounded(float, 0, low_open=True), default=2.0,
                        help="softmax temperature of the ULD term (> 0)")
    parser.add_argument("--alpha", type=common.FRACTION, default=0.5,
                        help="weight of the student's cross-entropy (0..1); the ULD term gets 1 - alpha. 0.5 = "
                             "CE + ULD weighted equally, as in the ULD paper's code. The sorted comparison carries no "
                             "token identity, so with a small alpha it sharpens whatever the student already prefers "
                             "(the demo's student learned no answer line at alpha 0.1)")
    parser.add_argument("--uld-loss", default="kl", choices=["kl", "wasserstein"],
                        help="the ULD distance, between *sorted* top-K + tail probability vectors (not token_level's "
                             "--kl, which compares token by token): kl = KL(teacher||student) of the sorted "
                             "vectors; wasserstein = sorted L1 (ULD paper)")
    parser.add_argument("--teacher-cache", default=None,
                        help="read the teacher from a cache_teacher.py folder instead of loading --teacher: "
                             "--store hidden gives the live teacher's loss exactly; --store topk its top-K log-probs "
                             "(compares the top min(--top-k, its K) + tail, exactly at the temperatures it holds)")
    parser.add_argument("--min-exact-alignment", type=common.FRACTION, default=0.5,
                        help="warn when fewer student tokens than this share align to a teacher token ending at "
                             "the same character")
    args = parser.parse_args(argv)
    common.check_eval_args(parser, args, stats=("ce", "div"))
    common.fill_train_defaults(parser, args)
    return args


def align_by_end_offsets(student_offsets: list[tuple[int, int]], teacher_offsets: list[tuple[int, int]]) -> list[int]:
    """For each student token, the index of the teacher token whose end character offset is closest.

    Offsets are (start, end) character pairs relative to the same completion string, in token order (so the ends
    never decrease). Ties go to the earlier teacher token. One teacher index per student token.
    """
    if not teacher_offsets:
        raise ValueError("the teacher has no completion tokens to align to")
    ends = [end for _, end in teacher_offsets]
    aligned = []
    for _, end in student_offsets:
        right = bisect.bisect_left(ends, end)  # first teacher end >= this end
        if right == len(ends):
            aligned.append(len(ends) - 1)
        elif right == 0 or ends[right] == end:
            aligned.append(right)
        else:
            left = right - 1
            # bisect_left lands on the first of equal ends; on a tie in distance the left one is earlier.
            left = bisect.bisect_left(ends, ends[left])
            aligned.append(left if end - ends[left] <= ends[right] - end else right)
    return aligned


def sorted_topk_with_tail(logits: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """[..., V] logits -> [..., K+1]: the top-K probabilities at temperature T (descending) and the rest's mass."""
    probs = F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    top, index = probs.topk(k, dim=-1)  # sorted, descending
    # Summing what is left, rather than 1 - sum(top), avoids cancellation when the tail is small.
    tail = probs.scatter(-1, index, 0.0).sum(-1, keepdim=True)
    return torch.cat([top, tail], dim=-1)


def uld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, k: int, temperature: float,
             kind: str = "kl") -> torch.Tensor:
    """Per-position ULD distance between aligned positions, T^2-scaled. Shapes [N, V_s], [N, V_t] -> [N].

    With p = sorted top-K of softmax(teacher/T) + tail, q = the same for the student:
      kl:           T^2 * sum_k p_k (log p_k - log q_k)      (KL(teacher || student), the blog's choice)
      wasserstein:  T^2 * sum_k |p_k - q_k|                   (the ULD paper's closed-form Wasserstein-1)
    """
    # K stays below the smaller vocabulary so that both tails keep some mass (an empty tail opposite a non-empty
    # one would make KL infinite). Real vocabularies are far larger than K; this only matters for toy ones.
    k = min(k, student_logits.shape[-1] - 1, teacher_logits.shape[-1] - 1)
    return uld_distance(sorted_topk_with_tail(teacher_logits, k, temperature),
                        sorted_topk_with_tail(student_logits, k, temperature), kind=kind, temperature=temperature)


def uld_distance(p: torch.Tensor, q: torch.Tensor, *, kind: str, temperature: float) -> torch.Tensor:
    """[N, K+1] sorted teacher (p) and student (q) bucket vectors -> [N] distance, T^2-scaled (see uld_loss)."""
    if kind == "kl":
        tiny = torch.finfo(q.dtype).tiny
        d = torch.where(p > 0, p * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log()), 0.0).sum(-1)
    else:
        d = (p - q).abs().sum(-1)
    return d * temperature**2


def chunked_uld_and_ce(student_hidden, student_weight, targets, num_tokens, *, teacher_hidden=None,
                       teacher_weight=None, teacher_probs=None, alpha: float, top_k: int, temperature: float,
                       kind: str = "kl", chunk_size: int = 0, student_vocab: int | None = None,
                       teacher_vocab: int | None = None):
    """alpha * CE + (1 - alpha) * ULD, summed over aligned positions / num_tokens, chunk by chunk.

    The teacher is either live, `teacher_hidden` [N, H_t] with its head `teacher_weight`, or read from a cache,
    `teacher_probs` [N, k+1]: its sorted bucket vectors (`cache_teacher.cached_teacher_log_buckets(...).exp()`,
    whose k then replaces `top_k`). `kind` is --uld-loss. `student_vocab`/`teacher_vocab`: the tokenizers' sizes;
    head rows past them are padding, not tokens, and get no probability (default: every row). Each chunk's [C, V]
    logits are recomputed in backward (activation checkpointing) rather than kept, so memory is a few chunk-sized
    buffers; top-K selects K values per row, no full-vocabulary sort. Returns (loss, ce_sum, uld_sum) with the sums
    detached for logging.
    """
    if (teacher_probs is None) == (teacher_hidden is None or teacher_weight is None):
        raise ValueError("pass either teacher_hidden and teacher_weight, or teacher_probs")
    student_weight = common.full_weight(student_weight)[:student_vocab]
    if teacher_weight is not None:
        teacher_weight = teacher_weight[:teacher_vocab]
    teacher_rows_count = teacher_weight.shape[0] if teacher_weight is not None else 0
    chunk = chunk_size or common.auto_chunk_size(max(student_weight.shape[0], teacher_rows_count))
    teacher_rows = teacher_hidden if teacher_probs is None else teacher_probs

    def piece(h, y, th):
        logits = h @ student_weight.T  # [C, V_s]
        ce = F.cross_entropy(logits.float(), y, reduction="sum")
        if teacher_probs is not None:  # th: cached teacher buckets [C, k+1]
            q = sorted_topk_with_tail(logits, th.shape[-1] - 1, temperature)
            uld = uld_distance(th, q, kind=kind, temperature=temperature).sum()
        else:
            with torch.no_grad():
                teacher_logits = th @ teacher_weight.T  # [C, V_t]
            uld = uld_loss(logits, teacher_logits, k=top_k, temperature=temperature, kind=kind).sum()
        return ce, uld

    ce_sum = uld_sum = student_hidden.new_zeros((), dtype=torch.float32)
    for lo in range(0, student_hidden.shape[0], chunk):
        ce, uld = checkpoint(piece, student_hidden[lo:lo + chunk], targets[lo:lo + chunk],
                             teacher_rows[lo:lo + chunk], use_reentrant=False)
        ce_sum, uld_sum = ce_sum + ce, uld_sum + uld
    loss = (alpha * ce_sum + (1 - alpha) * uld_sum) / max(float(num_tokens), 1.0)
    return loss, ce_sum.detach(), uld_sum.detach()


def uld_options(args) -> dict:
    """chunked_uld_and_ce's settings from this script's flags."""
    return dict(alpha=args.alpha, top_k=args.top_k, temperature=args.temperature, kind=args.uld_loss,
                chunk_size=args.chunk_size)


def encode_pairs(rows, tokenizer, teacher_tokenizer, max_length, what: str | None = "--data", *,
                 truncated: str = "no-eos"):
    """Encode every row with both tokenizers (each with its own chat template) and align the completions.

    Adds to each student example `teacher_ids` and `teacher_targets` (for each student completion token, the index
    in `teacher_ids` of its aligned teacher token). Returns (examples, skipped, alignment stats). Rows cut at
    --max-new-tokens are encoded on both sides without the end-of-turn token, or left out (`truncated`, as in
    `common.encode_rows`).
    """
    examples, skipped, cut = [], 0, 0
    exact = gap = count = 0
    for index, row in enumerate(rows):
        if common.is_cut(row) and truncated == "skip":
            cut += 1
            continue
        with common.about_row(row, index, what):
            student = common.encode_chat(tokenizer, row["messages"], row["completion"], max_length,
                                         end_of_turn=not common.is_cut(row))
            teacher = common.encode_chat(teacher_tokenizer, row["messages"], row["completion"], max_length,
                                         end_of_turn=not common.is_cut(row))
        if student is None or teacher is None:
            skipped += 1
            continue
        teacher_positions = [i for i, m in enumerate(teacher["loss_mask"]) if m]
        aligned = align_by_end_offsets(student["completion_offsets"], teacher["completion_offsets"])
        student["teacher_ids"] = teacher["input_ids"]
        student["teacher_targets"] = [teacher_positions[j] for j in aligned]
        examples.append(student)
        for (_, s_end), j in zip(student["completion_offsets"], aligned):
            t_end = teacher["completion_offsets"][j][1]
            exact += s_end == t_end
            gap += abs(s_end - t_end)
            count += 1
    if not examples:
        raise common.DistillError(f"no row left to train on: {skipped} longer than --max-length {max_length} for one "
                                  f"of the tokenizers, {cut} cut at --max-new-tokens (--truncated skip)")
    stats = {"exact_end_fraction": exact / max(count, 1), "mean_end_gap_chars": gap / max(count, 1),
             "student_tokens": count}
    return examples, skipped, stats


def encode_from_cache(rows, tokenizer, cached: dict, max_length: int, held_out: bool = False, *,
                      truncated: str = "no-eos"):
    """Like encode_pairs, with the teacher's tokens read from a cache: its offsets give the alignment and each
    student example keeps its cached teacher row (teacher_row) and, per completion token, the position in it of its
    aligned teacher token (teacher_positions), read at collate time. Training rows absent from the cache
    are skipped; held-out ones are refused (a held-out loss on a subset would mislead)."""
    examples, skipped, missing, differ = [], 0, 0, 0
    exact = count = 0
    for index, row in enumerate(rows):
        if common.is_cut(row) and truncated == "skip":
            continue  # counted in the end-of-run report
        with common.about_row(row, index, None if held_out else "--data"):
            student = common.encode_chat(tokenizer, row["messages"], row["completion"], max_length,
                                         end_of_turn=not common.is_cut(row))
        teacher = cached.get(row.get("id"))
        if student is None or teacher is None:
            skipped += student is None
            missing += student is not None
            continue
        if teacher["row_fingerprint"] != common.row_fingerprint(row):  # the id was cached for another row
            differ += 1
            continue
        teacher_offsets = [tuple(o) for o in teacher["offsets"].tolist()]
        aligned = torch.tensor(align_by_end_offsets(student["completion_offsets"], teacher_offsets))
        student.update(teacher_row=teacher, teacher_positions=aligned)
        exact += sum(s_end == teacher_offsets[j][1] for (_, s_end), j in zip(student["completion_offsets"],
                                                                             aligned.tolist()))
        count += len(aligned)
        examples.append(student)
    if (missing or differ) and held_out:
        raise common.DistillError(f"{missing} rows are absent from --teacher-cache and {differ} were cached for "
                                  "another prompt or completion; score them into it: cache_teacher.py --data "
                                  "EVAL_DATA --output CACHE")
    if missing or differ:
        print(f"--teacher-cache: skipped {missing} rows absent from the cache and {differ} whose prompt or "
              "completion differ from the cached ones")
    if not examples:
        raise common.DistillError("--teacher-cache: no row of --data is in the cache")
    return examples, skipped, {"exact_end_fraction": exact / max(count, 1), "student_tokens": count}


def collate_pairs(examples: list[dict], pad_id: int, teacher_pad_id: int) -> dict:
    """Pad both sides; `teacher_rows` [N] indexes the teacher's flattened hidden states, one per student target.

    The teacher position for target j is j - 1 (the position that predicts it), matching `shift_for_next_token`'s
    row-major order of the student's masked targets.
    """
    batch = common.pad_batch(examples, pad_id)
    teacher = common.pad_batch([{"input_ids": ex["teacher_ids"]} for ex in examples], teacher_pad_id)
    width = teacher["input_ids"].shape[1]
    rows = [b * width + j - 1 for b, ex in enumerate(examples) for j in ex["teacher_targets"]]
    batch.update(teacher_input_ids=teacher["input_ids"], teacher_attention_mask=teacher["attention_mask"],
                 teacher_rows=torch.tensor(rows, dtype=torch.long))
    return batch


def main(argv=None):
    args = parse_args(argv)
    manifest = cache_teacher.open_cache(args.teacher_cache, temperature=args.temperature) \
        if args.teacher_cache else None  # before any model
    rows = common.load_distill_rows(args.data)
    student, tokenizer = common.load_model(args.student, dtype=args.dtype, what="--student",
                                           trust_remote_code=args.trust_remote_code)
    if manifest is not None:
        return train_from_cache(args, rows, student, tokenizer)
    teacher_tokenizer = common.load_tokenizer(args.teacher, trust_remote_code=args.trust_remote_code,
                                              what="--teacher")
    examples, skipped, alignment = encode_pairs(rows, tokenizer, teacher_tokenizer, args.max_length,
                                                truncated=args.truncated)
    print(f"alignment: {alignment['exact_end_fraction']:.1%} of {alignment['student_tokens']} student tokens end "
          f"where their teacher token ends; mean end-offset gap {alignment['mean_end_gap_chars']:.2f} characters")
    if alignment["exact_end_fraction"] < args.min_exact_alignment:
        print(f"warning: exact alignment {alignment['exact_end_fraction']:.1%} is below --min-exact-alignment "
              f"{args.min_exact_alignment:.0%}; the tokenizers segment this text very differently")
    eval_set = common.load_held_out(args, rows, tokenizer, encode=lambda eval_rows: encode_pairs(
        eval_rows, tokenizer, teacher_tokenizer, args.max_length, None, truncated=args.truncated)[:2])
    loop = common.TrainLoop(args, common.maybe_lora(student, args), examples, tokenizer.pad_token_id,
                            collate=lambda exs: collate_pairs(exs, tokenizer.pad_token_id,
                                                              teacher_tokenizer.pad_token_id), held_out=eval_set)
    if loop.accelerator.is_main_process:
        (loop.output_dir / "alignment.json").write_text(json.dumps(alignment, indent=2) + "\n")
    teacher, _ = common.load_teacher(args, loop.device)
    head, teacher_head = common.output_head(loop.model), common.output_head(teacher)
    # Padded head rows are not tokens: neither distribution gives them mass.
    vocabs = dict(student_vocab=min(len(tokenizer), head.weight.shape[0]),
                  teacher_vocab=min(len(teacher_tokenizer), teacher_head.weight.shape[0]))

    def objective(batch, num_tokens, held_out=False):  # training and held-out rows alike
        with torch.inference_mode():
            teacher_hidden = common.teacher_hidden_states(teacher, batch["teacher_input_ids"],
                                                           batch["teacher_attention_mask"])
            teacher_hidden = teacher_hidden.flatten(0, 1)[batch["teacher_rows"]]  # [N, H_teacher]
        hidden = common.student_hidden_states(loop.model, batch["input_ids"], batch["attention_mask"])
        student_hidden, targets = common.shift_for_next_token(hidden, batch)  # [N, H], [N]
        loss, ce_sum, uld_sum = chunked_uld_and_ce(student_hidden, head.weight, targets, num_tokens,
                                                   teacher_hidden=teacher_hidden.clone(),
                                                   teacher_weight=teacher_head.weight, **vocabs, **uld_options(args))
        return loss, {"ce": ce_sum / num_tokens, "div": uld_sum / num_tokens}

    for micro_batches, num_tokens in loop:
        for batch in micro_batches:
            loss, stats = objective(batch, num_tokens)
            loop.backward(loss, **stats)
        loop.step(num_tokens, evaluate=objective)

    loop.finish(tokenizer, skipped=skipped, total=len(rows), rows=rows)


def train_from_cache(args, rows, student, tokenizer):
    """The same step with the teacher read from a cache_teacher.py folder: no teacher loaded. A top-K cache gives
    the teacher's sorted bucket vectors; a hidden cache its hidden states and head, fed to `chunked_uld_and_ce`
    exactly as the live teacher's are."""
    manifest, cached = cache_teacher.load_cache(args.teacher_cache)
    if any(row["row_fingerprint"] is None for row in cached.values()):
        raise common.DistillError(f"--teacher-cache {args.teacher_cache}: written by an older cache_teacher.py that "
                                  "did not record what each row was scored on; re-create it")
    hidden_store = cache_teacher.store_of(manifest) == "hidden"
    if hidden_store:
        teacher_weight = cache_teacher.load_head(args.teacher_cache, manifest)
    else:
        k = min(args.top_k, manifest["top_k"], common.output_head(student).weight.shape[0] - 1)
        if k < args.top_k:
            print(f"--teacher-cache holds the top {manifest['top_k']}: comparing the top {k} (+ tail)")
    examples, skipped, alignment = encode_from_cache(rows, tokenizer, cached, args.max_length,
                                                     truncated=args.truncated)
    print(f"alignment: {alignment['exact_end_fraction']:.1%} of {alignment['student_tokens']} student tokens end "
          "where their cached teacher token ends")

    def collate(exs):
        batch = common.pad_batch(exs, tokenizer.pad_token_id)
        # one cached teacher position per student target, as the live path's teacher_rows pick them
        teacher = cache_teacher.collate_rows([ex["teacher_row"] for ex in exs], manifest, args.temperature,
                                             [ex["teacher_positions"] for ex in exs])
        if hidden_store:  # [N, H_teacher]
            batch["teacher_hidden"] = teacher["teacher_hidden"]
            return batch
        batch["teacher_probs"] = cache_teacher.cached_teacher_log_buckets(  # [N, k+1]
            teacher["topk_logprobs"], teacher["tail_logmass"], k, args.temperature).exp()
        return batch

    eval_set = common.load_held_out(args, rows, tokenizer, encode=lambda eval_rows: encode_from_cache(
        eval_rows, tokenizer, cached, args.max_length, held_out=True, truncated=args.truncated)[:2])
    loop = common.TrainLoop(args, common.maybe_lora(student, args), examples, tokenizer.pad_token_id, collate,
                            eval_set)
    head = common.output_head(loop.model)
    vocabs = dict(student_vocab=min(len(tokenizer), head.weight.shape[0]))  # padded head rows are not tokens
    if hidden_store:
        teacher_weight = teacher_weight.to(loop.device)
        vocabs["teacher_vocab"] = manifest["vocab"]

    def objective(batch, num_tokens, held_out=False):
        hidden = common.student_hidden_states(loop.model, batch["input_ids"], batch["attention_mask"])
        student_hidden, targets = common.shift_for_next_token(hidden, batch)  # [N, H], [N]
        if hidden_store:  # a bf16/fp16 cache, widened to the head's dtype (the live teacher's states')
            teacher = dict(teacher_hidden=batch["teacher_hidden"].to(teacher_weight.dtype),
                           teacher_weight=teacher_weight)
        else:
            teacher = dict(teacher_probs=batch["teacher_probs"])
        loss, ce_sum, uld_sum = chunked_uld_and_ce(student_hidden, head.weight, targets, num_tokens, **teacher,
                                                   **vocabs, **uld_options(args))
        return loss, {"ce": ce_sum / num_tokens, "div": uld_sum / num_tokens}

    for micro_batches, num_tokens in loop:
        for batch in micro_batches:
            loss, stats = objective(batch, num_tokens)
            loop.backward(loss, **stats)
        loop.step(num_tokens, evaluate=objective)
    loop.finish(tokenizer, skipped=skipped, total=len(rows), rows=rows)


if __name__ == "__main__":
    common.run_main(main)
