"""Sampling on the device with per-row counter-based noise: no host sync, no torch.Generator state, graph-safe.

Each row (dialogue) has its own 32-bit seed; the noise for the token that will sit at cache position `pos` of that
row is a hash of (seed, pos, vocab id). So a dialogue's samples depend only on its seed and its own context, never
on which other dialogues share its batch, how the batch is chunked, or whether finished rows were dropped from it.
Sampling is the Gumbel-max trick over the tempered, nucleus-filtered logits:
    token = argmax_{v in top-p set} (logits_v * fp32(1/T) - log(-log u_v)),  u_v = hash(seed, pos, v) in (0, 1)
which draws exactly from softmax(logits / T) restricted to the top-p set (renormalised), like torch.multinomial.
The top-p set is every token whose logit is tied with or above the smallest logit kept by the usual rule (a token
is kept when the probability mass of the tokens strictly above it is below top_p): tied logits are kept together,
whatever order a sort would put them in.

Two implementations of the same function, bit for bit at top_p = 1 (and the same kept set at top_p < 1 except
where the mass above a token is within fp32 rounding of top_p):
- `sample_next_reference`: PyTorch ops (CPU and the truth in tests; ~20 [B, V] tensor ops, the noise looked up in
  a table of log(-log u) over the 2**23 values u can take; a sort at top_p < 1);
- the fused Triton kernel csrc_triton/sampling.py (through exgrpo_fast.ops.sample_tokens): reads the logits once at
  top_p = 1 and ~1 + 1/top_p times at top_p < 1, writes B tokens. `sample_next` takes it on CUDA.
Bit-identity comes from arithmetic that every backend rounds the same way: the noise's log is `log_exact` (exactly
rounded operations only), not a libm log, and the hash keeps every intermediate below 2**63 (32-bit lanes,
multipliers < 2**32), so int64 arithmetic never wraps: CPU, CUDA and the kernel give the same bits.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: a 32-bit lane times it stays < 2**59 in int64

# exactly representable fp32 constants of log_exact (the same numbers as csrc_triton/sampling.py)
_LOG_OFF = 0x3F3504F3  # bits of fp32 sqrt(1/2)
_C3, _C5, _C7, _C9 = 0.3333333432674408, 0.20000000298023224, 0.1428571492433548, 0.1111111119389534
_LN2_HI, _LN2_LO = 0.6931381225585938, 9.058001523953862e-06
_TWO_M23 = 1.1920928955078125e-07  # 2**-23


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply rounds) on int64 lanes holding values in [0, 2**32)."""
    x = ((x >> 16) ^ x) * _MUL & _M32
    x = ((x >> 16) ^ x) * _MUL & _M32
    return (x >> 16) ^ x


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per-row 32-bit keys [B] from 32-bit row seeds [B] (mix_seed) and token positions [B] (both int64)."""
    return _mix32((seeds ^ positions * 0x9E3779B1) & _M32)


_VOCAB_LANES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _vocab_lanes(vocab: int, device: torch.device) -> torch.Tensor:
    """Per-vocab-id 32-bit offsets [1, V], built once per (vocab, device): fewer kernels per decode step. The
    first call always runs eagerly (the first token of a turn is sampled before any CUDA graph capture)."""
    key = (vocab, torch.device(device))
    if key not in _VOCAB_LANES:
        v = torch.arange(vocab, device=device, dtype=torch.int64)
        _VOCAB_LANES[key] = _mix32(v * 0x27D4EB2 & _M32)[None, :]
    return _VOCAB_LANES[key]


def row_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform noise in (0, 1), [B, vocab] fp32, a pure function of (seed, position, vocab id) per row: 23 random
    bits, u = (k + 0.5) * 2**-23, exact in fp32, so u lies in [2**-24, 1 - 2**-24] (never 0 or 1)."""
    keys = row_keys(seeds, positions)  # (B,)
    x = _mix32(keys[:, None] ^ _vocab_lanes(vocab, seeds.device))
    return ((x >> 9).to(torch.float32) + 0.5) * _TWO_M23


_NOISE_TABLES: dict[torch.device, torch.Tensor] = {}


def noise_table(device: torch.device) -> torch.Tensor:
    """log(-log u) for every u the sampler draws, u_k = (k + 0.5) 2**-23, k < 2**23: fp32 [2**23] (32 MB), built
    once per device with log_exact. The noise is a function of the 23 hash bits k only, so the PyTorch sampler looks
    it up (one gather instead of ~35 elementwise [B, V] ops); the kernel computes the same bits inline."""
    device = torch.device(device)
    if device not in _NOISE_TABLES:
        u = (torch.arange(1 << 23, device=device, dtype=torch.float32) + 0.5) * _TWO_M23
        _NOISE_TABLES[device] = log_exact(-log_exact(u))
    return _NOISE_TABLES[device]


def log_neg_log_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """log(-log u) [B, vocab] fp32 for u = row_uniform(seeds, positions, vocab): the score is z minus this."""
    keys = row_keys(seeds, positions)  # (B,)
    x = _mix32(keys[:, None] ^ _vocab_lanes(vocab, seeds.device))
    return torch.take(noise_table(seeds.device), x >> 9)


def log_exact(x: torch.Tensor) -> torch.Tensor:
    """log(x) for positive normal fp32 x from exactly rounded operations only (integer bit arithmetic, +, -, *, /),
    within 2 ulp of the true log, the same bits on every backend (libm logs differ in the last bit between CPU,
    numpy and CUDA). x = 2^k m with m in [sqrt(1/2), sqrt(2)); log(m) = 2 atanh(s), s = (m-1)/(m+1), to s^9."""
    bits = x.view(torch.int32)
    k = (bits - _LOG_OFF) >> 23  # arithmetic shift
    m = (bits - k * 8388608).view(torch.float32)
    f = m - 1.0  # exact (Sterbenz)
    s = f / (f + 2.0)
    z = s * s
    t = s + s
    poly = ((z * _C9 + _C7) * z + _C5) * z + _C3
    r = t + t * (z * poly)
    kf = k.to(torch.float32)
    return kf * _LN2_HI + (r + kf * _LN2_LO)


def top_p_keep(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """bool [B, V]: the tokens a nucleus of mass top_p keeps (see the module doc: tied logits together)."""
    probs = torch.softmax(scaled, dim=-1)
    sorted_z, order = scaled.sort(dim=-1, descending=True)
    sorted_p = probs.gather(-1, order)
    before = sorted_p.cumsum(-1).roll(1, -1)  # mass strictly before each sorted position (exclusive scan)
    before[:, 0] = 0.0
    n_keep = (before < top_p).sum(-1, keepdim=True).clamp_min(1)
    return scaled >= sorted_z.gather(-1, n_keep - 1)


def sample_next_reference(
    logits: torch.Tensor, temperature: float, top_p: float, seeds: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """The PyTorch definition of the sampler (module doc): next tokens [B] (int64) from logits [B, V]."""
    if temperature <= 0.0:
        return logits.argmax(-1)
    scaled = logits.float() * (1.0 / temperature)
    scores = scaled - log_neg_log_uniform(seeds, positions, logits.shape[-1])
    if top_p < 1.0:
        scores = scores.masked_fill(~top_p_keep(scaled, top_p), float("-inf"))
    return scores.argmax(-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Next tokens [B] (int64) from logits [B, V]: greedy (argmax) at temperature 0, else tempered nucleus sampling
    with the noise of row_uniform(seeds, positions). Top-p always keeps the most likely token. No host sync.

    impl: "auto" (the fused kernel on CUDA, the PyTorch ops elsewhere: the Triton interpreter would be slower than
    them on CPU), "triton" (ops.sample_tokens; on CPU through the interpreter) or "torch"."""
    if impl == "auto":
        impl = "triton" if logits.is_cuda else "torch"
    if impl == "triton":
        from exgrpo_fast import ops

        return ops.sample_tokens(logits, temperature, top_p, seeds, positions)
    if impl != "torch":
        raise ValueError(f"impl={impl!r}: expected 'auto', 'triton' or 'torch'")
    return sample_next_reference(logits, temperature, top_p, seeds, positions)


def mix_seed(*parts: int) -> int:
    """A 32-bit row seed from integers (host side, once per dialogue): splitmix64 over the parts, top 32 bits."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 32
