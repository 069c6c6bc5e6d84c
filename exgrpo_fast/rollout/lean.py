"""A lean forward for Llama-family decoders (Llama, Mistral without sliding window, Qwen2, Qwen3) while sampling.

The same maths as the transformers modules, with fewer ops per layer: fused QKV and gate/up projections (weights
concatenated once per rollout call, so they always reflect the current policy), one fused RMSNorm op, rotary
embeddings from the model's own rotary module (any rope scaling it implements), and grouped-query attention for a
decode step computed with the query heads packed per KV head (no repeated K/V). Per decode step that is about a third
of the kernels of the module-by-module forward, which is what a small model's step costs on a CPU (and what a GPU
step costs without a CUDA graph).

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
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    return attn is not None and mlp is not None and all(hasattr(attn, n) for n in names) and hasattr(mlp, "gate_proj")


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """transformers' Llama/Qwen RMSNorm: normalise in fp32, cast back, scale."""
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * y.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class LeanDecoder:
    """decoder(input_ids [B, q], position_ids [B, q], mask [B, 1, q, K], cache) -> final hidden states [B, q, H]."""

    def __init__(self, model):
        self.body = model.get_decoder()
        self.layers = []
        for layer in self.body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
            qkv_b = torch.cat(biases) if all(b is not None for b in biases) else None
            self.layers.append(dict(
                idx=attn.layer_idx, in_norm=layer.input_layernorm, post_norm=layer.post_attention_layernorm,
                qkv_w=qkv_w.detach(), qkv_b=None if qkv_b is None else qkv_b.detach(),
                n_q=attn.q_proj.weight.shape[0], n_kv=attn.k_proj.weight.shape[0], head_dim=attn.head_dim,
                scaling=attn.scaling, q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
                o_proj=attn.o_proj, gate_up_w=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                n_inter=mlp.gate_proj.weight.shape[0], down=mlp.down_proj,
            ))  # fmt: skip

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        x = self.body.embed_tokens(input_ids)  # (B, q, H)
        B, q, _ = x.shape
        cos, sin = self.body.rotary_emb(x, position_ids)  # (B, q, D)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, q, D)
        for L in self.layers:
            D = L["head_dim"]
            h = _rms_norm(x, L["in_norm"])
            qkv = F.linear(h, L["qkv_w"], L["qkv_b"])
            qs, ks, vs = qkv.split([L["n_q"], L["n_kv"], L["n_kv"]], dim=-1)
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
            else:
                o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=L["scaling"],
                                                   enable_gqa=h_q != h_kv)  # fmt: skip
                o = o.transpose(1, 2).reshape(B, q, h_q * D)
            x = x + L["o_proj"](o)
            h = _rms_norm(x, L["post_norm"])
            gate, up = F.linear(h, L["gate_up_w"]).split(L["n_inter"], dim=-1)
            x = x + L["down"](F.silu(gate) * up)
        return _rms_norm(x, self.body.norm)
