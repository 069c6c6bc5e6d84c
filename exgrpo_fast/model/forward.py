"""Forward passes over a PackedBatch: final hidden states at the loss positions only, so the LM head runs inside the
fused loss and never on prompt tokens."""

from __future__ import annotations

import torch

from exgrpo_fast.data.packing import PackedBatch

# A 0-size 4-D mask tells transformers' mask builder that the mask is "already prepared": it then builds nothing
# (no O(T^2) block-causal mask), and the packed attention backend ignores it and uses cu_seqlens instead.
_NO_MASK = torch.empty(1, 1, 0, 0, dtype=torch.bool)


def _body(model: torch.nn.Module) -> torch.nn.Module:
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None:
        body = getattr(model, model.base_model_prefix)
    return body


def packed_hidden_states(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Final hidden states (after the final norm: what the LM head consumes) of every packed token, (T, H)."""
    out = _body(model)(
        input_ids=batch.input_ids.unsqueeze(0),
        position_ids=batch.position_ids.unsqueeze(0),
        attention_mask=_NO_MASK.to(batch.input_ids.device),
        use_cache=False,
        **batch.attention_kwargs(),
    )
    return out.last_hidden_state[0]  # (T, H)


def packed_hidden(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Final hidden states at batch.loss_positions only, (N, H)."""
    return packed_hidden_states(model, batch).index_select(0, batch.loss_positions)


def packed_logits(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Logits of every packed token, (T, V), through the model's own LM head (tests and evaluation)."""
    hidden = packed_hidden_states(model, batch)
    return model.get_output_embeddings()(hidden)
