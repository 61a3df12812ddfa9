"""cross_tokenizer.py: end-offset alignment across genuinely different tokenizers, the ULD losses against
brute-force references (tail bucket included), and training end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import common
import cross_tokenizer
import models
from conftest import read_metrics, write_rows
from cross_tokenizer import align_by_end_offsets


@pytest.mark.parametrize("student,teacher,want", [
    ([(0, 2), (2, 4)], [(0, 2), (2, 4)], [0, 1]),                       # same segmentation
    ([(0, 2), (2, 4), (4, 6)], [(0, 4), (4, 6)], [0, 0, 1]),            # student splits finer
    ([(0, 6)], [(0, 2), (2, 4), (4, 6)], [2]),                          # teacher splits finer
    ([(0, 3)], [(0, 2), (2, 4)], [0]),                                   # a tie goes to the earlier token
    ([(0, 1), (1, 5)], [(0, 1), (1, 1), (1, 5)], [0, 2]),               # equal ends: the earlier one
    ([(0, 9)], [(0, 2), (2, 4)], [1]),                                   # beyond the teacher's end: the last
    ([(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)], [(0, 3), (3, 5)], [0, 0, 0, 0, 1]),  # "12345": digits vs triples
])
def test_align_by_end_offsets(student, teacher, want):
    assert align_by_end_offsets(student, teacher) == want


@pytest.fixture(scope="module")
def tokenizers(kit):
    return {name: models.load_tokenizer(str(kit[name])) for name in ("student", "student_llama3", "student_nosys")}


COMPLETIONS = [
    "Chloé has 12345 apples.\n#### 12345",
    " leading space, then 3½ pies 🥧 and 数学 123 + 456 = 579",
    "Emoji 🙂🙂 and café — naïve.  Two spaces.\n#### -7",
]


@pytest.mark.parametrize("completion", COMPLETIONS)
@pytest.mark.parametrize("student_name,teacher_name", [("student_nosys", "student"), ("student", "student_llama3"),
                                                       ("student_llama3", "student_nosys")])
def test_alignment_on_real_tokenizers(tokenizers, completion, student_name, teacher_name):
    messages = [{"role": "user", "content": "Q?"}]
    student = common.encode_chat(tokenizers[student_name], messages, completion)
    teacher = common.encode_chat(tokenizers[teacher_name], messages, completion)
    for enc in (student, teacher):
        spans = enc["completion_offsets"]
        assert spans[-1] == (len(completion), len(completion) + 1)  # the end-of-turn token
        ends = [e for _, e in spans]
        assert ends == sorted(ends) and all(0 <= s <= e <= len(completion) for s, e in spans[:-1])
        covered = set().union(*(range(s, e) for s, e in spans))
        assert all(i in covered for i, ch in enumerate(completion) if not ch.isspace())
    aligned = align_by_end_offsets(student["completion_offsets"], teacher["completion_offsets"])
    assert len(aligned) == len(student["completion_offsets"])
    assert aligned[-1] == len(teacher["completion_offsets"]) - 1  # end of turn <-> end of turn
    t_ends = [teacher["completion_offsets"][j][1] for j in aligned]
    s_ends = [e for _, e in student["completion_offsets"]]
    exact = sum(a == b for a, b in zip(s_ends, t_ends)) / len(s_ends)
    assert exact > 0.4
    # Closest really is closest: no teacher token ends nearer.
    all_t = [e for _, e in teacher["completion_offsets"]]
    assert all(abs(s - t) == min(abs(s - x) for x in all_t) for s, t in zip(s_ends, t_ends))


def ref_uld(student_row, teacher_row, k, temperature, kind):
    """Brute force from the formula, float64, plain python."""
    def sorted_topk_tail(row):
        z = [x / temperature for x in row]
        top = max(z)
        e = [math.exp(x - top) for x in z]
        probs = sorted((x / sum(e) for x in e), reverse=True)
        head = probs[:min(k, len(student_row) - 1, len(teacher_row) - 1)]  # K below the smaller vocabulary
        return head + [max(0.0, 1 - sum(head))]

    p, q = sorted_topk_tail(teacher_row), sorted_topk_tail(student_row)
    if kind == "kl":
        d = sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)
    else:
        d = sum(abs(a - b) for a, b in zip(p, q))
    return temperature**2 * d


@pytest.mark.parametrize("kind", ["kl", "wasserstein"])
@pytest.mark.parametrize("k,temperature", [(5, 2.0), (3, 1.0), (40, 1.0)])
def test_uld_loss_matches_reference(kind, k, temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 13, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(6, 19, generator=g, dtype=torch.float64) * 3  # a different vocabulary size
    got = cross_tokenizer.uld_loss(student, teacher, k=k, temperature=temperature, kind=kind)
    want = [ref_uld(s, t, k, temperature, kind) for s, t in zip(student.tolist(), teacher.tolist())]
    assert got.tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_tail_bucket_keeps_the_mass():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    v = cross_tokenizer.sorted_topk_with_tail(logits, 2, 1.0)
    assert v.shape == (1, 3) and v.sum().item() == pytest.approx(1.0) and v[0, 2] > 0


@pytest.mark.parametrize("kind", ["kl", "wasserstein"])
def test_chunked_loss_and_gradients_match_materialized(kind):
    g = torch.Generator().manual_seed(1)
    n, h, ht = 11, 6, 5
    student_hidden = torch.randn(n, h, generator=g, requires_grad=True)
    student_weight = torch.randn(13, h, generator=g, requires_grad=True)
    teacher_hidden = torch.randn(n, ht, generator=g)
    teacher_weight = torch.randn(19, ht, generator=g)
    targets = torch.randint(0, 13, (n,), generator=g)
    loss, ce_sum, div_sum, _ = cross_tokenizer.chunked_uld_and_ce(
        student_hidden, student_weight, targets, 20, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
        alpha=0.3, top_k=5, temperature=2.0, kind=kind, chunk_size=4)
    loss.backward()
    got = (loss.item(), student_hidden.grad.clone(), student_weight.grad.clone())
    student_hidden.grad = student_weight.grad = None
    logits = student_hidden @ student_weight.T
    uld = cross_tokenizer.uld_loss(logits, teacher_hidden @ teacher_weight.T, k=5, temperature=2.0, kind=kind)
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    want = (0.3 * ce + 0.7 * uld.sum()) / 20
    want.backward()
    assert got[0] == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(got[1], student_hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[2], student_weight.grad, rtol=1e-4, atol=1e-6)
    assert ce_sum.item() == pytest.approx(ce.item(), rel=1e-5)


def test_padded_head_rows_get_no_probability():
    """Rows past the tokenizers' sizes are padding: the loss equals one computed on the real rows alone, and the
    student's padding rows get no gradient."""
    g = torch.Generator().manual_seed(2)
    student_hidden, teacher_hidden = torch.randn(9, 6, generator=g), torch.randn(9, 5, generator=g)
    student_weight = torch.randn(13, 6, generator=g, requires_grad=True)
    teacher_weight = torch.randn(19, 5, generator=g)
    student_weight.data[10:] += 5.0  # padding rows that would win every softmax if they counted
    targets = torch.randint(0, 10, (9,), generator=g)
    options = dict(alpha=0.3, top_k=4, temperature=2.0, kind="kl", chunk_size=4)
    loss, *_ = cross_tokenizer.chunked_uld_and_ce(student_hidden, student_weight, targets, 9,
                                                  teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                                                  student_vocab=10, teacher_vocab=15, **options)
    loss.backward()
    real = student_weight.detach()[:10].clone().requires_grad_()
    want, *_ = cross_tokenizer.chunked_uld_and_ce(student_hidden, real, targets, 9, teacher_hidden=teacher_hidden,
                                                  teacher_weight=teacher_weight[:15], **options)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(student_weight.grad[:10], real.grad)
    assert (student_weight.grad[10:] == 0).all()


@pytest.mark.parametrize("student,kind", [("student_nosys", "kl"), ("student_llama3", "wasserstein")])
def test_cross_tokenizer_trains_saves_and_reloads(kit, trained_teacher, tmp_path, capsys, student, kind):
    data = write_rows(tmp_path / "d.jsonl", 32, seed=4)
    out = tmp_path / "run"
    cross_tokenizer.main(["--teacher", str(trained_teacher), "--student", str(kit[student]), "--data", str(data),
                          "--output-dir", str(out), "--top-k", "8", "--temperature", "2.0", "--alpha", "0.1",
                          "--uld-loss", kind, "--lr", "3e-3", "--max-steps", "30", "--batch-size", "8",
                          "--log-every", "100", "--min-exact-alignment", "0.999"])
    printed = capsys.readouterr().out
    assert "alignment:" in printed and "student tokens end where their teacher token ends" in printed
    alignment = json.loads((out / "alignment.json").read_text())
    assert 0 < alignment["exact_end_fraction"] <= 1 and alignment["mean_end_gap_chars"] >= 0
    assert ("warning: exact alignment" in printed) == (alignment["exact_end_fraction"] < 0.999)
    metrics = read_metrics(out)
    assert sum(m["loss"] for m in metrics[-5:]) < 0.8 * sum(m["loss"] for m in metrics[:5])
    assert all(set(m) >= {"ce", "div", "tokens"} for m in metrics)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.vocab_size == AutoModelForCausalLM.from_pretrained(kit[student]).config.vocab_size


def test_alignment_stats_count_inexact_pairs(tokenizers):
    """Digits one by one (ChatML) against Llama-3's digit groups: '12345' aligns exactly at some digits only."""
    rows = [{"messages": [{"role": "user", "content": "Q?"}], "completion": "12345"}]
    teacher_tok = tokenizers["student_llama3"]
    enc = common.encode_chat(teacher_tok, rows[0]["messages"], "12345")
    masked = [i for i, m in zip(enc["input_ids"], enc["loss_mask"]) if m]
    assert teacher_tok.convert_ids_to_tokens(masked) == ["12", "3", "45", "<|eot_id|>"]
    examples, skipped, stats = cross_tokenizer.encode_pairs(rows, tokenizers["student"], teacher_tok, 1024)
    # student 1 2 3 4 5 <eot> (ends 1..5, 6) vs teacher 12 3 45 <eot> (ends 2, 3, 5, 6):
    # 1->12 (gap 1), 2->12, 3->3, 4->3 (a tie with 45: the earlier, gap 1), 5->45, <eot>-><eot>
    assert skipped == 0 and stats["student_tokens"] == 6
    positions = [i for i, m in enumerate(enc["loss_mask"]) if m]
    assert examples[0]["teacher_targets"] == [positions[j] for j in (0, 0, 1, 1, 2, 3)]
    assert stats["exact_end_fraction"] == pytest.approx(4 / 6)
    assert stats["mean_end_gap_chars"] == pytest.approx(2 / 6)
    teacher_ids = examples[0]["teacher_ids"]
    targets = examples[0]["teacher_targets"]
    assert targets[-1] == len(teacher_ids) - 1  # the teacher's <|eot_id|> is its last token
