"""Distilling from a teacher cache (top-K, sampled, or exact: hidden states + head) vs from the live teacher: cache
size, the objective and gradient each store trains on, quality after training, and cost, measured.

    make demo && python bench/bench_cache.py        # needs the demo's trained teacher, student and data (demo_out/full)
    python bench/bench_cache.py --demo /elsewhere/demo_out/full --out /tmp/bench_cache

1. Size: cache_teacher.py on the demo's 800 teacher completions: top-K at K=20 and K=64 (float16 log-probs,
   tails at T=1 and 2), sampled caches at T=1 and at T=2 (ids + counts + float16 log-probs of the distinct
   draws) and --store hidden (bfloat16 hidden states, plus the head once); bytes per cached token from the files
   on disk. A sampled cache's size depends on how many distinct tokens the draws hit (a peaked teacher: few):
   the number of draws compared below at each T is the one, of 4, 16, 64, ..., whose cache of the first 100 rows
   comes closest to the K=20 cache's bytes per token.
2. The objective: on the first 64 rows, the demo's base student against the live teacher, the K=20 cache, the
   sampled cache of the same size and the hidden cache: forward KL, reverse KL and JSD(0.5) at T=1 and T=2, per
   token (step 1 of a run: the teacher's divergence from the untrained student). A sampled cache is one draw: its
   +- is the standard error over tokens of (its estimate - live). A sampled cache trains forward KL only.
3. The gradient of forward KL (alpha 0) with respect to every student parameter on one batch of 16 rows, at T=1
   and T=2: each store's bias ||E[g] - g_live|| / ||g_live|| and spread sqrt(E||g - E[g]||^2) / ||g_live|| (one
   cache's distance from its mean). The sampled store's mean and spread come from --draws independent draws of the
   batch (cache_teacher.teacher_samples, what cache_teacher.py stores), so its bias is known to spread / sqrt(R).
4. Quality: token_level.py with the demo's budget (300 steps x 16 sequences, T=2, alpha=0.1; the demo's pretrained
   student) with the teacher loaded, from the K=20 cache, the sampled T=2 cache and the hidden cache, forward KL;
   and live, K=20 and hidden for reverse KL; then on the teacher's answers to the 200 test problems the held-out
   KL(teacher || student) and reverse KL(student || teacher) at T=1, and exact match. After 300 steps the
   held-out numbers also carry trajectory noise (a bf16 rounding is enough to send a run down another path), so a
   few percent between runs there is noise, not bias: sections 2 and 3 measure the bias.
5. doctor.py --teacher-cache on each store: the "cache gap" line it prints for the first batch (forward KL, T=2).
6. Cost: a larger random teacher (Qwen2 shape, 12 layers, d=768, same tokenizer) so that holding it matters;
   the same student trains 20 steps with it loaded vs from its K=64 cache vs from its hidden cache. Each run is
   its own process: peak RSS (VmHWM) of that process and the median optimizer-step time (from metrics.jsonl,
   models already loaded).
"""

from __future__ import annotations

import argparse
import contextlib
import io
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

SAMPLES = (4, 16, 64, 256, 1024, 4096, 16384)  # draws per token tried (on PROBE_ROWS) for the sampled caches
PROBE_ROWS = 100


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


def cache(teacher: Path, data: Path, out: Path, *store: str, rows: int | None = None) -> dict:
    """A cache_teacher.py cache with the flags `store` (e.g. "--top-k", "20"); reused when already complete."""
    import cache_teacher

    if rows is not None:
        lines = data.read_text().splitlines()[:rows]
        data = out.with_suffix(".jsonl")
        data.write_text("\n".join(lines) + "\n")
    if (out / "cache.json").exists():
        manifest = json.loads((out / "cache.json").read_text())
        if manifest.get("complete") and manifest.get("format") == cache_teacher.FORMAT:
            return manifest
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


class Batches:
    """The first rows of the demo data as token_level.py batches them, each with the live teacher's hidden states
    and every cache's collated teacher rows at a temperature (`cache_teacher.collate_rows`)."""

    def __init__(self, student_dir: Path, teacher_model, data: Path, caches: dict[str, Path], rows: int):
        import cache_teacher
        import common
        import models

        self.student, tokenizer = models.load_model(str(student_dir))
        self.teacher = teacher_model
        examples, _ = common.encode_rows(common.load_distill_rows(data)[:rows], tokenizer, 1024)
        self.batches = [common.pad_batch(examples[lo:lo + 16], tokenizer.pad_token_id)
                        for lo in range(0, len(examples), 16)]
        self.examples = [examples[lo:lo + 16] for lo in range(0, len(examples), 16)]
        self.caches = {name: cache_teacher.load_cache(folder) for name, folder in caches.items()}
        self.hidden_weight = cache_teacher.load_head(caches["hidden"], self.caches["hidden"][0])
        self.vocab = models.output_head(self.student).weight.shape[0]

    def teacher_rows(self, name: str, index: int, temperature: float) -> dict:
        import cache_teacher

        manifest, rows = self.caches[name]
        return cache_teacher.collate_rows([rows[ex["id"]] for ex in self.examples[index]], manifest, temperature)

    def states(self, index: int):
        """(student hidden [N, H] with its graph, targets [N], live teacher hidden [N, H_t]) of batch `index`."""
        import torch

        import common
        import models

        batch = self.batches[index]
        with torch.inference_mode():
            teacher = models.teacher_hidden_states(self.teacher, batch["input_ids"], batch["attention_mask"])
            teacher = common.shift_for_next_token(teacher, batch)[0].clone()
        student = models.student_hidden_states(self.student, batch["input_ids"], batch["attention_mask"])
        return (*common.shift_for_next_token(student, batch), teacher)


def objective(batches: Batches, store: str, student_hidden, targets, teacher_hidden, *, beta: float,
              temperature: float, index: int = 0, draws: dict | None = None):
    """Per-token divergence [N] of one batch as token_level.py trains on it from `store` (alpha 0)."""
    import torch

    import cache_teacher
    import common
    import models

    student_weight = models.output_head(batches.student).weight
    teacher_weight = models.output_head(batches.teacher).weight
    vocab = batches.vocab
    student_logits = (student_hidden @ student_weight[:vocab].T).float()
    if store in ("live", "hidden"):
        if store == "hidden":
            teacher_hidden = batches.teacher_rows("hidden", index, temperature)["teacher_hidden"]
            teacher_weight = batches.hidden_weight
        with torch.no_grad():
            teacher_logits = (teacher_hidden.to(teacher_weight.dtype) @ teacher_weight[:vocab].T).float()
        return common.generalized_jsd_per_position(student_logits, teacher_logits, beta, temperature)
    rows = draws if draws is not None else batches.teacher_rows(store, index, temperature)
    if "draw_ids" in rows:
        return cache_teacher.sampled_forward_kl(student_logits, rows["draw_ids"], rows["draw_counts"],
                                                rows["draw_logprobs"], temperature)
    return cache_teacher.topk_bucket_divergence(student_logits, rows["topk_ids"], rows["topk_logprobs"],
                                                rows["tail_logmass"], beta, temperature)


def fresh_draws(teacher_hidden, teacher_weight, vocab: int, samples: int, temperature: float, seed: int) -> dict:
    """One independent sampled cache of a batch, drawn as cache_teacher.py draws, collated as a reader gets it."""
    import torch

    import cache_teacher

    with torch.no_grad():
        lengths, ids, counts, logprobs, _ = cache_teacher.teacher_samples(
            teacher_hidden, teacher_weight, samples, vocab=vocab, temperatures=[temperature],
            generator=torch.Generator().manual_seed(seed))
    row = {"draw_lengths": lengths, "draw_ids": ids, "draw_counts": counts, "draw_logprobs": logprobs}
    return cache_teacher.collate_rows([row], {"store": "sampled", "temperatures": [temperature]}, temperature)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=str(ROOT / "demo_out" / "full"), help="the demo's output folder")
    parser.add_argument("--out", default=str(ROOT / "demo_out" / "bench_cache"), help="where caches and runs go")
    parser.add_argument("--draws", type=int, default=64, help="independent sampled caches of the gradient batch")
    parser.add_argument("--skip-training", action="store_true", help="sections 1-3 and 5 only (no 300-step runs)")
    args = parser.parse_args()
    import torch

    import common
    import demo
    import doctor
    import generation
    import models
    import tiny

    demo_dir, out = Path(args.demo), Path(args.out)
    if not (demo_dir / "teacher_final.json").exists():
        raise SystemExit(f"{demo_dir}: no trained demo teacher; run `make demo` first")
    teacher = Path(json.loads((demo_dir / "teacher_final.json").read_text())["path"])
    if not teacher.is_absolute():  # relative to the checkout the demo ran in (demo_out/full/..)
        teacher = demo_dir.parents[1] / teacher
    data, student = demo_dir / "teacher_data.jsonl", demo_dir / "student_base"
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}

    print("== 1. size")
    sizes = {f"topk{k}": cache(teacher, data, out / f"cache_k{k}", "--top-k", str(k)) for k in (20, 64)}
    target = sizes["topk20"]["bytes_per_token"]
    matched, probes = {}, {}
    for temperature in (1, 2):
        tried = {}
        for s in SAMPLES:
            tried[s] = cache(teacher, data, out / f"probe_sampled{s}_t{temperature}", "--store", "sampled",
                             "--samples", str(s), "--temperatures", str(temperature),
                             rows=PROBE_ROWS)["bytes_per_token"]
            if tried[s] >= target:
                break
        best = min(tried, key=lambda s: abs(tried[s] - target))
        probes[temperature] = tried
        print(f"T={temperature}: bytes/token of the first {PROBE_ROWS} rows by draws per token: {tried}")
        matched[temperature] = (best, out / f"cache_sampled{best}_t{temperature}")
        sizes[f"sampled{best}_t{temperature}"] = cache(teacher, data, matched[temperature][1], "--store", "sampled",
                                                       "--samples", str(best), "--temperatures", str(temperature))
    sizes["hidden"] = cache(teacher, data, out / "cache_hidden", "--store", "hidden")
    for name, m in sizes.items():
        print(f"{name}: {m['bytes_per_token']} bytes/token ({m['tokens']} tokens)")
    results["sizes"] = sizes
    results["matched_samples"] = {t: s for t, (s, _) in matched.items()}
    results["probes"] = probes

    print("== 2. the objective (first 64 rows, per token)")
    teacher_model, teacher_tokenizer = models.load_model(str(teacher))
    folders = {"topk20": out / "cache_k20", "hidden": out / "cache_hidden",
               **{f"sampled_t{t}": folder for t, (_, folder) in matched.items()}}
    batches = Batches(student, teacher_model, data, folders, rows=64)
    objectives = {}
    for temperature in (1.0, 2.0):
        sampled = f"sampled_t{temperature:g}"
        for beta, kl in ((0.0, "forward KL"), (1.0, "reverse KL"), (0.5, "JSD(0.5)")):
            per_store = {store: [] for store in ("live", "topk20", sampled, "hidden")
                         if beta == 0 or not store.startswith("sampled")}
            with torch.no_grad():
                for index in range(len(batches.batches)):
                    states = batches.states(index)
                    for store in per_store:
                        per_store[store].append(objective(batches, store, *states, beta=beta,
                                                          temperature=temperature, index=index))
            values = {store: torch.cat(v).double() for store, v in per_store.items()}
            live = values["live"].mean().item()
            row = {store: v.mean().item() for store, v in values.items()}
            if sampled in values:
                diff = values[sampled] - values["live"]
                row[f"{sampled}_se"] = diff.std().item() / len(diff) ** 0.5
            objectives[f"{kl.split()[0].split('(')[0].lower()}_t{temperature:g}"] = row
            print(f"{kl} at T={temperature:g}: live {live:.4f}, " + ", ".join(
                f"{store} {value:.4f} ({value / live:.3f}x)" for store, value in row.items()
                if store != "live" and not store.endswith("_se")) +
                (f" (sampled +- {row[f'{sampled}_se']:.4f})" if f"{sampled}_se" in row else ""))
    results["objective"] = objectives

    print(f"== 3. the gradient of forward KL (one batch of 16 rows, {args.draws} independent sampled draws)")
    params = [p for p in batches.student.parameters() if p.requires_grad]
    teacher_weight = models.output_head(teacher_model).weight
    gradients = {}
    for temperature in (1.0, 2.0):
        samples = matched[int(temperature)][0]
        student_hidden, targets, teacher_hidden = batches.states(0)

        def grad(store, draws=None, t=temperature, h=student_hidden, y=targets, th=teacher_hidden):
            per_token = objective(batches, store, h, y, th, beta=0.0, temperature=t, draws=draws)
            g = torch.autograd.grad(per_token.sum() / len(per_token), params, retain_graph=True)
            return torch.cat([x.flatten() for x in g]).double()

        live = grad("live")
        row = {}
        for store in ("topk20", "hidden"):
            row[store] = {"bias": ((grad(store) - live).norm() / live.norm()).item(), "spread": 0.0}
        sampled = torch.stack([grad("sampled", fresh_draws(teacher_hidden, teacher_weight, batches.vocab, samples,
                                                           temperature, seed)) for seed in range(args.draws)])
        mean = sampled.mean(0)
        spread = ((sampled - mean).pow(2).sum(1).mean().sqrt() / live.norm()).item()
        row[f"sampled{samples}"] = {"bias": ((mean - live).norm() / live.norm()).item(), "spread": spread,
                                    "bias_noise": spread / args.draws ** 0.5,
                                    "cosine": torch.nn.functional.cosine_similarity(sampled, live[None]).mean().item()}
        gradients[f"t{temperature:g}"] = row
        print(f"T={temperature:g}: " + "; ".join(
            f"{store} bias {v['bias']:.2e}" + (f" (+- {v['bias_noise']:.2e}), spread {v['spread']:.2e}, cosine "
                                                f"{v['cosine']:.5f}" if "bias_noise" in v else "")
            for store, v in row.items()))
    results["gradient"] = gradients

    print("== 5. doctor.py --teacher-cache, first batch, forward KL at T=2")
    gaps = {}
    for name, folder in {**folders, "topk64": out / "cache_k64"}.items():
        if name == "sampled_t1":
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # its whole report: only the gap line is wanted here
            report = doctor.run_checks(doctor.parse_args(["--teacher", str(teacher), "--student", str(student),
                                                          "--data", str(data), "--teacher-cache", str(folder),
                                                          "--color", "never"]))
        check = next(c for c in report if c.topic == "cache gap")
        gaps[name] = f"{check.status} {check.message}"
        print(f"{name}: {gaps[name]}")
    results["doctor"] = gaps
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if args.skip_training:
        return

    print("== 4. quality (demo budget)")
    problems = common.load_prompt_dataset(str(demo_dir / "task_test.jsonl"))
    texts = generation.answer_problems(teacher_model, teacher_tokenizer, problems, system_prompt=demo.SYSTEM_PROMPT,
                                   max_new_tokens=32, batch_size=50, desc="teacher answers")
    sources = {"live": ["--teacher", str(teacher)], "topk20": ["--teacher-cache", str(out / "cache_k20")],
               "sampled_t2": ["--teacher-cache", str(matched[2][1])],
               "hidden": ["--teacher-cache", str(out / "cache_hidden")]}
    runs, quality = {}, {}
    for kl in ("forward", "reverse"):
        budget = ["--student", str(student), "--data", str(data), "--max-steps", "300", "--batch-size", "16",
                  "--lr", "3e-3", "--kl", kl, "--temperature", "2", "--alpha", "0.1", "--seed", "0"]
        for source, flags in sources.items():
            if kl == "reverse" and source.startswith("sampled"):
                continue  # forward KL only
            name = source if kl == "forward" else f"{source}_reverse"
            runs[name] = run_token_level([*budget, *flags], out / name)
            quality[name] = demo.score(out / name, problems, (teacher_model, teacher_tokenizer, texts))
            quality[name]["reverse_kl_to_teacher"] = heldout_reverse_kl(out / name, teacher_model, teacher_tokenizer,
                                                                        problems, texts)
            row = quality[name]
            print(f"{name}: held-out KL {row['kl_to_teacher']:.4f}, reverse KL {row['reverse_kl_to_teacher']:.4f}, "
                  f"top-1 {row['top1_agreement']:.1%}, exact match {row['exact_match']:.1%}, "
                  f"training loop {runs[name]['total_s']:.1f}s")
    results.update(quality=quality, runs=runs)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))

    print("== 6. cost with a larger teacher")
    big = out / "big_teacher"
    if not (big / "config.json").exists():
        tokenizer = models.load_tokenizer(str(teacher))
        tiny.save_model(big, tiny.build_model("qwen2", tokenizer, hidden=768, layers=12, heads=12, kv_heads=4,
                                              intermediate=2048), tokenizer)
    big_cache = cache(big, data, out / "big_cache_k64", "--top-k", "64", rows=320)
    small_data = out / "big_cache_k64.jsonl"
    cost_args = ["--student", str(student), "--data", str(small_data), "--max-steps", "20", "--batch-size", "16",
                 "--lr", "3e-3", "--seed", "0"]
    with_teacher = run_token_level([*cost_args, "--teacher", str(big)], out / "cost_live")
    from_cache = run_token_level([*cost_args, "--teacher-cache", str(out / "big_cache_k64")], out / "cost_cached")
    big_hidden = cache(big, data, out / "big_cache_hidden", "--store", "hidden", rows=320)
    from_hidden = run_token_level([*cost_args, "--teacher-cache", str(out / "big_cache_hidden")], out / "cost_hidden")
    params_count = sum(p.numel() for p in models.load_model(str(big))[0].parameters())
    results["cost"] = {"teacher": with_teacher, "cache": from_cache, "hidden": from_hidden}

    lines = [f"larger teacher ({params_count / 1e6:.0f}M params, {big_cache['tokens']} cached tokens), 20 steps x 16 "
             f"seqs: peak RSS {with_teacher['max_rss_mb']:.0f} MB with the teacher, {from_cache['max_rss_mb']:.0f} MB "
             f"from the K=64 cache, {from_hidden['max_rss_mb']:.0f} MB from the hidden cache "
             f"({big_hidden['bytes_per_token']} B/token); median step {with_teacher['step_s'] * 1000:.0f} ms, "
             f"{from_cache['step_s'] * 1000:.0f} ms, {from_hidden['step_s'] * 1000:.0f} ms"]
    for kl, key in (("forward", "kl_to_teacher"), ("reverse", "reverse_kl_to_teacher")):
        suffix = "" if kl == "forward" else "_reverse"
        names = [n for n in quality if (n.endswith("_reverse") if suffix else not n.endswith("_reverse"))]
        live = quality[f"live{suffix}"][key]
        lines.append(f"{kl}-KL training, held-out {key} at T=1: " + ", ".join(
            f"{n.removesuffix(suffix)} {quality[n][key]:.4f} ({quality[n][key] / live:.3f}x live, exact match "
            f"{quality[n]['exact_match']:.1%})" for n in names))
    print("\n".join(lines))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:])
    else:
        main()
