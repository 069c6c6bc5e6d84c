"""Sampling on the device with per-row counter-based noise: no host sync, no torch.Generator state, graph-safe.

Each row (dialogue) has its own 32-bit seed; the noise for the token that will sit at cache position `pos` of that
row is a hash of (seed, pos, vocab id). So a dialogue's samples depend only on its seed and its own context, never
on which other dialogues share its batch, how the batch is chunked, or whether finished rows were dropped from it.
Sampling is the Gumbel-max trick over the tempered, nucleus-filtered logits:
    token = argmax_{v in top-p set} (logits_v / T - log(-log u_v)),  u_v = hash(seed, pos, v) in (0, 1)
which draws exactly from softmax(logits / T) restricted to the top-p set (renormalised), like torch.multinomial,
but as a handful of elementwise ops and one argmax (capturable in a CUDA graph).

The hash keeps every intermediate below 2**63 (32-bit lanes, multipliers < 2**27), so int64 arithmetic never wraps
and CPU and CUDA give the same bits.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: a 32-bit lane times it stays < 2**59 in int64


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
    """Uniform noise in (0, 1), [B, vocab] fp32, a pure function of (seed, position, vocab id) per row."""
    keys = row_keys(seeds, positions)  # (B,)
    x = _mix32(keys[:, None] ^ _vocab_lanes(vocab, seeds.device))
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # 24 random bits, never 0 or 1


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, seeds: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Next tokens [B] (int64) from logits [B, V]: greedy (argmax) at temperature 0, else tempered nucleus sampling
    with the noise of row_uniform(seeds, positions). Top-p always keeps the most likely token."""
    if temperature <= 0.0:
        return logits.argmax(-1)
    scaled = (logits if logits.dtype == torch.float32 else logits.float()) / temperature
    gumbel = -torch.log(-torch.log(row_uniform(seeds, positions, logits.shape[-1])))
    scores = scaled + gumbel
    if top_p < 1.0:
        probs = torch.softmax(scaled, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < top_p  # mass before this token < top_p
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.argmax(-1)


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
