"""Token log-probs from logits: online log-sum-exp over vocab blocks + label gather (+ entropy), and the backward
that writes dlogits (in place by default).

Maths, for one token row x = logits[t] / temperature (fp32 accumulation, any V):
    lse   = log sum_j exp(x_j)                        (online: running max m, running sum s = sum exp(x_j - m))
    logp  = x[label] - lse
    H     = lse - sum_j p_j x_j                        (running a = sum exp(x_j - m) x_j, rescaled with s)
    dx_j  = g (onehot_j - p_j) - g_ent p_j (log p_j + H),   dlogits = dx / temperature
g = dL/dlogp comes from the loss head (the only loss-specific part); g_ent = dL/dH is optional.

Shapes: logits [T, V] (bf16/fp16/fp32, row stride may exceed V), labels [T] int. Outputs fp32 [T].
Bytes: forward reads T*V*b (+ O(T)); backward reads T*V*b and writes T*V*b: 3 passes over the logits in all.
Grid: one program per token over the flattened tokens (T may exceed 65,535); row offsets in int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _logprob_fwd_kernel(
    # pointers
    logits_ptr,
    labels_ptr,
    logp_ptr,
    lse_ptr,
    entropy_ptr,
    # strides, sizes
    stride_t,
    V,
    # scalars
    inv_temperature,
    # constants
    RETURN_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_t
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    # ---- online log-sum-exp (and sum of exp(x) * x for the entropy)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        valid = cols < V
        x = tl.load(row_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(x, 0))
        scale = tl.exp(m - m_new)
        e = tl.exp(x - m_new)  # exp(-inf) = 0 on padded lanes
        s = s * scale + tl.sum(e, 0)
        if RETURN_ENTROPY:
            a = a * scale + tl.sum(e * tl.where(valid, x, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    label = tl.load(labels_ptr + row).to(tl.int64)
    x_label = tl.load(row_ptr + label).to(tl.float32) * inv_temperature
    tl.store(logp_ptr + row, x_label - lse)
    tl.store(lse_ptr + row, lse)
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, lse - a / s)


@triton.jit
def _logprob_bwd_kernel(
    # pointers
    logits_ptr,
    dlogits_ptr,
    labels_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    lse_ptr,
    entropy_ptr,
    # strides, sizes
    stride_t,
    stride_dt,
    V,
    # scalars
    inv_temperature,
    # constants
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_t
    drow_ptr = dlogits_ptr + row * stride_dt
    offs = tl.arange(0, BLOCK_V)
    g = tl.load(grad_logp_ptr + row).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    label = tl.load(labels_ptr + row).to(tl.int64)
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + row).to(tl.float32)
        ent = tl.load(entropy_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        valid = cols < V
        x = tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32) * inv_temperature
        log_p = x - lse
        p = tl.exp(log_p)
        dx = tl.where(cols == label, g, 0.0) - g * p
        if HAS_GRAD_ENTROPY:
            dx -= g_ent * p * (log_p + ent)
        # in place: each element is read before it is written by the same program, so aliasing is safe
        tl.store(drow_ptr + cols, (dx * inv_temperature).to(dlogits_ptr.dtype.element_ty), mask=valid)


def _block_v(V: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps). Small blocks under the interpreter keep CPU tests fast."""
    if device.type != "cuda":
        return min(128, triton.next_power_of_2(V)), 1
    block = min(4096, triton.next_power_of_2(V))
    return block, 8 if block >= 2048 else 4


def logprob_forward(logits: torch.Tensor, labels: torch.Tensor, temperature: float, return_entropy: bool):
    """Launch the forward. Returns (logp, lse, entropy or None), fp32 [T]."""
    T, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    logp = torch.empty(T, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if return_entropy else logp  # dummy pointer when unused
    block_v, num_warps = _block_v(V, logits.device)
    _logprob_fwd_kernel[(T,)](
        logits, labels, logp, lse, entropy,
        logits.stride(0), V,
        1.0 / temperature,
        RETURN_ENTROPY=return_entropy, BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip
    return logp, lse, (entropy if return_entropy else None)


def logprob_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    temperature: float,
    *,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    inplace: bool = True,
) -> torch.Tensor:
    """Launch the backward; returns dlogits (the logits buffer itself when inplace)."""
    T, V = logits.shape
    dlogits = logits if inplace else torch.empty_like(logits)
    grad_logp = grad_logp.contiguous()
    has_ent = grad_entropy is not None
    block_v, num_warps = _block_v(V, logits.device)
    _logprob_bwd_kernel[(T,)](
        logits, dlogits, labels, grad_logp,
        grad_entropy.contiguous() if has_ent else grad_logp, lse, entropy if has_ent else lse,
        logits.stride(0), dlogits.stride(0), V,
        1.0 / temperature,
        HAS_GRAD_ENTROPY=has_ent, BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip
    return dlogits
