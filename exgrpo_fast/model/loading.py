"""Load any Hugging Face causal LM from a local directory (config + safetensors + tokenizer), never the network.

check_model_dir validates a directory without loading it (train validates every model dir up front with it);
load_model runs it first, so a missing file, truncated weights or a dir without tokenizer files are reported by
path instead of surfacing as an error deep inside transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from exgrpo_fast.errors import MissingPathError, ModelError
from exgrpo_fast.model.attention import IMPLEMENTATION, bind_backend, select_backend


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
"""Any one of these (or a *.tiktoken file) makes a directory hold a tokenizer."""
_MAX_HEADER = 100 * 2**20  # a safetensors header is JSON, a few MB at most


def _check_safetensors(file: Path) -> None:
    """Header readable and file as long as the header says (a truncated download or copy fails here, by path)."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{file}: truncated safetensors file ({size} bytes, not even a header)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise ModelError(f"{file}: truncated or not a safetensors file (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise ModelError(f"{file}: corrupt safetensors header ({type(e).__name__}: {e})") from None
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise ModelError(f"{file}: truncated safetensors file ({size} bytes, its header promises {expected})")


def check_model_dir(path: str | Path) -> Path:
    """Check a local HF model directory before anything is loaded: config.json (valid JSON with a model_type),
    safetensors weights (every shard of an index present, none truncated), tokenizer files. Raises
    MissingPathError / ModelError naming the path and what is wrong; returns the path."""
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"model path {path} does not exist (models load from local directories only)")
    if not path.is_dir():
        raise MissingPathError(f"model path {path} is not a directory")
    config = path / "config.json"
    if not config.is_file():
        raise MissingPathError(f"model path {path} has no config.json")
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{config}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not cfg.get("model_type"):
        raise ModelError(f"{config}: no model_type (not a Hugging Face model config)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise MissingPathError(f"model path {path} has no *.safetensors weights (only safetensors are loaded)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{index}: unreadable shard index ({type(e).__name__}: {e})") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise MissingPathError(f"model path {path}: shard {missing[0]} listed in {index.name} is missing")
    for file in weights:
        _check_safetensors(file)
    if not any((path / f).is_file() for f in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise ModelError(
            f"model path {path} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); copy them "
            "from the base model's directory"
        )
    return path


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a local model dir (pad token defaults to eos); ModelError naming the dir if it does
    not load."""
    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise ModelError(f"model path {path} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError) as e:  # a corrupt file, a missing optional tokenizer library
        raise ModelError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def use_device(name: str | torch.device) -> torch.device:
    """The device `name` names ("auto" = cuda if available, else cpu; "cuda" = the current CUDA device), with its
    index, made the current CUDA device: Triton launches and CUDA graph captures use the current device, so a
    process on cuda:N (N != 0) must make it current before its first kernel."""
    name = str(name)
    device = torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_backend: str = "auto",
    attn_dtype: torch.dtype | None = None,
    deterministic: bool = False,
):
    """(model, tokenizer) from a local checkpoint directory, in `dtype` on `device`, with the packed attention
    implementation (backend chosen by `attn_backend`: "auto" or one of model.attention.BACKENDS, for the dtype the
    attention runs in: `attn_dtype`, default `dtype`; float32 master weights computing in bf16 pass bf16)."""
    path = check_model_dir(path)
    tokenizer = load_tokenizer(path)
    backend = select_backend(device, attn_backend, dtype=attn_dtype or dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, use_safetensors=True, attn_implementation=IMPLEMENTATION
        )
    except (OSError, ValueError) as e:  # an architecture transformers does not know, weights that don't fit, ...
        raise ModelError(f"cannot load the model in {path}: {type(e).__name__}: {e}") from e
    model = model.to(device)
    bind_backend(model, backend, deterministic=deterministic)
    n_embed = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embed:
        raise ModelError(
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
