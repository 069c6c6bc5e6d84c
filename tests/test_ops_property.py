"""Property-style parity: seeded random draws of everything real training can hand the ops, every output and
gradient compared with exgrpo_fast.reference.

Each case draws: shapes (V not a multiple of any block, T = 1, sequences and groups of one), the logits layout
(contiguous, transposed view, strided leaf, a view with row gaps), strided labels/mask/seq_ids, vocab-masked (-inf)
entries, NaN in rows the loss masks out, -100 labels, a temperature, a dtype (fp32/bf16/fp16) and a LossConfig.
Low precision follows the flash-attention rule: our error against the fp32 reference is at most twice the
low-precision reference's error against it, plus atol. A fixed number of cases per op keeps the file fast under
the interpreter."""

import random

import pytest
import torch

from exgrpo_fast import ops
from exgrpo_fast import reference as R
from exgrpo_fast.reference import LossConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = (torch.float32, torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "transposed", "strided_leaf", "row_gaps")
NUM_CASES = 14


def close_2x(name, got, ref_lowp, ref_fp32, dtype, case):
    got, ref_lowp, ref_fp32 = got.float(), ref_lowp.float(), ref_fp32.float()
    assert got.shape == ref_fp32.shape, (name, case)
    finite = torch.isfinite(ref_fp32)
    assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite pattern differs ({case})"
    err = (got - ref_fp32)[finite].abs()
    allowed = 2 * (ref_lowp - ref_fp32)[finite].abs().max().item() if finite.any() else 0.0
    allowed += ATOL[dtype] * (1.0 + ref_fp32[finite].abs().max().item() if finite.any() else 1.0)
    worst = err.max().item() if err.numel() else 0.0
    assert worst <= allowed, f"{name}: max err {worst:.3e} > allowed {allowed:.3e} ({case})"


def strided(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The same values, maybe as a stride-2 view of a larger buffer."""
    if rng.random() < 0.5:
        return x
    wide = torch.empty(2 * x.shape[0], dtype=x.dtype, device=x.device)
    wide[::2] = x
    return wide[::2]


def make_logits(values: torch.Tensor, layout: str):
    """(leaf that receives .grad, [T, V] view passed to the op, function leaf.grad -> grad of the view)."""
    T, V = values.shape
    if layout == "contiguous":
        leaf = values.clone().requires_grad_()
        return leaf, leaf, lambda g: g
    if layout == "transposed":
        leaf = values.t().contiguous().requires_grad_()
        return leaf, leaf.t(), lambda g: g.t()
    if layout == "strided_leaf":
        wide = torch.zeros(T, 2 * V, dtype=values.dtype, device=values.device)
        wide[:, ::2] = values
        leaf = wide[:, ::2].requires_grad_()
        return leaf, leaf, lambda g: g
    wide = torch.zeros(2 * T, V + 3, dtype=values.dtype, device=values.device)
    wide[::2, 1 : V + 1] = values
    leaf = wide.requires_grad_()
    return leaf, leaf[::2, 1 : V + 1], lambda g: g[::2, 1 : V + 1]


def draw_token_case(rng: random.Random):
    T = rng.choice([1, 2, 5, 9, 16])
    V = rng.choice([1, 7, 97, 255, 257, 333, 600])
    dtype = rng.choice(DTYPES)
    logits = torch.randn(T, V, device=DEVICE) * rng.choice([1.0, 4.0])
    labels = torch.randint(0, V, (T,), device=DEVICE)
    if V > 1 and rng.random() < 0.6:  # vocab-masked entries, never the label
        banned = torch.rand(T, V, device=DEVICE) < rng.choice([0.2, 0.7])
        banned[torch.arange(T), labels] = False
        logits = logits.masked_fill(banned, float("-inf"))
    ignored = torch.rand(T, device=DEVICE) < rng.choice([0.0, 0.3])
    labels = labels.masked_fill(ignored, -100)
    logits[ignored] = float("nan")  # ignored rows hold garbage
    case = dict(
        T=T,
        V=V,
        dtype=dtype,
        layout=rng.choice(LAYOUTS),
        temperature=rng.choice([0.5, 0.9, 1.0, 1.3]),
        ignored=int(ignored.sum()),
    )
    return logits, labels, case


@pytest.mark.parametrize("seed", range(NUM_CASES))
def test_token_logprobs_property(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    logits, labels, case = draw_token_case(rng)
    dtype, temperature, T = case["dtype"], case["temperature"], case["T"]
    values = logits.to(dtype)
    labels_in = strided(labels, rng)
    g, ge = torch.randn(T, device=DEVICE), torch.randn(T, device=DEVICE) * rng.choice([0.0, 1.0])
    use_entropy = rng.random() < 0.7
    case["entropy"] = use_entropy

    def run(fn, vals, layout):
        leaf, view, grad_of = make_logits(vals, layout)
        logp, ent = fn(view, labels_in, temperature=temperature, return_entropy=True)
        loss = (logp * g).sum() + ((ent * ge).sum() if use_entropy else 0.0)
        loss.backward()
        return logp.detach(), ent.detach(), grad_of(leaf.grad)

    ours = run(ops.token_logprobs, values, case["layout"])
    ref_lowp = run(R.token_logprobs, values, "contiguous")
    ref_fp32 = run(R.token_logprobs, values.float(), "contiguous")
    for name, a, b, c in zip(("logp", "entropy", "dlogits"), ours, ref_lowp, ref_fp32):
        close_2x(name, a, b, c, dtype, case)
    dead = labels == -100
    assert torch.count_nonzero(ours[2][dead]) == 0 and torch.count_nonzero(ours[0][dead]) == 0


def draw_cfg(rng: random.Random) -> LossConfig:
    clip_high = rng.choice([0.2, 0.28, 0.4])
    return LossConfig(
        loss_type=rng.choice(R.LOSS_TYPES),
        ratio_level=rng.choice(R.RATIO_LEVELS),
        clip_low=rng.choice([0.1, 0.2]),
        clip_high=clip_high,
        dual_clip_c=rng.choice([None, 3.0]),
        delta=rng.choice([None, 1.0 + clip_high + 0.5]),
        kl_estimator=rng.choice(R.KL_ESTIMATORS),
        kl_beta=rng.choice([0.0, 0.05]),
        teacher_beta=rng.choice([0.0, 0.1]),
        loss_agg=rng.choice(R.LOSS_AGGS),
        max_len=rng.choice([None, None, 7]),
    )


def draw_loss_batch(rng: random.Random, T: int, S: int):
    seq_ids = torch.sort(torch.randint(0, S, (T,), device=DEVICE)).values
    seq_ids[0] = 0
    mask = torch.rand(T, device=DEVICE) < rng.choice([0.5, 0.8, 1.0])
    advantages = torch.randn(S, device=DEVICE)
    return seq_ids, mask, advantages


@pytest.mark.parametrize("seed", range(NUM_CASES))
def test_fused_policy_loss_property(seed):
    rng = random.Random(1000 + seed)
    torch.manual_seed(1000 + seed)
    T = rng.choice([1, 3, 11, 24])
    V = rng.choice([5, 97, 257, 400])
    S = rng.choice([1, 2, 5])
    dtype = rng.choice(DTYPES)
    temperature = rng.choice([0.7, 1.0, 1.2])
    cfg = draw_cfg(rng)
    layout = rng.choice(LAYOUTS)
    logits = torch.randn(T, V, device=DEVICE) * 3
    labels = torch.randint(0, V, (T,), device=DEVICE)
    seq_ids, mask, adv = draw_loss_batch(rng, T, S)
    if rng.random() < 0.5:
        banned = torch.rand(T, V, device=DEVICE) < 0.4
        banned[torch.arange(T), labels] = False
        logits = logits.masked_fill(banned, float("-inf"))
    base = R.token_logprobs(logits, labels, temperature=temperature)
    old = base + 0.3 * torch.randn(T, device=DEVICE)
    ref = base + 0.2 * torch.randn(T, device=DEVICE)
    teacher = base + 0.3 * torch.randn(T, device=DEVICE)
    ignored = torch.rand(T, device=DEVICE) < rng.choice([0.0, 0.2])
    labels = labels.masked_fill(ignored, -100)
    dead = ignored | ~mask
    logits[dead] = float("nan")  # prompt/padding rows hold garbage
    old[dead], ref[dead], teacher[dead] = float("nan"), float("inf"), float("nan")
    values = logits.to(dtype)
    case = dict(T=T, V=V, S=S, dtype=dtype, layout=layout, temperature=temperature, cfg=cfg, dead=int(dead.sum()))
    labels_in, mask_in, seq_in = strided(labels, rng), strided(mask, rng), strided(seq_ids, rng)
    kw = dict(
        ref_logp=ref if cfg.kl_beta > 0 or rng.random() < 0.5 else None,
        teacher_logp=teacher if cfg.teacher_beta > 0 else None,
        temperature=temperature,
        cfg=cfg,
    )

    def run(fn, vals, layout):
        leaf, view, grad_of = make_logits(vals, layout)
        loss, stats = fn(view, labels_in, old, adv, seq_in, mask_in, **kw)
        (loss * 1.3).backward()
        return loss.detach(), {k: v.detach() for k, v in stats.items()}, grad_of(leaf.grad)

    ours = run(ops.fused_policy_loss, values, layout)
    ref_lowp = run(R.fused_policy_loss, values, "contiguous")
    ref_fp32 = run(R.fused_policy_loss, values.float(), "contiguous")
    assert set(ours[1]) == set(ref_fp32[1])
    close_2x("loss", ours[0], ref_lowp[0], ref_fp32[0], dtype, case)
    for k in ours[1]:
        close_2x(k, ours[1][k], ref_lowp[1][k], ref_fp32[1][k], dtype, case)
    close_2x("dlogits", ours[2], ref_lowp[2], ref_fp32[2], dtype, case)
    assert torch.count_nonzero(ours[2][dead]) == 0


@pytest.mark.parametrize("seed", range(NUM_CASES))
def test_policy_loss_property(seed):
    rng = random.Random(2000 + seed)
    torch.manual_seed(2000 + seed)
    T, S = rng.choice([1, 4, 33, 130]), rng.choice([1, 3, 9])
    cfg = draw_cfg(rng)
    seq_ids, mask, adv = draw_loss_batch(rng, T, S)
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
    logp = (-torch.rand(T, device=DEVICE) * 5).to(dtype)
    old = logp.float() + 0.3 * torch.randn(T, device=DEVICE)
    ref = logp.float() + 0.2 * torch.randn(T, device=DEVICE)
    teacher = logp.float() + 0.3 * torch.randn(T, device=DEVICE)
    old[~mask], ref[~mask], teacher[~mask] = float("nan"), float("-inf"), float("nan")
    kw = dict(ref_logp=ref if cfg.kl_beta > 0 else None, teacher_logp=teacher, cfg=cfg)
    mask_in, seq_in = strided(mask, rng), strided(seq_ids, rng)
    case = dict(T=T, S=S, dtype=dtype, cfg=cfg)

    def run(fn):
        x = logp.clone().requires_grad_()
        loss, stats = fn(x, old, adv, seq_in, mask_in, **kw)
        (loss * 0.7).backward()
        return loss.detach(), stats, x.grad

    ours, want = run(ops.policy_loss), run(R.policy_loss)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours[0], want[0], atol=tol, rtol=tol, msg=str(case))
    for k in want[1]:
        torch.testing.assert_close(ours[1][k].float(), want[1][k].float(), atol=tol, rtol=tol, msg=f"{k} {case}")
    torch.testing.assert_close(ours[2].float(), want[2].float(), atol=tol, rtol=tol, msg=str(case))


@pytest.mark.parametrize("seed", range(NUM_CASES))
def test_group_advantages_property(seed):
    rng = random.Random(3000 + seed)
    torch.manual_seed(3000 + seed)
    S = rng.choice([1, 2, 7, 40])
    num_groups = rng.choice([1, max(1, S // 2), S])  # S groups: every group has one member
    group_ids = torch.randint(0, num_groups, (S,), device=DEVICE).to(rng.choice([torch.int64, torch.int32]))
    rewards = torch.rand(S, device=DEVICE).round(decimals=1)
    nan = torch.rand(S, device=DEVICE) < rng.choice([0.0, 0.2])
    rewards[nan] = float("nan")
    rewards = strided(rewards.to(rng.choice([torch.float32, torch.bfloat16])), rng)
    scale, eps = rng.choice(R.ADV_SCALES), rng.choice([1e-6, 1e-4])
    if nan.any():
        with pytest.raises(ValueError, match="rewards contain NaN"):
            ops.group_advantages(rewards, group_ids, scale=scale, eps=eps)
    got = ops.group_advantages(rewards, group_ids, scale=scale, eps=eps, nan_to_zero=True)
    want = R.group_advantages(rewards, group_ids, scale=scale, eps=eps, nan_to_zero=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"S={S} groups={num_groups} scale={scale}")
