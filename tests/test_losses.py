"""Every loss against a brute-force float64 reference written from its formula, position by position."""

from __future__ import annotations

import math

import pytest
import torch

import common
import losses
import reference
from reference import ref_divergence, softmax64

torch.manual_seed(0)


def ref_masked_mean(student, teacher, mask, beta, temperature, num_tokens=None):
    total, count = 0.0, 0
    for s_row, t_row, m in zip(student.reshape(-1, student.shape[-1]).tolist(),
                               teacher.reshape(-1, teacher.shape[-1]).tolist(), mask.flatten().tolist()):
        if m:
            total += ref_divergence(s_row, t_row, beta, temperature)
            count += 1
    return total / (num_tokens or count)


def make_case(batch=3, length=5, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) * 2
    mask = torch.zeros(batch, length, dtype=torch.long)
    mask[0, 1:4] = 1
    mask[1, 2:] = 1
    mask[2, 0] = 1  # unequal masked counts per row; row 2 is mostly padding
    # Garbage at padded/prompt positions must not leak into the loss.
    student[mask == 0] = 1e4 * torch.randn_like(student[mask == 0])
    return student, teacher, mask


def masked_mean(per_position, mask, num_tokens=None):
    return torch.where(mask.bool(), per_position, 0.0).sum() / (num_tokens or mask.sum())


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_per_position_matches_reference(beta, temperature):
    """The production divergence on logits (checks, figures, doctor) against the python formula, position by
    position, with garbage at masked positions."""
    student, teacher, mask = make_case(seed=2)
    got = common.generalized_jsd_per_position(student, teacher, beta, temperature)
    want = ref_masked_mean(student, teacher, mask, beta, temperature, num_tokens=17)
    assert masked_mean(got, mask, 17).item() == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_torch_reference_matches_python_reference(beta, temperature):
    """tests/reference.py, which the fused losses are checked against, is itself the formula."""
    student, teacher, mask = make_case(seed=3)
    got = reference.masked_jsd(student, teacher, mask, beta=beta, temperature=temperature)
    assert got.item() == pytest.approx(ref_masked_mean(student, teacher, mask, beta, temperature), rel=1e-10)


def test_the_two_kls_match_torch_kl_div():
    """An independent implementation of both directions: torch's kl_div (forward KL(p || q) = kl_div(log q, p))."""
    student, teacher, mask = make_case(seed=4)
    for temperature in (1.0, 2.0):
        log_q = torch.log_softmax(student / temperature, -1)
        log_p = torch.log_softmax(teacher / temperature, -1)
        forward = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
        reverse = torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
        for beta, want in ((0.0, forward), (1.0, reverse)):
            got = common.generalized_jsd_per_position(student, teacher, beta, temperature)
            torch.testing.assert_close(got[mask.bool()], temperature**2 * want[mask.bool()], rtol=1e-10, atol=1e-12)
    assert (forward - reverse)[mask.bool()].abs().max() > 1e-3  # the directions differ on this case


def test_divergence_is_zero_for_identical_distributions():
    student, _, mask = make_case(seed=4)
    for beta in (0.0, 0.5, 1.0):
        same = common.generalized_jsd_per_position(student, student.clone(), beta, 2.0)
        assert masked_mean(same, mask).item() == pytest.approx(0, abs=1e-12)


def test_masked_ce_matches_reference():
    student, _, mask = make_case(seed=5)
    targets = torch.randint(0, student.shape[-1], mask.shape)
    want, count = 0.0, 0
    for row, y, m in zip(student.reshape(-1, student.shape[-1]).tolist(), targets.flatten().tolist(),
                         mask.flatten().tolist()):
        if m:
            want += -math.log(softmax64(row, 1.0)[y])
            count += 1
    assert reference.masked_ce(student, targets, mask).item() == pytest.approx(want / count, rel=1e-10)
    assert reference.masked_ce(student, targets, mask, num_tokens=40).item() == pytest.approx(want / 40, rel=1e-10)


def test_matches_trl_generalized_jsd_times_t_squared():
    """Cross-check against TRL's GKD loss (test-only dependency): ours = T^2 x theirs (they do not scale)."""
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    student, teacher, mask = make_case(seed=6)
    labels = torch.where(mask.bool(), 1, -100)
    for beta in (0.0, 0.5, 1.0):
        theirs = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=2.0)
        ours = masked_mean(common.generalized_jsd_per_position(student, teacher, beta, 2.0), mask)
        assert ours.item() == pytest.approx(4.0 * theirs.item(), rel=1e-9)


# ---- the fused, chunked path: same value and gradients as the materialized reference -----------------------------


def materialized(student_hidden, student_weight, targets, teacher_hidden, teacher_weight, num_tokens, alpha, beta,
                 temperature, vocab):
    student_logits = student_hidden @ student_weight[:vocab].T
    teacher_logits = teacher_hidden @ teacher_weight[:vocab].T
    ones = torch.ones(len(targets), dtype=torch.float64)
    ce = reference.masked_ce(student_logits, targets, ones, num_tokens)
    soft = reference.masked_jsd(student_logits, teacher_logits, ones, beta=beta, temperature=temperature,
                      num_tokens=num_tokens)
    return alpha * ce + (1 - alpha) * soft


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_head_loss_matches_materialized(alpha, beta, temperature):
    g = torch.Generator().manual_seed(7)
    n, h, ht, vocab = 13, 8, 6, 17
    student_hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    # Padded heads: extra rows beyond the shared vocabulary must be ignored.
    student_weight = torch.randn(vocab + 3, h, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(n, ht, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(vocab + 7, ht, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,), generator=g)
    num_tokens = 29  # the global count: larger than this micro-batch

    loss, ce_sum, div_sum = losses.fused_head_loss(
        student_hidden, student_weight, targets, num_tokens, teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight, alpha=alpha, beta=beta, temperature=temperature, chunk_size=4, vocab=vocab)
    (loss * 3.0).backward()  # a non-unit upstream gradient
    got = (loss.item(), student_hidden.grad.clone(), student_weight.grad.clone())
    student_hidden.grad = student_weight.grad = None

    want = materialized(student_hidden, student_weight, targets, teacher_hidden, teacher_weight, num_tokens,
                        alpha, beta, temperature, vocab)
    (want * 3.0).backward()
    assert got[0] == pytest.approx(want.item(), rel=1e-10)
    torch.testing.assert_close(got[1], student_hidden.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got[2], student_weight.grad, rtol=1e-9, atol=1e-12)
    assert student_weight.grad[vocab:].abs().max() == 0
    student_logits = (student_hidden @ student_weight[:vocab].T).detach()
    ce_ref = reference.masked_ce(student_logits, targets, torch.ones(n)).item() * n
    assert ce_sum.item() == pytest.approx(ce_ref, rel=1e-10)
    if alpha < 1:
        assert div_sum.item() == pytest.approx(
            (want.item() - alpha * ce_ref / num_tokens) / (1 - alpha) * num_tokens, rel=1e-9)


def test_fused_head_loss_frozen_head_and_bf16():
    """A frozen head (LoRA) gets no gradient buffer; bf16 inputs give float32-accurate losses."""
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(9, 8, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(20, 8, generator=g).bfloat16()
    targets = torch.randint(0, 20, (9,), generator=g)
    loss, _, _ = losses.fused_head_loss(hidden, weight, targets, 9, chunk_size=4)
    loss.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad is None
    ref = reference.masked_ce((hidden.float() @ weight.float().T), targets, torch.ones(9))
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fused_head_loss_with_impossible_teacher_tokens(beta):
    """A teacher logit of -inf (a banned token) has p = 0: forward KL and JSD stay finite and match the reference."""
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.eye(5, 4, dtype=torch.float64)
    teacher_weight = torch.randn(7, 4, generator=g, dtype=torch.float64)
    teacher_weight[3] = float("-inf")  # id 3 is impossible for the teacher wherever h has a positive entry
    teacher_hidden = teacher_hidden.abs() + 0.1
    targets = torch.zeros(5, dtype=torch.long)
    loss, _, _ = losses.fused_head_loss(hidden, weight, targets, 5, teacher_hidden=teacher_hidden,
                                        teacher_weight=teacher_weight, alpha=0.0, beta=beta, chunk_size=2)
    want = reference.masked_jsd(hidden @ weight.T, teacher_hidden @ teacher_weight.T, torch.ones(5), beta=beta)
    if beta == 1.0:  # reverse KL puts student mass where the teacher has none: infinite, as it should be
        assert loss.item() > 1e30 and want.item() == float("inf")
        return
    assert torch.isfinite(loss) and loss.item() == pytest.approx(want.item(), rel=1e-9)
    loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
