r"""Reproduce the blog's comparison table: both teachers' data, the four methods, one evaluation, one table.

    make blog                      # = python reproduce_blog.py: needs a CUDA GPU and the Hugging Face hub (hours)
    BLOG_TINY=1 make blog          # = python reproduce_blog.py --tiny: the same recipe with the tiny offline kit,
                                   #   on a CPU in under a minute (the test suite runs it: tests/test_blog.py)
    python reproduce_blog.py --out blog_2   # another output folder; re-running a folder continues it

The recipe, each step a command of this toolkit (printed as it starts, run in this process):
  1. generate_data.py: the first 500 GSM8K train problems, answered greedily (the default system prompt asks for
     '#### N') by Qwen2.5-3B-Instruct -> data/teacher.jsonl and by SmolLM2-1.7B-Instruct ->
     data/teacher_smollm2-1.7b-instruct.jsonl: the files `python token_level.py` etc. read by default, so the
     bare commands reuse them. The next 100 train problems (501-600), which no teacher answers, are the held-out
     set -> data/gsm8k_heldout.jsonl, checked to hold no training and no test problem.
  2. the four methods from the Qwen2.5-0.5B base student, each a LoRA adapter (r=16, alpha 32, on q/k/v/o) trained
     for 15 epochs of those 500 rows (945 steps of 8): sequence_level; token_level, forward KL at T=2 with
     alpha 0.1; on_policy, lmbda 0.5, reverse KL at T=1; cross_tokenizer (sorted ULD, top-50 at T=2, alpha 0.5) from the
     SmolLM2 data -> OUT/runs/<script>. Each scores the held-out problems every epoch (63 steps: --eval-problems,
     --eval-every) and keeps its best-scoring model in OUT/runs/<script>/best (--save-best eval_exact_match).
  3. eval.py: the base student, the four runs and their best checkpoints answer the first 100 GSM8K test problems
     greedily; strict exact match with its Wilson 95% interval -> OUT/results.jsonl, every answer in
     OUT/predictions/<name>.jsonl (a best checkpoint's as <script>_best).
  4. OUT/COMPARISON.md (method, teacher, exact match [95% CI] at the end of training, difference to the base,
     held-out exact match at the end and at the best evaluation with its step, the best checkpoint's exact match
     [95% CI], training time, training loss at the start and end, the blog's published number) and
     OUT/loss_curves.png.
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
import math
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
BEST = "_best"  # results name of a method's best held-out checkpoint: "<method>_best"
HELD_OUT_PROBLEMS = 100
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
    held_out: dict  # where the held-out problems come from: load_prompt_dataset's dataset, config, split, skip, count
    held_out_path: str  # where they are written (every method's --eval-problems)
    track: list[str]  # the held-out tracking flags besides --eval-problems and --save-best (--eval-every, ...)
    about: str  # one line for the table's header


def blog_setup() -> Setup:
    teachers = {"main": common.BLOG_TEACHER, "uld": common.ULD_TEACHER}
    epoch = math.ceil(common.BLOG_TRAIN_PROBLEMS / 8)  # optimizer steps in one epoch of the 500 rows at batch 8
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
        # the next 100 train problems, which no teacher answered: never trained on, and not the test problems
        held_out=dict(dataset="openai/gsm8k", config="main", split="train", skip=common.BLOG_TRAIN_PROBLEMS,
                      count=HELD_OUT_PROBLEMS),
        held_out_path="data/gsm8k_heldout.jsonl",
        track=["--eval-every", str(epoch), "--eval-max-new-tokens", "512", "--eval-batch-size", "32"],
        about=f"GSM8K: {common.BLOG_TRAIN_PROBLEMS} train problems answered greedily by each teacher, 15 epochs of "
              f"LoRA (r=16, q/k/v/o) on the {common.BLOG_STUDENT} base student; exact match on the first "
              f"{common.BLOG_TEST_PROBLEMS} test problems (strict: '#### N' only), greedy. Held out: GSM8K train "
              f"problems {common.BLOG_TRAIN_PROBLEMS + 1}-{common.BLOG_TRAIN_PROBLEMS + HELD_OUT_PROBLEMS}, "
              f"scored every epoch ({epoch} steps) while training.")


def tiny_setup(out: Path) -> Setup:
    """The same recipe with the tiny kit's random-init models, procedural GSM8K-style problems and a few steps:
    it checks the plumbing end to end (every row of the table), not the methods (the numbers mean nothing)."""
    kit = tiny.build_kit(out / "models")
    tasks = out / "gsm8k_tiny"
    tasks.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 16, 0), ("test", 16, 1), ("heldout", 8, 2)):
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
        held_out=dict(dataset=str(tasks / "heldout.jsonl"), config=None, split="train", skip=0, count=8),
        held_out_path=str(out / "data" / "heldout.jsonl"),
        track=["--eval-every", "2", "--eval-max-new-tokens", "16", "--eval-batch-size", "8"],
        about="tiny offline kit (random-init models, 16 procedural problems, 4 steps per method, 8 held-out "
              "problems scored every 2 steps): this checks that the recipe runs end to end; its numbers say nothing "
              "about the methods.")


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
    write_held_out(setup)
    print("\n== 2. the four methods")
    models = {BASE: setup.student}
    for name, (_, script, _, _) in METHODS.items():
        models[name] = train(script, args.out / "runs" / name, method_argv(setup, name))
        if (Path(models[name]) / "best").is_dir():  # --save-best's checkpoint: scored on the test problems too
            models[name + BEST] = str(Path(models[name]) / "best")
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
            *setup.train, *(setup.on_policy if script is on_policy else []),
            "--eval-problems", setup.held_out_path, *setup.track, "--save-best", "eval_exact_match"]


def same_question(problem: dict) -> str:
    return " ".join(problem["prompt"].split())


def held_out_problems(candidates: list[dict], *others: list[dict]) -> tuple[list[dict], int]:
    """The `candidates` (load_prompt_dataset rows) whose question is none of `others`' (the training prompts, the
    test problems), compared with whitespace normalized; and how many were dropped for being one of them."""
    taken = {same_question(problem) for rows in others for problem in rows}
    kept = [problem for problem in candidates if same_question(problem) not in taken]
    return kept, len(candidates) - len(kept)


def write_held_out(setup: Setup) -> Path:
    """The held-out problems every method is scored on while it trains (--eval-problems): disjoint from the
    problems the teachers answered for training and from the test problems eval.py scores (checked here, on the
    very rows those commands read), so the checkpoint they pick is picked without looking at the test set."""
    spec = setup.held_out
    candidates = common.load_prompt_dataset(spec["dataset"], config=spec["config"], split=spec["split"],
                                            num_examples=spec["skip"] + spec["count"])[spec["skip"]:]
    trained = common.prompts_from_args(generate_data.parse_args(["--teacher", setup.teachers["main"],
                                                                 *setup.generate]))
    tested = common.prompts_from_args(evaluate.parse_args(["--model", setup.student, *setup.eval]))
    kept, dropped = held_out_problems(candidates, trained, tested)
    if not kept:
        raise common.DistillError(f"held-out problems: all {len(candidates)} from {spec['dataset']} are training or "
                                  "test problems")
    path = Path(setup.held_out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"question": p["prompt"], "answer": p["answer"]}) + "\n" for p in kept)
    if not path.is_file() or path.read_text() != text:  # rewritten only when it changes
        path.write_text(text)
    print(f"{path}: {len(kept)} held-out problems, none of them a training or test problem"
          + (f" ({dropped} dropped for being one)" if dropped else ""))
    return path


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


def held_out_cells(run: Path, results: dict[str, dict], name: str) -> list[str]:
    """The table's held-out cells of one method: held-out exact match at the end and at its best evaluation (with
    that step, from best.json), and the best checkpoint's test score."""
    metrics = common.read_jsonl(run / "metrics.jsonl", what="metrics.jsonl")
    tracked = [row["eval_exact_match"] for row in metrics if "eval_exact_match" in row]
    best = run / "best" / "best.json"
    if not tracked or not best.is_file() or name + BEST not in results:
        return ["-", "-"]
    info, row = json.loads(best.read_text()), results[name + BEST]
    return [f"{tracked[-1]:.1%} → {info['value']:.1%} (step {info['step']})",
            evaluate.format_score(row["exact_match"], row.get("exact_match_ci"), row.get("n"))]


def comparison(out: Path, results: dict[str, dict], setup: Setup, *, blog_column: bool) -> str:
    """The COMPARISON table: one row for the base student and one per method, in the blog's order."""
    base = results[BASE]
    held_out = Path(setup.held_out_path)
    held_out = held_out.relative_to(out) if held_out.is_relative_to(out) else held_out  # the tiny run's: in OUT
    header = ("| method | teacher | exact match at the end (95% CI) | Δ vs base | held-out: end → best (step) "
              "| best checkpoint's exact match (95% CI) | training time | loss start → end |")
    lines = [f"# {shown(setup.student)} distilled four ways", "", setup.about, "",
             header + (" blog |" if blog_column else ""), "|---" * (9 if blog_column else 8) + "|"]
    cells = {BASE: ("base student (no distillation)", "-")}
    for name, (label, _, _, teacher) in METHODS.items():
        cells[name] = (label, shown(setup.teachers[teacher]))
    for name, (label, teacher) in cells.items():
        row = results[name]
        score = evaluate.format_score(row["exact_match"], row.get("exact_match_ci"), row.get("n"))
        if name == BASE:
            extra = ["-", "-", "-", "-", "-"]
        else:
            metrics = common.read_jsonl(out / "runs" / name / "metrics.jsonl", what="metrics.jsonl")
            first, last = loss_summary(metrics)
            extra = [f"{100 * (row['exact_match'] - base['exact_match']):+.1f} pts",
                     *held_out_cells(out / "runs" / name, results, name),
                     duration(metrics[-1]["elapsed_s"]), f"{first:.3f} → {last:.3f}"]
        blog = [BLOG_RESULTS[name]] if blog_column else []
        lines.append("| " + " | ".join([label, teacher, score, *extra, *blog]) + " |")
    lines += ["", "Exact match is strict (the reply must end with '#### N'), with its Wilson 95% interval; rows whose "
              "intervals overlap are not evidence that one method is better. Each method's loss is its own objective "
              "(cross-entropy, KL or ULD), so losses compare over time, not across rows. Curves: loss_curves.png.",
              "", f"Held out: {held_out}, problems that are neither training nor test problems (checked), "
              "scored while each method trained (strict exact match of greedy answers); `--save-best "
              "eval_exact_match` kept the model of the best held-out score (the earliest, on a tie) in "
              "runs/<method>/best. The end of training is what the blog reports; the best checkpoint is the "
              "early-stopped model, chosen on the held-out problems without looking at the test problems, then "
              "scored on those like every other row."]
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
