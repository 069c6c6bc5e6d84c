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


# ----------------------------------------------------------------------------------------------------------------
# on-policy (old_logp=None), the step normaliser, the loss spec


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["ppo", "cispo"])
def test_on_policy_old_logp_none(ratio_level, loss_type):
    logp, old, adv, seq_ids, mask, ref, teacher = make_tokens(45, 5)
    cfg = LossConfig(loss_type=loss_type, ratio_level=ratio_level, kl_beta=0.1, teacher_beta=0.05)
    check_against_reference((logp, None, adv, seq_ids, mask, ref, teacher), cfg)
    # the same as passing the detached logp itself
    loss, stats, grad = loss_and_grad(ops.policy_loss, logp, logp.detach().clone(), adv, seq_ids, mask, ref, teacher,
                                      cfg)  # fmt: skip
    loss_n, stats_n, grad_n = loss_and_grad(ops.policy_loss, logp, None, adv, seq_ids, mask, ref, teacher, cfg)
    assert torch.equal(loss, loss_n) and torch.equal(grad, grad_n) and stats_n["ratio_max"].item() == 1.0


@pytest.mark.parametrize("backend", ["ops", "reference"])
@pytest.mark.parametrize("loss_agg", R.LOSS_AGGS)
@pytest.mark.parametrize("max_len", [None, 13])
def test_micro_batches_sum_to_the_step_loss(backend, loss_agg, max_len):
    """With LossNorm.from_batches, the micro-batch losses of a step add up to the whole batch's loss and their
    gradients are its gradients, for every loss_agg, however the sequences are grouped into micro-batches."""
    fn = ops.policy_loss if backend == "ops" else R.policy_loss
    T, S = 80, 9
    logp, old, adv, seq_ids, mask, ref, teacher = make_tokens(T, S, sorted_ids=True)
    cfg = LossConfig(loss_agg=loss_agg, kl_beta=0.1, ratio_level="sequence", max_len=max_len)
    whole = loss_and_grad(fn, logp, old, adv, seq_ids, mask, ref, teacher, cfg)
    for groups in ([[0, 1, 2, 3], [4, 5, 6, 7, 8]], [[0, 8], [1, 2, 3, 4, 5, 6], [7]]):
        parts = []
        for g in groups:  # micro-batch: the tokens of these sequences, with local sequence ids
            sel = torch.isin(seq_ids, torch.tensor(g))
            local = torch.searchsorted(torch.tensor(g), seq_ids[sel])
            parts.append((sel, local, adv[g]))
        norm = ops.LossNorm.from_batches([(local, mask[sel]) for sel, local, _ in parts])
        assert norm.num_tokens == mask.sum().item()
        total, grad = 0.0, torch.zeros(T)
        for sel, local, a in parts:
            x = logp[sel].clone().requires_grad_()
            ln, _ = fn(x, old[sel], a, local, mask[sel], ref_logp=ref[sel], teacher_logp=teacher[sel], cfg=cfg,
                       norm=norm)  # fmt: skip
            upstream = 0.1 + torch.rand((), generator=torch.Generator().manual_seed(7)).item()
            (ln * upstream).backward()
            total += ln.item()
            grad[sel] = x.grad
        assert total == pytest.approx(whole[0].item(), rel=1e-5, abs=1e-7), groups
        assert torch.allclose(grad, whole[2], atol=1e-7, rtol=1e-5), groups


def test_loss_norm_validation():
    with pytest.raises(ValueError, match="LossNorm.num_tokens"):
        ops.LossNorm(float("nan"), 1.0, 1.0)
    with pytest.raises(ValueError, match="LossNorm.max_len"):
        ops.LossNorm(1.0, 1.0, -2.0)
    assert ops.LossNorm.from_batches([]) == ops.LossNorm(0.0, 0.0, 0.0)


def test_loss_spec_is_the_one_definition():
    import ast
    import pathlib

    from csrc_triton import loss_head
    from exgrpo_fast import loss_spec

    assert ops.LossConfig is R.LossConfig is loss_spec.LossConfig and ops.LossNorm is loss_spec.LossNorm
    assert loss_head.ROWS[0] == "loss" and set(loss_head.ROWS[1:]) == set(R.STAT_NAMES)
    assert set(loss_head.HeadParams._fields) == set(loss_spec.kernel_args(LossConfig()))
    assert [loss_spec.KL_CODES[k] for k in loss_spec.KL_ESTIMATORS] == [0, 1, 2, 3]
    assert [loss_spec.AGG_CODES[k] for k in loss_spec.LOSS_AGGS] == [0, 1, 2, 3]
    # kernels import nothing from exgrpo_fast
    for path in pathlib.Path(loss_head.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith("exgrpo_fast") for n in names), (path.name, names)
    with pytest.raises(ValueError, match="LossConfig.loss_agg='mean'"):
        LossConfig(loss_agg="mean")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_fused_policy_loss_from_logits_takes_the_step_norm(backend, loss_agg):
    """fused_policy_loss (logits path): two micro-batches with the step's LossNorm sum to the whole batch's loss and
    logits gradient; old_logp=None is on-policy there too."""
    from exgrpo_fast import ops

    g = torch.Generator().manual_seed(3)
    T, V, S = 23, 37, 4
    logits = torch.randn(T, V, generator=g)
    labels = torch.randint(0, V, (T,), generator=g)
    seq_ids = torch.sort(torch.randint(0, S, (T,), generator=g)).values
    mask = torch.rand(T, generator=g) < 0.7
    adv = torch.randn(S, generator=g)
    cfg = ops.LossConfig(loss_agg=loss_agg)
    cut = int((seq_ids < 2).sum())  # micro-batches split between sequences
    norm = ops.LossNorm.from_batches([(seq_ids, mask)])
    with ops.backend(backend):
        x = logits.clone().requires_grad_(True)
        whole, _ = ops.fused_policy_loss(x, labels, None, adv, seq_ids, mask, cfg=cfg, inplace_backward=False)
        whole.backward()
        parts, grads = [], []
        for sl in (slice(0, cut), slice(cut, T)):
            y = logits[sl].clone().requires_grad_(True)
            loss, _ = ops.fused_policy_loss(
                y, labels[sl], None, adv, seq_ids[sl], mask[sl], cfg=cfg, norm=norm, inplace_backward=False
            )
            loss.backward()
            parts.append(loss.detach())
            grads.append(y.grad)
    torch.testing.assert_close(sum(parts), whole.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(grads), x.grad, rtol=1e-5, atol=1e-6)
