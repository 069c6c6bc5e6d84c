"""One SFT step and one GRPO update on a fixed global batch, under `torchrun` (any WORLD_SIZE) or a plain process,
through the trainer's own pieces (Student, step_counts, policy_loss_backward, reduce_metrics). Rank 0 writes the
losses, the full (gathered) gradients and the reduced stats to OUT. tests/test_student.py runs it with 1 and 2 gloo
processes and compares: N ranks must give the gradients of one process on the same global batch.

    python tests/dist_step.py CKPT OUT DTYPE          (or torchrun --nproc_per_node 2 tests/dist_step.py ...)
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from exgrpo_fast import ops
from exgrpo_fast.config import TrainConfig
from exgrpo_fast.data.dialogue import encode_dialogue
from exgrpo_fast.data.packing import pack_sequences
from exgrpo_fast.data.tasks import make_problems, sft_dialogue
from exgrpo_fast.model.student import load_student
from exgrpo_fast.train import (
    LossConfig,
    distributed,
    policy_loss_backward,
    reduce_metrics,
    release_root,
    step_counts,
)


def grads(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().float().cpu().clone()
    model.zero_grad(set_to_none=True)
    return out


def main(ckpt: str, out: str, dtype: str) -> None:
    cfg = TrainConfig()
    cfg.model.dtype = dtype
    with distributed(cfg) as (rank, world, device), ops.backend("reference"):
        student = load_student(ckpt, cfg.model, device, world)
        problems = make_problems("train", 12, seed=3)
        seqs = [encode_dialogue(student.tokenizer, sft_dialogue(p)) for p in problems]
        mine = seqs[rank::world]
        budget = 400  # several micro-batches, different counts per rank
        result = {}

        # ---- SFT: cross-entropy over the global batch's loss tokens
        batches = pack_sequences(mine, budget)
        counts = step_counts(batches, world, device)
        total = 0.0
        for i in range(counts.micro_batches):
            b = batches[min(i, len(batches) - 1)]
            student.micro_batch(last=i == counts.micro_batches - 1)
            hidden, weight, bias = student.policy(b)
            logp = ops.token_logprobs_linear(hidden, weight, b.loss_labels, bias=bias)
            loss = -logp.sum() / counts.norm.num_tokens * (1.0 if i < len(batches) else 0.0)
            (loss * student.loss_scale).backward()
            total += loss.item()
        student.reduce_gradients()
        result["sft_loss"] = reduce_metrics({"loss": total}, world, device)["loss"]
        result["sft_grads"] = grads(student.model)

        # ---- GRPO update: off-policy (old log-probs shifted per token) so clipping and ratios matter
        advantages = torch.randn(len(seqs), generator=torch.Generator().manual_seed(11))
        packed = pack_sequences(mine, budget)
        counts = step_counts(packed, world, device)
        n_pad = counts.micro_batches - len(packed)
        batches = packed + packed[-1:] * n_pad
        live = [True] * len(packed) + [False] * n_pad
        old = []
        with torch.no_grad():
            for b in batches:
                hidden, weight, bias = student.policy(b)
                logp = ops.token_logprobs_linear(hidden, weight, b.loss_labels, bias=bias)
                release_root(student.policy)
                # a shift that depends on the token only (its sample and place), not on the packing or the rank
                sample = rank + world * b.sample_index[b.loss_seq_ids]
                place = b.loss_positions - b.cu_seqlens.long()[b.loss_seq_ids]
                old.append(logp + 0.3 * torch.sin(3.1 * sample + 0.7 * place))
        adv_mine = advantages[rank::world]
        none = [None] * len(batches)
        loss, stats = policy_loss_backward(
            student.policy, batches, adv_mine, old, none, none, live, counts.norm,
            LossConfig(clip_low=0.1, clip_high=0.1), 1.0, micro_batch=student.micro_batch,
            loss_scale=student.loss_scale,
        )  # fmt: skip
        student.reduce_gradients()
        m = {"loss": loss.item(), **{k: v.item() for k, v in stats.items()}}
        result["grpo"] = reduce_metrics(m, world, device)
        result["grpo_grads"] = grads(student.model)
        if rank == 0:
            torch.save(result, out)
        if world > 1:
            dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(*sys.argv[1:4])
