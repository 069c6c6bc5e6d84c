"""The typed loss options, shared by config, reference, ops and (as plain numbers) the kernels.

One place defines each option's allowed values (the Literal types), its validation (LossConfig.__post_init__), and
the integer codes the kernels take (`kernel_args`). The kernels in csrc_triton import nothing from exgrpo_fast:
ops calls `kernel_args(cfg, norm)` and passes the plain ints and floats on.

`LossNorm` is the loss normaliser of a whole optimizer step (masked tokens, sequences with a masked token, the
longest masked length), computed once per step and handed to every micro-batch: then each micro-batch's loss is
its exact share of the step loss, whatever the packing (issue 10 item 5).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Literal, get_args

import torch

LossType = Literal["ppo", "cispo"]
RatioLevel = Literal["token", "sequence"]
KlEstimator = Literal["k1", "k2", "k3", "abs"]
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]

LOSS_TYPES: tuple[str, ...] = get_args(LossType)
RATIO_LEVELS: tuple[str, ...] = get_args(RatioLevel)
KL_ESTIMATORS: tuple[str, ...] = get_args(KlEstimator)
LOSS_AGGS: tuple[str, ...] = get_args(LossAgg)
# the kernels' integer codes are the positions in these tuples (one definition, no second table to keep in step)
KL_CODES = {name: i for i, name in enumerate(KL_ESTIMATORS)}
AGG_CODES = {name: i for i, name in enumerate(LOSS_AGGS)}

LOG_RATIO_CLAMP = 20.0  # log-ratios are clamped to +-20 before exp (exp(20) ~ 4.9e8 stays finite in fp32)
STAT_NAMES = ("clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_max", "kl_ref", "kl_teacher")
IGNORE_INDEX = -100  # Hugging Face's ignore index: a label equal to it marks a masked token


@dataclass
class LossConfig:
    """Options of the clipped policy loss. Every field is validated on construction."""

    loss_type: LossType = "ppo"
    """"ppo": clipped surrogate max(-A r, -A clip(r)); "cispo": -sg(min(r, 1+clip_high)) A logp (MiniMax-M1)."""
    ratio_level: RatioLevel = "token"
    """"token": r_t = exp(logp_t - old_t); "sequence" (GSPO): exp(masked mean of logp - old over the sequence)."""
    clip_low: float = 0.2
    """Lower clip: r is clipped at 1 - clip_low (ppo only). In [0, 1)."""
    clip_high: float = 0.2
    """Upper clip: r is clipped at 1 + clip_high (ppo), or truncated there (cispo). >= 0."""
    dual_clip_c: float | None = None
    """Dual-clip constant c > 1: for A < 0 the per-token surrogate is capped at -A c. None = off."""
    delta: float | None = None
    """Upper bound on r in the unclipped term only, -A min(r, delta) (two-sided clipping as in TRL). None = off."""
    kl_estimator: KlEstimator = "k3"
    """Estimator of KL(pi || ref) and KL(pi || teacher) from d = logp - other:
    k1 d, k2 d^2/2, k3 exp(-d)+d-1, abs |d|."""
    kl_beta: float = 0.0
    """Weight of the KL penalty to the reference policy (needs ref_logp when > 0)."""
    teacher_beta: float = 0.0
    """Weight of the KL penalty to the teacher on the student's own tokens (needs teacher_logp when > 0)."""
    loss_agg: LossAgg = "token-mean"
    """"token-mean" (sum / masked tokens), "seq-mean-token-mean", "seq-mean-token-sum",
    "seq-mean-token-sum-norm" (sum / (S * max_len), Dr. GRPO). Sequences with no masked token do not count."""
    max_len: int | None = None
    """Normaliser of "seq-mean-token-sum-norm"; None = the largest masked-token count of any sequence in the batch
    (or in the optimizer step, when a LossNorm is passed)."""

    def __post_init__(self) -> None:
        for name, allowed in (
            ("loss_type", LOSS_TYPES),
            ("ratio_level", RATIO_LEVELS),
            ("kl_estimator", KL_ESTIMATORS),
            ("loss_agg", LOSS_AGGS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"LossConfig.{name}={value!r}: expected one of {allowed}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and v != v:
                raise ValueError(f"LossConfig.{f.name} is NaN")
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"LossConfig.clip_low={self.clip_low}: expected 0 <= clip_low < 1")
        if self.clip_high < 0.0:
            raise ValueError(f"LossConfig.clip_high={self.clip_high}: expected >= 0")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"LossConfig.dual_clip_c={self.dual_clip_c}: expected > 1 (or None for off)")
        if self.delta is not None and self.delta <= 1.0 + self.clip_high:
            raise ValueError(
                f"LossConfig.delta={self.delta}: expected > 1 + clip_high = {1.0 + self.clip_high} (or None for off)"
            )
        if self.kl_beta < 0.0 or self.teacher_beta < 0.0:
            raise ValueError(f"LossConfig: kl_beta={self.kl_beta} and teacher_beta={self.teacher_beta} must be >= 0")
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 1):
            raise ValueError(f"LossConfig.max_len={self.max_len!r}: expected a positive int (or None)")


@dataclass(frozen=True)
class LossNorm:
    """The loss normaliser of one optimizer step, from all its micro-batches together.

    With it, a micro-batch's loss is its share of the step loss (the sum over micro-batches is the step loss for
    every loss_agg), as long as no sequence is split across micro-batches (packing never splits one).
    """

    num_tokens: float
    """Masked (loss) tokens in the whole step."""
    num_seqs: float
    """Sequences of the step with at least one masked token."""
    max_len: float
    """The largest masked-token count of any sequence of the step (LossConfig.max_len, when set, wins)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0.0 or v == float("inf"):
                raise ValueError(f"LossNorm.{f.name}={v!r}: expected a finite number >= 0")

    @staticmethod
    def from_batches(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> LossNorm:
        """The step's LossNorm from its micro-batches' (seq_ids, mask) pairs (mask already excludes -100 labels).
        One host sync for the whole step."""
        counts = [torch.bincount(seq_ids.long(), weights=(mask != 0).to(torch.float32)) for seq_ids, mask in batches]
        if not counts:
            return LossNorm(0.0, 0.0, 0.0)
        c = torch.cat([x.to(counts[0].device) for x in counts] + [counts[0].new_zeros(1)])
        stacked = torch.stack([c.sum(), (c > 0).sum().to(torch.float32), c.max()])
        tokens, seqs, longest = stacked.tolist()  # sync: once per optimizer step
        return LossNorm(float(tokens), float(seqs), float(longest))


def kernel_args(cfg: LossConfig, norm: LossNorm | None = None) -> dict[str, bool | int | float]:
    """The plain numbers csrc_triton.loss_head takes for `cfg` (and the step normaliser, 0 = this batch's own)."""
    max_len = float(cfg.max_len) if cfg.max_len is not None else (norm.max_len if norm is not None else 0.0)
    return dict(
        cispo=cfg.loss_type == "cispo",
        seq_ratio=cfg.ratio_level == "sequence",
        clip_low=float(cfg.clip_low),
        clip_high=float(cfg.clip_high),
        dual_clip_c=float(cfg.dual_clip_c) if cfg.dual_clip_c is not None else 0.0,
        delta=float(cfg.delta) if cfg.delta is not None else 0.0,
        kl_estimator=KL_CODES[cfg.kl_estimator],
        kl_beta=float(cfg.kl_beta),
        teacher_beta=float(cfg.teacher_beta),
        loss_agg=AGG_CODES[cfg.loss_agg],
        max_len=max(max_len, 1.0) if (cfg.max_len is not None or norm is not None) else 0.0,
        norm_tokens=max(norm.num_tokens, 1.0) if norm is not None else 0.0,
        norm_seqs=max(norm.num_seqs, 1.0) if norm is not None else 0.0,
        log_ratio_clamp=LOG_RATIO_CLAMP,
    )
