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

Masked rows (valid = 0: label -100 or out of range, or outside the loss mask) are never read: their hidden rows load
as 0, a tile of only masked rows is skipped, and their gradients are exact zeros (NaN there cannot leak).
fp32 inputs use IEEE fp32 dots (input_precision="ieee") unless the caller opts into TF32.

This is impl="tiled", the minimum-memory option FOR SMALL SHAPES; impl="chunked" (linear_chunked.py) is the fast
one and the CUDA default. Cost: 5 GEMM-equivalents of 2*T*V*H FLOPs (forward 1; backward 2 recomputes + 2 gradient
GEMMs) against the 3-GEMM floor, and bytes that grow as T*V*H, not T*V + V*H: every (T-tile, V-tile) pair re-reads
its h and W operand tiles, and the backward reads and writes the program's fp32 accumulator rows (dh [BLOCK_T, H]
per V tile, dW [BLOCK_V, H] per T tile) once per pair, because an accumulator of H columns does not fit in
registers at real H. `tiled_bytes` gives the count (checked against the Triton interpreter in
tests/test_ops_linear.py): with the bf16 tiles, forward T*V*H/16 bytes and backward 7*T*V*H/16, of which the fp32
accumulators are T*V*H/4. At T=16384, V=151936, H=3584 that is 0.56 TB forward and 3.9 TB backward (2.2 TB of
it accumulator traffic), against ~60 GB for impl="chunked": seconds per call on an H100, so the tiled path is
kept out of large shapes (ops logs a warning above TILED_WARN_BYTES; benches and GPU tests use it at H <= 896 only).
Memory: O(T) fp32 per-token buffers, fp32 dh [T, H] and dW [V, H]; nothing of size T*V. Tiles, warps and stages
per kernel and dtype are in _CUDA_TILES (no register spill on sm_80 or sm_90; benches/linear_kernel_regs.py prints
the table).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. PRECISION: "ieee" for fp32 inputs unless the caller opted into "tf32" (no silent TF32).
    DOT_UPCAST (interpreter only): the Triton interpreter's bf16/fp16 tl.dot is wrong (triton 3.9), so there the
    operands are upcast to fp32 first: exact for half inputs, so CPU tests check the same maths."""
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logits_tile(
    h_tile,
    w_tile,
    b_ptr,
    r,
    valid,
    c,
    cols,
    V,
    H,
    stride_h,
    stride_w,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """x[BLOCK_T, BLOCK_V] = (h[rows] @ W[cols]^T + b[cols]) / temperature in fp32; -inf outside V. h_tile, w_tile:
    int64 base pointers of the tile's first row / vocab row; r, c: int32 offsets inside the tile (few registers).
    Masked rows (valid false) are not read: their h is 0."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    ks = tl.arange(0, BLOCK_H)
    h_offs = r[:, None] * stride_h + ks[None, :]
    w_offs = c[:, None] * stride_w + ks[None, :]
    for k0 in range(0, H, BLOCK_H):
        h = tl.load(h_tile + k0 + h_offs, mask=valid[:, None] & (ks[None, :] < H - k0), other=0.0)
        w = tl.load(w_tile + k0 + w_offs, mask=(cols[:, None] < V) & (ks[None, :] < H - k0), other=0.0)
        acc = _dot(h, tl.trans(w), acc, DOT_UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    return tl.where(cols[None, :] < V, acc * inv_temperature, float("-inf"))


@triton.jit
def _dlogits_tile(
    x,
    valid,
    cols,
    labels,
    g,
    lse,
    g_ent,
    ent,
    V,
    inv_temperature,
    HAS_GRAD_ENTROPY: tl.constexpr,
):
    """d[BLOCK_T, BLOCK_V] = dL/dlogits (already divided by temperature); 0 outside V and on masked rows."""
    log_p = x - lse[:, None]
    p = tl.exp(log_p)
    d = tl.where(cols[None, :] == labels[:, None], g[:, None], 0.0) - g[:, None] * p
    if HAS_GRAD_ENTROPY:
        d -= g_ent[:, None] * p * (tl.where(cols[None, :] < V, log_p, 0.0) + ent[:, None])
    return tl.where(valid[:, None] & (cols[None, :] < V), d * inv_temperature, 0.0)


@triton.jit
def _fwd_kernel(
    # pointers
    h_ptr,
    w_ptr,
    b_ptr,
    labels_ptr,
    valid_ptr,
    logp_ptr,
    lse_ptr,
    entropy_ptr,
    # sizes, strides
    T,
    V,
    H,
    stride_h,
    stride_w,
    # scalars
    inv_temperature,
    # constants
    HAS_BIAS: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_T
    r = tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_V)
    rows = row0 + r
    valid = (rows < T) & (tl.load(valid_ptr + rows, mask=rows < T, other=0) != 0)
    labels = tl.load(labels_ptr + rows, mask=valid, other=-1).to(tl.int32)
    h_tile = h_ptr + row0 * stride_h
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_T,), tl.float32)
    a = tl.zeros((BLOCK_T,), tl.float32)
    x_label = tl.zeros((BLOCK_T,), tl.float32)
    # a block of masked rows runs zero iterations
    for v0 in range(0, tl.where(tl.max(valid.to(tl.int32), 0) > 0, V, 0), BLOCK_V):
        cols = v0 + c  # int32: V < 2^31
        x = _logits_tile(
            h_tile,
            w_ptr + v0 * stride_w.to(tl.int64),
            b_ptr,
            r,
            valid,
            c,
            cols,
            V,
            H,
            stride_h,
            stride_w,
            inv_temperature,
            HAS_BIAS,
            BLOCK_T,
            BLOCK_V,
            BLOCK_H,
            DOT_UPCAST,
            PRECISION,
        )
        # ---- online log-sum-exp over the vocab
        m_new = tl.maximum(m, tl.max(x, 1))
        scale = tl.exp(m - m_new)
        e = tl.exp(x - m_new[:, None])
        s = s * scale + tl.sum(e, 1)
        if RETURN_ENTROPY:
            a = a * scale + tl.sum(e * tl.where(cols[None, :] < V, x, 0.0), 1)
        m = m_new
        x_label += tl.sum(tl.where(cols[None, :] == labels[:, None], x, 0.0), 1)
    s = tl.where(valid, s, 1.0)
    lse = tl.where(valid, m, 0.0) + tl.log(s)
    tl.store(logp_ptr + rows, tl.where(valid, x_label - lse, 0.0), mask=rows < T)
    tl.store(lse_ptr + rows, lse, mask=rows < T)
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + rows, tl.where(valid, lse - a / s, 0.0), mask=rows < T)


@triton.jit
def _bwd_dh_kernel(
    # pointers
    h_ptr,
    w_ptr,
    b_ptr,
    labels_ptr,
    valid_ptr,
    g_ptr,
    lse_ptr,
    g_ent_ptr,
    ent_ptr,
    dh_ptr,
    # sizes, strides
    T,
    V,
    H,
    stride_h,
    stride_w,
    # scalars
    inv_temperature,
    # constants
    HAS_BIAS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_T
    r = tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_H)
    rows = row0 + r
    in_t = rows < T
    valid = in_t & (tl.load(valid_ptr + rows, mask=in_t, other=0) != 0)
    labels = tl.load(labels_ptr + rows, mask=valid, other=-1).to(tl.int32)
    g = tl.load(g_ptr + rows, mask=valid, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
    g_ent = tl.load(g_ent_ptr + rows, mask=valid, other=0.0) if HAS_GRAD_ENTROPY else g
    ent = tl.load(ent_ptr + rows, mask=valid, other=0.0) if HAS_GRAD_ENTROPY else g
    h_tile = h_ptr + row0 * stride_h
    dh_tile = dh_ptr + row0 * H
    dh_offs = r[:, None] * H + ks[None, :]
    w_offs = c[:, None] * stride_w + ks[None, :]
    # dh starts at zero (the launcher's buffer): a block of masked rows runs zero iterations and keeps exact zeros
    for v0 in range(0, tl.where(tl.max(valid.to(tl.int32), 0) > 0, V, 0), BLOCK_V):
        cols = v0 + c
        w_tile = w_ptr + v0 * stride_w.to(tl.int64)
        x = _logits_tile(
            h_tile,
            w_tile,
            b_ptr,
            r,
            valid,
            c,
            cols,
            V,
            H,
            stride_h,
            stride_w,
            inv_temperature,
            HAS_BIAS,
            BLOCK_T,
            BLOCK_V,
            BLOCK_H,
            DOT_UPCAST,
            PRECISION,
        )
        d = _dlogits_tile(x, valid, cols, labels, g, lse, g_ent, ent, V, inv_temperature, HAS_GRAD_ENTROPY)
        d = d.to(w_ptr.dtype.element_ty)
        # ---- dh[rows] += d @ W[cols]  (this program owns these rows: no other writer)
        for k0 in range(0, H, BLOCK_H):
            w = tl.load(w_tile + k0 + w_offs, mask=(cols[:, None] < V) & (ks[None, :] < H - k0), other=0.0)
            msk = in_t[:, None] & (ks[None, :] < H - k0)
            acc = tl.load(dh_tile + k0 + dh_offs, mask=msk, other=0.0)
            tl.store(dh_tile + k0 + dh_offs, _dot(d, w, acc, DOT_UPCAST, PRECISION), mask=msk)


@triton.jit
def _bwd_dw_kernel(
    # pointers
    h_ptr,
    w_ptr,
    b_ptr,
    labels_ptr,
    valid_ptr,
    g_ptr,
    lse_ptr,
    g_ent_ptr,
    ent_ptr,
    dw_ptr,
    db_ptr,
    # sizes, strides
    T,
    V,
    H,
    stride_h,
    stride_w,
    # scalars
    inv_temperature,
    # constants
    HAS_BIAS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    col0 = tl.program_id(0) * BLOCK_V
    r = tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_H)
    cols = col0 + c  # int32: V < 2^31
    in_v = cols < V
    w_tile = w_ptr + col0.to(tl.int64) * stride_w
    dw_tile = dw_ptr + col0.to(tl.int64) * H
    dw_offs = c[:, None] * H + ks[None, :]
    h_offs = r[:, None] * stride_h + ks[None, :]
    db = tl.zeros((BLOCK_V,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + r.to(tl.int64)
        in_t = rows < T
        valid = in_t & (tl.load(valid_ptr + rows, mask=in_t, other=0) != 0)
        if tl.max(valid.to(tl.int32), 0) > 0:  # skip tiles of masked rows entirely
            labels = tl.load(labels_ptr + rows, mask=valid, other=-1).to(tl.int32)
            g = tl.load(g_ptr + rows, mask=valid, other=0.0)
            lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
            g_ent = tl.load(g_ent_ptr + rows, mask=valid, other=0.0) if HAS_GRAD_ENTROPY else g
            ent = tl.load(ent_ptr + rows, mask=valid, other=0.0) if HAS_GRAD_ENTROPY else g
            h_tile = h_ptr + t0 * stride_h.to(tl.int64)
            x = _logits_tile(
                h_tile,
                w_tile,
                b_ptr,
                r,
                valid,
                c,
                cols,
                V,
                H,
                stride_h,
                stride_w,
                inv_temperature,
                HAS_BIAS,
                BLOCK_T,
                BLOCK_V,
                BLOCK_H,
                DOT_UPCAST,
                PRECISION,
            )
            d = _dlogits_tile(x, valid, cols, labels, g, lse, g_ent, ent, V, inv_temperature, HAS_GRAD_ENTROPY)
            if HAS_BIAS:
                db += tl.sum(d, 0)
            dt = tl.trans(d.to(h_ptr.dtype.element_ty))
            # ---- dW[cols] += d^T @ h[rows]  (this program owns these vocab rows; masked rows of h are not read)
            for k0 in range(0, H, BLOCK_H):
                h = tl.load(h_tile + k0 + h_offs, mask=valid[:, None] & (ks[None, :] < H - k0), other=0.0)
                msk = in_v[:, None] & (ks[None, :] < H - k0)
                acc = tl.load(dw_tile + k0 + dw_offs, mask=msk, other=0.0)
                tl.store(dw_tile + k0 + dw_offs, _dot(dt, h, acc, DOT_UPCAST, PRECISION), mask=msk)
    if HAS_BIAS:
        tl.store(db_ptr + cols, db, mask=in_v)


# (BLOCK_T, BLOCK_V, BLOCK_H, num_warps, num_stages) per kernel and input width, chosen by compiling for sm_80 and
# sm_90 with Triton's bundled ptxas (pointers and H/strides 16-divisible, as the JIT specialises them): no spill on
# either. Registers per thread measured (sm_80 / sm_90): half fwd 128/80, dh 180/136, dw 128/114; fp32 (IEEE FMA
# dots) fwd 80/96, dh 64/118, dw 106/104. The previous single table (64, 128|64, 64, 8|4 warps) sat at 255
# registers on both and spilled hundreds of bytes.
_CUDA_TILES = {
    ("half", "fwd"): (64, 64, 32, 8, 2),
    ("half", "dh"): (64, 64, 64, 8, 2),
    ("half", "dw"): (64, 64, 32, 8, 2),
    ("fp32", "fwd"): (16, 64, 32, 4, 2),
    ("fp32", "dh"): (32, 64, 32, 8, 1),
    ("fp32", "dw"): (32, 64, 16, 8, 2),
}


TILED_WARN_BYTES = 200 * 10**9  # ops warns when one tiled forward + backward would request more than this


def tiled_bytes(T: int, V: int, H: int, dtype: torch.dtype) -> dict[str, int]:
    """Bytes the tiled kernels request on CUDA (their _CUDA_TILES; every row live; the O(T) and O(V) vectors left
    out): per kernel ("fwd", "dh", "dw") and the fp32 accumulator part of the backward ("acc"). Per (T-tile,
    V-tile) pair: fwd reads h and W tiles; dh reads h, W twice (logits, update) and reads + writes its fp32 dh
    rows; dw reads h twice, W once and reads + writes its fp32 dW rows."""
    e = torch.finfo(dtype).bits // 8
    width = "fp32" if dtype == torch.float32 else "half"
    tiles = {k: _CUDA_TILES[(width, k)][:2] for k in ("fwd", "dh", "dw")}
    tvh = T * V * H
    out = {
        "fwd": tvh * e // tiles["fwd"][1] + tvh * e // tiles["fwd"][0],
        "dh": tvh * e // tiles["dh"][1] + 2 * tvh * e // tiles["dh"][0] + 8 * tvh // tiles["dh"][1],
        "dw": 2 * tvh * e // tiles["dw"][1] + tvh * e // tiles["dw"][0] + 8 * tvh // tiles["dw"][0],
    }
    out["acc"] = 8 * tvh // tiles["dh"][1] + 8 * tvh // tiles["dw"][0]
    return out


def _blocks(device: torch.device, dtype: torch.dtype, allow_tf32: bool, kind: str) -> dict:
    """Launch constants of kernel `kind` ("fwd", "dh", "dw"). fp32 inputs get IEEE fp32 dots unless allow_tf32."""
    precision = "tf32" if (dtype != torch.float32 or allow_tf32) else "ieee"
    if device.type == "cuda":
        bt, bv, bh, warps, stages = _CUDA_TILES[("fp32" if dtype == torch.float32 else "half", kind)]
        return dict(BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh, DOT_UPCAST=False, PRECISION=precision, num_warps=warps,
                    num_stages=stages)  # fmt: skip
    # the interpreter: smallest legal tl.dot tiles (fast on CPU), and fp32 dot operands (see _dot)
    return dict(BLOCK_T=16, BLOCK_V=16, BLOCK_H=16, DOT_UPCAST=True, PRECISION=precision)


def linear_logprob_forward(
    hidden, weight, bias, labels, valid, temperature: float, return_entropy: bool, allow_tf32: bool = False
):
    """Returns (logp, lse, entropy or None), fp32 [T]; masked rows (valid 0) get 0 and are never read."""
    T, H = hidden.shape
    V = weight.shape[0]
    hidden, weight, labels, valid = hidden.contiguous(), weight.contiguous(), labels.contiguous(), valid.contiguous()
    bias = bias.contiguous() if bias is not None else None
    logp = torch.empty(T, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if return_entropy else logp
    blocks = _blocks(hidden.device, hidden.dtype, allow_tf32, "fwd")
    grid = (triton.cdiv(T, blocks["BLOCK_T"]),)
    _fwd_kernel[grid](
        hidden, weight, bias if bias is not None else weight, labels, valid, logp, lse, entropy,
        T, V, H, hidden.stride(0), weight.stride(0), 1.0 / temperature,
        HAS_BIAS=bias is not None, RETURN_ENTROPY=return_entropy, **blocks,
    )  # fmt: skip
    return logp, lse, (entropy if return_entropy else None)


def linear_logprob_backward(
    hidden,
    weight,
    bias,
    labels,
    valid,
    lse,
    grad_logp,
    temperature: float,
    *,
    grad_entropy=None,
    entropy=None,
    need_hidden=True,
    need_weight=True,
    allow_tf32=False,
):
    """Returns (dhidden, dweight, dbias) in the inputs' dtypes (None where not needed); masked rows get exact zeros."""
    T, H = hidden.shape
    V = weight.shape[0]
    hidden, weight, labels, valid = hidden.contiguous(), weight.contiguous(), labels.contiguous(), valid.contiguous()
    bias = bias.contiguous() if bias is not None else None
    grad_logp = grad_logp.float().contiguous()
    has_ent = grad_entropy is not None
    g_ent = grad_entropy.float().contiguous() if has_ent else grad_logp
    ent = entropy if has_ent else lse
    b = bias if bias is not None else weight
    common = (T, V, H, hidden.stride(0), weight.stride(0), 1.0 / temperature)
    flags = dict(HAS_BIAS=bias is not None, HAS_GRAD_ENTROPY=has_ent)
    dh = dw = db = None
    if need_hidden:
        blocks = _blocks(hidden.device, hidden.dtype, allow_tf32, "dh")
        dh = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
        _bwd_dh_kernel[(triton.cdiv(T, blocks["BLOCK_T"]),)](
            hidden, weight, b, labels, valid, grad_logp, lse, g_ent, ent, dh, *common, **flags, **blocks
        )
        dh = dh.to(hidden.dtype)
    if need_weight or bias is not None:
        blocks = _blocks(hidden.device, hidden.dtype, allow_tf32, "dw")
        dw = torch.zeros(V, H, dtype=torch.float32, device=hidden.device)
        db32 = torch.zeros(V, dtype=torch.float32, device=hidden.device) if bias is not None else dw
        _bwd_dw_kernel[(triton.cdiv(V, blocks["BLOCK_V"]),)](
            hidden, weight, b, labels, valid, grad_logp, lse, g_ent, ent, dw, db32, *common, **flags, **blocks
        )
        dw = dw.to(weight.dtype)
        db = db32.to(bias.dtype) if bias is not None else None
    return dh, dw, db
