"""The O(T) loss head of the clipped policy loss, and GRPO group advantages.

Everything loss-specific lives here; the O(T*V) log-prob kernels only need g_t = dL/dlogp_t from it. The options
arrive as plain numbers (`HeadParams`; exgrpo_fast.loss_spec.kernel_args builds them): nothing here imports
exgrpo_fast.

Per masked token t of sequence s (logp, old, ref, teacher zeroed where mask is 0 before any exp):
    lr_t  = logp_t - old_t                       (token)   or  mean_{u in s} (logp_u - old_u)   (sequence, GSPO)
    r     = exp(clamp(lr, -20, 20))
    ppo   : pg = max(-A min(r, delta), -A clip(r, 1-clip_low, 1+clip_high)), capped at -A c for A < 0 (dual clip)
    cispo : pg = -sg(min(r, 1+clip_high)) A logp_t
    loss  = sum_t w_s(t) (pg_t + kl_beta k(logp_t - ref_t) + teacher_beta k(logp_t - teacher_t))
with the aggregation weight w_s: token-mean 1/N, seq-mean-token-mean 1/(n_s L), seq-mean-token-sum 1/L,
seq-mean-token-sum-norm 1/(L max_len); N masked tokens, n_s masked tokens of s, L sequences with n_s > 0. N, L
and max_len are this batch's own unless the caller passes the whole optimizer step's (norm_tokens, norm_seqs,
max_len > 0): then the loss of a micro-batch is its share of the step loss.

Gradient: for GSPO every masked token of s shares r_s and A_s, so pg is the same for all of them and
dL/dlogp_t = w_s * dpg/dr * r_s (the n_s tokens each contribute 1/n_s of d lr_s / d logp_t); no extra pass needed.

Phases (callable one by one, so the chunked LM-head loss can run the token pass chunk by chunk inside its GEMM loop;
`loss_head` composes them). All deterministic: no float atomics; partials are combined in a fixed order.
    a. seq_phase:   _seq_stats_kernel, grid (S,): masked count n_s (and the mean log-ratio of s for GSPO, when
                    logp is known); _seq_weights_kernel, grid (1,): N, L, the largest n_s, w_s for every sequence.
    b. token_phase: _token_kernel, grid (cdiv(n, BLOCK),) over any slice of the tokens: per-token loss terms and
                    g_t; one column of per-block partial sums (rows in ROWS order) per block.
    c. finalize:    _finalize_kernel, grid (1,): folds all partial columns into the loss and stats, in column order.
Bytes: a reads S*T*(seq_id + mask) (L2-resident; negligible next to the O(T*V) log-prob pass); b reads ~5 T floats
+ T ids + T mask bytes and writes T fp32 (g) + 7 floats per block; c touches O(S + T/BLOCK).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# The partial-sum rows, in order: the one definition (the kernels below index them by these names, and callers get
# a dict keyed by them).
ROWS = ("loss", "clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_max", "kl_ref", "kl_teacher")
_ROW_LOSS = tl.constexpr(ROWS.index("loss"))
_ROW_CLIP_LOW = tl.constexpr(ROWS.index("clip_frac_low"))
_ROW_CLIP_HIGH = tl.constexpr(ROWS.index("clip_frac_high"))
_ROW_RATIO_SUM = tl.constexpr(ROWS.index("ratio_mean"))
_ROW_RATIO_MAX = tl.constexpr(ROWS.index("ratio_max"))
_ROW_KL_REF = tl.constexpr(ROWS.index("kl_ref"))
_ROW_KL_TEACHER = tl.constexpr(ROWS.index("kl_teacher"))
_NUM_ROWS = tl.constexpr(len(ROWS))


class HeadParams(NamedTuple):
    """The loss options as plain numbers (exgrpo_fast.loss_spec.kernel_args)."""

    cispo: bool
    seq_ratio: bool
    clip_low: float
    clip_high: float
    dual_clip_c: float  # 0 = off
    delta: float  # 0 = off
    kl_estimator: int  # 0 k1, 1 k2, 2 k3, 3 abs
    kl_beta: float
    teacher_beta: float
    loss_agg: int  # 0 token-mean, 1 seq-mean-token-mean, 2 seq-mean-token-sum, 3 seq-mean-token-sum-norm
    max_len: float  # 0 = the largest masked count in this batch
    norm_tokens: float  # 0 = this batch's masked tokens
    norm_seqs: float  # 0 = this batch's sequences with a masked token
    log_ratio_clamp: float


class SeqPhase(NamedTuple):
    """Phase a's per-sequence results: masked counts, aggregation weights, GSPO mean log-ratios (0 when unknown)."""

    count: torch.Tensor
    weight: torch.Tensor
    seq_log_ratio: torch.Tensor


@triton.jit
def _kl_value_grad(d, KL_ESTIMATOR: tl.constexpr, CLAMP: tl.constexpr):
    """Estimator of KL(pi || other) from d = logp - other, and its derivative w.r.t. logp."""
    if KL_ESTIMATOR == 0:  # k1
        value = d
        grad = tl.full(d.shape, 1.0, tl.float32)
    elif KL_ESTIMATOR == 1:  # k2
        value = 0.5 * d * d
        grad = d
    elif KL_ESTIMATOR == 2:  # k3, clamped like every log-ratio before exp
        dc = tl.minimum(tl.maximum(d, -CLAMP), CLAMP)
        e = tl.exp(-dc)
        value = e + dc - 1.0
        grad = tl.where((d >= -CLAMP) & (d <= CLAMP), 1.0 - e, 0.0)
    else:  # abs
        value = tl.abs(d)
        grad = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    return value, grad


@triton.jit
def _seq_stats_kernel(
    # pointers
    logp_ptr,
    old_ptr,
    seq_ids_ptr,
    mask_ptr,
    count_ptr,
    seq_log_ratio_ptr,
    # sizes
    T,
    # constants
    WITH_LOG_RATIO: tl.constexpr,
    BLOCK: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    count = tl.zeros((BLOCK,), tl.float32)
    total = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, T, BLOCK):
        idx = start + offs.to(tl.int64)
        inb = idx < T
        sel = inb & (tl.load(seq_ids_ptr + idx, mask=inb, other=-1).to(tl.int64) == s)
        sel = sel & (tl.load(mask_ptr + idx, mask=inb, other=0) != 0)
        count += sel.to(tl.float32)
        if WITH_LOG_RATIO:
            lp = tl.load(logp_ptr + idx, mask=sel, other=0.0).to(tl.float32)
            old = tl.load(old_ptr + idx, mask=sel, other=0.0).to(tl.float32)
            total += tl.where(sel, lp - old, 0.0)
    n = tl.sum(count, 0)
    tl.store(count_ptr + s, n)
    tl.store(seq_log_ratio_ptr + s, tl.sum(total, 0) / tl.maximum(n, 1.0))


@triton.jit
def _seq_weights_kernel(
    # pointers
    count_ptr,  # [S] masked tokens per sequence
    weight_ptr,  # [S] out: aggregation weight w_s
    # sizes
    S,
    # scalars: the step's normaliser; <= 0 means this batch's own
    max_len,  # normaliser of seq-mean-token-sum-norm
    norm_tokens,  # N
    norm_seqs,  # L
    # constants
    AGG: tl.constexpr,  # 0 token-mean, 1 seq-mean-token-mean, 2 seq-mean-token-sum, 3 seq-mean-token-sum-norm
    BLOCK: tl.constexpr,
):
    """One program: N, L and the largest count over the [S] counts, then w_s for every sequence."""
    offs = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), tl.float32)
    live = tl.zeros((BLOCK,), tl.float32)
    longest = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, S, BLOCK):
        idx = start + offs
        n = tl.load(count_ptr + idx, mask=idx < S, other=0.0)
        total += n
        live += (n > 0).to(tl.float32)
        longest = tl.maximum(longest, n)
    num_tokens = tl.maximum(tl.sum(total, 0), 1.0)
    num_live = tl.maximum(tl.sum(live, 0), 1.0)
    if norm_tokens > 0.0:
        num_tokens = norm_tokens
    if norm_seqs > 0.0:
        num_live = norm_seqs
    if max_len <= 0.0:
        max_len = tl.maximum(tl.max(longest, 0), 1.0)
    for start in range(0, S, BLOCK):
        idx = start + offs
        n = tl.load(count_ptr + idx, mask=idx < S, other=0.0)
        if AGG == 0:
            w = tl.full((BLOCK,), 1.0, tl.float32) / num_tokens
        elif AGG == 1:
            w = 1.0 / (tl.maximum(n, 1.0) * num_live)
        elif AGG == 2:
            w = tl.full((BLOCK,), 1.0, tl.float32) / num_live
        else:
            w = tl.full((BLOCK,), 1.0, tl.float32) / (num_live * max_len)
        tl.store(weight_ptr + idx, w, mask=idx < S)


@triton.jit
def _token_kernel(
    # pointers: per-token inputs
    logp_ptr,
    old_ptr,
    ref_ptr,
    teacher_ptr,
    seq_ids_ptr,
    mask_ptr,
    # pointers: per-sequence inputs
    adv_ptr,
    seq_log_ratio_ptr,  # mean log-ratio of each sequence (used when SEQ_RATIO)
    weight_ptr,  # aggregation weight w_s of each sequence
    # pointers: outputs
    grad_ptr,  # g_t = dL/dlogp_t, fp32 [T]
    partials_ptr,  # [NUM_ROWS, >= num_blocks], this launch's first column
    # sizes, strides
    T,
    stride_partials,
    # scalars
    clip_low,
    clip_high,
    dual_clip_c,
    delta,
    kl_beta,
    teacher_beta,
    # constants
    CISPO: tl.constexpr,
    SEQ_RATIO: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_TEACHER: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr,
    CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < T
    m = inb & (tl.load(mask_ptr + idx, mask=inb, other=0) != 0)
    # ---- inputs, zeroed where the mask is off (before any exp)
    logp = tl.load(logp_ptr + idx, mask=m, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + idx, mask=m, other=0.0).to(tl.float32)
    seq = tl.load(seq_ids_ptr + idx, mask=inb, other=0).to(tl.int64)
    adv = tl.load(adv_ptr + seq, mask=m, other=0.0).to(tl.float32)
    w = tl.load(weight_ptr + seq, mask=m, other=0.0)
    if SEQ_RATIO:
        log_ratio = tl.load(seq_log_ratio_ptr + seq, mask=m, other=0.0)
    else:
        log_ratio = logp - old
    in_range = (log_ratio >= -CLAMP) & (log_ratio <= CLAMP)
    ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -CLAMP), CLAMP))

    # ---- surrogate and its derivative
    hi = 1.0 + clip_high
    if CISPO:
        trunc = tl.minimum(ratio, hi)
        pg = -trunc * adv * logp
        grad = -trunc * adv  # the IS weight is stop-gradient
        is_low = tl.zeros((BLOCK,), tl.int1)
        is_high = ratio > hi
    else:
        lo = 1.0 - clip_low
        unclipped = ratio
        d_unclipped = tl.full((BLOCK,), 1.0, tl.float32)
        if HAS_DELTA:
            unclipped = tl.minimum(ratio, delta)
            d_unclipped = tl.where(ratio <= delta, 1.0, 0.0)
        clipped = tl.minimum(tl.maximum(ratio, lo), hi)
        d_clipped = tl.where((ratio >= lo) & (ratio <= hi), 1.0, 0.0)
        l1 = -adv * unclipped
        l2 = -adv * clipped
        pg = tl.maximum(l1, l2)
        # torch.maximum sends half the gradient to each side on a tie
        d_ratio = tl.where(
            l1 > l2, -adv * d_unclipped, tl.where(l1 < l2, -adv * d_clipped, -0.5 * adv * (d_unclipped + d_clipped))
        )
        if DUAL_CLIP:
            cap = -adv * dual_clip_c
            capped = (adv < 0) & (cap < pg)
            tied = (adv < 0) & (cap == pg)
            pg = tl.where(capped, cap, pg)
            d_ratio = tl.where(capped, 0.0, tl.where(tied, 0.5 * d_ratio, d_ratio))
        grad = d_ratio * tl.where(in_range, ratio, 0.0)
        is_low = (ratio < lo) & (adv < 0)
        is_high = (ratio > hi) & (adv > 0)

    # ---- KL to the reference and the teacher
    per_token = pg
    kl_ref = tl.zeros((BLOCK,), tl.float32)
    kl_teacher = tl.zeros((BLOCK,), tl.float32)
    if HAS_REF:
        ref = tl.load(ref_ptr + idx, mask=m, other=0.0).to(tl.float32)
        kl_ref, dkl = _kl_value_grad(logp - ref, KL_ESTIMATOR, CLAMP)
        per_token += kl_beta * kl_ref
        grad += kl_beta * dkl
    if HAS_TEACHER:
        teacher = tl.load(teacher_ptr + idx, mask=m, other=0.0).to(tl.float32)
        kl_teacher, dklt = _kl_value_grad(logp - teacher, KL_ESTIMATOR, CLAMP)
        per_token += teacher_beta * kl_teacher
        grad += teacher_beta * dklt

    tl.store(grad_ptr + idx, tl.where(m, w * grad, 0.0), mask=inb)
    # ---- per-block partials (combined by _finalize_kernel in a fixed order)
    col = partials_ptr + pid
    tl.store(col + _ROW_LOSS * stride_partials, tl.sum(tl.where(m, w * per_token, 0.0), 0))
    tl.store(col + _ROW_CLIP_LOW * stride_partials, tl.sum((is_low & m).to(tl.float32), 0))
    tl.store(col + _ROW_CLIP_HIGH * stride_partials, tl.sum((is_high & m).to(tl.float32), 0))
    tl.store(col + _ROW_RATIO_SUM * stride_partials, tl.sum(tl.where(m, ratio, 0.0), 0))
    tl.store(col + _ROW_RATIO_MAX * stride_partials, tl.max(tl.where(m, ratio, 0.0), 0))
    tl.store(col + _ROW_KL_REF * stride_partials, tl.sum(tl.where(m, kl_ref, 0.0), 0))
    tl.store(col + _ROW_KL_TEACHER * stride_partials, tl.sum(tl.where(m, kl_teacher, 0.0), 0))


@triton.jit
def _finalize_kernel(
    # pointers
    partials_ptr,  # [NUM_ROWS, num_blocks] from _token_kernel
    count_ptr,  # [S] masked tokens per sequence
    out_ptr,  # [NUM_ROWS]: the loss, then the stats, in ROWS order
    # sizes
    num_blocks,
    S,
    # constants
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    n = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, S, BLOCK):
        idx = start + offs
        n += tl.load(count_ptr + idx, mask=idx < S, other=0.0)
    denom = tl.maximum(tl.sum(n, 0), 1.0)
    for row in tl.static_range(_NUM_ROWS):
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, num_blocks, BLOCK):
            idx = start + offs
            x = tl.load(partials_ptr + row * num_blocks + idx, mask=idx < num_blocks, other=0.0)
            if row == _ROW_RATIO_MAX:
                acc = tl.maximum(acc, x)  # ratios are > 0, so 0 is a neutral start
            else:
                acc += x
        if row == _ROW_LOSS:
            tl.store(out_ptr + row, tl.sum(acc, 0))
        elif row == _ROW_RATIO_MAX:
            tl.store(out_ptr + row, tl.max(acc, 0))
        else:
            tl.store(out_ptr + row, tl.sum(acc, 0) / denom)


def _blocks(device: torch.device) -> tuple[int, int]:
    """(BLOCK for the token pass, BLOCK for the per-sequence scan)."""
    return (1024, 2048) if device.type == "cuda" else (64, 256)


def num_partial_blocks(num_tokens: int, device: torch.device) -> int:
    """Columns of partial sums token_phase writes for a slice of num_tokens tokens."""
    return triton.cdiv(num_tokens, _blocks(device)[0])


def _as_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.view(torch.uint8) if mask.dtype == torch.bool else mask).contiguous()


def seq_phase(
    seq_ids: torch.Tensor,
    mask: torch.Tensor,
    num_seqs: int,
    p: HeadParams,
    logp: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
) -> SeqPhase:
    """Phase a: masked counts, aggregation weights and (GSPO, with logp and old_logp given) the mean log-ratio of
    every sequence; without logp the log-ratios are 0 (on-policy)."""
    T, device = seq_ids.shape[0], seq_ids.device
    scan_block = _blocks(device)[1]
    seq_ids, mask = seq_ids.contiguous(), _as_mask(mask)
    with_log_ratio = bool(p.seq_ratio) and logp is not None and old_logp is not None
    count = torch.empty(num_seqs, dtype=torch.float32, device=device)
    seq_log_ratio = torch.empty(num_seqs, dtype=torch.float32, device=device)
    lp = logp.contiguous() if with_log_ratio else count
    old = old_logp.contiguous() if with_log_ratio else count
    _seq_stats_kernel[(num_seqs,)](
        lp, old, seq_ids, mask, count, seq_log_ratio, T, WITH_LOG_RATIO=with_log_ratio, BLOCK=scan_block
    )
    weight = torch.empty(num_seqs, dtype=torch.float32, device=device)
    _seq_weights_kernel[(1,)](
        count, weight, num_seqs, float(p.max_len), float(p.norm_tokens), float(p.norm_seqs),
        AGG=int(p.loss_agg), BLOCK=scan_block,
    )  # fmt: skip
    return SeqPhase(count, weight, seq_log_ratio)


def token_phase(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    seq_ids: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    teacher_logp: torch.Tensor | None,
    seq: SeqPhase,
    p: HeadParams,
    grad_out: torch.Tensor,
    partials_out: torch.Tensor,
) -> None:
    """Phase b on any slice of n tokens (all token tensors are that slice): writes g = dL/dlogp (fp32, [n]) into
    grad_out and num_partial_blocks(n) columns of partial sums into partials_out ([len(ROWS), >= that], unit column
    stride; a column slice of a bigger buffer is fine)."""
    n, device = logp.shape[0], logp.device
    block = _blocks(device)[0]
    assert partials_out.stride(1) == 1 and grad_out.is_contiguous()
    logp, old_logp = logp.contiguous(), old_logp.contiguous()
    _token_kernel[(triton.cdiv(n, block),)](
        logp, old_logp,
        ref_logp.contiguous() if ref_logp is not None else logp,
        teacher_logp.contiguous() if teacher_logp is not None else logp,
        seq_ids.contiguous(), _as_mask(mask),
        advantages.contiguous(), seq.seq_log_ratio, seq.weight,
        grad_out, partials_out,
        n, partials_out.stride(0),
        float(p.clip_low), float(p.clip_high), float(p.dual_clip_c), float(p.delta),
        float(p.kl_beta), float(p.teacher_beta),
        CISPO=bool(p.cispo), SEQ_RATIO=bool(p.seq_ratio),
        DUAL_CLIP=p.dual_clip_c > 0, HAS_DELTA=p.delta > 0,
        HAS_REF=ref_logp is not None, HAS_TEACHER=teacher_logp is not None,
        KL_ESTIMATOR=int(p.kl_estimator), CLAMP=float(p.log_ratio_clamp), BLOCK=block,
    )  # fmt: skip


def finalize(partials: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Phase c: one program folds the [len(ROWS), num_blocks] partials, column by column in order, into the loss
    (0-dim fp32) and the stats (dict keyed by ROWS[1:], 0-dim fp32)."""
    partials = partials.contiguous()
    out = torch.empty(len(ROWS), dtype=torch.float32, device=partials.device)
    _finalize_kernel[(1,)](partials, count, out, partials.shape[1], count.shape[0], BLOCK=_blocks(partials.device)[1])
    values = out.unbind(0)
    return values[ROWS.index("loss")], {name: v for name, v in zip(ROWS, values) if name != "loss"}


def loss_head(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    seq_ids: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    teacher_logp: torch.Tensor | None,
    p: HeadParams,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The three phases on the whole batch. Returns (loss 0-dim fp32, g [T] fp32 = dL/dlogp, stats dict)."""
    T, device = logp.shape[0], logp.device
    seq = seq_phase(seq_ids, mask, advantages.shape[0], p, logp, old_logp)
    grad = torch.empty(T, dtype=torch.float32, device=device)
    partials = torch.empty(len(ROWS), num_partial_blocks(T, device), dtype=torch.float32, device=device)
    token_phase(logp, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, seq, p, grad, partials)
    loss, stats = finalize(partials, seq.count)
    return loss, grad, stats


# ----------------------------------------------------------------------------------------------------------------
# group advantages


@triton.jit
def _group_advantages_kernel(
    # pointers
    rewards_ptr,
    group_ids_ptr,
    adv_ptr,
    batch_std_ptr,
    # sizes
    S,
    # scalars
    eps,
    # constants
    SCALE: tl.constexpr,  # 0 group, 1 batch, 2 none
    BLOCK: tl.constexpr,
):
    """One program per group id g in [0, S): scans the rewards twice (mean, then variance) and writes the
    advantages of the group's members. NaN rewards are excluded from the statistics and get 0."""
    g = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    count = tl.zeros((BLOCK,), tl.float32)
    total = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, S, BLOCK):
        idx = start + offs
        inb = idx < S
        r = tl.load(rewards_ptr + idx, mask=inb, other=0.0).to(tl.float32)
        sel = inb & (tl.load(group_ids_ptr + idx, mask=inb, other=-1).to(tl.int64) == g) & (r == r)
        count += sel.to(tl.float32)
        total += tl.where(sel, r, 0.0)
    n = tl.sum(count, 0)
    mean = tl.sum(total, 0) / tl.maximum(n, 1.0)
    if SCALE == 0:
        sq = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, S, BLOCK):
            idx = start + offs
            inb = idx < S
            r = tl.load(rewards_ptr + idx, mask=inb, other=0.0).to(tl.float32)
            sel = inb & (tl.load(group_ids_ptr + idx, mask=inb, other=-1).to(tl.int64) == g) & (r == r)
            dev = tl.where(sel, r - mean, 0.0)
            sq += dev * dev
        inv = 1.0 / (tl.sqrt(tl.sum(sq, 0) / tl.maximum(n - 1.0, 1.0)) + eps)
    elif SCALE == 1:
        inv = 1.0 / (tl.load(batch_std_ptr) + eps)
    else:
        inv = 1.0
    for start in range(0, S, BLOCK):
        idx = start + offs
        inb = idx < S
        r = tl.load(rewards_ptr + idx, mask=inb, other=0.0).to(tl.float32)
        member = inb & (tl.load(group_ids_ptr + idx, mask=inb, other=-1).to(tl.int64) == g)
        adv = tl.where(r == r, (r - mean) * inv, 0.0)
        tl.store(adv_ptr + idx, adv * (n > 1.0).to(tl.float32), mask=member)


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, scale: str, eps: float) -> torch.Tensor:
    """Launch the advantage kernel (NaN rewards already allowed by the caller). Returns fp32 [S]."""
    S = rewards.shape[0]
    rewards, group_ids = rewards.contiguous(), group_ids.contiguous()
    adv = torch.empty(S, dtype=torch.float32, device=rewards.device)
    batch_std = adv  # dummy pointer unless scale == "batch"
    if scale == "batch":
        r = rewards.float()
        valid = ~torch.isnan(r)
        n = valid.sum().to(torch.float32)
        mean = torch.where(valid, r, 0.0).sum() / n.clamp_min(1.0)
        centred = torch.where(valid, r - mean, 0.0)
        batch_std = ((centred * centred).sum() / (n - 1.0).clamp_min(1.0)).sqrt().reshape(1)
    block = 1024 if rewards.device.type == "cuda" else 64
    _group_advantages_kernel[(S,)](
        rewards, group_ids, adv, batch_std, S, float(eps),
        SCALE={"group": 0, "batch": 1, "none": 2}[scale], BLOCK=block,
    )  # fmt: skip
    return adv
