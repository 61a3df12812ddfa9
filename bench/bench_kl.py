"""Memory and time of the token-level KL loss at a real vocabulary: forward + backward of lm_head + loss.

    python bench/bench_kl.py                       # B=4, T=512, V=151,936, H=896, fp32 on CPU (bf16 on a GPU)
    python bench/bench_kl.py --reps 1 --tokens 256 # a quicker look
    python bench/bench_kl.py --batch 8 --tokens 1024 --variants acde --dtype bfloat16  # on a GPU (gpu_check.sh)

Five ways of computing the same number (forward KL at T=1, every position a completion token), each in a process
of its own so that peak memory is its own (on a GPU a fresh one; on CPU a fork of this one, whose peak RSS starts
at its own RSS, which spares each variant the seconds of importing torch and trl again):
  (a) materialized logits + TRL's GKDTrainer.generalized_jsd_loss
  (b) materialized logits + our per-position divergence `common.generalized_jsd_per_position`
  (c) our fused chunked path `losses.fused_head_loss` (gradients computed in the forward pass)
  (d) TRL 1.16's chunked divergence `trl.trainer.distillation_trainer._chunked_divergence_loss`
  (e) Liger-Kernel's fused linear JSD `liger_kernel.transformers.LigerFusedLinearJSD` (jsd_beta=0: forward KL);
      Triton kernels, so CUDA only
trl and liger-kernel are bench/test-only dependencies: without them (a), (d) and (e) are skipped with a note.
--device and --dtype default to what a run would use: bf16 on a GPU, float32 on CPU.

In bf16 (--dtype bfloat16) every variant gets bf16 hidden states and teacher head, and the student's head as a
float32 master weight that requires grad, as in a --bf16 run (AdamW keeps float32 weights, --bf16 is autocast);
each step runs under bf16 autocast, from which TRL's chunked loss and the materialized variants compute in bf16
and losses.fused_head_loss takes its bf16 path (the training scripts pass compute_dtype=bfloat16 instead: a
Qwen2 forward under autocast hands the loss float32 hidden states, its final norm's weight being float32, and
the loss rounds them to bf16 all the same). --student-head same: the student's head in bf16 too and no autocast
(the first GPU measurement, 0372f06).
The summary prints (c)'s memory and time over each other variant's, measured in this one run, against issue 25's
targets for (c)/(d): time <= 1.0 and extra memory <= 0.5.

Peak memory is reported *above the inputs* (hidden states, both heads): on CPU the growth of the process's peak
RSS (ru_maxrss) over its RSS once the inputs exist; on a GPU torch.cuda.max_memory_allocated over the allocated
bytes at that point. Time is the median over --reps runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "a": "materialized + TRL generalized_jsd_loss",
    "b": "materialized + common.generalized_jsd_per_position",
    "c": "fused chunked (losses.fused_head_loss)",
    "d": "TRL 1.16 _chunked_divergence_loss",
    "e": "Liger LigerFusedLinearJSD",
}
# The package each variant needs beyond torch and common.py (checked without importing it: trl takes seconds).
NEEDS = {"a": "trl", "d": "trl", "e": "liger_kernel"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TARGETS = {"time": 1.0, "memory": 0.5}  # issue 25: (c) over (d), TRL's chunked loss, on a GPU


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def master_head(args, dtype) -> bool:
    """Whether the student's head is a float32 master weight under autocast (a --bf16 run), not in `dtype`."""
    return args.student_head == "float32" and dtype != torch.float32


def make_inputs(args, device, dtype):
    # Drawn on the GPU there: one CPU stream needs ~6 s per variant for the 1.1 G numbers of two 3584-wide heads.
    # On CPU the stream is the one results_kl_cpu.txt was measured with.
    g = torch.Generator(device=device).manual_seed(0)
    n = args.batch * args.tokens

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype=dtype)

    student_hidden = randn(n, args.hidden).requires_grad_()
    teacher_hidden = randn(n, args.hidden)
    # Scaled like a trained head so the softmaxes are not flat.
    student_weight = randn(args.vocab, args.hidden, scale=0.05)
    if master_head(args, dtype):  # the values a bf16 head would hold, kept in float32
        student_weight = student_weight.float()
    student_weight.requires_grad_()
    teacher_weight = randn(args.vocab, args.hidden, scale=0.05)
    return student_hidden, student_weight, teacher_hidden, teacher_weight


def step(variant, args, student_hidden, student_weight, teacher_hidden, teacher_weight):
    """One forward + backward; returns the loss (leaves gradients in .grad)."""
    import common
    import losses

    n = student_hidden.shape[0]
    student_hidden.grad = student_weight.grad = None
    if variant in ("a", "b"):
        student_logits = (student_hidden @ student_weight.T).view(args.batch, args.tokens, -1)
        with torch.no_grad():
            teacher_logits = (teacher_hidden @ teacher_weight.T).view(args.batch, args.tokens, -1)
        mask = torch.ones(args.batch, args.tokens, device=student_hidden.device)
        if variant == "a":
            from trl.experimental.gkd.gkd_trainer import GKDTrainer

            loss = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=mask.long(), beta=0.0,
                                                   temperature=1.0)
        else:
            per_position = common.generalized_jsd_per_position(student_logits, teacher_logits, 0.0)  # forward KL, T=1
            loss = torch.where(mask.bool(), per_position, 0.0).sum() / mask.sum()
    elif variant == "c":
        targets = torch.zeros(n, dtype=torch.long, device=student_hidden.device)
        loss, _, _ = losses.fused_head_loss(student_hidden, student_weight, targets, n, teacher_hidden=teacher_hidden,
                                            teacher_weight=teacher_weight, alpha=0.0, beta=0.0, temperature=1.0,
                                            chunk_size=args.chunk_size)
    elif variant == "e":
        from liger_kernel.transformers import LigerFusedLinearJSD

        loss = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)(student_hidden, student_weight, teacher_hidden,
                                                                  teacher_weight, None)
    else:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        mask = torch.ones(args.batch, args.tokens, device=student_hidden.device)
        loss, _, _ = _chunked_divergence_loss(student_hidden.view(args.batch, args.tokens, -1),
                                              teacher_hidden.view(args.batch, args.tokens, -1), student_weight,
                                              teacher_weight, mask, beta=0.0, temperature=1.0)
    loss.backward()
    return loss.item()


def resolve(args) -> tuple[str, torch.dtype]:
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else torch.bfloat16 if device == "cuda" else torch.float32
    return device, dtype


def seconds(t: float) -> str:
    """Seconds as before, milliseconds below one second: a GPU's times would all print as 0.0x s."""
    return f"{t:.2f} s" if t >= 1 else f"{t * 1e3:.1f} ms"


def run_one(args) -> dict:
    """Measure one variant in this process (called in a subprocess by main)."""
    import losses

    device, dtype = resolve(args)
    on_gpu = device == "cuda"
    inputs = make_inputs(args, device, dtype)
    autocast = torch.autocast(device, dtype=dtype, enabled=master_head(args, dtype))
    chunks = []  # the rows (c) chose with --chunk-size 0 (it uses at most the positions there are)
    auto_chunk_size = losses.auto_chunk_size

    def recorded_chunk_size(*a, **kw):
        chunks.append(auto_chunk_size(*a, **kw))
        return chunks[-1]

    losses.auto_chunk_size = recorded_chunk_size  # this process only: a subprocess or a fork
    if on_gpu:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
    times, loss = [], None
    for i in range(args.reps + 1):
        if on_gpu:  # kernels queued before the clock starts are not this run's
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = step(args.variant, args, *inputs)
        if on_gpu:
            torch.cuda.synchronize()
        if i > 0:  # the first run is a warm-up
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if on_gpu else peak_rss_bytes()
    return {"variant": args.variant, "extra_gb": (peak - base) / 1e9, "median_s": statistics.median(times),
            "loss": loss, "device": torch.cuda.get_device_name() if on_gpu else "cpu", "dtype": str(dtype),
            "chunk": min(args.chunk_size or (chunks[-1] if chunks else 0), args.batch * args.tokens)}


def run_subprocess(args, variant: str) -> tuple[dict | None, str | None]:
    """run_one(variant) in a fresh process: (its result, None) or (None, its stderr)."""
    cmd = [sys.executable, __file__, "--variant", variant] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("variant", "variants")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return None, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


# What a variant imports beyond torch: imported before forking, so every fork has it already.
IMPORTS = {"a": "trl.experimental.gkd.gkd_trainer", "d": "trl.trainer.distillation_trainer"}


def run_forked(args, variant: str) -> tuple[dict | None, str | None]:
    """run_one(variant) in a fork of this process (CPU only: a fork of a process that touched CUDA is unusable).
    Linux starts a fork's peak RSS (ru_maxrss) at its own RSS, so the peak is the variant's, as in a fresh process."""
    if variant in IMPORTS:
        importlib.import_module(IMPORTS[variant])
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one line of JSON or a traceback down the pipe, then exit without cleanup
        os.close(read)
        try:
            out, code = json.dumps(run_one(argparse.Namespace(**{**vars(args), "variant": variant}))), 0
        except BaseException:
            out, code = traceback.format_exc(), 1
        with os.fdopen(write, "w") as pipe:
            pipe.write(out)
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        out = pipe.read()
    _, status = os.waitpid(pid, 0)
    return (json.loads(out), None) if os.waitstatus_to_exitcode(status) == 0 else (None, out or f"exit {status}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="sequences")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary rows (Qwen2.5: 151,936)")
    parser.add_argument("--hidden", type=int, default=896, help="hidden size (Qwen2.5-0.5B: 896)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per variant (after one warm-up)")
    parser.add_argument("--chunk-size", type=int, default=0, help="positions per chunk for (c); 0 = automatic")
    parser.add_argument("--variants", default="abcd", help="which variants to run, e.g. 'bc' (e: Liger, GPU only)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to run; auto = cuda when available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="dtype of hidden states and heads; auto = bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--student-head", default="float32", choices=["float32", "same"],
                        help="the student's head weight: float32 = a float32 master under autocast in --dtype, as "
                             "a --bf16 run has (default); same = in --dtype, no autocast")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_one(args)))
        return

    device, _ = resolve(args)
    results = {}
    for variant in args.variants:
        if variant not in VARIANTS:
            parser.error(f"--variants: unknown variant {variant!r} (choose from {''.join(VARIANTS)})")
        if variant in NEEDS and importlib.util.find_spec(NEEDS[variant]) is None:
            hint = "pip install trl==1.16.0" if NEEDS[variant] == "trl" else "pip install liger-kernel"
            print(f"({variant}) skipped: {NEEDS[variant]} is not installed ({hint})", flush=True)
            continue
        if variant == "e" and device != "cuda":
            print("(e) skipped: Liger's kernels are Triton, CUDA only", flush=True)
            continue
        found, error = run_forked(args, variant) if device == "cpu" else run_subprocess(args, variant)
        if error:
            print(f"({variant}) failed:\n{error[-2000:]}", flush=True)
            continue
        results[variant] = found
        r = results[variant]
        chunk = f"  ({r['chunk']}-row chunks)" if variant == "c" and r.get("chunk") else ""
        print(f"({variant}) {VARIANTS[variant]:42s} +{r['extra_gb']:6.2f} GB  {seconds(r['median_s']):>9s}  "
              f"loss {r['loss']:.6f}{chunk}", flush=True)

    device = next(iter(results.values()))["device"] if results else "?"
    dtype = next(iter(results.values()))["dtype"] if results else ""
    head = ("student head float32 master, bf16 autocast" if master_head(args, resolve(args)[1])
            else "student head in the same dtype")
    print(f"\nB={args.batch} T={args.tokens} V={args.vocab} H={args.hidden}, {device}, {dtype}, {head}, "
          f"median of {args.reps}")
    print("| variant | extra memory | time | memory vs (c) | time vs (c) |\n|---|---|---|---|---|")
    for v, r in results.items():
        c = results.get("c")
        ratio_m = f"{r['extra_gb'] / c['extra_gb']:.2f}x" if c else "-"
        ratio_t = f"{r['median_s'] / c['median_s']:.2f}x" if c else "-"
        print(f"| ({v}) {VARIANTS[v]} | +{r['extra_gb']:.2f} GB | {seconds(r['median_s'])} | {ratio_m} | {ratio_t} |")
    if "c" in results:
        c = results["c"]
        for anchor in "ade":
            if anchor in results:
                a = results[anchor]
                print(f"(c)/({anchor}): memory {c['extra_gb'] / a['extra_gb']:.3f}, "
                      f"time {c['median_s'] / a['median_s']:.3f}")
        if "d" in results:
            ratios = {"time": c["median_s"] / results["d"]["median_s"],
                      "memory": c["extra_gb"] / results["d"]["extra_gb"]}
            verdicts = [f"{k} {ratios[k]:.2f} {'<=' if ratios[k] <= TARGETS[k] else '>'} {TARGETS[k]:.1f} "
                        f"({'met' if ratios[k] <= TARGETS[k] else 'not met'})" for k in TARGETS]
            note = "" if device != "cpu" else "; CPU figures, the targets are for a GPU"
            print(f"issue 25 targets, (c)/(d): {', '.join(verdicts)}{note}")


if __name__ == "__main__":
    main()
