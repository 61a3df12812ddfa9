"""Evaluate a model on GSM8K-style problems: greedy answers, exact match on the final number.

    # a distilled student on the GSM8K test split
    python eval.py --model runs/token_fwd --dataset openai/gsm8k --dataset-config main --split test \
        --num-examples 500 --output results.jsonl

    # a LoRA adapter, plus how close the student is to its teacher (same tokenizer)
    python eval.py --model runs/sequence_lora --base Qwen/Qwen2.5-0.5B --teacher Qwen/Qwen2.5-1.5B-Instruct \
        --dataset openai/gsm8k --dataset-config main --split test --output results.jsonl

Each model answers with its own chat template and the same system prompt as generate_data.py. The prediction
and the reference are both reduced by `common.extract_answer` ('#### N', else \\boxed{N}, else the last number).
With --teacher (sharing the student's vocabulary), the teacher also answers the same prompts greedily and the
report adds the mean KL(teacher || student) and top-1 agreement over those held-out teacher completions.
One JSON row per run is appended to --output, and the table of all rows there is printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import common


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(parser)
    parser.add_argument("--model", required=True, help="model to evaluate: hub id, local folder or LoRA adapter")
    parser.add_argument("--base", default=None, help="base model when --model holds a LoRA adapter "
                                                      "(default: the adapter's base_model_name_or_path)")
    parser.add_argument("--name", default=None, help="row name in the results table (default: --model)")
    common.add_prompt_dataset_args(parser, split="test")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="max tokens per answer")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    parser.add_argument("--teacher", default=None, help="also report KL and top-1 agreement to this teacher")
    parser.add_argument("--output", default="results.jsonl", help="JSONL to append this run's row to")
    return parser.parse_args(argv)


def load_for_eval(name: str, base: str | None = None, *, dtype="auto", device="cpu", trust_remote_code=False):
    """A model (or a LoRA adapter merged into its base) and its tokenizer, ready for generation."""
    adapter_config = Path(name) / "adapter_config.json"
    if not adapter_config.exists():
        return common.load_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    from peft import PeftModel

    base = base or json.loads(adapter_config.read_text())["base_model_name_or_path"]
    model, _ = common.load_model(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                 what="--base")
    tokenizer = common.load_tokenizer(name, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(model, name).merge_and_unload(), tokenizer


def exact_match(predictions: list[str], references: list[str | None]) -> float:
    scored = [(common.extract_answer(p), common.extract_answer(r)) for p, r in zip(predictions, references)
              if r is not None and common.extract_answer(r) is not None]
    if not scored:
        raise common.DistillError("no problem has a reference answer with a number (check --answer-field)")
    return sum(pred == ref for pred, ref in scored) / len(scored)


def teacher_agreement(student, tokenizer, teacher, teacher_tokenizer, problems, teacher_texts, *,
                      system_prompt: str) -> dict[str, float] | None:
    """Mean KL(teacher || student) (T=1) and top-1 agreement on the teacher's own completions; None when the
    vocabularies differ (the comparison is undefined)."""
    try:
        vocab = common.shared_vocab_size(tokenizer, teacher_tokenizer, common.output_head(student).weight.shape[0],
                                         common.output_head(teacher).weight.shape[0])
    except common.DistillError:
        return None
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    examples = [common.encode_chat(tokenizer, [*system, {"role": "user", "content": p["prompt"]}], text)
                for p, text in zip(problems, teacher_texts)]
    return common.heldout_agreement(student, teacher, examples, tokenizer.pad_token_id, vocab=vocab)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | exact match | KL(teacher‖model) | top-1 agreement | n |", "|---|---|---|---|---|"]
    for row in rows:
        kl = f"{row['kl_to_teacher']:.3f}" if row.get("kl_to_teacher") is not None else "-"
        top1 = f"{row['top1_agreement']:.1%}" if row.get("top1_agreement") is not None else "-"
        lines.append(f"| {row['name']} | {row['exact_match']:.1%} | {kl} | {top1} | {row['n']} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    problems = common.prompts_from_args(args)
    start = time.time()
    model, tokenizer = load_for_eval(args.model, args.base, dtype=args.dtype, device=device,
                                     trust_remote_code=args.trust_remote_code)
    settings = dict(system_prompt=args.system_prompt, max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size)
    predictions = common.answer_problems(model, tokenizer, problems, desc=f"answer {Path(args.model).name}",
                                         **settings)
    row = {"name": args.name or args.model, "model": args.model, "dataset": args.dataset, "split": args.split,
           "n": len(problems), "exact_match": exact_match(predictions, [p["answer"] for p in problems]),
           "kl_to_teacher": None, "top1_agreement": None}
    if args.teacher:
        teacher, teacher_tokenizer = common.load_model(args.teacher, dtype=args.dtype, device=device,
                                                       what="--teacher", trust_remote_code=args.trust_remote_code)
        teacher_texts = common.answer_problems(teacher, teacher_tokenizer, problems, desc="teacher answers",
                                               **settings)
        stats = teacher_agreement(model, tokenizer, teacher, teacher_tokenizer, problems, teacher_texts,
                                  system_prompt=args.system_prompt)
        if stats is None:
            print("note: teacher and model vocabularies differ; KL and top-1 agreement are not defined")
        else:
            row.update(kl_to_teacher=stats["kl"], top1_agreement=stats["top1"])
    row["seconds"] = round(time.time() - start, 1)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(markdown_table(common.read_jsonl(output, what="--output")))


if __name__ == "__main__":
    common.run_main(main)
