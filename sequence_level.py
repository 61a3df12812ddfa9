"""Sequence-level distillation: supervised fine-tuning of the student on the teacher's completions.

    # the blog's run: Qwen2.5-0.5B student on Qwen2.5-1.5B-Instruct completions
    python sequence_level.py --student Qwen/Qwen2.5-0.5B --data data/teacher_gsm8k.jsonl \
        --output-dir runs/sequence_level --epochs 2 --batch-size 8 --grad-accum 4 --lr 1e-5

    # held-out loss every 50 steps (eval_loss in metrics.jsonl), keeping the best model in OUTPUT_DIR/best
    python sequence_level.py --student Qwen/Qwen2.5-0.5B --data data/teacher_gsm8k.jsonl \
        --eval-data data/teacher_gsm8k_heldout.jsonl --eval-every 50 --save-best eval_loss \
        --output-dir runs/sequence_level --epochs 5

    # multi-GPU, LoRA adapter
    accelerate launch sequence_level.py --student Qwen/Qwen2.5-0.5B --data data/teacher_gsm8k.jsonl \
        --output-dir runs/sequence_level_lora --lora --lr 2e-4

The loss is next-token cross-entropy on the assistant completion and its closing end-of-turn token only
(system/user text, template headers and padding are masked), averaged over every completion token of the
optimizer step. Only the teacher's text is used: the student may have any tokenizer. With --eval-data, eval_loss
is that cross-entropy on the held-out rows (eval_ce is the same number, logged by every script for comparison).
"""

from __future__ import annotations

import argparse

import common


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_train_args(parser, teacher=False, student_default="Qwen/Qwen2.5-0.5B")
    args = parser.parse_args(argv)
    common.check_eval_args(parser, args, stats=("ce",))
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = common.load_distill_rows(args.data)
    student, tokenizer = common.load_model(args.student, dtype=args.dtype, what="--student",
                                           trust_remote_code=args.trust_remote_code)
    examples, skipped = common.encode_rows(rows, tokenizer, args.max_length, truncated=args.truncated)
    loop = common.TrainLoop(args, common.maybe_lora(student, args), examples, tokenizer.pad_token_id,
                            held_out=common.load_held_out(args, rows, tokenizer))
    head = common.output_head(loop.model)

    def objective(batch, num_tokens, held_out=False):  # training and held-out rows alike
        hidden = common.final_hidden_states(loop.model, batch["input_ids"], batch["attention_mask"])
        student_hidden, targets = common.shift_for_next_token(hidden, batch)  # [N, H], [N]
        loss, ce_sum, _ = common.fused_head_loss(student_hidden, head.weight, targets, num_tokens,
                                                 alpha=1.0, chunk_size=args.chunk_size)
        return loss, {"ce": ce_sum / num_tokens} if held_out else {}

    for micro_batches, num_tokens in loop:
        for batch in micro_batches:
            loss, stats = objective(batch, num_tokens)
            loop.backward(loss, **stats)
        loop.step(num_tokens, evaluate=objective)

    loop.save(tokenizer)
    loop.finish(skipped=skipped, total=len(rows), rows=rows)


if __name__ == "__main__":
    common.run_main(main)
