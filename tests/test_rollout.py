"""Rollout engine: greedy dialogues equal a no-cache full-forward reference token for token (Llama, Qwen2, Gemma3
with GQA, sliding layers and logit softcapping; 3 turns, mixed prompt lengths, early stops, several batches);
sampled dialogues reproducible from a seed and independent of batch composition; cache overflow -> flagged, never a
crash; loss mask exactly on sampled tokens; on-device sampling matches the softmax distribution."""

import pytest
import torch

from exgrpo_fast.rollout import SamplingParams, generate, rollout_dialogues, sample_next
from exgrpo_fast.rollout.sampling import row_uniform


def _tokenizer():
    from exgrpo_fast.model.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def _make_model(arch: str, vocab: int, stop_id: int, seed: int = 0, stop_scale: float = 6.0):
    """A tiny GQA model in float64 (argmax ties are then impossible in practice) whose LM-head row for the
    end-of-turn token is a scaled random direction, so greedy turns stop early at data-dependent times."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":  # q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "qwen3":  # per-head q/k RMSNorm
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16))
    elif arch == "gemma3":  # one sliding layer (window 16 < dialogue length) and one full; final logit softcap
        config = Gemma3TextConfig(**common, head_dim=16, sliding_window=16, final_logit_softcapping=30.0,
                                  layer_types=["sliding_attention", "full_attention"])  # fmt: skip
        model = Gemma3ForCausalLM(config)
    else:
        raise ValueError(arch)
    model = model.to(torch.float64).eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        direction = torch.randn(head.shape[1], dtype=head.dtype, generator=torch.Generator().manual_seed(seed))
        head[stop_id] = direction / direction.norm() * stop_scale * head.norm(dim=1).mean()
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


@pytest.fixture(scope="module")
def problems():
    from exgrpo_fast.data.tasks import builtin_dataset

    return list(builtin_dataset(6, 2, seed=0)["train"])


def _stop_id(tokenizer) -> int:
    from exgrpo_fast.data.dialogue import end_of_turn_ids

    return end_of_turn_ids(tokenizer)[0]


def _spans(r):
    """Maximal runs of loss-mask-1 tokens: the student's sampled turns."""
    spans, cur = [], []
    for tok, m in zip(r.ids, r.loss_mask):
        if m:
            cur.append(tok)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


@pytest.mark.parametrize(
    "arch,batch_size,lean_forward",
    [("llama", 4, True), ("llama", 4, False), ("qwen2", 4, True), ("qwen2", 4, False), ("qwen3", 4, True),
     ("gemma3", 4, True), ("llama", 64, True), ("llama", 64, False), ("gemma3", 64, True)],
)  # fmt: skip
def test_greedy_equals_full_forward_reference(arch, batch_size, lean_forward, tokenizer, problems, monkeypatch):
    """lean_forward=True takes the lean Llama-family forward for llama/qwen2/qwen3 (gemma3 always uses its own)."""
    from exgrpo_fast.data.dialogue import end_of_turn_ids
    from exgrpo_fast.data.tasks import rollout_user_turns
    from exgrpo_fast.rollout.cache import RowKVCache

    compactions = []
    select_rows = RowKVCache.select_rows
    monkeypatch.setattr(RowKVCache, "select_rows", lambda *a: compactions.append(1) or select_rows(*a))
    from exgrpo_fast.rollout import lean

    model = _make_model(arch, len(tokenizer), _stop_id(tokenizer))
    assert lean.supports(model) == (arch != "gemma3")
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop_check_every=3, lean_forward=lean_forward)
    # 5 problems x G=2: in batches of 4 dialogues (2 problems; 3 batches, the last one smaller), or all 10 in one
    # batch, where finished rows are compacted away during decoding
    rollouts = rollout_dialogues(model, tokenizer, problems[:5], group_size=2, params=params, batch_size=batch_size)
    if batch_size == 4:
        assert not compactions  # too few rows to be worth it
    elif arch == "llama":
        assert compactions  # this model stops most turns early: the compacted path is exercised
    stop = set(end_of_turn_ids(tokenizer))
    n_turns = {len(rollout_user_turns(p)) for p in problems[:5]}
    assert max(n_turns) >= 3
    lengths, stopped_early = set(), 0
    for r in rollouts:
        users = rollout_user_turns(problems[r.problem_index])
        assert not r.overflow and len(r.responses) == len(users) == len(r.truncated)
        # The reference: one plain forward over the whole dialogue (no cache, no padding). Greedy decoding means
        # every sampled token is the argmax of the logits at the previous position.
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([r.ids])).logits[0]
        sampled = [i for i, m in enumerate(r.loss_mask) if m]
        expected = logits[[i - 1 for i in sampled]].argmax(-1).tolist()
        got = [r.ids[i] for i in sampled]
        first_bad = next((k for k, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        assert got == expected, f"{arch}: first mismatch at sampled token {first_bad}"
        spans = _spans(r)
        assert len(spans) == len(users)
        for span, trunc in zip(spans, r.truncated):
            assert (span[-1] in stop) != trunc
            assert trunc == (len(span) == params.max_new_tokens and span[-1] not in stop)
            stopped_early += span[-1] in stop and len(span) < params.max_new_tokens
        lengths.add(r.ids.index(_stop_id(tokenizer)))  # prompt lengths differ
    assert stopped_early >= 3, "the test model should stop some turns early"
    assert len(lengths) > 1
    assert rollouts[0].ids == rollouts[1].ids  # greedy: the G copies of a problem agree


def test_sampled_reproducible_and_independent_of_batch(tokenizer, problems):
    model = _make_model("llama", len(tokenizer), _stop_id(tokenizer))
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, stop_check_every=2)

    def run(probs, batch_size, seed):
        return rollout_dialogues(model, tokenizer, probs, group_size=3, params=params, batch_size=batch_size,
                                 generator=torch.Generator().manual_seed(seed))  # fmt: skip

    a = run(problems[:3], 3, seed=1)  # one problem per batch
    b = run(problems[:5], 64, seed=1)  # everything in one batch, with two more problems
    c = run(problems[:3], 3, seed=2)
    assert [r.ids for r in a] == [r.ids for r in b[:9]]
    assert [r.responses for r in a] == [r.responses for r in b[:9]]
    assert [r.ids for r in a] != [r.ids for r in c]
    assert len({tuple(r.ids) for r in a[:3]}) > 1  # the G samples of a problem differ


def test_cache_overflow_is_flagged_not_a_crash(tokenizer, problems):
    from exgrpo_fast.data.dialogue import encode_prompt

    model = _make_model("qwen2", len(tokenizer), _stop_id(tokenizer), stop_scale=0.0)  # never stops early
    prompt_len = len(encode_prompt(tokenizer, [{"role": "user", "content": problems[0]["question"]}]))
    params = SamplingParams(temperature=0.0, max_new_tokens=12, max_context=prompt_len + 20)
    rs = rollout_dialogues(model, tokenizer, problems[:1], group_size=2, params=params)
    for r in rs:
        assert r.overflow and r.truncated[-1]
        assert 1 <= len(r.responses) < 3
        assert len(r.ids) == len(r.loss_mask)
        cached = len(r.ids) - 1  # the last token (the closing end-of-turn) is never fed to the model
        assert cached <= params.max_context
    # a context shorter than the question: an empty, truncated answer
    params = SamplingParams(temperature=0.0, max_new_tokens=4, max_context=prompt_len - 5)
    (r,) = rollout_dialogues(model, tokenizer, problems[:1], group_size=1, params=params)
    assert r.overflow and r.responses == [""] and r.truncated == [True] and sum(r.loss_mask) == 0


def test_loss_mask_is_exactly_the_sampled_tokens_and_turns_condition_on_answers(tokenizer, problems):
    from exgrpo_fast.data.dialogue import end_of_turn_ids

    model = _make_model("llama", len(tokenizer), _stop_id(tokenizer))
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    rs = rollout_dialogues(model, tokenizer, problems[:2], group_size=3, params=params,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    stop = set(end_of_turn_ids(tokenizer))
    for r in rs:
        assert [t["role"] for t in r.turns] == ["user", "assistant"] * len(r.responses)
        spans = _spans(r)
        for span, text in zip(spans, r.responses):
            assert tokenizer.decode([t for t in span if t not in stop], skip_special_tokens=True) == text
        # later turns are conditioned on the earlier sampled answers: the context holds their exact ids
        for k in range(1, len(spans)):
            start = [i for i, m in enumerate(r.loss_mask) if m][sum(len(x) for x in spans[:k])]
            context = r.ids[:start]
            for span in spans[:k]:
                assert any(context[i : i + len(span)] == span for i in range(len(context)))
    assert len({r.responses[0] for r in rs}) > 1


def test_generate_batched_equals_single(tokenizer):
    from exgrpo_fast.data.dialogue import encode_prompt, end_of_turn_ids

    model = _make_model("llama", len(tokenizer), _stop_id(tokenizer))
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in ("1+2=?", "what is 17*3-4?", "9")]
    stop = end_of_turn_ids(tokenizer)
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, max_new_tokens=10)
        batched = generate(model, prompts, stop_ids=stop, pad_id=0, params=params,
                           generator=torch.Generator().manual_seed(3))  # fmt: skip
        for i, p in enumerate(prompts):
            # a dialogue's seed is (call seed, row); with the row's own seed, a batch of one gives the same tokens
            single = generate(model, [p] * (i + 1), stop_ids=stop, pad_id=0, params=params,
                              generator=torch.Generator().manual_seed(3))[i]  # fmt: skip
            assert batched[i] == single


def test_sample_next_greedy_top_p_and_distribution():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    seeds, pos = torch.tensor([7]), torch.tensor([0])
    assert sample_next(logits, 0.0, 1.0, seeds, pos).tolist() == [1]
    many = torch.arange(4000)
    draws = sample_next(logits.expand(4000, -1), 1.0, 0.5, many, many)
    assert set(draws.tolist()) == {1}  # top-p 0.5 keeps only the top token (p ~ 0.52)
    # the Gumbel-max draws follow softmax(logits / T)
    logits = torch.tensor([[0.5, 1.5, -0.5, 1.0, 0.0]])
    for temperature in (1.0, 0.7):
        draws = sample_next(logits.expand(20000, -1), temperature, 1.0, many.repeat(5), torch.arange(20000) % 7)
        freq = torch.bincount(draws, minlength=5).double() / draws.numel()
        expect = torch.softmax(logits[0].double() / temperature, -1)
        assert (freq - expect).abs().max() < 0.015, (freq, expect)
    # the noise is a pure function of (seed, position, vocab id) and uniform in (0, 1)
    u = row_uniform(torch.tensor([1, 1, 2]), torch.tensor([5, 5, 5]), 1000)
    assert torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    u = row_uniform(torch.arange(64), torch.arange(64) % 5, 1000)
    assert 0.0 < u.min() and u.max() < 1.0 and abs(u.mean().item() - 0.5) < 0.005
    assert (torch.histc(u, 10, 0, 1) / u.numel() - 0.1).abs().max() < 0.005


def test_graph_mode_bookkeeping_on_cpu(tokenizer, problems, monkeypatch):
    """The CUDA-graph path (state and cache reused across batches and turns, one graph per attended-slots bucket, no
    compaction) with the capture replaced by an eager replay, so its bookkeeping is checked without a GPU: it must
    sample exactly what the eager path samples."""
    import exgrpo_fast.rollout as rollout_mod
    from exgrpo_fast.rollout import engine as engine_mod

    captures = []

    class FakeGraph:
        def __init__(self, e, state, cache, kv_len):
            self.args = (e, state, cache, kv_len)

        def replay(self):
            e, state, cache, kv_len = self.args
            e.decode_one_token(state, cache, kv_len)

    def fake_capture(e, state, cache, kv_len, pool):
        captures.append(kv_len)
        return FakeGraph(e, state, cache, kv_len)

    make_engine = rollout_mod._engine

    def graph_engine(*a, **kw):
        e = make_engine(*a, **kw)
        e.use_graphs = True
        return e

    for arch in ("llama", "gemma3"):
        model = _make_model(arch, len(tokenizer), _stop_id(tokenizer))
        params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=10, stop_check_every=2)

        def run(model=model, params=params):
            return rollout_dialogues(model, tokenizer, problems[:4], group_size=2, params=params, batch_size=4,
                                     generator=torch.Generator().manual_seed(5))  # fmt: skip

        eager = run()
        with monkeypatch.context() as m:
            m.setattr(engine_mod, "_capture", fake_capture)
            m.setattr(torch.cuda, "graph_pool_handle", lambda: None)
            m.setattr(rollout_mod, "_engine", graph_engine)
            captures.clear()
            graphed = run()
        assert captures and len(captures) == len(set(captures))  # one capture per bucket, reused across batches
        assert [r.ids for r in graphed] == [r.ids for r in eager]
        assert [r.loss_mask for r in graphed] == [r.loss_mask for r in eager]


def test_engine_is_kept_across_calls_and_follows_in_place_updates(tokenizer, problems, monkeypatch):
    """The engine (lean decoder buffers; on CUDA, graphs and their caches) lives across rollout calls; after an
    in-place weight update (what an optimizer step or the sampler copy's refresh does) the kept engine samples what
    a fresh one samples. CUDA graphs captured in one call are replayed in the next (fake capture on CPU)."""
    import exgrpo_fast.rollout as rollout_mod
    from exgrpo_fast.rollout import engine as engine_mod

    model = _make_model("llama", len(tokenizer), _stop_id(tokenizer))
    params = SamplingParams(temperature=1.0, max_new_tokens=8, stop_check_every=2)
    fresh = SamplingParams(temperature=1.0, max_new_tokens=8, stop_check_every=2, persistent=False)

    def run(p):
        return [r.ids for r in rollout_dialogues(model, tokenizer, problems[:3], group_size=2, params=p,
                                                 batch_size=4, generator=torch.Generator().manual_seed(1))]  # fmt: skip

    run(params)
    kept = list(model.__dict__[rollout_mod._ENGINES].values())
    assert len(kept) == 1 and kept[0].lean is not None and kept[0].lean.fuse
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    assert kept[0].lean.refresh() is True and kept[0].lean.refresh() is False
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.97)
    assert run(params) == run(fresh)
    assert list(model.__dict__[rollout_mod._ENGINES].values()) == kept  # the same engine served the call

    captures = []

    class FakeGraph:
        def __init__(self, e, state, cache, kv_len):
            self.args = (e, state, cache, kv_len)

        def replay(self):
            self.args[0].decode_one_token(*self.args[1:])

    monkeypatch.setattr(engine_mod, "_capture", lambda e, s, c, k, pool: captures.append(k) or FakeGraph(e, s, c, k))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    rollout_mod.release_engines(model)
    make_engine = rollout_mod._engine

    def graph_engine(*a, **kw):
        e = make_engine(*a, **kw)
        e.use_graphs = True
        return e

    monkeypatch.setattr(rollout_mod, "_engine", graph_engine)
    first = run(params)
    n = len(captures)
    assert n > 0
    assert run(params) == first and len(captures) == n  # the second call replays the first call's graphs


def test_lean_prefill_takes_equal_heads_not_gqa_with_a_mask(tokenizer, problems, monkeypatch):
    """SDPA with a mask and enable_gqa has no fused CUDA kernel (math path, fp32 scores): the lean prefill expands
    K/V to the query heads instead; decode packs query heads per KV head. Results equal the model's own forward
    (test_greedy_equals_full_forward_reference); here: the calls SDPA sees."""
    import torch.nn.functional as F

    from exgrpo_fast.rollout import lean

    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[-3], k.shape[-3], q.shape[-2], attn_mask is not None, kw.get("enable_gqa", False)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(lean.F, "scaled_dot_product_attention", spy)
    model = _make_model("llama", len(tokenizer), _stop_id(tokenizer))
    params = SamplingParams(temperature=0.0, max_new_tokens=6, persistent=False)
    rollout_dialogues(model, tokenizer, problems[:2], group_size=2, params=params, batch_size=4)
    prefill = [c for c in calls if c[2] > 1 and c[0] == 4]  # (heads q, heads kv, q len, mask?, gqa?)
    assert prefill and all(c[1] == c[0] and c[3] and not c[4] for c in prefill)
    assert not any(c[3] and c[4] for c in calls)


def test_dynamic_rope_models_sample_without_cuda_graphs():
    from transformers import LlamaConfig, LlamaForCausalLM

    from exgrpo_fast.rollout.engine import graphs_supported

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    assert graphs_supported(LlamaForCausalLM(LlamaConfig(**common)))[0]
    dynamic = LlamaConfig(**common, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    ok, why = graphs_supported(LlamaForCausalLM(dynamic))
    assert not ok and "dynamic" in why


def test_lean_forward_refuses_lora_layers(tokenizer):
    peft = pytest.importorskip("peft")
    from exgrpo_fast.rollout import lean

    model = _make_model("llama", len(tokenizer), _stop_id(tokenizer)).float()
    assert lean.supports(model)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert not lean.supports(wrapped)


def test_half_logits_are_not_copied_to_fp32_and_sample_the_same_tokens(tokenizer):
    """Engine.logits hands a bf16 head's logits to the sampler as they are (it upcasts exactly while reading): no fp32
    [B, V] copy per decode step, and the same tokens as from the upcast logits, greedy, sampled and with top-p."""
    from exgrpo_fast.rollout.engine import Engine

    model = _make_model("llama", len(tokenizer), _stop_id(tokenizer)).to(torch.bfloat16)
    engine = Engine(model, temperature=1.0, top_p=1.0, max_new_tokens=4, stop_check_every=1, stop_ids=[0], pad_id=0)
    hidden = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    logits = engine.logits(hidden)
    assert logits.dtype == torch.bfloat16
    seeds, positions = torch.arange(5) * 7919, torch.arange(5) + 11
    for impl in ("torch", "triton"):
        for temperature, top_p in ((0.0, 1.0), (1.0, 1.0), (0.7, 0.8)):
            got = sample_next(logits, temperature, top_p, seeds, positions, impl=impl)
            want = sample_next(logits.float(), temperature, top_p, seeds, positions, impl=impl)
            assert torch.equal(got, want), (impl, temperature, top_p)
