"""token_logprobs_linear and fused_linear_policy_loss (csrc_triton/linear_logprob.py) against the reference
(materialised logits + policy_loss), forward and all three gradients, through the Triton interpreter on CPU."""

import pytest
import torch

from exgrpo_fast import ops
from exgrpo_fast import reference as R
from exgrpo_fast.reference import LossConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make(T, H, V, S, dtype, bias=True, device=DEVICE):
    hidden = torch.randn(T, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) / H**0.5 * 2).to(dtype)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    labels = torch.randint(0, V, (T,), device=device)
    seq_ids = torch.sort(torch.randint(0, S, (T,), device=device)).values
    mask = torch.rand(T, device=device) > 0.25
    mask[seq_ids == S - 1] = False
    with torch.no_grad():
        base = R.token_logprobs_linear(hidden.float(), weight.float(), labels, bias=None if b is None else b.float())
    old = base + 0.3 * torch.randn(T, device=device)
    ref = base + 0.2 * torch.randn(T, device=device)
    teacher = base - 0.2 * torch.randn(T, device=device)
    adv = torch.randn(S, device=device)
    return hidden, weight, b, labels, old, adv, seq_ids, mask, ref, teacher


def run(fn, hidden, weight, b, labels, old, adv, seq_ids, mask, ref, teacher, cfg, temperature, upcast=False):
    cast = (lambda t: t.float()) if upcast else (lambda t: t)
    h = cast(hidden).detach().requires_grad_()
    w = cast(weight).detach().requires_grad_()
    bb = cast(b).detach().requires_grad_() if b is not None else None
    loss, stats = fn(h, w, labels, old, adv, seq_ids, mask, bias=bb, ref_logp=ref, teacher_logp=teacher,
                     temperature=temperature, cfg=cfg)
    (loss * 1.3).backward()
    return loss.detach(), stats, h.grad, w.grad, (bb.grad if bb is not None else None)


def assert_close_2x(name, got, ref_lowp, ref_fp32, dtype):
    got, ref_lowp, ref_fp32 = got.float(), ref_lowp.float(), ref_fp32.float()
    allowed = 2 * (ref_lowp - ref_fp32).abs().max().item() + ATOL[dtype] * (1 + ref_fp32.abs().max().item())
    err = (got - ref_fp32).abs()
    assert err.max().item() <= allowed, (
        f"{name}: max err {err.max().item():.3e} (allowed {allowed:.3e}), mean {err.mean().item():.3e}, "
        f"first mismatches at {torch.nonzero(err > allowed)[:5].tolist()}"
    )


CONFIGS = [
    LossConfig(kl_beta=0.05, teacher_beta=0.1),
    LossConfig(loss_type="cispo", ratio_level="sequence", loss_agg="seq-mean-token-mean"),
    LossConfig(ratio_level="sequence", loss_agg="seq-mean-token-sum", kl_estimator="k2", kl_beta=0.1),
    LossConfig(loss_agg="seq-mean-token-sum-norm", dual_clip_c=2.0, kl_estimator="abs", teacher_beta=0.2),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.loss_type}-{c.ratio_level}-{c.loss_agg}")
@pytest.mark.parametrize("dtype, bias, H", [(torch.float32, True, 48), (torch.bfloat16, False, 16)])
def test_fused_linear_matches_reference(cfg, dtype, bias, H):
    batch = make(37, H, 203, 5, dtype, bias=bias)
    loss, stats, dh, dw, db = run(ops.fused_linear_policy_loss, *batch, cfg, 0.8)
    loss_l, stats_l, dh_l, dw_l, db_l = run(R.fused_linear_policy_loss, *batch, cfg, 0.8)
    loss_r, stats_r, dh_r, dw_r, db_r = run(R.fused_linear_policy_loss, *batch, cfg, 0.8, upcast=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert loss.item() == pytest.approx(loss_r.item(), rel=tol, abs=tol)
    assert set(stats) == set(R.STAT_NAMES) | {"entropy"}
    for k in stats:
        assert stats[k].item() == pytest.approx(stats_r[k].item(), rel=tol, abs=tol), k
    assert dh.dtype == dtype and dw.dtype == dtype
    assert_close_2x("dhidden", dh, dh_l, dh_r, dtype)
    assert_close_2x("dweight", dw, dw_l, dw_r, dtype)
    if bias:
        assert_close_2x("dbias", db, db_l, db_r, dtype)


def test_linear_path_equals_logits_path():
    hidden, weight, b, labels, old, adv, seq_ids, mask, ref, teacher = make(21, 32, 77, 3, torch.float32)
    cfg = LossConfig(kl_beta=0.1)
    loss, stats, dh, dw, db = run(ops.fused_linear_policy_loss, hidden, weight, b, labels, old, adv, seq_ids, mask,
                                  ref, None, cfg, 1.0)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    bb = b.clone().requires_grad_()
    logits = torch.nn.functional.linear(h, w, bb)
    loss2, stats2 = ops.fused_policy_loss(logits, labels, old, adv, seq_ids, mask, ref_logp=ref, cfg=cfg)
    (loss2 * 1.3).backward()
    assert loss.item() == pytest.approx(loss2.item(), rel=1e-5)
    assert torch.allclose(dh, h.grad, atol=1e-5) and torch.allclose(dw, w.grad, atol=1e-5)
    assert torch.allclose(db, bb.grad, atol=1e-5)
    assert all(stats[k].item() == pytest.approx(stats2[k].item(), rel=1e-5, abs=1e-6) for k in stats)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, bias", [(16, True), (48, False), (40, True)])  # 40: H tail masked inside a chunk
def test_logp_entropy_and_grads_match_reference(dtype, H, bias):
    hidden, weight, b, labels, *_ = make(37, H, 203, 3, dtype, bias=bias)
    g_logp, g_ent = torch.randn(37), torch.randn(37)

    def go(fn, upcast):
        cast = (lambda t: t.float()) if upcast else (lambda t: t)
        ins = [cast(t).detach().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
        lp, en = fn(ins[0], ins[1], labels, bias=ins[2], temperature=0.8, return_entropy=True)
        ((lp * g_logp).sum() + (en * g_ent).sum()).backward()
        return [lp.detach(), en.detach()] + [t.grad for t in ins if t is not None]

    got, low, truth = go(ops.token_logprobs_linear, False), go(R.token_logprobs_linear, False), go(
        R.token_logprobs_linear, True)
    for name, a, lo, tr in zip(("logp", "entropy", "dhidden", "dweight", "dbias"), got, low, truth):
        assert_close_2x(name, a, lo, tr, dtype)


def test_token_logprobs_linear_with_and_without_grad():
    hidden, weight, b, labels, *_ = make(19, 32, 99, 2, torch.float32)
    with torch.no_grad():
        logp, ent = ops.token_logprobs_linear(hidden, weight, labels, bias=b, temperature=0.7, return_entropy=True)
    want, want_ent = R.token_logprobs_linear(hidden, weight, labels, bias=b, temperature=0.7, return_entropy=True)
    assert torch.allclose(logp, want, atol=1e-5) and torch.allclose(ent, want_ent, atol=1e-5)
    assert not logp.requires_grad
    # differentiable (SFT cross-entropy), including an entropy term
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, en = ops.token_logprobs_linear(h, w, labels, return_entropy=True)
    (-lp.mean() + 0.1 * en.mean()).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp2, en2 = R.token_logprobs_linear(h2, w2, labels, return_entropy=True)
    (-lp2.mean() + 0.1 * en2.mean()).backward()
    assert torch.allclose(h.grad, h2.grad, atol=1e-5) and torch.allclose(w.grad, w2.grad, atol=1e-5)


def test_determinism():
    batch = make(33, 32, 150, 4, torch.bfloat16)
    cfg = LossConfig(ratio_level="sequence", kl_beta=0.1)
    a = run(ops.fused_linear_policy_loss, *batch, cfg, 1.0)
    b = run(ops.fused_linear_policy_loss, *batch, cfg, 1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])


def test_bad_inputs():
    hidden, weight, b, labels, old, adv, seq_ids, mask, ref, teacher = make(8, 16, 40, 2, torch.float32)
    f = ops.fused_linear_policy_loss
    with pytest.raises(ValueError, match="weight has H=16 columns but hidden has H=8"):
        f(hidden[:, :8], weight, labels, old, adv, seq_ids, mask)
    with pytest.raises(TypeError, match="weight is torch.bfloat16 but hidden is torch.float32"):
        f(hidden, weight.bfloat16(), labels, old, adv, seq_ids, mask)
    with pytest.raises(ValueError, match="bias has 39 entries"):
        f(hidden, weight, labels, old, adv, seq_ids, mask, bias=b[:39])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V=40\)"):
        f(hidden, weight, labels + 40, old, adv, seq_ids, mask)
    with pytest.raises(ValueError, match="hidden is empty"):
        ops.token_logprobs_linear(hidden[:0], weight, labels[:0])
    with pytest.raises(ValueError, match="hidden must be 2-D"):
        ops.token_logprobs_linear(hidden[0], weight, labels)
    with pytest.raises(ValueError, match="old_logp has 7 entries"):
        f(hidden, weight, labels, old[:7], adv, seq_ids, mask)


@pytest.mark.gpu
@pytest.mark.parametrize("H", [896, 3584])
def test_big_shapes_on_gpu(H):
    T, V = 16384, 151936
    hidden, weight, b, labels, old, adv, seq_ids, mask, ref, teacher = make(T, H, V, 64, torch.bfloat16, bias=False,
                                                                           device="cuda")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    cfg = LossConfig(kl_beta=0.05)
    loss, _ = ops.fused_linear_policy_loss(h, w, labels, old, adv, seq_ids, mask, ref_logp=ref, cfg=cfg)
    loss.backward()
    # reference in row chunks: logp per chunk, then the loss on logp, then grads through a chunked autograd graph
    logp = torch.cat([R.token_logprobs_linear(hc, weight, lc) for hc, lc in zip(hidden.split(1024),
                                                                                 labels.split(1024))])
    lp = logp.detach().requires_grad_()
    loss_r, _ = R.policy_loss(lp, old, adv, seq_ids, mask, ref_logp=ref, cfg=cfg)
    (g,) = torch.autograd.grad(loss_r, lp)
    assert loss.item() == pytest.approx(loss_r.item(), rel=2e-2, abs=1e-4)
    rows = slice(0, 512)
    h2 = hidden[rows].float().requires_grad_()
    (R.token_logprobs_linear(h2, weight.float(), labels[rows]) * g[rows]).sum().backward()
    assert (h.grad[rows].float() - h2.grad).abs().max().item() < 2e-2 * (1 + h2.grad.abs().max().item())
