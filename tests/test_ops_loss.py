"""policy_loss (csrc_triton/loss_head.py) against exgrpo_fast.reference, forward (loss, stats) and backward
(d loss / d logp with a random upstream gradient), through the Triton interpreter on CPU."""

import itertools

import pytest
import torch

from exgrpo_fast import ops
from exgrpo_fast import reference as R
from exgrpo_fast.reference import LossConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_tokens(T, S, dtype=torch.float32, sorted_ids=False, device=DEVICE):
    seq_ids = torch.randint(0, S, (T,), device=device)
    if sorted_ids:
        seq_ids = torch.sort(seq_ids).values
    mask = torch.rand(T, device=device) > 0.25
    mask[seq_ids == 1] = False  # a sequence with tokens but none in the loss
    old = -torch.rand(T, device=device) * 3
    logp = old + 0.5 * torch.randn(T, device=device)
    ref = old + 0.3 * torch.randn(T, device=device)
    teacher = old - 0.3 * torch.randn(T, device=device)
    adv = torch.randn(S, device=device)
    return logp.to(dtype), old.to(dtype), adv, seq_ids, mask, ref.to(dtype), teacher.to(dtype)


def loss_and_grad(fn, logp, old, adv, seq_ids, mask, ref, teacher, cfg):
    x = logp.clone().requires_grad_()
    loss, stats = fn(x, old, adv, seq_ids, mask, ref_logp=ref, teacher_logp=teacher, cfg=cfg)
    upstream = 0.1 + torch.rand((), generator=torch.Generator().manual_seed(7)).item()  # random upstream gradient
    (loss * upstream).backward()
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, x.grad


def check_against_reference(batch, cfg, tol=1e-5):
    loss, stats, grad = loss_and_grad(ops.policy_loss, *batch, cfg)
    loss_r, stats_r, grad_r = loss_and_grad(R.policy_loss, *batch, cfg)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert loss.item() == pytest.approx(loss_r.item(), rel=tol, abs=tol), f"loss {loss.item()} vs {loss_r.item()}"
    for k in R.STAT_NAMES:
        assert stats[k].shape == () and stats[k].device == loss_r.device, k
        assert stats[k].item() == pytest.approx(stats_r[k].item(), rel=tol, abs=tol), f"{k}: {stats[k]} vs {stats_r[k]}"
    err = (grad.float() - grad_r.float()).abs()
    assert err.max().item() <= tol * (1 + grad_r.float().abs().max().item()), (
        f"grad: max err {err.max().item():.3e}, mean {err.mean().item():.3e}, "
        f"first mismatches at {torch.nonzero(err > tol)[:5].flatten().tolist()}"
    )
    assert grad.dtype == batch[0].dtype


GRID = list(itertools.product(("ppo", "cispo"), ("token", "sequence"), R.LOSS_AGGS))


@pytest.mark.parametrize("loss_type, ratio_level, loss_agg", GRID)
def test_policy_loss_grid(loss_type, ratio_level, loss_agg):
    cfg = LossConfig(loss_type=loss_type, ratio_level=ratio_level, loss_agg=loss_agg, kl_beta=0.05, teacher_beta=0.1)
    check_against_reference(make_tokens(61, 7), cfg)


@pytest.mark.parametrize(
    "cfg",
    [
        LossConfig(dual_clip_c=1.5, clip_low=0.1),
        LossConfig(delta=1.4, clip_high=0.28),
        LossConfig(dual_clip_c=3.0, delta=2.0, ratio_level="sequence"),
        LossConfig(loss_agg="seq-mean-token-sum-norm", max_len=40),
    ]
    + [LossConfig(kl_estimator=k, kl_beta=0.2, teacher_beta=0.3) for k in R.KL_ESTIMATORS],
    ids=lambda c: f"dual{c.dual_clip_c}-delta{c.delta}-{c.kl_estimator}-{c.loss_agg}-{c.max_len}",
)
def test_policy_loss_options(cfg):
    check_against_reference(make_tokens(45, 5, sorted_ids=True), cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_policy_loss_half_inputs(dtype):
    # the reference upcasts the same half inputs to fp32, so only fp32 rounding separates the two
    cfg = LossConfig(kl_beta=0.1, teacher_beta=0.1, ratio_level="sequence")
    check_against_reference(make_tokens(33, 4, dtype=dtype), cfg, tol=1e-4)


def test_int_mask_and_int32_seq_ids():
    logp, old, adv, seq_ids, mask, ref, teacher = make_tokens(40, 6)
    check_against_reference(
        (logp, old, adv, seq_ids.int(), mask.to(torch.int64), ref, teacher),
        LossConfig(loss_agg="seq-mean-token-mean", kl_beta=0.1),
    )


def test_huge_log_ratios_take_the_clamp_path():
    logp, old, adv, seq_ids, mask, ref, teacher = make_tokens(20, 3)
    logp[0], logp[1] = old[0] + 35.0, old[1] - 35.0
    ref[2] = logp[2] + 40.0
    mask[:3] = True
    check_against_reference((logp, old, adv, seq_ids, mask, ref, teacher), LossConfig(kl_beta=0.1, dual_clip_c=3.0))


@pytest.mark.parametrize("loss_type", ["ppo", "cispo"])
def test_sequence_ratio_clamp_and_empty_sequences(loss_type):
    # GSPO with a whole sequence far off-policy (clamped mean log-ratio), and sequences with no tokens at all
    logp, old, adv, seq_ids, mask, ref, teacher = make_tokens(40, 6)
    seq_ids = seq_ids * 2  # ids 0, 2, ..., 10 of S = 12: half the sequences are empty
    adv = torch.randn(12, device=logp.device)
    logp[seq_ids == 4] = old[seq_ids == 4] + 30.0
    cfg = LossConfig(loss_type=loss_type, ratio_level="sequence", loss_agg="seq-mean-token-mean", kl_beta=0.1)
    check_against_reference((logp, old, adv, seq_ids, mask, ref, teacher), cfg)


def test_only_ref_or_teacher_given():
    logp, old, adv, seq_ids, mask, ref, teacher = make_tokens(20, 3)
    check_against_reference((logp, old, adv, seq_ids, mask, None, teacher), LossConfig(teacher_beta=0.2))
    check_against_reference((logp, old, adv, seq_ids, mask, ref, None), LossConfig(kl_beta=0.2))
    check_against_reference((logp, old, adv, seq_ids, mask, None, None), LossConfig())


def test_all_masked_out_is_zero_without_nan():
    logp, old, adv, seq_ids, mask, ref, teacher = make_tokens(12, 3)
    old[:] = -float("inf")
    loss, stats, grad = loss_and_grad(
        ops.policy_loss,
        logp,
        old,
        adv,
        seq_ids,
        torch.zeros_like(mask),
        ref,
        teacher,
        LossConfig(kl_beta=0.1, ratio_level="sequence"),
    )
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    assert all(torch.isfinite(v) for v in stats.values())


def test_policy_loss_is_deterministic():
    batch = make_tokens(500, 37)
    cfg = LossConfig(ratio_level="sequence", loss_agg="seq-mean-token-mean", kl_beta=0.1)
    a, b = loss_and_grad(ops.policy_loss, *batch, cfg), loss_and_grad(ops.policy_loss, *batch, cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_policy_loss_bad_inputs():
    logp, old, adv, seq_ids, mask, ref, teacher = make_tokens(10, 3)
    with pytest.raises(ValueError, match="seq_ids has 9 entries"):
        ops.policy_loss(logp, old, adv, seq_ids[:9], mask)
    with pytest.raises(ValueError, match=r"seq_ids must lie in \[0, S"):
        ops.policy_loss(logp, old, adv, seq_ids + 3, mask)
    with pytest.raises(TypeError, match="seq_ids must be int64 or int32"):
        ops.policy_loss(logp, old, adv, seq_ids.float(), mask)
    with pytest.raises(ValueError, match="logp is empty"):
        ops.policy_loss(logp[:0], old[:0], adv, seq_ids[:0], mask[:0])
    with pytest.raises(ValueError, match="advantages is empty"):
        ops.policy_loss(logp, old, adv[:0], seq_ids, mask)
    with pytest.raises(ValueError, match="needs ref_logp"):
        ops.policy_loss(logp, old, adv, seq_ids, mask, cfg=LossConfig(kl_beta=0.1))
    with pytest.raises(ValueError, match="old_logp has 9 entries"):
        ops.policy_loss(logp, old[:9], adv, seq_ids, mask)
    with pytest.raises(ValueError, match="mask has 9 entries"):
        ops.policy_loss(logp, old, adv, seq_ids, mask[:9])
    with pytest.raises(ValueError, match=r"seq_ids must lie in \[0, S"):
        ops.policy_loss(logp, old, adv, seq_ids - 1, mask)
    with pytest.raises(TypeError, match="logp must be float"):
        ops.policy_loss(logp.long(), old, adv, seq_ids, mask)
    with pytest.raises(ValueError, match="logp must be 1-D"):
        ops.policy_loss(logp[:, None], old, adv, seq_ids, mask)
    with pytest.raises(ValueError, match="needs teacher_logp"):
        ops.policy_loss(logp, old, adv, seq_ids, mask, cfg=LossConfig(teacher_beta=0.1))
    with pytest.raises(TypeError, match="cfg must be"):
        ops.policy_loss(logp, old, adv, seq_ids, mask, cfg="ppo")
    with pytest.raises(ValueError, match="old_logp must be 1-D"):
        ops.policy_loss(logp, old[:, None], adv, seq_ids, mask)


@pytest.mark.gpu
def test_policy_loss_large_on_gpu():
    batch = make_tokens(70000, 512, device="cuda")
    check_against_reference(
        batch, LossConfig(ratio_level="sequence", kl_beta=0.1, loss_agg="seq-mean-token-mean"), tol=1e-4
    )
