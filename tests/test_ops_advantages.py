"""group_advantages (csrc_triton/loss_head.py) against exgrpo_fast.reference, through the Triton interpreter on CPU."""

import pytest
import torch

from exgrpo_fast import ops
from exgrpo_fast import reference as R

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_close(got, want, atol=1e-6, rtol=1e-5):
    err = (got - want).abs()
    bad = ~torch.isclose(got, want, atol=atol, rtol=rtol)
    assert not bad.any(), (
        f"max err {err.max().item():.3e}, mean {err.mean().item():.3e}, first mismatches at "
        f"{torch.nonzero(bad)[:5].flatten().tolist()}: got {got[bad][:5].tolist()} want {want[bad][:5].tolist()}"
    )


@pytest.mark.parametrize("scale", R.ADV_SCALES)
def test_group_advantages_matches_reference(scale):
    rewards = torch.tensor([1.0, 0.0, 1.0, 3.0, 2.0, 5.0, 4.0, 4.0, 0.5, 0.25, 0.0], device=DEVICE)
    group_ids = torch.tensor([2, 2, 2, 0, 5, 5, 1, 1, 3, 3, 3], device=DEVICE)  # unsorted, a group of one, 0-var
    got = ops.group_advantages(rewards, group_ids, scale=scale)
    assert got.dtype == torch.float32 and got.shape == rewards.shape
    assert_close(got, R.group_advantages(rewards, group_ids, scale=scale))
    assert got[3].item() == 0.0  # group of one
    assert got[6].item() == 0.0 and got[7].item() == 0.0  # zero-variance group


@pytest.mark.parametrize("scale", R.ADV_SCALES)
def test_group_advantages_nan(scale):
    rewards = torch.tensor([1.0, float("nan"), 0.0, 2.0, float("nan"), 3.0], device=DEVICE)
    group_ids = torch.tensor([0, 0, 0, 1, 1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="rewards contain NaN"):
        ops.group_advantages(rewards, group_ids, scale=scale)
    got = ops.group_advantages(rewards, group_ids, scale=scale, nan_to_zero=True)
    assert torch.isfinite(got).all()
    assert_close(got, R.group_advantages(rewards, group_ids, scale=scale, nan_to_zero=True))
    assert got[1].item() == 0.0 and got[3].item() == 0.0  # NaN sample, and a group left with one valid sample


def test_nan_check_stays_on_without_value_checks():
    rewards = torch.tensor([1.0, float("nan"), 0.0], device=DEVICE)
    ops.set_value_checks(False)
    try:
        with pytest.raises(ValueError, match="rewards"):
            ops.group_advantages(rewards, torch.tensor([0, 0, 0], device=DEVICE))
    finally:
        ops.set_value_checks(True)


@pytest.mark.parametrize("scale", R.ADV_SCALES)
@pytest.mark.parametrize("dtype, id_dtype", [(torch.float32, torch.int64), (torch.bfloat16, torch.int32)])
def test_group_advantages_random(scale, dtype, id_dtype):
    rewards = torch.rand(90, device=DEVICE).round(decimals=1).to(dtype)
    group_ids = torch.randint(0, 15, (90,), device=DEVICE).to(id_dtype)
    got = ops.group_advantages(rewards, group_ids, scale=scale, eps=1e-4)
    assert_close(got, R.group_advantages(rewards, group_ids, scale=scale, eps=1e-4), atol=1e-5)


def test_group_advantages_is_deterministic():
    rewards = torch.randn(77, device=DEVICE)
    group_ids = torch.randint(0, 11, (77,), device=DEVICE)
    for scale in R.ADV_SCALES:
        a = ops.group_advantages(rewards, group_ids, scale=scale)
        b = ops.group_advantages(rewards, group_ids, scale=scale)
        assert torch.equal(a, b), scale


def test_group_advantages_bad_inputs():
    r, g = torch.rand(4), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="group_ids has 3 entries"):
        ops.group_advantages(r, g[:3])
    with pytest.raises(ValueError, match="group_ids must lie"):
        ops.group_advantages(r, torch.tensor([0, 0, 1, 4]))
    with pytest.raises(ValueError, match="group_ids must lie"):
        ops.group_advantages(r, torch.tensor([0, -1, 1, 1]))
    with pytest.raises(TypeError, match="group_ids must be int64 or int32"):
        ops.group_advantages(r, g.float())
    with pytest.raises(TypeError, match="rewards must be float"):
        ops.group_advantages(torch.ones(4, dtype=torch.long), g)
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        ops.group_advantages(r[:, None], g)
    with pytest.raises(ValueError, match="rewards is empty"):
        ops.group_advantages(r[:0], g[:0])
    with pytest.raises(ValueError, match="scale"):
        ops.group_advantages(r, g, scale="global")
    with pytest.raises(ValueError, match="eps"):
        ops.group_advantages(r, g, eps=-1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("scale", R.ADV_SCALES)
def test_group_advantages_large_on_gpu(scale):
    rewards = torch.rand(4096, device="cuda").round(decimals=1)
    rewards[::97] = float("nan")
    group_ids = torch.randperm(4096, device="cuda") // 8  # 512 groups of 8, unsorted
    got = ops.group_advantages(rewards, group_ids, scale=scale, nan_to_zero=True)
    assert_close(got, R.group_advantages(rewards, group_ids, scale=scale, nan_to_zero=True), atol=1e-5)
    assert torch.equal(got, ops.group_advantages(rewards, group_ids, scale=scale, nan_to_zero=True))
