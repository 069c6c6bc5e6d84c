"""A lean forward for Llama-family decoders (Llama, Mistral without sliding window, Qwen2, Qwen3) while sampling.

The same maths as the transformers modules, with fewer ops per layer: one fused RMSNorm op, rotary embeddings from
the model's own rotary module (any rope scaling it implements), grouped-query attention for a decode step computed
with the query heads packed per KV head (no repeated K/V), and on the CPU fused QKV and gate/up projections. Per
decode step that is about a third of the kernels of the module-by-module forward, which is what a small model's step
costs on a CPU (and what a GPU step costs without a CUDA graph).

Fused weights are copies (a 7B model's QKV and gate/up are ~8.5 GB in bf16), so they are made on the CPU only, where
op count matters and memory does not; on a GPU the decode step is a CUDA graph, whose replay makes the extra launches
of separate projections nearly free, and the projections read the model's own weights. The decoder lives across
rollout calls (rollout.Engine keeps it): `refresh()` copies the weights into the fused buffers in place when any
source weight changed (tensor version counters: an optimizer step or a sampler-copy refresh bumps them).

Prefill (several query tokens per row) with grouped-query heads expands K/V to the query heads before SDPA: with a
mask, SDPA's enable_gqa has no fused CUDA kernel and falls back to the math path (fp32 scores: ~15 GB at 512 rows x
12 heads x 300 x 2048), while equal head counts take the memory-efficient kernel.

Used only in a single process: it reads the layers' weights directly, so FSDP's per-layer hooks (which gather
sharded weights) would not run. Everything else (Gemma-style models, sliding windows, other MLPs) uses the
transformers forward. tests/test_rollout.py checks both paths against a plain full forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def supports(model) -> bool:
    """True when the lean forward reproduces this model's decoder exactly."""
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED or getattr(config, "hidden_act", None) != "silu":
        return False
    if getattr(config, "pretraining_tp", 1) != 1 or getattr(config, "mlp_bias", False):
        return False
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return False
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        return False
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None or not all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    layer = body.layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return False
    # plain nn.Linear projections only: a wrapped one (a peft LoRA layer) computes more than its `.weight`
    projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return all(type(m) is torch.nn.Linear for m in projections)


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """transformers' Llama/Qwen RMSNorm: normalise in fp32, cast back, scale."""
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * y.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class LeanDecoder:
    """decoder(input_ids [B, q], position_ids [B, q], mask [B, 1, q, K], cache) -> final hidden states [B, q, H].
    fuse: concatenate QKV and gate/up weights into buffers of their own (default: on the CPU only)."""

    def __init__(self, model, fuse: bool | None = None):
        self.body = model.get_decoder()
        self.fuse = next(model.parameters()).device.type == "cpu" if fuse is None else fuse
        self.layers = []
        for layer in self.body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(dict(
                idx=attn.layer_idx, in_norm=layer.input_layernorm, post_norm=layer.post_attention_layernorm,
                q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, n_q=attn.q_proj.weight.shape[0],
                n_kv=attn.k_proj.weight.shape[0], head_dim=attn.head_dim, scaling=attn.scaling,
                q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None), o_proj=attn.o_proj,
                gate=mlp.gate_proj, up=mlp.up_proj, n_inter=mlp.gate_proj.weight.shape[0], down=mlp.down_proj,
            ))  # fmt: skip
        self._versions: tuple[int, ...] = ()
        if self.fuse:
            for L in self.layers:
                biases = [L["q"].bias, L["k"].bias, L["v"].bias]
                L["qkv_w"] = torch.cat([L["q"].weight, L["k"].weight, L["v"].weight]).detach()
                L["qkv_b"] = torch.cat(biases).detach() if all(b is not None for b in biases) else None
                L["gate_up_w"] = torch.cat([L["gate"].weight, L["up"].weight]).detach()
            self._versions = self._source_versions()

    def _sources(self) -> list[torch.Tensor]:
        out = []
        for L in self.layers:
            out += [L["q"].weight, L["k"].weight, L["v"].weight, L["gate"].weight, L["up"].weight]
            out += [b for b in (L["q"].bias, L["k"].bias, L["v"].bias) if b is not None]
        return out

    def _source_versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in self._sources())

    @torch.no_grad()
    def refresh(self) -> bool:
        """Copy the source weights into the fused buffers, in place, if any changed since the last copy (True then).
        Called once per rollout call."""
        if not self.fuse:
            return False
        versions = self._source_versions()
        if versions == self._versions:
            return False
        for L in self.layers:
            torch.cat([L["q"].weight, L["k"].weight, L["v"].weight], out=L["qkv_w"])
            if L["qkv_b"] is not None:
                torch.cat([L["q"].bias, L["k"].bias, L["v"].bias], out=L["qkv_b"])
            torch.cat([L["gate"].weight, L["up"].weight], out=L["gate_up_w"])
        self._versions = versions
        return True

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        x = self.body.embed_tokens(input_ids)  # (B, q, H)
        B, q, _ = x.shape
        cos, sin = self.body.rotary_emb(x, position_ids)  # (B, q, D)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, q, D)
        for L in self.layers:
            D = L["head_dim"]
            h = _rms_norm(x, L["in_norm"])
            if self.fuse:
                qs, ks, vs = F.linear(h, L["qkv_w"], L["qkv_b"]).split([L["n_q"], L["n_kv"], L["n_kv"]], dim=-1)
            else:
                qs, ks, vs = L["q"](h), L["k"](h), L["v"](h)
            qs, ks, vs = qs.view(B, q, -1, D), ks.view(B, q, -1, D), vs.view(B, q, -1, D)
            if L["q_norm"] is not None:  # Qwen3: per-head RMSNorm of queries and keys
                qs, ks = _rms_norm(qs, L["q_norm"]), _rms_norm(ks, L["k_norm"])
            qs, ks, vs = qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2)  # (B, heads, q, D)
            qs = qs * cos + _rotate_half(qs) * sin
            ks = ks * cos + _rotate_half(ks) * sin
            keys, values = cache.update(ks, vs, L["idx"])  # (B, Hkv, K, D)
            h_kv, h_q = keys.shape[1], qs.shape[1]
            if q == 1 and h_q != h_kv:  # decode: pack each KV head's query heads as its "positions"
                o = F.scaled_dot_product_attention(qs.reshape(B, h_kv, h_q // h_kv, D), keys, values,
                                                   attn_mask=mask, scale=L["scaling"])  # fmt: skip
                o = o.reshape(B, h_q * D)[:, None]  # (B, 1, Hq * D)
            else:  # prefill: equal head counts (see the module docstring: enable_gqa with a mask is math-only)
                if h_q != h_kv:
                    keys = keys.repeat_interleave(h_q // h_kv, dim=1)
                    values = values.repeat_interleave(h_q // h_kv, dim=1)
                o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=L["scaling"])
                o = o.transpose(1, 2).reshape(B, q, h_q * D)
            x = x + L["o_proj"](o)
            h = _rms_norm(x, L["post_norm"])
            if self.fuse:
                gate, up = F.linear(h, L["gate_up_w"]).split(L["n_inter"], dim=-1)
            else:
                gate, up = L["gate"](h), L["up"](h)
            x = x + L["down"](F.silu(gate) * up)
        return _rms_norm(x, self.body.norm)
