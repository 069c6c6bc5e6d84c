"""The reference is the truth for every kernel test, so it gets its own check: a second, deliberately naive
implementation (Python loops over sequences and tokens, straight from DESIGN.md section 3) must agree with it."""

import math

import pytest
import torch

from exgrpo_fast import reference as R
from exgrpo_fast.reference import LossConfig


def naive_policy_loss(logp, old, adv, seq_ids, mask, ref, teacher, cfg):
    """Loop-by-loop policy loss (float64 Python scalars). Returns the loss value."""
    S = len(adv)
    seqs = {s: [t for t in range(len(seq_ids)) if seq_ids[t] == s and mask[t]] for s in range(S)}
    seq_lr = {s: (sum(logp[t] - old[t] for t in ts) / len(ts) if ts else 0.0) for s, ts in seqs.items()}

    def est(d):
        return {
            "k1": d,
            "k2": d * d / 2,
            "k3": math.exp(-max(-20, min(20, d))) + max(-20, min(20, d)) - 1,
            "abs": abs(d),
        }[cfg.kl_estimator]

    per_seq_sum, per_seq_cnt = {}, {}
    for s, ts in seqs.items():
        total = 0.0
        for t in ts:
            a = adv[s]
            lr = seq_lr[s] if cfg.ratio_level == "sequence" else logp[t] - old[t]
            r = math.exp(max(-20.0, min(20.0, lr)))
            if cfg.loss_type == "ppo":
                r_unclipped = r if cfg.delta is None else min(r, cfg.delta)
                x = max(-a * r_unclipped, -a * min(max(r, 1 - cfg.clip_low), 1 + cfg.clip_high))
                if cfg.dual_clip_c is not None and a < 0:
                    x = min(x, -a * cfg.dual_clip_c)
            else:
                x = -min(r, 1 + cfg.clip_high) * a * logp[t]
            if ref is not None:
                x += cfg.kl_beta * est(logp[t] - ref[t])
            if teacher is not None:
                x += cfg.teacher_beta * est(logp[t] - teacher[t])
            total += x
        per_seq_sum[s], per_seq_cnt[s] = total, len(ts)
    live = [s for s in range(S) if per_seq_cnt[s] > 0]
    n_tok = sum(per_seq_cnt.values())
    if cfg.loss_agg == "token-mean":
        return sum(per_seq_sum.values()) / max(n_tok, 1)
    if cfg.loss_agg == "seq-mean-token-mean":
        return sum(per_seq_sum[s] / per_seq_cnt[s] for s in live) / max(len(live), 1)
    if cfg.loss_agg == "seq-mean-token-sum":
        return sum(per_seq_sum[s] for s in live) / max(len(live), 1)
    max_len = cfg.max_len if cfg.max_len is not None else max(per_seq_cnt.values())
    return sum(per_seq_sum.values()) / (max(len(live), 1) * max_len)


CONFIGS = [
    LossConfig(),
    LossConfig(loss_type="cispo", clip_high=0.3),
    LossConfig(ratio_level="sequence", loss_agg="seq-mean-token-mean", clip_low=0.1, clip_high=0.15),
    LossConfig(dual_clip_c=2.0, delta=1.5, loss_agg="seq-mean-token-sum", kl_beta=0.1, kl_estimator="k1"),
    LossConfig(loss_agg="seq-mean-token-sum-norm", kl_beta=0.2, teacher_beta=0.3, kl_estimator="k2"),
    LossConfig(loss_agg="seq-mean-token-sum-norm", max_len=9, kl_beta=0.05, teacher_beta=0.1, kl_estimator="abs"),
    LossConfig(loss_type="cispo", ratio_level="sequence", kl_beta=0.1, teacher_beta=0.1, kl_estimator="k3"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.loss_type}-{c.ratio_level}-{c.loss_agg}-{c.kl_estimator}")
def test_policy_loss_matches_naive_loops(cfg):
    T, S = 29, 5
    seq_ids = torch.randint(0, S, (T,))
    seq_ids[seq_ids == 3] = 2  # sequence 3 has no token at all
    mask = torch.rand(T) > 0.25
    mask[seq_ids == 4] = False  # sequence 4 has tokens but none masked in
    old = -torch.rand(T) * 3
    logp = old + 0.6 * torch.randn(T)  # ratios far enough from 1 to hit both clips
    ref, teacher = old - 0.2 * torch.randn(T), old + 0.3 * torch.randn(T)
    adv = torch.randn(S)
    loss, stats = R.policy_loss(logp, old, adv, seq_ids, mask, ref_logp=ref, teacher_logp=teacher, cfg=cfg)
    want = naive_policy_loss(
        logp.tolist(), old.tolist(), adv.tolist(), seq_ids.tolist(), mask.tolist(), ref.tolist(), teacher.tolist(), cfg
    )
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert set(stats) == set(R.STAT_NAMES)
    assert 0.0 <= stats["clip_frac_low"].item() <= 1.0 and 0.0 <= stats["clip_frac_high"].item() <= 1.0


def test_policy_loss_gradient_matches_finite_differences():
    T, S = 11, 3
    seq_ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    old = -torch.rand(T, dtype=torch.float64) * 2
    logp = (old + 0.05 * torch.randn(T, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(S, dtype=torch.float64)
    cfg = LossConfig(ratio_level="sequence", loss_agg="seq-mean-token-mean", kl_beta=0.1)
    ref = old.clone()

    def f(x):
        return R.policy_loss(x, old, adv, seq_ids, mask, ref_logp=ref, cfg=cfg)[0]

    # the reference computes in fp32; check its analytic gradient against central differences on a smooth region
    (g,) = torch.autograd.grad(f(logp), logp)
    h = 1e-3
    for t in range(T):
        e = torch.zeros(T, dtype=torch.float64)
        e[t] = h
        fd = (f(logp.detach() + e) - f(logp.detach() - e)).item() / (2 * h)
        assert g[t].item() == pytest.approx(fd, abs=2e-3), t
    assert g[2].item() == 0.0 and g[6].item() == 0.0  # masked tokens get no gradient


def test_all_masked_gives_zero_loss_and_grad():
    logp = torch.randn(6, requires_grad=True)
    loss, stats = R.policy_loss(
        logp,
        torch.full((6,), -float("inf")),
        torch.ones(2),
        torch.tensor([0, 0, 0, 1, 1, 1]),
        torch.zeros(6, dtype=torch.bool),
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logp.grad == 0)
    assert all(torch.isfinite(v) for v in stats.values())


def test_token_logprobs_and_entropy():
    logits = torch.randn(7, 13, dtype=torch.float64)
    labels = torch.randint(0, 13, (7,))
    logp, ent = R.token_logprobs(logits, labels, temperature=0.7, return_entropy=True)
    p = torch.softmax(logits / 0.7, -1)
    assert torch.allclose(logp, torch.log(p[torch.arange(7), labels]).float(), atol=1e-6)
    assert torch.allclose(ent, -(p * p.log()).sum(-1).float(), atol=1e-5)
    assert logp.dtype == torch.float32


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 1.0, 3.0, 2.0, 5.0])
    g = torch.tensor([0, 0, 0, 1, 2, 2])
    adv = R.group_advantages(r, g, eps=0.0)
    std0 = math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)
    want = [
        (1 - 2 / 3) / std0,
        (0 - 2 / 3) / std0,
        (1 - 2 / 3) / std0,
        0.0,
        -1.5 / math.sqrt(4.5),
        1.5 / math.sqrt(4.5),
    ]
    assert adv.tolist() == pytest.approx(want, rel=1e-6)
    assert R.group_advantages(r, g, scale="none").tolist() == pytest.approx([1 / 3, -2 / 3, 1 / 3, 0, -1.5, 1.5])
    batch_std = torch.std(r).item()
    assert R.group_advantages(r, g, scale="batch", eps=0.0)[0].item() == pytest.approx((1 / 3) / batch_std)
    # zero-variance group: 0, not NaN
    assert R.group_advantages(torch.ones(4), torch.tensor([0, 0, 1, 1])).tolist() == [0.0] * 4


def test_group_advantages_nan():
    r = torch.tensor([1.0, float("nan"), 0.0, 2.0])
    g = torch.tensor([0, 0, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        R.group_advantages(r, g)
    adv = R.group_advantages(r, g, nan_to_zero=True, eps=0.0)
    assert adv[1].item() == 0.0 and adv[3].item() == 0.0
    assert adv[0].item() == pytest.approx(0.5 / math.sqrt(0.5))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"loss_type": "grpo"}, "loss_type"),
        ({"ratio_level": "tok"}, "ratio_level"),
        ({"clip_low": 1.0}, "clip_low"),
        ({"clip_high": -0.1}, "clip_high"),
        ({"dual_clip_c": 1.0}, "dual_clip_c"),
        ({"delta": 1.1}, "delta"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"kl_beta": -1.0}, "kl_beta"),
        ({"loss_agg": "sum"}, "loss_agg"),
        ({"max_len": 0}, "max_len"),
        ({"clip_low": float("nan")}, "clip_low"),
    ],
)
def test_loss_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LossConfig(**kwargs)


def naive_entropy_and_logp(row, label, temperature):
    """Python-scalar (float64) log-prob and entropy of one row, skipping -inf entries (0 * log 0 = 0)."""
    xs = [x / temperature for x in row]
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs if x != -math.inf))
    ent = -sum(math.exp(x - lse) * (x - lse) for x in xs if x != -math.inf)
    return xs[label] - lse, ent


def test_vocab_masked_entropy_is_finite_with_exact_gradient():
    T, V = 4, 9
    logits = torch.randn(T, V, dtype=torch.float64)
    labels = torch.tensor([0, 3, 8, 5])
    banned = torch.zeros(T, V, dtype=torch.bool)
    banned[:, 1] = True
    banned[2, 2:7] = True
    logits = logits.masked_fill(banned, -math.inf)
    x = logits.clone().requires_grad_()
    logp, ent = R.token_logprobs(x, labels, temperature=0.8, return_entropy=True)
    for t in range(T):
        want_lp, want_ent = naive_entropy_and_logp(logits[t].tolist(), int(labels[t]), 0.8)
        assert logp[t].item() == pytest.approx(want_lp, abs=1e-6)
        assert ent[t].item() == pytest.approx(want_ent, abs=1e-6)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.count_nonzero(x.grad[banned]) == 0
    # the gradient on the finite entries equals the one of the same problem without the banned columns
    keep = ~banned[0]
    y = logits[0, keep].clone().requires_grad_()
    lp0, e0 = R.token_logprobs(y[None], torch.tensor([0]), temperature=0.8, return_entropy=True)
    (lp0.sum() + e0.sum()).backward()
    torch.testing.assert_close(x.grad[0, keep], y.grad)


def test_ignore_index_and_nan_rows_never_reach_the_gradient():
    logits = torch.randn(5, 7)
    labels = torch.tensor([1, -100, 2, -100, 6])
    logits[1] = float("nan")
    logits[3, 2] = float("inf")
    x = logits.clone().requires_grad_()
    logp, ent = R.token_logprobs(x, labels, return_entropy=True)
    assert logp[1] == 0 and logp[3] == 0 and ent[1] == 0 and ent[3] == 0
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.count_nonzero(x.grad[[1, 3]]) == 0
    # fused: mask 0 rows are dead too, NaN in them and in old_logp changes nothing
    old, adv = torch.randn(5), torch.randn(2)
    seq_ids, mask = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([True, True, False, True, True])
    poisoned = logits.clone()
    poisoned[2] = float("nan")
    old_p = old.clone()
    old_p[[1, 2, 3]] = float("nan")
    a = R.fused_policy_loss(poisoned.requires_grad_(), labels, old_p, adv, seq_ids, mask)
    clean = logits.clone()
    clean[[1, 2, 3]] = 0.0
    b = R.fused_policy_loss(clean, labels, old, adv, seq_ids, mask & (labels != -100))
    assert a[0].item() == pytest.approx(b[0].item(), abs=1e-7)
    a[0].backward()
    assert torch.isfinite(poisoned.grad).all() and torch.count_nonzero(poisoned.grad[[1, 2, 3]]) == 0
