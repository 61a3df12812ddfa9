"""Host memory of training from a --store hidden cache, with 1 and 2 processes: is the cache mapped (the pages are
the shared page cache) or copied into every process?

    python bench/bench_cache_memory.py                       # this checkout
    python bench/bench_cache_memory.py --root /tmp/old_copy  # another checkout's training scripts, same cache

Offline, no demo needed: the tiny kit's tokenizer and student, a wide 1-layer random teacher (--hidden) on that
tokenizer, --rows procedural rows cached as float32 hidden states (4 * hidden bytes per token) by this checkout's
cache_teacher.py; then token_level.py and cross_tokenizer.py train --steps steps from the cache in 1 process and
in 2 (DDP over gloo on the CPU: `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu`). Each process reports, after
training, its peak RSS (VmHWM, which counts the mapped cache pages it touched), its private memory (RssAnon: a
copy of the cache lands here) and its proportional share (Pss: shared pages divided among the processes that map
them). A copy per process shows as RssAnon growing by the cache size in each process; a mapped cache as RssFile.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def memory_now() -> dict:
    status = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
              if line.startswith(("VmHWM", "RssAnon", "RssFile"))}
    pss = next(int(line.split()[1]) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()
               if line.startswith("Pss:"))
    return {"peak_rss_mb": status["VmHWM"] / 1024, "anon_mb": status["RssAnon"] / 1024,
            "file_mb": status["RssFile"] / 1024, "pss_mb": pss / 1024}


def child(out: str, root: str, script: str, argv: list[str]) -> None:
    """Run `script`'s main from checkout `root` in this process; write this process's memory afterwards."""
    sys.path.insert(0, root)
    module = __import__(script)
    module.main(argv)
    rank = os.environ.get("RANK", "0")
    Path(f"{out}.{rank}.json").write_text(json.dumps(memory_now()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, root: Path, script: str, argv: list[str], processes: int) -> list[dict]:
    for old in out.parent.glob(f"{out.name}.*.json"):
        old.unlink()
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
        str(free_port())]
    subprocess.run([*launch, __file__, "--child", str(out), str(root), script, *argv], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(p.read_text()) for p in sorted(out.parent.glob(f"{out.name}.*.json"))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(ROOT), help="the checkout whose training scripts run")
    parser.add_argument("--out", default=str(ROOT / "demo_out" / "bench_cache_memory"), help="work folder")
    parser.add_argument("--rows", type=int, default=2000, help="cached rows")
    parser.add_argument("--hidden", type=int, default=1024, help="the teacher's hidden size")
    parser.add_argument("--steps", type=int, default=10, help="training steps per run")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import cache_teacher
    import tiny

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kit = tiny.build_kit(out / "kit")
    teacher = out / f"teacher_h{args.hidden}"
    if not (teacher / "config.json").exists():
        import models

        tokenizer = models.load_tokenizer(str(kit["teacher"]))
        tiny.save_model(teacher, tiny.build_model("qwen2", tokenizer, hidden=args.hidden, layers=1, heads=8,
                                                  kv_heads=2, intermediate=args.hidden), tokenizer)
    data = out / f"rows{args.rows}.jsonl"
    rng = random.Random(0)
    with data.open("w") as f:
        for i in range(args.rows):
            question, solution, answer = tiny.make_problem(rng)
            f.write(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": question}],
                                "completion": solution, "answer": answer}) + "\n")
    folder = out / f"hidden_h{args.hidden}_rows{args.rows}"
    if not (folder / "cache.json").exists() or not json.loads((folder / "cache.json").read_text()).get("complete"):
        cache_teacher.main(["--teacher", str(teacher), "--data", str(data), "--output", str(folder), "--store",
                            "hidden", "--hidden-dtype", "float32", "--batch-size", "32"])
    manifest = json.loads((folder / "cache.json").read_text())
    cache_mb = manifest["bytes"] / 2**20
    print(f"cache: {manifest['tokens']} tokens x {manifest['bytes_per_token']} bytes = {cache_mb:.0f} MB "
          f"(float32, H={args.hidden}); scripts from {args.root}")
    results = {"cache_mb": cache_mb, "root": args.root, "runs": {}}
    for script in ("token_level", "cross_tokenizer"):
        for processes in (1, 2):
            # The same global batch: 8 sequences per step.
            argv = ["--student", str(kit["student"]), "--data", str(data), "--teacher-cache", str(folder),
                    "--max-steps", str(args.steps), "--batch-size", str(8 // processes), "--output-dir",
                    str(out / f"run_{script}_{processes}"), "--overwrite", "--log-every", "100"]
            stats = run(out / f"mem_{script}_{processes}", Path(args.root), script, argv, processes)
            results["runs"][f"{script}_{processes}"] = stats
            print(f"{script}, {processes} process{'es' if processes > 1 else ''}: " + "; ".join(
                f"rank {i}: peak RSS {s['peak_rss_mb']:.0f} MB, private {s['anon_mb']:.0f} MB, mapped files "
                f"{s['file_mb']:.0f} MB, Pss {s['pss_mb']:.0f} MB" for i, s in enumerate(stats)))
    name = "memory_" + ("this" if Path(args.root).resolve() == ROOT else Path(args.root).name) + ".json"
    (out / name).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        main()
