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
MiniLLM/GKD choice). Otherwise the step is off-policy: the same loss on the teacher's completions from --data (what
token_level.py does with --alpha 0). The loss temperature (--temperature, default 1) and the sampling temperature
(--gen-temperature) are separate flags and are never mixed.

A teacher with another vocabulary (detected from the two tokenizers; one vocabulary keeps the loss above exactly)
grades the student's samples through cross_tokenizer.py's ULD (`other_vocab_side`): each sample is decoded to
text, rendered by the teacher's own chat template, and every student token is paired with the teacher token whose
end character offset is closest; the loss at each is the hybrid ULD (--uld-match, --uld-weighting, --uld-loss,
--top-k; --kl's divergence on the tokens both vocabularies hold) at --temperature, no cross-entropy term. Samples
that end inside a multi-byte character, hold a special token, or whose text the teacher's template changes are
trimmed (or dropped) and counted, never misaligned: metrics.jsonl's exact_end_fraction, same_span_fraction,
samples_trimmed and samples_dropped, and the end-of-run report. Off-policy steps use the teacher's completions
aligned as cross_tokenizer.py aligns them.

    # the Qwen2.5-0.5B student from a teacher with another tokenizer, on that teacher's own answers
    python on_policy.py --teacher HuggingFaceTB/SmolLM2-1.7B-Instruct --data data/teacher_smollm2-1.7b-instruct.jsonl \
        --output-dir runs/on_policy_smollm2

A teacher behind --teacher-url (a vLLM server of the student's vocabulary, served_teacher.py) gives its top-K
log-probabilities at T=1, and the loss is a top-K cache's (`served_teacher_side`). Every kind of teacher trains
through main()'s one loop: what differs is the teacher's side of a step (`TeacherSide`).

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
import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch

import cache_teacher
import checkpoints
import checks
import common
import cross_tokenizer
import generation
import losses
import models
import served_teacher
import teachers
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
    cross_tokenizer.add_uld_args(parser.add_argument_group(
        "a teacher with another tokenizer (hybrid ULD at every sampled token; ignored when the vocabularies match)"))
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
    add_prompt_ids(examples, rows, tokenizer)
    return examples, skipped


def add_prompt_ids(examples: list[dict], rows: list[dict], tokenizer) -> None:
    """Each example's prompt alone with the generation header (`prompt_ids`), from its row (`example["row"]`)."""
    for example in examples:
        prompt = common.render_chat(tokenizer, rows[example["row"]]["messages"], add_generation_prompt=True)
        example["prompt_ids"] = tokenizer(prompt, add_special_tokens=False)["input_ids"]


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


def sample_step(loop, tokenizer, micro_batches: list[dict], args, stop_ids, sampler=None,
                pair=None) -> tuple[list[dict], dict]:
    """Replace one step's micro-batches by the student's own samples for the same prompts (one generate call).
    `pair(micro_batches, prompts, samples)`, with a teacher of another tokenizer, builds the batches instead."""
    prompts = [p for batch in micro_batches for p in batch["prompts"]]
    student = loop.accelerator.unwrap_model(loop.model)
    if sampler is not None:  # vLLM holds its own copy of the weights (LoRA merged): bring it up to date first
        sampler.load_weights(student)
        sample = sampler.generate
    else:
        sample = partial(generation.generate, student, tokenizer, what="--student")
    samples = sample(prompts, max_new_tokens=args.max_new_tokens, temperature=args.gen_temperature,
                     top_p=args.top_p, stop_ids=stop_ids)
    if pair is not None:
        return pair(micro_batches, prompts, samples)
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
    teacher_tokenizer = models.load_tokenizer(args.teacher, trust_remote_code=args.trust_remote_code, what="--teacher")
    same_vocab = checks.vocabulary_checks(tokenizer, teacher_tokenizer, len(tokenizer),
                                          len(teacher_tokenizer))[0] is not None
    if same_vocab:
        examples, skipped, held_out, collate, alignment = encode_same_vocab(args, rows, tokenizer)
    else:  # the teacher's completions aligned to the student's tokens by characters, as cross_tokenizer.py does
        examples, skipped, held_out, collate, alignment = encode_other_vocab(args, rows, tokenizer, teacher_tokenizer)
    inputs = checkpoints.live_teacher_inputs(args.teacher)
    # where the samples are drawn and how the server is reached, not what is trained
    inputs.ignored += ("vllm", "vllm_gpu_memory", "vllm_eager", "teacher_retries", "teacher_timeout")
    if args.teacher_url:  # the server may move between runs; --teacher (its weights' fingerprint) may not
        inputs.adjustable += ("teacher_url",)
    loop = training.TrainLoop(args, models.maybe_lora(student, args), examples, tokenizer.pad_token_id, collate,
                              held_out=held_out, inputs=inputs,
                              models={"--student": "--dtype", "--teacher": "--teacher-dtype"})
    if args.teacher_url:  # the teacher's top-K from a vLLM server, trained like a top-K cache
        teacher = served_teacher_side(args, loop, tokenizer)
    else:  # the teacher in memory
        teacher = (live_teacher_side(args, loop, tokenizer) if same_vocab else
                   other_vocab_side(args, loop, rows, tokenizer, teacher_tokenizer, alignment))
    objective, stop_ids = teacher.objective, common.end_of_turn_ids(tokenizer)
    # One coin per optimizer step, the same seed on every process, so all take the same kind of step; a resumed
    # run replays the draws of the steps it skips.
    coin = random.Random(args.seed)
    for _ in range(loop.step_num):
        coin.random()
    training.preflight(loop, teacher.preflight)  # how far apart the two start; non-finite terms stop the run here
    sampler = generation.VLLMSampler(args.student, seed=args.seed, gpu_memory_utilization=args.vllm_gpu_memory,
                                     dtype=vllm_dtype(loop.model), trust_remote_code=args.trust_remote_code,
                                     enforce_eager=args.vllm_eager) if args.vllm else None

    for micro_batches, num_tokens in loop:
        timer, stats = Timer(), {}
        on_policy = coin.random() < args.lmbda
        if on_policy:
            with timer("gen"):  # sampling (another vocabulary: then decoding and aligning the samples)
                micro_batches, stats = sample_step(loop, tokenizer, micro_batches, args, stop_ids, sampler,
                                                   teacher.pair)
            num_tokens = loop.count_tokens(micro_batches)  # lengths are only known after sampling
        teacher.source.prefetch(micro_batches)  # a served teacher's requests for the whole step go out now
        for batch in micro_batches:
            loss, step_stats = objective(batch, num_tokens, timer=timer)
            with timer("student"):  # forward in the objective, backward here
                loop.backward(loss, **step_stats)
        loop.step(num_tokens, evaluate=objective, on_policy=on_policy, **stats, **teacher.constant, **timer.seconds)
    loop.finish(tokenizer, skipped=skipped, total=len(rows), rows=rows)
    teacher.report()


# ----------------------------------------------------------------------------------------------------------------
# The teacher's side of a step: in memory with the student's vocabulary, served, or another vocabulary (further down).

@dataclass
class TeacherSide:
    """What main()'s one loop asks of the teacher."""

    objective: Callable  # (batch, num_tokens, held_out=False, timer=None) -> (loss, stats), timed into `timer`
    preflight: Callable  # check(batch): what `training.preflight` runs on the first batch
    source: teachers.Source  # where the teacher's side of a batch comes from; the loop calls its `prefetch`
    pair: Callable | None = None  # `sample_step`'s hook: builds the sampled batches (another vocabulary)
    constant: dict = field(default_factory=dict)  # logged with every step (the hybrid match's vocabulary shares)
    report: Callable = lambda: None  # what the end of the run prints after `TrainLoop.finish`


def student_objective(loop, source: teachers.Source, loss: Callable) -> Callable:
    """objective(batch, num_tokens, held_out=False, timer=None): the teacher's side of the batch from `source`, the
    student's hidden states at the batch's completion positions, and `loss(student_hidden [N, H], targets [N],
    num_tokens, teacher, batch, held_out) -> (loss, stats)` on them."""
    def objective(batch, num_tokens, held_out=False, timer=None):  # sampled, off-policy and held-out rows alike
        timer = timer or Timer()
        with timer("teacher"):
            teacher = source(batch)
        with timer("student"):
            hidden = models.student_hidden_states(loop.model, batch["input_ids"], batch["attention_mask"])
            student_hidden, targets = common.shift_for_next_token(hidden, batch)  # [N, H], [N]
            return loss(student_hidden, targets, num_tokens, teacher, batch, held_out)

    return objective


def encode_same_vocab(args, rows: list[dict], tokenizer):
    """(examples, skipped, held_out, collate, alignment=None) of a teacher with the student's vocabulary: the rows
    as token_level.py encodes them, each with its prompt alone (`encode_with_prompts`)."""
    examples, skipped = encode_with_prompts(rows, tokenizer, args)
    checks.check_training_data(tokenizer, rows, examples)
    held_out = training.load_held_out(args, rows, tokenizer,
                                      encode=lambda r: encode_with_prompts(r, tokenizer, args, None))
    return examples, skipped, held_out, partial(collate_with_prompts, pad_id=tokenizer.pad_token_id), None


def live_teacher_side(args, loop, tokenizer) -> TeacherSide:
    """--teacher in memory, with the student's vocabulary: T^2 * D(teacher, student) over the full distributions
    (`losses.fused_head_loss`, alpha 0) at every completion position; held-out rows add ce and kl = KL(teacher ||
    student) at T=1; the full pre-flight (`checks.preflight`)."""
    teacher, teacher_tokenizer = models.load_teacher(args, loop.device)
    head = models.output_head(loop.model)
    vocab = checks.shared_vocab_size(tokenizer, teacher_tokenizer, head.weight.shape[0],
                                     models.output_head(teacher).weight.shape[0])
    checks.warn_template_mismatch(tokenizer, teacher_tokenizer)
    beta = common.divergence_beta(args)
    source = teachers.LiveTeacher(teacher, select=lambda hidden, batch: common.shift_for_next_token(hidden, batch)[0])

    def loss(student_hidden, targets, num_tokens, teacher, batch, held_out):
        loss, ce_sum, div_sum = losses.fused_head_loss(
            student_hidden, head.weight, targets, num_tokens, **teacher, alpha=0.0, beta=beta,
            temperature=args.temperature, chunk_size=args.chunk_size, vocab=vocab,
            compute_dtype=torch.bfloat16 if args.bf16 else None)
        stats = {"div": div_sum / num_tokens}
        if held_out:  # eval_kl: KL(teacher || student) at T=1, whatever this run's divergence
            stats.update(ce=ce_sum / num_tokens, kl=checks.agreement(
                student_hidden, head.weight, **teacher, vocab=vocab, chunk_size=args.chunk_size)["kl_sum"] / num_tokens)
        return loss, stats

    def preflight(batch):
        hidden = models.student_hidden_states(loop.model, batch["input_ids"], batch["attention_mask"])
        checks.preflight(common.shift_for_next_token(hidden, batch)[0], head.weight, **source(batch), vocab=vocab,
                         temperature=args.temperature, beta=beta)

    return TeacherSide(student_objective(loop, source, loss), preflight, source)


def served_teacher_side(args, loop, tokenizer) -> TeacherSide:
    """The teacher behind --teacher-url: its top-K log-probabilities and T=1 tail at every position of each
    micro-batch (the student's samples on on-policy steps) from the server (`teachers.ServedRows`: a step's requests
    go out together), and a top-K cache's bucket divergence (`cache_teacher.cached_teacher_loss`, alpha 0). A server
    that stays unreachable stops the run with a checkpoint of the last complete step (`--resume` continues)."""
    served_teacher.check_temperature(args.teacher_url, [args.temperature])
    served = served_teacher.ServedTeacher(args.teacher_url, top_k=args.teacher_top_k, retries=args.teacher_retries,
                                          timeout=args.teacher_timeout)
    served.check_tokenizer(tokenizer)
    head = models.output_head(loop.model)
    vocab, beta = min(head.weight.shape[0], len(tokenizer)), common.divergence_beta(args)
    # the next step's requests are sent early only when it cannot be sampled: its data batches would go unused
    source = teachers.ServedRows(served, loop, look_ahead=args.lmbda == 0)

    def loss(student_hidden, targets, num_tokens, teacher, batch, held_out):
        loss, ce_sum, div_sum = cache_teacher.cached_teacher_loss(
            student_hidden, head.weight, targets, num_tokens, teacher["cached_rows"], alpha=0.0, beta=beta,
            temperature=args.temperature, chunk_size=args.chunk_size, vocab=vocab)
        stats = {"div": div_sum / num_tokens}
        return loss, {"ce": ce_sum / num_tokens, **stats} if held_out else stats

    objective = student_objective(loop, source, loss)
    # the objective's terms on the first batch (held-out form: with ce)
    return TeacherSide(objective, checks.objective_preflight(objective, "--teacher-url", held_out=True), source)


# ----------------------------------------------------------------------------------------------------------------
# A teacher with another tokenizer: it reads the student's sampled text through its own chat template, and the two
# are compared by cross_tokenizer's hybrid ULD at every student token, aligned by character end offsets.

def decode_sample(tokenizer, prompt_ids: list[int], tokens: list[int], finished: bool) -> dict:
    """The text a sampled completion writes, and each sampled token's character span in it.

    `tokens`: the student's sample, its last token the end-of-turn token when `finished`. The text is what the
    sample adds to the decoded conversation (decoded after the prompt, so that a SentencePiece-style decoder keeps
    the first token's space), and token i ends where the decoded prompt + tokens[:i+1] ends: the sampled tokens
    themselves, not a re-encoding of the text (a sampled segmentation is often not the tokenizer's own, and it is
    what the student is graded on). A byte-level token holding part of a multi-byte character ends where that
    character ends, as a fast tokenizer's offsets have it, and is marked not `clean` (it writes no whole character,
    so no teacher token covers the same text).

    What cannot be aligned is trimmed from the end, never re-segmented, and the reason returned:
      "special"       a special token inside the text (another template would read its name as plain text): the
                      sample is cut before it
      "partial_char"  the text ends inside a multi-byte character or holds bytes that are not UTF-8 (decoding gives
                      U+FFFD; a sampled U+FFFD character is treated alike): cut back to the last token that ends on
                      a character boundary before it
    A trimmed sample loses its end-of-turn token (its text did not end there).
    Returns {"text", "spans" [(start, end)] and "clean" [bool] per kept token (the end-of-turn token last, spanning
    a virtual character past the text as in `common.encode_chat`), "tokens" (the kept ones), "finished" (the
    end-of-turn token kept), "trimmed" (None or the reason)}.
    """
    body, trimmed = list(tokens[:-1] if finished else tokens), None
    special = common._special_ids(tokenizer)
    cut = next((i for i, token in enumerate(body) if token in special), None)
    if cut is not None:
        body, finished, trimmed = body[:cut], False, "special"

    def decode(ids):  # no clean-up: it would move spaces and break the prefix relation between the decodes
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    context = decode(list(prompt_ids))
    written = [decode([*prompt_ids, *body[:n]]) for n in range(1, len(body) + 1)]
    written = [w[len(context):] if w.startswith(context) else None for w in written]
    text = written[-1] if written and written[-1] is not None else ""
    valid = text.find("\ufffd")
    valid = len(text) if valid < 0 else valid
    # ends[i]: where token i's text ends; None when it ends inside a character (its decode is not a prefix).
    ends = [len(w) if w is not None and text.startswith(w) else None for w in written]
    kept = next((n for n in range(len(body), 0, -1) if ends[n - 1] is not None and ends[n - 1] <= valid), 0)
    if kept < len(body):
        finished, trimmed = False, trimmed or "partial_char"
    text = text[:ends[kept - 1]] if kept else ""
    spans, clean, start = [], [], 0
    for i in range(kept):
        end = ends[i] if ends[i] is not None else next(e for e in ends[i + 1:kept] if e is not None)
        spans.append((start, end))
        clean.append(ends[i] is not None and (i == 0 or ends[i - 1] is not None))
        if ends[i] is not None:
            start = end  # inside a character, the next token starts where the character does
    if finished:
        spans.append((len(text), len(text) + 1))
        clean.append(True)
    return {"text": text, "spans": spans, "clean": clean, "tokens": body[:kept] + list(tokens[-1:] if finished else []),
            "finished": finished, "trimmed": trimmed}


def pair_sample(teacher_tokenizer, messages: list[dict], prompt_ids: list[int], decoded: dict) -> tuple[dict, dict]:
    """One decoded sample (`decode_sample`) as a cross_tokenizer training pair (`cross_tokenizer.encode_pairs`'s
    example: input_ids, loss_mask, teacher_ids, teacher_targets, same_span), and its alignment counts.

    The teacher reads `messages` + the sample's text through its own chat template (`common.encode_chat`); each
    student token is paired with the teacher token whose end is closest (`cross_tokenizer.align_by_end_offsets`);
    `same_span` (hybrid identity) also needs the student token `clean`. A template that does not render the text as
    written (Llama 3's trims it) gives the teacher other text: the student tokens outside the characters the teacher
    writes are not trained (those before it stay in the input as context, those after it and the end-of-turn token
    are cut), and the sample counts as trimmed ("template"). A sample with no token left, or whose text the
    template does not render at all, is dropped: it stays in its batch with no target. Counts: {"tokens", "exact",
    "same", "trimmed": None or the reason, "dropped"}.
    """
    text, spans, tokens, finished = decoded["text"], decoded["spans"], decoded["tokens"], decoded["finished"]
    counts = {"tokens": 0, "exact": 0, "same": 0, "trimmed": decoded["trimmed"], "dropped": False}
    try:
        teacher = common.encode_chat(teacher_tokenizer, messages, text, end_of_turn=finished)
    except common.DistillError:  # the template does not render this text at all
        teacher = None
    n_text = len(tokens) - finished
    first = last = 0
    if teacher is not None:
        teacher_spans = teacher["completion_offsets"]
        written = [(s, e) for s, e in teacher_spans[:len(teacher_spans) - finished] if e > s]
        lo, hi = (written[0][0], written[-1][1]) if written else (0, 0)  # the characters the teacher writes
        if (lo, hi) != (0, len(text)):
            counts["trimmed"] = counts["trimmed"] or "template"
            finished = finished and hi == len(text)
            if not finished:
                teacher_spans = teacher_spans[:len(teacher_spans) - decoded["finished"]]
        first = next((i for i in range(n_text) if spans[i][0] >= lo), n_text)
        last = next((i + 1 for i in range(n_text - 1, -1, -1) if spans[i][1] <= hi), 0)
        last = max(first, last)
    targets = list(range(first, last)) + ([n_text] if finished else []) if teacher is not None else []
    if not targets:
        counts["dropped"] = True
        ids = teacher["input_ids"] if teacher is not None else [teacher_tokenizer.pad_token_id]
        return {"input_ids": list(prompt_ids), "loss_mask": [0] * len(prompt_ids), "teacher_ids": ids,
                "teacher_targets": [], "same_span": []}, counts
    student_spans = [spans[i] for i in targets]
    aligned = cross_tokenizer.align_by_end_offsets(student_spans, teacher_spans)
    same = cross_tokenizer.same_spans(student_spans, teacher_spans, aligned)
    same = [flag and decoded["clean"][i] for flag, i in zip(same, targets)]
    teacher_positions = [i for i, m in enumerate(teacher["loss_mask"]) if m]
    kept = tokens[:last] + (tokens[-1:] if finished else [])
    mask = [0] * len(prompt_ids) + [0] * first + [1] * (last - first) + [1] * finished
    counts.update(tokens=len(targets), same=sum(same),
                  exact=sum(s[1] == teacher_spans[j][1] for s, j in zip(student_spans, aligned)))
    return {"input_ids": list(prompt_ids) + kept, "loss_mask": mask, "teacher_ids": teacher["input_ids"],
            "teacher_targets": [teacher_positions[j] for j in aligned], "same_span": same}, counts


def pair_samples(tokenizer, teacher_tokenizer, messages: list[list[dict]], prompts: list[list[int]],
                 samples: list[dict], totals: Counter) -> tuple[list[dict], dict]:
    """`pair_sample` for one step's samples; returns the examples and the step's alignment statistics for
    metrics.jsonl (exact_end_fraction, same_span_fraction over the trained tokens; samples_trimmed, samples_dropped),
    and adds to `totals` (the end-of-run report's counts by reason)."""
    examples, step = [], Counter()
    for conversation, prompt, sample in zip(messages, prompts, samples):
        decoded = decode_sample(tokenizer, prompt, sample["tokens"], sample["finished"])
        example, counts = pair_sample(teacher_tokenizer, conversation, prompt, decoded)
        examples.append(example)
        step.update(tokens=counts["tokens"], exact=counts["exact"], same=counts["same"],
                    trimmed=counts["trimmed"] is not None and not counts["dropped"], dropped=counts["dropped"])
        totals.update(["samples"] + ([counts["trimmed"]] if counts["trimmed"] else []) +
                      (["dropped"] if counts["dropped"] else []))
    stats = {"gen_len": sum(len(s["tokens"]) for s in samples) / len(samples),
             "cut_frac": sum(not s["finished"] for s in samples) / len(samples),
             "exact_end_fraction": step["exact"] / max(step["tokens"], 1),
             "same_span_fraction": step["same"] / max(step["tokens"], 1),
             "samples_trimmed": step["trimmed"], "samples_dropped": step["dropped"]}
    return examples, stats


def collate_pairs_with_prompts(examples: list[dict], pad_id: int, teacher_pad_id: int) -> dict:
    return {**cross_tokenizer.collate_pairs(examples, pad_id, teacher_pad_id),
            "prompts": [ex["prompt_ids"] for ex in examples], "rows": [ex["row"] for ex in examples]}


def sample_report(totals: Counter) -> str:
    return (f"on-policy samples: {totals['samples']} drawn; trimmed {totals['special']} at a special token, "
            f"{totals['partial_char']} inside a character, {totals['template']} where the teacher's chat template "
            f"changes the text; {totals['dropped']} dropped (nothing left to align)")


def encode_other_vocab(args, rows: list[dict], tokenizer, teacher_tokenizer):
    """(examples, skipped, held_out, collate, alignment) of a teacher with another vocabulary: the rows as
    cross_tokenizer.py pairs them (`cross_tokenizer.encode_pairs`), each with its prompt alone; `alignment`: how
    --data's tokens align (printed here, written to alignment.json by `other_vocab_side`)."""
    if args.save_best == "eval_kl":
        raise common.DistillError("--save-best eval_kl: the teacher has another vocabulary, so there is no "
                                  "token-level KL; use eval_loss or eval_ce")
    if args.teacher_url:
        raise common.DistillError(f"--teacher-url: --teacher {args.teacher} has another vocabulary than --student, "
                                  "and a served teacher's top-K rows are read by the student's token ids; without "
                                  "--teacher-url the teacher is loaded here and grades through hybrid ULD")

    def encode(encode_rows, what="--data"):
        examples, skipped, alignment = cross_tokenizer.encode_pairs(encode_rows, tokenizer, teacher_tokenizer,
                                                                    args.max_length, what, truncated=args.truncated)
        add_prompt_ids(examples, encode_rows, tokenizer)
        return examples, skipped, alignment

    examples, skipped, alignment = encode(rows)
    checks.check_unknown_targets(tokenizer, rows, examples)
    print(f"the teacher has another tokenizer: hybrid ULD on the sampled tokens ('{args.uld_match}' matching); "
          f"on --data, {alignment['exact_end_fraction']:.1%} of student tokens end where their teacher token ends, "
          f"{alignment['same_span_fraction']:.1%} cover the same characters")
    held_out = training.load_held_out(args, rows, tokenizer, encode=lambda r: encode(r, None)[:2])
    collate = partial(collate_pairs_with_prompts, pad_id=tokenizer.pad_token_id,
                      teacher_pad_id=teacher_tokenizer.pad_token_id)
    return examples, skipped, held_out, collate, alignment


def other_vocab_side(args, loop, rows: list[dict], tokenizer, teacher_tokenizer, alignment: dict) -> TeacherSide:
    """--teacher in memory, with another vocabulary: GKD whose divergence is cross_tokenizer's ULD (hybrid by
    default: --kl's divergence by token identity where both vocabularies hold the token, sorted top-K + tail for
    the rest), at --temperature, with no cross-entropy term (alpha 0, as with one vocabulary).

    Sampled steps: each sample is decoded, read by the teacher through its own chat template and aligned by
    character end offsets (`pair_step`). Off-policy steps and held-out rows: the teacher's completions of --data,
    aligned as cross_tokenizer.py aligns them (`encode_other_vocab`). metrics.jsonl adds the hybrid match's
    vocabulary shares, and on sampled steps exact_end_fraction, same_span_fraction, samples_trimmed and
    samples_dropped; held-out evaluation logs eval_ce and eval_div (no eval_kl: the distributions are over
    different tokens). The pre-flight prints the objective's terms on the first batch.
    """
    teacher, _ = models.load_teacher(args, loop.device)
    head, teacher_head = models.output_head(loop.model), models.output_head(teacher)
    # Padded head rows are not tokens: neither distribution gives them mass.
    vocabs = dict(student_vocab=min(len(tokenizer), head.weight.shape[0]),
                  teacher_vocab=min(len(teacher_tokenizer), teacher_head.weight.shape[0]))
    match = cross_tokenizer.build_match(tokenizer, teacher_tokenizer, **vocabs) if args.uld_match == "hybrid" else None
    shares = match.shares() if match is not None else {}
    if loop.accelerator.is_main_process:
        (loop.output_dir / "alignment.json").write_text(json.dumps({**alignment, **shares}, indent=2) + "\n")
    options = dict(alpha=0.0, top_k=args.top_k, temperature=args.temperature, kind=args.uld_loss,
                   chunk_size=args.chunk_size, beta=common.divergence_beta(args), weighting=args.uld_weighting)
    source = teachers.LiveTeacher(teacher, inputs=("teacher_input_ids", "teacher_attention_mask"),
                                  select=lambda hidden, batch: hidden.flatten(0, 1)[batch["teacher_rows"]])

    def loss(student_hidden, targets, num_tokens, teacher, batch, held_out):
        hybrid = dict(match=match, identity=batch["identity"]) if match is not None else {}
        loss, ce_sum, div_sum, mass_sums = cross_tokenizer.chunked_uld_and_ce(
            student_hidden, head.weight, targets, num_tokens, **teacher, **vocabs, **hybrid, **options)
        if not len(targets):  # every sample of this micro-batch dropped: a zero loss that still has a graph
            loss = loss + student_hidden.sum() * 0.0
        return loss, cross_tokenizer.step_stats(ce_sum, div_sum, mass_sums, num_tokens, held_out)

    objective, totals = student_objective(loop, source, loss), Counter()  # totals: the samples, by what was trimmed

    def report():
        if totals["samples"] and loop.accelerator.is_main_process:
            print(sample_report(totals))

    return TeacherSide(objective, checks.objective_preflight(objective), source,
                       pair=partial(pair_step, loop, rows, tokenizer, teacher_tokenizer, totals),
                       constant={k: v for k, v in shares.items() if k != "matched_tokens"},  # matched_vocab_*
                       report=report)


def pair_step(loop, rows: list[dict], tokenizer, teacher_tokenizer, totals: Counter, micro_batches: list[dict],
              prompts: list[list[int]], samples: list[dict]) -> tuple[list[dict], dict]:
    """`sample_step`'s hook with another vocabulary: the step's samples paired (`pair_samples`), as its batches."""
    messages = [rows[r]["messages"] for batch in micro_batches for r in batch["rows"]]
    examples, stats = pair_samples(tokenizer, teacher_tokenizer, messages, prompts, samples, totals)
    batches, lo = [], 0
    for batch in micro_batches:
        n = len(batch["prompts"])
        batches.append(loop.to_device(cross_tokenizer.collate_pairs(examples[lo:lo + n], tokenizer.pad_token_id,
                                                                    teacher_tokenizer.pad_token_id)))
        lo += n
    return batches, stats


if __name__ == "__main__":
    common.run_main(main)
