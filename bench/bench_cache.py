"""Distilling from a teacher cache (top-K, or exact: hidden states + head) vs from the live teacher: cache size,
quality and cost, measured.

    make demo && python bench/bench_cache.py        # needs the demo's trained teacher and data (demo_out/full)

1. Size: cache_teacher.py on the demo's 800 teacher completions at K=20 and K=64 (float16 log-probs), and with
   --store hidden (bfloat16 hidden states, plus the head once); bytes per cached token from the files on disk.
   The top-K format does not depend on the vocabulary size (ids are int32); the hidden one is 2 * H bytes.
2. Quality: token_level.py with the demo's budget (300 steps x 16 sequences, T=2, alpha=0.1) with the teacher
   loaded, from the K=64 cache (vocabulary 512: K=64 is 1/8 of it) and from the hidden cache, for forward KL and
   for reverse KL (where a top-K cache lumps the student's mass outside the teacher's top K into one bucket); then
   on the teacher's answers to the 200 test problems the held-out KL(teacher || student) and reverse
   KL(student || teacher) at T=1, and exact match. Each cache's error in the objective itself is the training
   divergence of the first steps against the live run's (same data, same start); after 300 steps the held-out
   numbers also carry trajectory noise (a bf16 rounding is enough to send a run down another path), so a few
   percent between the hidden cache and the live teacher there is noise, not bias.
3. Cost: a larger random teacher (Qwen2 shape, 12 layers, d=768, same tokenizer) so that holding it matters;
   the same student trains 20 steps with it loaded vs from its K=64 cache vs from its hidden cache. Each run is
   its own process: peak RSS (VmHWM) of that process and the median optimizer-step time (from metrics.jsonl,
   models already loaded).
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
    subprocess.run([sys.executable, __file__, "--child", str(stats), "--", *argv, "--output-dir", str(out_dir),
                    "--overwrite"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(metrics, metrics[1:])]
    return {**json.loads(stats.read_text()), "step_s": statistics.median(times), "total_s": metrics[-1]["elapsed_s"]}


def cache(teacher: Path, data: Path, out: Path, k: int | None, rows: int | None = None) -> dict:
    """A top-K cache (k) or, with k None, a --store hidden one (bfloat16); reused when already complete."""
    import cache_teacher

    if rows is not None:
        lines = data.read_text().splitlines()[:rows]
        data = out.with_suffix(".jsonl")
        data.write_text("\n".join(lines) + "\n")
    if (out / "cache.json").exists():
        manifest = json.loads((out / "cache.json").read_text())
        if manifest.get("complete"):
            return manifest
    store = ["--store", "hidden"] if k is None else ["--top-k", str(k)]
    return cache_teacher.main(["--teacher", str(teacher), "--data", str(data), "--output", str(out), *store,
                               "--batch-size", "16"])


def heldout_reverse_kl(model_dir: Path, teacher_model, tokenizer, problems: list[dict], texts: list[str]) -> float:
    """Mean reverse KL(student || teacher) at T=1 over the completion tokens of the teacher's held-out answers."""
    import torch

    import checks
    import common
    import demo
    import models

    student = models.load_model(str(model_dir))[0].eval()
    examples = [common.encode_chat(tokenizer, [{"role": "system", "content": demo.SYSTEM_PROMPT},
                                               {"role": "user", "content": p["prompt"]}], text)
                for p, text in zip(problems, texts)]
    heads = models.output_head(student).weight, models.output_head(teacher_model).weight
    total = count = 0.0
    with torch.inference_mode():
        for lo in range(0, len(examples), 16):
            batch = common.pad_batch(examples[lo:lo + 16], tokenizer.pad_token_id)
            s, t = (common.shift_for_next_token(models.teacher_hidden_states(m, batch["input_ids"],
                                                                             batch["attention_mask"]), batch)[0]
                    for m in (student, teacher_model))
            stats = checks.agreement(s, heads[0], t, heads[1], vocab=min(h.shape[0] for h in heads), beta=1.0)
            total, count = total + stats["div_sum"], count + stats["count"]
    return total / max(count, 1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=str(ROOT / "demo_out" / "full"), help="the demo's output folder")
    parser.add_argument("--out", default=str(ROOT / "demo_out" / "bench_cache"), help="where runs go")
    args = parser.parse_args()
    import common
    import demo
    import generation
    import models
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
    hidden = cache(teacher, data, out / "cache_hidden", None)
    print(f"hidden (bfloat16, H={hidden['hidden_size']}): {hidden['bytes']} bytes for {hidden['tokens']} tokens = "
          f"{hidden['bytes_per_token']} bytes/token, + {hidden['head_bytes']} bytes of head once")

    print("== 2. quality (demo budget)")
    problems = common.load_prompt_dataset(str(demo_dir / "task_test.jsonl"))
    teacher_model, teacher_tokenizer = models.load_model(str(teacher))
    texts = generation.answer_problems(teacher_model, teacher_tokenizer, problems, system_prompt=demo.SYSTEM_PROMPT,
                                       max_new_tokens=32, batch_size=50, desc="teacher answers")
    teachers = {"live": ["--teacher", str(teacher)], "cached_k64": ["--teacher-cache", str(out / "cache_k64")],
                "hidden": ["--teacher-cache", str(out / "cache_hidden")]}
    runs, quality = {}, {}
    for kl in ("forward", "reverse"):
        budget = ["--student", str(student), "--data", str(data), "--max-steps", "300", "--batch-size", "16",
                  "--lr", "3e-3", "--kl", kl, "--temperature", "2", "--alpha", "0.1", "--seed", "0"]
        for source, flags in teachers.items():
            name = source if kl == "forward" else f"{source}_reverse"
            runs[name] = run_token_level([*budget, *flags], out / name)
            quality[name] = demo.score(out / name, problems, (teacher_model, teacher_tokenizer, texts))
            quality[name]["reverse_kl_to_teacher"] = heldout_reverse_kl(out / name, teacher_model, teacher_tokenizer,
                                                                        problems, texts)
            row = quality[name]
            print(f"{name}: held-out KL {row['kl_to_teacher']:.4f}, reverse KL {row['reverse_kl_to_teacher']:.4f}, "
                  f"top-1 {row['top1_agreement']:.1%}, exact match {row['exact_match']:.1%}")
    live, cached = runs["live"], runs["cached_k64"]
    kl_ratio = quality["cached_k64"]["kl_to_teacher"] / quality["live"]["kl_to_teacher"]

    print("== 3. cost with a larger teacher")
    big = out / "big_teacher"
    if not (big / "config.json").exists():
        tokenizer = models.load_tokenizer(str(teacher))
        tiny.save_model(big, tiny.build_model("qwen2", tokenizer, hidden=768, layers=12, heads=12, kv_heads=4,
                                              intermediate=2048), tokenizer)
    big_cache = cache(big, data, out / "big_cache_k64", 64, rows=320)
    small_data = out / "big_cache_k64.jsonl"
    cost_args = ["--student", str(student), "--data", str(small_data), "--max-steps", "20", "--batch-size", "16",
                 "--lr", "3e-3", "--seed", "0"]
    with_teacher = run_token_level([*cost_args, "--teacher", str(big)], out / "cost_live")
    from_cache = run_token_level([*cost_args, "--teacher-cache", str(out / "big_cache_k64")], out / "cost_cached")
    big_hidden = cache(big, data, out / "big_cache_hidden", None, rows=320)
    from_hidden = run_token_level([*cost_args, "--teacher-cache", str(out / "big_cache_hidden")], out / "cost_hidden")
    params = sum(p.numel() for p in models.load_model(str(big))[0].parameters())

    def first_steps(name: str) -> list[float]:  # the training divergence (div) of the first 10 steps
        return [json.loads(line)["div"] for line in (out / name / "metrics.jsonl").read_text().splitlines()[:10]]

    def objective_gap(kl: str) -> str:  # the loss each cache trains on, against the live teacher's, same steps
        suffix = "" if kl == "forward" else "_reverse"
        live_div, top_div, hidden_div = (first_steps(f"{source}{suffix}") for source in teachers)
        worst = max(abs(h / v - 1) for h, v in zip(hidden_div, live_div))
        return (f"{kl} KL at T=2, step 1: live {live_div[0]:.3f}, K=64 cache {top_div[0]:.3f} "
                f"({top_div[0] / live_div[0]:.2f}x), hidden cache {hidden_div[0]:.3f} (steps 1-10 within "
                f"{worst:.0e} of live)")

    def versus(kl: str, key: str) -> str:  # one training divergence: held-out `key` of live, K=64 and hidden
        suffix = "" if kl == "forward" else "_reverse"
        live_kl, top_kl, hidden_kl = (quality[f"{source}{suffix}"][key] for source in teachers)
        return (f"live {live_kl:.4f}, K=64 cache {top_kl:.4f} ({top_kl / live_kl:.3f}x live), hidden cache "
                f"{hidden_kl:.4f} ({hidden_kl / live_kl:.3f}x live, {hidden_kl / top_kl:.3f}x K=64)")

    lines = [
        f"cache size (demo data, {sizes[20]['tokens']} tokens): K=20 {sizes[20]['bytes_per_token']} B/token, "
        f"K=64 {sizes[64]['bytes_per_token']} B/token, hidden (bf16, H={hidden['hidden_size']}) "
        f"{hidden['bytes_per_token']} B/token + a {hidden['head_bytes'] / 1e3:.0f} KB head once",
        f"held-out KL(teacher||student), T=1, 200 problems: live teacher {quality['live']['kl_to_teacher']:.4f}, "
        f"K=64 cache {quality['cached_k64']['kl_to_teacher']:.4f} (ratio {kl_ratio:.3f}); exact match "
        f"{quality['live']['exact_match']:.1%} vs {quality['cached_k64']['exact_match']:.1%}; "
        f"training loop {live['total_s']:.1f}s vs {cached['total_s']:.1f}s",
        f"larger teacher ({params / 1e6:.0f}M params, {big_cache['tokens']} cached tokens), 20 steps x 16 seqs: "
        f"peak RSS {with_teacher['max_rss_mb']:.0f} MB with the teacher vs {from_cache['max_rss_mb']:.0f} MB from "
        f"the cache ({from_cache['max_rss_mb'] / with_teacher['max_rss_mb']:.2f}x); median step "
        f"{with_teacher['step_s'] * 1000:.0f} ms vs {from_cache['step_s'] * 1000:.0f} ms "
        f"({from_cache['step_s'] / with_teacher['step_s']:.2f}x)",
        f"training divergence vs the live teacher's: {objective_gap('forward')}; {objective_gap('reverse')}",
        f"hidden cache (exact): held-out KL(teacher||student) at T=1 after forward-KL training (T=2), "
        f"{versus('forward', 'kl_to_teacher')}",
        f"hidden cache (exact): held-out reverse KL(student||teacher) at T=1 after reverse-KL training (T=2), "
        f"{versus('reverse', 'reverse_kl_to_teacher')}; exact match live "
        f"{quality['live_reverse']['exact_match']:.1%}, K=64 {quality['cached_k64_reverse']['exact_match']:.1%}, "
        f"hidden {quality['hidden_reverse']['exact_match']:.1%}",
        f"hidden cache, larger teacher ({big_hidden['bytes_per_token']} B/token, H={big_hidden['hidden_size']}), "
        f"20 steps x 16 seqs: peak RSS {from_hidden['max_rss_mb']:.0f} MB "
        f"({from_hidden['max_rss_mb'] / with_teacher['max_rss_mb']:.2f}x the live teacher's, "
        f"{from_hidden['max_rss_mb'] / from_cache['max_rss_mb']:.2f}x K=64's); median step "
        f"{from_hidden['step_s'] * 1000:.0f} ms ({from_hidden['step_s'] / with_teacher['step_s']:.2f}x live, "
        f"{from_hidden['step_s'] / from_cache['step_s']:.2f}x K=64)",
    ]
    print("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"sizes": {**sizes, "hidden": hidden}, "quality": quality,
                                                  "kl_ratio": kl_ratio, "runs": runs,
                                                  "cost": {"teacher": with_teacher, "cache": from_cache,
                                                           "hidden": from_hidden}},
                                                 indent=2, default=str))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:])
    else:
        main()
