r"""Sequence-level distillation: supervised fine-tuning of the student on the teacher's completions.

    # the blog's setup, every flag at its default: the Qwen2.5-0.5B student on data/teacher.jsonl (first run
    # `python generate_data.py`), into runs/sequence_level (`make blog` adds the blog's LoRA and 15 epochs)
    python sequence_level.py

    # held-out loss every 50 steps (eval_loss in metrics.jsonl), keeping the best model in OUTPUT_DIR/best
    python sequence_level.py --eval-data data/teacher_heldout.jsonl --eval-every 50 --save-best eval_loss \
        --epochs 5 --output-dir runs/sequence_level_eval

    # multi-GPU, a LoRA adapter on the attention projections (what `make blog` trains)
    accelerate launch sequence_level.py --data data/teacher.jsonl --lora --lora-r 16 \
        --lora-target-modules q_proj,k_proj,v_proj,o_proj --lr 2e-4 --bf16 --output-dir runs/sequence_level_lora

The loss is next-token cross-entropy on the assistant completion and its closing end-of-turn token only
(system/user text, template headers and padding are masked), averaged over every completion token of the
optimizer step. Only the teacher's text is used: the student may have any tokenizer. With --eval-data, eval_loss
is that cross-entropy on the held-out rows (eval_ce is the same number, logged by every script for comparison).
"""

from __future__ import annotations

import argparse

import torch

import checks
import common
import losses
import models
import training


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_train_args(parser, teacher=False, student_default=common.BLOG_STUDENT,
                          output_dir="runs/sequence_level")
    args = parser.parse_args(argv)
    training.check_eval_args(parser, args, stats=("ce",))
    common.fill_train_defaults(parser, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = common.load_distill_rows(args.data, allow_duplicates=args.allow_duplicates)
    student, tokenizer = models.load_model(args.student, dtype=args.dtype, what="--student",
                                           trust_remote_code=args.trust_remote_code)
    examples, skipped = common.encode_rows(rows, tokenizer, args.max_length, truncated=args.truncated)
    checks.check_training_data(tokenizer, rows, examples)
    loop = training.TrainLoop(args, models.maybe_lora(student, args), examples, tokenizer.pad_token_id,
                              held_out=training.load_held_out(args, rows, tokenizer))
    head = models.output_head(loop.model)

    def objective(batch, num_tokens, held_out=False):  # training and held-out rows alike
        hidden = models.student_hidden_states(loop.model, batch["input_ids"], batch["attention_mask"])
        student_hidden, targets = common.shift_for_next_token(hidden, batch)  # [N, H], [N]
        loss, ce_sum, _ = losses.fused_head_loss(student_hidden, head.weight, targets, num_tokens, alpha=1.0,
                                                 chunk_size=args.chunk_size,
                                                 compute_dtype=torch.bfloat16 if args.bf16 else None)
        return loss, {"ce": ce_sum / num_tokens} if held_out else {}

    for micro_batches, num_tokens in loop:
        for batch in micro_batches:
            loss, stats = objective(batch, num_tokens)
            loop.backward(loss, **stats)
        loop.step(num_tokens, evaluate=objective)

    loop.finish(tokenizer, skipped=skipped, total=len(rows), rows=rows)


if __name__ == "__main__":
    common.run_main(main)
