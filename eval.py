r"""Evaluate models on GSM8K-style problems: greedy answers, exact match on the final number, with 95% CIs.

    # the blog's evaluation, every flag at its default: the base student Qwen/Qwen2.5-0.5B and every trained run
    # under runs/ answer the first 100 GSM8K test problems; one row each in results.jsonl, then the table
    python eval.py

    # one model on 500 test problems, keeping every answer for auditing
    python eval.py --model runs/token_level-reverse --num-examples 500 --output results500.jsonl \
        --save-predictions runs/token_level-reverse/predictions.jsonl

    # a LoRA adapter, plus how close the student is to its teacher (same tokenizer)
    python eval.py --model runs/sequence_lora --base Qwen/Qwen2.5-0.5B --teacher Qwen/Qwen2.5-3B-Instruct

    # sampled evaluation beside greedy: 8 answers per problem at T=0.7, pass@8 and majority-vote@8 with 95% CIs
    python eval.py --model runs/token_level-reverse --samples 8 --temperature 0.7

    # only print the table of the rows already in results.jsonl
    python -c "import common, eval; print(eval.markdown_table(common.read_jsonl('results.jsonl')))"

Each model answers with its own chat template and the same system prompt as generate_data.py. Answers are scored
by `generation.score_answers` two ways. Strict (the primary number, `exact_match`): the reply must state its answer
as '#### N' or \boxed{N}; a reply cut off before it, or that never states one, is wrong. Lenient
(`exact_match_lenient`): the same, else the last number in the reply. The reference is read leniently ('#### N'
in GSM8K). A '-' counts as a minus sign only where it cannot be a subtraction ('12 - 5' ends on 5, not -5). Both
come with a Wilson 95% confidence interval: on the default 100 problems a score near 40% is uncertain by about
+-10 points (on 500, +-4.3), so smaller differences between two rows are not evidence that one model is better.

Greedy decoding is one point of a model's answer distribution, and two models' greedy ranking can differ from
their sampled one. --samples K also draws K answers per problem at --temperature/--top-p (seeded by --seed, so a
re-run draws the same answers) and adds, beside the greedy score: pass@K, the share of problems with at least one
strictly correct answer among the K (Chen et al. 2021's unbiased estimator 1 - C(n-c, K)/C(n, K) with n = K
draws, which is exactly that share), maj@K, the share whose majority vote of the K strict answers is correct (a
reply without a final answer does not vote; ties go to the answer that appeared first), both with Wilson 95%
intervals over the problems, and the mean accuracy of single samples (pass@1 estimated from the K draws, no
interval: the draws of one problem are not independent trials of the whole set).

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
    parser.add_argument("--samples", type=common.bounded(int, 0), default=0, metavar="K",
                        help="also draw K answers per problem and report pass@K and majority-vote@K with 95%% CIs "
                             "beside greedy (0: greedy only)")
    parser.add_argument("--temperature", type=common.bounded(float, 0, low_open=True), default=1.0,
                        help="sampling temperature of the --samples draws (> 0)")
    parser.add_argument("--top-p", type=common.POSITIVE_FRACTION, default=1.0,
                        help="nucleus threshold of the --samples draws, in (0, 1] (1 = the whole distribution)")
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


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021), "Evaluating Large Language Models Trained on Code": the unbiased estimate, from n draws
    of which c are correct, of the probability that at least one of k draws is correct:
    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) (no huge binomials). k <= n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1 - k / i
    return 1.0 - miss


def majority_vote(answers: list[str | None]) -> str | None:
    """The most frequent answer among `answers` (None, a reply without a final answer, does not vote); a tie goes
    to the tied answer that appeared first. None when no answer votes."""
    counts: dict[str, int] = {}
    for answer in answers:
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    return max(counts, key=counts.get) if counts else None  # max keeps the first of equal counts (insertion order)


def score_samples(samples: list[list[str]], references: list[str | None]) -> dict:
    """pass@k and maj@k of k sampled replies per problem (k = len(samples[i]), the same for every problem), strict
    answers (`generation.judge_answer`), over the problems whose reference holds a number. Returns k, n, the
    counts, the fractions and their Wilson 95% intervals, and sample_accuracy (the mean share of correct draws)."""
    if len(samples) != len(references):
        raise common.DistillError(f"{len(samples)} problems' samples for {len(references)} references")
    k = len(samples[0]) if samples else 0
    if k == 0 or any(len(s) != k for s in samples):
        raise common.DistillError("every problem needs the same number (>= 1) of sampled replies")
    passed = voted = n = 0
    accuracy = 0.0
    for replies, reference in zip(samples, references):
        judged = [generation.judge_answer(r, reference) for r in replies]
        if judged[0]["reference"] is None:
            continue
        n += 1
        correct = sum(j["strict_ok"] for j in judged)
        passed += pass_at_k(k, correct, k) == 1.0  # n = k draws: the estimator is 0 or 1
        voted += majority_vote([j["strict"] for j in judged]) == judged[0]["reference"]
        accuracy += pass_at_k(k, correct, 1)
    if n == 0:
        raise common.DistillError("no problem has a reference answer with a number (check --answer-field)")
    return {"samples": k, "n": n, "pass_at_k_correct": passed, "maj_at_k_correct": voted,
            "pass_at_k": passed / n, "pass_at_k_ci": list(generation.wilson_interval(passed, n)),
            "maj_at_k": voted / n, "maj_at_k_ci": list(generation.wilson_interval(voted, n)),
            "sample_accuracy": accuracy / n}


def sampled_scores(model, tokenizer, problems: list[dict], k: int, temperature: float, *, seed: int = 0,
                   system_prompt: str, max_new_tokens: int, batch_size: int, top_p: float = 1.0,
                   desc: str = "sample", what: str = "--model", keep_replies: bool = False) -> dict:
    """Draw k replies per problem at `temperature`/`top_p` and score them (`score_samples`): pass@k and maj@k with
    Wilson 95% intervals, and the settings (sample_temperature, sample_top_p, sample_seed). The draws come from a
    generator seeded with `seed` inside `torch.random.fork_rng`, so they are reproducible and the caller's random
    state is left as it was. keep_replies adds `replies` (k per problem) for --save-predictions."""
    if k < 1 or temperature <= 0:
        raise common.DistillError(f"sampled evaluation needs k >= 1 and temperature > 0, got k={k}, "
                                  f"temperature={temperature}")
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        replies = generation.answer_problems(model, tokenizer, [p for p in problems for _ in range(k)],
                                             system_prompt=system_prompt, max_new_tokens=max_new_tokens,
                                             batch_size=batch_size, desc=desc, what=what, temperature=temperature,
                                             top_p=top_p)
    grouped = [replies[i * k:(i + 1) * k] for i in range(len(problems))]
    scores = score_samples(grouped, [p["answer"] for p in problems])
    scores.update(sample_temperature=temperature, sample_top_p=top_p, sample_seed=seed)
    if keep_replies:
        scores["replies"] = grouped
    return scores


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
    sampled = any(row.get("samples") for row in rows)
    lines = ["| model | exact match (95% CI) | lenient (95% CI) | KL(teacher‖model) | top-1 agreement | n |"
             + (" pass@k (95% CI) | maj@k (95% CI) | k, T |" if sampled else ""),
             "|---|---|---|---|---|---|" + ("---|---|---|" if sampled else "")]
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
        line = f"| {row['name']} | {strict} | {lenient} | {kl} | {top1} | {n if n is not None else '-'} |"
        if sampled and row.get("samples"):
            line += (f" {format_score(row['pass_at_k'], row['pass_at_k_ci'])} |"
                     f" {format_score(row['maj_at_k'], row['maj_at_k_ci'])} |"
                     f" {row['samples']}, {row['sample_temperature']:g} |")
        elif sampled:
            line += " - | - | - |"
        lines.append(line)
    return "\n".join(lines) + (OLD_RULE_NOTE if old_rows else "")


def save_predictions(path: str | Path, problems: list[dict], predictions: list[str], *, name: str,
                     model: str, samples: list[list[str]] | None = None) -> None:
    """One JSON row per problem with everything needed to re-check its verdict by hand (see the module doc); with
    `samples` (--samples), also the problem's sampled replies and their strict answers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for n, (problem, reply) in enumerate(zip(problems, predictions)):
            verdict = generation.judge_answer(reply, problem["answer"])
            row = {"name": name, "model": model, "index": problem["index"], "prompt": problem["prompt"],
                   "reply": reply, "strict": verdict["strict"], "lenient": verdict["lenient"],
                   "reference_text": problem["answer"], "reference": verdict["reference"],
                   "strict_ok": verdict["strict_ok"], "lenient_ok": verdict["lenient_ok"]}
            if samples is not None:
                row.update(samples=samples[n], sample_answers=[generation.extract_answer(r, strict=True)
                                                               for r in samples[n]])
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


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
    samples = None
    if args.samples:
        found = sampled_scores(model, tokenizer, problems, args.samples, args.temperature, seed=args.seed,
                               top_p=args.top_p, system_prompt=settings["system_prompt"],
                               max_new_tokens=settings["max_new_tokens"], batch_size=settings["batch_size"],
                               desc=f"sample {Path(name).name}", keep_replies=bool(args.save_predictions))
        samples = found.pop("replies", None)
        del found["n"]  # the same problems as the greedy score's n
        row.update(found)
    if args.save_predictions:
        save_predictions(args.save_predictions, problems, predictions, name=label, model=name, samples=samples)
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
