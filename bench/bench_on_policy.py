"""What on-policy distillation costs: one epoch of on_policy.py (lmbda=1) vs one epoch of sequence_level.py.

    python bench/bench_on_policy.py                 # tiny models, 192 rows, batch 4 x 4 accumulation, 64 new tokens
    python bench/bench_on_policy.py --rows 48 --max-new-tokens 32
    python bench/bench_on_policy.py --clock cpu     # CPU seconds, one thread: for a machine shared with other jobs

Both runs use the same tiny student, the same data, batch size and accumulation, each in its own process; the time
compared is the training loop's own clock (`elapsed_s` of the last metrics.jsonl row: models already loaded),
the median over --repeats runs of each (the runs are short, so single runs are noisy). The
on-policy time is split into sampling (gen_s), the teacher's forward (teacher_s), the student's forward + backward
(student_s) and the rest (optimizer steps, batching). The untrained student rarely emits its end-of-turn token, so
almost every sample runs to --max-new-tokens: the worst case for the sampling share.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_data(path: Path, n: int) -> Path:
    import random

    import common
    import tiny

    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            question, solution, _ = tiny.make_problem(rng)
            messages = [{"role": "system", "content": common.DEFAULT_SYSTEM_PROMPT},
                        {"role": "user", "content": question}]
            f.write(json.dumps({"id": f"b{i}", "messages": messages, "completion": solution}) + "\n")
    return path


# --clock cpu: the script runs with its clocks (time.time for elapsed_s, time.perf_counter for the split) reading
# this process's CPU time instead, on one thread, so that other work on a shared machine does not count.
CPU_CLOCK = ("import runpy, sys, time; time.time = time.perf_counter = time.process_time; sys.argv = sys.argv[1:]; "
             "sys.path.insert(0, str(__import__('pathlib').Path(sys.argv[0]).parent)); "
             "runpy.run_path(sys.argv[0], run_name='__main__')")


def run(script: str, argv: list[str], out: Path, clock: str = "wall") -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": "1"} if clock == "cpu" else {})}
    subprocess.run([sys.executable, *(["-c", CPU_CLOCK] if clock == "cpu" else []), str(ROOT / script), *argv,
                    "--output-dir", str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=env)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=192, help="rows of data (one epoch each)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each script; the median run is reported")
    parser.add_argument("--batch-size", type=int, default=4, help="micro-batch size")
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens the student samples per prompt")
    parser.add_argument("--work", default=None, help="folder for the kit and runs (default: a temp folder)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: wall-clock seconds with torch's default threads; cpu: the process's CPU seconds, "
                             "one thread (robust on a machine shared with other jobs)")
    args = parser.parse_args()

    import tiny

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_on_policy_"))
    kit = tiny.build_kit(work / "kit")
    data = write_data(work / "data.jsonl", args.rows)
    common_args = ["--student", str(kit["student"]), "--data", str(data), "--epochs", "1", "--batch-size",
                   str(args.batch_size), "--grad-accum", str(args.grad_accum), "--lr", "1e-4", "--seed", "0"]
    def median_run(script, argv, name):
        runs = sorted((run(script, argv, work / f"{name}_{i}", args.clock) for i in range(args.repeats)),
                      key=lambda metrics: metrics[-1]["elapsed_s"])
        return runs[len(runs) // 2]

    sft = median_run("sequence_level.py", common_args, "sequence_level")
    gkd = median_run("on_policy.py", [*common_args, "--teacher", str(kit["teacher"]), "--lmbda", "1",
                                      "--max-new-tokens", str(args.max_new_tokens)], "on_policy")

    sft_s, gkd_s = sft[-1]["elapsed_s"], gkd[-1]["elapsed_s"]
    split = {k: sum(m.get(k, 0.0) for m in gkd) for k in ("gen_s", "teacher_s", "student_s")}
    split["other_s"] = gkd_s - sum(split.values())
    gen_len = sum(m["gen_len"] for m in gkd) / len(gkd)
    cut = sum(m["cut_frac"] for m in gkd) / len(gkd)
    print(f"{args.rows} rows, batch {args.batch_size} x {args.grad_accum} accumulation, {len(gkd)} optimizer steps, "
          f"max {args.max_new_tokens} new tokens (mean sampled {gen_len:.1f}, {cut:.0%} cut)")
    print(f"median of {args.repeats} runs each; " + ("wall-clock seconds" if args.clock == "wall" else
                                                     "CPU seconds of each process, one thread (--clock cpu)"))
    print("| run | epoch time | ratio |\n|---|---|---|")
    print(f"| sequence_level.py | {sft_s:.2f} s | 1.00x |")
    print(f"| on_policy.py --lmbda 1 | {gkd_s:.2f} s | {gkd_s / sft_s:.2f}x |")
    print("\non-policy time split: " + ", ".join(f"{k[:-2]} {v:.2f} s ({v / gkd_s:.0%})" for k, v in split.items()))
    print(f"ratio on_policy / sequence_level = {gkd_s / sft_s:.2f} (target <= 2.5)")


if __name__ == "__main__":
    main()
