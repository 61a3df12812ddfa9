"""The offline demo: a teacher's completions become a trained student, on CPU, with no network.

    make demo                  # = python demo.py (creates .venv first)
    python demo.py --quick     # a smaller, faster run (CI smoke test)
    python demo.py --out DIR   # where everything goes (default demo_out/); re-running reuses finished stages

Stages (each skipped when its output already exists, so an interrupted demo picks up where it stopped):
  1. build tiny random-init models and tokenizers (tiny.py)
  2. write a procedural GSM8K-style task: word problems with solutions ending in '#### N'
  3. give the tiny teacher its skill: SFT on the reference solutions (stands in for a pretrained teacher)
  4. generate_data.py: the teacher answers the training prompts -> teacher_data.jsonl
  5. sequence_level.py: the student is fine-tuned on the teacher's completions
  6. exact-match accuracy of teacher, untrained student and distilled student on held-out problems
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

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import common  # noqa: E402
import generate_data  # noqa: E402
import sequence_level  # noqa: E402
import tiny  # noqa: E402

SIZES = {  # full / quick
    "train_problems": (2000, 200), "test_problems": (100, 24), "teacher_data": (400, 48),
    "teacher_steps": (600, 60), "student_steps": (150, 20),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="output folder (re-used across runs)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in about a minute")
    parser.add_argument("--seed", type=int, default=0, help="seed for the task and training")
    return parser.parse_args(argv)


def write_task(path: Path, n: int, seed: int) -> Path:
    """Procedural problems in a GSM8K-like layout: {"question", "answer"} with the answer ending in '#### N'."""
    if not path.exists():
        rng = random.Random(seed)
        with path.open("w") as f:
            for _ in range(n):
                question, solution, _ = tiny.make_problem(rng)
                f.write(json.dumps({"question": question, "answer": solution}) + "\n")
    return path


def reference_rows(task: Path, out: Path) -> Path:
    """The task's own solutions as distill rows (used only to give the tiny teacher its skill)."""
    if not out.exists():
        with out.open("w") as f:
            for i, row in enumerate(common.read_jsonl(task)):
                messages = [{"role": "system", "content": common.DEFAULT_SYSTEM_PROMPT},
                            {"role": "user", "content": row["question"]}]
                f.write(json.dumps({"id": f"ref-{i}", "messages": messages, "completion": row["answer"]}) + "\n")
    return out


def train_once(script, output_dir: Path, argv: list[str]) -> Path:
    """Run a training script unless a finished run is already there."""
    if not (output_dir / "config.json").exists():
        script.main([*argv, "--output-dir", str(output_dir)])
    return output_dir


def exact_match(model_dir: Path, task: Path, batch_size: int = 16, max_new_tokens: int = 64) -> float:
    """Greedy answers with the model's own chat template; share of '#### N' answers equal to the reference."""
    model, tokenizer = common.load_model(str(model_dir))
    rows = common.read_jsonl(task)
    correct = 0
    for lo in tqdm(range(0, len(rows), batch_size), desc=f"eval {model_dir.name}", leave=False):
        batch = rows[lo:lo + batch_size]
        prompts = [tokenizer(common.render_chat(tokenizer, [
            {"role": "system", "content": common.DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": row["question"]}], add_generation_prompt=True),
            add_special_tokens=False)["input_ids"] for row in batch]
        for row, result in zip(batch, common.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)):
            text = tokenizer.decode(result["tokens"], skip_special_tokens=True)
            correct += common.extract_answer(text) == common.extract_answer(row["answer"])
    return correct / len(rows)


def main(argv=None):
    args = parse_args(argv)
    size = {k: v[1] if args.quick else v[0] for k, v in SIZES.items()}
    out = Path(args.out) / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.time()

    kit = tiny.build_kit(Path(args.out) / "models")
    train_task = write_task(out / "task_train.jsonl", size["train_problems"], args.seed)
    test_task = write_task(out / "task_test.jsonl", size["test_problems"], args.seed + 1)

    print("\n== teacher: SFT on reference solutions (stands in for a pretrained teacher)")
    teacher = train_once(sequence_level, out / "teacher", [
        "--student", str(kit["teacher"]), "--data", str(reference_rows(train_task, out / "reference.jsonl")),
        "--max-steps", str(size["teacher_steps"]), "--batch-size", "16", "--lr", "3e-3", "--log-every", "100",
        "--seed", str(args.seed)])

    print("\n== generate_data.py: the teacher answers the training prompts")
    teacher_data = out / "teacher_data.jsonl"
    generate_data.main(["--teacher", str(teacher), "--dataset", str(train_task), "--num-examples",
                        str(size["teacher_data"]), "--temperature", "0", "--max-new-tokens", "64",
                        "--batch-size", "32", "--output", str(teacher_data)])

    print("\n== sequence_level.py: the student learns from the teacher's completions")
    student = train_once(sequence_level, out / "sequence_level", [
        "--student", str(kit["student"]), "--data", str(teacher_data), "--max-steps", str(size["student_steps"]),
        "--batch-size", "16", "--lr", "3e-3", "--log-every", "50", "--seed", str(args.seed)])

    print("\n== held-out exact match")
    table = [("teacher", teacher), ("student before distillation", kit["student"]),
             ("student after sequence_level", student)]
    lines = ["| model | exact match |", "|---|---|"]
    for name, path in table:
        lines.append(f"| {name} | {exact_match(Path(path), test_task):.1%} |")
    report = "\n".join(lines)
    (out / "results.md").write_text(report + "\n")
    print(report)
    print(f"\nfinished in {time.time() - start:.0f}s. Results: {out / 'results.md'}; teacher data: {teacher_data}; "
          f"student: {student} (metrics.jsonl inside)")


if __name__ == "__main__":
    common.run_main(main)
