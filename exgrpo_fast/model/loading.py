"""Load any Hugging Face causal LM from a local directory (config + safetensors + tokenizer), never the network.

check_model_dir validates a directory without loading it (train validates every model dir up front with it);
load_model runs it first, so a missing file, truncated weights, a config.json that does not match the weights (the
shapes it implies, taken from the model built on the meta device, against the safetensors headers: nothing is
allocated) or a dir without tokenizer files are reported by path instead of surfacing as an error deep inside
transformers, or as an allocation of terabytes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from exgrpo_fast.errors import MissingPathError, ModelError
from exgrpo_fast.model.attention import IMPLEMENTATION, bind_backend, select_backend


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
"""Any one of these (or a *.tiktoken file) makes a directory hold a tokenizer."""
_MAX_HEADER = 100 * 2**20  # a safetensors header is JSON, a few MB at most
_POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "head_dim")  # fmt: skip
_MATCHED: set[tuple] = set()  # (dir, config.json and weight file stamps) whose shapes were checked


def _check_safetensors(file: Path) -> dict[str, tuple[int, ...]]:
    """Header readable and file as long as the header says (a truncated download or copy fails here, by path).
    Returns {tensor name: shape}."""
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
            shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise ModelError(f"{file}: corrupt safetensors header ({type(e).__name__}: {e})") from None
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise ModelError(f"{file}: truncated safetensors file ({size} bytes, its header promises {expected})")
    return shapes


def _check_config_values(config: Path, cfg: dict) -> None:
    """The sizes a config.json gives (top level, and text_config of multimodal ones) are positive integers."""
    for section in (cfg, cfg.get("text_config")):
        if not isinstance(section, dict):
            continue
        for key in _POSITIVE:
            value = section.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ModelError(f"{config}: {key}={value!r}: expected a positive integer")


def _check_shapes(path: Path, weights: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Every tensor the config.json implies that the weights hold has the weights' shape. The model is built on the
    meta device (no memory; ~1 s for a 7B config); names the weights lack (tied heads, renamed checkpoints) are
    left to the loader."""
    config_file = path / "config.json"
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise ModelError(f"{config_file}: transformers cannot read it ({type(e).__name__}: {e})") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - not a causal LM transformers can build: the loader reports it
        return
    for name, tensor in model.state_dict().items():
        if name in weights and tuple(tensor.shape) != weights[name][0]:
            shape, file = weights[name]
            raise ModelError(
                f"{config_file} does not match the weights: {name} is {list(tensor.shape)} by the config but "
                f"{list(shape)} in {file} (a config.json of another model?)"
            )


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
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in weights:
        shapes.update({k: (v, file.name) for k, v in _check_safetensors(file).items()})
    _check_config_values(config, cfg)
    stamp = (str(path.resolve()), *((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in [config, *weights]))
    if stamp not in _MATCHED:
        _check_shapes(path, shapes)
        _MATCHED.add(stamp)
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
    keep_on_host: bool = False,
):
    """(model, tokenizer) from a local checkpoint directory, in `dtype` on `device`, with the packed attention
    implementation (backend chosen by `attn_backend`: "auto" or one of model.attention.BACKENDS, for the dtype the
    attention runs in: `attn_dtype`, default `dtype`; float32 master weights computing in bf16 pass bf16).
    keep_on_host: the weights stay in host memory, the backend is still the one for `device` (a model about to be
    sharded: FSDP2's fully_shard moves each module's weights to the device as it shards them)."""
    path = check_model_dir(path)
    tokenizer = load_tokenizer(path)
    backend = select_backend(device, attn_backend, dtype=attn_dtype or dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, use_safetensors=True, attn_implementation=IMPLEMENTATION
        )
    except (OSError, ValueError) as e:  # an architecture transformers does not know, weights that don't fit, ...
        raise ModelError(f"cannot load the model in {path}: {type(e).__name__}: {e}") from e
    if not keep_on_host:
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
