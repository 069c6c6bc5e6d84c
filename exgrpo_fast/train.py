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
  (+ format); one advantage per dialogue, applied to every student token of every turn;
- drops: the value model / GAE; by default off-policy reuse (one update per rollout batch, so old_logp is the
  detached current log-prob and the ratio is 1; grpo.updates_per_batch > 1 brings the clipping into play), the
  reference forward (kl_beta = 0) and the teacher (teacher_beta = 0).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from exgrpo_fast import checkpoint as ckpt_lib
from exgrpo_fast import ops
from exgrpo_fast.config import TrainConfig, parse_args, to_toml
from exgrpo_fast.eval import evaluate, format_eval
from exgrpo_fast.rollout import rollout_dialogues

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


def lr_lambda(warmup: int, total: int, min_frac: float):
    """Linear warmup then cosine decay to min_frac of the peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_optimizer(model, cfg: TrainConfig, lr: float, warmup: int, total: int):
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

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        from exgrpo_fast.model.forward import packed_hidden
        from exgrpo_fast.model.loading import lm_head

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
def gathered(policy, world: int):
    """Sampling calls the HF model directly (not the FSDP root): gather the root's params around it."""
    if world > 1:
        policy.unshard()
    try:
        yield
    finally:
        if world > 1:
            policy.reshard()


def clip_grad_norm(model, max_norm: float, world: int) -> torch.Tensor:
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
    """metrics.jsonl + TensorBoard + console, rank 0 only."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, rank: int):
        self.enabled = rank == 0
        self.tb = None
        if self.enabled:
            self.file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - open for the whole run
            if cfg.log.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, stage: str, step: int, global_step: int, metrics: dict, line: str | None = None) -> None:
        if not self.enabled:
            return
        row = {"stage": stage, "step": step, "global_step": global_step, "time": time.time(), **metrics}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"{stage}/{k}", v, global_step)
        if line:
            self.print(line)

    def print(self, line: str) -> None:
        if self.enabled:
            try:
                from tqdm import tqdm

                tqdm.write(line)
            except ImportError:  # pragma: no cover
                print(line, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def load_data(cfg: TrainConfig, run_dir: Path) -> tuple[list[dict], dict[str, list[dict]]]:
    """(train problems, held-out splits)."""
    if cfg.data.train_path:
        from exgrpo_fast.data.sources import load_problems

        problems = [dict(p) for p in load_problems(cfg.data.train_path)]
        if any(not p.get("probes") for p in problems) and cfg.data.num_probes > 0:
            if not cfg.model.teacher_path:
                raise ValueError("data.train_path problems without probes need model.teacher_path to write them")
            from exgrpo_fast.data.probes import write_probes_with_teacher

            # a datasets.Dataset: slicing it gives columns, so turn it back into a list of problem rows
            problems = [dict(p) for p in write_probes_with_teacher(
                problems, cfg.model.teacher_path, k=cfg.data.num_probes,
                cache_dir=cfg.data.cache_dir or str(run_dir / "probe_cache"), seed=cfg.data.seed,
            )]  # fmt: skip
        n_test = min(cfg.data.n_test, len(problems) // 5)
        return problems[n_test:], {"test_id": problems[:n_test]}
    from exgrpo_fast.data.tasks import builtin_dataset

    ds = builtin_dataset(cfg.data.n_train, cfg.data.n_test, seed=cfg.data.seed)
    return [dict(p) for p in ds["train"]], {s: [dict(p) for p in ds[s]] for s in ("test_id", "test_ood")}


# ----------------------------------------------------------------------------------------------------------------
# one SFT step (Explanatory Inversion distillation)


def sft_step(policy, tokenizer, problems, cfg: TrainConfig, step: int, device, rank: int = 0, world: int = 1) -> dict:
    """Forward/backward of one SFT batch over packed micro-batches; returns 0-dim tensors (no host sync)."""
    from exgrpo_fast.data.dialogue import encode_dialogue
    from exgrpo_fast.data.packing import pack_sequences
    from exgrpo_fast.data.tasks import sft_dialogue

    rng = step_rng(cfg.seed, "sft", step)
    idx = rng.choice(len(problems), size=min(cfg.sft.batch_size, len(problems)), replace=False)[rank::world]
    seqs = [encode_dialogue(tokenizer, sft_dialogue(problems[i])) for i in idx]
    batches = pack_sequences(seqs, cfg.data.token_budget)
    total = sum(b.loss_labels.numel() for b in batches)  # host ints: no sync
    loss_sum = torch.zeros((), device=device)
    for batch in batches:
        batch = batch.to(device)
        hidden, weight, bias = policy(batch)  # (N, H) at loss positions, (V, H)
        logp = ops.token_logprobs_linear(hidden, weight, batch.loss_labels, bias=bias)
        loss = -logp.sum() / total
        loss.backward()
        loss_sum += loss.detach()
    return {"loss": loss_sum, "tokens": total}


# ----------------------------------------------------------------------------------------------------------------
# the trainer


def train(cfg: TrainConfig, *, resume: str | None = None, run_dir: str | None = None, stop_after: int | None = None):
    """Run both stages; returns a summary dict. stop_after = global step after which to checkpoint and return
    (simulates an interruption; used by the resume test)."""
    previous_backend = getattr(ops, "_backend", "auto")
    ops.set_backend(cfg.ops_backend)
    try:
        return _train(cfg, resume=resume, run_dir=run_dir, stop_after=stop_after)
    finally:  # leave the process-wide ops backend as we found it (tests share one process)
        ops.set_backend(previous_backend)


def _train(cfg: TrainConfig, *, resume: str | None, run_dir: str | None, stop_after: int | None):
    rank, world, device = setup_distributed(cfg)
    _quiet_transformers()
    dtype = getattr(torch, cfg.model.dtype)
    seed_everything(cfg.seed + rank)
    t_start = time.perf_counter()

    # ---- run dir, config dump, model
    from exgrpo_fast.model.loading import load_model

    state, resume_dir = None, None
    if resume:
        resume_dir = ckpt_lib.resolve_checkpoint(resume)
        state = ckpt_lib.load_trainer_state(resume_dir)
        run_dir = run_dir or str(resume_dir.parent.parent)
    if run_dir is None:
        name = cfg.log.run_name or time.strftime("%Y%m%d-%H%M%S")
        run_dir = str(Path(cfg.log.out_dir) / name)
    run_dir = Path(run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (run_dir / "config.toml").write_text(to_toml(cfg))
    if world > 1:
        dist.barrier()
    log = Logger(run_dir, cfg, rank)
    init_path = cfg.model.path
    if not init_path:
        init_path = str(run_dir / "init_model")
        if rank == 0 and not (Path(init_path) / "config.json").exists():
            from exgrpo_fast.model.tiny import create_tiny_checkpoint

            create_tiny_checkpoint(init_path, preset=cfg.model.preset, seed=cfg.seed)
        if world > 1:
            dist.barrier()
    model_path = str(resume_dir) if resume_dir else init_path
    model, tokenizer = load_model(model_path, dtype=dtype, device=device, attn_backend=cfg.model.attn_backend)
    policy = shard_model(PackedPolicy(model), world)
    if world > 1:  # FSDP2 initialises lazily from the first forward, which must be the root's
        with torch.no_grad():
            from exgrpo_fast.data.dialogue import encode_dialogue
            from exgrpo_fast.data.packing import pack_sequences

            warm = [
                encode_dialogue(tokenizer, [{"role": "user", "content": "1"}, {"role": "assistant", "content": "1"}])
            ]
            policy(pack_sequences(warm, cfg.data.token_budget)[0].to(device))
    n_params = sum(p.numel() for p in model.parameters())
    problems, test_splits = load_data(cfg, run_dir)
    test_splits = {k: v[: cfg.log.eval_n] for k, v in test_splits.items()}
    reward_cfg, loss_cfg, temperature = cfg.reward, cfg.loss, cfg.logprob_temperature
    extra = dict(state["extra"]) if state else {"evals": {}}
    log.print(
        f"run {run_dir} | model {model_path} | {n_params / 1e6:.2f}M params | device {device} | world {world} | "
        f"problems {len(problems)} | ops {ops.backend_for(device)} | threads {torch.get_num_threads()} | "
        f"load {_load():.2f}"
    )

    def run_eval(tag: str, global_step: int) -> dict:
        t0 = time.perf_counter()
        with gathered(policy, world):
            m = evaluate(
                model, tokenizer, test_splits, reward_cfg=reward_cfg, max_new_tokens=cfg.rollout.max_new_tokens,
                batch_size=cfg.rollout.batch_size, include_probes=True,
            )  # fmt: skip
        m["eval_s"] = time.perf_counter() - t0
        extra["evals"][tag] = m
        log.log("eval", global_step, global_step, {"tag": tag, **m}, f"eval {tag} | " + format_eval(m))
        return m

    def save(stage: str, step: int, optimizer, scheduler) -> Path:
        path = run_dir / "checkpoints" / f"{stage}-{step:06d}"
        ckpt_lib.save_checkpoint(
            path, model, tokenizer, optimizer=optimizer, scheduler=scheduler, stage=stage, step=step, extra=extra
        )
        return path

    if state is None:
        run_eval("untrained", 0)

    # ----------------------------------------------------------------------------------------------------------------
    # Stage 1: EI distillation (SFT on teacher dialogues)
    sft_start = 0 if state is None else (state["step"] if state["stage"] == "sft" else cfg.sft.steps)
    if sft_start < cfg.sft.steps:
        optimizer, scheduler = make_optimizer(model, cfg, cfg.sft.lr, cfg.sft.warmup_steps, cfg.sft.steps)
        if state is not None and state["stage"] == "sft":
            ckpt_lib.restore(state, model, optimizer, scheduler)
        model.train()
        bar = _progress(cfg, rank, cfg.sft.steps, sft_start, "sft")
        for step in range(sft_start, cfg.sft.steps):
            t0 = time.perf_counter()
            out = sft_step(policy, tokenizer, problems, cfg, step, device, rank, world)
            grad_norm = clip_grad_norm(model, cfg.optim.grad_clip, world)
            finite = bool(torch.isfinite(out["loss"]) & torch.isfinite(grad_norm))  # sync: skip non-finite steps
            if finite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            _scheduler_step(scheduler)
            dt = time.perf_counter() - t0
            bar.update(1)
            if step % cfg.log.log_every == 0 or step == cfg.sft.steps - 1 or not finite:
                loss = out["loss"].item()  # sync: logging
                m = {"loss": loss, "grad_norm": grad_norm.item(), "lr": lr, "tokens": out["tokens"],
                     "tok_per_s": out["tokens"] * world / dt, "step_s": dt, "skipped": int(not finite)}  # fmt: skip
                log.log("sft", step, step, m, f"sft {step + 1:4d}/{cfg.sft.steps} | loss {loss:.4f} | "
                        f"gnorm {m['grad_norm']:.2f} | lr {lr:.2e} | tok/s {m['tok_per_s']:.0f} | {dt:.2f}s"
                        + (" | SKIPPED (non-finite)" if not finite else ""))  # fmt: skip
            done = step + 1
            if (cfg.log.ckpt_every and done % cfg.log.ckpt_every == 0) or done == stop_after:
                save("sft", done, optimizer, scheduler)
            if done == stop_after:
                bar.close()
                log.close()
                return {"run_dir": str(run_dir), "stopped_at": done}
        bar.close()
        run_eval("sft", cfg.sft.steps)
        extra["ref_path"] = str(run_dir / "checkpoints" / f"sft-{cfg.sft.steps:06d}")
        save("sft", cfg.sft.steps, optimizer, scheduler)
        del optimizer, scheduler
    elif state is None or state["stage"] == "sft":  # no SFT stage, or resumed from the end of it
        if "sft" not in extra["evals"]:
            run_eval("sft", cfg.sft.steps)
        extra.setdefault("ref_path", str(resume_dir) if resume_dir else model_path)

    # ----------------------------------------------------------------------------------------------------------------
    # Stage 2: ExGRPO
    grpo_start = state["step"] if state is not None and state["stage"] == "grpo" else 0
    optimizer, scheduler = make_optimizer(model, cfg, cfg.grpo.lr, cfg.grpo.warmup_steps, cfg.grpo.steps)
    if state is not None and state["stage"] == "grpo":
        ckpt_lib.restore(state, model, optimizer, scheduler)
    ref_model = teacher = None
    if cfg.loss.kl_beta > 0:  # the reference is the frozen SFT model (unsharded on every rank: no-grad only)
        ref_model, _ = load_model(extra["ref_path"], dtype=dtype, device=device, attn_backend=cfg.model.attn_backend)
        ref_model.requires_grad_(False).eval()
    if cfg.loss.teacher_beta > 0:
        teacher, _ = load_model(cfg.model.teacher_path, dtype=dtype, device=device)
        teacher.requires_grad_(False).eval()
    params = cfg.rollout  # a rollout.SamplingParams
    from exgrpo_fast.data.packing import pack_sequences
    from exgrpo_fast.rewards import score_dialogue

    G, P = cfg.grpo.group_size, cfg.grpo.problems_per_step
    reward_trace: list[float] = []
    bar = _progress(cfg, rank, cfg.grpo.steps, grpo_start, "grpo")
    for step in range(grpo_start, cfg.grpo.steps):
        global_step = cfg.sft.steps + step
        t0 = time.perf_counter()
        # ---- rollouts: P problems (this rank's share) x G dialogues
        idx = step_rng(cfg.seed, "grpo", step).choice(len(problems), size=min(P, len(problems)), replace=False)
        batch_problems = [problems[i] for i in idx[rank::world]]
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step * world + rank)
        with gathered(policy, world):
            rollouts = rollout_dialogues(
                model, tokenizer, batch_problems, group_size=G, params=params, include_probes=cfg.grpo.use_probes,
                batch_size=cfg.rollout.batch_size, generator=gen,
            )  # fmt: skip
        scores = [score_dialogue(batch_problems[r.problem_index], r.responses, reward_cfg) for r in rollouts]
        rewards = torch.tensor([float(s["total"]) for s in scores], dtype=torch.float32)
        group_ids = torch.tensor([r.problem_index for r in rollouts], dtype=torch.long)
        advantages = ops.group_advantages(
            rewards, group_ids, scale=cfg.grpo.adv_scale, eps=cfg.grpo.adv_eps, nan_to_zero=True
        ).to(device)  # (S,)
        batches = [b.to(device) for b in pack_sequences([(r.ids, r.loss_mask) for r in rollouts],
                                                         cfg.data.token_budget)]  # fmt: skip
        t_rollout = _timer(device) - t0

        # ---- old / reference / teacher log-probs (no grad); old is reused from the policy forward when on-policy
        t1 = time.perf_counter()
        on_policy = cfg.grpo.updates_per_batch == 1
        with torch.no_grad():
            old = [None if on_policy else _logp(policy, b, temperature) for b in batches]
            ref = [_logp(ref_model, b, temperature) if ref_model is not None else None for b in batches]
            tch = [_logp(teacher, b, temperature) if teacher is not None else None for b in batches]
        t_logp = _timer(device) - t1

        # ---- policy update(s): fused LM head + clipped loss over packed micro-batches
        t2 = time.perf_counter()
        n_tok = sum(b.loss_labels.numel() for b in batches)
        n_seq = sum(int(b.sample_index.numel()) for b in batches)
        acc: dict[str, torch.Tensor] = {}
        for _ in range(cfg.grpo.updates_per_batch):
            loss_sum = torch.zeros((), device=device)
            for b, old_b, ref_b, tch_b in zip(batches, old, ref, tch):
                hidden, weight, bias = policy(b)  # (N, H), (V, H)
                if old_b is None:  # on-policy: the detached current log-probs (ratio 1)
                    with torch.no_grad():
                        old_b = ops.token_logprobs_linear(hidden, weight, b.loss_labels, bias=bias,
                                                          temperature=temperature)  # fmt: skip
                mask = torch.ones_like(b.loss_labels, dtype=torch.bool)
                loss, stats = ops.fused_linear_policy_loss(
                    hidden, weight, b.loss_labels, old_b, advantages[b.sample_index], b.loss_seq_ids, mask,
                    bias=bias, ref_logp=ref_b, teacher_logp=tch_b, temperature=temperature, cfg=loss_cfg,
                )  # fmt: skip
                w = (
                    b.loss_labels.numel() / n_tok
                    if loss_cfg.loss_agg == "token-mean"
                    else b.sample_index.numel() / n_seq
                )
                (loss * w).backward()
                loss_sum = loss_sum + loss.detach() * w
                for k, v in stats.items():
                    acc[k] = acc.get(k, 0.0) + v.detach().float() * w / cfg.grpo.updates_per_batch
            grad_norm = clip_grad_norm(model, cfg.optim.grad_clip, world)
            finite = bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))  # sync: skip non-finite steps
            if finite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        _scheduler_step(scheduler)
        t_update = _timer(device) - t2
        dt = time.perf_counter() - t0
        bar.update(1)

        # ---- metrics (one host sync per logged step)
        r = rewards.view(-1, G)
        m = {
            "reward": rewards.mean().item(), "reward_std": r.std(1).mean().item(),
            "frac_zero_std": (r.std(1) < 1e-6).float().mean().item(),
            **{f"reward_{k}": float(np.mean([float(s[k]) for s in scores])) for k in ("task", "probe", "dsu", "format")
               if k in scores[0]},
            "acc": float(np.mean([float(s["task"]) for s in scores])),
            "probe_acc": float(np.mean([float(s["probe"]) for s in scores])) if cfg.grpo.use_probes else 0.0,
            "loss": loss_sum.item(), "grad_norm": grad_norm.item(), "lr": lr, "skipped": int(not finite),
            **{k: v.item() for k, v in acc.items()},  # sync: logging
            "resp_chars": float(np.mean([len(x) for ro in rollouts for x in ro.responses])),
            "tokens": n_tok, "tok_per_s": n_tok * world / dt, "step_s": dt,
            "t_rollout": t_rollout, "t_logp": t_logp, "t_update": t_update,
        }  # fmt: skip
        if world > 1:
            m = _all_reduce_mean(m, device)
        reward_trace.append(m["reward"])
        util = mfu(n_params * world, n_tok * cfg.grpo.updates_per_batch, sum(len(x.ids) for x in rollouts), dt, device)
        if util is not None:
            m["mfu"] = util
        if step % cfg.log.log_every == 0 or step == cfg.grpo.steps - 1 or not finite:
            log.log("grpo", step, global_step, m, (
                f"grpo {step + 1:3d}/{cfg.grpo.steps} | reward {m['reward']:.3f} (task {m.get('reward_task', 0):.2f} "
                f"probe {m.get('reward_probe', 0):.2f} dsu {m.get('reward_dsu', 0):.2f}) | std {m['reward_std']:.2f} "
                f"| zero-std {m['frac_zero_std']:.2f} | acc {m['acc']:.2f} | probe {m['probe_acc']:.2f} | "
                f"kl {m.get('kl_ref', 0):.4f} | ent {m.get('entropy', 0):.2f} | "
                f"clip {m.get('clip_frac_low', 0):.2f}/{m.get('clip_frac_high', 0):.2f} | gnorm {m['grad_norm']:.2f} "
                f"| lr {lr:.1e} | tok/s {m['tok_per_s']:.0f} | {dt:.1f}s (roll {t_rollout:.1f} logp {t_logp:.1f} "
                f"upd {t_update:.1f})" + (f" | mfu {util:.1%}" if util is not None else "")
                + (" | SKIPPED (non-finite)" if not finite else "")
            ))  # fmt: skip
        done = step + 1
        if cfg.log.eval_every and done % cfg.log.eval_every == 0 and done < cfg.grpo.steps:
            run_eval(f"grpo-{done}", global_step)
        if (cfg.log.ckpt_every and done % cfg.log.ckpt_every == 0) or cfg.sft.steps + done == stop_after:
            save("grpo", done, optimizer, scheduler)
        if cfg.sft.steps + done == stop_after:
            bar.close()
            log.close()
            return {"run_dir": str(run_dir), "stopped_at": cfg.sft.steps + done, "last_loss": m["loss"]}
    bar.close()

    # ---- final eval, checkpoint, summary
    final = run_eval("final", cfg.sft.steps + cfg.grpo.steps)
    final_ckpt = save("grpo", cfg.grpo.steps, optimizer, scheduler)
    evals = extra["evals"]
    wall = time.perf_counter() - t_start
    k = max(1, len(reward_trace) // 4)  # reward trend: mean of the first vs the last quarter of the GRPO steps run
    trend = (float(np.mean(reward_trace[:k])), float(np.mean(reward_trace[-k:]))) if reward_trace else (0.0, 0.0)
    summary = {
        "run_dir": str(run_dir), "final_ckpt": str(final_ckpt), "wall_s": wall,
        "reward_first_quarter": trend[0], "reward_last_quarter": trend[1],
        **{f"{tag}_{k}": v for tag in ("untrained", "sft", "final") for k, v in evals.get(tag, {}).items()
           if k.startswith(("acc", "probe_acc", "reward"))},
    }  # fmt: skip
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    line = (
        "summary | "
        + " | ".join(
            f"{k} untrained {evals.get('untrained', {}).get(k, float('nan')):.3f} -> sft "
            f"{evals.get('sft', {}).get(k, float('nan')):.3f} -> final {final.get(k, float('nan')):.3f}"
            for k in final
            if k.startswith(("acc", "probe_acc", "reward"))
        )
        + (
            f" | grpo reward {trend[0]:.3f} -> {trend[1]:.3f} (first -> last quarter) | wall {wall:.0f}s | "
            f"load {_load():.2f} | {run_dir}"
        )
    )
    log.print(line)
    log.close()
    if world > 1:
        dist.destroy_process_group()
    return summary


# ----------------------------------------------------------------------------------------------------------------
# small helpers used by the loop


def _progress(cfg: TrainConfig, rank: int, total: int, initial: int, desc: str):
    if cfg.log.progress and rank == 0:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


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


def _scheduler_step(scheduler) -> None:
    with warnings.catch_warnings():  # a skipped (non-finite) first step trips torch's "optimizer.step() first" check
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


def _quiet_transformers() -> None:
    """No per-save / per-load progress bars from transformers in our logs."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001, S110 - cosmetic only
        pass


def _logp(model, batch, temperature: float) -> torch.Tensor:
    """No-grad log-probs of the batch's loss labels under a policy / reference / teacher model."""
    policy = model if isinstance(model, PackedPolicy) else PackedPolicy(model)
    hidden, weight, bias = policy(batch)
    return ops.token_logprobs_linear(hidden, weight, batch.loss_labels, bias=bias, temperature=temperature)


def _all_reduce_mean(m: dict, device) -> dict:
    keys = [k for k, v in m.items() if isinstance(v, (int, float))]
    t = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {**m, **dict(zip(keys, t.tolist()))}


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_args(argv)
    return train(cfg, resume=getattr(args, "resume", None))


if __name__ == "__main__":
    main()
