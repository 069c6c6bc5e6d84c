"""A preallocated per-row KV cache that plugs into any transformers decoder through its `cache.update` call.

Layout per layer: keys and values [B, Hkv, L + 1, D]. Row b holds its dialogue's tokens contiguously in slots
[0, lens[b]); slot L is a trash slot where padding queries and finished rows write (never read: the attention sees
slots [0, kv_len) with kv_len <= L). Each forward writes its new tokens at per-row slots (`write_idx` [B, q]) with one
scatter per layer and returns a fixed-shape view of the cache, so a ragged batch (prompts of different lengths,
user turns of different lengths, rows that have stopped) needs no padding inside the cache and no re-prefill.

The model does not know the layout: the caller passes explicit position_ids and a 4-D boolean mask built from
`lens` (transformers returns a 4-D mask as-is), which is how the same object works for Llama, Qwen2/3 and Gemma
(sliding layers get their own mask). Buffers are allocated lazily on a layer's first update, with that layer's own
head count, head dim and dtype.
"""

from __future__ import annotations

import torch


class RowKVCache:
    """Static KV cache with per-row write positions (duck-types the transformers Cache `update` interface)."""

    is_compileable = False

    def __init__(self, batch: int, max_len: int, device: torch.device):
        self.batch, self.max_len, self.device = batch, max_len, torch.device(device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.write_idx: torch.Tensor | None = None  # (B, q) slots the current forward writes (max_len = trash)
        self.kv_len = max_len  # slots the attention reads in the current forward

    # -- the transformers interface ------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write key/value states [B, Hkv, q, D] at write_idx; return the cache views [B, Hkv, kv_len, D]."""
        if layer_idx == len(self.keys):
            B, H, _, D = key_states.shape
            shape = (B, H, self.max_len + 1, D)
            self.keys.append(torch.zeros(shape, dtype=key_states.dtype, device=key_states.device))
            self.values.append(torch.zeros(shape, dtype=value_states.dtype, device=value_states.device))
        k, v = self.keys[layer_idx], self.values[layer_idx]
        B, H, q, D = key_states.shape
        index = self.write_idx[:, None, :, None].expand(B, H, q, D)
        k.scatter_(2, index, key_states.to(k.dtype))
        v.scatter_(2, index, value_states.to(v.dtype))
        return k[:, :, : self.kv_len], v[:, :, : self.kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def __len__(self) -> int:
        return len(self.keys)

    # -- prefix sharing -------------------------------------------------------------------------------------------
    def expand(self, repeats: int, max_len: int, used: int, into: RowKVCache | None = None) -> RowKVCache:
        """A cache of B * repeats rows and max_len slots whose row b*repeats + g is a copy of row b's first `used`
        slots (copy-on-expand: the prompt is prefilled once per problem and shared by its G samples). With `into`
        (a cache of that shape), its buffers are reused in place, so a CUDA graph captured on them stays valid."""
        out = into if into is not None else RowKVCache(self.batch * repeats, max_len, self.device)
        if into is not None and (into.batch, into.max_len, len(into)) != (self.batch * repeats, max_len, len(self)):
            raise ValueError("expand(into=...): the target cache has a different shape")
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if into is None:
                B, H, _, D = k.shape
                out.keys.append(torch.zeros((B * repeats, H, max_len + 1, D), dtype=k.dtype, device=k.device))
                out.values.append(torch.zeros((B * repeats, H, max_len + 1, D), dtype=v.dtype, device=v.device))
            out.keys[i][:, :, :used] = k[:, :, :used].repeat_interleave(repeats, dim=0)
            out.values[i][:, :, :used] = v[:, :, :used].repeat_interleave(repeats, dim=0)
        return out

    # -- compaction (eager decode: finished rows stop costing compute) ----------------------------------------------
    def select_rows(self, rows: torch.Tensor, used: int) -> RowKVCache:
        """A new cache holding copies of `rows` (their first `used` slots), same max_len."""
        out = RowKVCache(int(rows.numel()), self.max_len, self.device)
        for src_list, dst_list in ((self.keys, out.keys), (self.values, out.values)):
            for src in src_list:
                _, H, _, D = src.shape
                dst = torch.zeros((out.batch, H, self.max_len + 1, D), dtype=src.dtype, device=src.device)
                dst[:, :, :used] = src[rows, :, :used]
                dst_list.append(dst)
        return out

    def write_rows(self, dst: RowKVCache, dst_rows: torch.Tensor, src_rows: torch.Tensor, used: int) -> None:
        """Copy this cache's rows src_rows (first `used` slots) back into dst's rows dst_rows."""
        for s_list, d_list in ((self.keys, dst.keys), (self.values, dst.values)):
            for s, d in zip(s_list, d_list):
                d[:, :, :used].index_copy_(0, dst_rows, s[src_rows, :, :used])
