"""Ahead-of-time compile report: every Triton kernel the public ops launch, at every configuration their launchers
choose, compiled for sm_80 and sm_90 on a machine without a GPU, and checked against the GPU-readiness rules.

How (no GPU, no CUDA build of torch needed):
  1. Discovery. The public ops in exgrpo_fast.ops are driven over a grid of representative calls (dtypes, vocab
     sizes, every loss option, entropy on/off, bias on/off, gradient combinations, `impl` variants when an op has
     that argument) on fake CUDA tensors (meta tensors that report cuda:0 to project code: shapes, dtypes and
     JITFunction.run (and Autotuner.run, which contributes every config it could pick) is intercepted: each launch
     is recorded (kernel, arguments with tensors replaced by MockTensor(dtype), constexprs, num_warps,
     num_stages) and nothing runs. A stand-in Triton driver and a patched torch.cuda report the target GPU (SM
     count, capability), so launchers that size their grid or config from the device see a real H100 / A100.
  2. Compilation. Each recorded launch goes through the JIT warmup path (the same specialisation the real launch
     gets: pointer alignment, integer divisibility) against the stand-in driver reporting GPUTarget("cuda", 80|90,
     32); Triton's own compiler and its bundled ptxas produce the cubin. Identical variants compile once.
  3. Checks, per compiled variant and target:
       error     the compile failed (any target)
       spill     ptxas reports spill stores/loads (failure on sm_90; reported on sm_80)
       smem      shared memory above the per-block limit (sm_80 163 KiB, sm_90 227 KiB)
       dot       a tl.dot that does not use tensor cores: on sm_90 it must become wgmma (TTGIR
                 ttng.warp_group_dot, PTX wgmma.mma_async), on sm_80 mma.sync; a dot over fp32 operands with
                 input_precision="ieee" (exact fp32, DESIGN.md section 3) is exempt and shown as "fma".
     The table also shows registers per thread and how many blocks fit on one SM by registers and shared memory.

Triton picks the interpreter or the real compiler when a kernel is decorated (TRITON_INTERPRET, read once), so the
sweep runs in a process where the interpreter is off; `run_sweep()` starts such a subprocess when the calling
process already imported triton in interpreter mode (as the CPU tests do).

    python benches/aot_report.py                  # full sweep, both targets, prints the table
    python benches/aot_report.py --quick          # the subset the default test run uses
Measured (triton 3.9, 2 cores): full 466 variants from ~5,500 launches, ~290 s of CPU (~2.5 min wall when idle);
quick ~50 variants, ~22 s of CPU.
    python benches/aot_report.py --json out.json  # also write the rows as JSON
Exit status: 0 if no rule is broken, 1 otherwise (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent

# per-target limits: shared memory per block (opt-in maximum), registers per SM, max threads per SM, SM count of the
# reference part (A100 / H100 SXM), used for the occupancy column and for launchers that ask the device
TARGETS: dict[int, dict[str, Any]] = {
    80: dict(name="sm_80", gpu="NVIDIA A100-SXM4-80GB", smem_limit=163 * 1024, smem_per_sm=164 * 1024,
             regs_per_sm=65536, threads_per_sm=2048, sms=108, l2=40 * 2**20, mem=80 * 2**30),
    90: dict(name="sm_90", gpu="NVIDIA H100 80GB HBM3", smem_limit=227 * 1024, smem_per_sm=228 * 1024,
             regs_per_sm=65536, threads_per_sm=2048, sms=132, l2=50 * 2**20, mem=80 * 2**30),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# result rows


@dataclasses.dataclass
class Row:
    """One compiled kernel variant on one target, with its resource usage and the rule violations."""

    kernel: str  # module-less kernel name, e.g. "linear_logprob._bwd_dh_kernel"
    target: str  # "sm_80" | "sm_90"
    config: str  # constexprs, pointer dtypes, num_warps / num_stages
    num_warps: int = 0
    num_stages: int = 0
    registers: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0  # bytes per block (dynamic shared memory Triton asks for)
    dots: str = ""  # e.g. "2 wgmma", "1 mma", "2 fma(ieee)"
    blocks_per_sm: int = 0  # occupancy bound by registers and shared memory
    violations: list[str] = dataclasses.field(default_factory=list)  # rule breaks: the test fails on these
    notes: list[str] = dataclasses.field(default_factory=list)  # reported, not failures (e.g. spill on sm_80)
    scenarios: list[str] = dataclasses.field(default_factory=list)  # the public-op calls that launched it
    compile_s: float = 0.0

    @property
    def status(self) -> str:
        if self.violations:
            return "FAIL: " + "; ".join(self.violations)
        if self.notes:
            return "warn: " + "; ".join(self.notes)
        return "ok"


def format_table(rows: list[Row]) -> str:
    """Markdown table of the rows (kernel, target, config, registers, spills, shared memory, warps, ...)."""
    head = ["kernel", "target", "config", "warps", "stages", "regs", "spill st/ld", "stack", "smem KiB", "dots",
            "blocks/SM", "status"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r.kernel, r.config, r.target)):
        cells = [r.kernel, r.target, r.config, str(r.num_warps), str(r.num_stages), str(r.registers),
                 f"{r.spill_stores}/{r.spill_loads}", str(r.stack), f"{r.shared / 1024:.1f}", r.dots or "-",
                 str(r.blocks_per_sm), r.status]  # fmt: skip
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# a stand-in Triton driver and torch.cuda facts for a GPU that is not there


class _StandInUtils:
    def __init__(self, cap: int):
        self.cap = cap

    def get_device_properties(self, device=None) -> dict:
        t = TARGETS[self.cap]
        return dict(max_shared_mem=t["smem_limit"], multiprocessor_count=t["sms"], max_num_regs=t["regs_per_sm"],
                    warpSize=32, sm_clock_rate=1_980_000, mem_clock_rate=2_619_000, mem_bus_width=5120)  # fmt: skip


class StandInDriver:
    """Answers what Triton's JIT asks the CUDA driver before compiling: the target, a device id and a stream.
    The device id is the capability (80 or 90), so one process keeps separate kernel caches per target."""

    def __init__(self, cap: int):
        from triton.backends.compiler import GPUTarget

        self.cap = cap
        self.target = GPUTarget("cuda", cap, 32)
        self.utils = _StandInUtils(cap)

    def is_active(self) -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.cap

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_device_capability(self, device=None) -> tuple[int, int]:
        return divmod(self.cap, 10)

    def get_active_torch_device(self):
        import torch

        return torch.device("cuda", 0)

    def get_device_interface(self):
        import torch

        return torch.cuda


@contextlib.contextmanager
def stand_in_gpu(cap: int) -> Iterator[None]:
    """Make Triton and torch.cuda report a GPU of compute capability `cap` (80 or 90)."""
    import torch
    from triton.runtime.driver import driver

    t = TARGETS[cap]
    props = SimpleNamespace(name=t["gpu"], major=cap // 10, minor=cap % 10, multi_processor_count=t["sms"],
                            total_memory=t["mem"], L2_cache_size=t["l2"], warp_size=32,
                            shared_memory_per_block_optin=t["smem_limit"], max_threads_per_multi_processor=2048,
                            regs_per_multiprocessor=t["regs_per_sm"])  # fmt: skip
    names = ("get_device_properties", "get_device_capability", "current_device", "get_device_name", "device_count",
             "current_stream", "mem_get_info")  # fmt: skip
    saved = {n: getattr(torch.cuda, n) for n in names}
    prev = driver._active
    driver.set_active(StandInDriver(cap))
    torch.cuda.get_device_properties = lambda device=None: props
    torch.cuda.get_device_capability = lambda device=None: (cap // 10, cap % 10)
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_name = lambda device=None: t["gpu"]
    torch.cuda.device_count = lambda: 1
    torch.cuda.current_stream = lambda device=None: SimpleNamespace(cuda_stream=0, device=torch.device("cuda", 0))
    torch.cuda.mem_get_info = lambda device=None: (int(0.9 * t["mem"]), t["mem"])  # launchers that size by free memory
    try:
        yield
    finally:
        driver._active = prev
        for n, f in saved.items():
            setattr(torch.cuda, n, f)


# ----------------------------------------------------------------------------------------------------------------
# discovery: record the launches the public ops make on fake CUDA tensors


_CUDA0 = None


def _cuda0():
    global _CUDA0
    if _CUDA0 is None:
        import torch

        _CUDA0 = torch.device("cuda", 0)
    return _CUDA0


def _make_meta_cuda_class():
    import torch

    class MetaCudaTensor(torch.Tensor):
        """A meta tensor (shape, dtype, strides; no storage) that tells code outside torch it lives on cuda:0.

        torch's own Python code (meta kernels, refs) still sees the real meta device, so operators and autograd run
        unchanged on the CPU engine; project code (ops, launchers) sees `device.type == "cuda"` and takes the GPU
        branches, as it would on a real GPU."""

        @property
        def device(self):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller == "torch" or caller.startswith("torch."):
                return torch.Tensor.device.__get__(self)
            return _cuda0()

        @property
        def is_cuda(self) -> bool:
            return True

        @property
        def is_cpu(self) -> bool:
            return False

        @property
        def is_meta(self) -> bool:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            return caller == "torch" or caller.startswith("torch.")

        def get_device(self) -> int:
            return 0

    return MetaCudaTensor


_META_CUDA_CLS = None


def _meta_cuda_cls():
    global _META_CUDA_CLS
    if _META_CUDA_CLS is None:
        _META_CUDA_CLS = _make_meta_cuda_class()
    return _META_CUDA_CLS


def _is_cuda_device(d) -> bool:
    import torch

    if isinstance(d, torch.device):
        return d.type == "cuda"
    return isinstance(d, str) and d.split(":")[0] == "cuda"


def _as_meta_cuda(x):
    import torch

    cls = _meta_cuda_cls()
    if isinstance(x, torch.Tensor) and not isinstance(x, cls) and torch.Tensor.device.__get__(x).type == "meta":
        if x.is_leaf and x.requires_grad:  # keep leaves leaves (as_subclass would make a view)
            return x.detach().as_subclass(cls).requires_grad_(True)
        return x.as_subclass(cls)
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_as_meta_cuda(y) for y in x)
    if isinstance(x, list):
        return [_as_meta_cuda(y) for y in x]
    return x


@contextlib.contextmanager
def fake_cuda() -> Iterator[None]:
    """Tensors created for "cuda" become meta tensors that report cuda:0 to non-torch code (see MetaCudaTensor).

    Works with a CPU-only torch, where fake CUDA tensors (FakeTensorMode) cannot take part in autograd: the engine
    needs a CUDA device guard and accelerator hooks that such a build does not have. Value reads (.item(), int(x))
    raise, as on any meta tensor."""
    import torch
    from torch.autograd.function import BackwardCFunction
    from torch.overrides import TorchFunctionMode

    class _Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is torch.Tensor.cuda:
                return args[0]
            if func is torch.device:  # a device object stays what it says; tensors made on it go to meta
                return func(*args, **kwargs)
            if "device" in kwargs and (_is_cuda_device(kwargs["device"]) or isinstance(kwargs["device"], int)):
                kwargs["device"] = "meta"
            args = tuple("meta" if _is_cuda_device(a) else a for a in args)
            return _as_meta_cuda(func(*args, **kwargs))

    _cuda0()  # built outside the mode
    orig_apply = BackwardCFunction.apply

    def apply(self, *args):
        # the engine runs a custom Function's backward outside the mode and hands it plain meta gradients
        with _Mode():
            return orig_apply(self, *(_as_meta_cuda(a) for a in args))

    BackwardCFunction.apply = apply
    try:
        with _Mode():
            yield
    finally:
        BackwardCFunction.apply = orig_apply


@dataclasses.dataclass
class Launch:
    fn: Any  # the JITFunction
    args: tuple
    kwargs: dict
    scenario: str


def _mock(x):
    import torch
    from triton.runtime.jit import MockTensor

    if isinstance(x, torch.Tensor):
        # data_ptr() 0: aligned to 16 bytes, as every fresh torch allocation is
        return MockTensor(x.dtype, list(x.shape))
    return x


@contextlib.contextmanager
def record_launches(sink: list[Launch], scenario: Callable[[], str]) -> Iterator[None]:
    """While active, kernel launches are recorded into `sink` instead of being compiled and run."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    orig_run, orig_tune = JITFunction.run, Autotuner.run

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        sink.append(Launch(self, tuple(_mock(a) for a in args), {k: _mock(v) for k, v in kwargs.items()},
                           scenario()))  # fmt: skip
        return None

    def tune(self, *args, **kwargs):
        # every config the autotuner could pick (after its early prune, when it has one), not just one
        configs = list(self.configs)
        prune = getattr(self, "early_config_prune", None)
        if prune is not None:
            with contextlib.suppress(Exception):
                configs = list(prune(configs, dict(zip(self.arg_names, args)), **kwargs))
        for cfg in configs:
            self.fn.run(*args, **{**kwargs, **cfg.all_kwargs()})

    JITFunction.run, Autotuner.run = run, tune
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = orig_run, orig_tune


def _impl_values(fn: Callable) -> list[str | None]:
    """The values of an op's `impl` argument (from a Literal annotation, else the names DESIGN.md uses); [None]
    when the op has no such argument. Values the op rejects are dropped at call time."""
    p = inspect.signature(fn).parameters.get("impl")
    if p is None:
        return [None]
    ann = p.annotation
    if isinstance(ann, str):
        vals = re.findall(r"[\"']([A-Za-z0-9_-]+)[\"']", ann)
    else:
        vals = [a for a in typing.get_args(ann) if isinstance(a, str)]
    return list(dict.fromkeys(vals or ["chunked", "tiled"]))


_DTYPES = ("fp32", "bf16", "fp16")


def scenarios(full: bool) -> list[tuple[str, Callable[[], None]]]:
    """(name, thunk) for each public-op call of the sweep. Thunks run under fake_cuda().

    quick (the default test run): bf16 logits at V in {1000, 151936}, entropy off/used/unused; a base and a rich
    loss config; the LM-head path in bf16 at V=151936 and fp32 at V=1000, with bias, entropy used, grads for
    hidden+weight.
    full: fp32/bf16/fp16 everywhere, V in {50, 1000, 4000, 32000, 151936}, T a multiple of 16 or not, every loss
    option, in-place or not, strided logits, temperature != 1, every advantage scale, bias on/off, entropy on/off,
    every gradient combination, every `impl`."""
    import torch

    from exgrpo_fast import ops
    from exgrpo_fast.reference import LossConfig

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dev = "cuda"
    S = 8
    dtypes = _DTYPES if full else ("bf16",)
    vocab = (50, 1000, 4000, 32000, 151936) if full else (1000, 151936)
    token_counts = (4096, 1000) if full else (4096,)
    # the LM-head path: quick takes bf16 at the headline V and fp32 at a V that is not a multiple of 16 (masked
    # tiles: the register-heaviest variant)
    lin_cases = [(d, V) for d in _DTYPES for V in vocab] if full else [("bf16", 151936), ("fp32", 1000)]
    H = 896

    base = LossConfig()
    rich = LossConfig(loss_type="ppo", ratio_level="sequence", dual_clip_c=3.0, delta=2.0, kl_estimator="k2",
                      kl_beta=0.04, teacher_beta=0.5, loss_agg="seq-mean-token-mean")  # fmt: skip
    loss_cfgs: list[tuple[str, LossConfig]] = [("base", base), ("rich", rich)]
    if full:
        loss_cfgs += [
            ("cispo", LossConfig(loss_type="cispo")),
            (
                "cispo-seq-kl-teacher",
                LossConfig(
                    loss_type="cispo", ratio_level="sequence", kl_estimator="abs", kl_beta=0.1, teacher_beta=0.1
                ),
            ),  # fmt: skip
            ("seq", LossConfig(ratio_level="sequence")),
            ("dual", LossConfig(dual_clip_c=3.0)),
            ("delta", LossConfig(delta=2.0)),
        ]
        for est in ("k1", "k2", "k3", "abs"):
            loss_cfgs.append((f"kl-{est}", LossConfig(kl_estimator=est, kl_beta=0.04)))
            loss_cfgs.append((f"teacher-{est}", LossConfig(kl_estimator=est, teacher_beta=0.5)))
        for agg in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
            loss_cfgs.append((agg, LossConfig(loss_agg=agg)))
        loss_cfgs.append(("norm-maxlen", LossConfig(loss_agg="seq-mean-token-sum-norm", max_len=512)))

    def tok(T):
        seq_ids = torch.arange(T, device=dev) * S // T
        mask = torch.ones(T, dtype=torch.bool, device=dev)
        old = torch.randn(T, device=dev)
        adv = torch.randn(S, device=dev)
        return old, adv, seq_ids, mask

    def opt_logps(cfg, T, ref_always=False):
        ref = torch.randn(T, device=dev) if (cfg.kl_beta > 0 or ref_always) else None
        teacher = torch.randn(T, device=dev) if cfg.teacher_beta > 0 else None
        return ref, teacher

    out: list[tuple[str, Callable[[], None]]] = []

    # ---- token_logprobs
    for d, V, T in ((d, V, T) for d in dtypes for V in vocab for T in token_counts):
        for ent in ("off", "used", "unused"):
            for inplace in (True, False) if full else (True,):

                def f(d=d, V=V, T=T, ent=ent, inplace=inplace):
                    logits = torch.randn(T, V, device=dev, dtype=dt[d], requires_grad=True)
                    labels = torch.randint(0, V, (T,), device=dev)
                    x = logits * 1  # a non-leaf: the in-place backward writes into it
                    out = ops.token_logprobs(x, labels, return_entropy=ent != "off", inplace_backward=inplace)
                    if ent == "off":
                        out.sum().backward()
                    elif ent == "used":
                        (out[0].sum() + 0.1 * out[1].sum()).backward()
                    else:
                        out[0].sum().backward()

                out.append((f"token_logprobs {d} V={V} T={T} entropy={ent} inplace={inplace}", f))
    if full:
        for d in dtypes:

            def f_strided(d=d):
                V, T = 32000, 1000
                logits = torch.randn(V, T, device=dev, dtype=dt[d], requires_grad=True)
                labels = torch.randint(0, V, (2 * T,), device=dev)[::2]
                ops.token_logprobs(logits.t(), labels, temperature=0.7, inplace_backward=False).sum().backward()

            out.append((f"token_logprobs {d} V=32000 strided logits.t() labels[::2] temperature=0.7", f_strided))

    # ---- group_advantages
    for scale in ("group", "batch", "none"):
        for d in dtypes if full else ("fp32",):

            def f(scale=scale, d=d):
                rewards = torch.randn(64, device=dev, dtype=dt[d])
                group_ids = torch.arange(64, device=dev) // 8
                ops.group_advantages(rewards, group_ids, scale=scale, nan_to_zero=True)

            out.append((f"group_advantages scale={scale} {d}", f))

    # ---- policy_loss (every loss config)
    for name, cfg in loss_cfgs:
        for d in ("fp32", "bf16") if full else ("fp32",):

            def f(cfg=cfg, d=d):
                T = 4096
                old, adv, seq_ids, mask = tok(T)
                ref, teacher = opt_logps(cfg, T)
                logp = torch.randn(T, device=dev, dtype=dt[d], requires_grad=True)
                loss, _ = ops.policy_loss(logp, old, adv, seq_ids, mask, ref_logp=ref, teacher_logp=teacher, cfg=cfg)
                loss.backward()

            out.append((f"policy_loss {name} logp {d}", f))

    # ---- fused_policy_loss
    for d, V, T in ((d, V, T) for d in dtypes for V in vocab for T in token_counts):
        for name, cfg in loss_cfgs[:2] if full else loss_cfgs[:1]:

            def f(d=d, V=V, T=T, cfg=cfg):
                logits = torch.randn(T, V, device=dev, dtype=dt[d], requires_grad=True)
                labels = torch.randint(0, V, (T,), device=dev)
                old, adv, seq_ids, mask = tok(T)
                ref, teacher = opt_logps(cfg, T)
                loss, _ = ops.fused_policy_loss(logits * 1, labels, old, adv, seq_ids, mask, ref_logp=ref,
                                                teacher_logp=teacher, cfg=cfg)  # fmt: skip
                loss.backward()

            out.append((f"fused_policy_loss {d} V={V} T={T} {name}", f))

    # ---- sample_tokens (greedy, top-p 1, top-p < 1: each a different specialisation)
    for d in dtypes:
        for temperature, top_p in ((0.0, 1.0), (1.0, 1.0), (0.7, 0.9)):

            def f(d=d, temperature=temperature, top_p=top_p):
                B, V = 64, 151936
                logits = torch.randn(B, V, device=dev, dtype=dt[d])
                seeds = torch.randint(0, 2**32, (B,), device=dev)
                positions = torch.randint(0, 4096, (B,), device=dev)
                ops.sample_tokens(logits, temperature, top_p, seeds, positions)

            out.append((f"sample_tokens {d} V=151936 temperature={temperature} top_p={top_p}", f))

    # ---- the LM-head path: token_logprobs_linear and fused_linear_policy_loss
    grad_sets = {"hidden+weight": (True, True), "hidden": (True, False), "weight": (False, True)}
    for d, V, T in ((d, V, T) for d, V in lin_cases for T in token_counts):
        for bias in (False, True) if full else (True,):
            for impl in _impl_values(ops.token_logprobs_linear):
                kw = {} if impl is None else {"impl": impl}
                for ent in ("off", "used") if full else ("used",):
                    for gname in ("none", *grad_sets) if full else ("hidden+weight",):

                        def f(d=d, V=V, T=T, bias=bias, kw=kw, ent=ent, gname=gname):
                            gh, gw = grad_sets.get(gname, (False, False))
                            hidden = torch.randn(T, H, device=dev, dtype=dt[d], requires_grad=gh)
                            weight = torch.randn(V, H, device=dev, dtype=dt[d], requires_grad=gw)
                            b = torch.randn(V, device=dev, dtype=dt[d], requires_grad=gw) if bias else None
                            labels = torch.randint(0, V, (T,), device=dev)
                            res = ops.token_logprobs_linear(hidden, weight, labels, bias=b,
                                                            return_entropy=ent != "off", **kw)  # fmt: skip
                            if gname != "none":
                                (res.sum() if ent == "off" else res[0].sum() + res[1].sum()).backward()

                        tag = "" if impl is None else f" impl={impl}"
                        out.append((f"token_logprobs_linear {d} V={V} T={T} bias={bias} entropy={ent} "
                                    f"grad={gname}{tag}", f))  # fmt: skip
            for impl in _impl_values(ops.fused_linear_policy_loss):
                kw = {} if impl is None else {"impl": impl}
                for name, cfg in loss_cfgs[:2] if full else loss_cfgs[:1]:

                    def f(d=d, V=V, T=T, bias=bias, kw=kw, cfg=cfg):
                        hidden = torch.randn(T, H, device=dev, dtype=dt[d], requires_grad=True)
                        weight = torch.randn(V, H, device=dev, dtype=dt[d], requires_grad=True)
                        b = torch.randn(V, device=dev, dtype=dt[d], requires_grad=True) if bias else None
                        labels = torch.randint(0, V, (T,), device=dev)
                        old, adv, seq_ids, mask = tok(T)
                        ref, teacher = opt_logps(cfg, T)
                        loss, _ = ops.fused_linear_policy_loss(hidden, weight, labels, old, adv, seq_ids, mask,
                                                               bias=b, ref_logp=ref, teacher_logp=teacher, cfg=cfg,
                                                               **kw)  # fmt: skip
                        loss.backward()

                    tag = "" if impl is None else f" impl={impl}"
                    out.append((f"fused_linear_policy_loss {d} V={V} T={T} bias={bias} {name}{tag}", f))
    return out


@dataclasses.dataclass
class Discovery:
    launches: list[Launch]
    errors: list[str]  # scenarios that could not be driven (other than an `impl` value the op rejects)
    skipped: list[str]  # scenarios skipped because the op rejected an `impl` value


def discover(cap: int, full: bool) -> Discovery:
    """Drive every scenario on fake CUDA tensors with a stand-in GPU of capability `cap`; record the launches."""
    from exgrpo_fast import ops

    launches: list[Launch] = []
    errors: list[str] = []
    skipped: list[str] = []
    current = ["?"]
    prev_checks, prev_backend = getattr(ops, "_value_checks", True), getattr(ops, "_backend", "auto")
    ops.set_value_checks(False)  # value checks read tensor values: fake tensors have none
    ops.set_backend("triton")
    try:
        with stand_in_gpu(cap), record_launches(launches, lambda: current[0]):
            for name, thunk in scenarios(full):
                current[0] = name
                try:
                    with fake_cuda():
                        thunk()
                except ValueError as e:
                    if " impl" in name and "impl" in str(e):
                        skipped.append(f"{name}: {e}")
                    else:
                        errors.append(f"{name}: {type(e).__name__}: {e}")
                except Exception as e:  # noqa: BLE001 - reported: a scenario that cannot be driven is a finding
                    errors.append(f"{name}: {type(e).__name__}: {e}")
    finally:
        ops.set_value_checks(prev_checks)
        ops.set_backend(prev_backend)
    return Discovery(launches, errors, skipped)


# ----------------------------------------------------------------------------------------------------------------
# compilation and checks

_tls = threading.local()


class _PtxasLogTap:
    """Stands in for the `subprocess` module inside Triton's NVIDIA backend: runs ptxas unchanged and keeps its
    verbose log (registers, spills, stack), which Triton writes to a temporary file and deletes."""

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def run(self, cmd, *args, **kwargs):
        res = subprocess.run(cmd, *args, **kwargs)
        err = kwargs.get("stderr")
        if isinstance(cmd, (list, tuple)) and "-v" in cmd and hasattr(err, "name"):
            with contextlib.suppress(OSError), open(err.name) as f:
                _tls.ptxas_log = f.read()
        return res


@contextlib.contextmanager
def _fresh_compiles(cache_dir: str) -> Iterator[None]:
    """An empty private Triton cache and always-compile (so ptxas runs and its log is seen), and the log tap."""
    import triton
    from triton.backends.nvidia import compiler as nv

    prev_sub = nv.subprocess
    nv.subprocess = _PtxasLogTap()
    try:
        with triton.knobs.cache.scope(), triton.knobs.compilation.scope():
            triton.knobs.cache.dir = cache_dir
            triton.knobs.compilation.always_compile = True
            yield
    finally:
        nv.subprocess = prev_sub


def parse_ptxas_log(log: str) -> dict[str, int]:
    """registers, spill_stores, spill_loads, stack (bytes) from `ptxas -v` output (the kernel's own entry)."""
    out = dict(registers=-1, spill_stores=0, spill_loads=0, stack=0)
    if m := re.search(r"Used (\d+) registers", log):
        out["registers"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log):
        out["stack"], out["spill_stores"], out["spill_loads"] = map(int, m.groups())
    return out


_DOT_RE = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot)\s[^\n]*")


def classify_dots(ttgir: str) -> list[str]:
    """One entry per dot op in the TTGIR: "wgmma" (ttng.warp_group_dot), "mma" (tt.dot with an nvidia_mma result
    layout), "fma(ieee)" (fp32 operands with the default input_precision="ieee": exact fp32 products, allowed),
    or "fma" (a dot that should run on tensor cores but does not). A "/tf32" suffix marks fp32 operands on tensor
    cores (TF32 rounding)."""
    mma_aliases = set(re.findall(r"^(#\w+)\s*=\s*#ttg\.nvidia_mma<", ttgir, flags=re.M))
    kinds = []
    for m in _DOT_RE.finditer(ttgir):
        line = m.group(0)
        operands = line.split(" : ", 1)[-1].split("->", 1)[0]
        fp32 = bool(re.search(r"<\d+x\d+xf32", operands))
        if m.group(1) == "ttng.warp_group_dot":
            kinds.append("wgmma/tf32" if fp32 else "wgmma")
            continue
        result_type = line.rsplit("->", 1)[-1]
        if "nvidia_mma" in result_type or any(re.search(re.escape(a) + r"\b", result_type) for a in mma_aliases):
            kinds.append("mma/tf32" if fp32 else "mma")
        elif fp32 and "inputPrecision" not in line:  # the printed default is ieee
            kinds.append("fma(ieee)")
        else:
            kinds.append("fma")
    return kinds


def _summarise_dots(kinds: list[str]) -> str:
    order = ("wgmma", "wgmma/tf32", "mma", "mma/tf32", "fma(ieee)", "fma")
    return ", ".join(f"{kinds.count(k)} {k}" for k in order if kinds.count(k))


def _spec_key(launch: Launch) -> tuple:
    """What Triton specialises a launch on: constexpr values, pointer dtypes, and for each runtime int whether it
    is 1, a multiple of 16, or needs 64 bits; plus the launch options. Launches with equal keys compile to the
    same kernel, so each key compiles once."""
    fn = launch.fn
    names = [p.name for p in fn.params]
    bound = dict(zip(names, launch.args))
    bound.update({k: v for k, v in launch.kwargs.items() if k in names})
    key: list = [id(fn)]
    for p in fn.params:
        v = bound.get(p.name, inspect.Parameter.empty)
        if p.is_constexpr:
            key.append((p.name, repr(v)))
        elif hasattr(v, "data_ptr"):
            key.append((p.name, str(v.dtype)))
        elif isinstance(v, bool) or v is None:
            key.append((p.name, v))
        elif isinstance(v, int):
            key.append((p.name, "int", v == 1, v % 16 == 0, -(2**31) <= v < 2**31))
        else:
            key.append((p.name, type(v).__name__))
    key.append(tuple(sorted((k, repr(v)) for k, v in launch.kwargs.items() if k not in names)))
    return tuple(key)


def _config_str(launch: Launch) -> str:
    """constexprs, then runtime ints Triton specialises as multiples of 16 (":16") or as 1 ("=1"), then the
    pointer dtypes."""
    fn = launch.fn
    names = [p.name for p in fn.params]
    bound = dict(zip(names, launch.args))
    bound.update({k: v for k, v in launch.kwargs.items() if k in names})
    consts, ints, dtypes = [], [], []
    for p in fn.params:
        v = bound.get(p.name, inspect.Parameter.empty)
        if v is inspect.Parameter.empty:
            continue
        if p.is_constexpr:
            consts.append(f"{p.name}={int(v) if isinstance(v, bool) else v}")
        elif hasattr(v, "data_ptr"):
            dtypes.append(str(v.dtype).replace("torch.", "").replace("float", "f").replace("bfloat", "bf"))
        elif isinstance(v, int) and not isinstance(v, bool) and not p.do_not_specialize:
            if v == 1:
                ints.append(f"{p.name}=1")
            elif v % 16 == 0:
                ints.append(f"{p.name}:16")
    parts = consts + ([" ".join(ints)] if ints else []) + ["[" + "/".join(dict.fromkeys(dtypes)) + "]"]
    return " ".join(parts)


def _blocks_per_sm(t: dict, regs: int, warps: int, shared: int) -> int:
    threads = 32 * warps
    by_threads = t["threads_per_sm"] // threads
    # registers are allocated per warp in units of 256
    regs_warp = ((max(regs, 1) * 32 + 255) // 256) * 256
    by_regs = t["regs_per_sm"] // (regs_warp * warps)
    by_smem = t["smem_per_sm"] // shared if shared > 0 else by_threads
    return max(0, min(by_threads, by_regs, by_smem))


def _kernel_name(launch: Launch) -> str:
    return f"{launch.fn.fn.__module__.rsplit('.', 1)[-1]}.{launch.fn.__name__}"


def compile_one(launch: Launch, cap: int, cache_dir: str) -> Row:
    """Compile one launch for capability `cap` through the JIT warmup path and check the rules."""
    t = TARGETS[cap]
    row = Row(_kernel_name(launch), t["name"], _config_str(launch), scenarios=[launch.scenario])
    t0 = time.perf_counter()
    with stand_in_gpu(cap), _fresh_compiles(cache_dir):
        _tls.ptxas_log = None
        try:
            kernel = launch.fn.warmup(*launch.args, grid=(1,), **launch.kwargs)
        except Exception as e:  # noqa: BLE001 - a compile error is a finding, reported per variant
            msg = " ".join(str(e).strip().split())
            row.violations.append(f"compile error: {type(e).__name__}: {msg[:400]}")
            return row
        log = _tls.ptxas_log or ""
    row.compile_s = time.perf_counter() - t0
    for k, v in parse_ptxas_log(log).items():
        setattr(row, k, v)
    md = kernel.metadata
    row.num_warps, row.num_stages, row.shared = md.num_warps, md.num_stages, int(md.shared)
    kinds = classify_dots(kernel.asm.get("ttgir", ""))
    row.dots = _summarise_dots(kinds)
    row.blocks_per_sm = _blocks_per_sm(t, row.registers, row.num_warps, row.shared)
    ptx = kernel.asm.get("ptx", "")
    # ---- the rules
    if row.registers < 0:
        row.violations.append("no ptxas resource report (ptxas log not captured)")
    if row.spill_stores or row.spill_loads:
        msg = f"spills {row.spill_stores}/{row.spill_loads} B (stores/loads) at {row.registers} regs"
        (row.violations if cap >= 90 else row.notes).append(msg)
    if row.shared > t["smem_limit"]:
        row.violations.append(f"shared memory {row.shared} B > {t['smem_limit']} B per block")
    want = "wgmma" if cap >= 90 else "mma"
    bad = [k for k in kinds if k.split("/")[0] not in (want, "fma(ieee)")]
    if bad:
        row.violations.append(f"dot not on {want}: {_summarise_dots(bad)}")
    if any(k.startswith("wgmma") for k in kinds) and "wgmma.mma_async" not in ptx:
        row.violations.append("TTGIR has a wgmma dot but the PTX has no wgmma.mma_async")
    if any(k.startswith("mma") for k in kinds) and "mma.sync" not in ptx:
        row.violations.append("TTGIR has an mma dot but the PTX has no mma.sync")
    if any(k.endswith("/tf32") for k in kinds):
        row.notes.append("fp32 dot operands rounded to TF32 (DESIGN.md: fp32 means IEEE unless opted in)")
    if row.registers > 128 and row.num_warps >= 8:
        row.notes.append(f"{row.registers} regs x {row.num_warps} warps: {row.blocks_per_sm} block/SM")
    return row


_POOL_WORK: list[tuple[int, Launch]] = []  # set before the worker processes fork
_POOL_CACHE = ""


def _pool_compile(i: int) -> Row:
    cap, launch = _POOL_WORK[i]
    return compile_one(launch, cap, _POOL_CACHE)


def compile_and_check(work: list[tuple[int, Launch]], jobs: int = 1) -> list[Row]:
    """Compile every distinct (capability, launch) once and check it; one Row per compiled variant, with every
    scenario that launched it. jobs > 1 compiles in forked worker processes."""
    global _POOL_WORK, _POOL_CACHE
    groups: dict[tuple, list[tuple[int, Launch]]] = {}
    for cap, launch in work:
        groups.setdefault((cap, _spec_key(launch)), []).append((cap, launch))
    unique = [g[0] for g in groups.values()]
    with tempfile.TemporaryDirectory(prefix="aot-triton-cache-") as cache:
        if jobs > 1 and len(unique) > 1:
            import multiprocessing as mp

            _POOL_WORK, _POOL_CACHE = unique, cache
            try:
                with mp.get_context("fork").Pool(min(jobs, len(unique))) as pool:
                    rows = pool.map(_pool_compile, range(len(unique)), chunksize=1)
            finally:
                _POOL_WORK, _POOL_CACHE = [], ""
        else:
            rows = [compile_one(launch, cap, cache) for cap, launch in unique]
    for row, group in zip(rows, groups.values()):
        row.scenarios = list(dict.fromkeys(launch.scenario for _, launch in group))
    return rows


def launchable_kernels() -> list[str]:
    """Names ("module.kernel") of every @triton.jit function in csrc_triton that no other jit function calls,
    i.e. the kernels a launcher can start (helpers such as _dot are excluded). Autotuned/heuristics wrappers are
    unwrapped. The sweep must launch each of these at least once."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import csrc_triton

    fns: dict[str, Any] = {}
    for info in pkgutil.iter_modules(csrc_triton.__path__):
        mod = importlib.import_module(f"csrc_triton.{info.name}")
        for name, obj in vars(mod).items():
            while obj is not None and not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
                obj = obj.fn  # Autotuner / Heuristics
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                fns[f"{info.name}.{name}"] = obj
    srcs = {k: inspect.getsource(v.fn) for k, v in fns.items()}
    called = {
        k
        for k in fns
        for other, src in srcs.items()
        if other != k and re.search(rf"(?<![\w.]){re.escape(k.split('.', 1)[1])}\s*\(", src.split(":", 1)[-1])
    }
    return sorted(set(fns) - called)


@dataclasses.dataclass
class Report:
    rows: list[Row]
    errors: list[str]
    skipped: list[str]
    launches: int
    seconds: float
    kernels: list[str] = dataclasses.field(default_factory=list)  # launchable_kernels()

    def not_launched(self) -> list[str]:
        """Kernels in csrc_triton that no scenario of the sweep launched (a gap in the scenario grid)."""
        seen = {r.kernel for r in self.rows}
        return [k for k in self.kernels if k not in seen]

    def violations(self) -> list[str]:
        out = [f"discovery: {e}" for e in self.errors]
        out += [f"coverage: {k} is never launched by the sweep's scenarios" for k in self.not_launched()]
        out += [f"{r.kernel} {r.target} {r.config}: {v}" for r in self.rows for v in r.violations]
        return out

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps(d, indent=1)

    @staticmethod
    def from_json(text: str) -> "Report":
        d = json.loads(text)
        d["rows"] = [Row(**r) for r in d["rows"]]
        return Report(**d)


def sweep(full: bool = True, caps: tuple[int, ...] = (80, 90), jobs: int | None = None) -> Report:
    """Discover and compile in this process. Needs triton imported with the interpreter off."""
    from triton.runtime.jit import JITFunction

    from csrc_triton import logprob

    if not isinstance(logprob._logprob_fwd_kernel, JITFunction):
        raise RuntimeError("the AOT sweep needs the real Triton JIT: TRITON_INTERPRET was on when triton was "
                           "imported; use run_sweep(), which starts a clean subprocess")  # fmt: skip
    t0 = time.perf_counter()
    work, errors, skipped = [], [], []
    for cap in caps:
        disc = discover(cap, full)
        work += [(cap, launch) for launch in disc.launches]
        errors += [e for e in disc.errors if e not in errors]
        skipped += [s for s in disc.skipped if s not in skipped]
    rows = compile_and_check(work, jobs=jobs or os.cpu_count() or 1)
    return Report(rows, errors, skipped, len(work), time.perf_counter() - t0, launchable_kernels())


def run_sweep(
    full: bool = True, caps: tuple[int, ...] = (80, 90), jobs: int | None = None, timeout: float = 1800
) -> Report:
    """The sweep in a fresh subprocess with TRITON_INTERPRET unset (works from any process, the tests' too)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--json", f.name, "--quiet",
               "--targets", ",".join(map(str, caps))] + ([] if full else ["--quick"])  # fmt: skip
        if jobs:
            cmd += ["--jobs", str(jobs)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        text = Path(f.name).read_text()
        if not text:
            raise RuntimeError(f"AOT sweep subprocess failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return Report.from_json(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the subset the default CPU test run compiles")
    p.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (80, 90)")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    a = p.parse_args(argv)
    try:
        caps = tuple(int(c) for c in a.targets.split(","))
        if not caps or any(c not in TARGETS for c in caps):
            raise ValueError
    except ValueError:
        p.error(f"--targets={a.targets!r}: expected a comma-separated subset of {sorted(TARGETS)}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        rep = run_sweep(full=not a.quick, caps=caps, jobs=a.jobs)
    else:
        sys.path.insert(0, str(ROOT))
        rep = sweep(full=not a.quick, caps=caps, jobs=a.jobs)
    if a.json:
        Path(a.json).write_text(rep.to_json())
    if not a.quiet:
        print(format_table(rep.rows))
        print(f"\n{len(rep.rows)} compiled variants from {rep.launches} recorded launches in {rep.seconds:.1f} s")
        for s in rep.skipped:
            print(f"skipped (op rejects this impl): {s}")
        bad = rep.violations()
        print(f"{len(bad)} rule violations" + (":" if bad else ""))
        for v in bad:
            print(f"  {v}")
    return 1 if rep.violations() else 0


if __name__ == "__main__":
    sys.exit(main())
