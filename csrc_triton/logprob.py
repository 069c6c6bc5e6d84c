"""Token log-probs from logits: online log-sum-exp over vocab blocks + label gather (+ entropy), and the backward
that writes dlogits (in place by default).

Maths, for one token row x = logits[t] / temperature (fp32 accumulation, any V):
    lse   = log sum_j exp(x_j)                        (online: running max m, per-lane sums s_j = exp(x_j - m))
    logp  = x[label] - lse                            (gathered in the same sweep: no extra read)
    H     = lse - sum_j p_j x_j                        (per-lane a_j = exp(x_j - m) x_j, with 0 * -inf = 0)
    dx_j  = g (onehot_j - p_j) - g_ent p_j (log p_j + H),   dlogits = dx / temperature
g = dL/dlogp comes from the loss head (the only loss-specific part); g_ent = dL/dH is optional. Vocab-masked
entries (x_j = -inf) have p_j = 0 and contribute exactly 0 to H and to every gradient (0 * log 0 = 0).

Dead rows: a row is dead when its label is -100 (the Hugging Face ignore index) or, when the caller passes a
row mask (the loss's mask), where that mask is 0. Dead rows are never read: the forward writes logp = lse =
entropy = 0 and the backward writes zeros into their dlogits row. The backward also skips the read of a live row
whose gradient coefficients are exactly zero (g == 0 and no entropy gradient: PPO-clipped tokens without a KL
term), since its dlogits row is exactly zero. An out-of-range label that is not -100 (possible only with value
checks off) is never dereferenced: its logp is NaN.

Bytes per row of V logits of b bytes (counted through the interpreter by benches/interp_bytes.py):
    live row:  forward reads V*b, backward reads V*b and writes V*b    (2 reads + 1 write)
    dead row:  forward reads nothing, backward writes V*b               (1 write, never read)
    zero-g row: forward reads V*b, backward writes V*b                  (1 read + 1 write)
Per block of BLOCK_V columns the forward does one cross-lane reduction (the block max); the sums stay per lane
and are reduced once per row. Loops are software-pipelined with tl.range(num_stages=...) on the GPU.

Shapes: logits [T, V] (bf16/fp16/fp32, any strides: both are passed to the kernels), labels [T] int. Outputs fp32
[T]. Grid: one program per token over the flattened tokens (T may exceed 65,535); offsets in int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100


@triton.jit
def _row_is_dead(labels_ptr, live_ptr, row, V, HAS_LIVE: tl.constexpr):
    """(dead, label, label_in_range) of one row: dead when label == -100 or the caller's row mask is 0."""
    label = tl.load(labels_ptr + row).to(tl.int64)
    dead = label == -100
    if HAS_LIVE:
        dead = dead | (tl.load(live_ptr + row) == 0)
    in_range = (label >= 0) & (label < V)
    return dead, label, in_range


@triton.jit
def _logprob_fwd_kernel(
    # pointers
    logits_ptr,
    labels_ptr,
    live_ptr,
    logp_ptr,
    lse_ptr,
    entropy_ptr,
    # strides, sizes
    stride_t,
    stride_v,
    V,
    # scalars
    inv_temperature,
    # constants
    HAS_LIVE: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dead, label, in_range = _row_is_dead(labels_ptr, live_ptr, row, V, HAS_LIVE)
    if dead:  # never read
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if RETURN_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        return
    row_ptr = logits_ptr + row * stride_t
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)  # per-lane sum of exp(x - m)
    a = tl.zeros((BLOCK_V,), tl.float32)  # per-lane sum of exp(x - m) * x (entropy)
    xl = tl.zeros((BLOCK_V,), tl.float32)  # the label's logit, gathered in the sweep
    for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
        cols = start + offs
        valid = cols < V
        x = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=valid, other=float("-inf")).to(tl.float32)
        x = x * inv_temperature
        m_new = tl.maximum(m, tl.max(x, 0))  # the one cross-lane reduction of the block
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exps are 0, not NaN
        scale = tl.exp(m - m_ref)
        e = tl.exp(x - m_ref)  # 0 on padded and vocab-masked lanes
        s = s * scale + e
        if RETURN_ENTROPY:
            a = a * scale + e * tl.where(e > 0.0, x, 0.0)  # 0 * -inf = 0 (and no NaN is ever formed)
        xl += tl.where(cols == label, x, 0.0)
        m = m_new
    sum_e = tl.sum(s, 0)
    lse = m + tl.log(sum_e)
    x_label = tl.where(in_range, tl.sum(xl, 0), float("nan"))  # out-of-range label: NaN, never dereferenced
    tl.store(logp_ptr + row, x_label - lse)
    tl.store(lse_ptr + row, lse)
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, lse - tl.sum(a, 0) / sum_e)


@triton.jit
def _logprob_bwd_kernel(
    # pointers
    logits_ptr,
    dlogits_ptr,
    labels_ptr,
    live_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    lse_ptr,
    entropy_ptr,
    # strides, sizes
    stride_t,
    stride_v,
    stride_dt,
    stride_dv,
    V,
    # scalars
    inv_temperature,
    # constants
    HAS_LIVE: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dead, label, in_range = _row_is_dead(labels_ptr, live_ptr, row, V, HAS_LIVE)
    drow_ptr = dlogits_ptr + row * stride_dt
    offs = tl.arange(0, BLOCK_V)
    g = tl.load(grad_logp_ptr + row).to(tl.float32)
    zero_coef = g == 0.0
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + row).to(tl.float32)
        zero_coef = zero_coef & (g_ent == 0.0)
    if dead | zero_coef:  # the gradient row is exactly zero: write it, never read the logits
        zeros = tl.zeros((BLOCK_V,), dlogits_ptr.dtype.element_ty)
        for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
            cols = start + offs
            tl.store(drow_ptr + cols.to(tl.int64) * stride_dv, zeros, mask=cols < V)
        return
    row_ptr = logits_ptr + row * stride_t
    lse = tl.load(lse_ptr + row)
    if HAS_GRAD_ENTROPY:
        ent = tl.load(entropy_ptr + row)
    for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
        cols = start + offs
        valid = cols < V
        cols64 = cols.to(tl.int64)
        x = tl.load(row_ptr + cols64 * stride_v, mask=valid, other=float("-inf")).to(tl.float32) * inv_temperature
        log_p = x - lse
        p = tl.exp(log_p)
        dx = tl.where(cols == label, g, 0.0) - g * p
        if HAS_GRAD_ENTROPY:
            dx -= g_ent * p * tl.where(p > 0.0, log_p + ent, 0.0)  # 0 * log 0 = 0 on vocab-masked lanes
        # in place: each element is read before it is written by the same program, so aliasing is safe
        tl.store(drow_ptr + cols64 * stride_dv, (dx * inv_temperature).to(dlogits_ptr.dtype.element_ty), mask=valid)


# (max V, BLOCK_V, num_warps, num_stages) per element size on CUDA, first match wins. Not yet timed on a GPU: the
# shape follows the memory-bound rule of thumb (>= 8 KiB per load in flight per program, 2 stages in flight).
# AOT-compiled on CPU with Triton 3.9's ptxas for sm_80 and sm_90, every entry, entropy on and off: 0 spills, at
# most 116 registers/thread, <= 8.2 KB shared memory (Triton pipelines the fp32 loads with cp.async; it leaves the
# bf16/fp16 loads unpipelined at these block sizes).
_CUDA_TABLE = {
    2: ((1024, 1024, 4, 1), (4096, 2048, 8, 2), (1 << 62, 4096, 8, 2)),
    4: ((1024, 1024, 4, 1), (4096, 2048, 8, 2), (1 << 62, 2048, 8, 2)),
}


def launch_config(V: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_V, num_warps, num_stages) for a row of V logits of `dtype` on `device`. Under the interpreter small
    blocks (<= 256) keep several blocks per row in the CPU tests, so the multi-block paths are always exercised."""
    if device.type != "cuda":
        return min(256, triton.next_power_of_2(V)), 1, 1
    size = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    for max_v, block, warps, stages in _CUDA_TABLE[size]:
        if V <= max_v:
            return min(block, triton.next_power_of_2(V)), warps, stages
    raise AssertionError("unreachable")


def _live_arg(live: torch.Tensor | None, labels: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if live is None:
        return labels, False
    if live.dtype == torch.bool:
        live = live.view(torch.uint8)
    return live.contiguous(), True


def logprob_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    return_entropy: bool,
    live: torch.Tensor | None = None,
):
    """Launch the forward. `live` (optional [T] bool/int) is the caller's row mask: rows where it is 0, and rows
    labelled -100, are dead (never read, outputs 0). Returns (logp, lse, entropy or None), fp32 [T]."""
    T, V = logits.shape
    labels = labels.contiguous()
    live_t, has_live = _live_arg(live, labels)
    logp = torch.empty(T, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if return_entropy else logp  # dummy pointer when unused
    block_v, num_warps, num_stages = launch_config(V, logits.dtype, logits.device)
    _logprob_fwd_kernel[(T,)](
        logits, labels, live_t, logp, lse, entropy,
        logits.stride(0), logits.stride(1), V,
        1.0 / temperature,
        HAS_LIVE=has_live, RETURN_ENTROPY=return_entropy, BLOCK_V=block_v, NUM_STAGES=num_stages,
        num_warps=num_warps,
    )  # fmt: skip
    return logp, lse, (entropy if return_entropy else None)


def can_write_in_place(logits: torch.Tensor) -> bool:
    """True when every logical element of `logits` has its own memory location (any strides, no overlap), so the
    backward may overwrite it with its gradient. Expanded or otherwise self-overlapping views are not."""
    return torch._debug_has_internal_overlap(logits) == 0


def logprob_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    temperature: float,
    *,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    live: torch.Tensor | None = None,
    inplace: bool = True,
) -> torch.Tensor:
    """Launch the backward; returns dlogits: the logits tensor itself (same strides, same elements) when inplace
    and the view does not overlap itself, else a fresh contiguous tensor. Dead rows (see logprob_forward, same
    `live`) get exact zeros without being read."""
    T, V = logits.shape
    labels = labels.contiguous()
    live_t, has_live = _live_arg(live, labels)
    inplace = inplace and can_write_in_place(logits)
    dlogits = logits if inplace else torch.empty(T, V, dtype=logits.dtype, device=logits.device)
    grad_logp = grad_logp.contiguous()
    has_ent = grad_entropy is not None
    block_v, num_warps, num_stages = launch_config(V, logits.dtype, logits.device)
    _logprob_bwd_kernel[(T,)](
        logits, dlogits, labels, live_t, grad_logp,
        grad_entropy.contiguous() if has_ent else grad_logp, lse, entropy if has_ent else lse,
        logits.stride(0), logits.stride(1), dlogits.stride(0), dlogits.stride(1), V,
        1.0 / temperature,
        HAS_LIVE=has_live, HAS_GRAD_ENTROPY=has_ent, BLOCK_V=block_v, NUM_STAGES=num_stages,
        num_warps=num_warps,
    )  # fmt: skip
    return dlogits
