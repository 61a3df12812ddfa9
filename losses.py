"""The chunked distillation loss: `fused_head_loss` projects hidden states through the output heads chunk by chunk
over positions and computes alpha * CE + (1 - alpha) * T^2 * D_beta with its gradients in closed form, so that
[tokens, vocab] logits never exist for a whole batch; and where it runs (the compute dtype of its matmuls, the
rows per chunk a device's memory allows). The divergence itself, on logits, is `common.generalized_jsd_per_position`;
tests/reference.py holds the materialized references this is checked against.
"""

from __future__ import annotations

import torch

from common import DistillError


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[i, v] * b[i, v] for each row, without a [C, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _chunk_loss_and_grad(logits, teacher_logits, targets, alpha: float, beta: float, temperature: float,
                         pool: list[torch.Tensor], *, grad_out: torch.Tensor | None = None,
                         teacher_scaled: bool = False, clamp: bool = True):
    """CE and T^2 * D_beta summed over one chunk's positions, and d(alpha*CE + (1-alpha)*T^2*D)/d logits.

    Closed-form gradients, with u = z / T, q = softmax(u), s = log q, p = softmax(teacher / T), t = log p:
      CE:                d/dz = softmax(z) - onehot(target)
      forward (beta=0):  dD/du = q - p
      reverse (beta=1):  dD/du = q * (s - t - KL(q||p))
      interior:          dD/du = (1 - beta) * q * (s - log m - KL(q||m)),  m = beta*p + (1-beta)*q
    (in the interior JSD the p-terms cancel because beta*p + (1-beta)*q = m), and d(T^2 D)/dz = T * dD/du.

    `logits` and `teacher_logits` are consumed; `pool` holds preallocated free [C, V] buffers (see
    `_spare_buffers`). Every [C, V] result is written into a pooled buffer and every consumed input goes back to
    the pool, so a chunk allocates nothing of vocabulary size (on CPU, fresh memory is page-faulted each time).
    Log-probabilities are clamped to the dtype's finite minimum so that 0 * log 0 gives 0.

    `grad_out` (the low-precision path of `fused_head_loss`): a [C, V] buffer in the compute dtype that receives the
    gradient, rounded once by the last operation that forms it (no separate cast pass); every float32 buffer,
    the inputs included, is free again when this returns. `teacher_scaled`: `teacher_logits` already hold
    teacher / T (the projection folded 1/T into its matmul). `clamp=False`: the caller knows every logit is
    finite, so every log-probability is too and the clamps would change nothing (two passes fewer). With the
    defaults, the operations are the float32/64 path's, one for one (a multiplication by exactly 1 is skipped:
    it changes no bit).
    """
    tiny = torch.finfo(logits.dtype).min

    def log_softmax(x, scale):  # into a pooled buffer; x goes back to the pool
        out = torch.log_softmax(x.div_(scale) if scale != 1 else x, dim=-1, out=pool.pop())
        pool.append(x)
        return out.clamp_(min=tiny) if clamp else out

    log_q1 = torch.log_softmax(logits, dim=-1, out=pool.pop())  # at T = 1, for the CE term
    ce_sum = -log_q1.gather(1, targets[:, None]).sum()
    rows = torch.arange(len(targets), device=logits.device) if alpha > 0 else None
    grad = None
    if alpha == 1 and grad_out is not None:  # CE alone: softmax - onehot, each entry rounded once
        grad = torch.exp(log_q1, out=grad_out)
        grad[rows, targets] = (log_q1[rows, targets].exp() - 1).to(grad.dtype)
        return ce_sum, torch.zeros_like(ce_sum), grad
    if alpha > 0:
        grad = log_q1.exp_()
        if alpha != 1:
            grad.mul_(alpha)  # alpha * (softmax(z) - onehot)
        grad[rows, targets] -= alpha
        if alpha == 1:
            return ce_sum, torch.zeros_like(ce_sum), grad
        s = log_softmax(logits, temperature)
    elif temperature == 1:
        s = log_q1.clamp_(min=tiny) if clamp else log_q1
        pool.append(logits)
    else:
        pool.append(log_q1)
        s = log_softmax(logits, temperature)  # log q
    t = log_softmax(teacher_logits, 1 if teacher_scaled else temperature)  # log p
    scale = (1 - alpha) * temperature  # d(T^2 D)/dz = T dD/du, times the divergence weight
    if beta == 0:
        p = torch.exp(t, out=pool.pop())
        div = _rowdot(p, t.sub_(s))  # KL(p || q)
        if grad is None and scale == 1 and grad_out is not None:  # q - p straight into the compute dtype
            return ce_sum, div.sum() * temperature**2, torch.sub(s.exp_(), p, out=grad_out)
        div_grad = s.exp_().sub_(p)  # q - p
    elif beta == 1:
        q = torch.exp(s, out=pool.pop())
        d = s.sub_(t)  # s - t
        div = _rowdot(q, d)  # KL(q || p)
        div_grad = d.sub_(div[:, None]).mul_(q)
    else:
        p, q = torch.exp(t, out=pool.pop()), torch.exp(s, out=pool.pop())
        log_m = torch.mul(p, beta, out=pool.pop()).add_(q, alpha=1 - beta)
        log_m = log_m.clamp_(min=torch.finfo(q.dtype).tiny).log_()
        kl_pm = _rowdot(p, t.sub_(log_m))  # KL(p || m)
        d = s.sub_(log_m)  # s - log m
        kl_qm = _rowdot(q, d)  # KL(q || m)
        div = beta * kl_pm + (1 - beta) * kl_qm
        div_grad = d.sub_(kl_qm[:, None]).mul_(q).mul_(1 - beta)
    if grad is not None:
        grad = grad.add_(div_grad, alpha=scale) if grad_out is None else torch.add(grad, div_grad, alpha=scale,
                                                                                     out=grad_out)
    elif grad_out is not None:
        grad = torch.mul(div_grad, scale, out=grad_out) if scale != 1 else grad_out.copy_(div_grad)
    else:
        grad = div_grad.mul_(scale) if scale != 1 else div_grad
    return ce_sum, div.sum() * temperature**2, grad


def _spare_buffers(alpha: float, beta: float) -> int:
    """[C, V] buffers `_chunk_loss_and_grad` needs in its pool, besides the student's and teacher's logits."""
    if alpha == 1:
        return 1
    return 1 + (alpha > 0) + (0 if beta in (0, 1) else 2)


def _project(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """out = hidden @ weight.T, in the weight's dtype, written into a float32/float64 buffer."""
    hidden = hidden.to(weight.dtype)
    if weight.dtype == out.dtype:
        torch.matmul(hidden, weight.T, out=out)
    else:  # a bf16/fp16 head: the product is rounded to its dtype, then widened for the softmax math
        out.copy_(hidden @ weight.T)


LOW_PRECISION = (torch.bfloat16, torch.float16)
GRAD_BLOCK_CHUNKS = 4  # chunks whose bf16 gradients share one head-gradient matmul (see _fused_head_forward)
_NATIVE_MIXED_MM: dict = {}  # (device, dtype) -> bool, probed once per process


def _native_mixed_matmul(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)` multiplies `dtype` (bf16/fp16) operands
    straight into a float32 `acc` on this device: tensor-core speed, products summed in float32, and no rounding
    of the result to `dtype` (Blas.cpp's `_addmm_dtype_out_cuda`, CUDA since torch 2.8, the form TRL 1.16's
    chunked loss uses). torch 2.13's CPU build has the overload but no CPU kernel, and older CUDA builds reject a
    float32 `acc` with bf16 operands, so CUDA devices are probed once per process (`_mixed_addmm_works`)."""
    key = (device, dtype)
    if key not in _NATIVE_MIXED_MM:
        _NATIVE_MIXED_MM[key] = device.type == "cuda" and _mixed_addmm_works(device, dtype)
    return _NATIVE_MIXED_MM[key]


def _mixed_addmm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Try `_mixed_mm`'s call on `device` and check the result: (1 + 2^-7)^2 = 1 + 2^-6 + 2^-14 is exact in
    float32 and not in bf16/fp16, so a product rounded to `dtype` on the way fails the check. Autocast is off for
    the try: it would cast `acc` to bf16 and so turn a supported call into a refused one."""
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            x = torch.full((2, 1), 1 + 2**-7, dtype=dtype, device=device)  # exact in bf16 and fp16
            acc = torch.full((2, 2), 7.0, device=device)
            torch.addmm(acc, x, x.T, beta=0, out_dtype=torch.float32, out=acc)  # beta = 0: overwritten
            torch.addmm(acc, x, x.T, alpha=0.5, out_dtype=torch.float32, out=acc)  # accumulated
            return bool((acc == 1.5 * (1 + 2**-7) ** 2).all())
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _mixed_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0, beta: float = 0.0):
    """out = beta * out + alpha * (a @ b) with float32 (out's dtype) products and sums; a, b in out's dtype or in
    a compute dtype that `_native_mixed_matmul` accepts. beta = 0 ignores out's old contents (NaN included)."""
    if a.dtype == out.dtype:
        torch.addmm(out, a, b, beta=beta, alpha=alpha, out=out)
    else:
        torch.addmm(out, a, b, beta=beta, alpha=alpha, out_dtype=out.dtype, out=out)


def head_compute_dtype(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                       compute_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype the head matmuls of `fused_head_loss` round their operands to: bf16/fp16 selects the
    low-precision path, anything else the float32/float64 path (each head in its own dtype, as before).

    In order: `compute_dtype` when given (the training scripts pass bfloat16 under --bf16); the autocast dtype
    when autocast is on for the hidden states' device (accelerate autocasts only the model's forward, so a
    caller wanting it around the loss says so); the hidden states' dtype when it is bf16/fp16 (a float32 master
    head under autocast); the head's dtype when it is (a bf16 model); else the promoted float type.
    """
    if compute_dtype is not None:
        return compute_dtype
    device_type = student_hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    for dtype in (student_hidden.dtype, student_weight.dtype):
        if dtype in LOW_PRECISION:
            return dtype
    return torch.promote_types(student_hidden.dtype, student_weight.dtype)


def _fused_head_forward(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, num_tokens,
                        alpha, beta, temperature, chunk_size, vocab, compute_dtype, *, need_hidden: bool,
                        need_weight: bool):
    """The chunk loop of `fused_head_loss`: (loss, ce_sum, div_sum, grad_hidden, grad_weight, grad_divisor), each
    gradient None when not needed and to be divided by `grad_divisor`. Without gradients (held-out evaluation)
    the two gradient matmuls per chunk and the head-sized gradient buffer are skipped; the values are computed
    exactly as with them.

    float32/float64 path (`compute_dtype` not bf16/fp16): each head's product in that head's dtype, the
    gradients divided by num_tokens chunk by chunk (grad_divisor 1), exactly as before this path had a sibling.

    Low-precision path (`compute_dtype` bf16/fp16): hidden states and head weights are rounded to the compute
    dtype once per call (a [V, H] copy of a float32 master head), and all four matmuls of a chunk (student and
    teacher logits, gradient w.r.t. hidden states and w.r.t. the head) take compute-dtype operands with float32
    products and sums: on CUDA with torch >= 2.8 through `torch.addmm(..., out_dtype=torch.float32)`, so the
    logits are never rounded to bf16 and the head gradient is accumulated over chunks in float32; elsewhere
    (CPU, older torch) the rounded operands are widened back to float32 and multiplied in float32 - the same
    numbers up to summation order, at float32 speed (TRL 1.16's chunked loss falls back the same way). The
    softmax and divergence math stays float32. Fewer passes over [C, V] per chunk than the float32 path (at the
    op level, 13.5 float32-buffer reads and writes instead of 25.5 for forward KL at T = 1): the chunk's gradient
    is rounded to the compute dtype by the operation that forms it, the division by num_tokens is left to
    backward's multiplication by the upstream gradient (grad_divisor = num_tokens), 1/T is folded into the
    teacher's matmul, and the log-probabilities are clamped only when an operand is not finite. No host sync
    inside the loop (one before it, for that finiteness check). Natively, GRAD_BLOCK_CHUNKS chunks' bf16
    gradients are kept and multiplied into the head's float32 gradient at once (contracting a block's rows),
    because that [V, H] accumulator is read and written whole by every such matmul.
    """
    n, device = student_hidden.shape[0], student_hidden.device
    acc = torch.promote_types(student_hidden.dtype, torch.float32)  # fp32 math for bf16 models, fp64 in tests
    low = compute_dtype in LOW_PRECISION
    grad_hidden = torch.empty(student_hidden.shape, dtype=acc, device=device) if need_hidden else None
    grad_weight = torch.zeros(student_weight.shape, dtype=acc, device=device) if need_weight else None
    n_buffers = 1 + (alpha < 1) + _spare_buffers(alpha, beta)
    if low:
        native = acc == torch.float32 and _native_mixed_matmul(device, compute_dtype)

        def operand(x):  # rounded to the compute dtype; widened back where the matmuls are float32
            x = x.to(compute_dtype)
            return x if native else x.to(acc)

        w, hs = operand(student_weight[:vocab]), operand(student_hidden)
        wt, ht = (operand(teacher_weight[:vocab]), operand(teacher_hidden)) if alpha < 1 else (None, None)
        # Finite operands give finite logits (short of overflowing float32), so the log-probabilities need no
        # clamping unless a head holds -inf (a teacher's banned token): one check and one sync per call, in
        # place of two passes over [C, V] per chunk. aminmax propagates NaN and allocates nothing head-sized.
        extremes = torch.cat([torch.stack(torch.aminmax(x)) for x in (w, hs, wt, ht) if x is not None and x.numel()])
        clamp = not bool(torch.isfinite(extremes).all())
        # Natively, the chunks' rounded gradients are kept for GRAD_BLOCK_CHUNKS chunks and multiplied into the
        # head's gradient together: its float32 [V, H] is read and written once per block, not once per chunk.
        block_chunks = GRAD_BLOCK_CHUNKS if native and need_weight else 1
        row_bytes = vocab * (n_buffers * acc.itemsize + block_chunks * compute_dtype.itemsize)
    else:
        w = student_weight[:vocab]
        row_bytes = vocab * n_buffers * acc.itemsize
    chunk_size = chunk_size or auto_chunk_size(vocab, device=device, row_bytes=row_bytes)
    rows = min(chunk_size, n)
    # Allocated once and reused by every chunk: [rows, vocab] each.
    buffers = [torch.empty(rows, vocab, dtype=acc, device=device) for _ in range(n_buffers)]
    grad_buffer = (torch.empty(min(block_chunks * chunk_size, n), vocab, dtype=compute_dtype, device=device)
                   if low else None)  # [block rows, vocab]
    block_lo = 0  # the first position whose gradient rows grad_buffer holds
    ce_sum = torch.zeros((), dtype=acc, device=device)
    div_sum = torch.zeros_like(ce_sum)
    # Autocast (--bf16) would rewrite the matmuls below and reject their out= buffers; precision is explicit.
    with torch.autocast(device_type=device.type, enabled=False):
        for lo in range(0, n, chunk_size):
            hi = min(lo + chunk_size, n)
            logits, teacher_logits, *spare = (buf[:hi - lo] for buf in buffers)
            if not low:
                h = student_hidden[lo:hi].to(w.dtype)
                _project(h, w, out=logits)
                if alpha < 1:
                    _project(teacher_hidden[lo:hi], teacher_weight[:vocab], out=teacher_logits)
                else:
                    spare.append(teacher_logits)
                ce, div, grad_logits = _chunk_loss_and_grad(logits, teacher_logits, targets[lo:hi], alpha, beta,
                                                             temperature, spare)
                if need_hidden or need_weight:
                    grad_logits = grad_logits.div_(num_tokens)
                if need_hidden:
                    grad_hidden[lo:hi] = grad_logits.to(w.dtype) @ w
                if need_weight:
                    grad_weight[:vocab].addmm_(grad_logits.T, h.to(acc))
            else:
                _mixed_mm(logits, hs[lo:hi], w.T)
                if alpha < 1:  # 1/T folded into the teacher's matmul: one pass over [C, V] fewer
                    _mixed_mm(teacher_logits, ht[lo:hi], wt.T, alpha=1 / temperature)
                else:
                    spare.append(teacher_logits)
                ce, div, grad_logits = _chunk_loss_and_grad(
                    logits, teacher_logits, targets[lo:hi], alpha, beta, temperature, spare,
                    grad_out=grad_buffer[lo - block_lo:hi - block_lo], teacher_scaled=True, clamp=clamp)
                if not native and (need_hidden or need_weight):
                    grad_logits = logits.copy_(grad_logits)  # the rounded gradient, widened (logits is free now)
                if need_hidden:
                    _mixed_mm(grad_hidden[lo:hi], grad_logits, w)
                if hi - block_lo == grad_buffer.shape[0] or hi == n:  # a full block, or the last
                    if need_weight:
                        block = grad_buffer[:hi - block_lo] if native else grad_logits
                        _mixed_mm(grad_weight[:vocab], block.T, hs[block_lo:hi], beta=1.0)
                    block_lo = hi
            ce_sum += ce
            div_sum += div
    del buffers, grad_buffer
    loss = (alpha * ce_sum + (1 - alpha) * div_sum) / num_tokens
    return loss, ce_sum, div_sum, grad_hidden, grad_weight, num_tokens if low else 1


class _FusedHeadLoss(torch.autograd.Function):
    """Project hidden states to logits and compute the loss chunk by chunk, with gradients taken in forward.

    Each chunk's [C, V] logits exist only while that chunk is processed; the gradients w.r.t. the hidden states and
    the head weight are accumulated during the forward pass (closed form, see `_chunk_loss_and_grad`), so backward
    is a multiplication by the incoming scalar and nothing is recomputed (cf. Liger-Kernel's fused linear losses).
    """

    @staticmethod
    def forward(ctx, *inputs):
        loss, ce_sum, div_sum, grad_hidden, grad_weight, ctx.grad_divisor = _fused_head_forward(
            *inputs, need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype, ctx.weight_dtype = inputs[0].dtype, inputs[1].dtype
        ctx.mark_non_differentiable(ce_sum, div_sum)
        return loss, ce_sum, div_sum

    @staticmethod
    def backward(ctx, grad_loss, _ce, _soft):
        # In place: a second head-sized copy would double the largest buffer (the graph is used once).
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss if ctx.grad_divisor == 1 else grad_loss / ctx.grad_divisor
        gh = grad_hidden.mul_(scale).to(ctx.hidden_dtype) if grad_hidden is not None else None
        gw = grad_weight.mul_(scale).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None, None, None, None, None, None, None


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole [V, H] output-head weight, checked before the chunked losses read it directly.

    Plain and DDP: the parameter. FSDP2: the root module's parameters (lm_head, tied embeddings) stay gathered
    from the root's forward until its backward, so right after `student_hidden_states` this is a full tensor and
    FSDP reduce-scatters its gradient (tests/test_distributed.py checks every gradient against one process).
    A weight still sharded at that point (a DTensor: lm_head wrapped on its own, or the root resharded) or an
    empty placeholder (DeepSpeed ZeRO-3, FSDP1 flat parameters) would need a gather whose backward fights the
    engine's own hooks: refused with the way out, not guessed at.
    """
    sharded = weight.dim() != 2 or weight.numel() == 0
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        sharded = sharded or isinstance(weight, DTensor)
    if sharded:
        raise DistillError(f"the output head's weight is sharded when the loss reads it ({type(weight).__name__}, "
                           f"shape {tuple(weight.shape)}): DeepSpeed ZeRO-3, FSDP1 and an lm_head wrapped apart from "
                           "the root are not supported by the chunked losses; use configs/fsdp.yaml (FSDP2, "
                           "transformer-layer wrapping) or configs/deepspeed_zero2.yaml")
    return weight


CPU_CHUNK_BUFFER_BYTES = 128 * 2**20  # one [chunk, vocab] float32 buffer on CPU
CUDA_CHUNK_BUDGET_BYTES = 2**30  # all of a chunk's buffers on a GPU: the size of TRL 1.16's two [4096, 32768] tiles
CHUNK_ROWS_MULTIPLE, CHUNK_ROWS_MIN, CHUNK_ROWS_MAX = 64, 256, 8192


def chunk_rows_for_memory(row_bytes: int, free_bytes: int) -> int:
    """Positions per chunk on a GPU: the most rows whose buffers (`row_bytes` per row: all of a chunk's [rows, V]
    buffers together, a gradient block included) fit in a quarter of `free_bytes` and in
    `CUDA_CHUNK_BUDGET_BYTES`, rounded down to a multiple of 64 (whole tensor-core tiles in the logits and
    gradient matmuls) and kept within 256..8192.

    Why larger chunks than on CPU: every chunk's matmuls read the whole [V, H] head, and every head-gradient
    matmul reads and writes the float32 [V, H] accumulator whole (at 151,936 x 3,584, 4.4 GB, ~0.9 ms at an
    H200's ~4.8 TB/s), so fewer chunks pay those fixed costs fewer times; below ~170 rows a bf16 logits matmul
    takes longer to read the head than to multiply (2 * rows * V * H flops at ~800 TFLOP/s against 2 * V * H
    bytes), hence at least 256.
    Why bounded: the buffers live only during the loss, but they compete with what backward still needs; a
    quarter of what is free leaves room for the rest of the step, and the cap holds the loss's working set to
    the size of TRL 1.16's chunked loss's, so that the two are timed at equal memory. 8192 rows bounds the
    chunk at small vocabularies.
    """
    budget = min(max(free_bytes, 0) // 4, CUDA_CHUNK_BUDGET_BYTES)
    rows = budget // max(row_bytes, 1) // CHUNK_ROWS_MULTIPLE * CHUNK_ROWS_MULTIPLE
    return min(max(rows, CHUNK_ROWS_MIN), CHUNK_ROWS_MAX)


def auto_chunk_size(vocab: int, *, device: torch.device | str | None = None, row_bytes: int | None = None) -> int:
    """Positions per chunk of the chunked losses (`--chunk-size 0`).

    On CPU (and with no device given): one [chunk, vocab] float32 buffer of ~128 MB (~220 rows at Qwen's
    151,936): large enough for efficient matmuls, small enough that the 3-5 buffers of a chunk stay far below a
    materialized [tokens, vocab] loss, and a fixed size keeps a run's chunking, and so its floating-point sums,
    the same from run to run. On CUDA: `chunk_rows_for_memory` of the memory free now (the driver's free memory
    plus the allocator's cached, unused blocks), `row_bytes` being what one row of the caller's buffers takes
    (default: four float32 [vocab] rows). That follows the free memory, so two runs may chunk differently and
    differ in the last bits of the float32 sums, as GPU runs do anyway; pass --chunk-size to pin it.
    """
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return max(16, CPU_CHUNK_BUFFER_BYTES // (4 * vocab))
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return chunk_rows_for_memory(row_bytes or 16 * vocab, free)


def fused_head_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, targets: torch.Tensor,
                    num_tokens, *, teacher_hidden: torch.Tensor | None = None,
                    teacher_weight: torch.Tensor | None = None, alpha: float = 1.0, beta: float = 0.0,
                    temperature: float = 1.0, chunk_size: int = 0, vocab: int | None = None,
                    compute_dtype: torch.dtype | None = None):
    """alpha * CE + (1 - alpha) * T^2 * D_beta(teacher, student), summed over positions / num_tokens.

    Same value and gradients as alpha * CE + (1 - alpha) * T^2 * D_beta on materialized [N, V] logits
    (tests/reference.py), but computed from hidden states in chunks of `chunk_size` positions (0 =
    `auto_chunk_size`, sized from the free memory on a GPU), so peak extra memory is a few [chunk_size, vocab]
    buffers plus one head-sized gradient instead of several [N, vocab] copies.

    Precision (`head_compute_dtype`): in bf16/fp16 - `compute_dtype` given (the scripts pass bfloat16 under
    --bf16), autocast on, or bf16/fp16 hidden states or head - the four head matmuls of a chunk take operands
    rounded to that dtype with float32 products and sums, like autocast's lm_head but without rounding the logits
    (see `_fused_head_forward`); softmax, divergence and both gradients' accumulation stay float32, and a float32
    master head gets a float32 gradient. Measured on CPU against the float64 formula (tests/test_loss_bf16.py):
    exactly the loss of the bf16-rounded operands up to float32 summation, about 2^-8 relative from the
    unrounded one. Otherwise float32/float64 throughout (each head's product in its own dtype), as before.

    student_hidden [N, H] (only masked positions), student_weight [V_s, H] (lm_head.weight), targets [N],
    teacher_hidden [N, H_t], teacher_weight [V_t, H_t]; `vocab` is the shared real vocabulary (logits beyond it,
    e.g. padded head rows, are ignored). Returns (loss, ce_sum, div_sum): the last two detached sums for logging.
    """
    if alpha < 1 and (teacher_hidden is None or teacher_weight is None):
        raise ValueError("alpha < 1 needs teacher_hidden and teacher_weight")
    student_weight = full_weight(student_weight)
    vocab = vocab or student_weight.shape[0]
    compute_dtype = head_compute_dtype(student_hidden, student_weight, compute_dtype)
    if teacher_hidden is None:
        teacher_hidden = teacher_weight = student_hidden.new_zeros(0)
    else:
        teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    num_tokens = max(float(num_tokens), 1.0)
    inputs = (student_hidden, student_weight, teacher_hidden, teacher_weight, targets, num_tokens, alpha, beta,
              temperature, chunk_size, vocab, compute_dtype)
    if torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad):
        return _FusedHeadLoss.apply(*inputs)
    # Under no_grad autograd still reports needs_input_grad = True, so the Function would fill its gradients anyway.
    loss, ce_sum, div_sum, *_ = _fused_head_forward(*inputs, need_hidden=False, need_weight=False)
    return loss, ce_sum, div_sum
