"""LM-head log-probs and their gradients at the GEMM floor: vendor GEMMs on token chunks around an in-place Triton
row kernel. The logits of one chunk of C tokens are the only V-wide buffer; [T, V] never exists.

Per chunk c of C tokens (rows of hidden h_c [C, H]; W [V, H]; fixed chunk order, no atomics: deterministic):
    Z   = h_c @ W^T (+ b)                    cuBLAS: half in, fp32 accumulate, fp32 out               GEMM 1
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

Precision (fp32_logits=True, the default; DESIGN.md 4b): Z is accumulated AND kept in fp32, so log-probs, entropy,
ratios and KL never see logits rounded to bf16 (bf16 logits of magnitude ~30 are off by up to 0.06 nats; measured
in tests/test_ops_linear.py). GEMM 1 writes fp32 through cuBLAS (`torch.mm(..., out_dtype=float32)`, probed once
per device); where torch lacks that (CPU builds, old torch) the half operands are upcast (exact) and multiplied in
fp32. For half inputs the row backward writes dZ in the input dtype *into the first half of each fp32 row* (a
strided [C, V] half view with row stride 2V): the dh / dW GEMMs get half operands and no extra buffer or cast pass
exists. fp32_logits=False keeps Z in the input dtype (C*V*2 bytes for bf16; the previous behaviour).

Rows that are masked (label -100 or out of range, or mask 0 in the loss) are never read by the row kernels; their
hidden rows are replaced by 0 before the GEMMs, so NaN there cannot reach any output (0 * NaN), and they get an
exact zero gradient.

Memory beyond the outputs and the gradients: the chunk buffer C*V*4 bytes (fp32 logits; C*V*elem without), one
[C, H] chunk of cleaned hidden states, and O(T) fp32 vectors. C is a pure function of (V, H, dtypes, fp32_logits,
the device's TOTAL memory, an optional requested value): `chunk_size`; never of the allocator's free memory, so a
resumed process runs the same GEMM shapes and the same fp32 summation order for dW. dW: half inputs accumulate
straight into the fp32 buffer through cuBLAS (addmm with out_dtype=float32) where a one-time probe shows torch
supports it; otherwise (CPU, older torch) each chunk's partial goes through one [V, H] half buffer (rounded to half
once, then summed in fp32).
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
    z_ptr,  # [n, V] logits of the chunk (read)
    dz_ptr,  # [n, V] dL/dZ (written): z_ptr itself, or a half view over the first half of each fp32 row of Z
    labels_ptr,
    valid_ptr,
    g_ptr,  # fp32 [n] dL/dlogp
    lse_ptr,
    g_ent_ptr,  # fp32 [n] dL/dentropy (HAS_GRAD_ENTROPY)
    ent_ptr,
    # sizes, strides
    V,
    stride_z,
    stride_dz,
    # scalars
    inv_temperature,
    # constants
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    valid = tl.load(valid_ptr + row) != 0
    z_row = z_ptr + row.to(tl.int64) * stride_z
    dz_row = dz_ptr + row.to(tl.int64) * stride_dz
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
        # The half dZ of block v0 lands on bytes of this row that blocks <= v0 already loaded (fp32 Z, half dZ at
        # the same row start). Other warps of this program may still be loading them: wait for every warp's load
        # before any store. (Free when dZ is Z itself: each element is read, then written, by the same thread.)
        tl.debug_barrier()
        tl.store(dz_row + cols, d.to(dz_ptr.dtype.element_ty), mask=in_v)


# ----------------------------------------------------------------------------------------------------------------
# launchers


def _block_v(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(BLOCK_V=2048, num_warps=8)
    return dict(BLOCK_V=64)  # the interpreter: small tiles are fast on CPU and exercise the V tail


# chunk sizing: C (a power of two in [MIN_CHUNK, MAX_CHUNK]) is the largest whose chunk buffers fit in
# 1/CHUNK_MEMORY_FRACTION of the device's total memory. 4096 rows keep GEMM 1 at the GEMM floor on an H100 for any
# V; 512 is the smallest chunk worth a cuBLAS call at V = 152k.
MIN_CHUNK, MAX_CHUNK, CHUNK_MEMORY_FRACTION, CPU_CHUNK = 512, 4096, 32, 32


def chunk_bytes_per_token(vocab: int, hidden: int, dtype: torch.dtype, fp32_logits: bool) -> int:
    """Bytes one token of a chunk holds: its logits row (fp32 when fp32_logits or fp32 inputs, else the input
    dtype) and its cleaned hidden row."""
    elem = torch.finfo(dtype).bits // 8
    return vocab * (4 if fp32_logits else elem) + hidden * elem


def chunk_size(
    num_tokens: int | None,
    vocab: int,
    hidden: int,
    dtype: torch.dtype,
    device: torch.device,
    requested: int | None = None,
    *,
    fp32_logits: bool = True,
) -> int:
    """Tokens per chunk: `requested` when given; on CUDA the largest power of two in [MIN_CHUNK, MAX_CHUNK] whose
    chunk buffers (chunk_bytes_per_token each) fit in 1/CHUNK_MEMORY_FRACTION of the device's TOTAL memory; elsewhere
    CPU_CHUNK (CPU tests then split sequences across chunks). A pure function of its arguments and the device's
    total memory (never of free memory), so every process of a run, a resumed one included, runs the same GEMM
    shapes. Clamped to num_tokens when that is given."""
    if requested is not None:
        c = int(requested)
    elif device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        per_token = chunk_bytes_per_token(vocab, hidden, dtype, fp32_logits)
        c = MIN_CHUNK
        while c * 2 <= MAX_CHUNK and c * 2 * per_token <= total // CHUNK_MEMORY_FRACTION:
            c *= 2
    else:
        c = CPU_CHUNK
    return max(1, c if num_tokens is None else min(c, num_tokens))


def chunked_bytes(T: int, V: int, H: int, dtype: torch.dtype, chunk: int, fp32_logits: bool = True) -> int:
    """Bytes one fused forward + backward (3-GEMM mode) moves with each GEMM reading its operands once: per chunk,
    GEMM 1 reads h_c and W and writes Z; the row kernels read Z twice and write dZ; GEMM 2 reads dZ and W and
    writes dh_c; GEMM 3 reads dZ and h_c and reads + writes the fp32 dW."""
    e = torch.finfo(dtype).bits // 8
    z = 4 if fp32_logits else e
    n_chunks = -(-T // chunk)
    per_logit = z + 2 * z + e + 2 * e  # GEMM 1 write, two row reads, dZ write, dZ read by GEMMs 2 and 3
    return T * V * per_logit + n_chunks * V * H * (2 * e + 8) + T * H * 4 * e


_FP32_OUT_GEMM: dict[tuple[torch.device, str], bool] = {}


def _fp32_out_ok(device: torch.device, kind: str) -> bool:
    """Whether cuBLAS runs half-input GEMMs with fp32 C and D here, probed once per device on tiny tensors and
    checked against an fp32 product. kind "addmm_acc": torch.addmm(acc32, a16, b16, out_dtype=float32, out=acc32)
    (the running dW sum never rounded to half); "mm": torch.mm(a16, b16, out_dtype=float32, out=z32) (GEMM 1 with
    fp32 logits); "addmm_bias": the same with a 1-D bias. CPU builds lack these ops (False: the callers take the
    fallbacks)."""
    if device.type != "cuda":
        return False
    key = (device, kind)
    if key not in _FP32_OUT_GEMM:
        try:
            a = torch.randn(8, 16, device=device).to(torch.bfloat16)
            b = torch.randn(16, 8, device=device).to(torch.bfloat16)
            want = a.float() @ b.float()
            out = torch.ones(8, 8, device=device)
            if kind == "addmm_acc":
                torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
                want = want + 1.0
            elif kind == "mm":
                torch.mm(a, b, out_dtype=torch.float32, out=out)
            else:
                bias = torch.arange(8, device=device, dtype=torch.float32)
                torch.addmm(bias, a, b, out_dtype=torch.float32, out=out)
                want = want + bias
            ok = bool(torch.allclose(out, want, atol=1e-3, rtol=1e-3))  # sync: one-time capability probe
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _FP32_OUT_GEMM[key] = ok
    return _FP32_OUT_GEMM[key]


@contextlib.contextmanager
def _tf32(device: torch.device, allow: bool):
    """fp32 cuBLAS GEMMs are IEEE fp32 unless the caller opted into TF32; torch's setting is restored on exit.

    torch >= 2.9 has `torch.backends.cuda.matmul.fp32_precision` ("ieee" | "tf32"; "none" = inherit the generic
    `torch.backends.fp32_precision`), and once that API has been used (transformers' enable_tf32 does) reading the
    legacy `allow_tf32` raises. So the precision is read and set through the new API where it exists; a previous
    value equal to the generic one is restored as "none" (inherit), so later changes of the generic setting still
    reach cuBLAS. Older torch: the legacy flag."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    want = "tf32" if allow else "ieee"
    try:
        prev = matmul.fp32_precision
    except AttributeError:  # torch < 2.9: only the legacy flag exists
        prev_flag = matmul.allow_tf32
        matmul.allow_tf32 = allow
        try:
            yield
        finally:
            matmul.allow_tf32 = prev_flag
        return
    restore = "none" if prev == getattr(torch.backends, "fp32_precision", None) else prev
    matmul.fp32_precision = want
    try:
        yield
    finally:
        matmul.fp32_precision = restore


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
    fp32_logits: bool = True,
) -> dict[str, torch.Tensor | None]:
    """The chunk loop. Modes:
    - forward only (forward=True, no gradient source): logp, lse (and entropy), fp32 [T].
    - fused (forward=True, grad_fn): per chunk, after the row forward, g_c = grad_fn(start, end, logp_c) and the
      gradients in the same loop (3 GEMMs).
    - recompute (forward=False, lse/entropy saved, grad_logp and optionally grad_entropy): gradients only.
    `valid` is uint8 [T] (0 = masked row). fp32_logits: keep each chunk's logits in fp32 (see the module doc).
    Returns a dict with logp, lse, entropy, dh (hidden dtype), dw (fp32), db (fp32, when need_bias and a bias is
    given), each None when not computed."""
    T, H = hidden.shape
    V = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    blocks = _block_v(device)
    inv_t = 1.0 / temperature
    labels, valid = labels.contiguous(), valid.contiguous()
    half = dtype != torch.float32
    z_dtype = torch.float32 if (fp32_logits or not half) else dtype
    bias_z = None if bias is None else bias.to(z_dtype).contiguous()  # added to Z (fp32 with fp32 logits)
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
            fp32_acc = half and _fp32_out_ok(device, "addmm_acc")
            dw_part = torch.empty(V, H, dtype=dtype, device=device) if half and not fp32_acc else None
        if need_bias:
            out["db"] = torch.zeros(V, dtype=torch.float32, device=device)
        if grad_logp is not None:
            grad_logp = grad_logp.float().contiguous()
        if has_grad_ent:
            grad_entropy = grad_entropy.float().contiguous()
    # ---- GEMM 1 variant: half operands with an fp32 result (cuBLAS out_dtype), or fp32 operands
    upcast = half and z_dtype == torch.float32 and not _fp32_out_ok(device, "mm" if bias is None else "addmm_bias")
    w_mm = weight.float() if upcast else weight  # [V, H]: only where torch has no fp32-out half GEMM (CPU)
    mm_kw = dict(out_dtype=torch.float32) if (half and z_dtype == torch.float32 and not upcast) else {}
    z_buf = torch.empty(chunk, V, dtype=z_dtype, device=device)  # the only V-wide buffer
    # dZ: in place in Z's dtype, or (half inputs, fp32 logits) a half view over the first half of each fp32 row
    dz_buf = z_buf.view(dtype)[:, :V] if z_dtype != dtype else z_buf
    zero = torch.zeros((), dtype=dtype, device=device)
    with _tf32(device, allow_tf32):
        for c0 in range(0, T, chunk):  # fixed order: deterministic
            c1 = min(c0 + chunk, T)
            n = c1 - c0
            v_c = valid[c0:c1]
            h_c = torch.where(v_c.view(torch.bool)[:, None], hidden[c0:c1], zero)  # (n, H); masked rows -> 0
            z, dz = z_buf[:n], dz_buf[:n]
            # ---- GEMM 1: the chunk's logits
            h_mm = h_c.float() if upcast else h_c
            if bias_z is None:
                torch.mm(h_mm, w_mm.t(), out=z, **mm_kw)
            else:
                torch.addmm(bias_z, h_mm, w_mm.t(), out=z, **mm_kw)
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
                z, dz, labels[c0:c1], v_c, g_c, lse[c0:c1], g_ent_c, ent_c, V, z.stride(0), dz.stride(0), inv_t,
                HAS_GRAD_ENTROPY=has_grad_ent, **blocks,
            )  # fmt: skip
            # ---- GEMMs 2 and 3 (operands in the input dtype)
            if need_hidden:
                torch.mm(dz, weight, out=out["dh"][c0:c1])
            if need_weight:
                if not half:
                    out["dw"].addmm_(dz.t(), h_c)
                elif fp32_acc:
                    torch.addmm(out["dw"], dz.t(), h_c, out_dtype=torch.float32, out=out["dw"])
                else:
                    torch.mm(dz.t(), h_c, out=dw_part)
                    out["dw"].add_(dw_part)
            if need_bias:
                out["db"].add_(dz.sum(0, dtype=torch.float32))
    return out
