"""The student as training holds it: float32 master weights, the compute dtype, FSDP2 sharding, LoRA adapters,
activation checkpointing, and the copy of the weights that rollouts and evals sample from.

Precision (DESIGN.md 4b). The parameters the optimizer updates are float32 masters; `model.dtype` (bfloat16) is the
compute dtype of activations, the LM-head GEMMs, the KV cache and the frozen models. A pure-bf16 AdamW loses every
update below 2^-8 of a weight, which at RL learning rates is most of them. Per mode:

    full fine-tuning, float32, one process   the plain HF model: masters are the compute weights.
    full fine-tuning, every other case       FSDP2 (`fully_shard` on every decoder layer, then the root) over float32
                                             parameters with MixedPrecisionPolicy(param_dtype=compute,
                                             reduce_dtype=float32), on every world size including 1: the all-gather
                                             casts to the compute dtype, gradients are reduce-scattered and
                                             accumulated in float32. One code path for 1 and N GPUs.
    LoRA (peft, model.lora_rank > 0)         base weights frozen in the compute dtype, adapters in float32 (peft's
                                             autocast_adapter_dtype); not sharded: each rank holds the base and
                                             adapter gradients are all-reduced once per step. The reference model is
                                             the same model with its adapters disabled (no second copy).

The sampler. Rollouts and evals decode token by token; through FSDP every token would all-gather every layer. So a
sharded student keeps a plain (unsharded, hook-free) copy in the compute dtype, refreshed in place from the masters
after every optimizer step (per parameter: cast the shard, all-gather: one all-gather of the model per step, in the
compute dtype). Its parameters keep their addresses, so CUDA graphs captured on them stay valid across rollout
calls. An unsharded student (float32 on one process, or LoRA) samples from itself.

Gradients across ranks are SUMMED, not averaged: each rank's loss is its share of the global step loss (the trainer
builds the normaliser from all ranks' counts), so N ranks compute the gradient of one process on the same batch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from exgrpo_fast.errors import CheckpointError, ConfigError
from exgrpo_fast.model.flops import FlopShape
from exgrpo_fast.model.forward import packed_hidden
from exgrpo_fast.model.loading import lm_head, load_model

_log = logging.getLogger(__name__)

MASTER_FILE = "master.safetensors"
"""float32 master weights of a checkpoint whose HF export (model.safetensors) is in a half compute dtype."""
ADAPTER_FILE = "adapter.safetensors"
"""float32 LoRA adapter weights of a checkpoint (its model.safetensors holds the merged export)."""
MASTER_DTYPE = torch.float32


class PackedPolicy(torch.nn.Module):
    """policy(batch) -> (hidden [N, H] at the loss positions, LM head weight [V, H], bias | None).

    The training forward goes through this module so that, under FSDP2, it is the root: its params (embeddings,
    final norm, LM head) are gathered for the forward and stay gathered (reshard_after_forward=False) while the fused
    loss reads the LM head weight; their grads are reduce-scattered by the root's post-backward.

    The module's forward returns the hidden states only; the call reads the LM head weight after it (gathered by
    then). Returning the weight Parameter from the FSDP2 root's forward would register a pre-backward hook on it at
    every forward, never removed: one hook more per step on a persistent tensor."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch) -> torch.Tensor:
        return packed_hidden(self.model, batch)  # (N, H)

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        hidden = super().__call__(batch)
        weight, bias = lm_head(self.model)
        return hidden, weight, bias


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder blocks of an HF causal LM (what FSDP2 shards and activation checkpointing wraps)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, model.base_model_prefix)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder `layers` to shard / checkpoint")
    return list(layers)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any module of `model` is an FSDP2 module (its parameters are sharded DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward (non-reentrant torch.utils.checkpoint through transformers'
    GradientCheckpointingLayer: FSDP2's hooks stay outside the checkpoint). Only where grad is enabled and the model
    is in train mode; no-grad passes (old / reference log-probs, sampling) run as usual."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"model.activation_checkpointing: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def shard(policy: PackedPolicy, compute: torch.dtype, device: torch.device, world: int, mesh=None) -> PackedPolicy:
    """FSDP2 over the policy's float32 parameters: every decoder layer, then the root (see PackedPolicy), with the
    compute dtype as MixedPrecisionPolicy.param_dtype and float32 gradient reduction (mesh: default one of `world`
    ranks of the device type)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = mesh if mesh is not None else init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=None if compute == MASTER_DTYPE else compute, reduce_dtype=MASTER_DTYPE)
    for layer in decoder_layers(policy.model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(policy, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return policy


def _lora_config(mcfg):
    try:
        from peft import LoraConfig
    except ImportError as e:  # pragma: no cover - config.validate checks this first
        raise ConfigError("model.lora_rank > 0 needs peft: pip install -e '.[lora]'") from e
    targets = list(mcfg.lora_targets)
    return LoraConfig(
        r=mcfg.lora_rank, lora_alpha=mcfg.lora_alpha, lora_dropout=0.0, bias="none",
        target_modules="all-linear" if targets == ["all-linear"] else targets,
    )  # fmt: skip


@dataclass
class Student:
    """What the trainer trains, samples from and saves (see the module docstring)."""

    model: torch.nn.Module  # the HF model whose trainable params the optimizer updates (peft-wrapped under LoRA)
    policy: PackedPolicy  # packed training forward; the FSDP2 root when sharded
    sampler: torch.nn.Module  # rollouts and evals: `model` itself, or a plain copy in the compute dtype
    tokenizer: Any
    compute_dtype: torch.dtype
    world: int
    sharded: bool
    lora: bool
    grad_sync: str = "step"  # sharded: reduce-scatter once per optimizer step ("step") or every micro-batch
    base_path: str = ""  # LoRA: the checkpoint the frozen base weights come from
    flop_shape: FlopShape | None = None  # what MFU counts (exgrpo_fast.model.flops)
    _pairs: list = field(default_factory=list, repr=False)  # (master param, sampler param) for the refresh

    # ---- training hooks ----------------------------------------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        """Factor on each rank's loss before backward. Losses are shares of the global step loss, so gradients must
        be summed over ranks; FSDP2 averages them (its divide-factor setter needs NCCL's PreMulSum, absent on
        gloo), so sharded backwards scale by the world size, a power of two in practice (exact)."""
        return float(self.world) if self.sharded else 1.0

    def micro_batch(self, last: bool) -> None:
        """Before each micro-batch's forward: under FSDP, gradients are reduce-scattered only after the step's last
        micro-batch (accumulated unsharded, in float32, until then) unless grad_sync is "micro_batch", and the root's
        embedding / LM head stay gathered between micro-batches (resharded after the last)."""
        if not self.sharded:
            return
        self.policy.set_requires_gradient_sync(last or self.grad_sync == "micro_batch")
        self.policy.set_reshard_after_backward(last, recurse=False)

    def reduce_gradients(self) -> None:
        """After the last micro-batch, before clipping: LoRA over several ranks sums the adapter gradients (one
        all-reduce of a flat buffer). FSDP does its own reduction in the backward."""
        if not self.lora or self.world == 1:
            return
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    @torch.no_grad()
    def refresh_sampler(self) -> None:
        """Copy the masters into the sampler's compute-dtype copy, in place (every rank calls: one all-gather per
        parameter, cast before gathering). A no-op when the student samples from itself."""
        if self.sampler is self.model:
            return
        from torch.distributed.tensor import DTensor

        for master, copy in self._pairs:
            src = master.detach().to(copy.dtype)
            copy.copy_(src.full_tensor() if isinstance(src, DTensor) else src)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """LoRA: the reference model is this model with its adapters disabled (the frozen base)."""
        if not self.lora:
            raise RuntimeError("Student.reference() is the LoRA reference; a full fine-tune loads a frozen copy")
        with self.model.disable_adapter():
            yield

    # ---- saving -----------------------------------------------------------------------------------------------
    def export(self) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None, dict[str, dict[str, torch.Tensor]]]:
        """What a checkpoint writes: (HF module to save_pretrained, its state dict or None = the module's own, extra
        tensor files {file name: tensors}). The HF export is in the compute dtype; the float32 masters (sharded full
        fine-tune in a half dtype) or adapters (LoRA) go to extra files so that a resume is bit-exact. Every rank
        must call (FSDP gathers); tensors are on the CPU, the gathered masters on rank 0 only (it writes)."""
        if self.lora:
            adapters = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
            return (
                self.model.get_base_model(),
                merged_lora_state(self.model, self.compute_dtype),
                {ADAPTER_FILE: adapters},
            )
        if not self.sharded:
            return self.model, None, {}
        files = {}
        if self.compute_dtype != MASTER_DTYPE:
            from exgrpo_fast.checkpoint import is_writer

            files[MASTER_FILE] = full_parameters(self.model, keep=is_writer())
        return self.sampler, None, files

    def describe(self) -> str:
        """One phrase for the run header."""
        dt = str(self.compute_dtype).removeprefix("torch.")
        if self.lora:
            n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            return f"LoRA r={self.model.peft_config['default'].r} ({n / 1e6:.2f}M fp32 adapter params), base {dt}"
        if self.sharded:
            masters = "fp32 masters" if self.compute_dtype != MASTER_DTYPE else "fp32"
            return f"FSDP2 x{self.world}, {dt} compute, {masters}, grad sync per {self.grad_sync.replace('_', '-')}"
        return f"{dt}, unsharded"


def full_parameters(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """{name: full float32 CPU tensor} of every parameter (tied ones once), gathered from FSDP shards (a
    collective: every rank calls). keep=False: take part in the gathers, keep nothing and return {} (the ranks that
    do not write a checkpoint: 8 ranks of a 7B student would otherwise each hold 28 GiB of host memory)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            out[name] = t.to("cpu", copy=True)
    return out


def merged_lora_state(peft_model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict of the plain HF model with every LoRA delta merged (W + B A * scale, summed in float32, then
    rounded once to `dtype`), under the plain model's names. The live model is left untouched (no merge / unmerge
    round trip through the half base weights)."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    state = {}
    for k, v in base.state_dict().items():
        if "lora_" in k:
            continue
        state[k.replace(".base_layer.", ".")] = v.detach().to("cpu", copy=True)
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and "default" in getattr(module, "lora_A", {}):
            w = module.get_base_layer().weight
            delta = module.get_delta_weight("default").float()
            state[f"{name}.weight"] = (w.float() + delta).to(dtype).to("cpu")
    return state


@torch.no_grad()
def _copy_from_file(params: dict[str, torch.nn.Parameter], path: Path) -> None:
    """Copy the safetensors file's tensors into the parameters of the same names, one tensor in memory at a time (a
    7B student's float32 masters are 28 GiB: the file is not read whole beside the model)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            missing = sorted(set(params) - set(f.keys()))
            if missing:
                raise CheckpointError(f"{path}: no tensor for parameter {missing[0]} ({len(missing)} missing)")
            for name, p in params.items():
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(p.shape):
                    raise CheckpointError(f"{path}: {name} has shape {shape}, the model's is {tuple(p.shape)}")
                p.copy_(f.get_tensor(name))
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({type(e).__name__}: {e})") from e


GRAD_SYNC_AUTO_FRACTION = 0.10
"""grad_sync "auto" accumulates unsharded float32 gradients (4 bytes per parameter) when they take at most this
fraction of the device's memory."""


def resolve_grad_sync(mode: str, n_params: int, device: torch.device, total_bytes: int | None = None) -> str:
    """model.grad_sync "auto" -> "step" or "micro_batch" (see the config field); other values unchanged."""
    if mode != "auto":
        return mode
    if total_bytes is None:
        if device.type != "cuda":
            return "step"
        total_bytes = torch.cuda.get_device_properties(device).total_memory
    return "step" if 4 * n_params <= GRAD_SYNC_AUTO_FRACTION * total_bytes else "micro_batch"


def needs_process_group(mcfg, world: int) -> bool:
    """A sharded student needs torch.distributed even in one process (FSDP2 over a mesh of one)."""
    return mcfg.lora_rank == 0 and (world > 1 or mcfg.dtype != "float32")


def load_student(
    path: str | Path, mcfg, device: torch.device, world: int, *, resume_from: Path | None = None, loader=None,
    mesh=None,
) -> Student:  # fmt: skip
    """Build the student from the HF checkpoint `path` as `mcfg` (the config's model section) says. resume_from: a
    checkpoint dir whose float32 masters / adapters replace what `path` holds (a resume). loader(dtype, attn_dtype,
    keep_on_host=False) -> (model, tokenizer) replaces the load from `path` (the memory plan builds models from a
    config on fake tensors); mesh: the FSDP2 device mesh (default: `world` ranks of the device type)."""
    compute = getattr(torch, mcfg.dtype)
    lora = mcfg.lora_rank > 0
    sharded = needs_process_group(mcfg, world)
    if loader is None:

        def loader(dtype: torch.dtype, attn_dtype: torch.dtype, keep_on_host: bool = False):
            return load_model(
                path, dtype=dtype, device=device, attn_backend=mcfg.attn_backend, attn_dtype=attn_dtype,
                deterministic=mcfg.deterministic, keep_on_host=keep_on_host,
            )  # fmt: skip

    if lora:
        from peft import get_peft_model

        base, tokenizer = loader(compute, compute)
        if mcfg.activation_checkpointing:
            enable_activation_checkpointing(base)
        model = get_peft_model(base, _lora_config(mcfg), autocast_adapter_dtype=True)
        if resume_from is not None and (Path(resume_from) / ADAPTER_FILE).is_file():
            file = Path(resume_from) / ADAPTER_FILE
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            _copy_from_file(trainable, file)
        return Student(model, PackedPolicy(model), model, tokenizer, compute, world, False, True,
                       base_path=str(path), flop_shape=FlopShape.of(model))  # fmt: skip
    # A sharded student's float32 weights stay on the host until shard(): fully_shard moves one decoder layer at a
    # time to the device (a 7B student would otherwise hold its whole 28 GiB float32 copy on every GPU first).
    model, tokenizer = loader(MASTER_DTYPE, compute, keep_on_host=True) if sharded else loader(compute, compute)
    if resume_from is not None and (Path(resume_from) / MASTER_FILE).is_file():
        file = Path(resume_from) / MASTER_FILE
        _copy_from_file(dict(model.named_parameters()), file)
    if mcfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    policy = PackedPolicy(model)
    shape = FlopShape.of(model)
    if not sharded:
        return Student(model, policy, model, tokenizer, compute, world, False, False, flop_shape=shape)
    shard(policy, compute, device, world, mesh)
    sampler, _ = loader(compute, compute)  # after shard(): the host copy is gone before the sampler's arrives
    sampler.requires_grad_(False).eval()
    names = dict(sampler.named_parameters())
    grad_sync = resolve_grad_sync(mcfg.grad_sync, sum(p.numel() for p in model.parameters()), device)
    student = Student(model, policy, sampler, tokenizer, compute, world, True, False, grad_sync=grad_sync,
                      flop_shape=shape)  # fmt: skip
    student._pairs = [(p, names[n]) for n, p in model.named_parameters()]  # the sharded params (new objects)
    student.refresh_sampler()
    return student
