"""token_logprobs and fused_policy_loss (csrc_triton/logprob.py + the loss head) against exgrpo_fast.reference,
forward and backward, through the Triton interpreter on CPU."""

import pytest
import torch

from exgrpo_fast import ops
from exgrpo_fast import reference as R
from exgrpo_fast.reference import LossConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def report(name, got, want):
    err = (got.float() - want.float()).abs()
    bad = torch.nonzero(err > err.max() * 0.5 + 1e-12)[:5].flatten().tolist()
    return f"{name}: max err {err.max().item():.3e}, mean {err.mean().item():.3e}, first mismatches at {bad}"


def assert_close_2x(name, got, ref_lowp, ref_fp32, dtype):
    """Flash-attention rule: the low-precision kernel may be at most 2x as far from the fp32 reference as the
    low-precision reference is, plus atol."""
    got, ref_lowp, ref_fp32 = got.float(), ref_lowp.float(), ref_fp32.float()
    allowed = 2 * (ref_lowp - ref_fp32).abs().max().item() + ATOL[dtype]
    assert (got - ref_fp32).abs().max().item() <= allowed, report(name, got, ref_fp32) + f" (allowed {allowed:.3e})"


def run_ours(logits, labels, g, g_ent, temperature, inplace=True):
    x = logits.clone().requires_grad_()
    logp, ent = ops.token_logprobs(x, labels, temperature=temperature, return_entropy=True, inplace_backward=inplace)
    (logp * g + ent * g_ent).sum().backward()
    return logp.detach(), ent.detach(), x.grad


def run_ref(logits, labels, g, g_ent, temperature):
    x = logits.clone().requires_grad_()
    logp, ent = R.token_logprobs(x, labels, temperature=temperature, return_entropy=True)
    (logp * g + ent * g_ent).sum().backward()
    return logp.detach(), ent.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, V, temperature", [(3, 1000, 1.0), (1, 50257, 0.7), (7, 203, 1.3)])
def test_token_logprobs_matches_reference(dtype, T, V, temperature):
    logits = (torch.randn(T, V, device=DEVICE) * 4).to(dtype)
    labels = torch.randint(0, V, (T,), device=DEVICE)
    labels[0] = V - 1  # the last, partial vocab block
    g, g_ent = torch.randn(T, device=DEVICE), torch.randn(T, device=DEVICE)
    ours = run_ours(logits, labels, g, g_ent, temperature)
    ref_lowp = run_ref(logits, labels, g, g_ent, temperature)
    ref_fp32 = run_ref(logits.float(), labels, g, g_ent, temperature)
    for name, a, b, c in zip(("logp", "entropy", "dlogits"), ours, ref_lowp, ref_fp32):
        assert a.dtype == (dtype if name == "dlogits" else torch.float32)
        assert_close_2x(name, a, b, c, dtype)


def test_inplace_and_out_of_place_agree_and_inplace_reuses_the_buffer():
    T, V = 5, 300
    logits = torch.randn(T, V, device=DEVICE)
    labels = torch.randint(0, V, (T,), device=DEVICE)
    g = torch.randn(T, device=DEVICE)
    _, _, d_out = run_ours(logits, labels, g, torch.zeros(T, device=DEVICE), 1.0, inplace=False)
    _, _, d_in = run_ours(logits, labels, g, torch.zeros(T, device=DEVICE), 1.0, inplace=True)
    assert torch.equal(d_in, d_out)
    if ops.backend_for(logits.device) == "triton":
        x = logits.clone().requires_grad_()
        ops.token_logprobs(x, labels).mul(g).sum().backward()
        # the kernel wrote dlogits into the logits buffer itself (autograd copies it into .grad only for a leaf)
        assert torch.equal(x.detach(), x.grad)


def test_inplace_backward_poisons_other_users_of_the_logits():
    """If another node saved the logits for its backward, the in-place gradient must raise, not corrupt."""
    if ops.backend_for(torch.device(DEVICE)) != "triton":
        pytest.skip("reference backend never writes in place")
    logits = torch.randn(4, 50, device=DEVICE).requires_grad_()
    y = logits * 1.0
    z = y.exp()  # exp saves its output (z), not y; use tanh of y which saves its output too
    w = y.sin()  # sin saves its input y: the buffer we overwrite
    logp = ops.token_logprobs(y, torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logp.sum() + w.sum() + z.sum()).backward()


def test_determinism():
    logits = torch.randn(9, 777, device=DEVICE, dtype=torch.bfloat16)
    labels = torch.randint(0, 777, (9,), device=DEVICE)
    g, ge = torch.randn(9, device=DEVICE), torch.randn(9, device=DEVICE)
    a, b = run_ours(logits, labels, g, ge, 0.9), run_ours(logits, labels, g, ge, 0.9)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: (torch.randn(4, 10), torch.randint(0, 10, (4, 1))), ValueError, "labels must be 1-D"),
        (lambda: (torch.randn(4, 10), torch.randint(0, 10, (5,))), ValueError, "labels has 5 entries"),
        (lambda: (torch.randn(4, 10), torch.tensor([0, 1, 10, 2])), ValueError, r"labels must lie in \[0, V=10\)"),
        (lambda: (torch.randn(4, 10), torch.tensor([0, -1, 3, 2])), ValueError, "labels must lie"),
        (lambda: (torch.randn(4, 10), torch.zeros(4)), TypeError, "labels must be int64 or int32"),
        (lambda: (torch.randint(0, 5, (4, 10)), torch.zeros(4, dtype=torch.long)), TypeError, "logits must be float"),
        (lambda: (torch.randn(10), torch.zeros(10, dtype=torch.long)), ValueError, "logits must be 2-D"),
        (lambda: (torch.randn(0, 10), torch.zeros(0, dtype=torch.long)), ValueError, "logits is empty"),
    ],
)
def test_token_logprobs_bad_inputs(make, err, match):
    logits, labels = make()
    with pytest.raises(err, match=match):
        ops.token_logprobs(logits, labels)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        ops.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=temperature)


# ----------------------------------------------------------------------------------------------------------------
# fused_policy_loss

FUSED_CONFIGS = [
    LossConfig(),
    LossConfig(loss_type="cispo", clip_high=0.4, loss_agg="seq-mean-token-sum"),
    LossConfig(ratio_level="sequence", loss_agg="seq-mean-token-mean", kl_beta=0.1, kl_estimator="k1"),
    LossConfig(dual_clip_c=2.5, delta=1.6, loss_agg="seq-mean-token-sum-norm", kl_beta=0.05, teacher_beta=0.2),
    LossConfig(kl_estimator="k2", kl_beta=0.1, teacher_beta=0.1, loss_agg="seq-mean-token-sum-norm", max_len=12),
    LossConfig(kl_estimator="abs", kl_beta=0.1, teacher_beta=0.1, clip_low=0.1, clip_high=0.28),
]


def make_batch(T, V, S, dtype, device=DEVICE):
    logits = (torch.randn(T, V, device=device) * 3).to(dtype)
    labels = torch.randint(0, V, (T,), device=device)
    seq_ids = torch.sort(torch.randint(0, S, (T,), device=device)).values
    mask = torch.rand(T, device=device) > 0.3
    mask[seq_ids == S - 1] = False  # a sequence with no loss token
    base = R.token_logprobs(logits.float(), labels)
    old = base + 0.4 * torch.randn(T, device=device)
    ref = base + 0.2 * torch.randn(T, device=device)
    teacher = base + 0.3 * torch.randn(T, device=device)
    adv = torch.randn(S, device=device)
    return logits, labels, old, adv, seq_ids, mask, ref, teacher


def fused(fn, logits, labels, old, adv, seq_ids, mask, ref, teacher, cfg, temperature, **kw):
    x = logits.clone().requires_grad_()
    loss, stats = fn(x, labels, old, adv, seq_ids, mask, ref_logp=ref, teacher_logp=teacher, temperature=temperature,
                     cfg=cfg, **kw)
    (loss * 1.7).backward()
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, x.grad


@pytest.mark.parametrize("cfg", FUSED_CONFIGS,
                         ids=lambda c: f"{c.loss_type}-{c.ratio_level}-{c.loss_agg}-{c.kl_estimator}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_policy_loss_matches_reference(cfg, dtype):
    batch = make_batch(23, 301, 5, dtype)
    loss, stats, grad = fused(ops.fused_policy_loss, *batch, cfg, 0.8)
    loss_r, stats_r, grad_r = fused(R.fused_policy_loss, *batch, cfg, 0.8)
    loss_32, _, grad_32 = fused(R.fused_policy_loss, batch[0].float(), *batch[1:], cfg, 0.8)
    assert set(stats) == set(stats_r) == set(R.STAT_NAMES) | {"entropy"}
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert loss.item() == pytest.approx(loss_r.item(), rel=tol, abs=tol)
    for k in stats:
        assert stats[k].item() == pytest.approx(stats_r[k].item(), rel=tol, abs=tol), k
    assert_close_2x("dlogits", grad, grad_r, grad_32, dtype)


def test_fused_all_tokens_masked_is_zero_not_nan():
    logits, labels, old, adv, seq_ids, mask, ref, teacher = make_batch(8, 50, 2, torch.float32)
    old = torch.full_like(old, -float("inf"))  # garbage where masked must not leak
    loss, stats, grad = fused(ops.fused_policy_loss, logits, labels, old, adv, seq_ids, torch.zeros_like(mask), ref,
                              teacher, LossConfig(kl_beta=0.1), 1.0)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    assert all(torch.isfinite(v) for v in stats.values())


def test_fused_bad_inputs_name_the_argument():
    logits, labels, old, adv, seq_ids, mask, ref, teacher = make_batch(8, 50, 3, torch.float32)
    with pytest.raises(ValueError, match="old_logp has 7 entries"):
        ops.fused_policy_loss(logits, labels, old[:7], adv, seq_ids, mask)
    with pytest.raises(ValueError, match=r"seq_ids must lie in \[0, S"):
        ops.fused_policy_loss(logits, labels, old, adv[:1], seq_ids, mask)
    with pytest.raises(ValueError, match="needs ref_logp"):
        ops.fused_policy_loss(logits, labels, old, adv, seq_ids, mask, cfg=LossConfig(kl_beta=0.1))
    with pytest.raises(TypeError, match="mask must be bool"):
        ops.fused_policy_loss(logits, labels, old, adv, seq_ids, mask.float())
    with pytest.raises(TypeError, match="cfg must be"):
        ops.fused_policy_loss(logits, labels, old, adv, seq_ids, mask, cfg={"loss_type": "ppo"})


@pytest.mark.gpu
@pytest.mark.parametrize("T, V", [(16384, 151936), (70000, 4096)])
def test_fused_big_shapes_on_gpu(T, V):
    torch.manual_seed(0)
    logits, labels, old, adv, seq_ids, mask, ref, teacher = make_batch(T, V, 256, torch.bfloat16, device="cuda")
    cfg = LossConfig(kl_beta=0.05)
    x = logits.clone().requires_grad_()
    loss, _ = ops.fused_policy_loss(x, labels, old, adv, seq_ids, mask, ref_logp=ref, cfg=cfg)
    loss.backward()
    # reference in row chunks (materialising [T, V] fp32 at once would not fit): logp, then the loss on logp
    logp = torch.cat([R.token_logprobs(c, lab) for c, lab in zip(logits.split(2048), labels.split(2048))])
    loss_r, _ = R.policy_loss(logp, old, adv, seq_ids, mask, ref_logp=ref, cfg=cfg)
    assert loss.item() == pytest.approx(loss_r.item(), rel=2e-3, abs=1e-4)
    assert torch.isfinite(x.grad.float()).all()
    # gradient on sampled rows: dlogits = g_t (onehot - p) with g = dL/dlogp from the reference loss
    lp = logp.detach().requires_grad_()
    (g,) = torch.autograd.grad(R.policy_loss(lp, old, adv, seq_ids, mask, ref_logp=ref, cfg=cfg)[0], lp)
    rows = torch.randint(0, T, (64,), device="cuda")
    p = torch.softmax(logits[rows].float(), -1)
    want = -g[rows, None] * p
    want[torch.arange(64), labels[rows]] += g[rows]
    assert (x.grad[rows].float() - want).abs().max().item() < 1e-3 * max(g.abs().max().item(), 1e-6) + 1e-6
