"""Token log-probs through the LM head without materialising logits: GEMM tiles feed an online log-sum-exp.

Maths, per token t with hidden h_t [H] and x_tv = (h_t . W_v + b_v) / temperature:
    lse_t = log sum_v exp(x_tv),  logp_t = x_t,label - lse_t,  H_t = lse_t - sum_v p_tv x_tv
Backward from g_t = dL/dlogp_t (and g_ent_t = dL/dH_t):
    d_tv  = (g_t (onehot_tv - p_tv) - g_ent_t p_tv (log p_tv + H_t)) / temperature     (never stored)
    dh_t  = sum_v d_tv W_v,    dW_v = sum_t d_tv h_t,    db_v = sum_t d_tv

Kernels (each logits tile is [BLOCK_T, BLOCK_V], reduced over H in BLOCK_H chunks with tl.dot, fp32 accumulation):
    _fwd_kernel        grid over T-blocks: loop over V tiles, online (max, sumexp, sum p*x) and the label logit.
    _bwd_dh_kernel     grid over T-blocks: loop over V tiles, recompute the tile, form d, add d @ W_tile into the
                       program's own rows of an fp32 dh buffer.
    _bwd_dw_kernel     grid over V-blocks: loop over T tiles, recompute the tile, form d, add d^T @ h_tile into the
                       program's own rows of an fp32 dW buffer (and db).
Every output element has exactly one writing program and a fixed summation order: bit-identical runs, no atomics.

Cost: 5 GEMM-equivalents of 2*T*V*H FLOPs (forward 1; backward 2 recomputes + 2 gradient GEMMs) against the
3-GEMM floor of a materialising implementation; a no-materialisation design needs at least 4. The backward's
read-modify-write of the fp32 dh / dW rows per tile is extra traffic that has not yet been measured on a GPU.
Memory: O(T) fp32 per-token buffers, fp32 dh [T, H] and dW [V, H]; nothing of size T*V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, DOT_UPCAST: tl.constexpr):
    """acc + a @ b. DOT_UPCAST (interpreter only): the Triton interpreter's bf16/fp16 tl.dot is wrong (triton 3.9),
    so there the operands are upcast to fp32 first: exact for half inputs, so CPU tests check the same maths."""
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, rows, cols, T, V, H, stride_h, stride_w, inv_temperature,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """x[BLOCK_T, BLOCK_V] = (h[rows] @ W[cols]^T + b[cols]) / temperature in fp32; -inf outside V."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    ks = tl.arange(0, BLOCK_H)
    for k0 in range(0, H, BLOCK_H):
        k = k0 + ks
        h = tl.load(h_ptr + rows[:, None] * stride_h + k[None, :], mask=(rows[:, None] < T) & (k[None, :] < H),
                    other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + k[None, :], mask=(cols[:, None] < V) & (k[None, :] < H),
                    other=0.0)
        acc = _dot(h, tl.trans(w), acc, DOT_UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    return tl.where(cols[None, :] < V, acc * inv_temperature, float("-inf"))


@triton.jit
def _dlogits_tile(
    x, cols, labels, g, lse, g_ent, ent, V, inv_temperature, HAS_GRAD_ENTROPY: tl.constexpr,
):
    """d[BLOCK_T, BLOCK_V] = dL/dlogits (already divided by temperature); 0 outside V."""
    log_p = x - lse[:, None]
    p = tl.exp(log_p)
    d = tl.where(cols[None, :] == labels[:, None], g[:, None], 0.0) - g[:, None] * p
    if HAS_GRAD_ENTROPY:
        d -= g_ent[:, None] * p * (tl.where(cols[None, :] < V, log_p, 0.0) + ent[:, None])
    return tl.where(cols[None, :] < V, d * inv_temperature, 0.0)


@triton.jit
def _fwd_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, labels_ptr, logp_ptr, lse_ptr, entropy_ptr,
    # sizes, strides
    T, V, H, stride_h, stride_w,
    # scalars
    inv_temperature,
    # constants
    HAS_BIAS: tl.constexpr, RETURN_ENTROPY: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    labels = tl.load(labels_ptr + rows, mask=rows < T, other=0).to(tl.int64)
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_T,), tl.float32)
    a = tl.zeros((BLOCK_T,), tl.float32)
    x_label = tl.zeros((BLOCK_T,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, T, V, H, stride_h, stride_w, inv_temperature,
                         HAS_BIAS, BLOCK_T, BLOCK_V, BLOCK_H, DOT_UPCAST)
        # ---- online log-sum-exp over the vocab
        m_new = tl.maximum(m, tl.max(x, 1))
        scale = tl.exp(m - m_new)
        e = tl.exp(x - m_new[:, None])
        s = s * scale + tl.sum(e, 1)
        if RETURN_ENTROPY:
            a = a * scale + tl.sum(e * tl.where(cols[None, :] < V, x, 0.0), 1)
        m = m_new
        x_label += tl.sum(tl.where(cols[None, :] == labels[:, None], x, 0.0), 1)
    lse = m + tl.log(s)
    tl.store(logp_ptr + rows, x_label - lse, mask=rows < T)
    tl.store(lse_ptr + rows, lse, mask=rows < T)
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + rows, lse - a / s, mask=rows < T)


@triton.jit
def _bwd_dh_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, labels_ptr, g_ptr, lse_ptr, g_ent_ptr, ent_ptr, dh_ptr,
    # sizes, strides
    T, V, H, stride_h, stride_w,
    # scalars
    inv_temperature,
    # constants
    HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = rows < T
    labels = tl.load(labels_ptr + rows, mask=in_t, other=0).to(tl.int64)
    g = tl.load(g_ptr + rows, mask=in_t, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=in_t, other=0.0)
    g_ent = tl.load(g_ent_ptr + rows, mask=in_t, other=0.0) if HAS_GRAD_ENTROPY else g
    ent = tl.load(ent_ptr + rows, mask=in_t, other=0.0) if HAS_GRAD_ENTROPY else g
    ks = tl.arange(0, BLOCK_H)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, T, V, H, stride_h, stride_w, inv_temperature,
                         HAS_BIAS, BLOCK_T, BLOCK_V, BLOCK_H, DOT_UPCAST)
        d = _dlogits_tile(x, cols, labels, g, lse, g_ent, ent, V, inv_temperature, HAS_GRAD_ENTROPY)
        d = d.to(w_ptr.dtype.element_ty)
        # ---- dh[rows] += d @ W[cols]  (this program owns these rows: no other writer)
        for k0 in range(0, H, BLOCK_H):
            k = k0 + ks
            w = tl.load(w_ptr + cols[:, None] * stride_w + k[None, :], mask=(cols[:, None] < V) & (k[None, :] < H),
                        other=0.0)
            ptrs = dh_ptr + rows[:, None] * H + k[None, :]
            msk = in_t[:, None] & (k[None, :] < H)
            tl.store(ptrs, _dot(d, w, tl.load(ptrs, mask=msk, other=0.0), DOT_UPCAST), mask=msk)


@triton.jit
def _bwd_dw_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, labels_ptr, g_ptr, lse_ptr, g_ent_ptr, ent_ptr, dw_ptr, db_ptr,
    # sizes, strides
    T, V, H, stride_h, stride_w,
    # scalars
    inv_temperature,
    # constants
    HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_v = cols < V
    ks = tl.arange(0, BLOCK_H)
    db = tl.zeros((BLOCK_V,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        in_t = rows < T
        labels = tl.load(labels_ptr + rows, mask=in_t, other=0).to(tl.int64)
        g = tl.load(g_ptr + rows, mask=in_t, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=in_t, other=0.0)
        g_ent = tl.load(g_ent_ptr + rows, mask=in_t, other=0.0) if HAS_GRAD_ENTROPY else g
        ent = tl.load(ent_ptr + rows, mask=in_t, other=0.0) if HAS_GRAD_ENTROPY else g
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, T, V, H, stride_h, stride_w, inv_temperature,
                         HAS_BIAS, BLOCK_T, BLOCK_V, BLOCK_H, DOT_UPCAST)
        d = _dlogits_tile(x, cols, labels, g, lse, g_ent, ent, V, inv_temperature, HAS_GRAD_ENTROPY)
        d = tl.where(in_t[:, None], d, 0.0)  # rows past T: g = 0 already, but lse = 0 there makes p garbage
        if HAS_BIAS:
            db += tl.sum(d, 0)
        dt = tl.trans(d.to(h_ptr.dtype.element_ty))
        # ---- dW[cols] += d^T @ h[rows]  (this program owns these vocab rows)
        for k0 in range(0, H, BLOCK_H):
            k = k0 + ks
            h = tl.load(h_ptr + rows[:, None] * stride_h + k[None, :], mask=in_t[:, None] & (k[None, :] < H),
                        other=0.0)
            ptrs = dw_ptr + cols[:, None] * H + k[None, :]
            msk = in_v[:, None] & (k[None, :] < H)
            tl.store(ptrs, _dot(dt, h, tl.load(ptrs, mask=msk, other=0.0), DOT_UPCAST), mask=msk)
    if HAS_BIAS:
        tl.store(db_ptr + cols, db, mask=in_v)


def _blocks(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(BLOCK_T=64, BLOCK_V=128, BLOCK_H=64, DOT_UPCAST=False, num_warps=8)
    # the interpreter: smallest legal tl.dot tiles (fast on CPU), and fp32 dot operands (see _dot)
    return dict(BLOCK_T=16, BLOCK_V=16, BLOCK_H=16, DOT_UPCAST=True)


def linear_logprob_forward(hidden, weight, bias, labels, temperature: float, return_entropy: bool):
    """Returns (logp, lse, entropy or None), fp32 [T]."""
    T, H = hidden.shape
    V = weight.shape[0]
    hidden, weight = hidden.contiguous(), weight.contiguous()
    logp = torch.empty(T, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if return_entropy else logp
    blocks = _blocks(hidden.device)
    grid = (triton.cdiv(T, blocks["BLOCK_T"]),)
    _fwd_kernel[grid](
        hidden, weight, bias if bias is not None else weight, labels, logp, lse, entropy,
        T, V, H, hidden.stride(0), weight.stride(0), 1.0 / temperature,
        HAS_BIAS=bias is not None, RETURN_ENTROPY=return_entropy, **blocks,
    )  # fmt: skip
    return logp, lse, (entropy if return_entropy else None)


def linear_logprob_backward(hidden, weight, bias, labels, lse, grad_logp, temperature: float, *,
                            grad_entropy=None, entropy=None, need_hidden=True, need_weight=True):
    """Returns (dhidden, dweight, dbias) in the inputs' dtypes (None where not needed)."""
    T, H = hidden.shape
    V = weight.shape[0]
    hidden, weight = hidden.contiguous(), weight.contiguous()
    grad_logp = grad_logp.float().contiguous()
    has_ent = grad_entropy is not None
    g_ent = grad_entropy.float().contiguous() if has_ent else grad_logp
    ent = entropy if has_ent else lse
    b = bias if bias is not None else weight
    blocks = _blocks(hidden.device)
    common = (T, V, H, hidden.stride(0), weight.stride(0), 1.0 / temperature)
    flags = dict(HAS_BIAS=bias is not None, HAS_GRAD_ENTROPY=has_ent, **blocks)
    dh = dw = db = None
    if need_hidden:
        dh = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
        _bwd_dh_kernel[(triton.cdiv(T, blocks["BLOCK_T"]),)](
            hidden, weight, b, labels, grad_logp, lse, g_ent, ent, dh, *common, **flags)
        dh = dh.to(hidden.dtype)
    if need_weight or bias is not None:
        dw = torch.zeros(V, H, dtype=torch.float32, device=hidden.device)
        db32 = torch.zeros(V, dtype=torch.float32, device=hidden.device) if bias is not None else dw
        _bwd_dw_kernel[(triton.cdiv(V, blocks["BLOCK_V"]),)](
            hidden, weight, b, labels, grad_logp, lse, g_ent, ent, dw, db32, *common, **flags)
        dw = dw.to(weight.dtype)
        db = db32.to(bias.dtype) if bias is not None else None
    return dh, dw, db
