"""Checkpoints: an HF model dir (save_pretrained, safetensors) plus trainer state, written atomically.

Layout of one checkpoint `RUN_DIR/checkpoints/<stage>-<step:06d>/`:
  config.json, model.safetensors, tokenizer files   loadable by AutoModelForCausalLM.from_pretrained
  trainer_state.pt   optimizer, scheduler, RNG states (torch, cuda, python, numpy), stage, step, data position, extra
and `RUN_DIR/checkpoints/latest` naming the newest one. Everything is written into a temporary sibling dir first
and renamed into place, so a crash never leaves a half-written checkpoint under the final name.

Under FSDP2 the full (unsharded) model and optimizer state are gathered to rank 0, which writes; on load every rank
reads the full state and re-shards it.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

STATE_FILE = "trainer_state.pt"


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _is_distributed() else 0


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _full_state(model, optimizer) -> tuple[dict, dict | None]:
    """Model and optimizer state dicts, gathered to full tensors when the model is FSDP2-sharded."""
    if _is_distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        msd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return msd, _full_tensors(optimizer.state_dict()) if optimizer is not None else None
    return model.state_dict(), optimizer.state_dict() if optimizer is not None else None


def _full_tensors(osd: dict) -> dict:
    """Optimizer state dict with every DTensor shard gathered to a full CPU tensor (a collective: all ranks call)."""
    from torch.distributed.tensor import DTensor

    state = {
        idx: {k: (v.full_tensor().cpu() if isinstance(v, DTensor) else v) for k, v in st.items()}
        for idx, st in osd["state"].items()
    }
    return {**osd, "state": state}


def _shard_like(osd: dict, optimizer) -> dict:
    """Inverse of _full_tensors: re-shard full optimizer state tensors like the params they belong to."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for idx, st in osd["state"].items():
        p = params[int(idx)]
        state[idx] = {
            k: (distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                if isinstance(p, DTensor) and torch.is_tensor(v) and v.dim() > 0 else v)
            for k, v in st.items()
        }  # fmt: skip
    return {**osd, "state": state}


def _atomic_dir_write(final: Path, write) -> None:
    """write(tmp_dir) then rename tmp_dir to final (replacing an older final dir)."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    ckpt_dir: str | Path,
    model,
    tokenizer,
    *,
    optimizer=None,
    scheduler=None,
    stage: str,
    step: int,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint to ckpt_dir atomically (rank 0 writes; every rank must call under FSDP2)."""
    ckpt_dir = Path(ckpt_dir)
    model_sd, optim_sd = _full_state(model, optimizer)
    if _rank() == 0:
        state = {
            "stage": stage,
            "step": step,
            "optimizer": optim_sd,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "extra": extra or {},
        }

        def write(tmp: Path) -> None:
            unwrapped = getattr(model, "module", model)
            unwrapped.save_pretrained(tmp, state_dict=model_sd, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            torch.save(state, tmp / STATE_FILE)

        _atomic_dir_write(ckpt_dir, write)
        _atomic_text(ckpt_dir.parent / "latest", ckpt_dir.name + "\n")
    if _is_distributed():
        dist.barrier()
    return ckpt_dir


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir from a checkpoint dir, a run dir or a checkpoints dir (newest via its `latest` file)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for ckpts in (path / "checkpoints", path):
        latest = ckpts / "latest"
        if latest.is_file():
            cand = ckpts / latest.read_text().strip()
            if (cand / STATE_FILE).is_file():
                return cand
    raise FileNotFoundError(f"no checkpoint found at {path} (expected {STATE_FILE} or a checkpoints/latest file)")


def load_trainer_state(ckpt_dir: str | Path) -> dict:
    return torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=False)


def restore(state: dict, model=None, optimizer=None, scheduler=None, *, restore_rng: bool = True) -> None:
    """Load optimizer / scheduler / RNG states saved by save_checkpoint (model weights come from the HF dir)."""
    if optimizer is not None and state.get("optimizer") is not None:
        osd = _shard_like(state["optimizer"], optimizer) if _is_distributed() else state["optimizer"]
        optimizer.load_state_dict(osd)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
