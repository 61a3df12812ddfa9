r"""Token-level (logit) distillation: match the teacher's full next-token distribution at every completion token.

    # the blog's setup, every other flag at its default: the Qwen2.5-3B-Instruct teacher, the Qwen2.5-0.5B
    # student, data/teacher.jsonl (first run `python generate_data.py`), KL at T=2 with 10% cross-entropy on
    # the teacher's tokens; into runs/token_level-forward, runs/token_level-reverse, runs/token_level-jsd
    python token_level.py                   # forward KL(teacher || student), mode covering
    python token_level.py --kl reverse      # reverse KL(student || teacher), mode seeking (MiniLLM)
    python token_level.py --kl jsd --beta 0.5

    # from a teacher top-K cache (cache_teacher.py): the teacher is never loaded
    python token_level.py --teacher-cache data/teacher.top64 --output-dir runs/token_level-cached
    # from a sampled cache (cache_teacher.py --store sampled): forward KL, unbiased
    python token_level.py --teacher-cache data/teacher.sampled64 --output-dir runs/token_level-sampled
    # from an exact cache (cache_teacher.py --store hidden): the live teacher's loss, at any --kl and --temperature
    python token_level.py --teacher-cache data/teacher.hidden --kl reverse --output-dir runs/token_level-exact

    # held-out loss and KL every 50 steps, plus greedy exact match on 200 GSM8K test problems; keep the best
    python token_level.py --eval-data data/teacher_heldout.jsonl --eval-problems data/gsm8k_test200.jsonl \
        --eval-every 50 --save-best eval_exact_match --epochs 15 --output-dir runs/token_level-best

    # several GPUs, bf16 teacher
    accelerate launch token_level.py --data data/teacher.jsonl --teacher-dtype bfloat16 --bf16 \
        --output-dir runs/token_level-multi

Loss per optimizer step: alpha * CE(student, teacher's tokens) + (1 - alpha) * T^2 * D(teacher, student), where D
is forward KL, reverse KL or the generalized JSD (common.generalized_jsd_per_position), and both terms are sums over the
assistant completion tokens (plus the closing end-of-turn token) divided by the number of such tokens in the
whole step. Teacher and student must share a vocabulary (padded heads are fine); otherwise use cross_tokenizer.py.
The [tokens, vocab] logits are never formed for a batch: both heads are applied chunk by chunk inside the loss.

metrics.jsonl logs per step loss, ce and div (the T^2-scaled divergence term D, whatever --kl). Held-out rows
(--eval-data) log eval_loss (this loss), eval_ce, eval_div and eval_kl = KL(teacher || student) at T=1 whatever
--kl and --temperature (comparable across runs). From a --teacher-cache the held-out rows must be in the cache too.

The teacher's side comes from one of four sources (teachers.py), through the same loop: the live --teacher; a
--teacher-cache with --store hidden (its hidden states and head: the live loss, eval_kl and pre-flight, up to the
cache's dtype); a top-K cache or a --teacher-url server (D over the teacher's top K + one tail bucket:
`cache_teacher.topk_bucket_divergence` says what that keeps and loses); a sampled cache (forward KL estimated from
draws: `cache_teacher.sampled_forward_kl`). The last two give no full distribution, so eval_kl is not logged and the
pre-flight prints the loss terms. A cache holds a few temperatures; another --temperature is refused with the
command that writes one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import cache_teacher
import checkpoints
import checks
import common
import losses
import models
import served_teacher
import teachers
import training


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    method = common.add_train_args(parser, teacher=True, student_default=common.BLOG_STUDENT,
                                   teacher_default=common.BLOG_TEACHER, output_dir="runs/token_level-{kl}")
    common.add_divergence_args(method, default="forward")
    method.add_argument("--temperature", type=common.bounded(float, 0, low_open=True), default=2.0,
                        help="softmax temperature of the KL term (loss is T^2-scaled)")
    method.add_argument("--alpha", type=common.FRACTION, default=0.1, help="weight of the cross-entropy term (0..1)")
    method.add_argument("--teacher-cache", default=None,
                        help="train from a cache_teacher.py folder instead of loading --teacher: --store hidden "
                             "gives the live teacher's loss; topk its top-K + tail bucket version; sampled an "
                             "unbiased estimate of forward KL (--kl forward only)")
    served_teacher.add_teacher_url_args(method)
    args = parser.parse_args(argv)
    common.resolve_divergence(args, default="forward")
    if args.teacher_url and args.teacher_cache:
        parser.error("--teacher-url and --teacher-cache are two sources of the teacher: give one")
    # eval_kl needs the full distribution: live, or a hidden cache (a missing cache.json is refused in main)
    cache_json = Path(args.teacher_cache or "", "cache.json")
    topk_cache = bool(args.teacher_cache) and not (cache_json.is_file() and cache_teacher.store_of(
        json.loads(cache_json.read_text())) == "hidden")
    topk_cache = topk_cache or bool(args.teacher_url)  # a served teacher is a top-K one
    training.check_eval_args(parser, args, stats=("ce", "div") if topk_cache else ("ce", "div", "kl"))
    common.fill_train_defaults(parser, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    beta = common.divergence_beta(args)
    manifest = cache_teacher.open_cache(args.teacher_cache, stores=cache_teacher.STORES, temperature=args.temperature,
                                        beta=beta) if args.teacher_cache else None  # before any model loads
    rows = common.load_distill_rows(args.data, allow_duplicates=args.allow_duplicates)
    student, tokenizer = models.load_model(args.student, dtype=args.dtype, what="--student",
                                           trust_remote_code=args.trust_remote_code)
    examples, skipped = common.encode_rows(rows, tokenizer, args.max_length, truncated=args.truncated)
    checks.check_training_data(tokenizer, rows, examples)
    held_out = training.load_held_out(args, rows, tokenizer)
    if args.teacher_url:  # a vLLM server's top-K log-probabilities, trained like a top-K cache
        served_teacher.check_temperature(args.teacher_url, [args.temperature])
        served = served_teacher.ServedTeacher(args.teacher_url, top_k=args.teacher_top_k,
                                              retries=args.teacher_retries, timeout=args.teacher_timeout)
        served.check_tokenizer(tokenizer)
        inputs = checkpoints.live_teacher_inputs(args.teacher)
        inputs.ignored += ("teacher_retries", "teacher_timeout")
        inputs.adjustable += ("teacher_url",)  # the server may move between runs; --teacher (its weights) may not
        loop = training.TrainLoop(args, models.maybe_lora(student, args), examples, tokenizer.pad_token_id,
                                  held_out=held_out, inputs=inputs)
        vocab = min(models.output_head(loop.model).weight.shape[0], len(tokenizer))
        source = teachers.ServedRows(served, loop)
    elif manifest is None:
        loop = training.TrainLoop(args, models.maybe_lora(student, args), examples, tokenizer.pad_token_id,
                                  held_out=held_out, inputs=checkpoints.live_teacher_inputs(args.teacher),
                                  models={"--student": "--dtype", "--teacher": "--teacher-dtype"})
        teacher, teacher_tokenizer = models.load_teacher(args, loop.device)
        vocab = checks.shared_vocab_size(tokenizer, teacher_tokenizer, models.output_head(loop.model).weight.shape[0],
                                         models.output_head(teacher).weight.shape[0])
        checks.warn_template_mismatch(tokenizer, teacher_tokenizer)
        source = teachers.LiveTeacher(teacher, select=lambda hidden, batch: common.shift_for_next_token(hidden,
                                                                                                        batch)[0])
    else:  # no teacher in memory: its cached rows ride along with each batch
        examples, vocab, collate = attach_cache(args.teacher_cache, tokenizer, examples, student, held_out,
                                                temperature=args.temperature)
        loop = training.TrainLoop(args, models.maybe_lora(student, args), examples, tokenizer.pad_token_id, collate,
                                  held_out, inputs=cache_teacher.run_inputs(manifest))
        source = teachers.from_cache(args.teacher_cache, manifest, loop.device)
    head = models.output_head(loop.model)

    def objective(batch, num_tokens, held_out=False):  # training and held-out rows alike
        teacher = source(batch)
        hidden = models.student_hidden_states(loop.model, batch["input_ids"], batch["attention_mask"])
        student_hidden, targets = common.shift_for_next_token(hidden, batch)  # [N, H], [N]
        loss, ce_sum, div_sum = distillation_loss(student_hidden, head.weight, targets, num_tokens, teacher, args,
                                                  beta=beta, vocab=vocab)
        stats = {"ce": ce_sum / num_tokens, "div": div_sum / num_tokens}
        if held_out and source.full:  # eval_kl: plain KL(teacher || student) at T=1, whatever this run's divergence
            stats["kl"] = checks.agreement(student_hidden, head.weight, vocab=vocab, chunk_size=args.chunk_size,
                                           **teacher)["kl_sum"] / num_tokens
        return loss, stats

    partial_teacher = checks.objective_preflight(objective, "--teacher-url" if args.teacher_url else "--teacher-cache")

    def preflight(batch):  # how far apart the two start; non-finite logits stop the run before any update
        if not source.full:  # a top-K or sampled cache, a served teacher: the objective's own terms
            return partial_teacher(batch)
        hidden = models.student_hidden_states(loop.model, batch["input_ids"], batch["attention_mask"])
        checks.preflight(common.shift_for_next_token(hidden, batch)[0], head.weight, **source(batch), vocab=vocab,
                         temperature=args.temperature, beta=beta)

    training.preflight(loop, preflight)
    for micro_batches, num_tokens in loop:
        source.prefetch(micro_batches)  # a served teacher's requests for the whole step go out now
        for batch in micro_batches:
            loss, stats = objective(batch, num_tokens)
            loop.backward(loss, **stats)
        loop.step(num_tokens, evaluate=objective)
    loop.finish(tokenizer, skipped=skipped, total=len(rows), rows=rows)


def distillation_loss(student_hidden, student_weight, targets, num_tokens, teacher: dict, args, *, beta: float,
                      vocab: int):
    """alpha * CE + (1 - alpha) * T^2 * D over the batch's positions / num_tokens, from whatever `teacher` source
    (teachers.py): the full-vocabulary loss (`losses.fused_head_loss`) from the teacher's hidden states and head,
    or its cached approximation (`cache_teacher.cached_teacher_loss`) from a top-K or sampled cache's rows.
    Returns (loss, ce_sum, div_sum), the sums detached."""
    if "cached_rows" in teacher:
        return cache_teacher.cached_teacher_loss(
            student_hidden, student_weight, targets, num_tokens, teacher["cached_rows"], alpha=args.alpha, beta=beta,
            temperature=args.temperature, chunk_size=args.chunk_size, vocab=vocab)
    return losses.fused_head_loss(student_hidden, student_weight, targets, num_tokens, **teacher, alpha=args.alpha,
                                  beta=beta, temperature=args.temperature, chunk_size=args.chunk_size, vocab=vocab,
                                  compute_dtype=torch.bfloat16 if args.bf16 else None)


def attach_cache(folder, tokenizer, examples: list[dict], student, held_out=None, *, temperature: float = 1.0):
    """Pair every example with its cached teacher rows; refuse a cache from another vocabulary.

    Returns (examples that have a cache row scored on the same messages and completion, with the same target
    tokens, the cache's vocabulary size, a collate function that pads the batch and stacks its cached rows at
    `temperature` in the order shift_for_next_token uses: `cache_teacher.collate_rows`). The held-out examples
    (--eval-data) are paired too, in place; every one of them must be in the cache.
    """
    manifest, cached = cache_teacher.load_cache(folder)
    if manifest["vocab_fingerprint"] != cache_teacher.vocab_fingerprint(tokenizer):
        raise common.DistillError(f"--teacher-cache {folder}: written with the tokenizer of {manifest['teacher']}, "
                                  "whose vocabulary differs from the student's (fingerprint "
                                  f"{manifest['vocab_fingerprint']} vs {cache_teacher.vocab_fingerprint(tokenizer)}); "
                                  "a token-level cache is only valid for the same token ids (see cross_tokenizer.py)")
    if manifest["vocab"] > models.output_head(student).weight.shape[0]:
        raise common.DistillError(f"--teacher-cache {folder}: vocabulary {manifest['vocab']} is larger than the "
                                  "student's output head")
    if not manifest.get("complete"):
        print(f"warning: --teacher-cache {folder} is incomplete (cache_teacher.py was interrupted; re-run it to "
              "finish); rows it does not hold are skipped")
    if manifest["template_fingerprint"] != common.fingerprint(tokenizer.chat_template or ""):
        print("warning: the cache was scored with another chat template; rows whose tokens differ are skipped")

    if any(row["row_fingerprint"] is None for row in cached.values()):
        raise common.DistillError(f"--teacher-cache {folder}: written by an older cache_teacher.py that did not "
                                  "record what each row was scored on; re-create it")

    def pair(examples):
        kept, missing, differ = [], 0, 0
        for ex in examples:
            row = cached.get(ex["id"])
            targets = [t for t, m in zip(ex["input_ids"][1:], ex["loss_mask"][1:]) if m]
            if row is None:
                missing += 1
            elif row["row_fingerprint"] != ex["row_fingerprint"] or row["token_ids"].tolist() != targets:
                differ += 1  # the same id scored on another prompt or completion, or tokenized otherwise
            else:
                kept.append({**ex, "cache": row})
        return kept, missing, differ

    kept, missing, differ = pair(examples)
    if missing or differ:
        print(f"--teacher-cache: skipped {missing} rows absent from the cache and {differ} whose prompt, completion "
              f"or tokens differ from the cached ones ({len(kept)} of {len(examples)} kept)")
    if not kept:
        raise common.DistillError(f"--teacher-cache {folder}: no row of --data matches the cache")
    if held_out is not None and held_out.examples:
        held_out.examples, missing, differ = pair(held_out.examples)
        if missing or differ:  # a held-out loss on a silent subset would not compare with other runs
            raise common.DistillError(
                f"--eval-data with --teacher-cache: {missing} held-out rows are absent from the cache and {differ} "
                f"differ from it; score them into it too: cache_teacher.py --data EVAL_DATA --output {folder}")

    def collate(batch_examples, pad_id=tokenizer.pad_token_id):  # only the batch's rows are read from the shards
        return {**common.pad_batch(batch_examples, pad_id),
                **cache_teacher.collate_rows([ex["cache"] for ex in batch_examples], manifest, temperature)}

    return kept, manifest["vocab"], collate


if __name__ == "__main__":
    common.run_main(main)
