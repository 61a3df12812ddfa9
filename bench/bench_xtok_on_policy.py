"""on_policy.py with a teacher of another tokenizer: the two open choices of its loss, compared on the demo.

    make demo && python bench/bench_xtok_on_policy.py            # every variant, seed 0, 150 steps, 2 runs at a time
    python bench/bench_xtok_on_policy.py --demo /elsewhere/demo_out/full --steps 400 --seeds 0 1 2

Each run is the demo's on-policy-into-the-second-student stage (demo.distil_students' row: the demo's teacher, its
800 teacher completions for the prompts and the off-policy steps, the second base student (another tokenizer),
--lmbda 0.5, reverse KL at T=1, top-20, batch 16, lr 3e-3, 24 sampled tokens, --seed s) for --steps steps without
in-training evaluations, scored like demo.py on the test problems (strict exact match). Variants:

    hybrid        --uld-match hybrid --uld-weighting mass (the default: identity term + the teacher's unmatched
                  mass x sorted term)
    hybrid_vocab  --uld-weighting vocab (TRL GOLD: w x identity + (1 - w) x sorted, w = matched share of the
                  teacher's vocabulary)
    sorted        --uld-match sorted (no token identity anywhere)
    hybrid_all    hybrid, with token identity also where a student token does not cover its teacher token's
                  characters (`cross_tokenizer.same_spans` replaced in that run's process)
    hybrid_skip   hybrid, with such tokens left out of the loss instead of compared by sorted ULD (their targets
                  unmasked after alignment, in the sampled and the off-policy examples alike)

Each run is its own process with --threads torch threads. Runs go to --out (a finished one is reused), the table to
stdout and --out/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_uld_match import demo_teacher, run_children  # noqa: E402  (the same launcher, beside this file)

VARIANTS = {"hybrid": ["--uld-match", "hybrid", "--uld-weighting", "mass"],
            "hybrid_vocab": ["--uld-match", "hybrid", "--uld-weighting", "vocab"],
            "sorted": ["--uld-match", "sorted"],
            "hybrid_all": ["--uld-match", "hybrid", "--uld-weighting", "mass"],
            "hybrid_skip": ["--uld-match", "hybrid", "--uld-weighting", "mass"]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="demo_out/full", help="the demo's folder (make demo writes demo_out/full)")
    parser.add_argument("--out", default="bench_xtok_on_policy", help="where the runs and results.json go")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="which variants to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="--seed of each run")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run (the demo: 400)")
    parser.add_argument("--test-problems", type=int, default=200, help="the first N test problems are scored")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    return parser.parse_args(argv)


def without_spanning(example: dict) -> dict:
    """An aligned pair with the student targets whose teacher token covers other characters unmasked."""
    targets = [i for i, m in enumerate(example["loss_mask"]) if m and i > 0]
    keep = example["same_span"]
    mask = list(example["loss_mask"])
    for i, same in zip(targets, keep):
        mask[i] = int(same)
    return {**example, "loss_mask": mask, "same_span": [True] * sum(keep),
            "teacher_targets": [t for t, same in zip(example["teacher_targets"], keep) if same]}


def run_one(demo: Path, variant: str, seed: int, folder: Path, steps: int, test_problems: int) -> dict:
    """Train and score one run in this process (called as a child)."""
    import common
    import cross_tokenizer
    import demo as demo_script
    import on_policy

    if variant == "hybrid_all":
        cross_tokenizer.same_spans = lambda student, teacher, aligned: [True] * len(aligned)
    if variant == "hybrid_skip":
        encode_pairs, pair_sample = cross_tokenizer.encode_pairs, on_policy.pair_sample

        def encode_skipping(*args, **kwargs):
            examples, skipped, stats = encode_pairs(*args, **kwargs)
            return [without_spanning(ex) for ex in examples], skipped, stats

        def pair_skipping(*args, **kwargs):
            example, counts = pair_sample(*args, **kwargs)
            return without_spanning(example), counts

        cross_tokenizer.encode_pairs, on_policy.pair_sample = encode_skipping, pair_skipping
    teacher = demo_teacher(demo)
    if not (folder / "config.json").exists():
        on_policy.main(["--student", str(demo / "student_other_tokenizer_base"), "--data",
                        str(demo / "teacher_data.jsonl"), "--max-steps", str(steps), "--batch-size", "16", "--lr",
                        "3e-3", "--log-every", "50", "--seed", str(seed), "--teacher", str(teacher), "--lmbda", "0.5",
                        "--max-new-tokens", "24", "--top-k", "20", "--output-dir", str(folder), "--overwrite",
                        *VARIANTS[variant]])
    problems = common.load_prompt_dataset(str(demo / "task_test.jsonl"))[:test_problems]
    scores = demo_script.score(folder, problems, predictions_path=folder / "predictions.jsonl")
    metrics = common.read_jsonl(folder / "metrics.jsonl")
    sampled = [m for m in metrics if m.get("on_policy")]
    result = {"variant": variant, "seed": seed, "exact_match": scores["exact_match"], "lenient": scores["lenient"],
              "sample": scores["sample"], "n": scores["n"], "last_step": metrics[-1],
              "same_span_fraction": sum(m["same_span_fraction"] for m in sampled) / max(len(sampled), 1),
              "exact_end_fraction": sum(m["exact_end_fraction"] for m in sampled) / max(len(sampled), 1),
              "samples_trimmed": sum(m["samples_trimmed"] for m in sampled),
              "samples_dropped": sum(m["samples_dropped"] for m in sampled), "sampled_steps": len(sampled)}
    (folder / "result.json").write_text(json.dumps(result) + "\n")
    return result


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["--child"]:
        variant, seed, folder, demo, steps, test_problems = sys.argv[2:8]
        run_one(Path(demo), variant, int(seed), Path(folder), int(steps), int(test_problems))
        return None
    args = parse_args(argv)
    demo, out = Path(args.demo).absolute(), Path(args.out).absolute()
    if not (demo / "teacher_data.jsonl").exists():
        sys.exit(f"{demo}: no demo there (run `make demo` first)")
    results = run_children(__file__, demo, out, args.variants, args.seeds, args,
                           extra=(str(args.steps), str(args.test_problems)))
    print(f"{args.steps} steps; strict / lenient exact match (%) on the first {results[0]['n']} test problems, "
          f"seeds {args.seeds}; on sampled steps: mean same-span and exact-end shares, trimmed / dropped samples")
    for variant in args.variants:
        rows = [r for r in results if r["variant"] == variant]
        strict = [100 * r["exact_match"] for r in rows]
        spread = f" ± {statistics.stdev(strict):.1f}" if len(strict) > 1 else ""
        print(f"{variant:13s} strict {' '.join(f'{s:5.1f}' for s in strict)} (mean {statistics.mean(strict):.1f}"
              f"{spread})  lenient {' '.join(format(100 * r['lenient'], '5.1f') for r in rows)}  same-span "
              f"{statistics.mean(r['same_span_fraction'] for r in rows):.3f}  exact-end "
              f"{statistics.mean(r['exact_end_fraction'] for r in rows):.3f}  trimmed "
              f"{sum(r['samples_trimmed'] for r in rows)} dropped {sum(r['samples_dropped'] for r in rows)}")
    return results


if __name__ == "__main__":
    main()
