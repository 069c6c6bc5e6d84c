"""Model FLOPs of the training passes, for MFU, counted the way nanoGPT and torchtitan count them.

Forward FLOPs of a packed micro-batch (sequences of lengths n_i, N_loss rows that reach the LM head):
    2 * P_body * sum_i n_i                 every matmul of the decoder (P_body = weights of its linear layers)
  + 4 * L * d_attn * sum_i q_i k_i          attention scores and their weighted sum (QK^T and AV), each q_i x k_i x
                                           d_attn per layer for a segment of q_i queries over k_i keys (q_i = k_i =
                                           n_i without shared prompts), d_attn = heads x head_dim (not halved for
                                           causality, torchtitan's convention: it is what a dense kernel computes)
  + 2 * P_head * N_loss                    the LM head (run on the loss rows only: the fused loss never computes
                                           logits elsewhere, so no other row counts)
A backward is twice its forward (fwd + bwd = 3 x fwd, the 6N rule). The embedding lookup and the norms are not
matmuls and do not count. GQA does not change the attention FLOPs (they scale with query heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlopShape:
    """What the FLOP count needs of a model: matmul weights of the decoder body and of the LM head, layers and the
    attention width."""

    body_params: int
    head_params: int
    layers: int
    attn_width: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> FlopShape:
        """Count the linear layers of `model` (LoRA adapters included; DTensor shards count at their global size)."""
        head = model.get_output_embeddings()
        head_params = head.weight.numel()
        body = 0
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m is not head:
                body += m.weight.numel()
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(body, head_params, config.num_hidden_layers, config.num_attention_heads * head_dim)


def forward_flops(
    shape: FlopShape, seq_lens: list[int] | tuple[int, ...], loss_rows: int, key_lens: list[int] | tuple[int, ...] = ()
) -> float:
    """Forward FLOPs of one packed micro-batch (see the module docstring); key_lens: each segment's keys when they
    differ from its queries (a shared prompt's continuations: PackedBatch.seq_lens_k)."""
    tokens = sum(seq_lens)
    squares = sum(q * k for q, k in zip(seq_lens, key_lens or seq_lens))
    return (
        2.0 * shape.body_params * tokens
        + 4.0 * shape.layers * shape.attn_width * squares
        + (2.0 * shape.head_params * loss_rows)
    )


# dense peak FLOP/s per device name fragment: (16-bit tensor cores, fp32 without TF32); the first match wins
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.4e12, 66.9e12),
    ("H100 PCIe", 756.0e12, 51.2e12),
    ("H100 NVL", 835.0e12, 60.0e12),
    ("H100", 989.4e12, 66.9e12),
    ("A100", 312.0e12, 19.5e12),
)


def peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of a known GPU in the compute dtype (None when unknown)."""
    for fragment, half, fp32 in PEAK_FLOPS:
        if fragment in device_name:
            return half if dtype in (torch.bfloat16, torch.float16) else fp32
    return None
