"""The offline demo: the four distillation methods side by side on a task a CPU can learn, in one command.

    make demo                  # = python demo.py (creates .venv first); at most ~15 minutes on 2 cores
    python demo.py --quick     # tiny sizes: a smoke test in 2-3 minutes (CI runs it)
    python demo.py --out DIR   # where everything goes (default demo_out/); re-running reuses finished stages

Stages (each skipped when its output already exists, so an interrupted demo picks up where it stopped):
  1. tiny random-init models and locally trained tokenizers (tiny.py); a 4-layer teacher is built here
  2. a procedural GSM8K-style task: short word problems with small numbers, solutions ending in '#### N'
  3. the teacher learns the task (SFT on the reference solutions) until its held-out exact match is >= 90%
  4. generate_data.py: the teacher answers the training prompts (greedy) -> teacher_data.jsonl
  5. the same student, data and step budget through sequence_level, token_level, on_policy; cross_tokenizer
     distils into a second student with a different (SentencePiece-style) tokenizer
  6. held-out exact match, KL(teacher || model) where the vocabularies match, and training time for every model;
     written to OUT/results.md and OUT/results.png (loss curves and accuracies)
The numbers are whatever this machine measures; nothing is tuned to make one method win.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import common  # noqa: E402
import cross_tokenizer  # noqa: E402
import eval as evaluate  # noqa: E402
import generate_data  # noqa: E402
import on_policy  # noqa: E402
import plot_metrics  # noqa: E402
import sequence_level  # noqa: E402
import tiny  # noqa: E402
import token_level  # noqa: E402

SYSTEM_PROMPT = "Solve the math word problem. Show the calculation, then give the answer as '#### <number>'."
SIZES = {  # full, quick
    "train_problems": (4000, 400), "test_problems": (200, 40), "teacher_data": (800, 64),
    "teacher_steps": (700, 150), "teacher_extra_rounds": (3, 0), "student_steps": (300, 16),
}
NAMES = ["Ana", "Ben", "Cleo", "Dev", "Emma", "Finn", "Gita", "Hugo", "Ines", "Jon", "Kai", "Lea"]
ITEMS = ["apples", "pens", "cards", "eggs", "coins", "books", "cups", "toys"]
BOXES = ["boxes", "bags", "jars", "packs"]


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="output folder (re-used across runs)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in 2-3 minutes")
    parser.add_argument("--seed", type=int, default=0, help="seed for the task and training")
    return parser.parse_args(argv)


def write_task(path: Path, n: int, seed: int) -> Path:
    """{"question", "answer"} rows, GSM8K's layout, so generate_data.py and eval.py read them unchanged."""
    if not path.exists():
        rng = random.Random(seed)
        with path.open("w") as f:
            for _ in range(n):
                question, solution = make_problem(rng)
                f.write(json.dumps({"question": question, "answer": solution}) + "\n")
    return path


def reference_rows(task: Path, out: Path) -> Path:
    """The task's own solutions as distill rows: what the teacher learns the task from."""
    if not out.exists():
        with out.open("w") as f:
            for i, row in enumerate(common.read_jsonl(task)):
                messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": row["question"]}]
                f.write(json.dumps({"id": f"ref-{i}", "messages": messages, "completion": row["answer"]}) + "\n")
    return out


def train_once(script, output_dir: Path, argv: list[str]) -> Path:
    """Run a training script unless a finished run is already there."""
    if not (output_dir / "config.json").exists():
        script.main([*argv, "--output-dir", str(output_dir)])
    return output_dir


def score(model_dir: Path, problems: list[dict], teacher=None) -> dict:
    """Held-out exact match of a model, and its KL / top-1 agreement to the teacher where vocabularies match."""
    model, tokenizer = common.load_model(str(model_dir))
    settings = dict(system_prompt=SYSTEM_PROMPT, max_new_tokens=32, batch_size=50)
    predictions = common.answer_problems(model, tokenizer, problems, desc=f"eval {model_dir.name}",
                                         **settings)
    row = {"exact_match": evaluate.exact_match(predictions, [p["answer"] for p in problems]),
           "kl_to_teacher": None, "top1_agreement": None, "sample": predictions[0]}
    if teacher is not None:
        teacher_model, teacher_tokenizer, teacher_texts = teacher
        stats = evaluate.teacher_agreement(model, tokenizer, teacher_model, teacher_tokenizer, problems,
                                           teacher_texts, system_prompt=SYSTEM_PROMPT)
        if stats is not None:
            row.update(kl_to_teacher=stats["kl"], top1_agreement=stats["top1"])
    return row


def train_teacher(kit, out: Path, train_task: Path, problems: list[dict], size: dict, seed: int) -> tuple[Path, float]:
    """SFT the teacher on reference solutions, in rounds, until held-out exact match reaches 90% (or budget ends)."""
    done = out / "teacher_final.json"
    if done.exists():
        info = json.loads(done.read_text())
        return Path(info["path"]), info["exact_match"]
    tokenizer = common.load_tokenizer(str(kit["teacher"]))
    init = out / "teacher_init"
    if not (init / "config.json").exists():
        tiny.save_model(init, tiny.build_model("qwen2", tokenizer, hidden=128, layers=4, heads=4, kv_heads=2,
                                               seed=seed + 11), tokenizer)
    data = reference_rows(train_task, out / "reference.jsonl")
    current, accuracy = init, 0.0
    for round_ in range(1 + size["teacher_extra_rounds"]):
        steps, lr = (size["teacher_steps"], "3e-3") if round_ == 0 else (size["teacher_steps"] // 3, "1e-3")
        current = train_once(sequence_level, out / f"teacher_round{round_}", [
            "--student", str(current), "--data", str(data), "--max-steps", str(steps), "--batch-size", "32",
            "--lr", lr, "--warmup-ratio", "0.05", "--log-every", "250", "--seed", str(seed + round_)])
        accuracy = score(current, problems)["exact_match"]
        print(f"teacher after round {round_ + 1}: held-out exact match {accuracy:.1%}")
        if accuracy >= 0.9:
            break
    done.write_text(json.dumps({"path": str(current), "exact_match": accuracy}) + "\n")
    return current, accuracy


def plot(results: list[dict], out: Path) -> Path | None:
    try:
        plt = plot_metrics.pyplot()
    except common.DistillError as error:
        print(f"{error}: no plot")
        return None
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    runs = {row["name"]: common.read_jsonl(Path(row["run"]) / "metrics.jsonl") for row in results if row.get("run")}
    plot_metrics.draw(curves, runs, "loss", log_y=True)
    curves.set(ylabel="training loss (each method's own)", title="loss curves")
    bars.barh([r["name"] for r in results], [100 * r["exact_match"] for r in results], color="tab:blue")
    bars.set(xlabel="held-out exact match (%)", title="accuracy", xlim=(0, 100))
    bars.invert_yaxis()
    fig.tight_layout()
    path = out / "results.png"
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    args = parse_args(argv)
    size = {k: v[1] if args.quick else v[0] for k, v in SIZES.items()}
    out = Path(args.out) / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    kit = tiny.build_kit(Path(args.out) / "models")
    train_task = write_task(out / "task_train.jsonl", size["train_problems"], args.seed)
    test_task = write_task(out / "task_test.jsonl", size["test_problems"], args.seed + 1)
    problems = common.load_prompt_dataset(str(test_task))

    print("\n== 1. the teacher learns the task")
    teacher, teacher_accuracy = train_teacher(kit, out, train_task, problems, size, args.seed)

    print("\n== 2. generate_data.py: the teacher answers the training prompts")
    teacher_data = out / "teacher_data.jsonl"
    generate_data.main(["--teacher", str(teacher), "--dataset", str(train_task), "--num-examples",
                        str(size["teacher_data"]), "--system-prompt", SYSTEM_PROMPT, "--temperature", "0",
                        "--max-new-tokens", "32", "--batch-size", "64", "--output", str(teacher_data)])

    print("\n== 3. four ways to distil it, same data, same step budget")
    budget = ["--data", str(teacher_data), "--max-steps", str(size["student_steps"]), "--batch-size", "16",
              "--lr", "3e-3", "--log-every", "100", "--seed", str(args.seed)]
    runs = [
        ("sequence_level", sequence_level, kit["student"], []),
        ("token_level (forward KL, T=2)", token_level, kit["student"],
         ["--teacher", str(teacher), "--kl", "forward", "--temperature", "2", "--alpha", "0.1"]),
        ("on_policy (lmbda=0.5, reverse KL)", on_policy, kit["student"],
         ["--teacher", str(teacher), "--lmbda", "0.5", "--beta", "1", "--max-new-tokens", "24"]),
        ("cross_tokenizer (ULD, other tokenizer)", cross_tokenizer, kit["student_nosys"],
         ["--teacher", str(teacher), "--top-k", "20", "--temperature", "2", "--alpha", "0.1"]),
    ]
    trained = []
    for name, script, student, extra in runs:
        print(f"\n-- {name}")
        run_dir = train_once(script, out / script.__name__, ["--student", str(student), *budget, *extra])
        trained.append((name, run_dir))

    print("\n== 4. held-out evaluation")
    teacher_model, teacher_tokenizer = common.load_model(str(teacher))
    teacher_texts = common.answer_problems(teacher_model, teacher_tokenizer, problems, system_prompt=SYSTEM_PROMPT,
                                    max_new_tokens=32, batch_size=50, desc="teacher answers")
    reference = (teacher_model, teacher_tokenizer, teacher_texts)
    results = [{"name": "teacher (4 layers, d=128)", **score(teacher, problems), "seconds": None, "run": None},
               {"name": "student before distillation", **score(kit["student"], problems, reference),
                "seconds": None, "run": None},
               {"name": "2nd student before (other tokenizer)", **score(kit["student_nosys"], problems, reference),
                "seconds": None, "run": None}]
    for name, run_dir in trained:
        metrics = common.read_jsonl(run_dir / "metrics.jsonl")
        results.append({"name": name, **score(run_dir, problems, reference), "seconds": metrics[-1]["elapsed_s"],
                        "run": str(run_dir)})

    lines = [f"Held-out: {len(problems)} problems; students trained {size['student_steps']} steps of 16 sequences "
             f"on {size['teacher_data']} teacher completions. Teacher exact match after training: "
             f"{teacher_accuracy:.1%}.", "",
             "| model | exact match | KL(teacher‖model) | top-1 agreement | training time |",
             "|---|---|---|---|---|"]
    for r in results:
        kl = f"{r['kl_to_teacher']:.3f}" if r["kl_to_teacher"] is not None else "n/a"
        top1 = f"{r['top1_agreement']:.1%}" if r["top1_agreement"] is not None else "n/a"
        secs = f"{r['seconds']:.0f} s" if r["seconds"] is not None else "-"
        lines.append(f"| {r['name']} | {r['exact_match']:.1%} | {kl} | {top1} | {secs} |")
    report = "\n".join(lines)
    (out / "results.md").write_text(report + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    picture = plot(results, out)
    print("\n" + report)
    print(f"\nfinished in {time.time() - start:.0f}s. {out / 'results.md'}" + (f", {picture}" if picture else ""))


if __name__ == "__main__":
    common.run_main(main)
