"""token_logprobs_linear and fused_linear_policy_loss, both impls (csrc_triton/linear_chunked.py: GEMMs + row
kernel; csrc_triton/linear_logprob.py: all-Triton tiles) against the reference (materialised logits +
policy_loss), forward and all three gradients, through the Triton interpreter on CPU. Chunked runs use small
chunks (CHUNK) so sequences are split across chunks."""

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from exgrpo_fast import ops
from exgrpo_fast import reference as R
from exgrpo_fast.reference import LossConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
CHUNK = 16  # tokens per chunk in the chunked tests: T=37 gives 3 chunks, the last one partial
IMPLS = ["chunked", "tiled"]


def fused(impl, chunk_size=CHUNK):
    return functools.partial(ops.fused_linear_policy_loss, impl=impl, chunk_size=chunk_size if impl == "chunked"
                             else None)  # fmt: skip


def linear(impl, chunk_size=CHUNK):
    return functools.partial(ops.token_logprobs_linear, impl=impl, chunk_size=chunk_size if impl == "chunked"
                             else None)  # fmt: skip


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
    loss, stats = fn(
        h,
        w,
        labels,
        old,
        adv,
        seq_ids,
        mask,
        bias=bb,
        ref_logp=ref,
        teacher_logp=teacher,
        temperature=temperature,
        cfg=cfg,
    )
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
    LossConfig(loss_type="cispo", loss_agg="seq-mean-token-mean", kl_estimator="k1", kl_beta=0.1, delta=None),
    LossConfig(delta=1.5, loss_agg="seq-mean-token-sum", kl_estimator="k3", teacher_beta=0.1),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.loss_type}-{c.ratio_level}-{c.loss_agg}")
@pytest.mark.parametrize("dtype, bias, H", [(torch.float32, True, 48), (torch.bfloat16, False, 19)])
def test_fused_linear_matches_reference(impl, cfg, dtype, bias, H):
    batch = make(37, H, 203, 5, dtype, bias=bias)
    loss, stats, dh, dw, db = run(fused(impl), *batch, cfg, 0.8)
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


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_path_equals_logits_path(impl):
    hidden, weight, b, labels, old, adv, seq_ids, mask, ref, teacher = make(21, 32, 77, 3, torch.float32)
    cfg = LossConfig(kl_beta=0.1)
    loss, stats, dh, dw, db = run(fused(impl), hidden, weight, b, labels, old, adv, seq_ids, mask, ref, None, cfg, 1.0)
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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, bias", [(16, True), (48, False), (40, True)])  # 40: H tail masked inside a chunk
def test_logp_entropy_and_grads_match_reference(impl, dtype, H, bias):
    hidden, weight, b, labels, *_ = make(37, H, 203, 3, dtype, bias=bias)
    g_logp, g_ent = torch.randn(37), torch.randn(37)

    def go(fn, upcast):
        cast = (lambda t: t.float()) if upcast else (lambda t: t)
        ins = [cast(t).detach().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
        lp, en = fn(ins[0], ins[1], labels, bias=ins[2], temperature=0.8, return_entropy=True)
        ((lp * g_logp).sum() + (en * g_ent).sum()).backward()
        return [lp.detach(), en.detach()] + [t.grad for t in ins if t is not None]

    got, low, truth = go(linear(impl), False), go(R.token_logprobs_linear, False), go(R.token_logprobs_linear, True)
    for name, a, lo, tr in zip(("logp", "entropy", "dhidden", "dweight", "dbias"), got, low, truth):
        assert_close_2x(name, a, lo, tr, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_token_logprobs_linear_with_and_without_grad(impl):
    hidden, weight, b, labels, *_ = make(19, 32, 99, 2, torch.float32)
    with torch.no_grad():
        logp, ent = linear(impl)(hidden, weight, labels, bias=b, temperature=0.7, return_entropy=True)
    want, want_ent = R.token_logprobs_linear(hidden, weight, labels, bias=b, temperature=0.7, return_entropy=True)
    assert torch.allclose(logp, want, atol=1e-5) and torch.allclose(ent, want_ent, atol=1e-5)
    assert not logp.requires_grad
    # differentiable (SFT cross-entropy), including an entropy term
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, en = linear(impl)(h, w, labels, return_entropy=True)
    (-lp.mean() + 0.1 * en.mean()).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp2, en2 = R.token_logprobs_linear(h2, w2, labels, return_entropy=True)
    (-lp2.mean() + 0.1 * en2.mean()).backward()
    assert torch.allclose(h.grad, h2.grad, atol=1e-5) and torch.allclose(w.grad, w2.grad, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])  # chunked: the 3-GEMM and the 4-GEMM mode
def test_determinism(impl, ratio_level):
    batch = make(33, 32, 150, 4, torch.bfloat16)
    cfg = LossConfig(ratio_level=ratio_level, kl_beta=0.1)
    a = run(fused(impl), *batch, cfg, 1.0)
    b = run(fused(impl), *batch, cfg, 1.0)
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
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V=40\) or be -100"):
        f(hidden, weight, labels + 40, old, adv, seq_ids, mask)
    with pytest.raises(ValueError, match="hidden is empty"):
        ops.token_logprobs_linear(hidden[:0], weight, labels[:0])
    with pytest.raises(ValueError, match="hidden must be 2-D"):
        ops.token_logprobs_linear(hidden[0], weight, labels)
    with pytest.raises(ValueError, match="old_logp has 7 entries"):
        f(hidden, weight, labels, old[:7], adv, seq_ids, mask)
    with pytest.raises(ValueError, match="impl='fast'"):
        f(hidden, weight, labels, old, adv, seq_ids, mask, impl="fast")
    with pytest.raises(ValueError, match="chunk_size=0"):
        f(hidden, weight, labels, old, adv, seq_ids, mask, impl="chunked", chunk_size=0)
    with pytest.raises(TypeError, match="norm must be"):
        f(hidden, weight, labels, old, adv, seq_ids, mask, norm=(1.0, 1.0, 1.0))


@pytest.mark.gpu
@pytest.mark.parametrize("impl, H", [("chunked", 896), ("chunked", 3584), ("tiled", 896)])  # tiled: small H only
def test_big_shapes_on_gpu(impl, H):
    """Headline shapes. The tiled impl requests ~1.1 TB per forward + backward at H=896 and 4.5 TB at H=3584
    (linear_logprob.tiled_bytes): kept to H=896. The chunked run also checks the half dZ written into the fp32 chunk
    rows under real warp scheduling (a race there would corrupt dh)."""
    T, V = 16384, 151936
    hidden, weight, b, labels, old, adv, seq_ids, mask, ref, teacher = make(
        T, H, V, 64, torch.bfloat16, bias=False, device="cuda"
    )
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    cfg = LossConfig(kl_beta=0.05)
    loss, _ = fused(impl, None)(h, w, labels, old, adv, seq_ids, mask, ref_logp=ref, cfg=cfg)
    loss.backward()
    # reference in row chunks: logp per chunk, then the loss on logp, then grads through a chunked autograd graph
    logp = torch.cat(
        [R.token_logprobs_linear(hc, weight, lc) for hc, lc in zip(hidden.split(1024), labels.split(1024))]
    )
    lp = logp.detach().requires_grad_()
    loss_r, _ = R.policy_loss(lp, old, adv, seq_ids, mask, ref_logp=ref, cfg=cfg)
    (g,) = torch.autograd.grad(loss_r, lp)
    assert loss.item() == pytest.approx(loss_r.item(), rel=2e-2, abs=1e-4)
    rows = slice(0, 512)
    h2 = hidden[rows].float().requires_grad_()
    (R.token_logprobs_linear(h2, weight.float(), labels[rows]) * g[rows]).sum().backward()
    assert (h.grad[rows].float() - h2.grad).abs().max().item() < 2e-2 * (1 + h2.grad.abs().max().item())


# ----------------------------------------------------------------------------------------------------------------
# chunked-specific shapes and modes


@pytest.mark.parametrize("chunk_size", [1, 37, 64])  # one token per chunk; exactly T; T < C
def test_chunk_sizes(chunk_size):
    batch = make(37, 24, 101, 4, torch.float32)
    for cfg in (LossConfig(kl_beta=0.1), LossConfig(ratio_level="sequence", loss_agg="seq-mean-token-mean")):
        loss, stats, dh, dw, db = run(fused("chunked", chunk_size), *batch, cfg, 1.0)
        loss_r, stats_r, dh_r, dw_r, db_r = run(R.fused_linear_policy_loss, *batch, cfg, 1.0)
        assert loss.item() == pytest.approx(loss_r.item(), rel=1e-5, abs=1e-6)
        for a, b in ((dh, dh_r), (dw, dw_r), (db, db_r)):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_on_policy_old_logp_none(impl, ratio_level):
    """old_logp=None is the same loss and gradients as passing the detached current log-probs."""
    hidden, weight, b, labels, old, adv, seq_ids, mask, ref, teacher = make(37, 24, 101, 4, torch.float32)
    cfg = LossConfig(ratio_level=ratio_level, kl_beta=0.1, loss_agg="seq-mean-token-sum")
    with torch.no_grad():
        cur = R.token_logprobs_linear(hidden, weight, labels, bias=b)
    got = run(fused(impl), hidden, weight, b, labels, None, adv, seq_ids, mask, ref, None, cfg, 1.0)
    want = run(R.fused_linear_policy_loss, hidden, weight, b, labels, cur, adv, seq_ids, mask, ref, None, cfg, 1.0)
    want_none = run(R.fused_linear_policy_loss, hidden, weight, b, labels, None, adv, seq_ids, mask, ref, None, cfg,
                    1.0)  # fmt: skip
    assert got[0].item() == pytest.approx(want[0].item(), rel=1e-5, abs=1e-6)
    assert got[1]["ratio_mean"].item() == pytest.approx(1.0) and got[1]["ratio_max"].item() == pytest.approx(1.0)
    for i in (2, 3, 4):
        assert torch.allclose(got[i], want[i], atol=1e-5, rtol=1e-4)
        assert torch.allclose(want_none[i], want[i], atol=1e-6, rtol=1e-5)


class _CountOps(TorchDispatchMode):
    """Records every aten op and the new storages (with their shapes) that the ops create."""

    def __init__(self):
        super().__init__()
        self.ops, self.storages = [], {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.overloadpacket.__name__)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.storages.setdefault((st.data_ptr(), st.nbytes()), tuple(t.shape))
        return out


@pytest.mark.parametrize("cfg, gemms", [(LossConfig(kl_beta=0.1), 3), (LossConfig(ratio_level="sequence"), 4)])
def test_chunked_gemm_count(cfg, gemms):
    """3 GEMMs per chunk when g is known in the forward (token ratio), 4 for GSPO with old log-probs given."""
    T, chunk = 40, 16
    batch = make(T, 24, 101, 4, torch.float32, bias=False)
    with _CountOps() as mode:
        run(fused("chunked", chunk), *batch, cfg, 1.0)
    matmuls = sum(op in ("mm", "addmm", "addmm_") for op in mode.ops)
    assert matmuls == gemms * -(-T // chunk), mode.ops


@pytest.mark.parametrize("impl, fp32_logits", [("chunked", True), ("chunked", False), ("tiled", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_tv_allocation(impl, fp32_logits, dtype):
    """Measured in bytes: the only V-wide storage bigger than a few [V] vectors is the chunk buffer (chunked: fp32
    logits, or the input dtype with fp32_logits=False) or a weight-shaped gradient buffer; the reference, for
    contrast, allocates [T, V]."""
    T, H, V, chunk = 96, 24, 203, 16
    elem = torch.finfo(dtype).bits // 8
    batch = make(T, H, V, 6, dtype)
    cfg = LossConfig(kl_beta=0.1)

    def v_wide(fn):
        with _CountOps() as mode:
            run(fn, *batch, cfg, 1.0)
        return {(nbytes, shape) for (_, nbytes), shape in mode.storages.items() if nbytes > 4 * V * 4}

    # weight-shaped (dW, fp32 and input dtype) and hidden-shaped (dh) gradient buffers, and the chunk buffer
    z_bytes = chunk * V * (4 if fp32_logits else elem)
    allowed = {V * H * 4, V * H * elem, T * H * 4, T * H * elem} | ({z_bytes} if impl == "chunked" else set())
    big = v_wide(functools.partial(fused(impl, chunk), fp32_logits=fp32_logits))
    assert {nbytes for nbytes, _ in big} <= allowed, sorted(big)
    if impl == "chunked":
        assert (z_bytes, (chunk, V)) in big  # the chunk buffer is there, and it is the only one
    assert any(nbytes >= T * V * elem for nbytes, _ in v_wide(R.fused_linear_policy_loss))


# ----------------------------------------------------------------------------------------------------------------
# inputs real training produces (issue 9): -100 labels, garbage in masked rows, strided views


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_ignored_labels_and_nan_in_masked_rows(impl, ratio_level):
    hidden, weight, b, labels, old, adv, seq_ids, mask, ref, teacher = make(37, 24, 101, 4, torch.float32)
    labels[[2, 5, 30]] = -100  # ignored tokens, with mask set
    mask[[2, 5, 30]] = True
    masked = (~mask) | (labels == -100)
    dirty = hidden.clone()
    dirty[masked] = float("nan")
    dirty[masked.nonzero()[0]] = float("inf")
    cfg = LossConfig(ratio_level=ratio_level, kl_beta=0.1, teacher_beta=0.05)
    loss, stats, dh, dw, db = run(fused(impl), dirty, weight, b, labels, old, adv, seq_ids, mask, ref, teacher, cfg,
                                  0.9)  # fmt: skip
    loss_r, stats_r, dh_r, dw_r, db_r = run(R.fused_linear_policy_loss, hidden, weight, b, labels, old, adv, seq_ids,
                                            mask, ref, teacher, cfg, 0.9)  # fmt: skip
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all() and torch.isfinite(db).all()
    assert torch.count_nonzero(dh[masked]) == 0  # exact zeros
    assert loss.item() == pytest.approx(loss_r.item(), rel=1e-5, abs=1e-6)
    for k in stats:
        assert stats[k].item() == pytest.approx(stats_r[k].item(), rel=1e-5, abs=1e-6), k
    for a, r in ((dh, dh_r), (dw, dw_r), (db, db_r)):
        assert torch.allclose(a, r, atol=1e-5, rtol=1e-4)
    # the reference gives the same answer on the dirty input (it defines the right answer there too)
    loss_d, _, dh_d, dw_d, _ = run(R.fused_linear_policy_loss, dirty, weight, b, labels, old, adv, seq_ids, mask,
                                   ref, teacher, cfg, 0.9)  # fmt: skip
    assert loss_d.item() == loss_r.item() and torch.isfinite(dh_d).all() and torch.isfinite(dw_d).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_token_logprobs_linear_ignored_labels(impl):
    hidden, weight, b, labels, *_ = make(37, 24, 101, 4, torch.float32)
    labels[::5] = -100
    hidden[::5] = float("nan")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, en = linear(impl)(h, w, labels, bias=b, return_entropy=True)
    g1, g2 = torch.randn(37), torch.randn(37)
    ((lp * g1).sum() + (en * g2).sum()).backward()
    assert torch.all(lp[::5] == 0) and torch.all(en[::5] == 0)
    assert torch.count_nonzero(h.grad[::5]) == 0 and torch.isfinite(w.grad).all()
    clean = hidden.clone()
    clean[::5] = 0.0
    h2, w2 = clean.clone().requires_grad_(), weight.clone().requires_grad_()
    lp2, en2 = R.token_logprobs_linear(h2, w2, labels, bias=b, return_entropy=True)
    ((lp2 * g1).sum() + (en2 * g2).sum()).backward()
    assert torch.allclose(lp, lp2, atol=1e-5) and torch.allclose(en, en2, atol=1e-5)
    assert torch.allclose(h.grad, h2.grad, atol=1e-5) and torch.allclose(w.grad, w2.grad, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_value_checks_off_out_of_range_labels_are_masked(impl):
    hidden, weight, b, labels, *_ = make(20, 16, 50, 2, torch.float32)
    labels[3], labels[4] = 50, -7
    ops.set_value_checks(False)
    try:
        lp = linear(impl)(hidden, weight, labels)
    finally:
        ops.set_value_checks(True)
    assert lp[3] == 0 and lp[4] == 0 and torch.isfinite(lp).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs(impl):
    """hidden with a column stride, weight a transposed view, labels[::2], bias[::2]: same answer as contiguous."""
    T, H, V = 23, 20, 77
    hidden, weight, b, labels, old, adv, seq_ids, mask, ref, teacher = make(T, H, V, 3, torch.float32)
    h_wide = torch.zeros(T, 2 * H)
    h_wide[:, ::2] = hidden
    w_t = weight.t().contiguous()  # (H, V): weight = w_t.t() has strides (1, V)
    b_wide = torch.zeros(2 * V)
    b_wide[::2] = b
    l_wide = torch.zeros(2 * T, dtype=torch.long)
    l_wide[::2] = labels
    cfg = LossConfig(kl_beta=0.1)

    def go(h_leaf, w_leaf, b_leaf, view):
        h_leaf, w_leaf, b_leaf = (t.clone().requires_grad_() for t in (h_leaf, w_leaf, b_leaf))
        h, w, bb, lab = view(h_leaf, w_leaf, b_leaf)
        loss, _ = fused(impl)(h, w, lab, old, adv, seq_ids, mask, bias=bb, ref_logp=ref, cfg=cfg)
        loss.backward()
        return loss.detach(), h_leaf.grad, w_leaf.grad, b_leaf.grad

    strided = go(h_wide, w_t, b_wide, lambda h, w, bb: (h[:, ::2], w.t(), bb[::2], l_wide[::2]))
    plain = go(hidden, weight, b, lambda h, w, bb: (h, w, bb, labels))
    assert strided[0].item() == pytest.approx(plain[0].item(), rel=1e-6)
    assert torch.allclose(strided[1][:, ::2], plain[1], atol=1e-6) and torch.count_nonzero(strided[1][:, 1::2]) == 0
    assert torch.allclose(strided[2].t(), plain[2], atol=1e-6)
    assert torch.allclose(strided[3][::2], plain[3], atol=1e-6) and torch.count_nonzero(strided[3][1::2]) == 0


def test_fp32_means_ieee_in_tiled_dots():
    from csrc_triton import linear_logprob

    cpu = torch.device("cpu")
    cuda = torch.device("cuda")
    for kind in ("fwd", "dh", "dw"):
        assert linear_logprob._blocks(cuda, torch.float32, False, kind)["PRECISION"] == "ieee"
        assert linear_logprob._blocks(cuda, torch.float32, True, kind)["PRECISION"] == "tf32"
        assert linear_logprob._blocks(cpu, torch.float32, False, kind)["PRECISION"] == "ieee"


# ----------------------------------------------------------------------------------------------------------------
# the step normaliser (issue 10 item 5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_agg", R.LOSS_AGGS)
def test_micro_batches_sum_to_the_step_loss(impl, loss_agg):
    """With the step's LossNorm, micro-batch losses sum to the whole batch's loss and their gradients are its
    gradients, for every loss_agg (sequences are never split across micro-batches)."""
    T, H, V, S = 40, 16, 61, 6
    hidden, weight, b, labels, old, adv, seq_ids, mask, ref, teacher = make(T, H, V, S, torch.float32)
    cfg = LossConfig(loss_agg=loss_agg, kl_beta=0.1, ratio_level="sequence" if loss_agg.endswith("mean") else "token")
    whole = run(fused(impl), hidden, weight, b, labels, old, adv, seq_ids, mask, ref, None, cfg, 1.0)
    cut = int((seq_ids < 3).sum())  # micro-batch 1: sequences 0-2, micro-batch 2: sequences 3-5
    parts = [slice(0, cut), slice(cut, T)]
    local = [seq_ids[parts[0]], seq_ids[parts[1]] - 3]
    norm = ops.LossNorm.from_batches([(local[0], mask[parts[0]]), (local[1], mask[parts[1]])])
    h, w, bb = (t.clone().requires_grad_() for t in (hidden, weight, b))
    total = 0.0
    for sl, sid, advs in zip(parts, local, (adv[:3], adv[3:])):
        loss, _ = fused(impl)(h[sl], w, labels[sl], old[sl], advs, sid, mask[sl], bias=bb, ref_logp=ref[sl],
                              cfg=cfg, norm=norm)  # fmt: skip
        (loss * 1.3).backward()
        total += loss.item()
    assert total == pytest.approx(whole[0].item(), rel=1e-5, abs=1e-7)
    for got, want in ((h.grad, whole[2]), (w.grad, whole[3]), (bb.grad, whole[4])):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# GPU readiness without a GPU: compile for sm_80 / sm_90 and read ptxas' register and spill report


@pytest.mark.slow
def test_linear_kernels_compile_without_spills():
    """benches/linear_kernel_regs.py compiles every linear-path kernel at its CUDA launch constants for sm_80 and
    sm_90 (in a subprocess: the compiler needs the real JIT functions, not the interpreter's) and fails on a spill,
    shared memory over the limit, or a half-precision tl.dot that is not a tensor-core mma. ~1-2 min on 2 cores."""
    import os
    import pathlib
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    rep = subprocess.run([sys.executable, str(root / "benches" / "linear_kernel_regs.py")], capture_output=True,
                         text=True, env=env, cwd=root, timeout=900)  # fmt: skip
    print(rep.stdout)
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_loss_under_no_grad(impl):
    """Evaluation under no_grad: the same loss and stats, no gradient work needed."""
    hidden, weight, b, labels, old, adv, seq_ids, mask, ref, teacher = make(37, 24, 101, 4, torch.float32)
    cfg = LossConfig(kl_beta=0.1)
    with torch.no_grad():
        loss, stats = fused(impl)(hidden, weight, labels, old, adv, seq_ids, mask, bias=b, ref_logp=ref, cfg=cfg)
    want, want_stats = R.fused_linear_policy_loss(hidden, weight, labels, old, adv, seq_ids, mask, bias=b,
                                                  ref_logp=ref, cfg=cfg)  # fmt: skip
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    assert stats["entropy"].item() == pytest.approx(want_stats["entropy"].item(), rel=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_random_inputs_property(seed):
    """Random shapes, chunk sizes, dtypes, temperatures, loss configs, masks, -100 labels, NaN in masked rows and
    strided hidden: every output and gradient of both impls against the reference on the clean input."""
    rng = torch.Generator().manual_seed(1000 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    T, H, V, S = pick([5, 23, 41]), pick([8, 17, 33]), pick([31, 77, 130]), pick([1, 3, 6])
    dtype = pick([torch.float32, torch.bfloat16])
    cfg = LossConfig(
        loss_type=pick(["ppo", "cispo"]),
        ratio_level=pick(["token", "sequence"]),
        loss_agg=pick(list(R.LOSS_AGGS)),
        kl_estimator=pick(list(R.KL_ESTIMATORS)),
        kl_beta=pick([0.0, 0.1]),
        teacher_beta=pick([0.0, 0.2]),
        dual_clip_c=pick([None, 2.5]),
    )
    temperature = pick([0.7, 1.0, 1.3])
    hidden, weight, b, labels, old, adv, seq_ids, mask, ref, teacher = make(T, H, V, S, dtype, bias=pick([True, False]))
    labels[torch.rand(T, generator=rng) < 0.15] = -100
    on_policy = pick([True, False])
    masked = (~mask) | (labels == -100)
    dirty = torch.zeros(T, 2 * H, dtype=dtype)
    dirty[:, ::2] = hidden
    dirty[masked, ::2] = float("nan")
    want = run(R.fused_linear_policy_loss, hidden, weight, b, labels, None if on_policy else old, adv, seq_ids, mask,
               ref, teacher, cfg, temperature, upcast=True)  # fmt: skip
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for impl in IMPLS:
        chunk = pick([1, 7, 64])
        got = run(fused(impl, chunk), dirty[:, ::2], weight, b, labels, None if on_policy else old, adv, seq_ids, mask,
                  ref, teacher, cfg, temperature)  # fmt: skip
        assert got[0].item() == pytest.approx(want[0].item(), rel=tol, abs=tol), (impl, cfg)
        for k in want[1]:
            assert got[1][k].item() == pytest.approx(want[1][k].item(), rel=tol, abs=tol), (impl, k, cfg)
        for name, g, w in zip(("dh", "dw", "db"), got[2:], want[2:]):
            if w is None:
                continue
            assert torch.isfinite(g).all(), (impl, name)
            err = (g.float() - w.float()).abs().max().item()
            assert err <= tol * (1 + w.abs().max().item()), (impl, name, err, cfg)
        assert torch.count_nonzero(got[2][masked]) == 0, impl


# ----------------------------------------------------------------------------------------------------------------
# issue 21: fp32 logits in the chunked LM head, chunk size from total memory, the TF32 setting


def _float64_logp(hidden, weight, labels, g=None):
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    z = h64 @ w64.T
    lp = torch.log_softmax(z, -1).gather(1, labels[:, None])[:, 0]
    ent = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    if g is not None:
        (lp * g.double()).sum().backward()
    return lp.detach(), ent.detach(), h64.grad, w64.grad


def test_chunked_logits_kept_in_fp32():
    """bf16 inputs, T=48, H=256, V=4099, logits up to |46| (the issue's demonstration): log-probs and entropy from
    fp32 logits are within 1e-4 nats of float64 (measured 6.2e-6, the tiled kernel's 5.6e-6); logits rounded to
    bf16 (fp32_logits=False, the previous default) are off by ~0.1 nats. Gradients (V=1031, random upstream
    gradient): dZ still goes to the GEMMs in bf16, but p comes from fp32 logits: less than half the error."""
    g = torch.Generator().manual_seed(21)
    T, H, V = 48, 256, 4099
    hidden = torch.randn(T, H, generator=g).bfloat16()
    weight = (torch.randn(V, H, generator=g) * (10 / H**0.5)).bfloat16()
    labels = torch.randint(0, V, (T,), generator=g)
    lp64, ent64, _, _ = _float64_logp(hidden, weight, labels)
    with torch.no_grad():
        lp, ent = linear("chunked")(hidden, weight, labels, return_entropy=True)
        lp16, ent16 = linear("chunked")(hidden, weight, labels, return_entropy=True, fp32_logits=False)
    err, err16 = (lp.double() - lp64).abs().max().item(), (lp16.double() - lp64).abs().max().item()
    print(f"max logp error vs float64: fp32 logits {err:.2e}, bf16 logits {err16:.2e}")
    assert err < 1e-4 and (ent.double() - ent64).abs().max().item() < 1e-4
    assert err16 > 1e-2  # what the opt-out costs, and what the default used to be

    V = 1031
    weight = weight[:V].contiguous()
    labels = labels % V
    up = torch.randn(T, generator=g)
    _, _, dh64, dw64 = _float64_logp(hidden, weight, labels, up)
    errors = {}
    for fp32_logits in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        (linear("chunked")(h, w, labels, fp32_logits=fp32_logits) * up).sum().backward()
        for name, got, want in (("dh", h.grad, dh64), ("dw", w.grad, dw64)):
            errors[name, fp32_logits] = (got.double() - want).abs().max().item() / want.abs().max().item()
    print("max gradient error vs float64, relative to the largest entry:", errors)
    for name in ("dh", "dw"):  # dZ is rounded to bf16 for the GEMMs either way; its p no longer is
        assert errors[name, True] < 0.02 and errors[name, True] < 0.5 * errors[name, False], errors


def test_chunk_size_depends_on_total_memory_only(monkeypatch):
    """The chunk size is a pure function of (tokens, V, H, dtypes, fp32_logits, the device's TOTAL memory, a requested
    value): free memory is never asked, so a resumed process runs the same GEMM shapes."""
    from types import SimpleNamespace

    from csrc_triton import linear_chunked

    total = {"bytes": 80 * 2**30}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(
        total_memory=total["bytes"]))  # fmt: skip

    def no_free_memory(*a, **k):
        raise AssertionError("chunk sizing must not depend on free memory")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_free_memory)
    cuda = torch.device("cuda")
    V, H, bf16 = 151936, 3584, torch.bfloat16
    sizes = {}
    for gib in (141, 80, 40, 24, 16, 8):
        total["bytes"] = gib * 2**30
        sizes[gib] = ops.lm_head_chunk_size(V, H, bf16, cuda)
        per_token = V * 4 + H * 2
        assert sizes[gib] * per_token <= max(gib * 2**30 // 32, 512 * per_token)
        assert sizes[gib] == linear_chunked.chunk_size(None, V, H, bf16, cuda)
    assert sizes == {141: 4096, 80: 4096, 40: 2048, 24: 1024, 16: 512, 8: 512}
    total["bytes"] = 40 * 2**30
    assert ops.lm_head_chunk_size(V, H, bf16, cuda, fp32_logits=False) == 4096  # bf16 logits: half the bytes
    assert ops.lm_head_chunk_size(V, H, bf16, cuda, chunk_size=1000) == 1000  # a config value wins
    assert linear_chunked.chunk_size(300, V, H, bf16, cuda) == 300  # clamped to the batch's tokens
    assert ops.lm_head_chunk_size(V, H, bf16, "cpu") == linear_chunked.CPU_CHUNK
    with pytest.raises(ValueError, match="chunk_size=0"):
        ops.lm_head_chunk_size(V, H, bf16, cuda, chunk_size=0)
    with pytest.raises(TypeError, match="fp32_logits must be a bool"):
        ops.token_logprobs_linear(torch.randn(4, 8), torch.randn(16, 8), torch.zeros(4, dtype=torch.long),
                                  fp32_logits=1)  # fmt: skip


def test_tf32_guard_uses_the_precision_api_in_force():
    """transformers' enable_tf32 sets torch's new fp32_precision API; after that, torch 2.13 raises on any read of
    the legacy allow_tf32 flag. The guard reads and sets the new API, restores it (an inherited value stays
    inherited), and never touches the legacy flag."""
    from csrc_triton import linear_chunked

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9: only the legacy flag exists")
    cuda = torch.device("cuda")
    try:
        matmul.fp32_precision = "tf32"  # what transformers.enable_tf32 does
        with linear_chunked._tf32(cuda, False):
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
        with linear_chunked._tf32(cuda, True):
            assert matmul.fp32_precision == "tf32"
        # inherited from the generic setting: restored as inherited, so the generic setting still reaches cuBLAS
        matmul.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"
        with linear_chunked._tf32(cuda, False):
            assert matmul.fp32_precision == "ieee"
        torch.backends.fp32_precision = "ieee"
        assert matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision = "none"
        torch.backends.fp32_precision = "none"
    assert matmul.allow_tf32 is False  # the legacy flag is readable again once both are back to "none"
    with linear_chunked._tf32(torch.device("cpu"), True):  # not CUDA: nothing to set
        assert matmul.fp32_precision == "none"


def test_tiled_bytes_counted_through_the_interpreter(monkeypatch):
    """The tiled kernels at their CUDA tiles, run through the Triton interpreter with every load and store counted
    (benches/interp_bytes.py): linear_logprob.tiled_bytes is the count (the O(T), O(V) vectors aside), so its value
    at T=16384, V=151936, H=3584 (3.9 TB per backward, 2.2 TB of it fp32 accumulator traffic; 71 GB for chunked) is
    what the kernels request there."""
    import pathlib
    import sys

    if DEVICE != "cpu":
        pytest.skip("bytes are counted through the Triton interpreter")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from benches import interp_bytes
    from csrc_triton import linear_chunked, linear_logprob

    real = linear_logprob._blocks

    def cuda_tiles(device, dtype, allow_tf32, kind):
        b = real(torch.device("cuda"), dtype, allow_tf32, kind)
        b.pop("num_warps"), b.pop("num_stages")
        return dict(b, DOT_UPCAST=True)  # the interpreter's half dots need fp32 operands (loads are unchanged)

    monkeypatch.setattr(linear_logprob, "_blocks", cuda_tiles)
    T, V, H, dtype = 128, 192, 64, torch.bfloat16
    hidden, weight, _, labels, *_ = make(T, H, V, 2, dtype, bias=False)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    with interp_bytes.count_bytes() as counter:
        linear("tiled")(h, w, labels).sum().backward()
    got = {}
    for launch in counter.launches:
        got[launch.kernel] = got.get(launch.kernel, 0) + launch.read + launch.written
    want = linear_logprob.tiled_bytes(T, V, H, dtype)
    for kernel, kind in (("_fwd_kernel", "fwd"), ("_bwd_dh_kernel", "dh"), ("_bwd_dw_kernel", "dw")):
        assert want[kind] <= got[kernel] <= 1.05 * want[kind], (kernel, got[kernel], want[kind])
    big = linear_logprob.tiled_bytes(16384, 151936, 3584, dtype)
    assert 3.8e12 < big["dh"] + big["dw"] < 4.0e12 and 2.2e12 < big["acc"] < 2.3e12
    assert linear_chunked.chunked_bytes(16384, 151936, 3584, dtype, 4096) < 0.02 * (big["dh"] + big["dw"])


def test_tiled_warns_at_large_shapes(caplog):
    import logging

    ops._tiled_warned.clear()
    with caplog.at_level(logging.WARNING, logger="exgrpo_fast.ops"):
        ops._warn_if_tiled_is_heavy(4096, 32000, 896, torch.bfloat16)  # 64 GB: quiet
        assert not caplog.records
        ops._warn_if_tiled_is_heavy(16384, 151936, 3584, torch.bfloat16)
        ops._warn_if_tiled_is_heavy(16384, 151936, 3584, torch.bfloat16)  # once per shape
    assert len(caplog.records) == 1 and "4.46 TB" in caplog.text and "71 GB" in caplog.text
