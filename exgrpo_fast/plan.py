"""`python -m exgrpo_fast.plan`: the peak GPU memory of a configured run, planned on a CPU before a GPU is rented.

    python -m exgrpo_fast.plan --model.path DIR [any training flag] --gpus N --gpu_gib G [--json]

DIR may hold only a config.json: the student (and the reference and teacher) are built from their configs on fake
tensors (torch's FakeTensorMode: shapes, dtypes and storage sizes, no data, no weights read), sharded by the
trainer's own code (exgrpo_fast.model.student) with FSDP2 over a fake process group of N ranks, and one training step
of the configured run is traced through the trainer's own functions under torch's MemTracker
(torch.distributed._tools.mem_tracker), phase by phase, for rank 0:

    model   the student (float32 masters, 1/N each when sharded) and the sampler's compute-dtype copy
    sft     an SFT step: micro-batches forward and backward through the fused LM-head loss, the optimizer step
    grpo    a GRPO step: the rollout of one sampling batch (prompts prefilled once, the cache expanded to G rows
            per prompt, a decode step at the full cache length), the old / reference / teacher log-prob passes, the
            update's micro-batches forward and backward, the optimizer step

Micro-batches are filled to data.token_budget with sequences of prompt + turns x (response + 8) tokens (--prompt_
tokens, --response_tokens, --turns); the first two micro-batches of a pass are traced (every later one repeats the
second: the accumulated gradients already exist), so the peak does not depend on how many a step has.

What a CPU cannot run is replaced by what it allocates on a GPU (`--device cuda`, the default): Triton kernels are
not launched (their launchers still allocate every buffer), the LM head takes the chunked path with the chunk a GPU
of G GiB gets, packed attention allocates what flash attention keeps (output and a float32 log-sum-exp per head and
token), and SDPA while sampling allocates its output only (the memory-efficient kernel). `--device cpu` traces the
CPU code paths as they are, which a real CPU run can check (tests/test_plan.py).

The peak counts tensors only; `fits` adds what a GPU process holds besides them (--reserve_gib: CUDA context,
cuBLAS workspace, NCCL buffers) and the caching allocator's fragmentation (--fragmentation).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import dataclasses
import json
import math
import pkgutil
import sys
from collections.abc import Iterator
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from exgrpo_fast import ops
from exgrpo_fast.config import TrainConfig, parse_args
from exgrpo_fast.errors import ConfigError, MissingPathError, ModelError, cli_main

GiB = 2**30
PHASES = ("model", "sft", "grpo")
COMPONENTS = ("parameters", "master copy", "gradients", "optimizer states", "activations", "KV cache",
              "LM-head chunk", "frozen models")  # fmt: skip


@dataclass
class PlanShape:
    """The sequences of a planned step."""

    prompt_tokens: int = 256
    response_tokens: int = 256
    turns: int = 1

    @property
    def seq_len(self) -> int:
        return self.prompt_tokens + self.turns * (self.response_tokens + 8)

    @property
    def loss_tokens(self) -> int:
        return self.turns * self.response_tokens


@dataclass
class PhasePeak:
    """A phase's peak (bytes of tensors, rank 0), torch MemTracker's categories at it, and the named components:
    RESIDENT ones (exact sizes), gradients (alive after the traced backward), the LM-head chunk (float32 logits of
    one chunk) and the rest of the peak (activations, gradients and temporaries)."""

    total: int = 0
    by_category: dict[str, int] = field(default_factory=dict)
    components: dict[str, int] = field(default_factory=dict)
    micro_batches: int = 0  # the pass's micro-batches per step (the first two are traced)


# ----------------------------------------------------------------------------------------------------------------
# the tracker: torch's MemTracker, device-wide peaks per phase


def _tracker_class():
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    class PhaseTracker(MemTracker):
        """torch's MemTracker keeping the device-wide peak of each phase (its per-module snapshots, which this does not
        need, cost ~15x the trace time of a 7B step)."""

        def __init__(self) -> None:
            super().__init__()
            self.phase = "model"
            self.peaks: dict[str, tuple[int, dict]] = {}

        def current(self) -> tuple[int, dict]:
            total, cats = 0, {}
            for snap in self._curr_mem_snap.values():
                total += snap[_TOTAL_KEY]
                for k, v in snap.items():
                    if k != _TOTAL_KEY:
                        name = getattr(k, "value", str(k))
                        cats[name] = cats.get(name, 0) + v
            return total, cats

        def set_phase(self, phase: str) -> None:
            self.phase = phase
            self.peaks[phase] = self.current()

        def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True) -> tuple[int, int]:
            """As MemTracker's, with gradient hooks on trainable parameters only (a LoRA layer holds a frozen base
            weight beside its adapters, and a hook on a tensor without grad is an error)."""
            mem = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:
                for p in module.parameters():
                    if p.requires_grad and self._param_to_grad_hook_handles.get(p, None) is None:
                        track = partial(self._update_and_maybe_create_winfos, reftype=_MemRefType.GRAD)
                        self._param_to_grad_hook_handles[p] = (
                            p.register_hook(lambda g, track=track: track(g) and None),
                            p.register_post_accumulate_grad_hook(lambda q, track=track: track(q.grad) and None),
                        )
            return mem

        def _pre_fw_hook(self, module, inputs) -> None:
            """A top-level module called again (the next micro-batch, another pass) starts a new iteration: forget the
            per-module stats of the last one (MemTracker refuses a second iteration otherwise). Frozen modules only
            get their parameters tracked (MemTracker would hook gradients that never come)."""
            params = list(module.parameters())
            if not torch.is_grad_enabled() or (params and not any(p.requires_grad for p in params)):  # no backward
                self._track_module_params_and_buffers(module, install_grad_hooks=False)
                return
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
                if parents == {"Global"}:
                    self.reset_mod_stats()
            super()._pre_fw_hook(module, inputs)

        def _post_fw_hook(self, module, inputs, outputs) -> None:
            if module in self.memory_tracking:
                super()._post_fw_hook(module, inputs, outputs)

        def _pre_bw_hook(self, module, args) -> None:
            if module in self.memory_tracking:
                super()._pre_bw_hook(module, args)

        def _post_bw_hook(self, module, args) -> None:
            if module in self.memory_tracking:
                super()._post_bw_hook(module, args)

        def _update_peak_stats(self, peak_state) -> None:  # noqa: ARG002 - the base signature
            total, cats = self.current()
            if total > self.peaks.get(self.phase, (-1, {}))[0]:
                self.peaks[self.phase] = (total, cats)

    return PhaseTracker


# ----------------------------------------------------------------------------------------------------------------
# GPU behaviour on a CPU trace


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](*args)` does nothing (the launcher allocated its buffers)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None

    def __call__(self, *args, **kwargs):
        return None


class _FlashAttention(torch.autograd.Function):
    """Packed attention as flash attention holds it: the output, and a float32 log-sum-exp per head and token."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fp32_out_gemm(gemm, n_inputs: int):
    """torch.mm / torch.addmm with out_dtype (cuBLAS half-in, fp32-out, into a given `out`) on fake tensors: the
    result goes into `out`, which already holds its memory, so nothing new is allocated (some torch releases, 2.11
    among them, cannot decompose the fp32-out addmm on fake tensors). Every other call is the plain op."""

    def call(*args, out_dtype=None, out=None, **kwargs):
        if out_dtype is None:
            return gemm(*args, **kwargs) if out is None else gemm(*args, out=out, **kwargs)
        if out is not None:
            return out
        a, b = args[n_inputs - 2], args[n_inputs - 1]
        return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype)

    return call


def _sdpa_output_only(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


@contextlib.contextmanager
def gpu_behaviour(gpu_bytes: int) -> Iterator[None]:
    """Inside: the trainer's code allocates on CPU fake tensors what it would on a CUDA device of gpu_bytes."""
    import csrc_triton
    from exgrpo_fast.model import attention

    with contextlib.ExitStack() as stack:
        mp = stack.enter_context(_patches())
        for info in pkgutil.iter_modules(csrc_triton.__path__):
            module = importlib.import_module(f"csrc_triton.{info.name}")
            for attr, value in vars(module).items():
                if type(value).__name__ in ("JITFunction", "InterpretedFunction", "Autotuner", "Heuristics"):
                    mp(module, attr, _NoLaunch())
        from csrc_triton import linear_chunked

        mp(ops, "backend_for", lambda device, announce=True: "triton")
        mp(ops, "_linear_impl", lambda impl, hidden, weight: "chunked" if impl == "auto" else impl)
        chunk = linear_chunked.chunk_size
        mp(linear_chunked, "chunk_size", _gpu_chunk_size(chunk, gpu_bytes))
        mp(linear_chunked, "_fp32_out_ok", lambda device, kind: True)
        mp(torch, "mm", _fp32_out_gemm(torch.mm, 2))
        mp(torch, "addmm", _fp32_out_gemm(torch.addmm, 3))
        mp(attention, "_torch_varlen", lambda q, k, v, *shape_and_options: _FlashAttention.apply(q, k, v))
        from exgrpo_fast.rollout import engine, sampling

        mp(engine, "sample_next", partial(sampling.sample_next, impl="triton"))  # the fused sampler, as on CUDA
        mp(torch.nn.functional, "scaled_dot_product_attention", _sdpa_output_only)
        yield


def _gpu_chunk_size(chunk_size, gpu_bytes: int):
    """linear_chunked.chunk_size as on a CUDA device of gpu_bytes (its sizing reads only the device's total)."""
    from unittest import mock

    props = type("Props", (), {"total_memory": gpu_bytes})()

    def sized(num_tokens, vocab, hidden, dtype, device, requested=None, **kwargs):
        with mock.patch.object(torch.cuda, "get_device_properties", lambda d=None: props):
            return chunk_size(num_tokens, vocab, hidden, dtype, torch.device("cuda"), requested, **kwargs)

    return sized


@contextlib.contextmanager
def _fresh_sampling_caches() -> Iterator[None]:
    """The sampler's per-process tables (built on first use) start empty for the trace and come back as they were:
    a traced step pays for building them as a fresh process does, and no fake tensor stays in a module-level cache."""
    from exgrpo_fast.rollout import sampling

    saved = [(d, dict(d)) for d in (sampling._NOISE_TABLES, sampling._VOCAB_LANES)]
    for d, _ in saved:
        d.clear()
    try:
        yield
    finally:
        for d, items in saved:
            d.clear()
            d.update(items)


@contextlib.contextmanager
def _patches():
    saved: list[tuple[Any, str, Any]] = []

    def setattr_(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        yield setattr_
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


# ----------------------------------------------------------------------------------------------------------------
# the traced step


def _model_loader(path: Path, device: torch.device, backend: str, fake: bool):
    """loader(dtype, attn_dtype, keep_on_host=False) -> (model, None) building the HF model from DIR/config.json
    (fake: no weights read), or loading it with its weights (a real run)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from exgrpo_fast.model.attention import IMPLEMENTATION, bind_backend
    from exgrpo_fast.model.loading import load_model

    def loader(dtype: torch.dtype, attn_dtype: torch.dtype, keep_on_host: bool = False):
        if not fake:
            auto = "auto" if device.type == "cuda" else "sdpa_ref"
            model, _ = load_model(path, dtype=dtype, device=device, attn_backend=auto, attn_dtype=attn_dtype,
                                  keep_on_host=keep_on_host)  # fmt: skip
            return model, None
        # keep_on_host: a fake trace has one device, so the host copy a sharded student loads is counted as if it
        # were on the GPU: the model phase is an upper bound of the load (never the step's peak: tests/test_plan.py)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        config._attn_implementation = IMPLEMENTATION
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=IMPLEMENTATION)
        bind_backend(model, backend)
        return model, None  # built on the CPU (fake tensors cannot be swapped to another device)

    return loader


def _sequences(shape: PlanShape, vocab: int, n: int, group_size: int) -> list[tuple[list[int], list[bool]]]:
    """n dialogues of shape.seq_len tokens, the loss on their last loss_tokens; each run of group_size of them
    shares its prompt (GRPO's samples of one problem), everything after it differs."""
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(n):
        if i % group_size == 0:
            prompt = torch.randint(0, vocab, (shape.prompt_tokens,), generator=g).tolist()
        rest = torch.randint(0, vocab, (shape.seq_len - shape.prompt_tokens,), generator=g).tolist()
        mask = [False] * (shape.seq_len - shape.loss_tokens) + [True] * shape.loss_tokens
        seqs.append((prompt + rest, mask))
    return seqs


def _micro_batches(shape: PlanShape, vocab: int, per_rank: int, budget: int, group_size: int = 1,
                   share_prefix: bool = False):  # fmt: skip
    """(the first two micro-batches of a pass over this rank's per_rank dialogues, packed as the trainer packs them,
    the pass's micro-batch count, the number of dialogues in the two)."""
    from exgrpo_fast.data.packing import pack_sequences

    if shape.seq_len > budget:
        raise ConfigError(f"data.token_budget={budget}: a planned sequence has {shape.seq_len} tokens")
    groups = [i // group_size for i in range(per_rank)] if share_prefix else None
    packed = pack_sequences(_sequences(shape, vocab, per_rank, group_size), budget, groups=groups)
    first = packed[:2]
    return first, len(packed), sum(len(b.sample_index) for b in first)


def _bytes(tensors) -> int:
    """Bytes of the storages behind `tensors`, each storage once (FSDP2's sharded gradients are views of one
    reduce-scatter buffer per group; a DTensor counts its local shard)."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for t in tensors:
        st = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
        seen[st._cdata] = st.nbytes()
    return sum(seen.values())


@contextlib.contextmanager
def _fake_module_moves(on: bool) -> Iterator[None]:
    """module.to(...) cannot swap fake parameters (FakeTensorMode keeps weakrefs to them), and the student's build moves
    modules in two places: peft places new adapters beside their base layer (a move to the CPU, where everything of
    a fake trace already is: a no-op) and casts them (skipped: they stay float32, which is what peft's
    autocast_adapter_dtype makes of them)."""
    if not on:
        yield
        return
    to = torch.nn.Module.to

    def cpu_moves_are_noops(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is None and (device is None or device.type == "cpu"):
            return self
        return to(self, *args, **kwargs)

    with _patches() as mp:
        mp(torch.nn.Module, "to", cpu_moves_are_noops)
        try:
            from peft.tuners.tuners_utils import BaseTunerLayer

            mp(BaseTunerLayer, "_move_adapter_to_device_of_base_layer", lambda self, name, device=None: None)
        except ImportError:  # no peft: a LoRA config is refused before this
            pass
        yield


def _warm_optimizer(optimizer) -> None:
    """Create the optimizer's states (AdamW makes them at its first step) with a step on zero gradients, which moves
    no weight (weight decay aside): the traced step is then a steady-state one, its states already resident."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _grad_bytes(student) -> int:
    """Gradients alive now: each parameter's .grad (an FSDP shard) and FSDP2's unsharded float32 accumulators."""
    tensors = [p.grad for p in student.model.parameters() if p.grad is not None]
    for m in student.policy.modules():
        state = getattr(m, "_get_fsdp_state", None)
        group = state()._fsdp_param_group if state is not None else None
        for fp in getattr(group, "fsdp_params", []) or []:
            if getattr(fp, "unsharded_accumulated_grad", None) is not None:
                tensors.append(fp.unsharded_accumulated_grad)
    return _bytes(tensors)


def trace_step(cfg: TrainConfig, path: Path, world: int, shape: PlanShape, *, fake: bool, device_kind: str,
               gpu_bytes: int) -> dict[str, PhasePeak]:  # fmt: skip
    """Peaks of a steady-state SFT step and GRPO step of `cfg`, for rank 0 of `world` (see the module docstring).
    fake: on fake CPU tensors (the plan); else for real, on the CPU or (device_kind "cuda") on the current GPU with
    the real kernels (what the plan is checked against)."""
    from transformers import AutoConfig

    from exgrpo_fast import train as T
    from exgrpo_fast.model.student import load_student, resolve_grad_sync
    from exgrpo_fast.rollout.cache import RowKVCache
    from exgrpo_fast.rollout.engine import DecodeState, Engine

    gpu = device_kind == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if gpu and not fake else torch.device("cpu")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    vocab = config.get_text_config().vocab_size
    budget = cfg.data.token_budget
    G = cfg.grpo.group_size
    if gpu and cfg.model.grad_sync == "auto":
        mode = resolve_grad_sync("auto", count_params(path), torch.device("cuda"), gpu_bytes)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, grad_sync=mode))
    sft_batches, n_sft, _ = _micro_batches(shape, vocab, math.ceil(cfg.sft.batch_size / world), budget)
    grpo_batches, n_grpo, _ = _micro_batches(shape, vocab, math.ceil(cfg.grpo.problems_per_step / world) * G, budget,
                                             G, cfg.grpo.share_prefix)  # fmt: skip
    n_seqs = 1 + max(int(i) for b in grpo_batches for i in b.sample_index.tolist())
    sft_batches, grpo_batches = [b.to(device) for b in sft_batches], [b.to(device) for b in grpo_batches]
    head = {"chunk_size": cfg.model.lm_head_chunk_size, "fp32_logits": cfg.model.lm_head_fp32_logits}
    tracker = _tracker_class()()
    components: dict[str, dict[str, int]] = {}
    mesh = None
    if T.needs_process_group(cfg.model, world):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))  # outside FakeTensorMode: it runs collectives on real tensors
    fake_mode = contextlib.nullcontext()
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    if gpu:
        behaviour = gpu_behaviour(gpu_bytes) if fake else contextlib.nullcontext()
    else:
        behaviour = ops.backend("reference")
    loader = _model_loader(path, device, "torch_varlen" if gpu else "sdpa_ref", fake)
    with (
        fake_mode, behaviour, ops.value_checks("off"), _fresh_sampling_caches(), tracker, torch.random.fork_rng(),
        _fake_module_moves(fake),
    ):  # fmt: skip
        # ---- the model
        student = load_student(path, cfg.model, device, world, loader=loader, mesh=mesh)
        masters = _bytes(p for p in student.model.parameters() if p.requires_grad)
        compute_copies = _bytes(student.sampler.parameters()) if student.sampler is not student.model else 0
        compute_copies += _bytes(p for p in student.model.parameters() if not p.requires_grad)  # LoRA base
        resident = {"master copy": masters, "parameters": compute_copies}
        components["model"] = dict(resident)
        chunk_bytes = 0
        if gpu:
            from csrc_triton import linear_chunked

            H, fp32 = config.get_text_config().hidden_size, cfg.model.lm_head_fp32_logits
            chunk = linear_chunked.chunk_size(budget, vocab, H, student.compute_dtype, device,
                                              cfg.model.lm_head_chunk_size, fp32_logits=fp32)  # fmt: skip
            chunk_bytes = chunk * linear_chunked.chunk_bytes_per_token(vocab, H, student.compute_dtype, fp32)

        # ---- SFT: a steady-state step (optimizer states resident): micro-batches forward + backward, the step
        optimizer, _ = T.make_optimizer(student.model, cfg, cfg.sft.lr, 0, 1)
        _warm_optimizer(optimizer)
        resident["optimizer states"] = _bytes(t for st in optimizer.state.values() for t in st.values()
                                              if torch.is_tensor(t) and t.dim() > 0)  # fmt: skip
        tracker.set_phase("sft")
        update = T.OptimizerStep(student, optimizer, cfg.optim.grad_clip)
        total = float(sum(b.num_loss_tokens for b in sft_batches))
        loss_sum, _ = T.sft_backward(student, sft_batches, len(sft_batches), total, device, head)
        grads = _grad_bytes(student)
        _step(update, loss_sum, fake)
        components["sft"] = {**resident, "gradients": grads, "LM-head chunk": chunk_bytes}
        del optimizer, update, loss_sum
        resident.pop("optimizer states")

        # ---- GRPO: the frozen models, the rollout of one sampling batch, the log-prob passes, the update
        tracker.set_phase("grpo")
        ref = teacher = None
        if cfg.loss.kl_beta > 0 and not student.lora:
            ref, _ = loader(student.compute_dtype, student.compute_dtype)
            ref.requires_grad_(False).eval()
        if cfg.loss.teacher_beta > 0:
            teacher_loader = _model_loader(Path(cfg.model.teacher_path), device, "torch_varlen" if gpu else "sdpa_ref",
                                           fake)  # fmt: skip
            teacher, _ = teacher_loader(student.compute_dtype, student.compute_dtype)
            teacher.requires_grad_(False).eval()
        resident["frozen models"] = sum(_bytes(m.parameters()) for m in (ref, teacher) if m is not None)
        optimizer, _ = T.make_optimizer(student.model, cfg, cfg.grpo.lr, 0, 1)
        _warm_optimizer(optimizer)
        resident["optimizer states"] = components["sft"]["optimizer states"] = _bytes(
            t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0
        )
        rows = min(max(1, cfg.rollout.batch_size // G), math.ceil(cfg.grpo.problems_per_step / world)) * G
        engine = Engine(
            student.sampler, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
            max_new_tokens=shape.response_tokens, stop_check_every=cfg.rollout.stop_check_every, stop_ids=[0],
            pad_id=0, cuda_graphs=False, lean_forward=cfg.rollout.lean_forward, lean_fuse=not gpu,
        )  # fmt: skip
        with torch.no_grad():
            P, L0 = rows // G, shape.prompt_tokens
            small = RowKVCache(P, L0, device)
            prompt = torch.randint(0, vocab, (P, L0), device=device)
            hidden = engine.forward(small, prompt, torch.zeros(P, dtype=torch.long, device=device),
                                    torch.full((P,), L0, device=device), L0)  # fmt: skip
            logits = engine.logits(hidden[:, -1])
            cache = small.expand(G, shape.seq_len, L0)
            del small, hidden, logits
            state = DecodeState(
                tok=torch.zeros(rows, dtype=torch.long, device=device),
                lens=torch.full((rows,), shape.seq_len - 1, dtype=torch.long, device=device),
                done=torch.zeros(rows, dtype=torch.bool, device=device),
                n_gen=torch.zeros(rows, dtype=torch.long, device=device),
                budget=torch.full((rows,), shape.response_tokens, dtype=torch.long, device=device),
                out=torch.zeros(rows, shape.response_tokens + 1, dtype=torch.long, device=device),
                seeds=torch.zeros(rows, dtype=torch.long, device=device),
            )
            engine.decode_one_token(state, cache, shape.seq_len)  # at the full cache length
            kv = _bytes(cache.keys + cache.values)
            del state
        # a kept engine (CUDA graphs, rollout.persistent) holds its cache through the update
        keep_cache = gpu and cfg.rollout.persistent and cfg.rollout.cuda_graphs
        if keep_cache:
            resident["KV cache"] = kv
        else:
            del cache
        U = cfg.grpo.updates_per_batch
        batches = grpo_batches
        old, refs, tch = T.frozen_logps(student, T.Frozen(ref, teacher), batches, U > 1, cfg.loss.kl_beta > 0, 1.0,
                                        head)  # fmt: skip
        update = T.OptimizerStep(student, optimizer, cfg.optim.grad_clip)
        advantages = torch.zeros(n_seqs, device=device)
        loss, _ = T.policy_loss_backward(
            student.policy, batches, advantages, old, refs, tch, [True] * len(batches), T.step_loss_norm(batches),
            cfg.loss, 1.0, micro_batch=student.micro_batch, loss_scale=student.loss_scale, lm_head=head,
        )  # fmt: skip
        grads = _grad_bytes(student)
        _step(update, loss, fake)
        components["grpo"] = {**resident, "gradients": grads, "LM-head chunk": chunk_bytes}
        if not keep_cache:
            components["grpo"]["KV cache (rollout only)"] = kv
        counts = {"sft": n_sft, "grpo": n_grpo}
    out = {}
    for phase in PHASES:
        total, cats = tracker.peaks.get(phase, (0, {}))
        comp = components.get(phase, {})
        known = sum(v for k, v in comp.items() if k in RESIDENT)
        comp["rest (activations, temporaries)"] = max(0, total - known)
        peak = PhasePeak(total, {k: v for k, v in cats.items() if v}, comp)
        peak.micro_batches = counts.get(phase, 0)
        out[phase] = peak
    return out


RESIDENT = ("master copy", "parameters", "optimizer states", "frozen models", "KV cache")
"""Components resident for the whole phase; the rest of its peak is activations, gradients and temporaries."""


def _step(update, loss, fake: bool) -> None:
    """OptimizerStep: on fake tensors its finiteness check cannot read a value, so the step is taken directly."""
    if not fake:
        update(loss)
        return
    update.student.reduce_gradients()
    update.optimizer.step()
    update.student.refresh_sampler()
    update.optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------------
# the command line


@dataclass
class Plan:
    params: int
    peak_bytes: int
    fits: bool
    gpus: int
    gpu_gib: float
    phases: dict[str, PhasePeak]
    reserve_bytes: int

    def to_json(self) -> dict:
        return {
            "params": self.params, "peak_bytes": self.peak_bytes, "fits": self.fits, "gpus": self.gpus,
            "gpu_gib": self.gpu_gib, "reserve_bytes": self.reserve_bytes,
            "phases": {k: dataclasses.asdict(v) for k, v in self.phases.items()},
        }  # fmt: skip


def count_params(path: Path) -> int:
    """Parameters of the model whose config.json is in `path` (built on the meta device: no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def make_plan(cfg: TrainConfig, gpus: int, gpu_gib: float, shape: PlanShape, *, device: str = "cuda",
              reserve_gib: float = 2.0, fragmentation: float = 0.05) -> Plan:  # fmt: skip
    """Trace the configured step on fake tensors (see the module docstring)."""
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        raise MissingPathError(f"model.path {path}: no config.json (the plan needs only that file)")
    with fake_world(gpus):
        phases = trace_step(cfg, path, gpus, shape, fake=True, device_kind=device, gpu_bytes=int(gpu_gib * GiB))
    peak = max(p.total for p in phases.values())
    reserve = int(reserve_gib * GiB + fragmentation * peak)
    return Plan(count_params(path), peak, peak + reserve <= gpu_gib * GiB, gpus, gpu_gib, phases, reserve)


@contextlib.contextmanager
def fake_world(world: int) -> Iterator[None]:
    """A fake process group of `world` ranks (collectives do nothing), when none exists; this process is rank 0."""
    if dist.is_initialized():
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 4 else f"{n / 2**20:.1f} MiB"


def format_plan(plan: Plan) -> str:
    lines = [
        f"plan | {plan.params / 1e9:.2f}B params | {plan.gpus} GPU(s) of {plan.gpu_gib:g} GiB | peak "
        f"{_size(plan.peak_bytes)} per GPU + {_size(plan.reserve_bytes)} reserve -> "
        + ("fits" if plan.fits else "DOES NOT FIT")
    ]
    for name, phase in plan.phases.items():
        mb = f" | {phase.micro_batches} micro-batch(es) per step" if phase.micro_batches else ""
        lines.append(f"  {name:5s} peak {_size(phase.total)}{mb}")
        lines.append("        " + ", ".join(f"{k} {_size(v)}" for k, v in phase.components.items() if v))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """The command line (user errors: one line, exit code 2)."""

    def run(args: list[str]) -> dict:
        own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        own.add_argument("--gpus", type=int, default=1)
        own.add_argument("--gpu_gib", type=float, default=141.0)
        own.add_argument("--json", action="store_true")
        own.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
        own.add_argument("--prompt_tokens", type=int, default=256)
        own.add_argument("--response_tokens", type=int, default=0)
        own.add_argument("--turns", type=int, default=0)
        own.add_argument("--reserve_gib", type=float, default=2.0)
        own.add_argument("--fragmentation", type=float, default=0.05)
        known, rest = own.parse_known_args(args)
        if "--help" in rest or "-h" in rest:
            print(__doc__)
        cfg, _ = parse_args(rest)
        if known.gpus < 1 or known.gpu_gib <= 0:
            raise ConfigError(f"--gpus {known.gpus} --gpu_gib {known.gpu_gib}: expected >= 1 and > 0")
        if not cfg.model.path:
            raise ConfigError("--model.path: the plan needs a model directory (a config.json is enough)")
        response = known.response_tokens or cfg.rollout.max_new_tokens or 256
        turns = known.turns or ((1 + cfg.data.num_probes) if cfg.grpo.use_probes else 1)
        shape = PlanShape(known.prompt_tokens, response, turns)
        try:
            plan = make_plan(cfg, known.gpus, known.gpu_gib, shape, device=known.device, reserve_gib=known.reserve_gib,
                             fragmentation=known.fragmentation)  # fmt: skip
        except (OSError, ValueError) as e:
            if isinstance(e, (ConfigError, MissingPathError, ModelError)):
                raise
            raise ModelError(f"model.path {cfg.model.path}: {type(e).__name__}: {e}") from e
        print(format_plan(plan))
        if known.json:
            print(json.dumps(plan.to_json()))
        return plan.to_json()

    return cli_main(run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
