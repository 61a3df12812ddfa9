"""Distilling from a teacher top-K cache vs from the live teacher: cache size, quality and cost, measured.

    make demo && python bench/bench_cache.py        # needs the demo's trained teacher and data (demo_out/full)

1. Size: cache_teacher.py on the demo's 800 teacher completions at K=20 and K=64 (float16 log-probs); bytes per
   cached token from the files on disk. The format does not depend on the vocabulary size (ids are int32).
2. Quality: token_level.py with the demo's budget (300 steps x 16 sequences, forward KL, T=2, alpha=0.1), once
   with the teacher loaded and once from the K=64 cache (vocabulary 512: K=64 is 1/8 of it); then the held-out
   KL(teacher || student) at T=1 on the teacher's answers to the 200 test problems, and exact match.
3. Cost: a larger random teacher (Qwen2 shape, 12 layers, d=768, same tokenizer) so that holding it matters;
   the same student trains 20 steps with it loaded vs from its K=64 cache. Each run is its own process: peak RSS
   (VmHWM) of that process and the median optimizer-step time (from metrics.jsonl, models already loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def child(out: str, argv: list[str]) -> None:
    """Run token_level in this process and record its peak resident memory."""
    import token_level

    token_level.main(argv)
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child started by a large parent
    # would report the parent's peak.
    status = Path("/proc/self/status")
    if status.exists():
        peak_kb = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM"))
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(out).write_text(json.dumps({"max_rss_mb": peak_kb / 1024}))


def run_token_level(argv: list[str], out_dir: Path) -> dict:
    stats = out_dir.with_suffix(".rss.json")
    subprocess.run([sys.executable, __file__, "--child", str(stats), "--", *argv, "--output-dir", str(out_dir)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(metrics, metrics[1:])]
    return {**json.loads(stats.read_text()), "step_s": statistics.median(times), "total_s": metrics[-1]["elapsed_s"]}


def cache(teacher: Path, data: Path, out: Path, k: int, rows: int | None = None) -> dict:
    import cache_teacher

    if rows is not None:
        lines = data.read_text().splitlines()[:rows]
        data = out.with_suffix(".jsonl")
        data.write_text("\n".join(lines) + "\n")
    if (out / "cache.json").exists():
        manifest = json.loads((out / "cache.json").read_text())
        if manifest.get("complete"):
            return manifest
    return cache_teacher.main(["--teacher", str(teacher), "--data", str(data), "--output", str(out), "--top-k",
                               str(k), "--batch-size", "16"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=str(ROOT / "demo_out" / "full"), help="the demo's output folder")
    parser.add_argument("--out", default=str(ROOT / "demo_out" / "bench_cache"), help="where runs go")
    args = parser.parse_args()
    import common
    import demo
    import tiny

    demo_dir, out = Path(args.demo), Path(args.out)
    if not (demo_dir / "teacher_final.json").exists():
        raise SystemExit(f"{demo_dir}: no trained demo teacher; run `make demo` first")
    teacher = Path(json.loads((demo_dir / "teacher_final.json").read_text())["path"])
    if not teacher.is_absolute():
        teacher = ROOT / teacher
    data, student = demo_dir / "teacher_data.jsonl", ROOT / "demo_out" / "models" / "student"
    out.mkdir(parents=True, exist_ok=True)

    print("== 1. size")
    sizes = {k: cache(teacher, data, out / f"cache_k{k}", k) for k in (20, 64)}
    for k, m in sizes.items():
        print(f"K={k}: {m['bytes']} bytes for {m['tokens']} tokens = {m['bytes_per_token']} bytes/token")

    print("== 2. quality (demo budget)")
    budget = ["--student", str(student), "--data", str(data), "--max-steps", "300", "--batch-size", "16",
              "--lr", "3e-3", "--kl", "forward", "--temperature", "2", "--alpha", "0.1", "--seed", "0"]
    live = run_token_level([*budget, "--teacher", str(teacher)], out / "live")
    cached = run_token_level([*budget, "--teacher-cache", str(out / "cache_k64")], out / "cached_k64")
    problems = common.load_prompt_dataset(str(demo_dir / "task_test.jsonl"))
    teacher_model, teacher_tokenizer = common.load_model(str(teacher))
    texts = common.answer_problems(teacher_model, teacher_tokenizer, problems, system_prompt=demo.SYSTEM_PROMPT,
                                   max_new_tokens=32, batch_size=50, desc="teacher answers")
    quality = {name: demo.score(out / name, problems, (teacher_model, teacher_tokenizer, texts))
               for name in ("live", "cached_k64")}
    for name, row in quality.items():
        print(f"{name}: held-out KL {row['kl_to_teacher']:.4f}, top-1 {row['top1_agreement']:.1%}, "
              f"exact match {row['exact_match']:.1%}")
    kl_ratio = quality["cached_k64"]["kl_to_teacher"] / quality["live"]["kl_to_teacher"]

    print("== 3. cost with a larger teacher")
    big = out / "big_teacher"
    if not (big / "config.json").exists():
        tokenizer = common.load_tokenizer(str(teacher))
        tiny.save_model(big, tiny.build_model("qwen2", tokenizer, hidden=768, layers=12, heads=12, kv_heads=4,
                                              intermediate=2048), tokenizer)
    big_cache = cache(big, data, out / "big_cache_k64", 64, rows=320)
    small_data = out / "big_cache_k64.jsonl"
    cost_args = ["--student", str(student), "--data", str(small_data), "--max-steps", "20", "--batch-size", "16",
                 "--lr", "3e-3", "--seed", "0"]
    with_teacher = run_token_level([*cost_args, "--teacher", str(big)], out / "cost_live")
    from_cache = run_token_level([*cost_args, "--teacher-cache", str(out / "big_cache_k64")], out / "cost_cached")
    params = sum(p.numel() for p in common.load_model(str(big))[0].parameters())

    lines = [
        f"cache size (demo data, {sizes[20]['tokens']} tokens): K=20 {sizes[20]['bytes_per_token']} B/token, "
        f"K=64 {sizes[64]['bytes_per_token']} B/token",
        f"held-out KL(teacher||student), T=1, 200 problems: live teacher {quality['live']['kl_to_teacher']:.4f}, "
        f"K=64 cache {quality['cached_k64']['kl_to_teacher']:.4f} (ratio {kl_ratio:.3f}); exact match "
        f"{quality['live']['exact_match']:.1%} vs {quality['cached_k64']['exact_match']:.1%}; "
        f"training loop {live['total_s']:.1f}s vs {cached['total_s']:.1f}s",
        f"larger teacher ({params / 1e6:.0f}M params, {big_cache['tokens']} cached tokens), 20 steps x 16 seqs: "
        f"peak RSS {with_teacher['max_rss_mb']:.0f} MB with the teacher vs {from_cache['max_rss_mb']:.0f} MB from "
        f"the cache ({from_cache['max_rss_mb'] / with_teacher['max_rss_mb']:.2f}x); median step "
        f"{with_teacher['step_s'] * 1000:.0f} ms vs {from_cache['step_s'] * 1000:.0f} ms "
        f"({from_cache['step_s'] / with_teacher['step_s']:.2f}x)",
    ]
    print("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"sizes": sizes, "quality": quality, "kl_ratio": kl_ratio,
                                                  "cost": {"teacher": with_teacher, "cache": from_cache}},
                                                 indent=2, default=str))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:])
    else:
        main()
