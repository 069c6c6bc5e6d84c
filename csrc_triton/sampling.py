"""Next-token sampling in one kernel: Gumbel-max over tempered logits with counter-based noise, optional top-p.

The PyTorch twin is exgrpo_fast/rollout/sampling.py (sample_next_reference); both compute the same function, bit
for bit: per row b with logits x [V], temperature tau, row key k_b = hash(seed_b, position_b):
    z_v = x_v * fp32(1/tau)                                  (IEEE fp32 multiply)
    u_v = ((hash(k_b, v) >> 9) + 0.5) * 2^-23                (23 random bits, exact: u in [2^-24, 1 - 2^-24])
    s_v = z_v - log(-log(u_v))                               (Gumbel noise; `log` is _log_exact below)
    token = argmax_v s_v over the kept set (first index on ties); kept = every v when top_p = 1, else
    kept = {v : sum_{w : z_w > z_v} softmax(z)_w < top_p}    (a token is kept when the mass strictly above it is
                                                                below top_p; tied logits are kept or dropped together)
Temperature 0 is the plain argmax of x. Rows of all -inf give token 0.

Bit-identical by construction: every step is an exactly rounded IEEE operation (integer hash, +, -, *, division
with div_rn, bit casts), the same sequence in both, compiled without FMA contraction (enable_fp_fusion=False). The
log is not libm's (CPU libms, numpy's and CUDA's differ in the last bit for ~20% of fp32 inputs): _log_exact is
a fixed 17-operation evaluation (exponent split by bit arithmetic, atanh series to s^9) within 2 ulp of the true log
(checked over every input it can get, tests/test_sampling.py).

Passes over the logits, one program per row:
    pass 1: online max m and sum Z of exp(z - m); the Gumbel argmax over all tokens (its z and index).
            top_p = 1 (or temperature 0): done, one read of the row.
    top_p < 1, a rejection chain (exact, no sort): the current candidate c is the Gumbel argmax over {z > z_prev};
            a pass computes F = sum_{z > z_c} exp(z - m) and, speculatively, the Gumbel argmax over {z > z_c}.
            F < top_p * Z: c is kept, and it is the answer (no kept token scores higher: every kept token has
            z >= z_c's set bound, and c is the best of a superset). Else c and every token tied with it are out,
            and the next candidate was found in the same pass.
            A pass per candidate: c is a Gumbel sample from the tokens above the previous one, so it is kept with
            probability >= top_p; about 1 + 1/top_p reads of the row on average, at most the number of distinct
            logit values above the answer (loops stay on the device: no host sync, capturable in a CUDA graph).
Blocks whose largest z cannot beat the running best even with the largest possible noise (z_max + G_MAX <= best)
skip the noise arithmetic (most of a real LM's vocabulary, which sits far below its top logits).

Bytes: B*V*elem read once at top_p = 1 (bf16, B=64, V=151936: 19.4 MB), about (1 + 1/top_p) times at top_p < 1,
and 8*B written; the PyTorch sampler it replaces wrote ~1.2 GB at top_p = 1 (benches/bench_sampling.py counts both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The kernels below write their constants as literals (a jit function reads no plain module global): the exactly
# representable fp32 values named in exgrpo_fast/rollout/sampling.py (_LOG_OFF, _C3.._C9, _LN2_HI/_LO, _TWO_M23),
# held to the same bits over every input by tests/test_sampling.py.
# the largest noise value: -log(-log(1 - 2^-24)) = 16.635532...; an upper bound is all the block skip needs
G_MAX = 16.64


@triton.jit
def _mix32(x):
    """A 32-bit integer finaliser (xor-shift-multiply rounds) on uint32 lanes (products wrap mod 2^32)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B
    x = ((x >> 16) ^ x) * 0x45D9F3B
    return (x >> 16) ^ x


@triton.jit
def _log_exact(x):
    """log(x) for positive normal fp32 x from exactly rounded operations only (see the module doc)."""
    bits = x.to(tl.int32, bitcast=True)
    k = (bits - 0x3F3504F3) >> 23  # arithmetic shift: the exponent that brings x into [sqrt(1/2), sqrt(2))
    m = (bits - k * 8388608).to(tl.float32, bitcast=True)
    f = m - 1.0  # exact (Sterbenz)
    s = tl.div_rn(f, f + 2.0)
    z = s * s
    t = s + s
    poly = ((z * 0.1111111119389534 + 0.1428571492433548) * z + 0.20000000298023224) * z + 0.3333333432674408
    r = t + t * (z * poly)  # 2 atanh(s) = log(1 + f)
    kf = k.to(tl.float32)
    return kf * 0.6931381225585938 + (r + kf * 9.058001523953862e-06)


@triton.jit
def _neg_gumbel(key, cols):
    """log(-log(u)) for the row key and vocab ids `cols` (the score is z minus this)."""
    lanes = _mix32(cols.to(tl.uint32) * 0x27D4EB2)
    x = _mix32(key ^ lanes)
    u = ((x >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    return _log_exact(-_log_exact(u))


@triton.jit
def _sample_kernel(
    # pointers
    logits_ptr,  # [B, V], unit stride along V
    seeds_ptr,  # int64 [B] 32-bit row seeds
    positions_ptr,  # int64 [B]
    out_ptr,  # int64 [B]
    # sizes, strides
    V,
    stride_b,
    # scalars
    inv_temperature,  # fp32(1 / temperature)
    top_p,
    # constants
    GREEDY: tl.constexpr,
    TOP_P: tl.constexpr,
    G_MAX: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = logits_ptr + row.to(tl.int64) * stride_b
    cols0 = tl.arange(0, BLOCK_V)
    # row key: mix32((seed ^ position * 0x9E3779B1) mod 2^32), in uint32 lanes
    seed = tl.load(seeds_ptr + row).to(tl.uint32)
    pos = tl.load(positions_ptr + row).to(tl.uint32)
    key = _mix32(seed ^ (pos * 0x9E3779B1))
    best = tl.full((), float("-inf"), tl.float32)  # best score so far (greedy: best logit)
    best_idx = tl.zeros((), tl.int32)
    best_z = tl.full((), float("-inf"), tl.float32)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    # ---- pass 1: max, sum of exp (top-p only) and the Gumbel argmax over every token
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        if GREEDY:
            b_max = tl.max(x, 0)
            b_idx = tl.argmax(x, 0)
            if b_max > best:
                best, best_idx = b_max, v0 + b_idx
        else:
            z = x * inv_temperature
            z_max = tl.max(z, 0)
            if TOP_P:
                m_new = tl.maximum(m, z_max)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf while all is -inf
                s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), 0)
                m = m_new
            if z_max + G_MAX > best:  # else no token of this block can win, whatever its noise
                score = z - _neg_gumbel(key, cols)
                b_best = tl.max(score, 0)
                b_idx = tl.argmax(score, 0)  # first index of the block's best
                if b_best > best:  # strict: an earlier block keeps a tie
                    best, best_idx = b_best, v0 + b_idx
                    best_z = tl.sum(tl.where(cols0 == b_idx, z, 0.0), 0)
    # ---- top-p: the rejection chain (see the module doc); a row of all -inf (m = -inf) keeps token 0
    if TOP_P:
        bound = top_p * s
        done = (m == float("-inf")).to(tl.int32)
        while done == 0:
            mass = tl.zeros((), tl.float32)
            nxt = tl.full((), float("-inf"), tl.float32)
            nxt_idx = best_idx
            nxt_z = best_z
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + cols0
                z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temperature
                above = z > best_z
                mass += tl.sum(tl.where(above, tl.exp(z - m), 0.0), 0)
                z_max = tl.max(tl.where(above, z, float("-inf")), 0)
                if z_max + G_MAX > nxt:
                    score = tl.where(above, z - _neg_gumbel(key, cols), float("-inf"))
                    b_best = tl.max(score, 0)
                    b_idx = tl.argmax(score, 0)
                    if b_best > nxt:
                        nxt, nxt_idx = b_best, v0 + b_idx
                        nxt_z = tl.sum(tl.where(cols0 == b_idx, z, 0.0), 0)
            # nothing above c (nxt = -inf): c is the top token, always kept (also ends the loop if top_p * Z
            # underflows to 0 or a NaN logit poisons the sums)
            done = ((mass < bound) | (nxt == float("-inf"))).to(tl.int32)
            if done == 0:
                best_idx, best_z = nxt_idx, nxt_z
    tl.store(out_ptr + row, best_idx.to(tl.int64))


# ----------------------------------------------------------------------------------------------------------------
# launcher


def _launch_config(device: torch.device) -> dict:
    if device.type == "cuda":
        # one program per row: 16 warps keep enough loads in flight on its SM; 50-52 registers, no spill on sm_80
        # or sm_90 (2048 x 8 warps spilled 4 B on sm_80 with the top-p loop)
        return dict(BLOCK_V=2048, num_warps=16)
    return dict(BLOCK_V=512)  # the interpreter: its cost is per block and op; tests use V > 512 for the V tail


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, seeds: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Next tokens int64 [B] from logits [B, V] (any float dtype); see the module doc. No host sync."""
    B, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    greedy = temperature <= 0.0
    _sample_kernel[(B,)](
        logits, seeds, positions, out, V, logits.stride(0), 1.0 / temperature if not greedy else 1.0, float(top_p),
        GREEDY=greedy, TOP_P=(not greedy) and top_p < 1.0, G_MAX=G_MAX, **_launch_config(logits.device),
        enable_fp_fusion=False,
    )  # fmt: skip
    return out
