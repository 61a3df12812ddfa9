"""bench/gpu_check.sh --cpu: every stage of the GPU check runs end to end at tiny shapes, so that the device's
minutes go to measuring. Also the decode-loop fix the smoke run found (samples from a padded head's rows)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generation
import models

ROOT = Path(__file__).resolve().parents[1]
NUM = r"[\d,]+(?:\.\d+)?"

# section title (start) -> patterns its lines must match: each a figure the GPU run is there to produce
EXPECTED = {
    "environment": [r"GPU: none \(CPU\)", r"torch \d", r"transformers \d"],
    "KL loss, Qwen2.5-0.5B head: B=2 T=32 V=512 H=64, bf16": [
        rf"\(c\) fused chunked \(losses.fused_head_loss\) +\+ *{NUM} GB +{NUM} m?s +loss {NUM}",
        rf"\(d\) TRL 1.16 _chunked_divergence_loss +\+ *{NUM} GB +{NUM} m?s +loss {NUM}",
        rf"\(c\)/\(d\): memory {NUM}, time {NUM}",
        rf"issue 25 targets, \(c\)/\(d\): time {NUM} ",
        # on the CPU (a) runs in this stage, where trl is imported anyway; on the GPU it comes last, for the record
        rf"\(a\) materialized \+ TRL generalized_jsd_loss +\+ *{NUM} GB +{NUM} m?s +loss {NUM}",
    ],
    "KL loss, Qwen2.5-0.5B head, for the record": [r"\(e\) skipped: "],
    "KL loss, 7B-like head: B=2 T=32 V=512 H=128": [
        rf"\(c\) fused chunked \(losses.fused_head_loss\) +\+ *{NUM} GB +{NUM} m?s +loss {NUM}",
    ],
    "build random-init models and data": [rf"student: tiny-student-shaped Qwen2, {NUM} M parameters",
                                          rf"tokenizer: 600 tokens .* completions {NUM} tokens"],
    "token_level steps": [
        rf"step 2: {NUM} s, {NUM} loss tokens",
        r"student float32 on cpu \+ bf16 autocast; teacher bfloat16 on cpu",
        rf"steps 2-3: mean {NUM} s, median {NUM} s, {NUM} loss tokens/s",
        rf"time split per step: sampling 0.000 s \(0%\), teacher forward {NUM} s \({NUM}%\), "
        rf"student forward\+loss\+backward {NUM} s \({NUM}%\), clip\+AdamW\+logging {NUM} s \({NUM}%\)",
        rf"peak memory: {NUM} GB peak RSS",
    ],
    "on_policy steps": [
        rf"steps 2-3: mean {NUM} s, median {NUM} s, {NUM} loss tokens/s",
        rf"time split per step: sampling {NUM} s \({NUM}%\), teacher forward",
        rf"peak memory: {NUM} GB peak RSS",
    ],
    "decode: generation.generate vs model.generate": [
        rf"generation.generate \(ours\) +{NUM} s +{NUM} tokens/s +\(32 tokens\)",
        rf"model.generate \(transformers\) +{NUM} s +{NUM} tokens/s +\(32 tokens\)",
        rf"ours / model.generate: {NUM}x the tokens/s",
    ],
    "decode: vLLM": [r"vLLM: not installed here, skipped|vLLM LLM.generate .* tokens/s"],
}
# bench/gpu_targets.py's summary at the end: every target read from the stages above (none missing)
TARGETS = ["fused loss vs TRL chunked at H=896: time", "decoding at batch 4 x 8: .*x model.generate",
           "decoding at batch 4 x 8: .* tokens/s", "on_policy step vs token_level step: .*x \\(median",
           "token_level steps after the first: slowest"]


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^== ", text, flags=re.M)[1:]
    return {part.split("\n", 1)[0]: part for part in parts}


@pytest.mark.bench_smoke  # `make test-bench` (CI runs it): a dozen interpreters, a third of `make test`'s budget
def test_gpu_check_cpu_smoke_runs_every_stage(tmp_path):
    default = ROOT / "bench" / "results_gpu.txt"
    before = default.stat().st_mtime_ns if default.exists() else None
    out = tmp_path / "results.txt"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    text = out.read_text()
    assert proc.returncode == 0, text[-4000:] + proc.stderr[-2000:]
    found = sections(text)
    for start, patterns in EXPECTED.items():
        title = next((t for t in found if t.startswith(start)), None)
        assert title is not None, f"no section {start!r} in:\n{text}"
        for pattern in patterns:
            assert re.search(pattern, found[title]), f"{pattern!r} not in section {title!r}:\n{found[title]}"
    for pattern in TARGETS:
        assert re.search(pattern, text), f"{pattern!r} not in the targets summary:\n{text[-2000:]}"
    assert re.search(r"^== done in \d+ s; every stage complete$", text, flags=re.M)
    assert "!!" not in text
    # the smoke run never writes over the GPU results
    assert (default.stat().st_mtime_ns if default.exists() else None) == before


def test_generate_never_samples_a_padded_head_row(kit):
    model, tok = models.load_model(str(kit["student_padded"]))
    rows = models.output_head(model).weight.shape[0]
    assert rows > len(tok)
    prompts = [tok("Ana has 3 apples.")["input_ids"]] * 8
    torch.manual_seed(0)
    # Hot sampling of a random model spreads over every row, padding included, unless generate excludes it.
    samples = generation.generate(model, tok, prompts, max_new_tokens=32, temperature=20.0, stop_ids=[-1])
    assert max(t for s in samples for t in s["tokens"]) < len(tok)
