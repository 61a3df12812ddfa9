"""The teacher top-K cache: the bucket divergence against its formula, the cache round trip, fingerprint refusal,
resume after a kill, and training from the cache equal to live token_level when the cache holds every token."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cache_teacher
import common
import models
import token_level
from conftest import ROOT, read_metrics, write_rows


def reference_bucket_divergence(student_logits, teacher_logits, k, beta, temperature):
    """fp64, one position at a time, from the definition: teacher top-K at T=1 + tail, re-tempered as K+1 tokens."""
    out = []
    for s, t in zip(student_logits.double(), teacher_logits.double()):
        teacher_logp = t.log_softmax(-1)
        ids = teacher_logp.argsort(descending=True)[:k]
        rest = [v for v in range(len(t)) if v not in set(ids.tolist())]
        teacher_tail = teacher_logp[rest].exp().sum().log() if rest else torch.tensor(float("-inf"))
        q = torch.softmax(torch.cat([teacher_logp[ids], teacher_tail[None]]) / temperature, -1)
        student_p = torch.softmax(s / temperature, -1)
        p = torch.cat([student_p[ids], student_p[rest].sum()[None]])
        m = beta * q + (1 - beta) * p

        def kl(a, b):
            return sum(float(x * (x.log() - y.log())) for x, y in zip(a, b) if x > 0)
        d = kl(q, p) if beta == 0 else kl(p, q) if beta == 1 else beta * kl(q, m) + (1 - beta) * kl(p, m)
        out.append(d * temperature**2)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k", [3, 11])
def test_bucket_divergence_matches_its_formula(beta, temperature, k):
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 11, dtype=torch.float64) * 2, torch.randn(6, 11, dtype=torch.float64) * 3
    ids, logprobs, tail = cache_teacher.teacher_topk(teacher, torch.eye(11, dtype=torch.float64), k, vocab=11,
                                                     chunk_size=4)
    got = cache_teacher.topk_bucket_divergence(student, ids, logprobs.double(), tail.double(), beta, temperature)
    want = reference_bucket_divergence(student, teacher, k, beta, temperature)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if k == 11:  # every token cached: exactly the full-vocabulary divergence at any temperature
        full = common.generalized_jsd_per_position(student, teacher, beta, temperature)  # already T^2-scaled
        torch.testing.assert_close(got.double(), full.double(), rtol=1e-5, atol=1e-6)


def test_cached_loss_gradients_match_unchunked_autograd():
    torch.manual_seed(1)
    hidden = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(13, 20, dtype=torch.float64) * 2
    targets = torch.randint(0, 20, (13,))
    ids, logprobs, tail = cache_teacher.teacher_topk(teacher, torch.eye(20, dtype=torch.float64), 5, vocab=20)
    cache = {"topk_ids": ids, "topk_logprobs": logprobs, "tail_logprob": tail}
    loss, _, _ = cache_teacher.cached_teacher_loss(hidden, weight, targets, 40, cache, alpha=0.3, beta=0.5,
                                            temperature=2.0, chunk_size=4)
    got = torch.autograd.grad(loss, [hidden, weight])
    logits = hidden @ weight.T
    want_loss = (0.3 * torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
                 + 0.7 * cache_teacher.topk_bucket_divergence(logits, ids, logprobs, tail, 0.5, 2.0).sum()) / 40
    want = torch.autograd.grad(want_loss, [hidden, weight])
    torch.testing.assert_close(loss, want_loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def make_cache(kit, tmp_path, k=8, rows=12, **extra):
    data = write_rows(tmp_path / "d.jsonl", rows)
    argv = ["--teacher", str(kit["teacher"]), "--data", str(data), "--output", str(tmp_path / "cache"),
            "--top-k", str(k), "--batch-size", "3", "--shard-rows", "5"]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return data, cache_teacher.main(argv)


def test_cache_round_trip(kit, tmp_path):
    data, manifest = make_cache(kit, tmp_path, k=8, logprob_dtype="float32")
    assert manifest["complete"] and manifest["rows"] == 12 and len(manifest["shards"]) == 2  # 6 rows each
    _, cached = cache_teacher.load_cache(tmp_path / "cache")
    teacher, tokenizer = models.load_model(str(kit["teacher"]))
    examples, _ = common.encode_rows(common.load_distill_rows(data), tokenizer, 1024)
    assert {ex["id"] for ex in examples} == set(cached)
    for ex in examples[:4]:
        row = cached[ex["id"]]
        batch = common.pad_batch([ex], tokenizer.pad_token_id)
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"]).logits.double()
        logp = logits[:, :-1][batch["loss_mask"][:, 1:].bool()].log_softmax(-1)  # [n, V]
        want_lp, want_ids = logp.topk(8, -1)
        assert row["token_ids"].tolist() == batch["input_ids"][:, 1:][batch["loss_mask"][:, 1:].bool()].tolist()
        assert row["topk_ids"].tolist() == want_ids.tolist()
        torch.testing.assert_close(row["topk_logprobs"].double(), want_lp, atol=1e-4, rtol=0)
        torch.testing.assert_close(row["tail_logprob"].double().exp(), 1 - want_lp.exp().sum(-1), atol=1e-4, rtol=0)
        assert [tuple(o) for o in row["offsets"].tolist()] == ex["completion_offsets"]
    assert manifest["bytes_per_token"] > 8 * 8  # int32 ids + float32 log-probs per kept token, at least


def test_a_cache_from_another_vocabulary_is_refused(kit, tmp_path):
    data, _ = make_cache(kit, tmp_path)
    with pytest.raises(common.DistillError, match="vocabulary differs"):
        token_level.main(["--student", str(kit["student_llama3"]), "--data", str(data), "--teacher-cache",
                          str(tmp_path / "cache"), "--output-dir", str(tmp_path / "run"), "--max-steps", "1"])


def test_training_from_a_full_cache_equals_live_token_level(kit, tmp_path):
    """With every token cached (K = vocabulary) and float32 storage, the buckets are the full distribution: the
    per-step losses must match live token_level (same data order, same student)."""
    _, manifest = make_cache(kit, tmp_path, k=10**6, logprob_dtype="float32")
    data = tmp_path / "d.jsonl"
    args = ["--student", str(kit["student"]), "--data", str(data), "--max-steps", "3", "--batch-size", "4",
            "--lr", "1e-3", "--kl", "reverse", "--temperature", "2", "--alpha", "0.2"]
    token_level.main([*args, "--teacher", str(kit["teacher"]), "--output-dir", str(tmp_path / "live")])
    token_level.main([*args, "--teacher-cache", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "cached")])
    assert_same_steps(tmp_path / "live", tmp_path / "cached", ("loss", "div", "ce", "tokens"))


def assert_same_steps(live_dir, cached_dir, keys):
    live, cached = read_metrics(live_dir), read_metrics(cached_dir)
    assert len(cached) == len(live) == 3
    for key in keys:
        assert [m[key] for m in cached] == pytest.approx([m[key] for m in live], rel=1e-4), key


def test_killed_cache_run_resumes_to_the_same_cache(kit, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 40)
    argv = ["--teacher", str(kit["teacher"]), "--data", str(data), "--top-k", "8", "--batch-size", "2",
            "--shard-rows", "2"]
    cache_teacher.main([*argv, "--output", str(tmp_path / "full")])
    cmd = [sys.executable, str(ROOT / "cache_teacher.py"), *argv, "--output", str(tmp_path / "killed")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "killed" / "shard-00003.safetensors").exists():
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not read_complete(tmp_path / "killed"), "the kill must land before the run finishes"
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _, want = cache_teacher.load_cache(tmp_path / "full")
    _, got = cache_teacher.load_cache(tmp_path / "killed")
    assert got.keys() == want.keys()
    for row_id in want:
        assert got[row_id]["row_fingerprint"] == want[row_id]["row_fingerprint"] is not None
        for name in ("token_ids", "topk_ids", "topk_logprobs", "tail_logprob", "offsets"):
            assert torch.equal(got[row_id][name], want[row_id][name]), (row_id, name)


def read_complete(folder):
    return cache_teacher.read_manifest(folder).get("complete", False)


def test_cross_tokenizer_from_a_cache_equals_the_live_teacher_at_t1(kit, tmp_path):
    """A cache of the other-vocabulary teacher holding every token: at T=1 the sorted top-k + tail vectors are
    exact, so the per-step losses of cross_tokenizer.py must match the live teacher's."""
    import cross_tokenizer

    data = write_rows(tmp_path / "d.jsonl", 12)
    cache_teacher.main(["--teacher", str(kit["teacher_llama"]), "--data", str(data), "--output",
                        str(tmp_path / "cache"), "--top-k", "100000", "--logprob-dtype", "float32"])
    args = ["--student", str(kit["student"]), "--data", str(data), "--max-steps", "3", "--batch-size", "4",
            "--lr", "1e-3", "--top-k", "20", "--temperature", "1", "--alpha", "0.2"]
    cross_tokenizer.main([*args, "--teacher", str(kit["teacher_llama"]), "--output-dir", str(tmp_path / "live")])
    cross_tokenizer.main([*args, "--teacher-cache", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "cached")])
    assert_same_steps(tmp_path / "live", tmp_path / "cached", ("loss", "div", "ce", "tokens"))


def test_cached_teacher_probs_fold_extra_tokens_into_the_tail():
    import cross_tokenizer

    logits = torch.randn(5, 30, dtype=torch.float64)
    ids, logprobs, tail = cache_teacher.teacher_topk(logits, torch.eye(30, dtype=torch.float64), 12, vocab=30)
    got = cache_teacher.cached_teacher_log_buckets(logprobs, tail, 4, 1.0).exp()
    torch.testing.assert_close(got.double(), cross_tokenizer.sorted_topk_with_tail(logits, 4, 1.0), atol=1e-6, rtol=0)
