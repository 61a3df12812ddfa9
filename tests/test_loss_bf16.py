"""The low-precision path of losses.fused_head_loss (--bf16): head matmuls on bf16/fp16 operands with float32
products and sums, softmax and divergence in float32. Checked against the float64 formula on materialized logits.

Two references, both float64 autograd through tests/reference.py's `masked_ce` / `masked_jsd` on the whole
[N, V] logits:
  rounded:   the same formula on the operands rounded to the compute dtype (what the path computes, up to
             float32 arithmetic): the loss within 1e-6 relative; each gradient entry within
             u * (|G| @ |W|) (resp. |G|^T @ |H|) + 1e-6 of the largest, G = dloss/dlogits, u the compute dtype's unit
             roundoff (2^-8 bf16, 2^-11 fp16): the path rounds its [C, V] gradient to the compute dtype once
             before the two gradient matmuls, which moves a sum of G * w by at most u * sum |G| |w|;
  unrounded: the formula on the float32 inputs: loss within 2e-3 relative, gradients within 3e-2 of the largest
             entry - the documented cost of bf16 operands (each logit moves by up to ~2^-8 * sum |h| |w|).
"""

from __future__ import annotations

import pytest
import torch

import losses
import reference as ref_losses

BF16, FP16 = torch.bfloat16, torch.float16
UNIT_ROUNDOFF = {BF16: 2.0**-8, FP16: 2.0**-11}


def make_case(seed=0, n=23, hidden=32, teacher_hidden=24, vocab=40, pad=3, teacher_pad=5):
    """float32 inputs; heads with padded rows beyond the shared vocabulary (vocab < head rows)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        student_hidden=torch.randn(n, hidden, generator=g),
        student_weight=torch.randn(vocab + pad, hidden, generator=g) * 0.3,
        teacher_hidden=torch.randn(n, teacher_hidden, generator=g),
        teacher_weight=torch.randn(vocab + teacher_pad, teacher_hidden, generator=g) * 0.3,
        targets=torch.randint(0, vocab, (n,), generator=g),
        vocab=vocab,
    )


def reference(case, alpha, beta, temperature, num_tokens, rounded_to=None):
    """float64 loss, d/dhidden, d/dweight (padded rows zero) and G = dloss/dlogits [N, V] of the formula."""
    def prepared(x):
        x = x.to(rounded_to) if rounded_to is not None else x
        return x.double()

    vocab = case["vocab"]
    hidden = prepared(case["student_hidden"]).requires_grad_()
    weight = prepared(case["student_weight"]).requires_grad_()
    student_logits = hidden @ weight[:vocab].T
    student_logits.retain_grad()
    teacher_logits = prepared(case["teacher_hidden"]) @ prepared(case["teacher_weight"])[:vocab].T
    ones = torch.ones(len(case["targets"]), dtype=torch.float64)
    loss = alpha * ref_losses.masked_ce(student_logits, case["targets"], ones, num_tokens)
    if alpha < 1:
        loss = loss + (1 - alpha) * ref_losses.masked_jsd(student_logits, teacher_logits, ones, beta=beta,
                                                      temperature=temperature, num_tokens=num_tokens)
    loss.backward()
    return loss.item(), hidden.grad, weight.grad, student_logits.grad


def fused(case, alpha, beta, temperature, num_tokens, *, chunk_size=7, hidden_dtype=torch.float32, frozen=False,
          **kwargs):
    hidden = case["student_hidden"].to(hidden_dtype, copy=True).requires_grad_()
    weight = case["student_weight"].clone().requires_grad_(not frozen)  # the float32 master head (or a frozen one)
    loss, ce_sum, div_sum = losses.fused_head_loss(
        hidden, weight, case["targets"], num_tokens, teacher_hidden=case["teacher_hidden"],
        teacher_weight=case["teacher_weight"], alpha=alpha, beta=beta, temperature=temperature,
        chunk_size=chunk_size, vocab=case["vocab"], **kwargs)
    loss.backward()
    return loss.item(), hidden.grad, weight.grad


def assert_matches_rounded(got, case, alpha, beta, temperature, num_tokens, dtype, loss_rel=1e-6):
    loss, grad_hidden, grad_weight = got
    grad_hidden, grad_weight = grad_hidden.cpu(), grad_weight.cpu()
    want_loss, want_hidden, want_weight, G = reference(case, alpha, beta, temperature, num_tokens, rounded_to=dtype)
    vocab, u = case["vocab"], UNIT_ROUNDOFF[dtype]
    assert loss == pytest.approx(want_loss, rel=loss_rel)
    w = case["student_weight"][:vocab].to(dtype).double()
    h = case["student_hidden"].to(dtype).double()
    bound_hidden = u * (G.abs() @ w.abs()) + 1e-6 * want_hidden.abs().max()
    bound_weight = u * (G.abs().T @ h.abs()) + 1e-6 * want_weight.abs().max()
    assert ((grad_hidden.double() - want_hidden).abs() <= bound_hidden).all()
    assert ((grad_weight[:vocab].double() - want_weight[:vocab]).abs() <= bound_weight).all()
    assert grad_weight[vocab:].abs().max() == 0  # padded head rows get no gradient


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0], ids=["forward", "jsd", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bf16_path_matches_the_formula(alpha, beta, temperature):
    case = make_case(seed=1)
    num_tokens = 31  # the global count: larger than this micro-batch
    got = fused(case, alpha, beta, temperature, num_tokens, compute_dtype=BF16)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32  # the float32 master gets float32
    assert_matches_rounded(got, case, alpha, beta, temperature, num_tokens, BF16)

    want_loss, want_hidden, want_weight, _ = reference(case, alpha, beta, temperature, num_tokens)
    assert got[0] == pytest.approx(want_loss, rel=2e-3)
    torch.testing.assert_close(got[1].double(), want_hidden, rtol=0, atol=3e-2 * want_hidden.abs().max().item())
    torch.testing.assert_close(got[2].double(), want_weight, rtol=0, atol=3e-2 * want_weight.abs().max().item())


@pytest.mark.parametrize("alpha,beta", [(0.0, 0.0), (0.3, 0.5), (1.0, 0.0)])
def test_fp16_path_matches_the_formula(alpha, beta):
    case = make_case(seed=2)
    got = fused(case, alpha, beta, 2.0, 23, compute_dtype=FP16)
    assert_matches_rounded(got, case, alpha, beta, 2.0, 23, FP16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the native bf16 matmuls need CUDA")
@pytest.mark.parametrize("alpha,beta,temperature", [(0.0, 0.0, 1.0), (0.5, 0.5, 2.0), (1.0, 0.0, 1.0), (0.1, 1.0, 2.0)])
def test_cuda_takes_the_native_matmuls_and_matches_the_formula(alpha, beta, temperature):
    """On a GPU (torch >= 2.8): the probe accepts torch.addmm(..., out_dtype=float32), and the path built on it
    meets the same float64 references as the CPU path (the loss within 1e-5: cuBLAS may split its sums)."""
    device = torch.device("cuda")
    assert losses._native_mixed_matmul(device, BF16)
    case = make_case(seed=7, n=50)
    on_gpu = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    got = fused(on_gpu, alpha, beta, temperature, 60, chunk_size=16, compute_dtype=BF16)
    assert_matches_rounded(got, case, alpha, beta, temperature, 60, BF16, loss_rel=1e-5)


def discriminating_case():
    """A case whose bf16-rounded loss is far (> 100x the 1e-6 tolerance) from its float32 one, so that a path that
    skipped the rounding, or rounded where it should not, fails the comparisons below."""
    case = make_case(seed=3, n=16, hidden=64, vocab=48)
    exact = reference(case, 0.5, 0.0, 1.0, 16)[0]
    rounded = reference(case, 0.5, 0.0, 1.0, 16, rounded_to=BF16)[0]
    assert abs(rounded - exact) > 1e-4 * abs(exact)
    return case, exact, rounded


def test_autocast_and_bf16_hidden_states_select_the_bf16_path():
    case, exact, rounded = discriminating_case()
    plain = fused(case, 0.5, 0.0, 1.0, 16)[0]  # float32 in, no autocast: the float32 path
    assert plain == pytest.approx(exact, rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what token_level's compute_dtype under --bf16 amounts to
        assert fused(case, 0.5, 0.0, 1.0, 16)[0] == pytest.approx(rounded, rel=1e-6)
    assert fused(case, 0.5, 0.0, 1.0, 16, compute_dtype=BF16)[0] == pytest.approx(rounded, rel=1e-6)
    # bf16 hidden states reaching a float32 master head: bf16 too, each gradient in its input's dtype
    loss, grad_hidden, grad_weight = fused(case, 0.5, 0.0, 1.0, 16, hidden_dtype=BF16)
    assert loss == pytest.approx(rounded, rel=1e-6)
    assert grad_hidden.dtype == BF16 and grad_weight.dtype == torch.float32


def test_bf16_matmuls_get_bf16_operands_and_float32_outputs(monkeypatch):
    """The CUDA form (torch.addmm with out_dtype=float32), run on CPU through a stand-in that records what reaches
    each matmul and multiplies the same values in float32: all four matmuls get bf16 operands and write float32,
    the head's gradient takes GRAD_BLOCK_CHUNKS chunks at a time, and the results equal the CPU path's."""
    case, _, rounded = discriminating_case()
    n, chunk = len(case["targets"]), 3
    cpu_path = fused(case, 0.5, 0.0, 1.0, n, chunk_size=chunk, compute_dtype=BF16)

    calls = []
    addmm = torch.addmm

    def recording_addmm(input, mat1, mat2, *, beta=1, alpha=1, out=None, out_dtype=None):
        if out_dtype is None:
            return addmm(input, mat1, mat2, beta=beta, alpha=alpha, out=out)
        calls.append((tuple(mat1.shape), tuple(mat2.shape), mat1.dtype, mat2.dtype, out.dtype, out_dtype))
        assert input is out
        return addmm(input, mat1.float(), mat2.float(), beta=beta, alpha=alpha, out=out)

    monkeypatch.setattr(losses, "_native_mixed_matmul", lambda device, dtype: True)
    monkeypatch.setattr(torch, "addmm", recording_addmm)
    native = fused(case, 0.5, 0.0, 1.0, n, chunk_size=chunk, compute_dtype=BF16)
    monkeypatch.undo()

    chunks = range(0, n, chunk)
    block = losses.GRAD_BLOCK_CHUNKS * chunk
    block_rows = [min(block, n - lo) for lo in range(0, n, block)]
    assert len(block_rows) < len(chunks)
    assert len(calls) == 3 * len(chunks) + len(block_rows)
    assert all(c[2:] == (BF16, BF16, torch.float32, torch.float32) for c in calls)
    vocab, hidden, teacher_hidden = case["vocab"], case["student_hidden"].shape[1], case["teacher_hidden"].shape[1]
    # (contracted size, output columns): logits, teacher logits, d/dhidden, d/dweight (contracting a block's rows)
    assert {(c[0][1], c[1][1]) for c in calls} == {(hidden, vocab), (teacher_hidden, vocab), (vocab, hidden)} | {
        (rows, hidden) for rows in block_rows}
    assert native[0] == pytest.approx(cpu_path[0], rel=1e-6) and native[0] == pytest.approx(rounded, rel=1e-6)
    torch.testing.assert_close(native[1], cpu_path[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(native[2], cpu_path[2], rtol=1e-5, atol=1e-7)


def test_bf16_path_with_a_frozen_head():
    """A frozen head (LoRA): only the hidden states' gradient, still right chunk after chunk."""
    case = make_case(seed=6)
    loss, grad_hidden, grad_weight = fused(case, 0.3, 0.5, 2.0, 23, chunk_size=5, frozen=True, compute_dtype=BF16)
    assert grad_weight is None
    want_loss, want_hidden, _, G = reference(case, 0.3, 0.5, 2.0, 23, rounded_to=BF16)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    w = case["student_weight"][:case["vocab"]].to(BF16).double()
    bound = UNIT_ROUNDOFF[BF16] * (G.abs() @ w.abs()) + 1e-6 * want_hidden.abs().max()
    assert ((grad_hidden.double() - want_hidden).abs() <= bound).all()


def test_bf16_path_without_gradients_gives_the_same_values():
    case = make_case(seed=4)
    kwargs = dict(teacher_hidden=case["teacher_hidden"], teacher_weight=case["teacher_weight"], alpha=0.3, beta=0.5,
                  temperature=2.0, chunk_size=6, vocab=case["vocab"], compute_dtype=BF16)
    hidden, weight = case["student_hidden"], case["student_weight"]
    with_grad = losses.fused_head_loss(hidden.clone().requires_grad_(), weight.clone().requires_grad_(),
                                       case["targets"], 30, **kwargs)
    with torch.no_grad():
        without = losses.fused_head_loss(hidden, weight, case["targets"], 30, **kwargs)
    for a, b in zip(with_grad, without):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_bf16_path_with_impossible_teacher_tokens(beta):
    """A teacher head row of -inf (a banned token) survives bf16 rounding and the 1/T folded into the matmul."""
    case = make_case(seed=5)
    case["teacher_weight"][3] = float("-inf")
    case["teacher_hidden"] = case["teacher_hidden"].abs() + 0.1  # so that logit 3 is -inf, never nan
    got = fused(case, 0.0, beta, 2.0, 23, compute_dtype=BF16)
    want = reference(case, 0.0, beta, 2.0, 23, rounded_to=BF16)
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()


def test_chunk_rows_follow_free_memory():
    """The GPU rule, a pure function of the bytes per row and the free memory."""
    vocab = 151936
    row_bytes = vocab * (3 * 4 + 2)  # three float32 buffers and the bf16 gradient, forward KL
    cap = losses.CUDA_CHUNK_BUDGET_BYTES
    previous = 0
    for free_gib in (0.5, 1, 2, 3, 4, 6, 8, 16, 80, 140):
        free = int(free_gib * 2**30)
        rows = losses.chunk_rows_for_memory(row_bytes, free)
        assert rows % losses.CHUNK_ROWS_MULTIPLE == 0
        assert losses.CHUNK_ROWS_MIN <= rows <= losses.CHUNK_ROWS_MAX
        assert rows >= previous  # more free memory never means smaller chunks
        previous = rows
        budget = min(free // 4, cap)
        if rows > losses.CHUNK_ROWS_MIN:  # within budget, and the next multiple of 64 would not be
            assert rows * row_bytes <= budget < (rows + losses.CHUNK_ROWS_MULTIPLE) * row_bytes
    assert losses.chunk_rows_for_memory(row_bytes, 2**40) == previous  # capped: the same on any large GPU
    assert losses.chunk_rows_for_memory(row_bytes, 0) == losses.CHUNK_ROWS_MIN
    assert losses.chunk_rows_for_memory(64, 2**40) == losses.CHUNK_ROWS_MAX  # a tiny vocabulary
    # CPU keeps the fixed rule: one ~128 MB float32 buffer, whatever the memory
    assert losses.auto_chunk_size(vocab) == losses.auto_chunk_size(vocab, device="cpu", row_bytes=row_bytes)
    assert losses.auto_chunk_size(vocab) * 4 * vocab <= losses.CPU_CHUNK_BUFFER_BYTES


def test_native_matmul_probe(monkeypatch):
    """The CUDA probe's check, run on CPU: it accepts a float32 result and refuses a missing kernel or a product
    rounded to bf16 on the way."""
    cpu = torch.device("cpu")
    assert not losses._native_mixed_matmul(cpu, BF16)  # never tried off CUDA
    addmm = torch.addmm

    def missing(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::addmm.dtype_out' with arguments from the 'CPU' backend")

    def exact(input, mat1, mat2, *, beta=1, alpha=1, out=None, out_dtype=None):
        return addmm(input, mat1.float(), mat2.float(), beta=beta, alpha=alpha, out=out)

    def rounded(input, mat1, mat2, *, beta=1, alpha=1, out=None, out_dtype=None):
        return out.copy_(beta * input + alpha * (mat1 @ mat2).float())

    for dtype in (BF16, FP16):
        monkeypatch.setattr(torch, "addmm", exact)
        assert losses._mixed_addmm_works(cpu, dtype)
        monkeypatch.setattr(torch, "addmm", rounded)
        assert not losses._mixed_addmm_works(cpu, dtype)
        monkeypatch.setattr(torch, "addmm", missing)
        assert not losses._mixed_addmm_works(cpu, dtype)


def test_compute_dtype_rule():
    f32, bf = torch.zeros(2, 2), torch.zeros(2, 2, dtype=BF16)
    assert losses.head_compute_dtype(f32, f32) == torch.float32
    assert losses.head_compute_dtype(f32.double(), f32.double()) == torch.float64
    assert losses.head_compute_dtype(bf, f32) == BF16  # bf16 hidden states, float32 master head
    assert losses.head_compute_dtype(f32, bf) == BF16  # a bf16 model
    assert losses.head_compute_dtype(f32, f32, FP16) == FP16
    with torch.autocast("cpu", dtype=BF16):
        assert losses.head_compute_dtype(f32, f32) == BF16
