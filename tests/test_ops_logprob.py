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
    loss, stats = fn(
        x, labels, old, adv, seq_ids, mask, ref_logp=ref, teacher_logp=teacher, temperature=temperature, cfg=cfg, **kw
    )
    (loss * 1.7).backward()
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, x.grad


@pytest.mark.parametrize(
    "cfg", FUSED_CONFIGS, ids=lambda c: f"{c.loss_type}-{c.ratio_level}-{c.loss_agg}-{c.kl_estimator}"
)
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
    loss, stats, grad = fused(
        ops.fused_policy_loss,
        logits,
        labels,
        old,
        adv,
        seq_ids,
        torch.zeros_like(mask),
        ref,
        teacher,
        LossConfig(kl_beta=0.1),
        1.0,
    )
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


# ----------------------------------------------------------------------------------------------------------------
# inputs real training produces (issue 9): vocab-masked logits, strides, NaN in masked rows, -100 labels


def _grads_of(fn, logits, *args, **kw):
    x = logits.clone().requires_grad_()
    out = fn(x, *args, **kw)
    return out, x


@pytest.mark.parametrize("return_entropy", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_masked_logits_token_logprobs(return_entropy, dtype):
    T, V = 6, 700
    logits = (torch.randn(T, V, device=DEVICE) * 3).to(dtype)
    labels = torch.randint(0, V, (T,), device=DEVICE)
    banned = torch.rand(T, V, device=DEVICE) < 0.4
    banned[torch.arange(T), labels] = False
    banned[1, 256:512] = True  # a whole vocab block masked (the online max sees only -inf there)
    banned[1, labels[1]] = False
    logits = logits.masked_fill(banned, float("-inf"))
    g, ge = torch.randn(T, device=DEVICE), torch.randn(T, device=DEVICE)
    res = {}
    for name, fn in (("ours", ops.token_logprobs), ("ref", R.token_logprobs)):
        x = logits.clone().requires_grad_()
        out = fn(x, labels, temperature=0.8, return_entropy=return_entropy)
        logp, ent = out if return_entropy else (out, None)
        loss = (logp * g).sum() + ((ent * ge).sum() if return_entropy else 0.0)
        loss.backward()
        res[name] = (logp.detach(), None if ent is None else ent.detach(), x.grad)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(res["ours"], res["ref"]):
        if a is None:
            continue
        assert torch.isfinite(a.float()).all() and torch.isfinite(b.float()).all()
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
    assert torch.count_nonzero(res["ours"][2][banned]) == 0  # p = 0 there: exactly zero gradient


def test_vocab_masked_logits_fused_policy_loss():
    logits, labels, old, adv, seq_ids, mask, ref, teacher = make_batch(17, 333, 4, torch.float32)
    banned = torch.rand_like(logits) < 0.5
    banned[torch.arange(17), labels] = False
    logits = logits.masked_fill(banned, float("-inf"))
    cfg = LossConfig(kl_beta=0.1)
    loss, stats, grad = fused(ops.fused_policy_loss, logits, labels, old, adv, seq_ids, mask, ref, teacher, cfg, 0.9)
    loss_r, stats_r, grad_r = fused(
        R.fused_policy_loss, logits, labels, old, adv, seq_ids, mask, ref, teacher, cfg, 0.9
    )
    assert torch.isfinite(grad).all() and torch.isfinite(stats["entropy"])
    torch.testing.assert_close(loss, loss_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["entropy"], stats_r["entropy"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_r, atol=1e-5, rtol=1e-5)


def test_unused_entropy_costs_nothing_in_the_backward(monkeypatch):
    if ops.backend_for(torch.device(DEVICE)) != "triton":
        pytest.skip("kernel path only")
    from csrc_triton import logprob

    seen = []
    real = logprob.logprob_backward

    def spy(*args, **kw):
        seen.append(kw.get("grad_entropy"))
        return real(*args, **kw)

    monkeypatch.setattr(logprob, "logprob_backward", spy)
    x = torch.randn(4, 50, device=DEVICE).requires_grad_()
    logp, _ = ops.token_logprobs(x, torch.zeros(4, dtype=torch.long, device=DEVICE), return_entropy=True)
    logp.sum().backward()
    assert seen == [None]  # PyTorch did not hand the kernel a zero entropy gradient


def _layouts(T, V, dtype):
    """(name, make) pairs: each make() returns (leaf, logits view of shape [T, V]) with the same values."""
    base = (torch.randn(T, V, device=DEVICE) * 3).to(dtype)

    def transposed():
        leaf = base.t().contiguous().requires_grad_()  # [V, T] contiguous: its .t() has strides (1, T)
        return leaf, leaf.t()

    def strided_leaf():
        wide = torch.zeros(T, 3 * V, device=DEVICE, dtype=dtype)
        wide[:, ::3] = base
        leaf = wide[:, ::3].requires_grad_()  # a leaf with strides (3V, 3)
        return leaf, leaf

    def row_gap_view():
        wide = torch.zeros(2 * T, V + 5, device=DEVICE, dtype=dtype)
        wide[::2, 2 : V + 2] = base
        leaf = wide.requires_grad_()
        return leaf, leaf[::2, 2 : V + 2]

    return base, [("transposed", transposed), ("strided_leaf", strided_leaf), ("row_gap_view", row_gap_view)]


@pytest.mark.parametrize("inplace", [True, False])
def test_non_contiguous_logits_labels_and_mask(inplace):
    T, V, S = 12, 301, 3
    base, layouts = _layouts(T, V, torch.float32)
    labels_wide = torch.randint(0, V, (2 * T,), device=DEVICE)
    labels = labels_wide[::2]
    seq_ids = torch.sort(torch.randint(0, S, (T,), device=DEVICE)).values.repeat_interleave(2)[::2]
    mask = (torch.rand(2 * T, device=DEVICE) > 0.3)[::2]
    old = R.token_logprobs(base, labels) + 0.3 * torch.randn(T, device=DEVICE)
    adv = torch.randn(S, device=DEVICE)
    g = torch.randn(T, device=DEVICE)
    want_logp = R.token_logprobs(base, labels.contiguous())
    x = base.clone().requires_grad_()
    (R.token_logprobs(x, labels.contiguous()) * g).sum().backward()
    want_tok = x.grad
    x = base.clone().requires_grad_()
    R.fused_policy_loss(x, labels.contiguous(), old, adv, seq_ids.contiguous(), mask.contiguous())[0].backward()
    want_loss_grad = x.grad
    for name, make in layouts:
        leaf, view = make()
        logp = ops.token_logprobs(view, labels, inplace_backward=inplace)
        torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=1e-5, msg=name)
        (logp * g).sum().backward()
        got = leaf.grad if leaf is view else leaf.grad[::2, 2 : V + 2]
        if name == "transposed":
            got = leaf.grad.t()
        torch.testing.assert_close(got, want_tok, atol=1e-5, rtol=1e-5, msg=name)
        if name == "row_gap_view":  # elements outside the view got no gradient
            untouched = torch.ones_like(leaf.grad, dtype=torch.bool)
            untouched[::2, 2 : V + 2] = False
            assert torch.count_nonzero(leaf.grad[untouched]) == 0
        leaf, view = make()
        loss, _ = ops.fused_policy_loss(view, labels, old, adv, seq_ids, mask, inplace_backward=inplace)
        loss.backward()
        got = leaf.grad.t() if name == "transposed" else (leaf.grad if leaf is view else leaf.grad[::2, 2 : V + 2])
        torch.testing.assert_close(got, want_loss_grad, atol=1e-5, rtol=1e-5, msg=name)


def test_expanded_logits_fall_back_to_a_fresh_gradient():
    row = torch.randn(1, 40, device=DEVICE)
    leaf = row.clone().requires_grad_()
    labels = torch.tensor([3, 7, 3], device=DEVICE)
    ops.token_logprobs(leaf.expand(3, 40), labels).sum().backward()
    x = row.clone().requires_grad_()
    R.token_logprobs(x.expand(3, 40), labels).sum().backward()
    torch.testing.assert_close(leaf.grad, x.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_in_masked_rows_gives_exact_zero_gradient(dtype):
    logits, labels, old, adv, seq_ids, mask, ref, teacher = make_batch(19, 257, 4, dtype)
    poisoned = logits.clone()
    poisoned[~mask] = float("nan")
    old_p, ref_p = old.clone(), ref.clone()
    old_p[~mask], ref_p[~mask] = float("nan"), float("inf")
    cfg = LossConfig(kl_beta=0.1, teacher_beta=0.05)
    clean = fused(ops.fused_policy_loss, logits, labels, old, adv, seq_ids, mask, ref, teacher, cfg, 1.1)
    dirty = fused(ops.fused_policy_loss, poisoned, labels, old_p, adv, seq_ids, mask, ref_p, teacher, cfg, 1.1)
    ref_dirty = fused(R.fused_policy_loss, poisoned, labels, old_p, adv, seq_ids, mask, ref_p, teacher, cfg, 1.1)
    assert torch.equal(dirty[0], clean[0])
    for k in clean[1]:
        assert torch.equal(dirty[1][k], clean[1][k]), k
    assert torch.equal(dirty[2], clean[2])
    assert torch.isfinite(dirty[2].float()).all() and torch.count_nonzero(dirty[2][~mask]) == 0
    assert torch.isfinite(ref_dirty[2].float()).all() and torch.count_nonzero(ref_dirty[2][~mask]) == 0
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(dirty[0], ref_dirty[0], atol=tol, rtol=tol)


@pytest.mark.parametrize("mode", ["eager", "off"])
def test_ignore_index_labels(mode):
    T, V = 9, 130
    logits = torch.randn(T, V, device=DEVICE)
    labels = torch.randint(0, V, (T,), device=DEVICE)
    ignored = torch.tensor([0, 3, 4, 8], device=DEVICE)
    labels[ignored] = -100
    logits[ignored] = float("nan")  # never read
    g, ge = torch.randn(T, device=DEVICE), torch.randn(T, device=DEVICE)
    with ops.value_checks(mode):
        ours = run_ours(logits, labels, g, ge, 0.7)
    want = run_ref(logits, labels, g, ge, 0.7)
    for a, b in zip(ours, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(ours[0][ignored]) == 0 and torch.count_nonzero(ours[1][ignored]) == 0
    assert torch.count_nonzero(ours[2][ignored]) == 0


def test_ignore_index_labels_are_masked_in_fused_policy_loss():
    logits, labels, old, adv, seq_ids, mask, ref, teacher = make_batch(21, 99, 3, torch.float32)
    ignored = torch.rand(21, device=DEVICE) < 0.3
    labels_i = labels.masked_fill(ignored, -100)
    cfg = LossConfig(kl_beta=0.1, loss_agg="seq-mean-token-mean")
    a = fused(ops.fused_policy_loss, logits, labels_i, old, adv, seq_ids, mask, ref, teacher, cfg, 1.0)
    b = fused(ops.fused_policy_loss, logits, labels, old, adv, seq_ids, mask & ~ignored, ref, teacher, cfg, 1.0)
    c = fused(R.fused_policy_loss, logits, labels_i, old, adv, seq_ids, mask, ref, teacher, cfg, 1.0)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a[0], c[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[2], c[2], atol=1e-5, rtol=1e-5)
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], atol=1e-6, rtol=1e-6, msg=k)


def test_out_of_range_label_with_checks_off_is_never_dereferenced():
    if ops.backend_for(torch.device(DEVICE)) != "triton":
        pytest.skip("kernel path only")
    logits = torch.randn(3, 20, device=DEVICE)
    labels = torch.tensor([1, 10**9, -7], device=DEVICE)
    with ops.value_checks("off"):
        logp = ops.token_logprobs(logits, labels)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1:]).all()


# ----------------------------------------------------------------------------------------------------------------
# value-check modes and backends as context managers


def test_deferred_value_checks_raise_at_the_sync_point():
    ops.raise_deferred_errors()  # nothing pending from other tests
    logits = torch.randn(4, 10, device=DEVICE)
    with ops.value_checks("deferred"):
        logp = ops.token_logprobs(logits, torch.tensor([0, 1, 12, -100], device=DEVICE))  # no raise here
        assert logp.shape == (4,)
        ops.token_logprobs(logits, torch.tensor([0, -3, 2, 2], device=DEVICE))
        with pytest.raises(ValueError, match=r"labels must lie in \[0, V=10\) or be -100.*found -3\.\.12"):
            ops.raise_deferred_errors()
        ops.raise_deferred_errors()  # cleared: nothing pending
        ops.token_logprobs(logits, torch.tensor([0, 1, 2, -100], device=DEVICE))
        ops.raise_deferred_errors()
    assert ops.current_value_checks() == "eager"


def test_deferred_mode_has_no_host_sync(monkeypatch):
    """In deferred mode the whole fused forward+backward reads no tensor value on the host."""
    logits, labels, old, adv, seq_ids, mask, ref, teacher = make_batch(10, 77, 3, torch.float32)
    labels[2] = -100
    rewards = torch.rand(6, device=DEVICE)

    def boom(*a, **k):
        raise AssertionError("host sync in the hot path")

    x = logits.clone().requires_grad_()
    with ops.value_checks("deferred"):
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, boom)
        adv2 = ops.group_advantages(rewards, torch.tensor([0, 0, 1, 1, 2, 2], device=DEVICE))
        loss, stats = ops.fused_policy_loss(
            x, labels, old, adv2[:3], seq_ids, mask, ref_logp=ref, cfg=LossConfig(kl_beta=0.1)
        )
        loss.backward()
        monkeypatch.undo()
    ops.raise_deferred_errors()
    assert torch.isfinite(x.grad).all()


def test_deferred_nan_rewards():
    ops.raise_deferred_errors()
    with ops.value_checks("deferred"):
        ops.group_advantages(torch.tensor([1.0, float("nan"), 0.5], device=DEVICE), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="rewards contain NaN"):
        ops.raise_deferred_errors()


def test_backend_context_manager():
    before = ops.current_backend()
    with ops.backend("reference"):
        assert ops.current_backend() == "reference"
        assert ops.backend_for(torch.device("cpu")) == "reference"
    assert ops.current_backend() == before
    with pytest.raises(ValueError, match="backend='nope'"):
        with ops.backend("nope"):
            pass
    with pytest.raises(ValueError, match="value checks mode"):
        ops.set_value_checks("sometimes")


def test_entropy_only_gradient():
    logits = torch.randn(5, 300, device=DEVICE)
    logits[:, 7] = float("-inf")
    labels = torch.tensor([1, -100, 3, 299, 0], device=DEVICE)
    grads = []
    for fn in (ops.token_logprobs, R.token_logprobs):
        x = logits.clone().requires_grad_()
        _, ent = fn(x, labels, return_entropy=True, temperature=1.1)
        ent.sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(grads[0]).all()
