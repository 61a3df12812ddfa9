"""Reference losses on materialized [..., V] logits, written straight from their formulas in float64 torch and
independent of the project's code: the fused, chunked losses are checked against these (and these against the
position-by-position python references in test_losses.py). Test-only: training never materializes the logits.
"""

from __future__ import annotations

import torch


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
