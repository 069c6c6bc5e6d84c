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
