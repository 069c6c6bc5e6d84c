"""Packed (varlen) forward and backward equal the per-sequence unpadded model, for several architectures with GQA."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GemmaConfig, LlamaConfig, Qwen2Config, Qwen3Config

from exgrpo_fast.data.packing import pack_sequences
from exgrpo_fast.model import attention
from exgrpo_fast.model.forward import packed_hidden, packed_logits

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=16),
    # sliding-window layers (window 5, shorter than the sequences) alternate with full ones
    "gemma3": lambda: Gemma3TextConfig(
        **COMMON,
        head_dim=16,
        sliding_window=5,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        layer_types=["sliding_attention", "full_attention"],
    ),
}


def build(name, backend="sdpa_ref", device="cpu"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation=attention.IMPLEMENTATION)
    attention.bind_backend(model, attention.select_backend(device, backend))
    return model.to(device).float()


def sequences(lengths, vocab=97):
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,)).tolist()
        mask = [i >= n // 3 for i in range(n)]
        out.append((ids, mask))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_equals_unpadded_forward_and_backward(name):
    model = build(name)
    seqs = sequences([9, 1, 14, 6, 12, 11, 6])  # 14/12/11 and 6/6 share padded SDPA calls
    (batch,) = pack_sequences(seqs, 96)
    assert not getattr(model.config, "final_logit_softcapping", None), "test configs must not softcap"
    packed = packed_logits(model, batch)
    upstream = torch.randn_like(packed)  # a random upstream gradient, so every logit's grad path is checked
    grads_packed = torch.autograd.grad((packed * upstream).sum(), list(model.parameters()), allow_unused=True)
    # packed rows follow batch.sample_index order
    order = batch.sample_index.tolist()
    want, total = {}, 0
    for j, i in enumerate(order):
        start, end = batch.cu_seqlens[j].item(), batch.cu_seqlens[j + 1].item()
        want[i] = model(torch.tensor([seqs[i][0]])).logits[0]
        total = total + (want[i] * upstream[start:end]).sum()
    grads_ref = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)
    want_packed = torch.cat([want[i] for i in order])
    assert (packed - want_packed).abs().max().item() < 1e-4
    for (pname, _), a, b in zip(model.named_parameters(), grads_packed, grads_ref):
        if a is None or b is None:
            assert a is None and b is None, pname
            continue
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), f"{pname}: {(a - b).abs().max().item():.3e}"


def _per_document(q, k, v, lens, window):
    """The plain loop: one unpadded causal SDPA per document, GQA by repetition."""
    out, start = torch.zeros_like(q), 0
    for n in lens:
        qs, ks, vs = (x[start : start + n].transpose(0, 1) for x in (q, k, v))
        ks, vs = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=0) for x in (ks, vs))
        i = torch.arange(n)
        allowed = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < window) if window else True)
        out[start : start + n] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=allowed
        ).transpose(0, 1)
        start += n
    return out


@pytest.mark.parametrize("window", [None, 4])
def test_sdpa_ref_buckets_equal_per_document_loop(window):
    """Documents batched into padded SDPA calls (several buckets, GQA, a sliding window, empty and one-token
    documents, unused tail rows) equal one SDPA per document, forward and backward."""
    torch.manual_seed(0)
    lens = [12, 10, 9, 3, 0, 3, 1, 20, 17, 2]
    T = sum(lens) + 5  # 5 tail rows beyond the documents
    q = torch.randn(T, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(T, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(T, 2, 8, dtype=torch.float64, requires_grad=True)
    assert len(attention._length_buckets(lens)) < len([n for n in lens if n])  # some calls are shared
    got = attention._sdpa_ref(q, k, v, lens, None, window)
    want = _per_document(q, k, v, lens, window)
    assert got[sum(lens) :].abs().max().item() == 0.0
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad((got * g).sum(), (q, k, v)), torch.autograd.grad((want * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_packed_hidden_selects_loss_positions():
    model = build("llama")
    seqs = sequences([7, 5])
    (batch,) = pack_sequences(seqs, 64)
    hidden = packed_hidden(model, batch)
    assert hidden.shape == (batch.loss_positions.numel(), model.config.hidden_size)
    logits = model.get_output_embeddings()(hidden)
    assert torch.allclose(logits, packed_logits(model, batch)[batch.loss_positions], atol=1e-6)


def test_packed_hidden_gradients_match_unpadded():
    """The train path: hidden at loss positions -> LM head -> loss, grads equal the per-sequence model's."""
    model = build("qwen3")
    seqs = sequences([11, 4, 8])
    (batch,) = pack_sequences(seqs, 64)
    head = model.get_output_embeddings()
    logp = torch.log_softmax(head(packed_hidden(model, batch)), -1)
    loss = -logp.gather(1, batch.loss_labels[:, None]).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    ref = 0
    for ids, mask in seqs:
        logp_ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
        keep = torch.tensor(mask[1:])
        ref = ref - logp_ref[keep].gather(1, torch.tensor(ids[1:])[keep][:, None]).sum()
    assert torch.allclose(loss, ref, rtol=1e-5)
    grads_ref = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    for (pname, _), a, b in zip(model.named_parameters(), grads, grads_ref):
        if a is not None and b is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"{pname}: {(a - b).abs().max().item():.3e}"


def test_tokens_beyond_cu_seqlens_get_zero_output():
    """A buffer longer than cu_seqlens[-1] must not produce NaN or garbage that could reach the gradients."""
    q = torch.randn(1, 4, 10, 16, requires_grad=True)
    k = torch.randn(1, 2, 10, 16, requires_grad=True)
    v = torch.randn(1, 2, 10, 16, requires_grad=True)
    layer = torch.nn.Module()
    attention.bind_backend(layer, "sdpa_ref")
    out, _ = attention.packed_attention_forward(
        layer,
        q,
        k,
        v,
        None,
        scaling=0.25,
        cu_seq_lens_q=torch.tensor([0, 3, 7], dtype=torch.int32),
        max_length_q=4,
        seq_lens_host=(3, 4),
        total_tokens=7,
    )
    assert out.shape == (1, 10, 4, 16)
    assert torch.count_nonzero(out[0, 7:]) == 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.count_nonzero(q.grad[0, :, 7:]) == 0


def test_unpacked_path_keeps_padding_mask():
    """Without packing kwargs the registered implementation must behave like SDPA with the padding mask (rollouts)."""
    model = build("llama")
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    got = model(ids, attention_mask=mask, position_ids=pos).logits
    alone = model(ids[:1, 2:]).logits
    assert torch.allclose(got[0, 2:], alone[0], atol=1e-5)


def test_select_backend_errors():
    with pytest.raises(ValueError, match="attn_backend='nope'"):
        attention.select_backend("cpu", "nope")
    with pytest.raises(ValueError, match="not available on cpu"):
        attention.select_backend("cpu", "torch_varlen")
    assert attention.select_backend("cpu", "auto") == "sdpa_ref"
    assert attention.select_backend("cpu", None, dtype=torch.float32) == "sdpa_ref"


def test_backend_is_per_model_never_global():
    """Two models bound to different backends keep their own; choosing a backend changes no model; an unbound model's
    packed forward is an error, not a silent process-wide default."""
    a, b = build("llama"), build("llama")
    attention.bind_backend(b, "flash_attn")  # b is never run: the binding alone is checked
    attention.select_backend("cpu", "sdpa_ref")
    assert {m._packed_attn_backend for m in a.modules()} == {"sdpa_ref"}
    assert {m._packed_attn_backend for m in b.modules()} == {"flash_attn"}
    (batch,) = pack_sequences(sequences([5, 3]), 16)
    unbound = AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation=attention.IMPLEMENTATION)
    with pytest.raises(ValueError, match="no packed-attention backend"):
        packed_hidden(unbound, batch)
    with pytest.raises(ValueError, match="backend='nope'"):
        attention.bind_backend(a, "nope")


# ----------------------------------------------------------------------------------------------------------------
# shared prefixes: a group's prompt once per micro-batch, its continuations attending to it (data.packing)


def grouped_sequences(vocab=97, seed=0):
    """GRPO-like groups with the edge cases: a long group (split by a small budget), a one-token prompt, empty
    responses, a group of one, and a prompt longer than the sliding window of the gemma3 config."""
    g = torch.Generator().manual_seed(seed)
    spec = [(9, [6, 1, 11, 4]), (1, [5, 3, 7]), (14, [0, 6, 0]), (6, [8]), (12, [9, 10, 7, 8, 9, 6])]
    seqs, groups = [], []
    for gid, (lp, conts) in enumerate(spec):
        prompt = torch.randint(0, vocab, (lp,), generator=g).tolist()
        for n in conts:
            mask = [False] * lp + (torch.rand(n, generator=g) < 0.8).tolist()
            seqs.append((prompt + torch.randint(0, vocab, (n,), generator=g).tolist(), mask))
            groups.append(gid)
    return seqs, groups


def weighted_logp_loss(model, batches, weights):
    """sum over loss rows of weight[sample, k] * log p(label): k-th loss row of a sample, the same rows (and so the
    same weights) whatever the packing. Divided by the row count, so gradients are O(1)."""
    head = model.get_output_embeddings()
    total, rows = 0.0, 0
    for b in batches:
        logp = torch.log_softmax(head(packed_hidden(model, b)).float(), -1).gather(1, b.loss_labels[:, None])[:, 0]
        sample = b.sample_index[b.loss_seq_ids]
        first = torch.searchsorted(b.loss_seq_ids, b.loss_seq_ids)  # loss rows are sorted by sequence
        k = torch.arange(len(sample), device=sample.device) - first
        total = total + (weights[sample, k] * logp).sum()
        rows += len(sample)
    return total / rows


def assert_same_loss_and_grads(model, a, b, weights, rtol=1e-5, atol=1e-6):
    params = [p for p in model.parameters() if p.requires_grad]
    loss_a, loss_b = weighted_logp_loss(model, a, weights), weighted_logp_loss(model, b, weights)
    grads_a = torch.autograd.grad(loss_a, params, allow_unused=True)
    grads_b = torch.autograd.grad(loss_b, params, allow_unused=True)
    torch.testing.assert_close(loss_b, loss_a, rtol=rtol, atol=atol)
    for (pname, _), x, y in zip(model.named_parameters(), grads_a, grads_b):
        if x is None or y is None:
            assert x is None and y is None, pname
            continue
        torch.testing.assert_close(y, x, rtol=rtol * 10, atol=atol, msg=lambda m, n=pname: f"{n}: {m}")


@pytest.mark.parametrize("budget", [4096, 40])  # one micro-batch; groups split across several
@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3"])  # Qwen2: GQA and q/k/v bias; Gemma3: window 5
def test_shared_prefix_equals_unshared_packing(name, budget):
    """Loss and every parameter gradient of a shared-prefix packing equal the unshared packing's (fp32)."""
    model = build(name)
    if name == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    seqs, groups = grouped_sequences()
    whole = pack_sequences(seqs, budget)
    shared = pack_sequences(seqs, budget, groups=groups)
    assert sum(b.num_tokens for b in shared) < 0.6 * sum(b.num_tokens for b in whole)
    if budget == 40:
        assert len(shared) > 1 and sum(b.input_ids[:12].tolist() == seqs[-1][0][:12] for b in shared) > 1
    weights = torch.randn(len(seqs), max(len(t) for t, _ in seqs))
    assert_same_loss_and_grads(model, whole, shared, weights)


def _segments(batch):
    cu, cu_k = batch.cu_seqlens.tolist(), batch.cu_seqlens_k.tolist()
    kv = batch.kv_index if batch.kv_index is not None else torch.arange(batch.num_tokens)
    return [(cu[d], cu[d + 1], kv[cu_k[d] : cu_k[d + 1]]) for d in range(len(cu) - 1)]


def _bottom_right_loop(q, k, v, batch, window):
    """Plain SDPA per segment with an explicit bottom-right causal mask: query j of a segment with more keys than
    queries sees key s when s <= j + (keys - queries), and s > j + (keys - queries) - window."""
    out = torch.zeros_like(q)
    for q0, q1, keys in _segments(batch):
        qs = q[q0:q1].transpose(0, 1)
        ks, vs = (x[keys].transpose(0, 1).repeat_interleave(q.shape[1] // k.shape[1], dim=0) for x in (k, v))
        last = torch.arange(q1 - q0)[:, None] + (len(keys) - (q1 - q0))
        s = torch.arange(len(keys))[None, :]
        allowed = (s <= last) & ((s > last - window) if window else True)
        out[q0:q1] = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed).transpose(0, 1)
    return out


@pytest.mark.parametrize("window", [None, 4])
def test_sdpa_ref_shared_prefix_equals_bottom_right_loop(window):
    """The reference backend's batched, masked calls over prompt and continuation segments (several buckets, GQA,
    a window that reaches back into the prompt, empty continuations, unused tail rows) equal one plain SDPA per
    segment, forward and backward."""
    torch.manual_seed(0)
    seqs, groups = grouped_sequences()
    (batch,) = pack_sequences(seqs, 4096, groups=groups)
    T = batch.num_tokens + 3
    q, k, v = (torch.randn(T, h, 8, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    got = attention._sdpa_ref(q, k, v, batch.seq_lens, None, window, batch.seq_lens_k, batch.kv_index)
    want = _bottom_right_loop(q, k, v, batch, window)
    assert got[batch.num_tokens :].abs().max().item() == 0.0
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad((got * g).sum(), (q, k, v)), torch.autograd.grad((want * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


# CPU stand-ins for the CUDA kernels, written from their documented semantics (flash-attn >= 2.1: a causal or local
# mask aligns to the bottom right when a segment has more keys than queries; window_size (left, right), -1 or None =
# unbounded). They check what the backends pass them (int32 cu_seqlens, the true max lengths, GQA heads), so the
# gathered keys, separate q/k cu_seqlens and window conventions the GPU path relies on are tested here.


def _varlen_emulation(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, causal, window, gqa=True):
    assert cu_q.dtype == cu_k.dtype == torch.int32 and cu_q.shape == cu_k.shape
    lq, lk = cu_q.diff().tolist(), cu_k.diff().tolist()
    assert max_q == max(lq) and max_k == max(lk), (max_q, max_k, lq, lk)
    assert k.shape[0] == v.shape[0] == cu_k[-1].item() and cu_q[-1].item() <= q.shape[0]
    assert gqa or q.shape[1] == k.shape[1]
    left, right = (-1 if w is None else w for w in window)
    out = torch.zeros_like(q)
    for d in range(len(lq)):
        q0, k0 = cu_q[d].item(), cu_k[d].item()
        i = torch.arange(lq[d])[:, None] + (lk[d] - lq[d])  # bottom-right alignment
        j = torch.arange(lk[d])[None, :]
        allowed = torch.ones(lq[d], lk[d], dtype=torch.bool)
        if causal:
            right = 0
        if right >= 0:
            allowed &= j <= i + right
        if left >= 0:
            allowed &= j >= i - left
        qs = q[q0 : q0 + lq[d]].transpose(0, 1)
        ks, vs = (x[k0 : k0 + lk[d]].transpose(0, 1).repeat_interleave(q.shape[1] // k.shape[1], dim=0) for x in (k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale)
        out[q0 : q0 + lq[d]] = o.transpose(0, 1)
    return out


def fake_torch_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None,
                      num_splits=None):  # fmt: skip
    """torch.nn.attention.varlen.varlen_attn (PyTorch 2.13): causal is window_size == (-1, 0)."""
    return _varlen_emulation(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                             causal=tuple(window_size) == (-1, 0), window=window_size, gqa=enable_gqa)  # fmt: skip


def fake_flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                    deterministic=False, return_attn_probs=False, block_table=None):  # fmt: skip
    """flash_attn.flash_attn_varlen_func (flash-attn 2)."""
    assert not softcap and not dropout_p
    return _varlen_emulation(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=softmax_scale,
                             causal=causal, window=window_size)  # fmt: skip


def fake_flash_attn_cute(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                         seqused_q=None, seqused_k=None, page_table=None, softmax_scale=None, causal=False,
                         window_size=(None, None), softcap=0.0, return_lse=False):  # fmt: skip
    """flash_attn.cute.flash_attn_varlen_func (flash-attn 4): returns (out, lse)."""
    out = _varlen_emulation(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=softmax_scale,
                            causal=causal, window=window_size)  # fmt: skip
    return out, None


@pytest.fixture
def fake_cuda_kernels(monkeypatch):
    import sys
    import types

    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", fake_torch_varlen)
    fa, cute = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    fa.flash_attn_varlen_func, cute.flash_attn_varlen_func, fa.cute = fake_flash_attn, fake_flash_attn_cute, cute
    monkeypatch.setitem(sys.modules, "flash_attn", fa)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    for cached in (attention._varlen_attn_params, attention._cute_params):
        cached.cache_clear()
    yield
    for cached in (attention._varlen_attn_params, attention._cute_params):
        cached.cache_clear()


@pytest.mark.parametrize("backend", ["torch_varlen", "flash_attn", "flash_attn_cute"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3"])
def test_cuda_backend_plumbing_on_cpu(fake_cuda_kernels, backend, name):
    """Each CUDA backend's call (gathered keys, separate q/k cu_seqlens and max lengths, window, GQA), run on CPU
    through a stand-in kernel with flash-attn's documented semantics: shared-prefix loss and gradients equal the
    reference backend's unshared ones. flash_attn_cute refuses sliding windows, as it does without sharing."""
    model = build(name)
    seqs, groups = grouped_sequences()
    weights = torch.randn(len(seqs), max(len(t) for t, _ in seqs))
    whole, shared = pack_sequences(seqs, 4096), pack_sequences(seqs, 4096, groups=groups)
    if backend == "flash_attn_cute" and name == "gemma3":
        attention.bind_backend(model, backend)
        with pytest.raises(NotImplementedError, match="sliding window"):
            packed_hidden(model, shared[0])
        return
    reference = build(name)  # same seed: same weights, reference backend, unshared
    attention.bind_backend(model, backend)
    loss_a = weighted_logp_loss(reference, whole, weights)
    loss_b = weighted_logp_loss(model, shared, weights)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(loss_a, list(reference.parameters()))
    gb = torch.autograd.grad(loss_b, list(model.parameters()))
    for (pname, _), x, y in zip(model.named_parameters(), ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6, msg=lambda m, n=pname: f"{n}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "flash_attn_cute", "torch_varlen"])
@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
def test_cuda_backends_match_reference(backend, name):
    """Each CUDA varlen backend against the per-document SDPA reference on the same GPU, bf16, forward and backward
    (hidden states at the loss positions with a random upstream gradient, as the train step uses them)."""
    if backend not in attention.available_backends("cuda"):
        pytest.skip(f"{backend} not installed")
    if backend == "flash_attn_cute" and name == "gemma3":
        pytest.skip("flash_attn_cute backend: sliding window not wired up")
    seqs = sequences([100, 7, 300, 1, 64])
    (batch,) = pack_sequences(seqs, 1024)
    batch = batch.to("cuda")
    model = build(name, "sdpa_ref", "cuda").bfloat16()
    params = [p for p in model.parameters() if p.requires_grad]

    def run(backend_name):
        attention.bind_backend(model, attention.select_backend("cuda", backend_name))
        hidden = packed_hidden(model, batch)
        upstream = torch.randn(
            hidden.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda", dtype=hidden.dtype
        )
        grads = torch.autograd.grad((hidden * upstream).float().sum(), params, allow_unused=True)
        return hidden.float(), grads

    want, want_grads = run("sdpa_ref")
    got, got_grads = run(backend)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() < 5e-2 * want.abs().max().item()
    for (pname, _), a, b in zip(model.named_parameters(), got_grads, want_grads):
        if a is None or b is None:
            continue
        rel = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)
        assert rel.item() < 3e-2, f"{backend} {pname}: relative grad error {rel.item():.3e}"


@pytest.mark.parametrize("broken", ["namespace", "abi"])
def test_flash_attn_counts_only_when_its_entry_point_imports(broken, tmp_path, monkeypatch):
    """find_spec("flash_attn") is not None for the namespace package an FA4-only install leaves, or for an FA2 wheel
    built against another torch; auto-selection then picked flash_attn and the first forward raised ImportError."""
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    if broken == "abi":
        (pkg / "__init__.py").write_text("raise ImportError('flash_attn_2_cuda: undefined symbol _ZN3c10...')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in list(__import__("sys").modules) if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(__import__("sys").modules, name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    attention._importable.cache_clear()
    try:
        import importlib.util

        assert importlib.util.find_spec("flash_attn") is not None  # what the old check saw
        found = attention.available_backends("cuda")
        assert "flash_attn" not in found and "flash_attn_cute" not in found
        assert found == ["torch_varlen", "sdpa_ref"]
        assert attention.select_backend("cuda", dtype=torch.bfloat16) == "torch_varlen"
    finally:
        attention._importable.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "flash_attn_cute", "torch_varlen"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3"])
def test_cuda_backends_shared_prefix_match_reference(backend, name):
    """Shared-prefix packing through each CUDA varlen backend against the unshared reference backend on the same GPU,
    bf16, forward and backward (the loss of weighted loss-row log-probs, as the train step uses them)."""
    if backend not in attention.available_backends("cuda"):
        pytest.skip(f"{backend} not installed")
    if backend == "flash_attn_cute" and name == "gemma3":
        pytest.skip("flash_attn_cute backend: sliding window not wired up")
    seqs, groups = grouped_sequences()
    long_prompt = torch.randint(0, 97, (200,)).tolist()  # one long prompt: several kernel blocks of keys
    for n in (30, 1, 64):
        seqs.append((long_prompt + torch.randint(0, 97, (n,)).tolist(), [False] * 200 + [True] * n))
        groups.append(99)
    whole = [b.to("cuda") for b in pack_sequences(seqs, 1024)]
    shared = [b.to("cuda") for b in pack_sequences(seqs, 1024, groups=groups)]
    model = build(name, "sdpa_ref", "cuda").bfloat16()
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.randn(len(seqs), 300, device="cuda")

    def run(backend_name, batches):
        attention.bind_backend(model, attention.select_backend("cuda", backend_name))
        loss = weighted_logp_loss(model, batches, weights)
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    want, want_grads = run("sdpa_ref", whole)
    got, got_grads = run(backend, shared)
    assert torch.isfinite(got) and abs(got.item() - want.item()) < 2e-2 * abs(want.item()) + 1e-3
    for (pname, _), a, b in zip(model.named_parameters(), got_grads, want_grads):
        if a is None or b is None:
            continue
        rel = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)
        assert rel.item() < 3e-2, f"{backend} {pname}: relative grad error {rel.item():.3e}"
