"""The exact teacher cache (cache_teacher.py --store hidden): what it stores, training from it equal to the live
teacher (token_level at any --kl and T, cross_tokenizer), a top-K cache measurably not equal where it matters
(reverse KL at T=2), resume, and the one-line refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import cache_teacher
import common
import cross_tokenizer
import models
import token_level
from conftest import read_metrics, write_rows


def make_cache(teacher, data, out, **extra):
    argv = ["--teacher", str(teacher), "--data", str(data), "--output", str(out), "--batch-size", "3",
            "--shard-rows", "5"]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return cache_teacher.main(argv)


@pytest.fixture
def teacher(trained_teacher):
    """A teacher with peaked distributions (a little SFT), so that divergences are far from float32 noise."""
    return trained_teacher


@pytest.fixture
def hidden_cache(teacher, tmp_path):
    """12 rows and their float32 hidden cache (the kit's models run in float32 on CPU)."""
    data = write_rows(tmp_path / "d.jsonl", 12)
    manifest = make_cache(teacher, data, tmp_path / "hidden", store="hidden", hidden_dtype="float32")
    return data, tmp_path / "hidden", manifest


def test_hidden_cache_holds_the_teachers_states_and_head(teacher, hidden_cache):
    data, folder, manifest = hidden_cache
    teacher, tokenizer = models.load_model(str(teacher))
    head = models.output_head(teacher).weight
    assert manifest["store"] == "hidden" and manifest["complete"] and manifest["rows"] == 12
    assert (manifest["hidden_size"], manifest["head_rows"], manifest["hidden_dtype"]) == (
        head.shape[1], head.shape[0], "float32")
    assert manifest["bytes_per_token"] == pytest.approx(4 * head.shape[1] + 4 + 8, rel=0.05)  # + safetensors header
    assert torch.equal(cache_teacher.load_head(folder, cache_teacher.open_cache(folder)), head.detach())
    _, cached = cache_teacher.load_cache(folder)
    examples, _ = common.encode_rows(common.load_distill_rows(data), tokenizer, 1024)
    for ex in examples[:4]:
        batch = common.pad_batch([ex], tokenizer.pad_token_id)
        with torch.no_grad():  # the hidden state at the position *before* each target: the one that predicts it
            want_hidden, want_ids = common.shift_for_next_token(teacher(
                input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1], batch)
        row = cached[ex["id"]]
        assert row["token_ids"].tolist() == want_ids.tolist()
        torch.testing.assert_close(row["hidden"], want_hidden, rtol=1e-5, atol=1e-5)
        assert [tuple(o) for o in row["offsets"].tolist()] == ex["completion_offsets"]


def assert_same_steps(live_dir, cached_dir, keys, rel):
    live, cached = read_metrics(live_dir), read_metrics(cached_dir)
    assert len(cached) == len(live) >= 3
    for key in keys:
        assert [m[key] for m in cached if key in m] == pytest.approx([m[key] for m in live if key in m], rel=rel), key


TRAIN = ["--max-steps", "3", "--batch-size", "4", "--lr", "1e-3", "--alpha", "0.2"]


@pytest.mark.parametrize("kl,temperature", [("forward", 2.0), ("reverse", 2.0), ("jsd", 0.5)])
def test_token_level_from_a_hidden_cache_equals_the_live_teacher(kit, teacher, hidden_cache, tmp_path, kl,
                                                                 temperature):
    """float32 cache: the per-step losses, the held-out loss and eval_kl of the live teacher, to float32 noise."""
    data, folder, _ = hidden_cache
    # Trained on 8 of the cached rows, evaluated on the other 4 (held-out rows must not be training rows).
    lines = data.read_text().splitlines(keepends=True)
    train, held_out = tmp_path / "train.jsonl", tmp_path / "held_out.jsonl"
    train.write_text("".join(lines[:8]))
    held_out.write_text("".join(lines[8:]))
    args = ["--student", str(kit["student"]), "--data", str(train), *TRAIN, "--kl", kl, "--temperature",
            str(temperature), "--eval-data", str(held_out), "--eval-every", "3"]
    token_level.main([*args, "--teacher", str(teacher), "--output-dir", str(tmp_path / "live")])
    token_level.main([*args, "--teacher-cache", str(folder), "--output-dir", str(tmp_path / "cached")])
    assert_same_steps(tmp_path / "live", tmp_path / "cached", ("loss", "div", "ce", "tokens", "eval_loss",
                                                               "eval_div", "eval_kl"), rel=1e-5)


def test_bf16_hidden_cache_is_close_and_topk_cache_is_not(kit, teacher, tmp_path):
    """Reverse KL at T=2: a bfloat16 hidden cache stays within bf16 rounding of the live losses; a top-K cache
    (K=8, the tail as one bucket) is measurably off, which is why the exact store exists."""
    data = write_rows(tmp_path / "d.jsonl", 12)
    make_cache(teacher, data, tmp_path / "bf16", store="hidden")  # default: bfloat16
    make_cache(teacher, data, tmp_path / "top8", top_k=8, logprob_dtype="float32")
    args = ["--student", str(kit["student"]), "--data", str(data), *TRAIN, "--kl", "reverse", "--temperature", "2"]
    runs = {"live": ["--teacher", str(teacher)], "bf16": ["--teacher-cache", str(tmp_path / "bf16")],
            "top8": ["--teacher-cache", str(tmp_path / "top8")]}
    for name, extra in runs.items():
        token_level.main([*args, *extra, "--output-dir", str(tmp_path / f"run_{name}")])
    assert_same_steps(tmp_path / "run_live", tmp_path / "run_bf16", ("loss", "div", "ce"), rel=1e-2)
    live, top8 = read_metrics(tmp_path / "run_live"), read_metrics(tmp_path / "run_top8")
    assert abs(top8[0]["div"] / live[0]["div"] - 1) > 0.2, (top8[0]["div"], live[0]["div"])


def test_cross_tokenizer_from_a_hidden_cache_equals_the_live_teacher(kit, teacher, tmp_path):
    """At T=2 (where a top-K cache is inexact) the ULD path on cached hidden states @ the cached head gives the
    live teacher's per-step losses."""
    data = write_rows(tmp_path / "d.jsonl", 12)
    make_cache(teacher, data, tmp_path / "hidden", store="hidden", hidden_dtype="float32")
    args = ["--student", str(kit["student"]), "--data", str(data), *TRAIN, "--top-k", "20", "--temperature", "2"]
    cross_tokenizer.main([*args, "--teacher", str(teacher), "--output-dir", str(tmp_path / "live")])
    cross_tokenizer.main([*args, "--teacher-cache", str(tmp_path / "hidden"), "--output-dir", str(tmp_path / "cached")])
    assert_same_steps(tmp_path / "live", tmp_path / "cached", ("loss", "div", "ce", "tokens"), rel=1e-5)


def test_hidden_cache_resumes_and_refuses_another_recipe(teacher, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 10)
    first = tmp_path / "first.jsonl"
    first.write_text("".join(data.read_text().splitlines(keepends=True)[:4]))
    make_cache(teacher, data, tmp_path / "full", store="hidden")
    make_cache(teacher, first, tmp_path / "grown", store="hidden")
    manifest = make_cache(teacher, data, tmp_path / "grown", store="hidden")  # scores the 6 others only
    assert manifest["rows"] == 10 and len(manifest["shards"]) == 2
    _, want = cache_teacher.load_cache(tmp_path / "full")
    _, got = cache_teacher.load_cache(tmp_path / "grown")
    assert got.keys() == want.keys()
    for row_id in want:
        for name in ("token_ids", "hidden", "offsets"):
            torch.testing.assert_close(got[row_id][name], want[row_id][name], rtol=2**-7, atol=1e-2)  # bf16 ulp flips
    with pytest.raises(common.DistillError, match="another hidden_dtype"):
        make_cache(teacher, data, tmp_path / "grown", store="hidden", hidden_dtype="float16")
    with pytest.raises(common.DistillError, match="--store hidden cache; this run writes --store topk"):
        make_cache(teacher, data, tmp_path / "grown")


def test_bad_hidden_caches_are_one_line_before_any_model_loads(kit, hidden_cache, tmp_path):
    data, folder, _ = hidden_cache
    # A --student that cannot load: each refusal must come first.
    argv = ["--student", str(tmp_path / "no-such-student"), "--data", str(data), "--output-dir", str(tmp_path / "r"),
            "--teacher-cache", str(folder), "--max-steps", "1"]
    head = folder / cache_teacher.HEAD_FILE
    saved = head.read_bytes()
    save_file({"weight": torch.zeros(3, 4)}, head)  # another head than the one cache.json records
    for script in (token_level, cross_tokenizer):
        with pytest.raises(common.DistillError, match="head.safetensors is not the head this cache was written"):
            script.main(argv)
    head.unlink()
    for script in (token_level, cross_tokenizer):
        with pytest.raises(common.DistillError, match="--teacher-cache .*head.safetensors is missing"):
            script.main(argv)
    head.write_bytes(saved)
    manifest = json.loads((folder / "cache.json").read_text())
    (folder / "cache.json").write_text(json.dumps({**manifest, "store": "logits"}))
    with pytest.raises(common.DistillError, match="a cache with --store logits, which this script does not read"):
        token_level.main(argv)
    (folder / "cache.json").write_text(json.dumps(manifest))
    with pytest.raises(common.DistillError, match="vocabulary differs"):  # a token-level cache needs the same ids
        token_level.main(["--student", str(kit["student_llama3"]), *argv[2:]])


def test_default_output_names_the_store():
    assert cache_teacher.parse_args(["--data", "data/t.jsonl"]).output == "data/t.top64"
    hidden = cache_teacher.parse_args(["--data", "data/t.jsonl", "--store", "hidden"])
    assert (hidden.output, hidden.hidden_dtype) == ("data/t.hidden", "bfloat16")


def test_readers_memory_map_the_shards(tmp_path):
    """load_cache maps the shards instead of reading them: touching every cached hidden state of a 64 MB cache
    leaves a process's private (anonymous) memory nearly where it was; the pages are the shared page cache."""
    import subprocess
    import sys

    from conftest import ROOT

    rows, tokens, hidden = 64, 256, 2048
    values = torch.randn(rows * tokens, hidden).to(torch.bfloat16)
    save_file({"token_ids": torch.zeros(rows * tokens, dtype=torch.int32), "hidden": values,
               "offsets": torch.zeros(rows * tokens, 2, dtype=torch.int32)}, tmp_path / "shard-00000.safetensors",
              metadata={"rows": json.dumps([[f"r{i}", i * tokens, tokens, "fp"] for i in range(rows)])})
    (tmp_path / "cache.json").write_text(json.dumps({"store": "hidden", "format": cache_teacher.FORMAT}))
    script = """
import sys
import torch
import cache_teacher

def anon_kb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon"))

torch.randn(4, 2048).to(torch.bfloat16).double().sum()  # the thread pool and kernels' own memory, not the cache's
before = anon_kb()
_, rows = cache_teacher.load_cache(sys.argv[1])
total = sum(row["hidden"].double().sum().item() for row in rows.values())  # reads every cached byte
print(anon_kb() - before, total)
"""
    # A fixed mmap threshold: glibc would otherwise raise it after the first freed 4 MB temporary and keep later
    # ones in the heap, counted as private memory that the cache does not hold.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         check=True, env=env).stdout.split()
    grown_mb, total = int(out[0]) / 1024, float(out[1])
    assert total == pytest.approx(values.double().sum().item(), rel=1e-9, abs=1e-6)  # the right bytes, mapped
    assert grown_mb < 16, f"private memory grew by {grown_mb:.0f} MB reading a 64 MB cache"
