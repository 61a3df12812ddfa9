"""cross_tokenizer.py --uld-match hybrid: the vocabulary match on two tiny tokenizers with a known overlap, the hybrid
loss against a brute-force float64 reference written from its formula (every divergence, both ULD kinds, both
weightings, temperature, no shared tokens, a fully shared vocabulary), the chunked loss with its identity mask,
padded heads and gradients, the top-K cache form, and training end to end, live and from both caches."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import cache_teacher
import common
import cross_tokenizer
import models as distill_models
from conftest import read_metrics, write_rows

# -- the vocabulary match --------------------------------------------------------------------------------------


def tiny_tokenizer(tokens: list[str], specials: list[str], style: str):
    """A tokenizer with exactly these tokens (ids in order, specials after them): byte-level or SentencePiece-like."""
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token=None))
    if style == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


# Byte-level: 'Ġ' is a space, 'Ċ' a newline, 'Ã©' the two UTF-8 bytes of 'é'. SentencePiece-like: '▁' is a space,
# '<0x0A>' a byte-fallback newline; '<0x41>' is a fallback for 'A', which the regular token 'A' also writes.
BYTE_LEVEL = ["Ġcat", "cat", "Ċ", "Ã©", "dog", "Ġ", "A", "####", "<s>"]
SENTENCEPIECE = ["<0x41>", "▁cat", "cat", "<0x0A>", "é", "bird", "▁", "A", "▁####", "Ġcat"]
# (sentencepiece id, byte-level id) of the same text: " cat", "cat", "\n", "é", " ", "A" (the regular token, not the
# fallback); "▁####" writes " ####", not "####"; "Ġcat" is literal text there; the byte-level "<s>" is text, not
# the SentencePiece special token "<s>".
KNOWN_PAIRS = [(1, 0), (2, 1), (3, 2), (4, 3), (6, 5), (7, 6)]


@pytest.fixture(scope="module")
def pair():
    student = tiny_tokenizer(SENTENCEPIECE, ["<s>", "</s>"], "sentencepiece")  # specials: ids 10, 11
    teacher = tiny_tokenizer(BYTE_LEVEL, ["<|im_end|>", "<|endoftext|>"], "bytelevel")  # ids 9, 10
    return student, teacher


def test_token_keys_map_space_markers_and_byte_tokens(pair):
    student, teacher = pair
    s_keys = [key for key, _ in cross_tokenizer.token_keys(student, len(student))]
    t_keys = [key for key, _ in cross_tokenizer.token_keys(teacher, len(teacher))]
    assert s_keys[:8] == [b"A", b" cat", b"cat", b"\n", "é".encode(), b"bird", b" ", b"A"]
    assert t_keys[:6] == [b" cat", b"cat", b"\n", "é".encode(), b"dog", b" "]
    assert s_keys[9] == "Ġcat".encode() and t_keys[8] == b"<s>" and s_keys[10] == ("special", "<s>")


def test_vocabulary_match_on_a_known_overlap(pair):
    student, teacher = pair
    match = cross_tokenizer.vocabulary_match(student, teacher)
    assert list(zip(match.student_ids.tolist(), match.teacher_ids.tolist())) == KNOWN_PAIRS
    with_ends = cross_tokenizer.vocabulary_match(student, teacher, end_of_turn=(11, 9))  # </s> <-> <|im_end|>
    assert (11, 9) in zip(with_ends.student_ids.tolist(), with_ends.teacher_ids.tolist())
    assert with_ends.shares() == {"matched_tokens": 7, "matched_vocab_student": 7 / 12,
                                  "matched_vocab_teacher": 7 / 11}
    table = match.teacher_to_student()
    assert table.tolist() == [1, 2, 3, 4, -1, 6, 7, -1, -1, -1, -1]
    # padded heads: only ids below the real vocabulary sizes are paired
    assert cross_tokenizer.vocabulary_match(student, teacher, 4, 3).student_ids.tolist() == [1, 2, 3]


def test_no_shared_tokens_gives_an_empty_match():
    student = tiny_tokenizer(["▁a", "b"], [], "sentencepiece")
    teacher = tiny_tokenizer(["c", "Ġd"], [], "bytelevel")
    match = cross_tokenizer.vocabulary_match(student, teacher)
    assert len(match.student_ids) == len(match.teacher_ids) == 0 and match.shares()["matched_vocab_student"] == 0


def test_demo_pair_matches_what_both_tokenizers_write(kit):
    """The kit's byte-level (chatml) and SentencePiece-style (nosys) tokenizers: every pair decodes to the same text."""
    student, teacher = (distill_models.load_tokenizer(str(kit[name])) for name in ("student_nosys", "teacher"))
    match = cross_tokenizer.vocabulary_match(student, teacher)
    assert 0.3 < match.shares()["matched_vocab_student"] < 1
    for s, t in zip(match.student_ids.tolist(), match.teacher_ids.tolist()):
        s_text = student.convert_tokens_to_string(["x", *student.convert_ids_to_tokens([s])])[1:]  # keep a lead space
        t_text = teacher.decode([t])
        assert s_text == t_text or "\ufffd" in t_text, (s, t, s_text, t_text)


# -- the loss against its formula -------------------------------------------------------------------------------


def softmax(row, temperature):
    z = [x / temperature for x in row]
    top = max(z)
    e = [math.exp(x - top) for x in z]
    return [x / sum(e) for x in e]


def divergence(p, q, beta):
    """D_beta of two probability lists, from the definitions (0 log 0 = 0)."""
    def kl(a, b):
        return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b) if x > 0)
    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def sorted_with_tail(probs, k):
    ranked = sorted(probs, reverse=True)
    return ranked[:k] + [sum(ranked[k:])]


def ref_sorted_distance(p, q, kind):
    if kind == "kl":
        return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)
    return sum(abs(a - b) for a, b in zip(p, q))


def ref_hybrid(student_row, teacher_row, pairs, k, temperature, kind, beta, weighting):
    """One position of the hybrid loss, written from the docstring's formula in plain float64 Python."""
    p, q = softmax(teacher_row, temperature), softmax(student_row, temperature)
    s_matched, t_matched = {s for s, _ in pairs}, {t for _, t in pairs}
    s_rest = [i for i in range(len(q)) if i not in s_matched]
    t_rest = [i for i in range(len(p)) if i not in t_matched]
    p_m, q_m = [p[t] for _, t in pairs], [q[s] for s, _ in pairs]
    p_u, q_u = sum(p[i] for i in t_rest), sum(q[i] for i in s_rest)
    if s_rest and t_rest:
        matched = divergence(p_m + [p_u], q_m + [q_u], beta)
    else:  # no bucket: the matched tokens renormalized
        matched = divergence([x / sum(p_m) for x in p_m], [x / sum(q_m) for x in q_m], beta)
    kk = min(k, len(s_rest) - 1, len(t_rest) - 1)
    unmatched = 0.0
    if kk >= 0:
        unmatched = ref_sorted_distance(sorted_with_tail([p[i] / p_u for i in t_rest], kk),
                                        sorted_with_tail([q[i] / q_u for i in s_rest], kk), kind)
    if weighting == "mass":
        loss = matched + p_u * unmatched
    else:
        w = len(pairs) / len(p)
        loss = w * matched + (1 - w) * unmatched
    return temperature**2 * loss, 1 - p_u, 1 - q_u


def ref_sorted_uld(student_row, teacher_row, k, temperature, kind):
    kk = min(k, len(student_row) - 1, len(teacher_row) - 1)
    return temperature**2 * ref_sorted_distance(sorted_with_tail(softmax(teacher_row, temperature), kk),
                                                sorted_with_tail(softmax(student_row, temperature), kk), kind)


def random_pairs(g, n, v_s, v_t):
    s = torch.randperm(v_s, generator=g)[:n].tolist()
    t = torch.randperm(v_t, generator=g)[:n].tolist()
    return sorted(zip(s, t))


def as_ids(pairs):
    ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return ids[:, 0], ids[:, 1]


@pytest.mark.parametrize("weighting", ["mass", "vocab"])
@pytest.mark.parametrize("kind", ["kl", "wasserstein"])
@pytest.mark.parametrize("beta,temperature,k", [(0.0, 2.0, 4), (1.0, 1.0, 3), (0.5, 0.7, 40), (0.2, 2.0, 0)])
def test_hybrid_loss_matches_reference(weighting, kind, beta, temperature, k):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(7, 13, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(7, 19, generator=g, dtype=torch.float64) * 3
    pairs = random_pairs(g, 6, 13, 19)
    got, p_m, q_m = cross_tokenizer.hybrid_uld_loss(student, teacher, *as_ids(pairs), k=k, temperature=temperature,
                                                    kind=kind, beta=beta, weighting=weighting)
    want = [ref_hybrid(s, t, pairs, k, temperature, kind, beta, weighting)
            for s, t in zip(student.tolist(), teacher.tolist())]
    assert got.tolist() == pytest.approx([w[0] for w in want], rel=1e-9, abs=1e-12)
    assert p_m.tolist() == pytest.approx([w[1] for w in want], rel=1e-9)
    assert q_m.tolist() == pytest.approx([w[2] for w in want], rel=1e-9)


@pytest.mark.parametrize("weighting", ["mass", "vocab"])
@pytest.mark.parametrize("kind", ["kl", "wasserstein"])
def test_no_shared_tokens_is_todays_uld(weighting, kind):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(5, 13, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(5, 19, generator=g, dtype=torch.float64) * 3
    none = torch.zeros(0, dtype=torch.long)
    got, p_m, _ = cross_tokenizer.hybrid_uld_loss(student, teacher, none, none, k=5, temperature=2.0, kind=kind,
                                                  weighting=weighting)
    want = cross_tokenizer.uld_loss(student, teacher, k=5, temperature=2.0, kind=kind)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert (p_m == 0).all()


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_one_vocabulary_is_token_level(beta):
    """Every token matched (one tokenizer on both sides): no bucket, no sorted term, token_level's divergence."""
    g = torch.Generator().manual_seed(2)
    student = torch.randn(5, 11, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(5, 11, generator=g, dtype=torch.float64) * 3
    ids = torch.arange(11)
    got, p_m, q_m = cross_tokenizer.hybrid_uld_loss(student, teacher, ids, ids, k=5, temperature=2.0, beta=beta)
    want = common.generalized_jsd_per_position(student, teacher, beta, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (p_m == 1).all() and (q_m == 1).all()


def test_identity_pulls_toward_the_teachers_token_where_sorted_ulds_does_not():
    """The diagnosed failure: a student sharply on the wrong shared token scores like the right one under sorted ULD,
    not under the hybrid loss."""
    teacher = torch.tensor([[8.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    right = torch.tensor([[8.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    wrong = torch.tensor([[0.0, 8.0, 0.0, 0.0]], dtype=torch.float64)
    ids = torch.tensor([0, 1])
    sorted_ = [cross_tokenizer.uld_loss(s, teacher, k=2, temperature=1.0) for s in (right, wrong)]
    hybrid = [cross_tokenizer.hybrid_uld_loss(s, teacher, ids, ids, k=2, temperature=1.0)[0] for s in (right, wrong)]
    assert sorted_[0].item() == pytest.approx(sorted_[1].item(), abs=1e-12)
    assert hybrid[0].item() < 1e-9 < 1.0 < hybrid[1].item()


# -- the chunked loss: identity mask, padded heads, gradients ----------------------------------------------------


@pytest.mark.parametrize("kind,beta,weighting", [("kl", 0.0, "mass"), ("wasserstein", 0.5, "vocab"),
                                                 ("kl", 1.0, "mass")])
def test_chunked_hybrid_matches_reference_and_materialized_gradients(kind, beta, weighting):
    """Padded heads (rows past the vocabularies), an identity mask (sorted ULD where False), chunks of 4: the loss
    equals the brute-force reference summed / num_tokens, and the gradients those of one materialized pass."""
    g = torch.Generator().manual_seed(3)
    n, h, ht, v_s, v_t = 11, 6, 5, 10, 15
    student_hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    student_weight = torch.randn(13, h, generator=g, dtype=torch.float64, requires_grad=True)  # 3 padding rows
    student_weight.data[v_s:] += 5.0  # padding rows that would win every softmax if they counted
    teacher_hidden = torch.randn(n, ht, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(19, ht, generator=g, dtype=torch.float64)  # 4 padding rows
    targets = torch.randint(0, v_s, (n,), generator=g)
    identity = torch.rand(n, generator=g) < 0.6
    pairs = random_pairs(g, 5, v_s, v_t)
    match = cross_tokenizer.VocabMatch(*as_ids(pairs), v_s, v_t)
    options = dict(alpha=0.3, top_k=4, temperature=2.0, kind=kind, beta=beta, weighting=weighting)
    loss, ce_sum, div_sum, masses = cross_tokenizer.chunked_uld_and_ce(
        student_hidden, student_weight, targets, 20, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
        student_vocab=v_s, teacher_vocab=v_t, match=match, identity=identity, chunk_size=4, **options)
    s_logits = (student_hidden @ student_weight[:v_s].T).detach()
    t_logits = teacher_hidden @ teacher_weight[:v_t].T
    per_position = [ref_hybrid(s, t, pairs, 4, 2.0, kind, beta, weighting) if same else
                    (ref_sorted_uld(s, t, 4, 2.0, kind), *ref_hybrid(s, t, pairs, 4, 2.0, kind, beta, weighting)[1:])
                    for s, t, same in zip(s_logits.tolist(), t_logits.tolist(), identity.tolist())]
    ce = torch.nn.functional.cross_entropy(s_logits, targets, reduction="sum").item()
    uld = sum(x[0] for x in per_position)
    assert loss.item() == pytest.approx((0.3 * ce + 0.7 * uld) / 20, rel=1e-6)
    assert div_sum.item() == pytest.approx(uld, rel=1e-9)
    assert masses.tolist() == pytest.approx([sum(x[1] for x in per_position), sum(x[2] for x in per_position)])
    loss.backward()
    got = student_hidden.grad.clone(), student_weight.grad.clone()
    student_hidden.grad = student_weight.grad = None
    logits = student_hidden @ student_weight[:v_s].T
    hybrid = cross_tokenizer.hybrid_uld_loss(logits, t_logits, match.student_ids, match.teacher_ids, k=4,
                                             temperature=2.0, kind=kind, beta=beta, weighting=weighting)[0]
    sorted_ = cross_tokenizer.uld_loss(logits, t_logits, k=4, temperature=2.0, kind=kind)
    want = (0.3 * torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
            + 0.7 * torch.where(identity, hybrid, sorted_).sum()) / 20
    want.backward()
    torch.testing.assert_close(got[0], student_hidden.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1], student_weight.grad, rtol=1e-5, atol=1e-7)
    assert (got[1][v_s:] == 0).all()
    assert ce_sum.item() == pytest.approx(ce, rel=1e-6)


def test_sorted_mode_is_unchanged_by_the_new_arguments():
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(9, 6, generator=g), torch.randn(13, 6, generator=g)
    t_hidden, t_weight = torch.randn(9, 5, generator=g), torch.randn(19, 5, generator=g)
    targets = torch.randint(0, 13, (9,), generator=g)
    loss, _, div_sum, masses = cross_tokenizer.chunked_uld_and_ce(
        hidden, weight, targets, 9, teacher_hidden=t_hidden, teacher_weight=t_weight, alpha=0.5, top_k=5,
        temperature=2.0, chunk_size=4)
    want = cross_tokenizer.uld_loss(hidden @ weight.T, t_hidden @ t_weight.T, k=5, temperature=2.0).sum()
    assert masses is None and div_sum.item() == pytest.approx(want.item(), rel=1e-5)


# -- the top-K cache form ------------------------------------------------------------------------------------------


def ref_hybrid_from_topk(student_row, teacher_row, pairs, top, k, kind, beta, weighting):
    """hybrid_uld_from_topk's documented formula at T=1, in plain Python: the teacher's matched tokens among its top
    `top` by identity, the rest (its other top tokens and its tail) as unmatched mass."""
    p, q = softmax(teacher_row, 1.0), softmax(student_row, 1.0)
    partner = {t: s for s, t in pairs}
    ranked = sorted(range(len(p)), key=lambda i: -p[i])[:top]
    named = [t for t in ranked if t in partner]
    p_n, q_n = [p[t] for t in named], [q[partner[t]] for t in named]
    matched = divergence(p_n + [1 - sum(p_n)], q_n + [1 - sum(q_n)], beta)
    p_rest = 1 - sum(p_n)
    s_rest = [i for i in range(len(q)) if i not in {s for s, _ in pairs}]
    kk = min(k, top, len(s_rest) - 1, len(p) - len(pairs) - 1)
    unnamed = sorted((p[t] for t in ranked if t not in partner), reverse=True)
    unnamed += [0.0] * (kk - len(unnamed))  # fewer unnamed top tokens than kk: empty buckets
    teacher_u = [x / p_rest for x in unnamed[:kk]]
    teacher_u.append(1 - sum(teacher_u))
    q_u = sum(q[i] for i in s_rest)
    unmatched = ref_sorted_distance(teacher_u, sorted_with_tail([q[i] / q_u for i in s_rest], kk), kind)
    if weighting == "mass":
        return matched + p_rest * unmatched
    w = len(pairs) / len(p)
    return w * matched + (1 - w) * unmatched


@pytest.mark.parametrize("kind,beta,weighting", [("kl", 0.0, "mass"), ("wasserstein", 1.0, "vocab"),
                                                 ("kl", 0.5, "mass")])
@pytest.mark.parametrize("top", [6, 19])
def test_hybrid_from_topk_matches_its_reference_and_the_live_loss_when_complete(kind, beta, weighting, top):
    g = torch.Generator().manual_seed(5)
    student = torch.randn(6, 13, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(6, 19, generator=g, dtype=torch.float64) * 3
    pairs = random_pairs(g, 7, 13, 19)
    match = cross_tokenizer.VocabMatch(*as_ids(pairs), 13, 19)
    log_p = teacher.log_softmax(-1)  # the cache's rows, in float64 (cache_teacher.teacher_topk computes in float32)
    logprobs, ids = log_p.topk(top, dim=-1)
    tail = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)
    got, p_m, _ = cross_tokenizer.hybrid_uld_from_topk(student, ids, logprobs, tail, match.teacher_to_student(),
                                                       match.student_ids, k=4, temperature=1.0, kind=kind,
                                                       beta=beta, weighting=weighting)
    want = [ref_hybrid_from_topk(s, t, pairs, top, 4, kind, beta, weighting)
            for s, t in zip(student.tolist(), teacher.tolist())]
    assert got.tolist() == pytest.approx(want, rel=1e-8, abs=1e-12)
    if top == 19:  # the whole distribution cached: the live loss exactly (at T=1)
        live, live_p_m, _ = cross_tokenizer.hybrid_uld_loss(student, teacher, match.student_ids, match.teacher_ids,
                                                            k=4, temperature=1.0, kind=kind, beta=beta,
                                                            weighting=weighting)
        torch.testing.assert_close(got, live, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(p_m, live_p_m, rtol=1e-9, atol=1e-12)


# -- training end to end -------------------------------------------------------------------------------------------

TRAIN = ["--max-steps", "3", "--batch-size", "4", "--lr", "1e-3", "--alpha", "0.2", "--top-k", "8"]


def test_hybrid_trains_and_logs_the_match(kit, trained_teacher, tmp_path, capsys):
    data = write_rows(tmp_path / "d.jsonl", 12)
    out = tmp_path / "run"
    cross_tokenizer.main(["--teacher", str(trained_teacher), "--student", str(kit["student_nosys"]), "--data",
                          str(data), "--output-dir", str(out), "--uld-match", "hybrid", "--kl", "jsd", *TRAIN])
    printed = capsys.readouterr().out
    assert "vocabulary match:" in printed
    assert "cover exactly the same characters (compared by token identity)" in printed
    alignment = json.loads((out / "alignment.json").read_text())
    assert 0 < alignment["matched_vocab_student"] < 1 and 0 < alignment["matched_vocab_teacher"] < 1
    assert 0 < alignment["same_span_fraction"] < 1
    metrics = read_metrics(out)
    for row in metrics:
        assert row["matched_vocab_student"] == alignment["matched_vocab_student"]
        assert 0 < row["matched_mass_teacher"] <= 1 and 0 < row["matched_mass_student"] <= 1


@pytest.mark.parametrize("store", ["topk", "hidden"])
@pytest.mark.parametrize("matching", ["hybrid", "sorted"])
def test_a_complete_cache_equals_the_live_teacher(kit, trained_teacher, tmp_path, store, matching):
    """Different tokenizers (byte-level teacher, SentencePiece-style student), either matching. A hidden cache gives
    the live loss at T=2; a top-K cache holding every token gives it at T=1 (where its buckets are exact)."""
    data = write_rows(tmp_path / "d.jsonl", 12)
    extra = ["--store", "hidden", "--hidden-dtype", "float32"] if store == "hidden" else [
        "--top-k", "100000", "--logprob-dtype", "float32"]
    cache_teacher.main(["--teacher", str(trained_teacher), "--data", str(data), "--output", str(tmp_path / "cache"),
                        *extra])
    temperature = "2" if store == "hidden" else "1"
    args = ["--student", str(kit["student_nosys"]), "--data", str(data), *TRAIN, "--temperature", temperature,
            "--uld-match", matching, "--kl", "reverse"]
    cross_tokenizer.main([*args, "--teacher", str(trained_teacher), "--output-dir", str(tmp_path / "live")])
    cross_tokenizer.main([*args, "--teacher-cache", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "cached")])
    live, cached = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "cached")
    assert len(live) == len(cached) == 3
    masses = ("matched_mass_teacher", "matched_mass_student") if matching == "hybrid" else ()
    assert all(("matched_mass_teacher" in m) == bool(masses) for m in live + cached)
    for key in ("loss", "div", "ce", "tokens", *masses):
        assert [m[key] for m in cached] == pytest.approx([m[key] for m in live], rel=1e-5), key


def test_topk_cache_hybrid_needs_the_teachers_tokenizer(kit, trained_teacher, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 4)
    cache_teacher.main(["--teacher", str(trained_teacher), "--data", str(data), "--output", str(tmp_path / "c"),
                        "--top-k", "16"])
    manifest = json.loads((tmp_path / "c" / "cache.json").read_text())
    (tmp_path / "c" / "cache.json").write_text(json.dumps({**manifest, "teacher": str(tmp_path / "moved")}))
    argv = ["--student", str(kit["student_nosys"]), "--data", str(data), "--teacher-cache", str(tmp_path / "c"),
            *TRAIN, "--uld-match", "hybrid"]
    with pytest.raises(common.DistillError, match="needs the tokenizer of the teacher the cache was written with"):
        cross_tokenizer.main([*argv, "--teacher", str(kit["student_llama3"]), "--output-dir", str(tmp_path / "r1")])
    # --teacher names a folder with that tokenizer: it is used
    cross_tokenizer.main([*argv, "--teacher", str(trained_teacher), "--output-dir", str(tmp_path / "r2")])
    assert "matched_mass_teacher" in read_metrics(tmp_path / "r2")[0]


def test_identity_only_where_a_student_token_covers_its_teacher_tokens_characters(kit):
    """The demo's answer line: the SentencePiece-style student writes ' 6' as one token, the byte-level teacher as
    ' ' + '6'; that pair (and ' 9') keeps the sorted term, the others are compared by identity."""
    student, teacher = (distill_models.load_tokenizer(str(kit[name])) for name in ("student_nosys", "teacher"))
    rows = [{"messages": [{"role": "user", "content": "Q?"}], "completion": "54 / 9 = 6\n#### 6"}]
    (example,), _, stats = cross_tokenizer.encode_pairs(rows, student, teacher, 1024)
    ids = [i for i, m in zip(example["input_ids"], example["loss_mask"]) if m]
    assert student.convert_ids_to_tokens(ids) == ["5", "4", "▁/", "▁9", "▁=", "▁6", "\n", "####", "▁6", "</s>"]
    assert example["same_span"] == [True, True, True, False, True, False, True, True, False, True]
    assert stats["same_span_fraction"] == pytest.approx(7 / 10)
    batch = cross_tokenizer.collate_pairs([example, example], student.pad_token_id, teacher.pad_token_id)
    assert batch["identity"].tolist() == example["same_span"] * 2
