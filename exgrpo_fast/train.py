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
import time
import warnings
from collections.abc import Callable, Iterator
import dataclasses
from dataclasses import dataclass
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
from exgrpo_fast.errors import cli_main
from exgrpo_fast.config import TrainConfig, parse_args, to_toml
from exgrpo_fast.data.dialogue import encode_dialogue
from exgrpo_fast.data.lengths import resolve_max_new_tokens
from exgrpo_fast.data.packing import PackedBatch, pack_sequences
from exgrpo_fast.data.problem import Dialogue, Problem, sft_dialogue
from exgrpo_fast.data.splits import load_data
from exgrpo_fast.eval import evaluate, format_eval
from exgrpo_fast.model.forward import packed_hidden
from exgrpo_fast.model.loading import lm_head, load_model
from exgrpo_fast.model.tiny import create_tiny_checkpoint
from exgrpo_fast.reference import LossConfig
from exgrpo_fast.rewards import score_dialogue
from exgrpo_fast.rollout import rollout_dialogues
from exgrpo_fast.validate import validate_run

# ----------------------------------------------------------------------------------------------------------------
# set-up helpers


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Initialises a process group when torchrun set WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = cfg.model.device if cfg.model.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if want.startswith("cuda") else "gloo")
        rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}") if want.startswith("cuda") else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return rank, world, device
    return 0, 1, torch.device(want)


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
    """(AdamW over the trainable params, its warmup + cosine LambdaLR)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=lr, betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total, cfg.optim.min_lr_frac))
    return optimizer, scheduler


class PackedPolicy(torch.nn.Module):
    """policy(batch) -> (hidden [N, H] at the loss positions, LM head weight [V, H], bias | None).

    The training forward goes through this module so that, under FSDP2, it is the root: its params (embeddings,
    final norm, LM head) are gathered for the forward and stay gathered (reshard_after_forward=False) while the fused
    loss reads the LM head weight; their grads are reduce-scattered by the root's post-backward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        hidden = packed_hidden(self.model, batch)  # (N, H)
        weight, bias = lm_head(self.model)
        return hidden, weight, bias


def shard_model(policy: PackedPolicy, world: int) -> PackedPolicy:
    """FSDP2: shard every decoder layer, then the root (see PackedPolicy)."""
    if world == 1:
        return policy
    from torch.distributed.fsdp import fully_shard

    for layer in policy.model.model.layers:
        fully_shard(layer)
    fully_shard(policy, reshard_after_forward=False)
    return policy


@contextlib.contextmanager
def gathered(policy: PackedPolicy, world: int) -> Iterator[None]:
    """Sampling calls the HF model directly (not the FSDP root): gather the root's params around it."""
    if world > 1:
        policy.unshard()
    try:
        yield
    finally:
        if world > 1:
            policy.reshard()


def clip_grad_norm(model: torch.nn.Module, max_norm: float, world: int) -> torch.Tensor:
    """Global grad norm (sharded and replicated params alike), clipped in place when max_norm > 0. No host sync."""
    params = [p for p in model.parameters() if p.grad is not None]
    if world == 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    from torch.distributed.tensor import DTensor

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


def mfu(n_params: int, tokens_fwd_bwd: int, tokens_fwd: int, dt: float, device: torch.device) -> float | None:
    """Model FLOPs utilisation (6N per trained token, 2N per forward-only token) on a known GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = 989e12 if ("H100" in name or "H200" in name) else 312e12 if "A100" in name else None
    if peak is None:
        return None
    return (6 * n_params * tokens_fwd_bwd + 2 * n_params * tokens_fwd) / dt / peak


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
    model: torch.nn.Module
    tokenizer: Any
    policy: PackedPolicy
    log: Logger
    problems: list[Problem]
    test_splits: dict[str, list[Problem]]
    extra: dict  # {"evals": {tag: metrics}, "ref_path": ...}: saved in every checkpoint
    n_params: int
    stop_after: int | None = None  # global step after which to checkpoint and return (tests: an interruption)

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
        with gathered(self.policy, self.world):
            m = evaluate(
                self.model, self.tokenizer, self.test_splits, reward_cfg=self.cfg.reward,
                max_new_tokens=self.cfg.rollout.max_new_tokens, batch_size=self.cfg.rollout.batch_size,
                include_probes=True, progress=self.cfg.log.progress and self.rank == 0,
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
        ckpt_lib.save_checkpoint(
            path, self.model, self.tokenizer, optimizer=optimizer, scheduler=scheduler, stage=stage, step=step,
            extra=self.extra, keep_last=self.cfg.log.keep_last,
            keep=[self.extra["ref_path"]] if "ref_path" in self.extra else [],
        )  # fmt: skip
        return path


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
    """Clip, skip if the loss or the grad norm is non-finite, step, zero the grads. `step_fn`s call it once per
    update; it remembers the last update's grad norm and whether it was skipped."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, world: int):
        self.model, self.optimizer, self.grad_clip, self.world = model, optimizer, grad_clip, world
        self.grad_norm, self.finite = torch.zeros(()), True

    def __call__(self, loss: torch.Tensor) -> None:
        self.grad_norm = clip_grad_norm(self.model, self.grad_clip, self.world)
        self.finite = bool(torch.isfinite(loss) & torch.isfinite(self.grad_norm))  # sync: skip non-finite steps
        if self.finite:
            self.optimizer.step()
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
    optimizer, scheduler = make_optimizer(run.model, cfg, stage.lr, stage.warmup, stage.steps)
    if state is not None and state["stage"] == stage.name:
        ckpt_lib.restore(state, run.model, optimizer, scheduler)
    update = OptimizerStep(run.model, optimizer, cfg.optim.grad_clip, run.world)
    bar = _progress(cfg, run.rank, stage.steps, start, stage.name)
    history = run.extra.setdefault("history", {}).setdefault(stage.name, [])  # saved with checkpoints: a resumed
    del history[start:]  # run's summary covers every step, as a straight run's does
    every = ckpt_interval(cfg.log.ckpt_every, stage.steps)
    for step in range(start, stage.steps):
        t0 = time.perf_counter()
        m = step_fn(step, update)
        lr = scheduler.get_last_lr()[0]
        _scheduler_step(scheduler)
        dt = time.perf_counter() - t0
        bar.update(1)
        ops.raise_deferred_errors()  # sync: the step's deferred input checks, read with its metrics
        m = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in m.items()}  # sync: metrics
        m.update(grad_norm=update.grad_norm.item(), lr=lr, skipped=int(not update.finite))
        m.update(tok_per_s=m["tokens"] * run.world / dt, step_s=dt)
        if run.world > 1:
            m = _all_reduce_mean(m, run.device)
        history.append(m)
        global_step, done = stage.offset + step, step + 1
        if step % cfg.log.log_every == 0 or done == stage.steps or not update.finite:
            line = log_line(step, stage.steps, m) + (" | SKIPPED" if not update.finite else "")  # non-finite
            run.log.log(stage.name, step, global_step, m, line)
        if stage.eval_every and done % stage.eval_every == 0 and done < stage.steps:
            run.evaluate(f"{stage.name}-{done}", global_step)
        stop = stage.offset + done == run.stop_after
        if (done % every == 0 and done < stage.steps) or stop:  # the stage's end is saved once, below
            run.save(stage.name, done, optimizer, scheduler)
        if stop:
            bar.close()
            return {"stopped_at": stage.offset + done, "last_loss": m["loss"]}
    bar.close()
    run.evaluate(stage.end_eval, stage.offset + stage.steps, same_as=stage.start_eval if stage.steps == 0 else "")
    return {"history": history, "ckpt": run.save(stage.name, stage.steps, optimizer, scheduler)}


def agreed_micro_batches(n: int, world: int, device: torch.device) -> int:
    """The largest micro-batch count of any rank (one all-reduce MAX; n itself on one process).

    Every rank then runs that many forwards and backwards, the missing ones on a copy of its last micro-batch with
    weight 0 (no gradient, same shapes), so the FSDP all-gathers and reduce-scatters of each micro-batch pair up
    across ranks: ranks that pack their own sequences into different counts would otherwise fall out of step and
    deadlock or exchange mismatched buffers."""
    if world == 1:
        return n
    count = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())  # sync: once per step, before the micro-batch loop


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
    total = sum(b.loss_labels.numel() for b in batches)  # host ints: no sync
    loss_sum = torch.zeros((), device=run.device)
    for i in range(agreed_micro_batches(len(batches), run.world, run.device)):
        batch = batches[min(i, len(batches) - 1)].to(run.device)  # past the end: padding, weight 0
        hidden, weight, bias = run.policy(batch)  # (N, H) at loss positions, (V, H)
        logp = ops.token_logprobs_linear(hidden, weight, batch.loss_labels, bias=bias)
        loss = -logp.sum() / total * (1.0 if i < len(batches) else 0.0)
        loss.backward()
        loss_sum += loss.detach()
    update(loss_sum)
    return {"loss": loss_sum, "tokens": total}


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """One pass of the policy loss over the step's micro-batches, backward included: (loss, stats) of the step.
    old[i] None = on-policy (ratio 1: the fused op takes the detached current log-probs itself, no extra LM-head
    pass); live[i] False = a padding micro-batch that only keeps the ranks' collectives in step (weight 0).
    norm = the step's normaliser (None: each micro-batch normalised by its own counts, packing-dependent)."""
    total = max(1, sum(b.num_loss_tokens for b, is_live in zip(batches, live) if is_live))
    loss_sum = torch.zeros((), device=advantages.device)
    stats_sum: dict[str, torch.Tensor] = {}
    for b, old_b, ref_b, tch_b, is_live in zip(batches, old, ref, teacher, live):
        hidden, weight, bias = policy(b)  # (N, H), (V, H)
        if b.num_loss_tokens == 0:  # only prompt-only dialogues (an empty answer): no loss, but a backward all the
            loss, stats = (hidden.sum() + weight.sum()) * 0.0, {}  # same, so FSDP's reduce-scatters pair up
        else:
            mask = torch.ones_like(b.loss_labels, dtype=torch.bool)
            loss, stats = ops.fused_linear_policy_loss(
                hidden, weight, b.loss_labels, old_b, advantages[b.sample_index], b.loss_seq_ids, mask,
                bias=bias, ref_logp=ref_b, teacher_logp=tch_b, temperature=temperature, cfg=loss_cfg, norm=norm,
            )  # fmt: skip
        w = 1.0 if is_live else 0.0
        (loss * w).backward()
        loss_sum = loss_sum + loss.detach() * w
        share = w * b.num_loss_tokens / total  # stats are per micro-batch: their token-weighted mean
        for k, v in stats.items():
            stats_sum[k] = stats_sum.get(k, 0.0) + v.detach().float() * share
    return loss_sum, stats_sum


def grpo_step(run: Run, frozen: Frozen, step: int, update: OptimizerStep) -> dict:
    """Sample -> rewards and advantages -> reference / teacher log-probs -> policy update(s)."""
    cfg, device, temperature = run.cfg, run.device, run.cfg.logprob_temperature
    G, P, U = cfg.grpo.group_size, cfg.grpo.problems_per_step, cfg.grpo.updates_per_batch
    t0 = time.perf_counter()
    # ---- sample: P problems (this rank's share) x G dialogues
    idx = step_rng(cfg.seed, "grpo", step).choice(len(run.problems), size=min(P, len(run.problems)), replace=False)
    problems = [run.problems[i] for i in idx[run.rank :: run.world]]
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step * run.world + run.rank)
    with gathered(run.policy, run.world):
        rollouts = rollout_dialogues(
            run.model, run.tokenizer, problems, group_size=G, params=cfg.rollout, include_probes=cfg.grpo.use_probes,
            batch_size=cfg.rollout.batch_size, generator=gen,
        )  # fmt: skip
    # ---- rewards, group advantages, packing and the step's loss normaliser (host side)
    scores = [score_dialogue(problems[r.problem_index], r.responses, cfg.reward) for r in rollouts]
    rewards = torch.tensor([float(s["total"]) for s in scores], dtype=torch.float32)
    group_ids = torch.tensor([r.problem_index for r in rollouts], dtype=torch.long)
    advantages = ops.group_advantages(
        rewards, group_ids, scale=cfg.grpo.adv_scale, eps=cfg.grpo.adv_eps, nan_to_zero=True
    ).to(device)  # (S,)
    # a group's common prompt is packed once per micro-batch, its samples' continuations attending to it: every
    # forward below (old, reference, teacher, update) computes it once, with the unshared packing's loss and grads
    groups = [r.problem_index for r in rollouts] if cfg.grpo.share_prefix else None
    packed = pack_sequences([(r.ids, r.loss_mask) for r in rollouts], cfg.data.token_budget, groups=groups)
    norm = step_loss_norm(packed)
    n_pad = agreed_micro_batches(len(packed), run.world, device) - len(packed)  # padding: weight 0
    batches = [b.to(device) for b in packed + packed[-1:] * n_pad]
    live = [True] * len(packed) + [False] * n_pad
    t_rollout = _timer(device) - t0
    # ---- old / reference / teacher log-probs (no grad); old comes from the policy forward itself when on-policy
    t1 = time.perf_counter()
    with torch.no_grad():
        old = [None if U == 1 else _logp(run.policy, b, temperature) for b in batches]
        ref = [_logp(frozen.ref, b, temperature) if frozen.ref is not None else None for b in batches]
        tch = [_logp(frozen.teacher, b, temperature) if frozen.teacher is not None else None for b in batches]
    t_logp = _timer(device) - t1
    # ---- policy update(s): fused LM head + clipped loss over the packed micro-batches
    t2 = time.perf_counter()
    stats: dict[str, torch.Tensor] = {}
    for _ in range(U):
        loss, update_stats = policy_loss_backward(
            run.policy, batches, advantages, old, ref, tch, live, norm, cfg.loss, temperature
        )
        update(loss)
        for k, v in update_stats.items():
            stats[k] = stats.get(k, 0.0) + v / U
    t_update = _timer(device) - t2
    n_tok = sum(b.num_loss_tokens for b in packed)
    util = mfu(run.n_params * run.world, n_tok * U, sum(len(r.ids) for r in rollouts), _timer(device) - t0, device)
    return {
        **reward_metrics(rewards, scores, G, cfg.grpo.use_probes), "loss": loss, **stats,
        "resp_chars": float(np.mean([len(x) for r in rollouts for x in r.responses])), "tokens": n_tok,
        "update_tokens": sum(b.num_tokens for b in packed) * U,
        "t_rollout": t_rollout, "t_logp": t_logp, "t_update": t_update, **({"mfu": util} if util is not None else {}),
    }  # fmt: skip


def reward_metrics(rewards: torch.Tensor, scores: list[dict], group_size: int, use_probes: bool) -> dict:
    """Mean reward and its terms, within-group spread, rollout accuracies (host floats: rewards live on the CPU)."""
    r = rewards.view(-1, group_size)  # (P, G)
    out = {"reward": rewards.mean().item(), "reward_std": r.std(1).mean().item()}
    out["frac_zero_std"] = (r.std(1) < 1e-6).float().mean().item()
    for k in ("task", "probe", "dsu", "format"):
        if k in scores[0]:
            out[f"reward_{k}"] = float(np.mean([float(s[k]) for s in scores]))
    out["acc"] = float(np.mean([float(s["task"]) for s in scores]))
    out["probe_acc"] = float(np.mean([float(s["probe"]) for s in scores])) if use_probes else 0.0
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
    cfg: TrainConfig, *, resume: str | None = None, run_dir: str | None = None, stop_after: int | None = None
) -> dict:
    """Run both stages; returns a summary dict. stop_after = global step after which to checkpoint and return
    (simulates an interruption; used by the resume test)."""
    # ops checks that read tensor values (labels in range, NaN rewards) run on the device and raise at the step's
    # metrics sync (run_stage), so the micro-batch loop pays no host sync for them
    with ops.backend(cfg.ops_backend), ops.value_checks("deferred"):
        return _train(cfg, resume=resume, run_dir=run_dir, stop_after=stop_after)


def _train(cfg: TrainConfig, *, resume: str | None, run_dir: str | None, stop_after: int | None) -> dict:
    t_start = time.perf_counter()
    validate_run(cfg, resume, world=int(os.environ.get("WORLD_SIZE", "1")))  # user errors before any dir or model
    run, state, resume_dir, model_path = setup_run(cfg, resume, run_dir, stop_after)
    if state is None and cfg.log.eval_start:
        run.evaluate("untrained", 0)

    # ---- Stage 1: EI distillation (SFT on teacher dialogues)
    sft_start = 0 if state is None else (state["step"] if state["stage"] == "sft" else cfg.sft.steps)
    if sft_start < cfg.sft.steps:
        run.model.train()
        stage = Stage("sft", cfg.sft.steps, cfg.sft.lr, cfg.sft.warmup_steps, offset=0, end_eval="sft")
        out = run_stage(run, stage, lambda step, update: sft_step(run, step, update), sft_log_line, sft_start, state)
        if "stopped_at" in out:
            return _stopped(run, out)
        run.extra["ref_path"] = str(out["ckpt"])
    elif state is None or state["stage"] == "sft":  # no SFT stage, or resumed from the end of it
        if "sft" not in run.extra["evals"] and (cfg.log.eval_start or cfg.grpo.steps == 0):
            run.evaluate("sft", cfg.sft.steps, same_as="untrained")  # no SFT step: the starting weights
        run.extra.setdefault("ref_path", str(resume_dir) if resume_dir else model_path)

    # ---- Stage 2: ExGRPO
    grpo_start = state["step"] if state is not None and state["stage"] == "grpo" else 0
    frozen = load_frozen(run)
    stage = Stage("grpo", cfg.grpo.steps, cfg.grpo.lr, cfg.grpo.warmup_steps, offset=cfg.sft.steps,
                  end_eval="final", start_eval="sft", eval_every=cfg.log.eval_every)  # fmt: skip
    out = run_stage(
        run, stage, lambda step, update: grpo_step(run, frozen, step, update), grpo_log_line, grpo_start, state
    )
    if "stopped_at" in out:
        return _stopped(run, out)
    summary = summarize(run, out, time.perf_counter() - t_start)
    if run.world > 1:
        dist.destroy_process_group()
    return summary


def setup_run(
    cfg: TrainConfig, resume: str | None, run_dir: str | None, stop_after: int | None
) -> tuple[Run, dict | None, Path | None, str]:
    """(Run, trainer state or None, resumed checkpoint dir or None, path the student was loaded from)."""
    rank, world, device = setup_distributed(cfg)
    _quiet_transformers()
    seed_everything(cfg.seed + rank)
    state, resume_dir = None, None
    if resume:
        resume_dir = ckpt_lib.resolve_checkpoint(resume)
        if resume_dir.parent.name == "checkpoints":  # a crash mid-save: displaced checkpoint back, temp dirs gone
            if rank == 0:
                ckpt_lib.repair_checkpoints(resume_dir.parent)
            if world > 1:
                dist.barrier()
            resume_dir = ckpt_lib.resolve_checkpoint(resume)
        state = ckpt_lib.load_trainer_state(resume_dir)
        run_dir = run_dir or str(resume_dir.parent.parent)
    run_dir = Path(run_dir or Path(cfg.log.out_dir) / (cfg.log.run_name or time.strftime("%Y%m%d-%H%M%S")))
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (run_dir / "config.toml").write_text(to_toml(cfg))
    if world > 1:
        dist.barrier()
    log = Logger(run_dir, cfg, rank, resume_at=state["extra"].get("log_position") if state else None)
    model_path = str(resume_dir) if resume_dir else _init_model_path(cfg, run_dir, rank, world)
    model, tokenizer = load_model(
        model_path, dtype=getattr(torch, cfg.model.dtype), device=device, attn_backend=cfg.model.attn_backend
    )
    policy = shard_model(PackedPolicy(model), world)
    if world > 1:  # FSDP2 initialises lazily from the first forward, which must be the root's
        with torch.no_grad():
            warm = [encode_dialogue(tokenizer, Dialogue.of(("user", "1"), ("assistant", "1")))]
            policy(pack_sequences(warm, cfg.data.token_budget)[0].to(device))
    problems, test_splits = load_data(cfg, run_dir)
    requested = cfg.rollout.max_new_tokens
    resolved = resolve_max_new_tokens(tokenizer, {"train": problems, **test_splits}, requested)
    if resolved != requested:  # 0 = auto: the run uses the measured value (config.json keeps 0: a resume remeasures)
        cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_new_tokens=resolved))
    run = Run(
        cfg, rank, world, device, run_dir, model, tokenizer, policy, log, problems,
        {k: v[: cfg.log.eval_n] for k, v in test_splits.items()}, dict(state["extra"]) if state else {"evals": {}},
        sum(p.numel() for p in model.parameters()), stop_after,
    )  # fmt: skip
    backend = ops.backend_for(device, announce=False)  # the fallback notice is part of the header, not a warning
    if backend == "reference" and cfg.ops_backend == "auto":
        backend += f" (no Triton on {device.type}; TRITON_INTERPRET=1 runs the interpreter)"
    log.print(
        f"run {run_dir} | model {model_path} | {run.n_params / 1e6:.2f}M params | device {device} | world {world} | "
        f"problems {len(problems)} | max_new_tokens {resolved}{' (auto)' if requested == 0 else ''} | "
        f"ops {backend} | share_prefix {'on' if cfg.grpo.share_prefix else 'off'} | "
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
    """The reference (frozen SFT model) when loss.kl_beta > 0 and the teacher when loss.teacher_beta > 0, unsharded
    on every rank (no-grad forwards only)."""
    cfg, dtype, frozen = run.cfg, getattr(torch, run.cfg.model.dtype), Frozen()
    if cfg.loss.kl_beta > 0:
        frozen.ref, _ = load_model(
            run.extra["ref_path"], dtype=dtype, device=run.device, attn_backend=cfg.model.attn_backend
        )
        frozen.ref.requires_grad_(False).eval()
    if cfg.loss.teacher_beta > 0:
        frozen.teacher, _ = load_model(cfg.model.teacher_path, dtype=dtype, device=run.device)
        frozen.teacher.requires_grad_(False).eval()
    return frozen


def summarize(run: Run, grpo: dict, wall: float) -> dict:
    """summary.json and the final console line: evals before / after SFT / at the end, the GRPO reward trend."""
    evals, final = run.extra["evals"], run.extra["evals"]["final"]
    reward_trace = [m["reward"] for m in grpo["history"]]
    k = max(1, len(reward_trace) // 4)  # reward trend: mean of the first vs the last quarter of the GRPO steps run
    trend = (float(np.mean(reward_trace[:k])), float(np.mean(reward_trace[-k:]))) if reward_trace else (0.0, 0.0)
    keep = ("acc", "probe_acc", "reward")
    summary = {
        "run_dir": str(run.run_dir), "final_ckpt": str(grpo["ckpt"]), "wall_s": wall,
        "reward_first_quarter": trend[0], "reward_last_quarter": trend[1],
        **{f"{tag}_{k}": v for tag in ("untrained", "sft", "final") for k, v in evals.get(tag, {}).items()
           if k.startswith(keep)},
    }  # fmt: skip
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
    run.log.close()
    return {"run_dir": str(run.run_dir), **out}


def _progress(cfg: TrainConfig, rank: int, total: int, initial: int, desc: str):
    if cfg.log.progress and rank == 0:
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


def _logp(model: torch.nn.Module, batch: PackedBatch, temperature: float) -> torch.Tensor:
    """No-grad log-probs of the batch's loss labels under a policy / reference / teacher model."""
    policy = model if isinstance(model, PackedPolicy) else PackedPolicy(model)
    hidden, weight, bias = policy(batch)
    if batch.num_loss_tokens == 0:  # nothing to score (the forward still ran: FSDP's all-gathers pair up)
        return hidden.new_zeros(0, dtype=torch.float32)
    return ops.token_logprobs_linear(hidden, weight, batch.loss_labels, bias=bias, temperature=temperature)


def _all_reduce_mean(m: dict, device: torch.device) -> dict:
    keys = [k for k, v in m.items() if isinstance(v, (int, float))]
    t = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {**m, **dict(zip(keys, t.tolist()))}


def main(argv: list[str] | None = None) -> dict:
    """The command line: a user error (config, data, model dir, checkpoint) prints one line and exits with code 2
    (`--debug` adds the traceback); any other error keeps its traceback (errors.cli_main)."""

    def run(args: list[str]) -> dict:
        cfg, launch = parse_args(args)
        return train(cfg, resume=launch.resume or None)

    return cli_main(run, argv)


if __name__ == "__main__":
    main()
