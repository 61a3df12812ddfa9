"""Reference losses written straight from their formulas and independent of the project's code, test-only:
- position by position in plain python floats (`softmax64`, `kl64`, `ref_divergence`), the way the formula reads;
- on materialized [..., V] logits in float64 torch (`masked_ce`, `masked_jsd`): the fused, chunked losses are
  checked against these, and these against the python ones (test_losses.py). Training never materializes logits.
"""

from __future__ import annotations

import math

import torch


def softmax64(row, temperature):
    """Plain-python softmax in float64, the way the formula is written."""
    z = [float(x) / temperature for x in row]
    top = max(z)
    e = [math.exp(x - top) for x in z]
    total = sum(e)
    return [x / total for x in e]


def kl64(a, b):
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b) if x > 0)


def ref_divergence(student_row, teacher_row, beta, temperature):
    q, p = softmax64(student_row, temperature), softmax64(teacher_row, temperature)
    if beta == 0:
        d = kl64(p, q)
    elif beta == 1:
        d = kl64(q, p)
    else:
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        d = beta * kl64(p, m) + (1 - beta) * kl64(q, m)
    return temperature**2 * d


def _log_softmax64(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    z = logits.double() / temperature
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_v a (log a - log b) per position, 0 log 0 = 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def masked_ce(logits, targets, mask, num_tokens=None) -> torch.Tensor:
    """sum_i mask_i * -log softmax(logits_i)[targets_i] / num_tokens (default mask.sum())."""
    nll = -_log_softmax64(logits).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    total = torch.where(mask.bool(), nll, torch.zeros_like(nll)).sum()
    return total / (mask.sum() if num_tokens is None else num_tokens)


def masked_jsd(student_logits, teacher_logits, mask, *, beta: float, temperature: float = 1.0,
               num_tokens=None) -> torch.Tensor:
    """T^2 * sum_i mask_i * D_beta(p_i, q_i) / num_tokens, p = softmax(teacher / T), q = softmax(student / T):
    D_0 = KL(p || q), D_1 = KL(q || p), else beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q."""
    log_q, log_p = _log_softmax64(student_logits, temperature), _log_softmax64(teacher_logits, temperature)
    if beta == 0:
        d = _kl(log_p, log_q)
    elif beta == 1:
        d = _kl(log_q, log_p)
    else:
        log_m = (beta * log_p.exp() + (1 - beta) * log_q.exp()).log()
        d = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    d = d * temperature**2
    total = torch.where(mask.bool(), d, torch.zeros_like(d)).sum()  # a padded inf/nan must not leak in
    return total / (mask.sum() if num_tokens is None else num_tokens)
