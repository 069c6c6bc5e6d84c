"""Load any Hugging Face causal LM from a local directory (config + safetensors + tokenizer), never the network."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from exgrpo_fast.model.attention import IMPLEMENTATION, bind_backend, select_backend


def _check_checkpoint_dir(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist (models load from local directories only)")
    if not path.is_dir():
        raise FileNotFoundError(f"model path {path} is not a directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model path {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"model path {path} has no *.safetensors weights (only safetensors are loaded)")


def load_tokenizer(path: str | Path):
    tokenizer = AutoTokenizer.from_pretrained(Path(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_backend: str = "auto",
):
    """(model, tokenizer) from a local checkpoint directory, in `dtype` on `device`, with the packed attention
    implementation (backend chosen by `attn_backend`: "auto" or one of model.attention.BACKENDS)."""
    path = Path(path)
    _check_checkpoint_dir(path)
    tokenizer = load_tokenizer(path)
    backend = select_backend(device, attn_backend, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, use_safetensors=True, attn_implementation=IMPLEMENTATION
    ).to(device)
    bind_backend(model, backend)
    n_embed = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embed:
        raise ValueError(
            f"tokenizer at {path} has {len(tokenizer)} tokens but the model's embedding has only {n_embed} rows"
        )
    return model, tokenizer


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the output layer, for the fused linear losses. Models whose logits are
    transformed after the LM head (final logit softcapping, logit scaling) are refused: the fused path would
    silently compute different log-probs."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError(
            f"{type(model).__name__} applies final_logit_softcapping={config.final_logit_softcapping}; the fused "
            "LM-head losses do not support it"
        )
    if getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        raise ValueError(f"{type(model).__name__} scales its logits (logit_scale); the fused losses do not")
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)
