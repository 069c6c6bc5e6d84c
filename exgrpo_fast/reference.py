"""Plain-PyTorch reference of every op: the executable definition of the maths (DESIGN.md section 3).

Tests and benches take these functions as the truth; exgrpo_fast.ops exposes the same names backed by Triton.
Nothing here imports triton, and nothing here is tuned for speed: clarity beats memory.

Shapes: T packed tokens, S sequences, P groups, V vocab, H hidden. Token tensors are flat [T]; per-sequence
tensors are [S]; seq_ids[T] maps each token to its sequence; mask[T] marks the tokens that count in the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exgrpo_fast.loss_spec import (  # noqa: F401  (re-exported: reference.LossConfig etc. keep working)
    IGNORE_INDEX,
    KL_ESTIMATORS,
    LOG_RATIO_CLAMP,
    LOSS_AGGS,
    LOSS_TYPES,
    RATIO_LEVELS,
    STAT_NAMES,
    LossConfig,
    LossNorm,
)

ADV_SCALES = ("group", "batch", "none")


# ----------------------------------------------------------------------------------------------------------------
# log-probs


# IGNORE_INDEX (-100, from loss_spec): the label of a token that does not count (Hugging Face's ignore index):
# logp 0, entropy 0, zero gradient.


def live_rows(labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """bool [T]: tokens whose logits are read at all. A token is dead when its label is IGNORE_INDEX (-100) or,
    for the losses, when mask is 0. Dead rows may hold anything (NaN included): they get logp 0, entropy 0 and an
    exact zero gradient."""
    live = labels != IGNORE_INDEX
    if mask is not None:
        live = live & (mask.bool() if mask.dtype == torch.bool else mask != 0)
    return live


def _token_logprobs_rows(
    logits: torch.Tensor, labels: torch.Tensor, live: torch.Tensor, temperature: float, return_entropy: bool
):
    """token_logprobs restricted to the live rows (dead rows: 0, and never part of any arithmetic that could put
    their NaN into a gradient: the row is replaced by zeros before the softmax)."""
    x = logits.float() / temperature
    zero = torch.zeros((), dtype=torch.float32, device=logits.device)
    x = torch.where(live.unsqueeze(-1), x, zero)  # where, not multiply: NaN * 0 would stay NaN
    logprobs = torch.log_softmax(x, dim=-1)  # (T, V)
    safe_labels = torch.where(live, labels.long(), torch.zeros_like(labels, dtype=torch.long))
    logp = torch.where(live, logprobs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1), zero)  # (T,)
    if not return_entropy:
        return logp
    p = logprobs.exp()
    # 0 * log 0 = 0: a vocab-masked (-inf) entry has p = 0 and contributes nothing, to the value or the gradient
    plogp = p * torch.where(p > 0, logprobs, zero)
    entropy = torch.where(live, -plogp.sum(-1), zero)
    return logp, entropy


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False
):
    """logp[t] = log_softmax(logits[t].float() / temperature)[labels[t]], fp32 [T]; optionally the entropy of the
    same tempered distribution, fp32 [T], with 0 * log 0 = 0 (vocab-masked -inf logits give a finite entropy and
    finite, exact gradients). Differentiable w.r.t. logits.

    labels[t] == -100 (IGNORE_INDEX) marks a token that does not count: logp 0, entropy 0, zero gradient, and its
    row of logits is never used (it may hold NaN)."""
    return _token_logprobs_rows(logits, labels, live_rows(labels), temperature, return_entropy)


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The LM head: logits[T, V] = hidden[T, H] @ weight[V, H]^T (+ bias), in the inputs' dtype."""
    return F.linear(hidden, weight, bias)


def token_logprobs_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """token_logprobs of the LM head's logits (materialised here; the fused ops never do). Rows whose label is -100
    are masked: logp (and entropy) 0 there, an exact zero gradient, and whatever those hidden rows hold (NaN
    included) never reaches another output."""
    valid = labels != IGNORE_INDEX
    return _linear_logprobs_valid(hidden, weight, labels, valid, bias, temperature, return_entropy)


def _linear_logprobs_valid(hidden, weight, labels, valid, bias, temperature, return_entropy):
    """token_logprobs_linear on the rows where valid is set; the other rows' hidden states are replaced by 0 before
    the GEMM (so NaN there cannot leak through 0 * NaN), and their outputs are 0."""
    h = torch.where(valid[:, None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    safe_labels = torch.where(valid, labels.long(), 0)
    logp, entropy = token_logprobs(linear_logits(h, weight, bias), safe_labels, temperature=temperature,
                                   return_entropy=True)  # fmt: skip
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
    logp, entropy = torch.where(valid, logp, zero), torch.where(valid, entropy, zero)
    return (logp, entropy) if return_entropy else logp


# ----------------------------------------------------------------------------------------------------------------
# advantages


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    scale: str = "group",
    eps: float = 1e-6,
    nan_to_zero: bool = False,
) -> torch.Tensor:
    """GRPO advantages, fp32 [S].

    "group": (r - mean_g) / (std_g + eps), std with Bessel's correction; "batch": (r - mean_g) / (std over all S + eps);
    "none": r - mean_g (Dr. GRPO). A group of size 1 gets 0. A NaN reward raises unless nan_to_zero, in which case its
    advantage is 0 and it is left out of its group's statistics (and of the batch std).
    """
    if scale not in ADV_SCALES:
        raise ValueError(f"scale={scale!r}: expected one of {ADV_SCALES}")
    r = rewards.float()
    valid = ~torch.isnan(r)
    if not nan_to_zero and not bool(valid.all()):
        raise ValueError("rewards contain NaN; pass nan_to_zero=True to give those samples advantage 0")
    gid = group_ids.long()
    num_groups = int(gid.max()) + 1 if gid.numel() else 0
    vf = valid.float()
    r0 = torch.where(valid, r, torch.zeros_like(r))
    count = torch.zeros(num_groups, dtype=torch.float32, device=r.device).index_add_(0, gid, vf)
    total = torch.zeros(num_groups, dtype=torch.float32, device=r.device).index_add_(0, gid, r0)
    mean = total / count.clamp_min(1.0)
    dev = torch.where(valid, r - mean[gid], torch.zeros_like(r))
    if scale == "group":
        var = torch.zeros(num_groups, dtype=torch.float32, device=r.device).index_add_(0, gid, dev * dev)
        std = (var / (count - 1.0).clamp_min(1.0)).sqrt()
        adv = dev / (std[gid] + eps)
    elif scale == "batch":
        n = vf.sum()
        batch_mean = r0.sum() / n.clamp_min(1.0)
        centred = torch.where(valid, r - batch_mean, torch.zeros_like(r))
        std = ((centred * centred).sum() / (n - 1.0).clamp_min(1.0)).sqrt()
        adv = dev / (std + eps)
    else:
        adv = dev
    keep = valid & (count[gid] > 1.0)
    return torch.where(keep, adv, torch.zeros_like(adv))


# ----------------------------------------------------------------------------------------------------------------
# policy loss


def kl_estimate(d: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || other) from d = logp - other_logp."""
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        d = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.exp(-d) + d - 1.0
    if estimator == "abs":
        return d.abs()
    raise ValueError(f"kl_estimator={estimator!r}: expected one of {KL_ESTIMATORS}")


def _segment_sum(values: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    return torch.zeros(num_seqs, dtype=values.dtype, device=values.device).index_add(0, seq_ids, values)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    seq_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    teacher_logp: torch.Tensor | None = None,
    cfg: LossConfig | None = None,
    norm: LossNorm | None = None,
):
    """Clipped policy loss with KL to the reference and the teacher. Returns (loss 0-dim, stats dict of 0-dim).

    Differentiable w.r.t. logp. Tokens where mask is 0 contribute nothing (their inputs are zeroed before any exp).
    old_logp=None means on-policy: old = logp detached (ratio 1, the gradient of the ratio still flows).
    norm: the whole optimizer step's normaliser (masked tokens, live sequences, max length); with it this batch's
    loss is its share of the step loss. None = this batch's own, as if it were the whole step.
    """
    cfg = cfg if cfg is not None else LossConfig()
    if old_logp is None:
        old_logp = logp.detach()
    if cfg.kl_beta > 0 and ref_logp is None:
        raise ValueError("cfg.kl_beta > 0 needs ref_logp")
    if cfg.teacher_beta > 0 and teacher_logp is None:
        raise ValueError("cfg.teacher_beta > 0 needs teacher_logp")
    m = mask.bool() if mask.dtype == torch.bool else mask != 0
    mf = m.float()
    seq_ids = seq_ids.long()
    num_seqs = advantages.shape[0]
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)

    def masked(x: torch.Tensor) -> torch.Tensor:
        return torch.where(m, x.float(), zero)

    logp = masked(logp)
    old = masked(old_logp)
    adv = advantages.float()[seq_ids]  # (T,)
    count = _segment_sum(mf, seq_ids, num_seqs)  # (S,) masked tokens per sequence
    num_tokens = mf.sum()

    # ---- importance ratio
    log_ratio = logp - old
    if cfg.ratio_level == "sequence":
        seq_log_ratio = _segment_sum(log_ratio, seq_ids, num_seqs) / count.clamp_min(1.0)
        log_ratio = seq_log_ratio[seq_ids]
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))

    # ---- surrogate
    if cfg.loss_type == "ppo":
        unclipped = ratio if cfg.delta is None else ratio.clamp(max=cfg.delta)
        clipped = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
        per_token = torch.maximum(-adv * unclipped, -adv * clipped)
        if cfg.dual_clip_c is not None:
            per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * cfg.dual_clip_c), per_token)
        is_low = (ratio < 1.0 - cfg.clip_low) & (adv < 0)
        is_high = (ratio > 1.0 + cfg.clip_high) & (adv > 0)
    else:  # cispo
        weight = ratio.clamp(max=1.0 + cfg.clip_high).detach()
        per_token = -weight * adv * logp
        is_low = torch.zeros_like(m)
        is_high = ratio > 1.0 + cfg.clip_high

    # ---- KL terms
    stats_kl_ref = zero
    stats_kl_teacher = zero
    if ref_logp is not None:
        kl_ref = kl_estimate(logp - masked(ref_logp), cfg.kl_estimator)
        per_token = per_token + cfg.kl_beta * kl_ref
        stats_kl_ref = (kl_ref * mf).sum().detach() / num_tokens.clamp_min(1.0)
    if teacher_logp is not None:
        kl_teacher = kl_estimate(logp - masked(teacher_logp), cfg.kl_estimator)
        per_token = per_token + cfg.teacher_beta * kl_teacher
        stats_kl_teacher = (kl_teacher * mf).sum().detach() / num_tokens.clamp_min(1.0)
    per_token = per_token * mf

    # ---- aggregation
    has_tokens = (count > 0).float()
    num_live = has_tokens.sum().clamp_min(1.0)
    num_norm_tokens = num_tokens.clamp_min(1.0)
    if norm is not None:
        num_live = torch.tensor(max(norm.num_seqs, 1.0), dtype=torch.float32, device=logp.device)
        num_norm_tokens = torch.tensor(max(norm.num_tokens, 1.0), dtype=torch.float32, device=logp.device)
    if cfg.loss_agg == "token-mean":
        loss = per_token.sum() / num_norm_tokens
    elif cfg.loss_agg == "seq-mean-token-mean":
        loss = (_segment_sum(per_token, seq_ids, num_seqs) / count.clamp_min(1.0)).sum() / num_live
    elif cfg.loss_agg == "seq-mean-token-sum":
        loss = _segment_sum(per_token, seq_ids, num_seqs).sum() / num_live
    else:  # seq-mean-token-sum-norm
        if cfg.max_len is not None:
            max_len = float(cfg.max_len)
        elif norm is not None:
            max_len = max(norm.max_len, 1.0)
        else:
            max_len = count.max().clamp_min(1.0)
        loss = per_token.sum() / (num_live * max_len)

    # ---- stats (0-dim tensors, no host sync)
    ratio_d = ratio.detach()
    denom = num_tokens.clamp_min(1.0)
    stats = {
        "clip_frac_low": (is_low & m).float().sum() / denom,
        "clip_frac_high": (is_high & m).float().sum() / denom,
        "ratio_mean": (ratio_d * mf).sum() / denom,
        "ratio_max": torch.where(m, ratio_d, zero).max() if m.numel() else zero,
        "kl_ref": stats_kl_ref,
        "kl_teacher": stats_kl_teacher,
    }
    return loss, stats


def fused_policy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    seq_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    teacher_logp: torch.Tensor | None = None,
    temperature: float = 1.0,
    cfg: LossConfig | None = None,
    norm: LossNorm | None = None,
):
    """token_logprobs then policy_loss; stats also hold the masked mean entropy. Grads w.r.t. logits.

    Tokens with mask 0 or label -100 (IGNORE_INDEX) are masked: they contribute nothing, their gradient is exactly
    zero and their logits are never used (prompt and padding rows may hold NaN or garbage)."""
    live = live_rows(labels, mask)
    logp, entropy = _token_logprobs_rows(logits, labels, live, temperature, True)
    loss, stats = policy_loss(
        logp, old_logp, advantages, seq_ids, live, ref_logp=ref_logp, teacher_logp=teacher_logp, cfg=cfg, norm=norm
    )
    stats["entropy"] = masked_mean(entropy.detach(), live)
    return loss, stats


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    seq_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    teacher_logp: torch.Tensor | None = None,
    temperature: float = 1.0,
    cfg: LossConfig | None = None,
    norm: LossNorm | None = None,
):
    """policy_loss on the LM head's log-probs; stats also hold the masked mean entropy. Grads w.r.t. hidden, weight
    (and bias). Tokens with label -100 are masked; masked rows of hidden are never used (exact zero gradient).
    old_logp=None means on-policy (ratio 1)."""
    valid = (mask != 0) & (labels != IGNORE_INDEX)
    logp, entropy = _linear_logprobs_valid(hidden, weight, labels, valid, bias, temperature, True)
    loss, stats = policy_loss(
        logp, old_logp, advantages, seq_ids, valid, ref_logp=ref_logp, teacher_logp=teacher_logp, cfg=cfg, norm=norm
    )
    stats["entropy"] = masked_mean(entropy.detach(), valid)
    return loss, stats


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over tokens where mask is set (0 when none), fp32 0-dim."""
    m = (mask.bool() if mask.dtype == torch.bool else mask != 0).float()
    return (x.float() * m).sum() / m.sum().clamp_min(1.0)
