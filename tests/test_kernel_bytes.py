"""Bytes the log-prob kernels request, counted through the Triton interpreter (benches/interp_bytes.py): the
roofline formula of csrc_triton/logprob.py, checked per row on T=192, V=4099 (not a multiple of any block), 35% of
the rows masked. Live rows are read at most twice and written once; masked rows (loss mask 0 or label -100) are
written once (zeros) and never read, whatever they hold."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benches/ lives next to tests/

from benches import interp_bytes  # noqa: E402
from exgrpo_fast import ops  # noqa: E402
from exgrpo_fast import reference as R  # noqa: E402

T, V, S = 192, 4099, 4


def _require_interpreter():
    if torch.cuda.is_available() or ops.backend_for(torch.device("cpu")) != "triton":
        pytest.skip("bytes are counted through the Triton interpreter (CPU, TRITON_INTERPRET=1)")


def _batch(dtype):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(T, V, generator=g).to(dtype)
    labels = torch.randint(0, V, (T,), generator=g)
    mask = torch.rand(T, generator=g) >= 0.35
    seq_ids = torch.arange(T) // (T // S)
    logits[~mask] = float("nan")  # masked rows hold garbage: never read, so nothing can leak
    old = R.token_logprobs(torch.nan_to_num(logits.float()), labels) + 0.05 * torch.randn(T, generator=g)
    adv = torch.randn(S, generator=g)
    return logits, labels, old, adv, seq_ids, mask


def test_fused_policy_loss_bytes_per_row():
    dtype = torch.bfloat16
    _require_interpreter()
    logits, labels, old, adv, seq_ids, mask = _batch(dtype)
    labels[5] = -100  # an ignored label inside a live-mask row: masked too
    mask_eff = (mask & (labels != -100)).numpy()
    row = V * logits.element_size()
    buf = logits.clone()
    with ops.value_checks("off"), interp_bytes.count_bytes() as counter:
        counter.track("logits", buf)
        x = buf.requires_grad_()
        loss, _ = ops.fused_policy_loss(x, labels, old, adv, seq_ids, mask, cfg=R.LossConfig(kl_beta=0.0))
        loss.backward()
    read, written = counter.row_bytes("logits")
    assert (read[~mask_eff] == 0).all(), "a masked row was read"
    assert (written[~mask_eff] == row).all(), "a masked row was not written exactly once"
    assert (read[mask_eff] <= 2 * row).all() and (read[mask_eff] >= row).all()
    assert (written[mask_eff] == row).all()
    live = mask_eff.sum()
    assert counter.passes("logits") <= (3 * live + (T - live)) / T + 1e-9
    kernels = {launch.kernel for launch in counter.launches}
    assert {"_logprob_fwd_kernel", "_logprob_bwd_kernel"} <= kernels
    assert torch.isfinite(loss) and torch.isfinite(x.grad.float()).all()
    assert torch.count_nonzero(x.grad[~torch.from_numpy(mask_eff)]) == 0


def test_token_logprobs_ignored_labels_are_never_read():
    _require_interpreter()
    logits, labels, *_ = _batch(torch.bfloat16)
    ignored = torch.zeros(T, dtype=torch.bool)
    ignored[::3] = True
    labels = labels.masked_fill(ignored, -100)
    logits = torch.where(ignored[:, None], float("nan"), torch.nan_to_num(logits.float()).to(torch.bfloat16))
    row = V * 2
    with interp_bytes.count_bytes() as counter:
        counter.track("logits", logits)
        x = logits.requires_grad_()
        logp, ent = ops.token_logprobs(x, labels, return_entropy=True)
        (logp.sum() + ent.sum()).backward()
    read, written = counter.row_bytes("logits")
    ign = ignored.numpy()
    assert (read[ign] == 0).all() and (written[ign] == row).all()
    assert (read[~ign] == 2 * row).all() and (written[~ign] == row).all()


def test_ours_never_exceeds_liger():
    """Same inputs, same options, both skipping masked rows: our passes over the logits <= Liger's."""
    _require_interpreter()
    pytest.importorskip("liger_kernel")
    from benches.bench_loss import count_passes

    res = count_passes(T, V, S, 0.35)
    ours, liger = res["ours"], res["liger"]
    assert ours["read_masked_max"] == 0.0 and ours["written_min"] == ours["written_max"] == 1.0
    assert ours["passes"] <= liger["passes"] + 1e-12, (ours, liger)
    assert np.isfinite(ours["max_abs_err_vs_reference"]) and ours["max_abs_err_vs_reference"] < 1e-2
