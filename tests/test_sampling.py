"""The fused sampler (csrc_triton/sampling.py through ops.sample_tokens) against its PyTorch definition
(exgrpo_fast.rollout.sampling.sample_next_reference): the same tokens, bit for bit at top_p = 1 and the same kept set
at top_p < 1 (tied logits together; rows whose boundary mass is within fp32 rounding of top_p excluded and counted),
on odd V, B = 1, temperature 0, -inf logits and every logits dtype; the noise itself bit for bit over every value it
can take; the bytes each implementation moves. CPU: the kernel runs in the Triton interpreter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benches/ lives next to tests/

from csrc_triton import sampling as K  # noqa: E402
from exgrpo_fast import ops  # noqa: E402
from exgrpo_fast.rollout import sampling as S  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernel(*args):
    return S.sample_next(*args, impl="triton")


def _reference(*args):
    return S.sample_next(*args, impl="torch")


def _rows(B, V, *, scale=3.0, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, V, generator=g) * scale).to(dtype).to(device)
    seeds = torch.randint(0, 2**32, (B,), generator=g).to(device)
    positions = torch.randint(0, 1 << 20, (B,), generator=g).to(device)
    return logits, seeds, positions


# ----------------------------------------------------------------------------------------------------------------
# the noise, bit for bit


@triton.jit
def _noise_kernel(u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    u = tl.load(u_ptr + offs, mask=offs < n, other=0.5)
    tl.store(out_ptr + offs, K._log_exact(-K._log_exact(u)), mask=offs < n)


@triton.jit
def _hash_kernel(seeds_ptr, pos_ptr, out_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    key = K._mix32(tl.load(seeds_ptr + row).to(tl.uint32) ^ (tl.load(pos_ptr + row).to(tl.uint32) * 0x9E3779B1))
    x = K._mix32(key ^ K._mix32(cols.to(tl.uint32) * 0x27D4EB2))
    tl.store(out_ptr + row * V + cols, ((x >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07, mask=cols < V)


def test_noise_is_bit_identical_over_every_value():
    """Every u the sampler can draw ((k + 0.5) 2^-23, k < 2^23): the kernel's log(-log u) has the reference's bits,
    and log_exact is within 2 ulp of the true log on all of those inputs (and on the -log u it then takes)."""
    u = (torch.arange(1 << 23, dtype=torch.float32) + 0.5) * 2**-23
    want = S.log_exact(-S.log_exact(u))
    got = torch.empty_like(u)
    block = 1 << 16
    _noise_kernel[(u.numel() // block,)](u.to(DEVICE), got if DEVICE == "cpu" else got.to(DEVICE), u.numel(),
                                         BLOCK=block, enable_fp_fusion=False)  # fmt: skip
    assert torch.equal(got.cpu().view(torch.int32), want.view(torch.int32))
    for x in (u, -S.log_exact(u)):
        exact = torch.log(x.double())
        ulp = (exact.float().nextafter(torch.tensor(float("inf"))) - exact.float()).double()
        err = ((S.log_exact(x).double() - exact).abs() / ulp).max().item()
        assert err <= 2.0, err
    assert 0.0 < u.min() and u.max() < 1.0


def test_hash_and_uniform_match_the_reference():
    B, V = 5, 300
    seeds = torch.tensor([0, 1, 2**32 - 1, 12345, 7], dtype=torch.int64)
    pos = torch.tensor([0, 1, 2**31 - 1, 77, 1 << 20], dtype=torch.int64)
    out = torch.empty(B, V)
    _hash_kernel[(B,)](seeds, pos, out, V, BLOCK=512)
    assert torch.equal(out, S.row_uniform(seeds, pos, V))


# ----------------------------------------------------------------------------------------------------------------
# tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_top_p_1_is_bit_identical(dtype):
    """Odd V, wide logits (std 10: most blocks skip the noise arithmetic) and narrow ones (std 1: none do)."""
    for scale, V, temperature in ((1.0, 1001, 1.0), (10.0, 4099, 0.7), (3.0, 2053, 1.3)):
        logits, seeds, pos = _rows(8, V, scale=scale, dtype=dtype, seed=V)
        got = _kernel(logits, temperature, 1.0, seeds, pos)
        assert torch.equal(got, _reference(logits, temperature, 1.0, seeds, pos)), (scale, V, temperature)


def test_greedy_b1_and_inf_rows():
    logits, seeds, pos = _rows(6, 777)
    logits[0, :] = float("-inf")  # all -inf: token 0, like torch.argmax
    logits[1, 5:] = float("-inf")  # only the first 5 tokens live
    logits[2, 100] = logits[2, 300] = logits[2].max() + 1  # a tie for the max: the first index
    logits[3, ::2] = float("-inf")
    for t in (0.0, 1.0):
        for p in (1.0, 0.9, 0.3, 1e-40):  # 1e-40: top_p * Z underflows, only the top token is kept
            want = _reference(logits, t, p, seeds, pos)
            assert torch.equal(_kernel(logits, t, p, seeds, pos), want), (t, p)
            assert want[0] == 0 and want[1] < 5 and want[3] % 2 == 1
    assert _reference(logits, 0.0, 1.0, seeds, pos)[2] == 100
    nan = logits.clone()
    nan[4, 10] = float("nan")  # undefined which token, but the top-p loop must end
    assert _kernel(nan, 1.0, 0.5, seeds, pos).shape == (6,)
    one = _rows(1, 50257)  # B = 1 at GPT-2's vocabulary
    for t, p in ((1.0, 1.0), (0.0, 1.0), (0.8, 0.95)):
        assert torch.equal(_kernel(one[0], t, p, *one[1:]), _reference(one[0], t, p, *one[1:]))


def _boundary_margin(logits, temperature, top_p):
    """Per row: the distance (in probability mass, float64) between top_p and the nearest kept-set boundary, i.e.
    how far the row is from a decision that fp32 summation order could flip."""
    z = logits.double() * (1.0 / temperature)
    p = torch.softmax(z, -1)
    sz, order = z.sort(-1, descending=True)
    sp = p.gather(-1, order)
    before = sp.cumsum(-1) - sp
    # mass strictly above each distinct value = `before` at the first element of its tie group
    first = torch.ones_like(sz, dtype=torch.bool)
    first[:, 1:] = sz[:, 1:] != sz[:, :-1]
    gap = torch.where(first, (before - top_p).abs(), torch.inf)
    return gap.min(-1).values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_p_same_kept_set(dtype):
    """top_p < 1: the same tokens as the reference on every row whose boundary is farther than 1e-5 in mass from
    top_p (the rest could flip either way with fp32 summation order; they are counted, and must be rare). Flat rows
    (std 0.5) make the rejection chain run several passes; bf16 rows have many exactly tied logits."""
    checked = 0
    for scale, V, top_p, temperature in ((3.0, 1001, 0.9, 1.0), (0.5, 999, 0.3, 1.0), (2.0, 2053, 0.7, 0.6),
                                         (8.0, 4099, 0.95, 1.0), (1.0, 513, 0.05, 1.2)):  # fmt: skip
        logits, seeds, pos = _rows(12, V, scale=scale, dtype=dtype, seed=V)
        got = _kernel(logits, temperature, top_p, seeds, pos)
        want = _reference(logits, temperature, top_p, seeds, pos)
        safe = _boundary_margin(logits.float().cpu(), temperature, top_p).to(got.device) > 1e-5
        assert safe.float().mean() >= 0.9
        assert torch.equal(got[safe], want[safe]), (scale, V, top_p, (got != want).nonzero().flatten().tolist())
        checked += int(safe.sum())
    assert checked > 50


def test_top_p_keeps_tied_logits_together():
    """Logits in three tied groups: [5] x 1, [4] x 3, [0] x rest. With top_p just above the first token's mass, the
    whole second group is kept (reference and kernel alike); draws then cover all three of its tokens, never the
    third group."""
    V = 64
    row = torch.zeros(V)
    row[7] = 5.0
    row[[3, 20, 40]] = 4.0
    p_top = torch.softmax(row, 0)[7].item()
    B = 64
    logits = row.expand(B, V).contiguous().to(DEVICE)
    seeds = torch.arange(B, dtype=torch.int64, device=DEVICE)
    pos = torch.full((B,), 9, dtype=torch.int64, device=DEVICE)
    keep = S.top_p_keep(logits[:1].cpu(), p_top + 1e-3)[0]
    assert keep.nonzero().flatten().tolist() == [3, 7, 20, 40]
    got = _kernel(logits, 1.0, p_top + 1e-3, seeds, pos)
    assert torch.equal(got, _reference(logits, 1.0, p_top + 1e-3, seeds, pos))
    assert set(got.tolist()) == {3, 7, 20, 40}
    assert set(_kernel(logits, 1.0, p_top * 0.99, seeds, pos).tolist()) == {7}  # mass above the tie group >= top_p


class _NoSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_local_scalar_dense", "item", "equal", "is_nonzero"):
            raise AssertionError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))


def test_no_host_sync_and_bad_arguments():
    logits, seeds, pos = _rows(3, 100)
    with _NoSync():
        ops.sample_tokens(logits, 1.0, 0.9, seeds, pos)
        ops.sample_tokens(logits, 0.0, 1.0, seeds, pos)
    with pytest.raises(ValueError, match="top_p must lie in"):
        ops.sample_tokens(logits, 1.0, 0.0, seeds, pos)
    with pytest.raises(ValueError, match="temperature must be"):
        ops.sample_tokens(logits, -1.0, 1.0, seeds, pos)
    with pytest.raises(TypeError, match="seeds must be int64"):
        ops.sample_tokens(logits, 1.0, 1.0, seeds.int(), pos)
    with pytest.raises(ValueError, match="positions has 2 entries"):
        ops.sample_tokens(logits, 1.0, 1.0, seeds, pos[:2])
    with pytest.raises(ValueError, match="impl='cuda'"):
        S.sample_next(logits, 1.0, 1.0, seeds, pos, impl="cuda")
    assert _kernel(logits[:0], 1.0, 1.0, seeds[:0], pos[:0]).shape == (0,)
    strided = torch.zeros(3, 200, device=DEVICE)[:, ::2]  # a non-unit stride along V
    strided.copy_(logits)
    assert torch.equal(_kernel(strided, 1.0, 1.0, seeds, pos), _reference(logits, 1.0, 1.0, seeds, pos))


# ----------------------------------------------------------------------------------------------------------------
# bytes: the fused kernel against the PyTorch sampler it replaces


def test_kernel_reads_the_logits_once_at_top_p_1():
    if DEVICE != "cpu":
        pytest.skip("bytes are counted through the Triton interpreter")
    from benches.bench_sampling import count_kernel_bytes, count_torch_bytes

    B, V = 8, 4099
    k1 = count_kernel_bytes(B, V, torch.bfloat16, 1.0)
    assert k1["logit_reads"] == pytest.approx(1.0)  # every logit read exactly once
    assert k1["written"] == 8 * B
    kp = count_kernel_bytes(B, V, torch.bfloat16, 0.9)
    assert 2.0 <= kp["logit_reads"] <= 4.0, kp  # pass 1, then ~1/top_p passes of the chain
    ref1 = count_torch_bytes(B, V, torch.bfloat16, 1.0)
    refp = count_torch_bytes(B, V, torch.bfloat16, 0.9)
    # the PyTorch sampler: ~17 (top_p = 1) to ~27 (with the sort) ops over [B, V] tensors, many of them int64
    assert ref1["total"] > 100 * k1["total"] and refp["total"] > 50 * kp["total"], (ref1, k1, refp, kp)


# ----------------------------------------------------------------------------------------------------------------
# GPU: the real compiler's arithmetic against torch's CUDA ops, at the real vocabulary, and inside a CUDA graph


@pytest.mark.gpu
def test_gpu_bit_identical_at_real_vocab():
    B, V = 64, 151936
    for dtype in (torch.bfloat16, torch.float32):
        for scale in (1.0, 4.0, 15.0):
            logits, seeds, pos = _rows(B, V, scale=scale, dtype=dtype, device="cuda")
            for t, p in ((1.0, 1.0), (0.6, 1.0), (0.0, 1.0)):
                assert torch.equal(_kernel(logits, t, p, seeds, pos), _reference(logits, t, p, seeds, pos))
            for t, p in ((1.0, 0.9), (0.8, 0.5)):
                got, want = _kernel(logits, t, p, seeds, pos), _reference(logits, t, p, seeds, pos)
                safe = _boundary_margin(logits.float(), t, p) > 1e-5
                assert torch.equal(got[safe], want[safe]) and safe.float().mean() > 0.9


@pytest.mark.gpu
def test_gpu_noise_bit_identical_and_graph_capture():
    u = (torch.arange(1 << 23, dtype=torch.float32, device="cuda") + 0.5) * 2**-23
    got = torch.empty_like(u)
    _noise_kernel[(u.numel() // 1024,)](u, got, u.numel(), BLOCK=1024, enable_fp_fusion=False)
    assert torch.equal(got, S.log_exact(-S.log_exact(u)))
    logits, seeds, pos = _rows(64, 151936, scale=4.0, dtype=torch.bfloat16, device="cuda")
    eager = _kernel(logits, 1.0, 0.9, seeds, pos)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = _kernel(logits, 1.0, 0.9, seeds, pos)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
