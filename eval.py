r"""Evaluate models on GSM8K-style problems: greedy answers, exact match on the final number, with 95% CIs.

    # the blog's evaluation, every flag at its default: the base student Qwen/Qwen2.5-0.5B and every trained run
    # under runs/ answer the first 100 GSM8K test problems; one row each in results.jsonl, then the table
    python eval.py

    # one model on 500 test problems, keeping every answer for auditing
    python eval.py --model runs/token_level-reverse --num-examples 500 --output results500.jsonl \
        --save-predictions runs/token_level-reverse/predictions.jsonl

    # a LoRA adapter, plus how close the student is to its teacher (same tokenizer)
    python eval.py --model runs/sequence_lora --base Qwen/Qwen2.5-0.5B --teacher Qwen/Qwen2.5-3B-Instruct

    # only print the table of the rows already in results.jsonl
    python -c "import common, eval; print(eval.markdown_table(common.read_jsonl('results.jsonl')))"

Each model answers with its own chat template and the same system prompt as generate_data.py. Answers are scored
by `generation.score_answers` two ways. Strict (the primary number, `exact_match`): the reply must state its answer
as '#### N' or \boxed{N}; a reply cut off before it, or that never states one, is wrong. Lenient
(`exact_match_lenient`): the same, else the last number in the reply. The reference is read leniently ('#### N'
in GSM8K). A '-' counts as a minus sign only where it cannot be a subtraction ('12 - 5' ends on 5, not -5). Both
come with a Wilson 95% confidence interval: on the default 100 problems a score near 40% is uncertain by about
+-10 points (on 500, +-4.3), so smaller differences between two rows are not evidence that one model is better.

With --teacher (sharing the student's vocabulary), the teacher also answers the same prompts greedily and the
report adds the mean KL(teacher || student) and top-1 agreement over those held-out teacher completions.
One JSON row per model is appended to --output, and the table of all rows there is printed. --save-predictions
writes one JSON row per problem (prompt, reply, extracted answers, reference, verdicts) so the score can be
re-checked by hand: the strict score is the mean of strict_ok over the rows whose `reference` is not null.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import checks
import common
import generation
import models


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(parser)
    parser.add_argument("--model", nargs="+", default=None, metavar="MODEL",
                        help="models to evaluate, each a hub id, local folder or LoRA adapter (default: --student "
                             "and every trained run in a folder of --runs)")
    parser.add_argument("--student", default=common.BLOG_STUDENT,
                        help="the base student, evaluated with the runs when --model is left out")
    parser.add_argument("--runs", default="runs",
                        help="when --model is left out, every folder in here that holds a trained model "
                             "(config.json or adapter_config.json) is evaluated")
    parser.add_argument("--base", default=None, help="base model when --model holds a LoRA adapter "
                                                      "(default: the adapter's base_model_name_or_path)")
    parser.add_argument("--name", default=None, help="row name in the results table (default: --model)")
    common.add_prompt_dataset_args(parser, split="test", num_examples=common.BLOG_TEST_PROBLEMS)
    parser.add_argument("--max-new-tokens", type=common.POSITIVE_INT, default=512, help="max tokens per answer")
    parser.add_argument("--batch-size", type=common.POSITIVE_INT, default=32, help="prompts per generate call")
    parser.add_argument("--teacher", default=None, help="also report KL and top-1 agreement to this teacher")
    parser.add_argument("--output", default="results.jsonl", help="JSONL to append each model's row to")
    parser.add_argument("--save-predictions", default=None, metavar="FILE",
                        help="write one JSONL row per problem (prompt, reply, extracted strict and lenient answers, "
                             "reference, strict_ok, lenient_ok) to audit the score (overwrites FILE)")
    args = parser.parse_args(argv)
    for flag, value in (("--name", args.name), ("--save-predictions", args.save_predictions)):
        if value is not None and (args.model is None or len(args.model) > 1):
            parser.error(f"{flag} is about one model's row: give exactly one --model with it")
    return args


def default_models(student: str, runs: str | Path) -> list[str]:
    """What `python eval.py` evaluates with no --model: the base student, then each folder of `runs` that holds
    a finished model or LoRA adapter (a run still training has only checkpoints), by name."""
    folders = sorted(p for p in Path(runs).iterdir() if p.is_dir()) if Path(runs).is_dir() else []
    trained = [str(p) for p in folders if (p / "config.json").is_file() or (p / "adapter_config.json").is_file()]
    if not trained:
        print(f"note: no trained model in '{runs}' yet: evaluating the base student only")
    return [student, *trained]


def load_for_eval(name: str, base: str | None = None, *, dtype="auto", device="cpu", trust_remote_code=False):
    """A model (or a LoRA adapter merged into its base) and its tokenizer, ready for generation."""
    adapter_config = Path(name) / "adapter_config.json"
    if not adapter_config.exists():
        return models.load_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    from peft import PeftModel

    base = base or json.loads(adapter_config.read_text())["base_model_name_or_path"]
    model, _ = models.load_model(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                 what="--base")
    tokenizer = models.load_tokenizer(name, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(model, name).merge_and_unload(), tokenizer


@torch.no_grad()
def heldout_agreement(student, teacher, examples: list[dict], pad_id: int, *, vocab: int | None = None,
                      temperature: float = 1.0, batch_size: int = 8,
                      names: tuple[str, str] = ("the student", "the teacher")) -> dict[str, float]:
    """Mean KL(teacher || student) and top-1 agreement over the completion tokens of `examples`; non-finite
    logits raise DistillError naming the model (`names`)."""
    student_head, teacher_head = models.output_head(student), models.output_head(teacher)
    vocab = vocab or min(student_head.weight.shape[0], teacher_head.weight.shape[0])
    device = next(student.parameters()).device
    total = {"kl_sum": 0.0, "top1_sum": 0.0, "count": 0.0}
    for lo in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in common.pad_batch(examples[lo:lo + batch_size], pad_id).items()}
        # Both models only score here, so the student takes the inference path too.
        s_hidden, _ = common.shift_for_next_token(
            models.teacher_hidden_states(student, batch["input_ids"], batch["attention_mask"]), batch)
        t_hidden, _ = common.shift_for_next_token(
            models.teacher_hidden_states(teacher, batch["input_ids"], batch["attention_mask"]), batch)
        stats = checks.agreement(s_hidden, student_head.weight, t_hidden, teacher_head.weight, vocab=vocab,
                                 temperature=temperature, names=names,
                                 where="on the held-out completions")
        for key in total:
            total[key] += stats[key]
    count = max(total["count"], 1.0)
    return {"kl": total["kl_sum"] / count, "top1": total["top1_sum"] / count, "tokens": int(total["count"])}


def teacher_agreement(student, tokenizer, teacher, teacher_tokenizer, problems, teacher_texts, *,
                      system_prompt: str) -> dict[str, float] | None:
    """Mean KL(teacher || student) (T=1) and top-1 agreement on the teacher's own completions; None when the
    vocabularies differ (the comparison is undefined)."""
    try:
        vocab = checks.shared_vocab_size(tokenizer, teacher_tokenizer, models.output_head(student).weight.shape[0],
                                         models.output_head(teacher).weight.shape[0])
    except common.DistillError:
        return None
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    examples = [common.encode_chat(tokenizer, [*system, {"role": "user", "content": p["prompt"]}], text)
                for p, text in zip(problems, teacher_texts)]
    return heldout_agreement(student, teacher, examples, tokenizer.pad_token_id, vocab=vocab,
                                    names=("--model", "--teacher"))


def score_row(predictions: list[str], references: list[str | None]) -> dict:
    """The exact-match fields of a results row: strict (`exact_match`, the primary score) and lenient fractions,
    their counts and Wilson 95% intervals [low, high], over the `n` problems that have a reference number."""
    s = generation.score_answers(predictions, references)
    return {"n": s["n"], "exact_match": s["strict"], "exact_match_ci": list(s["strict_ci"]),
            "correct": s["strict_correct"], "exact_match_lenient": s["lenient"],
            "exact_match_lenient_ci": list(s["lenient_ci"]), "correct_lenient": s["lenient_correct"]}


def format_score(fraction: float | None, ci, n: int | None = None) -> str:
    """'62.5% [57.7, 67.1]': a fraction and its 95% interval in percent. Without a stored interval, one is
    recomputed from n (rows written before intervals were recorded); '-' when there is no score at all."""
    if fraction is None:
        return "-"
    if ci is None and n:
        ci = generation.wilson_interval(round(fraction * n), n)
    interval = f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci is not None else ""
    return f"{fraction:.1%}{interval}"


# Rows written before strict scoring hold one number from the earlier rule, which fell back to the last number.
OLD_RULE_NOTE = ("\n\n† written before strict scoring: its single exact match used the earlier rule ('#### N', "
                 "\\boxed{N}, else the last number, any '-' read as a sign), so it is shown as lenient.")


def markdown_table(rows: list[dict]) -> str:
    """All rows as a markdown table: strict exact match with its 95% CI first, then lenient, KL, top-1 and n."""
    lines = ["| model | exact match (95% CI) | lenient (95% CI) | KL(teacher‖model) | top-1 agreement | n |",
             "|---|---|---|---|---|---|"]
    old_rows = False
    for row in rows:
        n = row.get("n")
        if "exact_match_lenient" in row:
            strict = format_score(row.get("exact_match"), row.get("exact_match_ci"), n)
            lenient = format_score(row["exact_match_lenient"], row.get("exact_match_lenient_ci"), n)
        else:
            # Never in the strict column, where it would look comparable to (and better than) strict scores.
            old_rows = True
            strict, lenient = "-", format_score(row.get("exact_match"), None, n) + " †"
        kl = f"{row['kl_to_teacher']:.3f}" if row.get("kl_to_teacher") is not None else "-"
        top1 = f"{row['top1_agreement']:.1%}" if row.get("top1_agreement") is not None else "-"
        lines.append(f"| {row['name']} | {strict} | {lenient} | {kl} | {top1} | {n if n is not None else '-'} |")
    return "\n".join(lines) + (OLD_RULE_NOTE if old_rows else "")


def save_predictions(path: str | Path, problems: list[dict], predictions: list[str], *, name: str,
                     model: str) -> None:
    """One JSON row per problem with everything needed to re-check its verdict by hand (see the module doc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for problem, reply in zip(problems, predictions):
            verdict = generation.judge_answer(reply, problem["answer"])
            f.write(json.dumps({"name": name, "model": model, "index": problem["index"], "prompt": problem["prompt"],
                                "reply": reply, "strict": verdict["strict"], "lenient": verdict["lenient"],
                                "reference_text": problem["answer"], "reference": verdict["reference"],
                                "strict_ok": verdict["strict_ok"], "lenient_ok": verdict["lenient_ok"]},
                               ensure_ascii=False) + "\n")


def main(argv=None):
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    problems = common.prompts_from_args(args)
    settings = dict(system_prompt=args.system_prompt, max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size)
    teacher = None
    if args.teacher:  # asked once, whatever the number of models compared to it
        model, tokenizer = models.load_model(args.teacher, dtype=args.dtype, device=device, what="--teacher",
                                             trust_remote_code=args.trust_remote_code)
        teacher = (model, tokenizer, generation.answer_problems(model, tokenizer, problems, desc="teacher answers",
                                                                what="--teacher", **settings))
    output = Path(args.output)
    for name in args.model or default_models(args.student, args.runs):
        row = evaluate_model(args, name, problems, device, settings, teacher)
        output.parent.mkdir(parents=True, exist_ok=True)
        with output.open("a") as f:  # row by row: a failure later keeps the rows already measured
            f.write(json.dumps(row) + "\n")
    print(markdown_table(common.read_jsonl(output, what="--output")))


def evaluate_model(args, name: str, problems: list[dict], device, settings: dict, teacher=None) -> dict:
    """One results row: `name`'s greedy answers scored and, given `teacher` = (model, tokenizer, its answers), its
    KL and top-1 agreement to the teacher."""
    start = time.time()
    model, tokenizer = load_for_eval(name, args.base, dtype=args.dtype, device=device,
                                     trust_remote_code=args.trust_remote_code)
    predictions = generation.answer_problems(model, tokenizer, problems, desc=f"answer {Path(name).name}",
                                             what="--model", **settings)
    label = args.name or name
    row = {"name": label, "model": name, "dataset": args.dataset, "split": args.split,
           **score_row(predictions, [p["answer"] for p in problems]), "kl_to_teacher": None, "top1_agreement": None}
    if args.save_predictions:
        save_predictions(args.save_predictions, problems, predictions, name=label, model=name)
        row["predictions"] = str(args.save_predictions)
    if teacher is not None:
        teacher_model, teacher_tokenizer, teacher_texts = teacher
        stats = teacher_agreement(model, tokenizer, teacher_model, teacher_tokenizer, problems, teacher_texts,
                                  system_prompt=args.system_prompt)
        if stats is None:
            print("note: teacher and model vocabularies differ; KL and top-1 agreement are not defined")
        else:
            row.update(kl_to_teacher=stats["kl"], top1_agreement=stats["top1"])
    row["seconds"] = round(time.time() - start, 1)
    return row


if __name__ == "__main__":
    common.run_main(main)
