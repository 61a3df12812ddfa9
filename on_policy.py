r"""On-policy distillation (GKD): the student writes, the teacher grades every token of what it wrote.

    # the blog's setup, every flag at its default: half the steps on the student's own samples, reverse KL at
    # T=1, the Qwen2.5-3B-Instruct teacher, the Qwen2.5-0.5B student, prompts and off-policy steps from
    # data/teacher.jsonl (first run `python generate_data.py`); into runs/on_policy
    python on_policy.py

    # held-out divergence, CE and KL every 25 steps; keep the model with the lowest held-out KL
    python on_policy.py --eval-data data/teacher_heldout.jsonl --eval-every 25 --save-best eval_kl \
        --output-dir runs/on_policy_eval

    # fully on-policy, generalized JSD (--beta 0.5 alone is the deprecated spelling), several GPUs
    accelerate launch on_policy.py --lmbda 1.0 --kl jsd --beta 0.5 --bf16 --teacher-dtype bfloat16 \
        --output-dir runs/gkd_jsd

Each optimizer step is on-policy with probability --lmbda (Agarwal et al., 2024, "On-Policy Distillation of
Language Models"): the student samples a completion for every prompt of the step (its own chat template, sampling
at --gen-temperature / --top-p, KV cache, once for all the step's micro-batches, weights fixed meanwhile), the
teacher scores every position of prompt + sample, and the loss is T^2 * D(teacher, student) over the sampled
tokens up to and including the first end-of-turn token (D: --kl, as in token_level.py; reverse KL by default, the
MiniLLM/GKD choice). Otherwise the
step is off-policy: the same loss on the teacher's completions from --data (what token_level.py does with
--alpha 0). The loss temperature (--temperature, default 1) and the sampling temperature (--gen-temperature) are
separate flags and are never mixed. Teacher and student must share a vocabulary.

metrics.jsonl adds per step: div (the loss's divergence term, as in the other scripts), on_policy (bool),
gen_len (mean sampled tokens), cut_frac (share of samples that hit --max-new-tokens without ending), and the
seconds spent sampling (gen_s), in the teacher's forward (teacher_s) and in the student's forward + backward
(student_s).

Held-out evaluation (--eval-data) is off-policy: no samples are drawn for it. eval_loss is this loss
(T^2 * D at --temperature, also logged as eval_div) on the teacher's held-out completions; eval_ce and eval_kl
(KL(teacher || student) at T=1) are measured on the same tokens.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from contextlib import contextmanager
from functools import partial

import torch

import cache_teacher
import checkpoints
import checks
import common
import generation
import losses
import models
import served_teacher
import training


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    method = common.add_train_args(parser, teacher=True, student_default=common.BLOG_STUDENT,
                          teacher_default=common.BLOG_TEACHER, output_dir="runs/on_policy")
    method.add_argument("--lmbda", type=common.FRACTION, default=0.5,
                        help="probability that a step is on-policy (0..1)")
    common.add_divergence_args(method, default="reverse", bare_beta_alias=True)
    method.add_argument("--temperature", type=common.bounded(float, 0, low_open=True), default=1.0,
                        help="softmax temperature of the loss (> 0)")
    method.add_argument("--gen-temperature", type=common.bounded(float, 0, note=" (0 = greedy)"), default=1.0,
                        help="sampling temperature of the student (0 = greedy)")
    method.add_argument("--top-p", type=common.POSITIVE_FRACTION, default=0.95,
                        help="nucleus sampling threshold of the student, in (0, 1]")
    method.add_argument("--max-new-tokens", type=common.POSITIVE_INT, default=256,
                        help="max tokens the student samples per prompt; a sample cut there is trained without an "
                             "end-of-turn token (like a --truncated no-eos row)")
    generation.add_vllm_args(method)
    served_teacher.add_teacher_url_args(method)
    args = parser.parse_args(argv)
    common.resolve_divergence(args, default="reverse", bare_beta_alias=True)
    training.check_eval_args(parser, args, stats=("ce", "div") if args.teacher_url else ("ce", "div", "kl"))
    common.fill_train_defaults(parser, args)
    return args


def encode_with_prompts(rows: list[dict], tokenizer, args, what: str | None = "--data") -> tuple[list[dict], int]:
    """`common.encode_rows`, plus each row's prompt alone with the generation header (`prompt_ids`): what an
    on-policy step samples from, rendered as generate_data.py prompts the teacher. `collate_with_prompts` hands
    them to the loop's batches."""
    examples, skipped = common.encode_rows(rows, tokenizer, args.max_length, what, truncated=args.truncated)
    for example in examples:
        prompt = common.render_chat(tokenizer, rows[example["row"]]["messages"], add_generation_prompt=True)
        example["prompt_ids"] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return examples, skipped


def collate_with_prompts(examples: list[dict], pad_id: int) -> dict:
    return {**common.pad_batch(examples, pad_id), "prompts": [ex["prompt_ids"] for ex in examples]}


def sampled_examples(prompts: list[list[int]], samples: list[dict]) -> list[dict]:
    """Training examples from the student's samples: prompt + sampled tokens, loss on the sampled tokens only.

    `samples[i]["tokens"]` already ends at the first end-of-turn token (kept, so the student is graded on when it
    stops) or is cut at --max-new-tokens; nothing after the end-of-turn token is ever part of an example.
    """
    return [{"input_ids": list(prompt) + sample["tokens"],
             "loss_mask": [0] * len(prompt) + [1] * len(sample["tokens"])}
            for prompt, sample in zip(prompts, samples)]


def sample_step(loop, tokenizer, micro_batches: list[dict], args, stop_ids, sampler=None) -> tuple[list[dict], dict]:
    """Replace one step's micro-batches by the student's own samples for the same prompts (one generate call)."""
    prompts = [p for batch in micro_batches for p in batch["prompts"]]
    student = loop.accelerator.unwrap_model(loop.model)
    if sampler is not None:  # vLLM holds its own copy of the weights (LoRA merged): bring it up to date first
        sampler.load_weights(student)
        sample = sampler.generate
    else:
        sample = partial(generation.generate, student, tokenizer, what="--student")
    samples = sample(prompts, max_new_tokens=args.max_new_tokens, temperature=args.gen_temperature,
                     top_p=args.top_p, stop_ids=stop_ids)
    examples = sampled_examples(prompts, samples)
    batches, lo = [], 0
    for batch in micro_batches:
        n = len(batch["prompts"])
        padded = common.pad_batch(examples[lo:lo + n], tokenizer.pad_token_id)
        batches.append({k: v.to(loop.device) for k, v in padded.items()})
        lo += n
    stats = {"gen_len": sum(len(s["tokens"]) for s in samples) / len(samples),
             "cut_frac": sum(not s["finished"] for s in samples) / len(samples)}
    return batches, stats


def vllm_dtype(model) -> str:
    """The dtype the student's weights are in, for vLLM ("auto" would take the config's, or bfloat16 on a CPU): the
    engine then samples from the model that is trained, not a rounded copy of it."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


class Timer:
    """Wall-clock seconds per phase within one optimizer step."""

    def __init__(self):
        self.seconds = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[f"{phase}_s"] += time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    rows = common.load_distill_rows(args.data, allow_duplicates=args.allow_duplicates)
    student, tokenizer = models.load_model(args.student, dtype=args.dtype, what="--student",
                                           trust_remote_code=args.trust_remote_code)
    examples, skipped = encode_with_prompts(rows, tokenizer, args)
    checks.check_training_data(tokenizer, rows, examples)
    held_out = training.load_held_out(args, rows, tokenizer, encode=lambda r: encode_with_prompts(r, tokenizer, args,
                                                                                                  None))
    inputs = checkpoints.live_teacher_inputs(args.teacher)
    inputs.ignored += ("vllm", "vllm_gpu_memory", "vllm_eager", "teacher_retries", "teacher_timeout")
    if args.teacher_url:  # the server may move between runs; --teacher (its weights' fingerprint) may not
        inputs.adjustable += ("teacher_url",)  # where the samples are drawn, not what is trained
    loop = training.TrainLoop(args, models.maybe_lora(student, args), examples, tokenizer.pad_token_id,
                              partial(collate_with_prompts, pad_id=tokenizer.pad_token_id), held_out=held_out,
                              inputs=inputs, models={"--student": "--dtype", "--teacher": "--teacher-dtype"})
    if args.teacher_url:  # the teacher's top-K from a vLLM server, trained like a top-K cache
        return train_with_served_teacher(args, loop, tokenizer, skipped, rows)
    teacher, teacher_tokenizer = models.load_teacher(args, loop.device)
    head, teacher_head = models.output_head(loop.model), models.output_head(teacher)
    vocab = checks.shared_vocab_size(tokenizer, teacher_tokenizer, head.weight.shape[0],
                                     teacher_head.weight.shape[0])
    checks.warn_template_mismatch(tokenizer, teacher_tokenizer)
    stop_ids = common.end_of_turn_ids(tokenizer)
    beta = common.divergence_beta(args)
    # One coin per optimizer step, the same seed on every process, so all take the same kind of step; a resumed
    # run replays the draws of the steps it skips.
    coin = random.Random(args.seed)
    for _ in range(loop.step_num):
        coin.random()

    def hidden_states(batch, timer):  # [N, H_teacher], [N, H], targets [N]: both models at the completion tokens
        with timer("teacher"), torch.inference_mode():
            teacher_hidden = models.teacher_hidden_states(teacher, batch["input_ids"], batch["attention_mask"])
            teacher_hidden, _ = common.shift_for_next_token(teacher_hidden, batch)
        with timer("student"):
            hidden = models.student_hidden_states(loop.model, batch["input_ids"], batch["attention_mask"])
            return (teacher_hidden, *common.shift_for_next_token(hidden, batch))

    def preflight(batch):  # how far apart the two start; non-finite logits of either stop the run here
        teacher_hidden, student_hidden, _ = hidden_states(batch, Timer())
        checks.preflight(student_hidden, head.weight, teacher_hidden, teacher_head.weight, vocab=vocab,
                         temperature=args.temperature, beta=beta)

    training.preflight(loop, preflight)
    sampler = generation.VLLMSampler(args.student, seed=args.seed, gpu_memory_utilization=args.vllm_gpu_memory,
                                     dtype=vllm_dtype(loop.model),
                                     trust_remote_code=args.trust_remote_code,
                                     enforce_eager=args.vllm_eager) if args.vllm else None

    def objective(batch, num_tokens, held_out=False, timer=None):  # sampled, off-policy and held-out rows alike
        timer = timer or Timer()
        teacher_hidden, student_hidden, targets = hidden_states(batch, timer)
        with timer("student"):
            loss, ce_sum, div_sum = losses.fused_head_loss(
                student_hidden, head.weight, targets, num_tokens, teacher_hidden=teacher_hidden,
                teacher_weight=teacher_head.weight, alpha=0.0, beta=beta, temperature=args.temperature,
                chunk_size=args.chunk_size, vocab=vocab, compute_dtype=torch.bfloat16 if args.bf16 else None)
        if not held_out:
            return loss, {"div": div_sum / num_tokens}
        stats = checks.agreement(student_hidden, head.weight, teacher_hidden, teacher_head.weight, vocab=vocab,
                                 chunk_size=args.chunk_size)  # KL(teacher || student) at T=1
        return loss, {"ce": ce_sum / num_tokens, "div": div_sum / num_tokens, "kl": stats["kl_sum"] / num_tokens}

    for micro_batches, num_tokens in loop:
        timer, stats = Timer(), {}
        on_policy = coin.random() < args.lmbda
        if on_policy:
            with timer("gen"):
                micro_batches, stats = sample_step(loop, tokenizer, micro_batches, args, stop_ids, sampler)
            num_tokens = loop.count_tokens(micro_batches)  # lengths are only known after sampling
        for batch in micro_batches:
            loss, step_stats = objective(batch, num_tokens, timer=timer)
            with timer("student"):  # forward above, backward here
                loop.backward(loss, **step_stats)
        loop.step(num_tokens, evaluate=objective, on_policy=on_policy, **stats, **timer.seconds)

    loop.finish(tokenizer, skipped=skipped, total=len(rows), rows=rows)


def train_with_served_teacher(args, loop, tokenizer, skipped: int, rows: list[dict]) -> None:
    """The same steps with the teacher behind --teacher-url: its top-K log-probabilities and T=1 tail at every
    position of each micro-batch (the student's samples on on-policy steps) are fetched from the server and the loss
    is the top-K bucket divergence of a top-K cache (`cache_teacher.cached_teacher_loss`, alpha 0). Each step's
    requests go out together, so later micro-batches are in flight while the student trains on the first. A server
    that stays unreachable stops the run with a checkpoint of the last complete step (`--resume` continues)."""
    served_teacher.check_temperature(args.teacher_url, [args.temperature])
    served = served_teacher.ServedTeacher(args.teacher_url, top_k=args.teacher_top_k, retries=args.teacher_retries,
                                          timeout=args.teacher_timeout)
    served.check_tokenizer(tokenizer)
    head = models.output_head(loop.model)
    vocab = min(head.weight.shape[0], len(tokenizer))
    stop_ids = common.end_of_turn_ids(tokenizer)
    beta = common.divergence_beta(args)
    coin = random.Random(args.seed)
    for _ in range(loop.step_num):
        coin.random()
    sampler = generation.VLLMSampler(args.student, seed=args.seed, gpu_memory_utilization=args.vllm_gpu_memory,
                                     dtype=vllm_dtype(loop.model),
                                     trust_remote_code=args.trust_remote_code,
                                     enforce_eager=args.vllm_eager) if args.vllm else None

    def objective(batch, num_tokens, held_out=False, timer=None, teacher_rows=None):
        timer = timer or Timer()
        with timer("teacher"):
            rows = teacher_rows.result() if teacher_rows is not None else served.batch_rows(batch)
            teacher = served_teacher.stack_rows(rows, loop.device)
        with timer("student"):
            hidden = models.student_hidden_states(loop.model, batch["input_ids"], batch["attention_mask"])
            student_hidden, targets = common.shift_for_next_token(hidden, batch)
            loss, ce_sum, div_sum = cache_teacher.cached_teacher_loss(
                student_hidden, head.weight, targets, num_tokens, teacher, alpha=0.0, beta=beta,
                temperature=args.temperature, chunk_size=args.chunk_size, vocab=vocab)
        if not held_out:
            return loss, {"div": div_sum / num_tokens}
        return loss, {"ce": ce_sum / num_tokens, "div": div_sum / num_tokens}

    for micro_batches, num_tokens in loop:
        timer, stats = Timer(), {}
        rng = checkpoints._get_rng_state()  # what a checkpoint of the last step holds, should the teacher fail
        try:
            on_policy = coin.random() < args.lmbda
            if on_policy:
                with timer("gen"):
                    micro_batches, stats = sample_step(loop, tokenizer, micro_batches, args, stop_ids, sampler)
                num_tokens = loop.count_tokens(micro_batches)
            requests = [served.prefetch(*served_teacher.batch_request(b)) for b in micro_batches]
            for batch, teacher_rows in zip(micro_batches, requests):
                loss, step_stats = objective(batch, num_tokens, timer=timer, teacher_rows=teacher_rows)
                with timer("student"):
                    loop.backward(loss, **step_stats)
        except common.DistillError as error:
            if not str(error).startswith("--teacher-url"):
                raise
            training.stop_on_teacher_failure(loop, rng, error)
        loop.step(num_tokens, evaluate=objective, on_policy=on_policy, **stats, **timer.seconds)
    loop.finish(tokenizer, skipped=skipped, total=len(rows), rows=rows)


if __name__ == "__main__":
    common.run_main(main)
