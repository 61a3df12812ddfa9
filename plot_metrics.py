"""Turn one or more runs' metrics.jsonl into a PNG of training curves.

    # the loss of two runs side by side (a run folder or its metrics.jsonl)
    python plot_metrics.py runs/token_fwd runs/seq --out curves.png

    # several metrics, one panel each, smoothed over 20 steps
    python plot_metrics.py runs/token_fwd/metrics.jsonl runs/token_rev --keys loss div grad_norm --smooth 20

Every training script writes one metrics.jsonl row per optimizer step (step, loss, lr, tokens, grad_norm, elapsed_s
and its own terms: ce, kl, uld, gen_len, ...). A metric a run does not log is left out of that run's panel.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (containing metrics.jsonl) or metrics.jsonl files")
    parser.add_argument("--keys", nargs="+", default=["loss"], help="metrics to plot, one panel each")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window in steps (1 = raw)")
    parser.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    parser.add_argument("--out", default="curves.png", help="PNG file to write")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error("--smooth must be >= 1")
    return args


def load_runs(paths: list[str | Path]) -> dict[str, list[dict]]:
    """{label: metrics rows}; a label is the run folder's name (with its parent when two names collide)."""
    files = []
    for path in map(Path, paths):
        file = path / "metrics.jsonl" if path.is_dir() else path
        if not file.exists():
            raise common.DistillError(f"{path}: no metrics.jsonl there")
        files.append(file)
    names = [f.parent.name for f in files]
    labels = [f"{f.parent.parent.name}/{f.parent.name}" if names.count(f.parent.name) > 1 else f.parent.name
              for f in files]
    return {label: common.read_jsonl(file, what=str(file)) for label, file in zip(labels, files)}


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def draw(ax, runs: dict[str, list[dict]], key: str, *, smooth: int = 1, log_y: bool = False) -> int:
    """One panel: `key` against optimizer step for every run that logs it. Returns how many runs were drawn."""
    drawn = 0
    for label, rows in runs.items():
        points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, moving_average(list(values), smooth), label=label)
            drawn += 1
    ax.set(xlabel="optimizer step", ylabel=key, title=key + (f" (mean of {smooth} steps)" if smooth > 1 else ""))
    if log_y:
        ax.set_yscale("log")
    if drawn:
        ax.legend(fontsize=8)
    return drawn


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise common.DistillError("plotting needs matplotlib: pip install matplotlib") from error
    return plt


def main(argv=None) -> Path:
    args = parse_args(argv)
    runs = load_runs(args.runs)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(args.keys), figsize=(5.5 * len(args.keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], args.keys):
        if not draw(ax, runs, key, smooth=args.smooth, log_y=args.log_y):
            raise common.DistillError(f"--keys {key}: no run logs it (their keys: "
                                      f"{sorted({k for rows in runs.values() for row in rows for k in row})})")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out} ({len(runs)} runs, {', '.join(args.keys)})")
    return out


if __name__ == "__main__":
    common.run_main(main)
