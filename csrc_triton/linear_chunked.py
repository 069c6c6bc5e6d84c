"""LM-head log-probs and their gradients at the GEMM floor: vendor GEMMs on token chunks around an in-place Triton
row kernel. The logits of one chunk of C tokens are the only V-wide buffer; [T, V] never exists.

Per chunk c of C tokens (rows of hidden h_c [C, H]; W [V, H]; fixed chunk order, no atomics: deterministic):
    Z   = h_c @ W^T (+ b)                    torch.mm / addmm (cuBLAS: half in, fp32 accumulate)     GEMM 1
    _row_fwd_kernel over Z: lse, logp = Z[label]/tau - lse, entropy        (one program per row, reads Z once)
    g   = dL/dlogp for the chunk's tokens    (a callback: the loss head's token phase, or the upstream gradient)
    _row_bwd_kernel over Z, in place: dZ = (g (onehot - p) - g_ent p (log p + H)) / tau   (reads Z, writes dZ)
    dh_c = dZ @ W                            written straight into the rows of dh                     GEMM 2
    dW  += dZ^T @ h_c                        one preallocated fp32 [V, H] buffer                      GEMM 3
    db  += column sums of dZ (fp32)
When g is known in the forward (token-level ratio, or on-policy; weights from mask counts) all of this runs in the
forward's chunk loop: 3 GEMMs in all. When it is not (GSPO with old log-probs given, or a generic upstream
gradient), the forward runs GEMM 1 and the row forward only, keeps [T] values (logp, lse, entropy), and the
backward recomputes Z per chunk: 4 GEMMs.

Rows that are masked (label -100 or out of range, or mask 0 in the loss) are never read by the row kernels; their
hidden rows are replaced by 0 before the GEMMs, so NaN there cannot reach any output (0 * NaN), and they get an
exact zero gradient.

Memory beyond the outputs and the gradients: the chunk buffer C*V (input dtype), one [C, H] chunk of cleaned
hidden states, and O(T) fp32 vectors. dW: half inputs accumulate straight into the fp32 buffer through cuBLAS
(addmm with out_dtype=float32) where a one-time probe shows torch supports it; otherwise (CPU, older torch) each
chunk's partial goes through one [V, H] half buffer (rounded to half once, then summed in fp32). Which is faster on
a GPU has not been measured (no GPU in the session that wrote this).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import triton
import triton.language as tl


@triton.jit
def _row_fwd_kernel(
    # pointers
    z_ptr,  # [n, V] logits of the chunk (before temperature)
    labels_ptr,
    valid_ptr,  # uint8 [n]: 0 = masked row (never read)
    logp_ptr,
    lse_ptr,
    ent_ptr,
    # sizes, strides
    V,
    stride_z,
    # scalars
    inv_temperature,
    # constants
    RETURN_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    valid = tl.load(valid_ptr + row) != 0
    z_row = z_ptr + row.to(tl.int64) * stride_z
    cols0 = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    # ---- online log-sum-exp (and sum p*x for the entropy); a masked row runs zero iterations
    for v0 in range(0, tl.where(valid, V, 0), BLOCK_V):
        cols = v0 + cols0
        x = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(x, 0))
        scale = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        s = s * scale + tl.sum(e, 0)
        if RETURN_ENTROPY:
            a = a * scale + tl.sum(e * tl.where(cols < V, x, 0.0), 0)
        m = m_new
    label = tl.load(labels_ptr + row).to(tl.int64)
    x_label = tl.load(z_row + label, mask=valid, other=0.0).to(tl.float32) * inv_temperature
    s = tl.where(valid, s, 1.0)  # a masked row: lse = 0, no log(0)
    lse = tl.where(valid, m, 0.0) + tl.log(s)
    tl.store(logp_ptr + row, tl.where(valid, x_label - lse, 0.0))
    tl.store(lse_ptr + row, lse)
    if RETURN_ENTROPY:
        tl.store(ent_ptr + row, tl.where(valid, lse - a / s, 0.0))


@triton.jit
def _row_bwd_kernel(
    # pointers
    z_ptr,  # [n, V] logits of the chunk; overwritten with dL/dZ
    labels_ptr,
    valid_ptr,
    g_ptr,  # fp32 [n] dL/dlogp
    lse_ptr,
    g_ent_ptr,  # fp32 [n] dL/dentropy (HAS_GRAD_ENTROPY)
    ent_ptr,
    # sizes, strides
    V,
    stride_z,
    # scalars
    inv_temperature,
    # constants
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    valid = tl.load(valid_ptr + row) != 0
    z_row = z_ptr + row.to(tl.int64) * stride_z
    label = tl.load(labels_ptr + row).to(tl.int64)
    g = tl.load(g_ptr + row)
    lse = tl.load(lse_ptr + row)
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(g_ent_ptr + row)
        ent = tl.load(ent_ptr + row)
    cols0 = tl.arange(0, BLOCK_V)
    read_to = tl.where(valid, V, 0)  # a masked row reads nothing and gets zeros
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        in_v = cols < V
        log_p = tl.load(z_row + cols, mask=cols < read_to, other=0.0).to(tl.float32) * inv_temperature - lse
        p = tl.exp(log_p)
        d = tl.where(cols == label, g, 0.0) - g * p
        if HAS_GRAD_ENTROPY:
            d -= g_ent * p * (log_p + ent)
        d = tl.where(valid, d * inv_temperature, 0.0)
        tl.store(z_row + cols, d.to(z_ptr.dtype.element_ty), mask=in_v)


# ----------------------------------------------------------------------------------------------------------------
# launchers


def _block_v(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(BLOCK_V=2048, num_warps=8)
    return dict(BLOCK_V=64)  # the interpreter: small tiles are fast on CPU and exercise the V tail


def chunk_size(num_tokens: int, vocab: int, dtype: torch.dtype, device: torch.device, requested: int | None) -> int:
    """Tokens per chunk. CUDA: the largest power of two in [512, 4096] whose C*V buffer fits in a quarter of the
    free memory; elsewhere 32 (so CPU tests split sequences across chunks). Never more than num_tokens."""
    if requested is not None:
        c = int(requested)
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fit = int(free * 0.25) // (vocab * torch.finfo(dtype).bits // 8)
        c = 512
        while c * 2 <= min(fit, 4096):
            c *= 2
    else:
        c = 32
    return max(1, min(c, num_tokens))


_FP32_OUT_ADDMM: dict[torch.device, bool] = {}


def _fp32_out_addmm_ok(device: torch.device) -> bool:
    """Whether torch.addmm(acc32, a16, b16, out_dtype=float32, out=acc32) works here (cuBLAS: half inputs, fp32
    C and D, the running dW sum never rounded to half). Probed once per device on tiny tensors and checked against
    an fp32 product; CPU builds lack the op, so there the half partial goes through a [V, H] half buffer instead."""
    if device.type != "cuda":
        return False
    if device not in _FP32_OUT_ADDMM:
        try:
            a = torch.randn(8, 16, device=device).to(torch.bfloat16)
            b = torch.randn(16, 8, device=device).to(torch.bfloat16)
            acc = torch.ones(8, 8, device=device)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            want = 1.0 + a.float() @ b.float()
            ok = bool(torch.allclose(acc, want, atol=1e-3, rtol=1e-3))  # sync: one-time capability probe
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _FP32_OUT_ADDMM[device] = ok
    return _FP32_OUT_ADDMM[device]


@contextlib.contextmanager
def _tf32(device: torch.device, allow: bool):
    """fp32 GEMMs are IEEE fp32 unless the caller opted into TF32 (restores torch's global flag on exit)."""
    if device.type != "cuda":
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def chunked_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
    chunk: int,
    *,
    forward: bool = True,
    return_entropy: bool = False,
    lse: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    grad_fn: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None,
    grad_logp: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
    need_hidden: bool = False,
    need_weight: bool = False,
    need_bias: bool = True,
    allow_tf32: bool = False,
) -> dict[str, torch.Tensor | None]:
    """The chunk loop. Modes:
    - forward only (forward=True, no gradient source): logp, lse (and entropy), fp32 [T].
    - fused (forward=True, grad_fn): per chunk, after the row forward, g_c = grad_fn(start, end, logp_c) and the
      gradients in the same loop (3 GEMMs).
    - recompute (forward=False, lse/entropy saved, grad_logp and optionally grad_entropy): gradients only.
    `valid` is uint8 [T] (0 = masked row). Returns a dict with logp, lse, entropy, dh (hidden dtype), dw (fp32),
    db (fp32, when need_bias and a bias is given), each None when not computed."""
    T, H = hidden.shape
    V = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    blocks = _block_v(device)
    inv_t = 1.0 / temperature
    labels, valid = labels.contiguous(), valid.contiguous()
    if bias is not None:
        bias = bias.to(dtype).contiguous()
    need_bias = need_bias and bias is not None
    # grad_fn is always called (it also produces the loss); the gradient work runs only when some gradient is needed
    has_grad = (grad_fn is not None or grad_logp is not None) and (need_hidden or need_weight or need_bias)
    has_grad_ent = grad_entropy is not None
    out: dict[str, torch.Tensor | None] = dict(logp=None, lse=None, entropy=None, dh=None, dw=None, db=None)
    if forward:
        out["logp"] = torch.empty(T, dtype=torch.float32, device=device)
        out["lse"] = lse = torch.empty(T, dtype=torch.float32, device=device)
        if return_entropy:
            out["entropy"] = entropy = torch.empty(T, dtype=torch.float32, device=device)
    if has_grad:
        if need_hidden:
            out["dh"] = torch.empty(T, H, dtype=dtype, device=device)
        if need_weight:
            out["dw"] = torch.zeros(V, H, dtype=torch.float32, device=device)
            fp32_out = dtype != torch.float32 and _fp32_out_addmm_ok(device)
            dw_part = None if dtype == torch.float32 or fp32_out else torch.empty(V, H, dtype=dtype, device=device)
        if need_bias:
            out["db"] = torch.zeros(V, dtype=torch.float32, device=device)
        if grad_logp is not None:
            grad_logp = grad_logp.float().contiguous()
        if has_grad_ent:
            grad_entropy = grad_entropy.float().contiguous()
    z_buf = torch.empty(chunk, V, dtype=dtype, device=device)  # the only V-wide buffer
    zero = torch.zeros((), dtype=dtype, device=device)
    with _tf32(device, allow_tf32):
        for c0 in range(0, T, chunk):  # fixed order: deterministic
            c1 = min(c0 + chunk, T)
            n = c1 - c0
            v_c = valid[c0:c1]
            h_c = torch.where(v_c.view(torch.bool)[:, None], hidden[c0:c1], zero)  # (n, H); masked rows -> 0
            z = z_buf[:n]
            # ---- GEMM 1: the chunk's logits
            if bias is None:
                torch.mm(h_c, weight.t(), out=z)
            else:
                torch.addmm(bias, h_c, weight.t(), out=z)
            if forward:
                ent_c = out["entropy"][c0:c1] if return_entropy else out["lse"][c0:c1]
                _row_fwd_kernel[(n,)](
                    z, labels[c0:c1], v_c, out["logp"][c0:c1], out["lse"][c0:c1], ent_c, V, z.stride(0), inv_t,
                    RETURN_ENTROPY=return_entropy, **blocks,
                )  # fmt: skip
            g_c = grad_fn(c0, c1, out["logp"][c0:c1]) if grad_fn is not None else None
            if not has_grad:
                continue
            if g_c is None:
                g_c = grad_logp[c0:c1]
            g_ent_c = grad_entropy[c0:c1] if has_grad_ent else g_c
            ent_c = entropy[c0:c1] if has_grad_ent else g_c
            # ---- dZ in place
            _row_bwd_kernel[(n,)](
                z, labels[c0:c1], v_c, g_c, lse[c0:c1], g_ent_c, ent_c, V, z.stride(0), inv_t,
                HAS_GRAD_ENTROPY=has_grad_ent, **blocks,
            )  # fmt: skip
            # ---- GEMMs 2 and 3
            if need_hidden:
                torch.mm(z, weight, out=out["dh"][c0:c1])
            if need_weight:
                if dtype == torch.float32:
                    out["dw"].addmm_(z.t(), h_c)
                elif fp32_out:
                    torch.addmm(out["dw"], z.t(), h_c, out_dtype=torch.float32, out=out["dw"])
                else:
                    torch.mm(z.t(), h_c, out=dw_part)
                    out["dw"].add_(dw_part)
            if need_bias:
                out["db"].add_(z.sum(0, dtype=torch.float32))
    return out
