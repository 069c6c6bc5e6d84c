"""Checkpoints: an HF model dir (save_pretrained, safetensors) plus trainer state, crash-safe at every instant.

Layout of one checkpoint `RUN_DIR/checkpoints/<stage>-<step:06d>/`:
  config.json, model.safetensors, tokenizer files   loadable by AutoModelForCausalLM.from_pretrained
  trainer_state.pt   optimizer, scheduler, RNG states (torch, cuda, python, numpy), stage, step, data position, extra:
                     tensors and plain values only, read with torch.load(weights_only=True), so loading a checkpoint
                     never runs code from it (a crafted pickle is refused with CheckpointError)
  checkpoint.json    {"stage", "step", "seq"}: written last, so its presence marks a complete checkpoint; seq orders
                     the checkpoints of a run (1 + the largest seq present when it was saved)
and `RUN_DIR/checkpoints/latest`, a pointer file naming the newest one.

The save sequence (rank 0; each named step is a fault-injection point, see CRASH_ENV):
  1. "begin"            leftovers of a crashed save are tidied (see repair_checkpoints)
  2. "writing"          weights written into the hidden sibling `.NAME.tmp-PID` (trainer state not yet)
  3. "tmp_complete"     every file and the dir fsynced, checkpoint.json written last
  4. "old_aside"        only when NAME already exists: the old NAME renamed to `.NAME.old-PID` (still complete)
  5. "committed"        `.NAME.tmp-PID` renamed to NAME, parent dir fsynced
  6. "pointer_written"  `.latest.tmp-PID` written and fsynced
  7. "pointer_swapped"  os.replace onto `latest`, parent dir fsynced
  8. "old_deleted"      the displaced old NAME removed
  9. "pruned"           retention: checkpoints of this stage beyond `keep_last` removed
Removals first rename a dir to `.NAME.del-PID` (never read), so a half-deleted dir is never taken for a checkpoint.
resolve_checkpoint does not trust the pointer: it takes the complete checkpoint with the largest seq among NAME dirs
and `.NAME.old-PID` dirs, so at every instant of the sequence the newest complete checkpoint is found, and a stale
or missing pointer costs nothing.

Under FSDP2 the full (unsharded) model and optimizer state are gathered to rank 0, which writes; on load every rank
reads the full state and re-shards it.

Only one process writes a run (train holds an OS lock on the run dir, see exgrpo_fast.rundir); the tidy-up of a
crashed save still leaves alone the temp and displaced dirs of any live process, whatever it is. A full disk during
a save removes the half-written temp dir and raises DiskFullError naming the path (the older checkpoints are intact).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from exgrpo_fast.errors import CheckpointError, MissingPathError, full_disk_named

STATE_FILE = "trainer_state.pt"
META_FILE = "checkpoint.json"
POINTER = "latest"
CRASH_ENV = "EXGRPO_FAST_CRASH_AT"
"""Fault injection: set to one of CRASH_POINTS ("POINT", or "POINT:N" for its N-th occurrence in the process) and
the saving process dies (os._exit(CRASH_EXIT)) right after that step of the save sequence. For tests only."""
CRASH_POINTS = ("begin", "writing", "tmp_complete", "old_aside", "committed", "pointer_written", "pointer_swapped",
                "old_deleted", "pruned")  # fmt: skip
CRASH_EXIT = 97
_OLD = re.compile(r"^\.(?P<name>.+)\.old-\d+$")
_JUNK = re.compile(r"^\..+\.(tmp|del)-\d+$")
_PID = re.compile(r"\.(?:tmp|del|old)-(?P<pid>\d+)$")


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _is_distributed() else 0


def is_writer() -> bool:
    """Whether this process writes checkpoints (rank 0; the others only join the gathers)."""
    return _rank() == 0


def numpy_rng_state() -> dict:
    """NumPy's global RNG state as a tensor and plain numbers (a pickled ndarray would need an unsafe load)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip


def set_numpy_rng_state(state) -> None:
    """Inverse of numpy_rng_state; also takes the tuple of np.random.get_state() (checkpoints written before)."""
    if isinstance(state, dict):
        keys = state["keys"].numpy().astype(np.uint32)
        state = (state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])
    np.random.set_state(state)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    set_numpy_rng_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain(obj, where: str = "extra"):
    """obj with NumPy scalars turned into Python numbers; TypeError naming the place of anything that is not a
    tensor, a plain value (None, bool, int, float, str) or a dict / list / tuple of them: a trainer state must load
    with torch.load(weights_only=True), and this finds out at save time rather than at resume time."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"{where} is a {type(obj).__name__}: a trainer state holds tensors and plain values only")


def _legacy_numpy_globals() -> list:
    """The globals of np.random.get_state()'s ndarray in trainer states written before numpy_rng_state: an array of
    a plain dtype (no code runs), allowed by their names under NumPy 1 and NumPy 2."""
    try:
        from numpy._core.multiarray import _reconstruct  # NumPy 2
    except ImportError:  # pragma: no cover - NumPy 1
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct")]  # fmt: skip


def safe_load(path: str | Path) -> dict:
    """torch.load(path, weights_only=True) on the CPU, NumPy RNG arrays of older checkpoints allowed. A file that
    needs any other global (code) raises CheckpointError naming the path and the global; nothing of it runs.
    Memory-mapped (torch.save's zip format; anything else is read plainly): the ranks of a resumed run share one copy
    of the file's pages (a 7B student's optimizer states are 61 GB) and read the pages they touch."""
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        why = next((x for x in lines if "GLOBAL" in x or "global" in x), lines[-1] if lines else type(e).__name__)
        raise CheckpointError(
            f"{path}: refused: it is not a plain trainer state (tensors and values) and loading it could run code "
            f"({why})"
        ) from None


def _has_dtensors(tensors: Iterable) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in tensors)


def _full_state(model, optimizer, model_state: dict | None = None) -> tuple[dict, dict | None]:
    """Model and optimizer state dicts, gathered to full tensors when the model is FSDP2-sharded (any world size:
    a half-dtype student is sharded over a mesh of one); gathered tensors stay on rank 0 only, the writer (the
    other ranks get None for a gathered optimizer state). model_state: the model's state dict, when the caller
    built it (a merged LoRA export)."""
    if model_state is None and _has_dtensors(model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        model_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    osd = optimizer.state_dict() if optimizer is not None else None
    if osd is not None and _has_dtensors(v for st in osd["state"].values() for v in st.values()):
        osd = _full_tensors(osd)
    return (model_state if model_state is not None else model.state_dict()), osd


def _full_tensors(osd: dict) -> dict | None:
    """Optimizer state dict with every DTensor shard gathered to a full CPU tensor on rank 0, the writer (a
    collective: all ranks call); None on the other ranks, which drop each gathered tensor at once (AdamW's two
    float32 moments of a 7B model are 56 GB: kept on all 8 ranks of a node they would take 448 GB of host memory)."""
    from torch.distributed.tensor import DTensor

    keep = is_writer()
    state: dict = {}
    for idx, st in osd["state"].items():
        state[idx] = row = {}
        for k, v in st.items():
            if isinstance(v, DTensor):
                v = v.full_tensor()  # every rank joins each all-gather
                v = v.cpu() if keep else None  # off rank 0 the gathered copy goes at once
            row[k] = v
    return {**osd, "state": state} if keep else None


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


_crash_counts: dict[str, int] = {}


def _crash_point(name: str) -> None:
    """Die here, without cleanup, if the fault-injection hook names this step (tests only)."""
    want = os.environ.get(CRASH_ENV)
    if not want or want.split(":")[0] != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if ":" not in want or _crash_counts[name] == int(want.split(":")[1]):
        os._exit(CRASH_EXIT)


def _fsync_dir(path: Path) -> None:
    """Make renames/creations inside `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _remove_dir(path: Path) -> None:
    """Rename to a `.del-PID` name first (atomic: the dir stops counting as a checkpoint), then delete."""
    grave = path.with_name(f".{path.name.lstrip('.')}.del-{os.getpid()}")
    if grave.exists():
        shutil.rmtree(grave, ignore_errors=True)
    os.replace(path, grave)
    _fsync_dir(path.parent)
    shutil.rmtree(grave, ignore_errors=True)


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_meta(path: str | Path) -> dict | None:
    """{"stage", "step", "seq"} of a complete checkpoint dir, {"seq": -1, ...} for one written before checkpoint.json
    existed (trainer_state.pt present), None when `path` is not a complete checkpoint."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        return None
    try:
        meta = json.loads((path / META_FILE).read_text())
        if isinstance(meta, dict) and isinstance(meta.get("seq"), int):
            return meta
        return None  # checkpoint.json present but garbled: not a checkpoint we wrote completely
    except FileNotFoundError:
        return {"stage": None, "step": None, "seq": -1}  # legacy layout
    except (OSError, ValueError):
        return None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints in a checkpoints dir, oldest first (by seq, then trainer_state.pt mtime for legacy ones).
    Includes `.NAME.old-PID` dirs: during an overwrite of NAME they hold its last complete version."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        if not entry.is_dir() or _JUNK.match(entry.name) or (entry.name.startswith(".") and not _OLD.match(entry.name)):
            continue
        meta = checkpoint_meta(entry)
        try:
            mtime = (entry / STATE_FILE).stat().st_mtime_ns
        except OSError:  # removed meanwhile (a concurrent save pruning it)
            continue
        if meta is not None:
            found.append(((meta["seq"], mtime, not entry.name.startswith(".")), entry))
    return [p for _, p in sorted(found)]


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 probes without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists, owned by someone else
    return True


def _held_by_live_process(entry: Path) -> bool:
    """A `.tmp-PID` / `.del-PID` / `.old-PID` entry of another process that is still running: a save in progress,
    not crash debris."""
    m = _PID.search(entry.name)
    return m is not None and int(m.group("pid")) != os.getpid() and _pid_alive(int(m.group("pid")))


def repair_checkpoints(root: str | Path) -> None:
    """Tidy what a crashed save left in a checkpoints dir: unfinished `.tmp-`/`.del-` dirs are removed, and a
    `.NAME.old-PID` dir goes back to NAME when NAME is missing (the crash hit between steps 4 and 5) or is removed
    when NAME is complete again. Entries whose PID is a live process other than this one are a save in progress
    and are left alone. Only the writer of a run calls this (the run-dir lock, exgrpo_fast.rundir)."""
    root = Path(root)
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if _held_by_live_process(entry):
            continue
        if _JUNK.match(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(f".{POINTER}.tmp-") and entry.is_file():
            entry.unlink(missing_ok=True)
    for entry in sorted(root.iterdir()):
        m = _OLD.match(entry.name)
        if not (m and entry.is_dir()) or _held_by_live_process(entry):
            continue
        final = root / m.group("name")
        if checkpoint_meta(final) is not None:
            _remove_dir(entry)
        elif not final.exists():
            os.replace(entry, final)
            _fsync_dir(root)
    newest = list_checkpoints(root)
    if newest and not newest[-1].name.startswith("."):
        pointer = root / POINTER
        if not pointer.is_file() or pointer.read_text().strip() != newest[-1].name:
            _swap_pointer(root, newest[-1].name, crash_points=False)


def _swap_pointer(root: Path, name: str, *, crash_points: bool = True) -> None:
    """Point `latest` at `name` atomically: write a temp file, fsync it, os.replace, fsync the dir."""
    tmp = root / f".{POINTER}.tmp-{os.getpid()}"
    _write_durable(tmp, name + "\n")
    if crash_points:
        _crash_point("pointer_written")
    os.replace(tmp, root / POINTER)
    _fsync_dir(root)
    if crash_points:
        _crash_point("pointer_swapped")


def _prune(root: Path, stage: str, keep_last: int, keep: set[Path]) -> None:
    """Remove this stage's complete checkpoints beyond the newest keep_last (legacy ones, other stages and `keep`
    are left alone)."""
    mine = [
        p
        for p in list_checkpoints(root)
        if not p.name.startswith(".") and (checkpoint_meta(p) or {}).get("stage") == stage
    ]
    for path in mine[: max(len(mine) - keep_last, 0)]:
        if path.resolve() not in keep:
            _remove_dir(path)


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
    keep_last: int | None = None,
    keep: Iterable[str | Path] = (),
    model_state: dict | None = None,
    tensor_files: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a checkpoint to ckpt_dir crash-safely (see the module docstring); rank 0 writes, and every rank must
    call under FSDP2 (the state is gathered). Overwriting an existing ckpt_dir is safe too.

    keep_last: after the save, keep only the newest keep_last checkpoints *of this stage* in ckpt_dir's parent
    (None or 0 = keep all); checkpoints of other stages (e.g. the SFT end that GRPO uses as its reference) and the
    paths in `keep` are never removed by it.

    model_state: the state dict to export under `model`'s config (default: the model's own, gathered under FSDP2);
    tensor_files: {file name: tensors} written beside it as safetensors (float32 masters, LoRA adapters).
    """
    ckpt_dir = Path(ckpt_dir)
    if keep_last is not None and keep_last < 0:
        raise ValueError(f"keep_last={keep_last}: expected >= 0 (0 or None = keep all)")
    model_sd, optim_sd = _full_state(model, optimizer, model_state)
    if is_writer():
        root = ckpt_dir.parent
        root.mkdir(parents=True, exist_ok=True)
        repair_checkpoints(root)
        _crash_point("begin")
        state = {
            "stage": stage,
            "step": step,
            "optimizer": optim_sd,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "extra": plain(extra or {}),
        }
        seq = 1 + max((checkpoint_meta(p)["seq"] for p in list_checkpoints(root)), default=0)
        tmp = root / f".{ckpt_dir.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            with full_disk_named(tmp, "the checkpoint was not written; the older ones are intact"):
                unwrapped = getattr(model, "module", model)
                unwrapped.save_pretrained(tmp, state_dict=model_sd, safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
                for name, tensors in (tensor_files or {}).items():  # float32 masters, LoRA adapters
                    from safetensors.torch import save_file

                    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name))
                _crash_point("writing")
                with open(tmp / STATE_FILE, "wb") as f:  # a Python file: a full disk keeps its errno
                    torch.save(state, f)
                _fsync_tree(tmp)
                _write_durable(tmp / META_FILE, json.dumps({"stage": stage, "step": step, "seq": seq}) + "\n")
                _fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # never read (hidden name); removing it frees the space now
            raise
        _crash_point("tmp_complete")
        old = None
        if ckpt_dir.exists():
            old = root / f".{ckpt_dir.name}.old-{os.getpid()}"
            os.replace(ckpt_dir, old)
            _fsync_dir(root)
            _crash_point("old_aside")
        os.replace(tmp, ckpt_dir)
        _fsync_dir(root)
        _crash_point("committed")
        _swap_pointer(root, ckpt_dir.name)
        if old is not None:
            _remove_dir(old)
        _crash_point("old_deleted")
        if keep_last:
            _prune(root, stage, keep_last, {ckpt_dir.resolve(), *(Path(k).resolve() for k in keep)})
        _crash_point("pruned")
    if _is_distributed():
        dist.barrier()
    return ckpt_dir


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir from a checkpoint dir, a run dir or a checkpoints dir: the newest complete checkpoint there
    (largest seq; the `latest` pointer is a convenience for people and is not trusted). Raises MissingPathError
    naming the path when it does not exist or holds no complete checkpoint."""
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise MissingPathError(f"checkpoint path {path} is not a directory (expected a run dir or a checkpoint dir)")
    if checkpoint_meta(path) is not None:
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    if (path / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint {path}: {META_FILE} is unreadable (the checkpoint was not completed)")
    raise MissingPathError(
        f"no complete checkpoint in {path} (expected a checkpoint dir with {STATE_FILE}, or a run dir / checkpoints "
        "dir containing one)"
    )


def load_trainer_state(ckpt_dir: str | Path) -> dict:
    """The trainer state saved with a checkpoint, loaded without running code from it (safe_load); errors name the
    file."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise MissingPathError(f"{path} does not exist ({Path(ckpt_dir)} is not a checkpoint written by the trainer)")
    try:
        return safe_load(path)
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated or foreign file
        raise CheckpointError(f"{path}: cannot read the trainer state ({type(e).__name__}: {e})") from e


def restore(state: dict, model=None, optimizer=None, scheduler=None, *, restore_rng: bool = True) -> None:
    """Load optimizer / scheduler / RNG states saved by save_checkpoint (model weights come from the HF dir)."""
    if optimizer is not None and state.get("optimizer") is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        osd = _shard_like(state["optimizer"], optimizer) if _has_dtensors(params) else state["optimizer"]
        optimizer.load_state_dict(osd)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
