"""The teacher top-K cache: the bucket divergence against its formula and never above the live divergence, the cache
round trip, fingerprint refusal, resume after a kill, training from the cache equal to live token_level when the
cache holds every token, and temperatures the cache lacks or an older format refused."""

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
    """fp64, one position at a time, from the definition: both tempered distributions with the tokens outside the
    teacher's top K (at T=1, the same set at any T) summed into one bucket."""
    out = []
    for s, t in zip(student_logits.double(), teacher_logits.double()):
        ids = t.argsort(descending=True)[:k]
        rest = [v for v in range(len(t)) if v not in set(ids.tolist())]
        teacher_p = torch.softmax(t / temperature, -1)
        q = torch.cat([teacher_p[ids], teacher_p[rest].sum()[None]])
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
    ids, logprobs, tails = cache_teacher.teacher_topk(teacher, torch.eye(11, dtype=torch.float64), k, vocab=11,
                                                      temperatures=[1.0, temperature], chunk_size=4)
    tail = tails[:, 1]  # the column of this temperature
    got = cache_teacher.topk_bucket_divergence(student, ids, logprobs.double(), tail.double(), beta, temperature)
    want = reference_bucket_divergence(student, teacher, k, beta, temperature)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if k == 11:  # every token cached: exactly the full-vocabulary divergence at any temperature
        full = common.generalized_jsd_per_position(student, teacher, beta, temperature)  # already T^2-scaled
        torch.testing.assert_close(got.double(), full.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_bucket_divergence_never_exceeds_the_live_one(seed):
    """The K+1 buckets coarsen both tempered distributions the same way, so for every stored T and every beta the
    bucket divergence is at most the full-vocabulary one (data-processing inequality), and equal at K = V. The
    re-tempered tail of format 1 broke this at T=2 three-fold (issue 28)."""
    torch.manual_seed(seed)
    vocab, temperatures = 50, [0.5, 1.0, 2.0, 4.0]
    teacher = torch.randn(64, vocab, dtype=torch.float64) * (1 + 3 * torch.rand(64, 1, dtype=torch.float64))
    student = teacher * torch.rand(64, 1, dtype=torch.float64) + torch.randn(64, vocab, dtype=torch.float64) * 2
    for k in (1, 5, 20, vocab):
        ids, logprobs, tails = cache_teacher.teacher_topk(teacher, torch.eye(vocab, dtype=torch.float64), k,
                                                          vocab=vocab, temperatures=temperatures)
        for column, temperature in enumerate(temperatures):
            for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
                got = cache_teacher.topk_bucket_divergence(student, ids, logprobs.double(), tails[:, column].double(),
                                                           beta, temperature).double()
                live = common.generalized_jsd_per_position(student, teacher, beta, temperature).double()
                if k == vocab:
                    torch.testing.assert_close(got, live, rtol=1e-6, atol=1e-9)
                else:
                    # teacher_topk works in float32, as on the real cache: float32 rounding is the only slack
                    assert (got <= live * (1 + 1e-5) + 1e-6).all(), (k, temperature, beta, (got - live).max())
                    assert (got < live).any()  # and it does lose something when the tail is not empty


def test_cached_loss_gradients_match_unchunked_autograd():
    torch.manual_seed(1)
    hidden = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(13, 20, dtype=torch.float64) * 2
    targets = torch.randint(0, 20, (13,))
    ids, logprobs, tails = cache_teacher.teacher_topk(teacher, torch.eye(20, dtype=torch.float64), 5, vocab=20,
                                                      temperatures=[2.0])
    tail = tails[:, 0]
    cache = {"topk_ids": ids, "topk_logprobs": logprobs, "tail_logmass": tail}
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
        assert manifest["temperatures"] == [1.0, 2.0] and row["tail_logmass"].shape == (len(want_lp), 2)
        torch.testing.assert_close(row["tail_logmass"][:, 0].double().exp(), 1 - want_lp.exp().sum(-1), atol=1e-4,
                                   rtol=0)
        tail_logp = logp.scatter(-1, want_ids, float("-inf"))  # the tempered tail: sum of p^(1/2), not (sum p)^(1/2)
        torch.testing.assert_close(row["tail_logmass"][:, 1].double(), (tail_logp / 2).logsumexp(-1), atol=1e-4,
                                   rtol=0)
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
        # abs: a divergence near 0 is a difference of float32 sums of order 1 (1e-7 is their rounding)
        assert [m[key] for m in cached] == pytest.approx([m[key] for m in live], rel=1e-4, abs=1e-7), key


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
    cache_teacher.main([*argv, "--output", str(tmp_path / "killed")])  # the resumed run, in this process
    _, want = cache_teacher.load_cache(tmp_path / "full")
    _, got = cache_teacher.load_cache(tmp_path / "killed")
    assert got.keys() == want.keys()
    for row_id in want:
        assert got[row_id]["row_fingerprint"] == want[row_id]["row_fingerprint"] is not None
        for name in ("token_ids", "topk_ids", "topk_logprobs", "tail_logmass", "offsets"):
            assert torch.equal(got[row_id][name], want[row_id][name]), (row_id, name)


def read_complete(folder):
    return cache_teacher.read_manifest(folder).get("complete", False)


@pytest.mark.parametrize("temperature", ["1", "2"])
def test_cross_tokenizer_from_a_cache_equals_the_live_teacher(kit, tmp_path, temperature):
    """A cache of the other-vocabulary teacher holding every token: at each stored T the sorted top-k + tail vectors
    are exact, so the per-step losses of cross_tokenizer.py must match the live teacher's."""
    import cross_tokenizer

    data = write_rows(tmp_path / "d.jsonl", 12)
    cache_teacher.main(["--teacher", str(kit["teacher_llama"]), "--data", str(data), "--output",
                        str(tmp_path / "cache"), "--top-k", "100000", "--logprob-dtype", "float32"])
    args = ["--student", str(kit["student"]), "--data", str(data), "--max-steps", "3", "--batch-size", "4",
            "--lr", "1e-3", "--top-k", "20", "--temperature", temperature, "--alpha", "0.2"]
    cross_tokenizer.main([*args, "--teacher", str(kit["teacher_llama"]), "--output-dir", str(tmp_path / "live")])
    cross_tokenizer.main([*args, "--teacher-cache", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "cached")])
    assert_same_steps(tmp_path / "live", tmp_path / "cached", ("loss", "div", "ce", "tokens"))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_cached_teacher_probs_fold_extra_tokens_into_the_tail(temperature):
    """cross_tokenizer's teacher vector from a top-12 cache, compared at k=4: the live sorted top-4 + tail at T."""
    import cross_tokenizer

    logits = torch.randn(5, 30, dtype=torch.float64) * 3
    ids, logprobs, tails = cache_teacher.teacher_topk(logits, torch.eye(30, dtype=torch.float64), 12, vocab=30,
                                                      temperatures=[temperature])
    got = cache_teacher.cached_teacher_log_buckets(logprobs, tails[:, 0], 4, temperature).exp()
    want = cross_tokenizer.sorted_topk_with_tail(logits, 4, temperature)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
