r"""Reproduce the blog's comparison table: both teachers' data, the four methods, one evaluation, one table.

    make blog                      # = python reproduce_blog.py: needs a CUDA GPU and the Hugging Face hub (hours)
    BLOG_TINY=1 make blog          # = python reproduce_blog.py --tiny: the same recipe with the tiny offline kit,
                                   #   on a CPU in under a minute (the test suite runs it: tests/test_blog.py)
    python reproduce_blog.py --out blog_2   # another output folder; re-running a folder continues it

The recipe, each step a command of this toolkit (printed as it starts, run in this process):
  1. generate_data.py: the first 500 GSM8K train problems, answered greedily (the default system prompt asks for
     '#### N') by Qwen2.5-3B-Instruct -> data/teacher.jsonl and by SmolLM2-1.7B-Instruct ->
     data/teacher_smollm2-1.7b-instruct.jsonl: the files `python token_level.py` etc. read by default, so the
     bare commands reuse them.
  2. the four methods from the Qwen2.5-0.5B base student, each a LoRA adapter (r=16, alpha 32, on q/k/v/o) trained
     for 15 epochs of those 500 rows (945 steps of 8): sequence_level; token_level, forward KL at T=2 with
     alpha 0.1; on_policy, lmbda 0.5, reverse KL at T=1; cross_tokenizer (sorted ULD, top-50 at T=2, alpha 0.5) from the
     SmolLM2 data -> OUT/runs/<script>.
  3. eval.py: the base student and the four runs answer the first 100 GSM8K test problems greedily; strict exact
     match with its Wilson 95% interval -> OUT/results.jsonl, every answer in OUT/predictions/<name>.jsonl.
  4. OUT/COMPARISON.md (method, teacher, exact match [95% CI], difference to the base, training time, training
     loss at the start and end, the blog's published number) and OUT/loss_curves.png.
The blog gives the student, the teachers, the data, the losses, LoRA r=16 on q/k/v/o and the 15 epochs; the rest
is this recipe's choice: learning rate 2e-4 (a usual LoRA rate), batch 8, cosine schedule with 3% warmup, bf16
autocast, on-policy samples of up to 256 tokens, answers of up to 512.

Re-running continues where it stopped: generate_data.py skips the rows already written, a run that finished
with the same settings is reused, one cut short resumes from its last checkpoint (every 100 steps), one with other
settings starts over, and only models trained since their last evaluation are evaluated again.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import checkpoints
import common
import cross_tokenizer
import eval as evaluate
import generate_data
import on_policy
import plot_metrics
import sequence_level
import tiny
import token_level

LORA = ["--lora", "--lora-r", "16", "--lora-alpha", "32", "--lora-target-modules", "q_proj,k_proj,v_proj,o_proj"]
# name -> (table label, script, the method's flags, which teacher). The methods' flags are spelled out even where
# they are the scripts' defaults, so that the recipe stays the blog's if a default ever changes.
METHODS = {
    "sequence_level": ("sequence-level (SFT on the teacher's text)", sequence_level, [], "main"),
    "token_level": ("token-level (forward KL, T=2, α=0.1)", token_level,
                    ["--kl", "forward", "--temperature", "2", "--alpha", "0.1"], "main"),
    "on_policy": ("on-policy (GKD, λ=0.5, reverse KL, T=1)", on_policy,
                  ["--lmbda", "0.5", "--kl", "reverse", "--temperature", "1"], "main"),
    "cross_tokenizer": ("cross-tokenizer (ULD, top-50, T=2, α=0.5)", cross_tokenizer,
                        ["--uld-match", "sorted", "--top-k", "50", "--temperature", "2", "--alpha", "0.5"], "uld"),
}
BASE = "base"
BLOG_RESULTS = {BASE: "9%", "sequence_level": "43%", "token_level": "37%", "on_policy": "44%",
                "cross_tokenizer": "12%"}
# Flags that say how a run is started, not what it trains: a re-run may differ in them and still be the same run.
NOT_SETTINGS = ("resume", "overwrite", "resume_history")


@dataclass
class Setup:
    """Everything that differs between the blog's recipe and its tiny offline twin."""

    student: str
    teachers: dict[str, str]  # "main" (same tokenizer as the student), "uld" (another tokenizer)
    data: dict[str, str]  # the teacher data generate_data.py writes for each
    generate: list[str]  # generate_data.py's flags besides --teacher/--output
    train: list[str]  # every method's shared flags
    on_policy: list[str]  # on_policy.py's own extra flags
    eval: list[str]  # eval.py's flags besides --model/--name/--output
    about: str  # one line for the table's header


def blog_setup() -> Setup:
    teachers = {"main": common.BLOG_TEACHER, "uld": common.ULD_TEACHER}
    return Setup(
        student=common.BLOG_STUDENT, teachers=teachers,
        data={k: common.default_data_path(t) for k, t in teachers.items()},
        generate=["--dataset", "openai/gsm8k", "--dataset-config", "main", "--split", "train", "--num-examples",
                  str(common.BLOG_TRAIN_PROBLEMS), "--temperature", "0", "--max-new-tokens", "512"],
        train=["--epochs", "15", "--batch-size", "8", "--lr", "2e-4", "--warmup-ratio", "0.03", *LORA, "--bf16",
               "--log-every", "10", "--save-every", "100", "--save-total-limit", "1"],
        on_policy=["--max-new-tokens", "256"],
        eval=["--dataset", "openai/gsm8k", "--dataset-config", "main", "--split", "test", "--num-examples",
              str(common.BLOG_TEST_PROBLEMS), "--max-new-tokens", "512"],
        about=f"GSM8K: {common.BLOG_TRAIN_PROBLEMS} train problems answered greedily by each teacher, 15 epochs of "
              f"LoRA (r=16, q/k/v/o) on the {common.BLOG_STUDENT} base student; exact match on the first "
              f"{common.BLOG_TEST_PROBLEMS} test problems (strict: '#### N' only), greedy.")


def tiny_setup(out: Path) -> Setup:
    """The same recipe with the tiny kit's random-init models, procedural GSM8K-style problems and a few steps:
    it checks the plumbing end to end (every row of the table), not the methods (the numbers mean nothing)."""
    kit = tiny.build_kit(out / "models")
    tasks = out / "gsm8k_tiny"
    tasks.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 16, 0), ("test", 16, 1)):
        rng = random.Random(seed)
        problems = [tiny.make_problem(rng) for _ in range(n)]
        (tasks / f"{split}.jsonl").write_text("".join(json.dumps({"question": q, "answer": s}) + "\n"
                                                      for q, s, _ in problems))
    # student_llama3 reads text with a Llama-3 tokenizer, the student with a Qwen-style one: a cross-tokenizer pair
    teachers = {"main": str(kit["teacher"]), "uld": str(kit["student_llama3"])}
    return Setup(
        student=str(kit["student"]), teachers=teachers,
        data={"main": str(out / "data" / "teacher.jsonl"), "uld": str(out / "data" / "teacher_uld.jsonl")},
        generate=["--dataset", str(tasks / "train.jsonl"), "--num-examples", "16", "--temperature", "0",
                  "--max-new-tokens", "16", "--batch-size", "16"],
        # 4 steps: with --seed 0, on_policy's coin makes steps 3 and 4 on-policy, so sampling is exercised too
        train=["--epochs", "1", "--batch-size", "4", "--lr", "1e-3", *LORA, "--log-every", "1"],
        on_policy=["--max-new-tokens", "8"],
        eval=["--dataset", str(tasks / "test.jsonl"), "--num-examples", "16", "--max-new-tokens", "16",
              "--batch-size", "16"],
        about="tiny offline kit (random-init models, 16 procedural problems, 4 steps per method): this checks "
              "that the recipe runs end to end; its numbers say nothing about the methods.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="swap every model for the tiny offline kit and GSM8K for procedural problems (CPU, "
                             "no hub, under a minute; `BLOG_TINY=1 make blog` passes it)")
    parser.add_argument("--out", default=None,
                        help="folder for the runs, results, table and plot (default: blog, or blog_tiny with "
                             "--tiny); the teacher data of the real recipe goes to data/, where the scripts "
                             "read it by default")
    args = parser.parse_args(argv)
    args.out = Path(args.out or ("blog_tiny" if args.tiny else "blog"))
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    start = time.time()
    setup = tiny_setup(args.out) if args.tiny else blog_setup()
    print("\n== 1. teacher data")
    for key, teacher in setup.teachers.items():
        run(generate_data, ["--teacher", teacher, *setup.generate, "--output", setup.data[key]])
    print("\n== 2. the four methods")
    models = {BASE: setup.student}
    for name, (_, script, _, _) in METHODS.items():
        models[name] = train(script, args.out / "runs" / name, method_argv(setup, name))
    print("\n== 3. evaluation")
    results = evaluate_all(args.out, models, setup.eval)
    print("\n== 4. the table")
    table = comparison(args.out, results, setup, blog_column=not args.tiny)
    (args.out / "COMPARISON.md").write_text(table + "\n")
    picture = plot_losses(args.out, args.out / "loss_curves.png")
    print(f"\n{table}\n\nfinished in {time.time() - start:.0f}s: {args.out / 'COMPARISON.md'}"
          + (f", {picture}" if picture else ""))
    return args.out / "COMPARISON.md"


def method_argv(setup: Setup, name: str) -> list[str]:
    """The command line of one method (all but --output-dir)."""
    _, script, flags, teacher = METHODS[name]
    return ["--student", setup.student, "--teacher", setup.teachers[teacher], "--data", setup.data[teacher], *flags,
            *setup.train, *(setup.on_policy if script is on_policy else [])]


def run(script, argv: list[str]) -> None:
    print(f"$ python {script.__name__}.py {shlex.join(argv)}", flush=True)
    script.main(argv)
    # The next step loads its own models: give this one's GPU memory back first (the models sit in cycles with
    # their Accelerator, which only the collector frees).
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_settings(config: dict) -> dict:
    """What a run trains, from its parsed flags or its run_config.json, in the same JSON form."""
    return {k: v for k, v in json.loads(json.dumps(config, default=str)).items() if k not in NOT_SETTINGS}


def train(script, folder: Path, argv: list[str]) -> str:
    """Train one method into `folder`, unless a finished run with the same settings is there; a run cut short with
    the same settings resumes from its last checkpoint, any other earlier run is replaced. Returns `folder`."""
    argv = [*argv, "--output-dir", str(folder)]
    config = folder / "run_config.json"
    same = config.is_file() and run_settings(json.loads(config.read_text())) == run_settings(
        vars(script.parse_args(argv)))
    if same and any((folder / name).is_file() for name in ("config.json", "adapter_config.json")):
        print(f"{folder}: finished earlier with these settings, reused")
        return str(folder)
    if same and checkpoints.complete_checkpoints(folder):
        argv += ["--resume", str(folder)]
    elif folder.exists():
        argv += ["--overwrite"]  # a run with other settings, or one cut before its first checkpoint
    run(script, argv)
    return str(folder)


def trained_at(model: str) -> float:
    """When a local model was saved (0 for a hub id, which does not change under us)."""
    files = [Path(model) / name for name in ("config.json", "adapter_config.json")]
    return max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)


def evaluate_all(out: Path, models: dict[str, str], eval_flags: list[str]) -> dict[str, dict]:
    """eval.py for every model whose answers are older than its weights (or missing); {name: results row}."""
    results, predictions = out / "results.jsonl", out / "predictions"
    rows = {row["name"]: row for row in (common.read_jsonl(results) if results.is_file() else [])}

    def fresh(name: str) -> bool:
        answers = predictions / f"{name}.jsonl"
        return name in rows and answers.is_file() and answers.stat().st_mtime >= trained_at(models[name])

    keep = [rows[name] for name in models if fresh(name)]
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("".join(json.dumps(row) + "\n" for row in keep))
    for name, model in models.items():
        if name in {row["name"] for row in keep}:
            print(f"{model}: evaluated earlier, reused")
            continue
        run(evaluate, ["--model", model, "--name", name, *eval_flags, "--output", str(results),
                       "--save-predictions", str(predictions / f"{name}.jsonl")])
    return {row["name"]: row for row in common.read_jsonl(results)}


def loss_summary(rows: list[dict]) -> tuple[float, float]:
    """Training loss at the start and the end: each the mean over 5% of the steps (at least one), so that one
    noisy step does not stand for either end."""
    losses = [row["loss"] for row in rows if isinstance(row.get("loss"), (int, float))]
    k = max(1, len(losses) // 20)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m {secs:02d}s"


def shown(model: str) -> str:
    """A hub id as it is; a local folder (the tiny kit's) by its name, not its temporary path."""
    return Path(model).name if Path(model).is_dir() else model


def comparison(out: Path, results: dict[str, dict], setup: Setup, *, blog_column: bool) -> str:
    """The COMPARISON table: one row for the base student and one per method, in the blog's order."""
    base = results[BASE]
    header = "| method | teacher | exact match (95% CI) | Δ vs base | training time | loss start → end |"
    lines = [f"# {shown(setup.student)} distilled four ways", "", setup.about, "",
             header + (" blog |" if blog_column else ""), "|---" * (7 if blog_column else 6) + "|"]
    cells = {BASE: ("base student (no distillation)", "-")}
    for name, (label, _, _, teacher) in METHODS.items():
        cells[name] = (label, shown(setup.teachers[teacher]))
    for name, (label, teacher) in cells.items():
        row = results[name]
        score = evaluate.format_score(row["exact_match"], row.get("exact_match_ci"), row.get("n"))
        if name == BASE:
            extra = ["-", "-", "-"]
        else:
            metrics = common.read_jsonl(out / "runs" / name / "metrics.jsonl", what="metrics.jsonl")
            first, last = loss_summary(metrics)
            extra = [f"{100 * (row['exact_match'] - base['exact_match']):+.1f} pts",
                     duration(metrics[-1]["elapsed_s"]), f"{first:.3f} → {last:.3f}"]
        blog = [BLOG_RESULTS[name]] if blog_column else []
        lines.append("| " + " | ".join([label, teacher, score, *extra, *blog]) + " |")
    lines += ["", "Exact match is strict (the reply must end with '#### N'), with its Wilson 95% interval; rows whose "
              "intervals overlap are not evidence that one method is better. Each method's loss is its own objective "
              "(cross-entropy, KL or ULD), so losses compare over time, not across rows. Curves: loss_curves.png."]
    return "\n".join(lines)


def plot_losses(out: Path, path: Path) -> Path | None:
    """Every method's training loss against its step, one panel, log scale."""
    try:
        plt = plot_metrics.pyplot()
    except common.DistillError as error:
        print(f"{error}: no loss-curve plot")
        return None
    runs = {METHODS[name][0]: common.read_jsonl(out / "runs" / name / "metrics.jsonl", what="metrics.jsonl")
            for name in METHODS}
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    steps = max(len(rows) for rows in runs.values())
    # one step's loss is noisy (on_policy alternates sampled and teacher rows): average over 2% of the run
    plot_metrics.draw(ax, runs, "loss", smooth=max(1, steps // 50), log_y=True)
    ax.set(ylabel="training loss (each method's own objective)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    common.run_main(main)
