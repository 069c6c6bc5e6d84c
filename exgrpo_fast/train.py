"""
Teacher-guided explanatory distillation: Explanatory Inversion (EI) SFT, then ExGRPO.

    python -m exgrpo_fast.train                                # cpu-default: tiny model, built-in tasks, 2 CPU cores
    python -m exgrpo_fast.train --config configs/gpu.toml      # larger built-in model on a GPU
    python -m exgrpo_fast.train --preset grpo-no-probes        # ablation: plain GRPO, no probe turns / DSU
    python -m exgrpo_fast.train --resume runs/NAME             # continue exactly where a run stopped
    torchrun --nproc_per_node 2 -m exgrpo_fast.train           # FSDP2 (gloo on CPU, nccl on GPU)

Stage 1, EI distillation: SFT on the teacher's dialogues (question -> rationale + answer, each explanatory probe ->
its answer), cross-entropy on assistant tokens only, packed (padding-free) micro-batches.

Stage 2, ExGRPO. What of GRPO this keeps and what it drops:
- keeps: G rollouts per problem; advantages normalised within the group ((r - mean) / std, or Dr. GRPO's r - mean);
  the clipped importance-ratio loss (PPO or CISPO, per token or per sequence) and an optional KL to the reference
  (the frozen SFT model) and to a teacher, all in one fused LM-head + loss op;
- changes: a rollout is a whole dialogue (the question, then each probe, every turn conditioned on the student's own
  earlier answers) and its reward is task + probe_weight * probe accuracy + dsu_weight * Dialogue Structure Utility
  (+ format); one advantage per dialogue, applied to every student token of every turn; the loss normaliser (tokens,
  sequences, longest sequence) is taken once per step over all its micro-batches, so packing never changes the loss;
- drops: the value model / GAE; by default off-policy reuse (one update per rollout batch, so old_logp is the
  detached current log-prob and the ratio is 1; grpo.updates_per_batch > 1 brings the clipping into play), the
  reference forward (kl_beta = 0) and the teacher (teacher_beta = 0).

Both stages run through `run_stage`, which owns the optimizer, the schedule, clipping, the non-finite skip, logging,
checkpoints and the stop; `sft_step` and `grpo_step` only compute gradients and metrics.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
import warnings
from collections.abc import Callable, Iterator
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from exgrpo_fast import checkpoint as ckpt_lib
from exgrpo_fast import ops
from exgrpo_fast import rundir
from exgrpo_fast.errors import cli_main, full_disk_named
from exgrpo_fast.config import TrainConfig, parse_args
from exgrpo_fast.data.dialogue import encode_dialogue
from exgrpo_fast.data.lengths import resolve_max_new_tokens
from exgrpo_fast.data.packing import PackedBatch, pack_sequences
from exgrpo_fast.data.problem import Dialogue, Problem, sft_dialogue
from exgrpo_fast.data.splits import load_data
from exgrpo_fast.eval import bars_on, evaluate, format_eval
from exgrpo_fast.model.flops import FlopShape, forward_flops, peak_flops
from exgrpo_fast.model.loading import load_model, use_device
from exgrpo_fast.model.student import PackedPolicy, Student, load_student, needs_process_group
from exgrpo_fast.model.tiny import create_tiny_checkpoint
from exgrpo_fast.reference import LossConfig
from exgrpo_fast.rewards import score_dialogue
from exgrpo_fast.rollout import rollout_dialogues
from exgrpo_fast.validate import validate_run

# ----------------------------------------------------------------------------------------------------------------
# set-up helpers


@contextlib.contextmanager
def distributed(cfg: TrainConfig) -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world_size, device) for the run, with the process group it needs, destroyed on exit if made here.

    torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU, each rank on cuda:LOCAL_RANK. One process: the configured
    device is made current (Triton launches and CUDA graph capture use the current device, so cuda:N with N != 0
    needs it), and a sharded student (a half compute dtype with float32 masters: FSDP2 on a mesh of one) gets a
    one-process group over an in-memory store."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    owned = False
    if world > 1:
        device = use_device(cfg.model.device if cfg.model.device == "cpu" else "auto")
        if device.type == "cuda":
            device = use_device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            owned = True
        rank = dist.get_rank()
    else:
        rank = 0
        device = use_device(cfg.model.device)
        if needs_process_group(cfg.model, world) and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            owned = True
    try:
        yield rank, world, device
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_rng(seed: int, stage: str, step: int) -> np.random.Generator:
    """Batch choice is a pure function of (seed, stage, step): resuming needs no data-loader state."""
    return np.random.default_rng([seed, {"sft": 1, "grpo": 2}[stage], step])


def lr_lambda(warmup: int, total: int, min_frac: float) -> Callable[[int], float]:
    """Linear warmup then cosine decay to min_frac of the peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, lr: float, warmup: int, total: int
) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """(AdamW over the trainable params, its warmup + cosine LambdaLR). Under FSDP2 every parameter must be a
    sharded DTensor here (a gathered root would hand the optimizer its temporary copies: see release_root)."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad]
    if any(isinstance(p, DTensor) for p in params) and not all(isinstance(p, DTensor) for p in params):
        raise RuntimeError("FSDP2 root is gathered while the optimizer is built: reshard it first (release_root)")
    optimizer = torch.optim.AdamW(
        params, lr=lr, betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total, cfg.optim.min_lr_frac))
    return optimizer, scheduler


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Global grad norm (sharded and replicated params alike), clipped in place when max_norm > 0. No host sync."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    if not any(isinstance(p.grad, DTensor) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    sharded = sum((p.grad.to_local().float() ** 2).sum() for p in params if isinstance(p.grad, DTensor))
    sharded = torch.as_tensor(sharded, dtype=torch.float32)
    dist.all_reduce(sharded)
    replicated = sum((p.grad.float() ** 2).sum() for p in params if not isinstance(p.grad, DTensor))
    norm = (sharded + replicated).sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.mul_(coef.to(g.dtype))
    return norm


def mfu(flops: float, seconds: float, device: torch.device, dtype: torch.dtype) -> float | None:
    """Model FLOPs utilisation of `flops` run in `seconds` on a GPU of known peak (exgrpo_fast.model.flops)."""
    if device.type != "cuda" or seconds <= 0:
        return None
    peak = peak_flops(torch.cuda.get_device_name(device), dtype)
    return None if peak is None else flops / seconds / peak


class Logger:
    """metrics.jsonl + TensorBoard + console, rank 0 only.

    resume_at: the position() saved with the checkpoint a run resumes from. metrics.jsonl is cut back to it and
    TensorBoard purges the later steps, so the rows an interrupted run wrote after its last checkpoint (which the
    resumed run writes again) appear once: the outputs of a resumed run are those of a straight one."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, rank: int, resume_at: dict | None = None):
        self.enabled = rank == 0
        self.tb = None
        self.global_step = -1
        if self.enabled:
            path = run_dir / "metrics.jsonl"
            if resume_at is not None and path.is_file() and path.stat().st_size > resume_at["bytes"]:
                with open(path, "r+b") as f:
                    f.truncate(resume_at["bytes"])
            self.file = open(path, "a")  # noqa: SIM115 - open for the whole run
            if cfg.log.tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # optional: pulls in tensorboard

                purge = resume_at["global_step"] + 1 if resume_at is not None else None
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)

    def position(self) -> dict:
        """Where the log stands: metrics.jsonl's size and the last global step written (saved in checkpoints)."""
        return {"bytes": self.file.tell() if self.enabled else 0, "global_step": self.global_step}

    def log(self, stage: str, step: int, global_step: int, metrics: dict, line: str | None = None) -> None:
        if not self.enabled:
            return
        self.global_step = max(self.global_step, global_step)
        row = {"stage": stage, "step": step, "global_step": global_step, "time": time.time(), **metrics}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{stage}/{k}", v, global_step)
        if line:
            self.print(line)

    def print(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


@dataclass
class Run:
    """What both stages share: config, place in the world, run dir, the student, data, log, evals."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    student: Student
    log: Logger
    problems: list[Problem]
    test_splits: dict[str, list[Problem]]
    extra: dict  # {"evals": {tag: metrics}, "ref_path": ...}: saved in every checkpoint
    n_params: int
    stop_after: int | None = None  # global step after which to checkpoint and return (tests: an interruption)
    stop: rundir.StopRequest = field(default_factory=rundir.StopRequest)  # SIGTERM / SIGINT: stop after this step
    resume_changes: dict = field(default_factory=dict)  # config changes this resume made (rundir.check_resume)
    last_save: Path | None = None  # the newest checkpoint of the run (the resumed one until this session saves)
    t_start: float = field(default_factory=time.perf_counter)  # this session's start
    wall_before: float = 0.0  # wall time of the earlier sessions, up to their last checkpoint

    @property
    def model(self) -> torch.nn.Module:
        """The HF model the optimizer trains (float32 masters; FSDP2-sharded or peft-wrapped as the config says)."""
        return self.student.model

    @property
    def policy(self) -> PackedPolicy:
        return self.student.policy

    @property
    def tokenizer(self) -> Any:
        return self.student.tokenizer

    @property
    def flop_shape(self) -> FlopShape:
        return self.student.flop_shape

    @property
    def lm_head(self) -> dict:
        """Options of every LM-head op of the run: the chunk size recorded with the run (config and the first
        device's total memory: a resume on another GPU runs the same GEMM shapes) and fp32 logits."""
        return {"chunk_size": self.extra["lm_head_chunk_size"], "fp32_logits": self.cfg.model.lm_head_fp32_logits}

    def evaluate(self, tag: str, global_step: int, *, same_as: str = "") -> dict:
        """Greedy multi-turn eval on the held-out splits, logged and kept in extra["evals"][tag]. same_as names an
        earlier eval of the same weights (a stage of 0 steps): when on record its numbers are reused, logged under
        `tag` with eval_s 0."""
        prev = self.extra["evals"].get(same_as) if same_as else None
        if prev is not None:
            m = self.extra["evals"][tag] = {**prev, "eval_s": 0.0}
            line = f"eval {tag} | " + format_eval(m) + f" (same weights as {same_as})"
            self.log.log("eval", global_step, global_step, {"tag": tag, **m}, line)
            return m
        t0 = time.perf_counter()
        m = evaluate(
            self.student.sampler, self.tokenizer, self.test_splits, reward_cfg=self.cfg.reward,
            max_new_tokens=self.cfg.rollout.max_new_tokens, batch_size=self.cfg.rollout.batch_size,
            include_probes=True, progress=self.cfg.log.progress if self.rank == 0 else False,
        )  # fmt: skip
        m["eval_s"] = time.perf_counter() - t0
        self.extra["evals"][tag] = m
        self.log.log("eval", global_step, global_step, {"tag": tag, **m}, f"eval {tag} | " + format_eval(m))
        return m

    def save(self, stage: str, step: int, optimizer: torch.optim.Optimizer, scheduler: LRScheduler) -> Path:
        """Crash-safe checkpoint (see exgrpo_fast.checkpoint) with the log position, so a resume from it cuts
        metrics.jsonl back to exactly here; the stage's older checkpoints beyond log.keep_last are removed."""
        path = self.run_dir / "checkpoints" / f"{stage}-{step:06d}"
        self.extra["log_position"] = self.log.position()
        self.extra["wall_s"] = self.wall()  # the summary's wall_s of a resumed run counts every session
        export, state, files = self.student.export()  # HF export in the compute dtype + float32 masters / adapters
        ckpt_lib.save_checkpoint(
            path, export, self.tokenizer, optimizer=optimizer, scheduler=scheduler, stage=stage, step=step,
            extra=self.extra, keep_last=self.cfg.log.keep_last, model_state=state, tensor_files=files,
            keep=[self.extra["ref_path"]] if "ref_path" in self.extra else [],
        )  # fmt: skip
        self.last_save = path
        return path

    def wall(self) -> float:
        """Wall seconds of the run: the earlier sessions' (to their last checkpoint) plus this one's."""
        return self.wall_before + time.perf_counter() - self.t_start


# ----------------------------------------------------------------------------------------------------------------
# the stage loop, shared by SFT and ExGRPO


@dataclass
class Stage:
    name: str  # "sft" | "grpo": the log stage and the checkpoint prefix
    steps: int
    lr: float
    warmup: int
    offset: int  # global step of this stage's step 0
    end_eval: str  # eval tag at the end of the stage
    start_eval: str = ""  # eval tag of the weights the stage starts from (reused when the stage has 0 steps)
    eval_every: int = 0  # extra evals every this many steps (0 = none)


class OptimizerStep:
    """Reduce (LoRA over ranks), clip, skip if the loss or the grad norm is non-finite, step, refresh the sampler's
    copy of the weights, zero the grads. `step_fn`s call it once per update; it remembers the last update's grad norm
    and whether it was skipped."""

    def __init__(self, student: Student, optimizer: torch.optim.Optimizer, grad_clip: float):
        self.student, self.optimizer, self.grad_clip = student, optimizer, grad_clip
        self.grad_norm, self.finite = torch.zeros(()), True

    def __call__(self, loss: torch.Tensor) -> None:
        self.student.reduce_gradients()
        self.grad_norm = clip_grad_norm(self.student.model, self.grad_clip)
        self.finite = bool(torch.isfinite(loss) & torch.isfinite(self.grad_norm))  # sync: skip non-finite steps
        if self.finite:
            self.optimizer.step()
            self.student.refresh_sampler()
        self.optimizer.zero_grad(set_to_none=True)


StepFn = Callable[[int, OptimizerStep], dict]


def ckpt_interval(ckpt_every: int, steps: int) -> int:
    """Steps between a stage's checkpoints: log.ckpt_every, or when it is 0 every 10% of the stage (rounded up), so
    a crash loses at most a tenth of a stage."""
    return ckpt_every or max(1, math.ceil(steps / 10))


def run_stage(run: Run, stage: Stage, step_fn: StepFn, log_line: Callable, start: int, state: dict | None) -> dict:
    """Steps [start, stage.steps) of a stage: step_fn(step, update) computes gradients and calls update(loss) per
    optimizer update; this owns the rest (optimizer, schedule, clipping and non-finite skip, logging, evals,
    checkpoints, the stop). Returns {"history": per-step metrics, "ckpt": final checkpoint} or {"stopped_at": ...}."""
    cfg = run.cfg
    run.model.train()  # from_pretrained returns eval mode; activation checkpointing only acts in train mode
    optimizer, scheduler = make_optimizer(run.model, cfg, stage.lr, stage.warmup, stage.steps)
    if state is not None and state["stage"] == stage.name:
        ckpt_lib.restore(state, run.model, optimizer, scheduler)
        if f"{stage.name}.steps" in run.resume_changes:  # a resume changed the stage's length: its schedule
            scheduler.last_epoch -= 1  # applies from this step on (the restored lr is the old schedule's)
            _scheduler_step(scheduler)
    update = OptimizerStep(run.student, optimizer, cfg.optim.grad_clip)
    history = run.extra.setdefault("history", {}).setdefault(stage.name, [])  # saved with checkpoints: a resumed
    del history[start:]  # run's summary covers every step, as a straight run's does
    every = ckpt_interval(cfg.log.ckpt_every, stage.steps)
    if _stop_agreed(run):  # a signal before the stage's first step (set-up, an eval): stop here
        path = run.last_save or run.save(stage.name, start, optimizer, scheduler)  # unsaved work: the evals
        return {"stopped_at": stage.offset + start, "signal": run.stop.exit_code - 128, "ckpt": path}
    bar = _progress(cfg, run.rank, stage.steps, start, stage.name)
    for step in range(start, stage.steps):
        t0 = time.perf_counter()
        m = step_fn(step, update)
        lr = scheduler.get_last_lr()[0]
        _scheduler_step(scheduler)
        dt = time.perf_counter() - t0
        bar.update(1)
        ops.raise_deferred_errors()  # sync: the step's deferred input checks, read with its metrics
        m = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in m.items()}  # sync: metrics
        m.update(grad_norm=update.grad_norm.item(), lr=lr, skipped=int(not update.finite), step_s=dt)
        # the ranks agree on a stop at the sync they make anyway (one rank's signal stops all: a MAX metric)
        m = reduce_metrics({**m, "stop_requested": float(run.stop.requested)}, run.world, run.device)
        signalled = m.pop("stop_requested") > 0
        m["tok_per_s"] = m["tokens"] / m["step_s"]
        util = mfu(m.pop("flops") / run.world, m.get("t_train", m["step_s"]), run.device, run.student.compute_dtype)
        if util is not None:
            m["mfu"] = util
        history.append(m)
        global_step, done = stage.offset + step, step + 1
        if step % cfg.log.log_every == 0 or done == stage.steps or not update.finite:
            line = log_line(step, stage.steps, m) + (" | SKIPPED" if not update.finite else "")  # non-finite
            run.log.log(stage.name, step, global_step, m, line)
        if stage.eval_every and done % stage.eval_every == 0 and done < stage.steps:
            run.evaluate(f"{stage.name}-{done}", global_step)
        stop = stage.offset + done == run.stop_after or signalled
        if (done % every == 0 and done < stage.steps) or stop:  # the stage's end is saved once, below
            run.save(stage.name, done, optimizer, scheduler)
        if stop:
            bar.close()
            out = {"stopped_at": stage.offset + done, "last_loss": m["loss"], "ckpt": run.last_save}
            return {**out, "signal": run.stop.exit_code - 128} if signalled else out
    bar.close()
    run.evaluate(stage.end_eval, stage.offset + stage.steps, same_as=stage.start_eval if stage.steps == 0 else "")
    return {"history": history, "ckpt": run.save(stage.name, stage.steps, optimizer, scheduler)}


def _stop_agreed(run: Run) -> bool:
    """Whether any rank was asked to stop (one all-reduce MAX; once per stage, outside the step loop)."""
    return reduce_metrics({"stop_requested": float(run.stop.requested)}, run.world, run.device)["stop_requested"] > 0


# How each metric of a step combines over ranks (one all-reduce per kind). Sums: the loss and the loss stats are
# each rank's share of the global value (their normalisers are the step's global counts), token counts add up. Max:
# a maximum and the wall times (the slowest rank sets the step's pace). Everything else is the same on every rank by
# construction (grad norm, lr, skip flag; reward metrics are computed from all ranks' samples; rates are derived
# from the reduced values after the reduction).
TIMING_METRICS = ("time", "step_s", "tok_per_s", "t_rollout", "t_logp", "t_update", "t_train", "eval_s", "mfu",
                  "wall_s")  # fmt: skip
"""Metrics that measure time: the only ones a resumed run may write differently from a straight one."""
SUM_METRICS = ("loss", "tokens", "update_tokens", "clip_frac_low", "clip_frac_high", "ratio_mean", "kl_ref",
               "kl_teacher", "entropy", "flops")  # fmt: skip
MAX_METRICS = ("ratio_max", "step_s", "t_rollout", "t_logp", "t_update", "t_train", "stop_requested")


def reduce_metrics(m: dict, world: int, device: torch.device) -> dict:
    """A step's metrics over all ranks, each reduced by its meaning (SUM/MAX_METRICS); host floats in and out."""
    if world == 1:
        return m
    out = dict(m)
    for names, op in ((SUM_METRICS, dist.ReduceOp.SUM), (MAX_METRICS, dist.ReduceOp.MAX)):
        keys = [k for k in names if k in m]
        if not keys:
            continue
        t = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64, device=comm_device(device))
        dist.all_reduce(t, op=op)
        out.update(zip(keys, t.tolist()))  # sync: metrics, once per kind
    return out


def comm_device(device: torch.device) -> torch.device:
    """Where small host-number collectives run: the device under nccl, the CPU under gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


@dataclass(frozen=True)
class StepCounts:
    """What every rank must agree on before a step's micro-batch loop, from all ranks' packed batches."""

    micro_batches: int  # the largest micro-batch count of any rank: every rank runs that many (padding: weight 0)
    norm: ops.LossNorm  # the global step's loss normaliser: loss tokens, live sequences, longest loss length


def step_counts(batches: list[PackedBatch], world: int, device: torch.device) -> StepCounts:
    """StepCounts from this rank's micro-batches and, under torch.distributed, every other rank's (one all-gather of
    four host numbers per step, before the micro-batch loop).

    Every rank runs the same number of forwards and backwards, the missing ones on a copy of its last micro-batch
    with weight 0, so the FSDP all-gathers and reduce-scatters of each micro-batch pair up across ranks. The loss
    normaliser covers the global batch, so each rank's loss is its share of the global loss and gradients summed
    over ranks equal one process's on the same data (see exgrpo_fast.model.student)."""
    local = step_loss_norm(batches)
    if world == 1:
        return StepCounts(len(batches), local)
    row = torch.tensor([len(batches), local.num_tokens, local.num_seqs, local.max_len], dtype=torch.float64,
                       device=comm_device(device))  # fmt: skip
    rows = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(rows, row)
    table = torch.stack(rows).tolist()  # sync: once per step, before the micro-batch loop
    norm = ops.LossNorm(sum(r[1] for r in table), sum(r[2] for r in table), max(r[3] for r in table))
    return StepCounts(int(max(r[0] for r in table)), norm)


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: one SFT step (Explanatory Inversion distillation)


def sft_step(run: Run, step: int, update: OptimizerStep) -> dict:
    """Cross-entropy on the assistant tokens of a batch of teacher dialogues, over packed micro-batches."""
    cfg = run.cfg
    rng = step_rng(cfg.seed, "sft", step)
    idx = rng.choice(len(run.problems), size=min(cfg.sft.batch_size, len(run.problems)), replace=False)
    include = cfg.sft.use_probes  # False: vanilla fine-tuning on question -> rationale + answer
    seqs = [encode_dialogue(run.tokenizer, sft_dialogue(run.problems[i], include_probes=include))
            for i in idx[run.rank :: run.world]]  # fmt: skip
    batches = pack_sequences(seqs, cfg.data.token_budget)
    counts = step_counts(batches, run.world, run.device)
    total = max(counts.norm.num_tokens, 1.0)  # loss tokens of the global batch
    loss_sum, flops = sft_backward(run.student, batches, counts.micro_batches, total, run.device, run.lm_head)
    update(loss_sum)
    return {"loss": loss_sum, "tokens": sum(b.num_loss_tokens for b in batches), "flops": flops}


def sft_backward(
    student: Student, batches: list[PackedBatch], micro_batches: int, total: float, device: torch.device,
    lm_head: dict,
) -> tuple[torch.Tensor, float]:  # fmt: skip
    """Forward and backward of an SFT step's cross-entropy (summed over `total` loss tokens) over `micro_batches`
    micro-batches, those past the end of `batches` padding copies of its last with weight 0 (step_counts): (the
    step's loss, the FLOPs of its live micro-batches, fwd + bwd). lm_head: Run.lm_head. The memory plan traces it."""
    loss_sum = torch.zeros((), device=device)
    flops = 0.0
    for i in range(micro_batches):
        live = i < len(batches)
        batch = batches[min(i, len(batches) - 1)].to(device)  # past the end: padding, weight 0
        student.micro_batch(last=i == micro_batches - 1)
        hidden, weight, bias = student.policy(batch)  # (N, H) at loss positions, (V, H)
        logp = ops.token_logprobs_linear(hidden, weight, batch.loss_labels, bias=bias, **lm_head)
        loss = -logp.sum() / total * (1.0 if live else 0.0)
        (loss * student.loss_scale).backward()
        loss_sum += loss.detach()
        if live:  # a padding micro-batch is no work of the step's (MFU)
            flops += 3 * forward_flops(student.flop_shape, batch.seq_lens, batch.num_loss_tokens, batch.seq_lens_k)
        del hidden, weight, bias, logp, loss  # the next micro-batch's forward runs without this one's outputs
    return loss_sum, flops


def sft_log_line(step: int, steps: int, m: dict) -> str:
    return (
        f"sft {step + 1:4d}/{steps} | loss {m['loss']:.4f} | gnorm {m['grad_norm']:.2f} | lr {m['lr']:.2e} | "
        f"tok/s {m['tok_per_s']:.0f} | {m['step_s']:.2f}s"
    )


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: one ExGRPO step


@dataclass
class Frozen:
    """No-grad models of stage 2: the reference (frozen SFT student) and the teacher; None when their beta is 0."""

    ref: torch.nn.Module | None = None
    teacher: torch.nn.Module | None = None
    teacher_shape: FlopShape | None = None  # the teacher's FLOP count (MFU)


def step_loss_norm(batches: list[PackedBatch]) -> ops.LossNorm:
    """The step's loss normaliser, computed ONCE per optimizer step from all its micro-batches on the host (lengths
    are host ints from packing: no sync) and passed to every micro-batch's loss: each micro-batch's loss is then its
    share of the step's loss, whatever the packing (masked tokens, sequences with >= 1 masked token, and the longest
    masked length of the whole step: the denominators of every loss_agg)."""
    lens = [n for b in batches for n in b.loss_lens]
    return ops.LossNorm(float(sum(lens)), float(sum(n > 0 for n in lens)), float(max(lens, default=0)))


def policy_loss_backward(
    policy: PackedPolicy, batches: list[PackedBatch], advantages: torch.Tensor, old: list, ref: list, teacher: list,
    live: list[bool], norm: ops.LossNorm | None, loss_cfg: LossConfig, temperature: float,
    micro_batch: Callable[[bool], None] | None = None, loss_scale: float = 1.0, lm_head: dict | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """One pass of the policy loss over the step's micro-batches, backward included: (loss, stats) of the step.
    old[i] None = on-policy (ratio 1: the fused op takes the detached current log-probs itself, no extra LM-head
    pass); live[i] False = a padding micro-batch that only keeps the ranks' collectives in step (weight 0).
    norm = the step's normaliser, global over ranks (None: each micro-batch normalised by its own counts,
    packing-dependent). Stats are token-weighted by the same normaliser (so over ranks they add up to the global
    means), ratio_max is a maximum. micro_batch(last) runs before each forward (Student.micro_batch); loss_scale
    multiplies the loss before backward only (Student.loss_scale); lm_head: the LM-head op options of the run
    (chunk_size, fp32_logits: Run.lm_head)."""
    total = norm.num_tokens if norm is not None else sum(b.num_loss_tokens for b, ok in zip(batches, live) if ok)
    total = max(1.0, float(total))
    loss_sum = torch.zeros((), device=advantages.device)
    stats_sum: dict[str, torch.Tensor] = {}
    for i, (b, old_b, ref_b, tch_b, is_live) in enumerate(zip(batches, old, ref, teacher, live)):
        if micro_batch is not None:
            micro_batch(i == len(batches) - 1)
        hidden, weight, bias = policy(b)  # (N, H), (V, H)
        if b.num_loss_tokens == 0:  # only prompt-only dialogues (an empty answer): no loss, but a backward all the
            loss, stats = (hidden.sum() + weight.sum()) * 0.0, {}  # same, so FSDP's reduce-scatters pair up
        else:
            mask = torch.ones_like(b.loss_labels, dtype=torch.bool)
            loss, stats = ops.fused_linear_policy_loss(
                hidden, weight, b.loss_labels, old_b, advantages[b.sample_index], b.loss_seq_ids, mask,
                bias=bias, ref_logp=ref_b, teacher_logp=tch_b, temperature=temperature, cfg=loss_cfg, norm=norm,
                **(lm_head or {}),
            )  # fmt: skip
        w = 1.0 if is_live else 0.0
        (loss * (w * loss_scale)).backward()
        loss_sum = loss_sum + loss.detach() * w
        share = w * b.num_loss_tokens / total  # stats are per micro-batch: their token-weighted mean
        for k, v in stats.items():
            v = v.detach().float()
            if k == "ratio_max":
                stats_sum[k] = torch.maximum(stats_sum[k], v * w) if k in stats_sum else v * w
            else:
                stats_sum[k] = stats_sum.get(k, 0.0) + v * share
    return loss_sum, stats_sum


@torch.no_grad()
def frozen_logps(
    student: Student, frozen: Frozen, batches: list[PackedBatch], off_policy: bool, kl: bool, temperature: float,
    lm_head: dict,
) -> tuple[list, list, list]:  # fmt: skip
    """(old, reference, teacher) no-grad log-probs of each micro-batch, None where the loss does not use them: old
    when the update is off-policy (on-policy, the fused loss takes its own detached log-probs), the reference when kl
    (frozen.ref, or under LoRA the student with its adapters disabled), the teacher when frozen has one. The memory
    plan traces it."""
    old = [_logp(student.policy, b, temperature, lm_head) if off_policy else None for b in batches]
    if frozen.ref is not None:
        ref = [_logp(frozen.ref, b, temperature, lm_head) for b in batches]
    elif kl:  # LoRA: the reference is this model with its adapters disabled
        with student.reference():
            ref = [_logp(student.policy, b, temperature, lm_head) for b in batches]
    else:
        ref = [None] * len(batches)
    tch = [_logp(frozen.teacher, b, temperature, lm_head) if frozen.teacher is not None else None for b in batches]
    return old, ref, tch


def grpo_step(run: Run, frozen: Frozen, step: int, update: OptimizerStep) -> dict:
    """Sample -> rewards and advantages -> reference / teacher log-probs -> policy update(s)."""
    cfg, device, temperature = run.cfg, run.device, run.cfg.logprob_temperature
    G, P, U = cfg.grpo.group_size, cfg.grpo.problems_per_step, cfg.grpo.updates_per_batch
    t0 = time.perf_counter()
    # ---- sample: P problems (this rank's share) x G dialogues
    idx = step_rng(cfg.seed, "grpo", step).choice(len(run.problems), size=min(P, len(run.problems)), replace=False)
    problems = [run.problems[i] for i in idx[run.rank :: run.world]]
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step * run.world + run.rank)
    rollouts = rollout_dialogues(
        run.student.sampler, run.tokenizer, problems, group_size=G, params=cfg.rollout,
        include_probes=cfg.grpo.use_probes, batch_size=cfg.rollout.batch_size, generator=gen,
    )  # fmt: skip
    # ---- rewards, group advantages, packing and the step's loss normaliser (host side)
    scores = [score_dialogue(problems[r.problem_index], r.responses, cfg.reward) for r in rollouts]
    rewards = [float(s["total"]) for s in scores]
    advantages = step_advantages(rewards, [r.problem_index for r in rollouts], cfg.grpo, run.rank, run.world, device)
    # a group's common prompt is packed once per micro-batch, its samples' continuations attending to it: every
    # forward below (old, reference, teacher, update) computes it once, with the unshared packing's loss and grads
    groups = [r.problem_index for r in rollouts] if cfg.grpo.share_prefix else None
    packed = pack_sequences([(r.ids, r.loss_mask) for r in rollouts], cfg.data.token_budget, groups=groups)
    counts = step_counts(packed, run.world, device)  # the global normaliser and micro-batch count
    n_pad = counts.micro_batches - len(packed)  # padding: weight 0
    batches = [b.to(device) for b in packed + packed[-1:] * n_pad]
    live = [True] * len(packed) + [False] * n_pad
    t_rollout = _timer(device) - t0
    # ---- old / reference / teacher log-probs (no grad); old comes from the policy forward itself when on-policy
    t1 = time.perf_counter()
    flops = 0.0
    old, ref, tch = frozen_logps(run.student, frozen, batches, U > 1, cfg.loss.kl_beta > 0, temperature, run.lm_head)
    for b in packed:
        args = (b.seq_lens, b.num_loss_tokens, b.seq_lens_k)
        flops += forward_flops(run.flop_shape, *args) * ((U > 1) + (cfg.loss.kl_beta > 0) + 3 * U)
        flops += forward_flops(frozen.teacher_shape, *args) if frozen.teacher is not None else 0.0
    t_logp = _timer(device) - t1
    # ---- policy update(s): fused LM head + clipped loss over the packed micro-batches
    t2 = time.perf_counter()
    stats: dict[str, torch.Tensor] = {}
    for _ in range(U):
        loss, update_stats = policy_loss_backward(
            run.policy, batches, advantages, old, ref, tch, live, counts.norm, cfg.loss, temperature,
            micro_batch=run.student.micro_batch, loss_scale=run.student.loss_scale, lm_head=run.lm_head,
        )  # fmt: skip
        update(loss)
        for k, v in update_stats.items():
            stats[k] = torch.maximum(stats[k], v) if k == "ratio_max" and k in stats else stats.get(k, 0.0) + v / U
    t_update = _timer(device) - t2
    n_tok = sum(b.num_loss_tokens for b in packed)
    return {
        **reward_metrics(rollouts, scores, G, cfg.grpo.use_probes, run.world), "loss": loss, **stats, "tokens": n_tok,
        "update_tokens": sum(b.num_tokens for b in packed) * U,
        "t_rollout": t_rollout, "t_logp": t_logp, "t_update": t_update, "flops": flops, "t_train": t_logp + t_update,
    }  # fmt: skip


def step_advantages(
    rewards: list[float], group_ids: list[int], grpo, rank: int, world: int, device: torch.device
) -> torch.Tensor:
    """This rank's advantages (S,) on `device`: group_advantages of its samples, grouped by problem. Every group
    lies on one rank, so the group statistics are local; grpo.adv_scale "batch" divides by the std over the global
    batch, so under torch.distributed it gathers every rank's rewards (one all_gather_object of host floats) and
    takes its own slice of the global advantages, as one process on the whole batch would compute them."""
    start = 0
    mine = len(rewards)
    if grpo.adv_scale == "batch" and world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, (rewards, group_ids))
        rewards, group_ids, offset = [], [], 0
        for r, (part_rewards, part_groups) in enumerate(parts):
            start = len(rewards) if r == rank else start
            rewards += part_rewards
            group_ids += [g + offset for g in part_groups]  # group ids of different ranks stay apart
            offset += 1 + max(part_groups, default=-1)
    adv = ops.group_advantages(
        torch.tensor(rewards, dtype=torch.float32, device=device),
        torch.tensor(group_ids, dtype=torch.long, device=device),
        scale=grpo.adv_scale, eps=grpo.adv_eps, nan_to_zero=True,
    )  # fmt: skip
    return adv[start : start + mine]


def reward_metrics(rollouts: list, scores: list[dict], group_size: int, use_probes: bool, world: int = 1) -> dict:
    """Mean reward and its terms, within-group spread, rollout accuracies and response length, over the samples of
    every rank (one all_gather_object of the step's scores under torch.distributed): the same on every rank."""
    lens = [len(x) for r in rollouts for x in r.responses]
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (scores, lens))
        scores = [s for part, _ in gathered for s in part]
        lens = [n for _, part in gathered for n in part]
    rewards = torch.tensor([float(s["total"]) for s in scores], dtype=torch.float32)
    r = rewards.view(-1, group_size)  # (P, G)
    out = {"reward": rewards.mean().item(), "reward_std": r.std(1).mean().item()}
    out["frac_zero_std"] = (r.std(1) < 1e-6).float().mean().item()
    for k in ("task", "probe", "dsu", "format"):
        if k in scores[0]:
            out[f"reward_{k}"] = float(np.mean([float(s[k]) for s in scores]))
    out["acc"] = float(np.mean([float(s["task"]) for s in scores]))
    out["probe_acc"] = float(np.mean([float(s["probe"]) for s in scores])) if use_probes else 0.0
    out["resp_chars"] = float(np.mean(lens)) if lens else 0.0
    return out


def grpo_log_line(step: int, steps: int, m: dict) -> str:
    """One console line of at most 120 columns (the SKIPPED suffix included); every metric is in metrics.jsonl."""
    return (
        f"grpo {step + 1:3d}/{steps} | reward {m['reward']:.3f} (task {m.get('reward_task', 0):.2f} "
        f"probe {m.get('reward_probe', 0):.2f} dsu {m.get('reward_dsu', 0):.2f}) | "
        f"kl {m.get('kl_ref', 0):.1e} | gnorm {m['grad_norm']:.2g} | {m['step_s']:.1f}s"
    )


# ----------------------------------------------------------------------------------------------------------------
# the trainer


def train(
    cfg: TrainConfig,
    *,
    resume: str | None = None,
    run_dir: str | None = None,
    stop_after: int | None = None,
    signals: bool = False,
) -> dict:
    """Run both stages; returns a summary dict, or for a run that stopped early {"run_dir", "stopped_at", "ckpt",
    "signal" (when a signal stopped it)}. stop_after = global step after which to checkpoint and return (simulates
    an interruption; used by the resume test). signals: SIGTERM / SIGINT stop the run after its current step with a
    checkpoint (rundir.StopRequest; the command line turns on)."""
    # ops checks that read tensor values (labels in range, NaN rewards) run on the device and raise at the step's
    # metrics sync (run_stage), so the micro-batch loop pays no host sync for them
    stop = rundir.StopRequest()
    with (
        ops.backend(cfg.ops_backend),
        ops.value_checks("deferred"),
        stop.installed() if signals else contextlib.nullcontext(),
    ):
        return _train(cfg, resume=resume, run_dir=run_dir, stop_after=stop_after, stop=stop)


def _train(
    cfg: TrainConfig, *, resume: str | None, run_dir: str | None, stop_after: int | None, stop: rundir.StopRequest
) -> dict:
    t_start = time.perf_counter()
    validate_run(cfg, resume, world=int(os.environ.get("WORLD_SIZE", "1")))  # user errors before any dir or model
    if stop.requested:  # a signal while the inputs were checked: nothing exists yet, nothing to save
        print(f"stopped by {signal.Signals(stop.signum).name} before the run started: nothing was written", flush=True)
        return {"run_dir": None, "stopped_at": None, "ckpt": None, "signal": stop.signum}
    with distributed(cfg) as (rank, world, device):
        opened = rundir.open_run(cfg, resume, run_dir, rank, world)  # checked, locked; a resume's changes checked
        try:
            with full_disk_named(opened.run_dir, f"free space, then: {rundir.resume_command(opened.run_dir, world)}"):
                if opened.finished:
                    return _finished(opened, rank, world)
                return _stages(cfg, opened, (rank, world, device), stop_after, stop, t_start)
        finally:
            opened.release()


def _stages(
    cfg: TrainConfig, opened: rundir.OpenedRun, place: tuple[int, int, torch.device], stop_after: int | None,
    stop: rundir.StopRequest, t_start: float,
) -> dict:  # fmt: skip
    run, state, resume_dir, model_path = setup_run(cfg, *place, None, None, stop_after, opened=opened)
    run.stop, run.resume_changes, run.last_save, run.t_start = stop, opened.changes, resume_dir, t_start
    run.wall_before = state["extra"].get("wall_s", 0.0) if state is not None else 0.0
    if state is None and cfg.log.eval_start:
        run.evaluate("untrained", 0)

    # ---- Stage 1: EI distillation (SFT on teacher dialogues)
    sft_start = 0 if state is None else (state["step"] if state["stage"] == "sft" else cfg.sft.steps)
    if sft_start < cfg.sft.steps:
        stage = Stage("sft", cfg.sft.steps, cfg.sft.lr, cfg.sft.warmup_steps, offset=0, end_eval="sft")
        out = run_stage(run, stage, lambda step, update: sft_step(run, step, update), sft_log_line, sft_start, state)
        if "stopped_at" in out:
            return _stopped(run, out)
        run.extra["ref_path"] = str(out["ckpt"])
    elif state is None or state["stage"] == "sft":  # no SFT stage, or resumed from the end of it
        if "sft" not in run.extra["evals"] and (cfg.sft.steps or cfg.log.eval_start or cfg.grpo.steps == 0):
            # no SFT step: the starting weights; or stopped right after the last SFT step, before its eval
            run.evaluate("sft", cfg.sft.steps, same_as="" if cfg.sft.steps else "untrained")
        run.extra.setdefault("ref_path", str(resume_dir) if resume_dir else model_path)

    # ---- Stage 2: ExGRPO
    grpo_start = state["step"] if state is not None and state["stage"] == "grpo" else 0
    if run.student.lora and grpo_start == 0 and run.student.base_path != run.extra["ref_path"]:
        # LoRA: GRPO trains fresh adapters on the SFT result (its export, adapters merged), which is also the KL
        # reference: the base with the adapters disabled
        run.student = load_student(run.extra["ref_path"], cfg.model, run.device, run.world)
        run.extra["lora_base"] = run.extra["ref_path"]
    frozen = load_frozen(run)
    stage = Stage("grpo", cfg.grpo.steps, cfg.grpo.lr, cfg.grpo.warmup_steps, offset=cfg.sft.steps,
                  end_eval="final", start_eval="sft", eval_every=cfg.log.eval_every)  # fmt: skip
    out = run_stage(
        run, stage, lambda step, update: grpo_step(run, frozen, step, update), grpo_log_line, grpo_start, state
    )
    if "stopped_at" in out:
        return _stopped(run, out)
    return summarize(run, out, run.wall())


def setup_run(
    cfg: TrainConfig, rank: int, world: int, device: torch.device, resume: str | None, run_dir: str | None,
    stop_after: int | None, *, opened: rundir.OpenedRun | None = None,
) -> tuple[Run, dict | None, Path | None, str]:  # fmt: skip
    """(Run, trainer state or None, resumed checkpoint dir or None, path the student was first loaded from). The run
    dir is `opened` (rundir.open_run: checked, locked, config.json written), or opened here from resume / run_dir.
    (rank, world, device): the process's place (`distributed`)."""
    _quiet_transformers()
    seed_everything(cfg.seed + rank)
    if cfg.model.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call: fixed reductions
    torch.use_deterministic_algorithms(cfg.model.deterministic, warn_only=True)
    opened = opened or rundir.open_run(cfg, resume, run_dir, rank, world)
    state, resume_dir, run_dir = opened.state, opened.resume_dir, opened.run_dir
    if world > 1:
        dist.barrier()
    log = Logger(run_dir, cfg, rank, resume_at=state["extra"].get("log_position") if state else None)
    extra = dict(state["extra"]) if state else {"evals": {}}
    model_path = str(resume_dir) if resume_dir else _init_model_path(cfg, run_dir, rank, world)
    if cfg.model.lora_rank > 0:  # the frozen base the adapters sit on; the checkpoint holds the adapters
        extra.setdefault("lora_base", model_path)
    base = extra["lora_base"] if cfg.model.lora_rank > 0 else model_path
    student = load_student(base, cfg.model, device, world, resume_from=resume_dir)
    head = student.model.get_output_embeddings().weight
    extra.setdefault("lm_head_chunk_size", ops.lm_head_chunk_size(
        head.shape[0], head.shape[1], student.compute_dtype, device, chunk_size=cfg.model.lm_head_chunk_size,
        fp32_logits=cfg.model.lm_head_fp32_logits,
    ))  # fmt: skip
    if student.sharded:  # FSDP2 initialises lazily from the first forward, which must be the root's
        with torch.no_grad():
            warm = [encode_dialogue(student.tokenizer, Dialogue.of(("user", "1"), ("assistant", "1")))]
            student.policy(pack_sequences(warm, cfg.data.token_budget)[0].to(device))
        release_root(student.policy)
    problems, test_splits = load_data(cfg, run_dir)
    requested = cfg.rollout.max_new_tokens
    resolved = resolve_max_new_tokens(student.tokenizer, {"train": problems, **test_splits}, requested)
    if resolved != requested:  # 0 = auto: the run uses the measured value (config.json keeps 0: a resume remeasures)
        cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_new_tokens=resolved))
    run = Run(
        cfg, rank, world, device, run_dir, student, log, problems,
        {k: v[: cfg.log.eval_n] for k, v in test_splits.items()}, extra,
        sum(p.numel() for p in student.model.parameters()), stop_after,
    )  # fmt: skip
    backend = ops.backend_for(device, announce=False)  # the fallback notice is part of the header, not a warning
    if backend == "reference" and cfg.ops_backend == "auto":
        backend += f" (no Triton on {device.type}; TRITON_INTERPRET=1 runs the interpreter)"
    log.print(
        f"run {run_dir} | model {model_path} | {run.n_params / 1e6:.2f}M params | {student.describe()} | "
        f"device {device} | world {world} | problems {len(problems)} | "
        f"max_new_tokens {resolved}{' (auto)' if requested == 0 else ''} | ops {backend} | "
        f"share_prefix {'on' if cfg.grpo.share_prefix else 'off'} | "
        f"threads {torch.get_num_threads()} | load {_load():.2f}"
    )
    return run, state, resume_dir, model_path


def _init_model_path(cfg: TrainConfig, run_dir: Path, rank: int, world: int) -> str:
    """model.path, or the built-in tiny model (model.preset) created once in the run dir."""
    if cfg.model.path:
        return cfg.model.path
    path = run_dir / "init_model"
    if rank == 0 and not (path / "config.json").exists():
        create_tiny_checkpoint(path, preset=cfg.model.preset, seed=cfg.seed)
    if world > 1:
        dist.barrier()
    return str(path)


def load_frozen(run: Run) -> Frozen:
    """The reference (frozen SFT model) when loss.kl_beta > 0 and the teacher when loss.teacher_beta > 0, in the
    compute dtype, unsharded on every rank (no-grad forwards only). A LoRA student needs no reference copy: it is
    the student with its adapters disabled (Student.reference)."""
    cfg, dtype, frozen = run.cfg, run.student.compute_dtype, Frozen()
    if cfg.loss.kl_beta > 0 and not run.student.lora:
        frozen.ref, _ = load_model(
            run.extra["ref_path"], dtype=dtype, device=run.device, attn_backend=cfg.model.attn_backend
        )
        frozen.ref.requires_grad_(False).eval()
    if cfg.loss.teacher_beta > 0:
        frozen.teacher, _ = load_model(cfg.model.teacher_path, dtype=dtype, device=run.device)
        frozen.teacher.requires_grad_(False).eval()
        frozen.teacher_shape = FlopShape.of(frozen.teacher)
    return frozen


SUMMARY_METRICS = ("acc", "probe_acc", "reward")
"""Prefixes of the eval metrics that summary.json and the summary line report."""


def summary_of(run_dir: Path, extra: dict, final_ckpt: Path, wall: float) -> dict:
    """summary.json's content: evals before / after SFT / at the end, the GRPO reward trend, the wall time."""
    evals = extra["evals"]
    reward_trace = [m["reward"] for m in extra.get("history", {}).get("grpo", [])]
    k = max(1, len(reward_trace) // 4)  # reward trend: mean of the first vs the last quarter of the GRPO steps run
    trend = (float(np.mean(reward_trace[:k])), float(np.mean(reward_trace[-k:]))) if reward_trace else (0.0, 0.0)
    keep = SUMMARY_METRICS
    return {
        "run_dir": str(run_dir), "final_ckpt": str(final_ckpt), "wall_s": wall,
        "reward_first_quarter": trend[0], "reward_last_quarter": trend[1],
        **{f"{tag}_{k}": v for tag in ("untrained", "sft", "final") for k, v in evals.get(tag, {}).items()
           if k.startswith(keep)},
    }  # fmt: skip


def summarize(run: Run, grpo: dict, wall: float) -> dict:
    """summary.json and the final console line: evals before / after SFT / at the end, the GRPO reward trend."""
    evals, final = run.extra["evals"], run.extra["evals"]["final"]
    summary = summary_of(run.run_dir, run.extra, grpo["ckpt"], wall)
    trend = summary["reward_first_quarter"], summary["reward_last_quarter"]
    keep = SUMMARY_METRICS
    if run.rank == 0:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    nan = float("nan")
    parts = [
        f"{k} untrained {evals.get('untrained', {}).get(k, nan):.3f} -> sft {evals.get('sft', {}).get(k, nan):.3f} "
        f"-> final {final.get(k, nan):.3f}"
        for k in final
        if k.startswith(keep)
    ]
    run.log.print(
        "summary | " + " | ".join(parts) + f" | grpo reward {trend[0]:.3f} -> {trend[1]:.3f} (first -> last quarter) "
        f"| wall {wall:.0f}s | load {_load():.2f} | {run.run_dir}"
    )
    run.log.close()
    return summary


# ----------------------------------------------------------------------------------------------------------------
# small helpers used by the loop


def _stopped(run: Run, out: dict) -> dict:
    if "signal" in out:
        run.log.print(
            f"stopped by {signal.Signals(out['signal']).name} at global step {out['stopped_at']} | checkpoint "
            f"{out['ckpt']} | resume: {rundir.resume_command(run.run_dir, run.world)}"
        )
    run.log.close()
    return {"run_dir": str(run.run_dir), **out}


def _finished(opened: rundir.OpenedRun, rank: int, world: int) -> dict:
    """A resume of a run that has ended: say so, change nothing (summary.json is written only if the run ended
    before it was: a kill after the final checkpoint)."""
    state, path = opened.state, opened.run_dir / "summary.json"
    summary = None
    if rank == 0:  # rank 0 alone reads / writes summary.json (another rank could read it half-written)
        print(f"run {opened.run_dir} has finished (grpo {state['step']} steps, final checkpoint {opened.resume_dir}); "
              "nothing to resume", flush=True)  # fmt: skip
        if path.is_file():
            summary = json.loads(path.read_text())
        else:
            summary = summary_of(opened.run_dir, state["extra"], opened.resume_dir, state["extra"].get("wall_s", 0.0))
            path.write_text(json.dumps(summary, indent=2) + "\n")
    if world > 1:  # the process group is `distributed`'s to destroy
        shared = [summary]
        dist.broadcast_object_list(shared, src=0)
        summary = shared[0]
    return summary


def _progress(cfg: TrainConfig, rank: int, total: int, initial: int, desc: str):
    """A stage's tqdm bar on rank 0 when log.progress asks for bars (eval.bars_on: "auto" = stderr is a terminal);
    else a disabled one (the step lines alone)."""
    if rank == 0 and bars_on(cfg.log.progress):
        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)
    return tqdm(total=total, initial=initial, disable=True)


def _load() -> float:
    """1-minute load average of the machine (timings on a shared CPU depend on it)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover
        return float("nan")


def _timer(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: per-phase timing (three per step)
    return time.perf_counter()


def _scheduler_step(scheduler: LRScheduler) -> None:
    with warnings.catch_warnings():  # a skipped (non-finite) first step trips torch's "optimizer.step() first" check
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


def _quiet_transformers() -> None:
    """No per-save / per-load progress bars from transformers in our logs."""
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _logp(model: torch.nn.Module, batch: PackedBatch, temperature: float, lm_head: dict | None = None) -> torch.Tensor:
    """No-grad log-probs of the loss labels under a policy / reference / teacher model (lm_head: Run.lm_head)."""
    policy = model if isinstance(model, PackedPolicy) else PackedPolicy(model)
    try:
        hidden, weight, bias = policy(batch)
        if batch.num_loss_tokens == 0:  # nothing to score (the forward still ran: FSDP's all-gathers pair up)
            return hidden.new_zeros(0, dtype=torch.float32)
        return ops.token_logprobs_linear(
            hidden, weight, batch.loss_labels, bias=bias, temperature=temperature, **(lm_head or {})
        )
    finally:
        release_root(policy)


def release_root(policy: torch.nn.Module) -> None:
    """Reshard an FSDP2 root after a no-grad forward. With reshard_after_forward=False and no backward to reshard it,
    the root would stay gathered, and its module attributes would keep pointing at the gathered copies: an optimizer
    built then, or a step that updates the shards meanwhile, trains tensors that the next all-gather overwrites (the
    embeddings and LM head silently stop learning)."""
    if hasattr(policy, "reshard"):
        policy.reshard()


def main(argv: list[str] | None = None) -> dict:
    """The command line: a user error (config, data, model dir, checkpoint) prints one line and exits with code 2
    (`--debug` adds the traceback); any other error keeps its traceback (errors.cli_main)."""

    def run(args: list[str]) -> dict:
        cfg, launch = parse_args(args)
        out = train(cfg, resume=launch.resume or None, signals=True)
        if "signal" in out:  # stopped by SIGTERM / SIGINT after a checkpoint: 143 / 130, as the signal would
            raise SystemExit(128 + out["signal"])
        return out

    return cli_main(run, argv)


if __name__ == "__main__":
    main()
