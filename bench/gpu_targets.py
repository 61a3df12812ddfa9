"""Issue 25's GPU targets, read from a results file of bench/gpu_check.sh (the ratios within that one run):

    python bench/gpu_targets.py bench/results_gpu.txt

- fused loss time <= 1.0x TRL's chunked loss at H=896 and H=3584, extra memory <= 0.5x (bench_kl's
  "issue 25 targets" line of each KL stage);
- decoding >= 5x model.generate's tokens/s at batch 8 x 128, and >= 10,000 tokens/s at batch 64 x 256;
- an on_policy step <= 3x a token_level step at the same batch (medians of steps 2-N);
- after the first step, no token_level step above 2x the median.
A figure the file does not hold is reported as missing, not as met.
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

NUM = r"([\d,]+(?:\.\d+)?)"


def number(text: str) -> float:
    return float(text.replace(",", ""))


def sections(text: str) -> dict[str, str]:
    return {part.split("\n", 1)[0]: part for part in re.split(r"^== ", text, flags=re.M)[1:]}


def section(found: dict[str, str], start: str) -> str | None:
    return next((body for title, body in found.items() if title.startswith(start)), None)


def targets(text: str) -> list[tuple[str, str]]:
    """(target, verdict line) for each issue-25 target."""
    found, rows = sections(text), []
    for head, start in (("H=896", "KL loss, Qwen2.5-0.5B head"), ("H=3584", "KL loss, 7B-like head")):
        body = section(found, start) or ""
        line = re.search(r"issue 25 targets, \(c\)/\(d\): (.*)", body)
        rows.append((f"fused loss vs TRL chunked at {head}", line.group(1) if line else "missing"))
    decode = section(found, "decode: generation.generate vs model.generate") or ""
    blocks = {(int(b), int(n)): body for b, n, body in re.findall(
        r"decode: batch (\d+) x (\d+) new tokens(.*?)(?=decode: batch|\Z)", decode, flags=re.S)}
    # The targets' shapes on a GPU; the smoke run's own (smaller) shapes otherwise, first and last.
    small = (8, 128) if (8, 128) in blocks else next(iter(blocks), None)
    large = (64, 256) if (64, 256) in blocks else next(reversed(blocks), None)
    ratio = re.search(rf"ours / model.generate: {NUM}x", blocks.get(small, ""))
    rows.append((f"decoding at batch {small[0] if small else 8} x {small[1] if small else 128}",
                 "missing" if not ratio else f"{number(ratio.group(1)):.2f}x model.generate's tokens/s "
                 f"({'met' if number(ratio.group(1)) >= 5 else 'not met'}: >= 5x)"))
    ours = re.search(rf"generation.generate \(ours\) +{NUM} s +{NUM} tokens/s", blocks.get(large, ""))
    rows.append((f"decoding at batch {large[0] if large else 64} x {large[1] if large else 256}",
                 "missing" if not ours else f"{number(ours.group(2)):,.0f} tokens/s "
                 f"({'met' if number(ours.group(2)) >= 10_000 else 'not met'}: >= 10,000)"))
    medians = {}
    for script in ("token_level", "on_policy"):
        body = section(found, f"{script} steps") or ""
        median = re.search(rf"steps 2-\d+: mean {NUM} s, median {NUM} s", body)
        medians[script] = number(median.group(2)) if median else None
    if None in medians.values():
        rows.append(("on_policy step vs token_level step", "missing"))
    else:
        ratio = medians["on_policy"] / medians["token_level"]
        rows.append(("on_policy step vs token_level step",
                     f"{ratio:.2f}x (median {medians['on_policy']:.3f} s vs {medians['token_level']:.3f} s; "
                     f"{'met' if ratio <= 3 else 'not met'}: <= 3x)"))
    body = section(found, "token_level steps") or ""
    steps = [number(s) for s in re.findall(rf"^  step \d+: {NUM} s", body, flags=re.M)][1:]
    if len(steps) < 2:
        rows.append(("token_level steps after the first", "missing"))
    else:
        worst, median = max(steps), statistics.median(steps)
        rows.append(("token_level steps after the first",
                     f"slowest {worst:.3f} s = {worst / median:.2f}x the median {median:.3f} s "
                     f"({'met' if worst <= 2 * median else 'not met'}: <= 2x)"))
    return rows


def main() -> None:
    text = Path(sys.argv[1]).read_text()
    gpu = re.search(r"^GPU: (.*)$", text, flags=re.M)
    print(f"issue 25 targets on {gpu.group(1) if gpu else 'an unknown device'} (ratios within this run):")
    for name, verdict in targets(text):
        print(f"  {name}: {verdict}")


if __name__ == "__main__":
    main()
