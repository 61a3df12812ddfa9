"""The offline demo: a pretrained base student lifted toward its teacher by the four distillation methods.

    make demo                  # = python demo.py (creates .venv first); about 10 minutes on 2 cores
    python demo.py --quick     # tiny sizes: a smoke test in about a minute (CI runs it)
    python demo.py --seeds 3   # the student stage for seeds 0, 1, 2: mean +- std per method (~3x the student stage)
    python demo.py --out DIR   # where everything goes (default demo_out/); re-running reuses finished stages

It reproduces the blog's situation on a CPU. The blog's students are pretrained base models: they know language and
some arithmetic but not the task's answer format, so a base model scores ~9% and distillation lifts it to ~40%.
Here, in minutes instead of GPU hours:
  1. pretraining: tiny random-init models learn the domain from plain text that is *not* the chat task -- prose
     and equations over the same facts ("7 * 8 = 56", "Ana had 9 cups and gave 4 to Ben. That left 9 - 4 = 5
     cups."), with no chat template, no system prompt and no '#### N' convention. Three models see the same text:
     the teacher (3 layers, d=128), the student (2 layers, d=64, the teacher's tokenizer) and a second student
     (2 layers, d=64, a SentencePiece-style tokenizer) for cross-tokenizer distillation.
  2. the teacher is instruction-tuned on the task (SFT on reference solutions) until held-out exact match >= 90%
  3. generate_data.py: the teacher answers the training prompts (greedy) -> teacher_data.jsonl; and a dev set
  4. each method distils the teacher into the pretrained student with the same data, steps and learning rate,
     tracking held-out loss and exact match on the dev set during training (--eval-data/--eval-problems); and
     the recipe GKD starts from: sequence_level for half the steps, then on_policy from that student for the other
     half (the same total steps), with the first stage alone as its own row
  5. every model answers the test problems: strict exact match ('#### N' only) with a 95% Wilson interval, the
     lenient score (last number), KL(teacher || model) and top-1 agreement where the vocabularies match, and
     where a reply's first wrong step is (stepcheck.py: the calculation or the '#### N' line, and why);
     written to OUT/results.md, results.json and results.png (loss, held-out exact match vs step, accuracies)
  6. explain.py draws what each method transferred, from these models, into OUT/figures/ (a PNG and the JSON of its
     numbers each): mechanisms, alignment, logit_lens, attention_heads, first_token, stepmix
What it shows: each method teaches a model that already knows the facts the task's format and the teacher's way
of answering. What it does not show: which method is best on real models (the task is small and easy for the
teacher; one seed; differences of a few points are inside the intervals).
The numbers are whatever this machine measures; nothing is tuned to make one method win.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import common  # noqa: E402
import cross_tokenizer  # noqa: E402
import eval as evaluate  # noqa: E402
import explain  # noqa: E402
import generate_data  # noqa: E402
import generation  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import on_policy  # noqa: E402
import plot_metrics  # noqa: E402
import sequence_level  # noqa: E402
import stepcheck  # noqa: E402
import tiny  # noqa: E402
import token_level  # noqa: E402
import training  # noqa: E402

SYSTEM_PROMPT = "Solve the math word problem. Show the calculation, then give the answer as '#### <number>'."
DEMO_VERSION = 2  # bump when a stage changes what it produces, so old demo folders are not reused
SIZES = {  # full, quick (a smoke test of every stage: its models learn little)
    "train_problems": (2000, 200), "dev_problems": (100, 16), "test_problems": (400, 24),
    "teacher_data": (800, 32), "pretrain_texts": (20000, 320),
    "teacher_pretrain_steps": (1000, 10), "student_pretrain_steps": (1000, 10),
    "teacher_steps": (400, 10), "teacher_extra_rounds": (2, 0), "student_steps": (400, 8), "eval_every": (50, 4),
}
NAMES = ["Ana", "Ben", "Cleo", "Dev", "Emma", "Finn", "Gita", "Hugo", "Ines", "Jon", "Kai", "Lea"]
ITEMS = ["apples", "pens", "cards", "eggs", "coins", "books", "cups", "toys"]
BOXES = ["boxes", "bags", "jars", "packs"]
MODELS = {  # name -> (kit tokenizer folder, arch, size); the kit's own random models are not used
    "teacher": ("teacher", "qwen2", dict(hidden=128, layers=3, heads=4, kv_heads=2, seed=11)),
    "student": ("student", "qwen2", dict(hidden=64, layers=2, heads=4, kv_heads=2, seed=12)),
    "student_other_tokenizer": ("student_nosys", "llama", dict(hidden=64, layers=2, heads=4, kv_heads=2, seed=13)),
}


def make_problem(rng: random.Random) -> tuple[str, str]:
    """One short word problem over single-digit facts: (question, solution ending in '#### N').

    The numbers are kept small (one-digit operands, results up to 81) so that a 1M-parameter teacher can learn
    the task on a CPU in minutes; the sentence templates, names and items vary so that copying is needed too.
    """
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    kind = rng.randrange(4)
    if kind == 0:
        c = a + b
        question = f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have now?"
        step = f"{a} + {b} = {c}"
    elif kind == 1:
        c = a
        question = f"{name} had {a + b} {item} and gave {b} to {other}. How many {item} are left?"
        step = f"{a + b} - {b} = {c}"
    elif kind == 2:
        c = a * b
        question = f"{name} buys {a} {rng.choice(BOXES)} with {b} {item} in each. How many {item} is that?"
        step = f"{a} * {b} = {c}"
    else:
        c = a
        question = f"{name} shares {a * b} {item} equally among {b} friends. How many {item} does each friend get?"
        step = f"{a * b} / {b} = {c}"
    return question, f"{step}\n#### {c}"


def make_pretraining_text(rng: random.Random) -> str:
    """One document of the pretraining corpus: the task's facts and vocabulary as plain prose and equations.

    Deliberately *not* the chat task: no chat template, no system prompt and no '#### N' answer line, and the
    worked questions are paraphrases, not the task's question templates. It holds equations ('7 * 8 = 56'), short
    stories that state their arithmetic, and textbook-style 'Q: ... A: ...' worked examples. A model that learns
    this knows the arithmetic and how a story maps to an equation -- like a pretrained base model that has read
    math text on the web -- but not how to answer a chat prompt or where the final answer goes.
    """
    name, other = rng.sample(NAMES, 2)
    item, box = rng.choice(ITEMS), rng.choice(BOXES)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    pairs = [(rng.randint(2, 9), rng.randint(2, 9)) for _ in range(3)]
    if rng.random() < 0.4:
        return rng.choice([
            f"Q: If {name} has {a} {item} and gets {b} more, how many {item} are there? "
            f"A: {a} + {b} = {a + b}. There are {a + b} {item}.",
            f"Q: {name} gives {b} of {a + b} {item} to {other}. How many remain? A: {a + b} - {b} = {a}. "
            f"{a} {item} remain.",
            f"Q: What do {a} {box} of {b} {item} make? A: {a} * {b} = {a * b}. That makes {a * b} {item}.",
            f"Q: {a * b} {item} shared by {b} people gives each how many? A: {a * b} / {b} = {a}. "
            f"Each gets {a} {item}.",
        ])
    return rng.choice([
        f"{a} + {b} = {a + b}. {a + b} - {b} = {a}. {a} * {b} = {a * b}. {a * b} / {b} = {a}.",
        " ".join(f"{x} * {y} = {x * y}." for x, y in pairs),
        " ".join(f"{x} + {y} = {x + y}." for x, y in pairs),
        f"{name} had {a} {item}. Then {other} gave {name} {b} more {item}, so {name} had {a} + {b} = {a + b} {item}.",
        f"{name} had {a + b} {item} and gave {b} of them to {other}. That left {a + b} - {b} = {a} {item}.",
        f"{name} bought {a} {box} of {item} with {b} in each, which made {a} * {b} = {a * b} {item}.",
        f"{name} shared {a * b} {item} equally among {b} friends, and each friend got {a * b} / {b} = {a} {item}.",
        f"There are {a} {box}. Each holds {b} {item}. In all: {a} * {b} = {a * b} {item}.",
    ])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="output folder (re-used across runs)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in about a minute")
    parser.add_argument("--seed", type=int, default=0, help="seed for the task, the models and training")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run the student stage (distillation + evaluation) for this many seeds and report "
                             "mean +- standard deviation per method (teacher and base models are shared)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    return args


def claim_output(out: Path, settings: dict) -> None:
    """Finished stages are reused on a re-run (an interrupted demo picks up where it stopped), so they must come
    from the same settings: a folder written with other sizes, seed or demo version is refused, not mixed in."""
    marker = out / "demo_settings.json"
    if out.exists() and any(out.iterdir()):
        if not marker.exists() or json.loads(marker.read_text()) != settings:
            raise common.DistillError(f"{out} holds a demo made with other settings (see {marker}); delete that "
                                      "folder or pass --out NEW")
        return
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings, indent=1) + "\n")


def write_jsonl(path: Path, rows) -> Path:
    """Write rows to `path` through a temporary file, so an interrupted demo never leaves half a file behind."""
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    return path


def write_task(path: Path, n: int, seed: int) -> Path:
    """{"question", "answer"} rows, GSM8K's layout, so generate_data.py and eval.py read them unchanged."""
    rng = random.Random(seed)
    return write_jsonl(path, ({"question": q, "answer": s} for q, s in (make_problem(rng) for _ in range(n))))


def reference_rows(task: Path, out: Path) -> Path:
    """The task's own solutions as distill rows: what the teacher learns the task from."""
    return write_jsonl(out, ({"id": f"ref-{i}", "completion": row["answer"], "messages": [
        {"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": row["question"]}]}
        for i, row in enumerate(common.read_jsonl(task))))


def continue_flags(folder: Path) -> list[str]:
    """An interrupted stage continues from its last checkpoint; one cut before its first starts over."""
    return ["--resume", str(folder)] if any(folder.glob("checkpoint-*")) else ["--overwrite"]


def train_once(script, output_dir: Path, argv: list[str]) -> Path:
    """Run a training script unless a finished run is already there (an interrupted one resumes)."""
    if not (output_dir / "config.json").exists():
        script.main([*argv, "--output-dir", str(output_dir), "--save-every", "100", *continue_flags(output_dir)])
    return output_dir


def pretrain(name: str, kit: dict, corpus: Path, out: Path, steps: int, seed: int) -> Path:
    """Causal-LM pretraining of a random-init model on the plain-text corpus: every token is a target.

    The same TrainLoop as the training scripts (AdamW, cosine schedule, checkpoints every 100 steps), so an
    interrupted pretraining resumes; the step is sequence_level's with a mask over the whole text.
    """
    folder = out / f"{name}_base"
    if (folder / "config.json").exists():
        return folder
    kit_folder, arch, size = MODELS[name]
    tokenizer = models.load_tokenizer(str(kit[kit_folder]))
    init = out / f"{name}_init"
    if not (init / "config.json").exists():
        tiny.save_model(init, tiny.build_model(arch, tokenizer, **{**size, "seed": size["seed"] + seed}), tokenizer)
    model, tokenizer = models.load_model(str(init))
    examples = []
    for row in common.read_jsonl(corpus):
        # BOS where the tokenizer adds one, and EOS: documents end, as in real pretraining data.
        ids = tokenizer(row["text"], add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        examples.append({"input_ids": ids, "loss_mask": [0] + [1] * (len(ids) - 1), "prompt_ids": []})
    args = sequence_level.parse_args([
        "--student", str(init), "--data", str(corpus), "--output-dir", str(folder), "--max-steps", str(steps),
        "--batch-size", "32", "--lr", "3e-3", "--warmup-ratio", "0.05", "--log-every", "250", "--seed", str(seed),
        "--save-every", "100", *continue_flags(folder)])
    loop = training.TrainLoop(args, model, examples, tokenizer.pad_token_id)
    head = models.output_head(loop.model)
    for micro_batches, num_tokens in loop:
        for batch in micro_batches:
            hidden = models.student_hidden_states(loop.model, batch["input_ids"], batch["attention_mask"])
            hidden, targets = common.shift_for_next_token(hidden, batch)
            loss, _, _ = losses.fused_head_loss(hidden, head.weight, targets, num_tokens, alpha=1.0)
            loop.backward(loss)
        loop.step(num_tokens)
    loop.finish(tokenizer, skipped=0, total=len(examples))
    return folder


# Sampled evaluation of the students: maj@k and pass@k of SAMPLES replies per problem at temperature 1
SAMPLES = 4


def score(model_dir: Path, problems: list[dict], teacher=None, predictions_path: Path | None = None,
          sampled: bool = False) -> dict:
    """Held-out strict and lenient exact match (with 95% intervals) of a model, and its KL / top-1 agreement to
    the teacher where vocabularies match; `sampled`: also maj@SAMPLES and pass@SAMPLES at temperature 1
    (`eval.sampled_scores`). Every greedy reply is written to `predictions_path` for auditing."""
    model, tokenizer = models.load_model(str(model_dir))
    predictions = generation.answer_problems(model, tokenizer, problems, system_prompt=SYSTEM_PROMPT,
                                             max_new_tokens=32, batch_size=100, desc=f"eval {model_dir.name}")
    references = [p["answer"] for p in problems]
    scores = generation.score_answers(predictions, references)
    if predictions_path is not None:
        write_jsonl(predictions_path, ({"prompt": p["prompt"], "reply": reply, **generation.judge_answer(reply, ref)}
                                       for p, reply, ref in zip(problems, predictions, references)))
    row = {"exact_match": scores["strict"], "ci": scores["strict_ci"], "lenient": scores["lenient"],
           "lenient_ci": scores["lenient_ci"], "n": scores["n"], "kl_to_teacher": None, "top1_agreement": None,
           "sample": predictions[0], "steps": stepcheck.summarize(predictions, references)}
    if teacher is not None:
        teacher_model, teacher_tokenizer, teacher_texts = teacher
        stats = evaluate.teacher_agreement(model, tokenizer, teacher_model, teacher_tokenizer, problems,
                                           teacher_texts, system_prompt=SYSTEM_PROMPT)
        if stats is not None:
            row.update(kl_to_teacher=stats["kl"], top1_agreement=stats["top1"])
    if sampled:
        sampled_row = evaluate.sampled_scores(model, tokenizer, problems, SAMPLES, 1.0, seed=0,
                                              system_prompt=SYSTEM_PROMPT, max_new_tokens=32, batch_size=100,
                                              desc=f"sample {model_dir.name}")
        row.update({k: v for k, v in sampled_row.items() if k != "n"})
    return row


def train_teacher(base: Path, out: Path, train_task: Path, problems: list[dict], size: dict, seed: int):
    """Instruction-tune the pretrained teacher on reference solutions, in rounds, until held-out exact match on
    the dev problems reaches 90% (or the budget ends). Returns (folder, dev exact match)."""
    done = out / "teacher_final.json"
    if done.exists():
        info = json.loads(done.read_text())
        return Path(info["path"]), info["exact_match"]
    data = reference_rows(train_task, out / "reference.jsonl")
    current, accuracy = base, 0.0
    for round_ in range(1 + size["teacher_extra_rounds"]):
        steps, lr = (size["teacher_steps"], "3e-3") if round_ == 0 else (size["teacher_steps"] // 2, "1e-3")
        current = train_once(sequence_level, out / f"teacher_round{round_}", [
            "--student", str(current), "--data", str(data), "--max-steps", str(steps), "--batch-size", "32",
            "--lr", lr, "--warmup-ratio", "0.05", "--log-every", "250", "--seed", str(seed + round_)])
        accuracy = score(current, problems)["exact_match"]
        print(f"teacher after round {round_ + 1}: dev exact match {accuracy:.1%}")
        if accuracy >= 0.9:
            break
    done.write_text(json.dumps({"path": str(current), "exact_match": accuracy}) + "\n")
    return current, accuracy


def distil_students(out: Path, bases: dict, teacher: Path, teacher_data: Path, dev: dict, size: dict,
                    seed: int) -> list[tuple[str, Path]]:
    """The four methods, each from the pretrained student, with the same data, step budget and learning rate."""
    budget = ["--data", str(teacher_data), "--max-steps", str(size["student_steps"]), "--batch-size", "16",
              "--lr", "3e-3", "--log-every", "100", "--seed", str(seed),
              "--eval-data", str(dev["data"]), "--eval-problems", str(dev["problems"]), "--eval-every",
              str(size["eval_every"]), "--eval-max-new-tokens", "32", "--eval-system-prompt", SYSTEM_PROMPT]
    runs = [
        ("sequence_level", sequence_level, bases["student"], []),
        ("token_level (forward KL, T=2)", token_level, bases["student"],
         ["--teacher", str(teacher), "--kl", "forward", "--temperature", "2", "--alpha", "0.1"]),
        ("on_policy (lmbda=0.5, reverse KL)", on_policy, bases["student"],
         ["--teacher", str(teacher), "--lmbda", "0.5", "--max-new-tokens", "24"]),
        # alpha 0.7, not the script's 0.5: over 5 seeds (bench/bench_uld_match.py) 0.5 gave 75.3% +- 7.8 (one seed
        # at 61.8), 0.7 gave 89.5% +- 2.8, every seed above 85 (README, "Hybrid matching, measured")
        ("cross_tokenizer (ULD, other tokenizer)", cross_tokenizer, bases["student_other_tokenizer"],
         ["--teacher", str(teacher), "--top-k", "20", "--temperature", "2", "--alpha", "0.7"]),
        # GKD into the second student: its samples graded by the teacher through hybrid ULD (another vocabulary)
        ("on_policy (other tokenizer, lmbda=0.5, hybrid ULD)", on_policy, bases["student_other_tokenizer"],
         ["--teacher", str(teacher), "--lmbda", "0.5", "--max-new-tokens", "24", "--top-k", "20"],
         "on_policy_other_tokenizer"),
    ]
    trained = []
    for name, script, student, extra, *folder in runs:  # a run's folder: its script's name unless given
        print(f"\n-- {name}")
        trained.append((name, train_once(script, out / (folder[0] if folder else script.__name__),
                                         ["--student", str(student), *budget, *extra])))
    return trained + sft_then_on_policy(out, bases["student"], teacher, budget, size["student_steps"])


def sft_then_on_policy(out: Path, student: Path, teacher: Path, budget: list[str],
                       steps: int) -> list[tuple[str, Path]]:
    """GKD's and the other toolkits' on-policy recipe: on-policy distillation of a student already fine-tuned on
    the teacher's text. The same total step budget as every other row, split in two: sequence_level for the first
    half of the steps, then on_policy (the on_policy row's flags) from that model for the second half, each stage
    with its own warmup and cosine schedule. Returns both stages, so the table shows what the second one adds."""
    first = steps // 2
    print(f"\n-- sequence_level for {first} steps, then on_policy for {steps - first} from it")
    # a repeated flag's last value wins (argparse): the budget's other flags stay the other rows'
    sft = train_once(sequence_level, out / "sft_half", ["--student", str(student), *budget, "--max-steps", str(first)])
    two_stage = train_once(on_policy, out / "sft_then_on_policy", [
        "--student", str(sft), *budget, "--max-steps", str(steps - first),
        "--teacher", str(teacher), "--lmbda", "0.5", "--max-new-tokens", "24"])
    return [(f"sequence_level, first {first} steps only", sft),
            (f"sequence_level {first} steps → on_policy {steps - first} steps", two_stage)]


def report(results: list[dict], header: str) -> str:
    lines = [header, "",
             "| model | exact match (strict) [95% CI] | lenient [95% CI] | KL(teacher‖model) | top-1 agreement "
             f"| maj@{SAMPLES} [95% CI] | training time |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        kl = f"{r['kl_to_teacher']:.3f}" if r["kl_to_teacher"] is not None else "n/a"
        top1 = f"{r['top1_agreement']:.1%}" if r["top1_agreement"] is not None else "n/a"
        secs = f"{r['seconds']:.0f} s" if r["seconds"] is not None else "-"
        strict = evaluate.format_score(r["exact_match"], r["ci"])
        lenient = evaluate.format_score(r["lenient"], r["lenient_ci"])
        majority = evaluate.format_score(r.get("maj_at_k"), r.get("maj_at_k_ci"))  # students only
        lines.append(f"| {r['name']} | {strict} | {lenient} | {kl} | {top1} | {majority} | {secs} |")
    return "\n".join(lines)


def steps_report(results: list[dict]) -> str:
    """Where each model's replies to the test problems first go wrong (`stepcheck.first_wrong_step`)."""
    lines = ["Where the first wrong step of a reply is (stepcheck.py; a reply's steps are its calculation line, "
             "then its '#### N' line; shares of all replies):", "",
             "| model | no wrong step | arithmetic | off the reference | wrong answer | no answer line "
             "| wrong at the 1st step (of those with one) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        steps = r["steps"]
        first = f"{steps['at_first_step']:.1%}" if steps["at_first_step"] is not None else "-"
        lines.append(f"| {r['name']} | {steps['no_wrong_step']:.1%} | "
                     + " | ".join(f"{steps[kind]:.1%}" for kind in stepcheck.KINDS) + f" | {first} |")
    return "\n".join(lines)


def seeds_report(per_seed: list[list[dict]]) -> str:
    """Mean +- sample standard deviation of the strict exact match of each method over the seeds."""
    lines = [f"Over {len(per_seed)} seeds of the student stage (same teacher, data and base models):", "",
             "| model | strict exact match, mean ± std | per seed |", "|---|---|---|"]
    for i, row in enumerate(per_seed[0]):
        values = [results[i]["exact_match"] for results in per_seed]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {row['name']} | {statistics.mean(values):.1%} ± {std:.1%} | "
                     + ", ".join(f"{v:.1%}" for v in values) + " |")
    return "\n".join(lines)


def plot(results: list[dict], out: Path) -> Path | None:
    try:
        plt = plot_metrics.pyplot()
    except common.DistillError as error:
        print(f"{error}: no plot")
        return None
    fig, (curves, heldout, bars) = plt.subplots(1, 3, figsize=(18, 5), width_ratios=[1, 1, 1.4],
                                                layout="constrained")
    runs = {row["name"]: common.read_jsonl(Path(row["run"]) / "metrics.jsonl") for row in results if row.get("run")}
    plot_metrics.draw(curves, runs, "loss", log_y=True)
    curves.set(ylabel="training loss (each method's own)", title="training loss")
    plot_metrics.draw(heldout, runs, "eval_exact_match")
    heldout.set(ylabel="dev exact match (strict)", title="held-out exact match during training", ylim=(-0.02, 1.02))
    values = [100 * r["exact_match"] for r in results]
    errors = [[v - 100 * r["ci"][0] for v, r in zip(values, results)],
              [100 * r["ci"][1] - v for v, r in zip(values, results)]]
    bars.barh([r["name"] for r in results], values, xerr=errors, color="tab:blue", capsize=3)
    bars.set(xlabel="test exact match, strict (%), 95% CI", title="accuracy", xlim=(0, 110))
    for y, (value, r) in enumerate(zip(values, results)):
        bars.text(100 * r["ci"][1] + 1.5, y, f"{value:.1f}", va="center", fontsize=8)
    bars.invert_yaxis()
    path = out / "results.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def figures(out: Path, bases: dict, teacher: Path, trained: list[tuple[str, Path]], data: Path, quick: bool) -> Path:
    """explain.py's figures of this run's own models, under OUT/figures: each method's mechanism, the ULD alignment,
    inside the students (logit lens, most-changed head, first answer token) and the on-policy step mix. Cheap next
    to training (seconds); redrawn on every run."""
    folder, runs = out / "figures", {run.name: run for _, run in trained}
    rows = 8 if quick else 64
    explain.mechanisms(str(teacher), str(runs["token_level"]), str(data), folder, rows=rows)
    explain.alignment(str(teacher), str(runs["cross_tokenizer"]), str(data), folder, rows=rows)
    same_tokenizer = ["sequence_level", "token_level", "on_policy"]
    explain.inside(str(bases["student"]), [str(runs[name]) for name in same_tokenizer], str(data), folder,
                   rows=8 if quick else 32)
    explain.stepmix(runs["on_policy"], folder)
    return folder


def main(argv=None):
    args = parse_args(argv)
    size = {k: v[1] if args.quick else v[0] for k, v in SIZES.items()}
    out = Path(args.out) / ("quick" if args.quick else "full")
    claim_output(out, {"version": DEMO_VERSION, "seed": args.seed, **size})
    start = time.time()

    kit = tiny.build_kit(Path(args.out) / "models")  # only its locally trained tokenizers are used
    train_task = write_task(out / "task_train.jsonl", size["train_problems"], args.seed)
    dev_task = write_task(out / "task_dev.jsonl", size["dev_problems"], args.seed + 2)
    test_task = write_task(out / "task_test.jsonl", size["test_problems"], args.seed + 1)
    dev_problems = common.load_prompt_dataset(str(dev_task))
    problems = common.load_prompt_dataset(str(test_task))

    print("\n== 1. pretraining: the domain as plain text, no chat task")
    rng = random.Random(args.seed + 3)
    corpus = write_jsonl(out / "pretrain.jsonl",
                         ({"text": make_pretraining_text(rng)} for _ in range(size["pretrain_texts"])))
    bases = {name: pretrain(name, kit, corpus, out, size["teacher_pretrain_steps" if name == "teacher" else
                                                         "student_pretrain_steps"], args.seed) for name in MODELS}

    print("\n== 2. the teacher is instruction-tuned on the task")
    teacher, teacher_dev = train_teacher(bases["teacher"], out, train_task, dev_problems, size, args.seed)

    print("\n== 3. generate_data.py: the teacher answers the training prompts and the dev prompts")
    teacher_data, dev_data = out / "teacher_data.jsonl", out / "dev_teacher_data.jsonl"
    for task, n, path in ((train_task, size["teacher_data"], teacher_data),
                          (dev_task, size["dev_problems"], dev_data)):
        generate_data.main(["--teacher", str(teacher), "--dataset", str(task), "--num-examples", str(n),
                            "--system-prompt", SYSTEM_PROMPT, "--temperature", "0", "--max-new-tokens", "32",
                            "--batch-size", "64", "--output", str(path)])
    dev = {"data": dev_data, "problems": dev_task}

    print("\n== 4. evaluation of the teacher and the base students on the test problems")
    teacher_model, teacher_tokenizer = models.load_model(str(teacher))
    teacher_texts = generation.answer_problems(teacher_model, teacher_tokenizer, problems, system_prompt=SYSTEM_PROMPT,
                                               max_new_tokens=32, batch_size=100, desc="teacher answers")
    reference = (teacher_model, teacher_tokenizer, teacher_texts)
    predictions = out / "predictions"
    predictions.mkdir(exist_ok=True)
    fixed = [
        {"name": "teacher (pretrained, then instruction-tuned)",
         **score(teacher, problems, predictions_path=predictions / "teacher.jsonl"), "seconds": None, "run": None},
        {"name": "base student (pretrained only)",
         **score(bases["student"], problems, reference, predictions / "student_base.jsonl"),
         "seconds": None, "run": None},
        {"name": "base 2nd student (other tokenizer)",
         **score(bases["student_other_tokenizer"], problems, reference,
                 predictions / "student_other_tokenizer_base.jsonl"), "seconds": None, "run": None},
    ]

    per_seed, first_trained = [], None
    for seed in range(args.seed, args.seed + args.seeds):
        print(f"\n== 5. distillation, seed {seed}: four methods, same data, same step budget")
        seed_out = out if seed == args.seed else out / f"seed{seed}"
        seed_out.mkdir(exist_ok=True)
        trained = distil_students(seed_out, bases, teacher, teacher_data, dev, size, seed)
        first_trained = first_trained or trained
        results = list(fixed)
        for name, run_dir in trained:
            metrics = common.read_jsonl(run_dir / "metrics.jsonl")
            results.append({"name": name, **score(run_dir, problems, reference,
                                                  predictions / f"{run_dir.name}-seed{seed}.jsonl", sampled=True),
                            "seconds": metrics[-1]["elapsed_s"], "run": str(run_dir)})
        per_seed.append(results)

    results = per_seed[0]
    text = report(results, (
        f"Test: {len(problems)} held-out problems, greedy, strict = '#### N' only (lenient = also the last number); "
        f"maj@{SAMPLES} = the strict majority answer of {SAMPLES} replies sampled at T=1. "
        f"Students: {size['student_steps']} steps of 16 sequences on {size['teacher_data']} teacher completions "
        f"(seed {args.seed}), from bases pretrained {size['student_pretrain_steps']} steps on plain text. "
        f"Teacher dev exact match after instruction tuning: {teacher_dev:.1%}."))
    text += "\n\n" + steps_report(results)
    if args.seeds > 1:
        text += "\n\n" + seeds_report(per_seed)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(per_seed if args.seeds > 1 else results, indent=2) + "\n")
    picture = plot(results, out)
    print("\n== 6. explain.py: what each method transferred, from these models (held-out dev rows)")
    try:
        drawn = figures(out, bases, teacher, first_trained, dev_data, args.quick)
    except common.DistillError as error:  # e.g. no matplotlib: the results stand without the figures
        print(f"{error}: no figures")
        drawn = None
    print("\n" + text)
    print(f"\nfinished in {time.time() - start:.0f}s. {out / 'results.md'}" + (f", {picture}" if picture else "")
          + (f"; figures in {drawn}" if drawn else ""))


if __name__ == "__main__":
    common.run_main(main)
