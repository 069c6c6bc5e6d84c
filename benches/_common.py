"""Shared bench plumbing: timing with warm-up and device sync, peak memory, environment facts, CSV rows."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benches" / "results"


def rel(path: str | Path) -> str:
    """path as printed: relative to the repository root when inside it (result files never name the machine's
    directories), else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def env_facts(device: torch.device) -> dict[str, str]:
    """Columns every CSV row carries: device, versions, date, commit."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "commit": git_commit(),
    }


def model_setup(preset: str | None, threads: int | None = None, *, cpu: bool = False):
    """(device, preset, dtype) of a model bench: CUDA when available (unless cpu) with the gpu-0.5b preset in bf16,
    else CPU with the tiny preset in fp32; `preset` overrides the preset, `threads` sets torch's CPU threads."""
    from exgrpo_fast.model.loading import use_device

    device = use_device("cuda" if torch.cuda.is_available() and not cpu else "cpu")  # current: Triton launches there
    if threads:
        torch.set_num_threads(threads)
    on_gpu = device.type == "cuda"
    return device, preset or ("gpu-0.5b" if on_gpu else "tiny"), torch.bfloat16 if on_gpu else torch.float32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 3,
    rep: int = 10,
    setup: Callable[[], object] | None = None,
) -> float:
    """Median wall time of fn() in ms, with device sync around each call (CUDA events on GPU). setup(), if given,
    runs before every call outside the timed region (e.g. refilling a buffer an in-place op overwrote)."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    sync(device)
    times = []
    for _ in range(rep):
        if setup is not None:
            setup()
            sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory fn() allocates beyond what was live before it (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Device-to-device copy bandwidth in GB/s (read + write counted), the roofline reference of the same run."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=5, rep=20)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def write_csv(name: str, rows: list[dict]) -> Path:
    """Append rows to benches/results/<name>.csv (header written once)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.csv"
    fieldnames: list[str] = []
    for row in rows:
        fieldnames += [k for k in row if k not in fieldnames]
    new = not path.exists()
    if not new:
        with path.open() as f:
            existing = next(csv.reader(f), [])
        if existing != fieldnames:  # schema changed: start a fresh file rather than misalign columns
            path = RESULTS_DIR / f"{name}-{_dt.datetime.now().strftime('%Y%m%d%H%M%S')}.csv"
            new = True
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames)
        if new:
            w.writeheader()
        w.writerows(rows)
    return path
