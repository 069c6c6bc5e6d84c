"""Rollout: shapes, stop on end-of-turn, left padding = unbatched, determinism under a seed, multi-turn conditioning,
loss mask exactly on sampled tokens."""

import pytest
import torch

from exgrpo_fast.rollout import SamplingParams, generate, rollout_dialogues, sample_next


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from exgrpo_fast.model.loading import load_model
    from exgrpo_fast.model.tiny import create_tiny_checkpoint

    path = create_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)
    model, tokenizer = load_model(path, dtype=torch.float32, device=torch.device("cpu"))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def problems():
    from exgrpo_fast.data.tasks import builtin_dataset

    return [dict(p) for p in builtin_dataset(4, 2, seed=0)["train"]]


class ScriptedLM(torch.nn.Module):
    """Emits token (position + 10) until position >= stop_at[row], then eos; reads position_ids only."""

    def __init__(self, vocab: int, eos: int, stop_at: list[int]):
        super().__init__()
        self.vocab, self.eos = vocab, eos
        self.stop_at = torch.tensor(stop_at)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Cfg", (), {"_attn_implementation": "sdpa"})()

    def forward(self, input_ids, attention_mask, position_ids, use_cache=True, logits_to_keep=0, **kwargs):
        pos = position_ids[:, -1]  # (B,) position of the last input token
        nxt = torch.where(pos + 1 >= self.stop_at, torch.full_like(pos, self.eos), (pos + 10) % self.vocab)
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], self.vocab), -1e4)
        logits[:, -1].scatter_(1, nxt[:, None], 0.0)
        return type("Out", (), {"logits": logits})()


def test_generate_stops_on_eos_and_respects_positions():
    model = ScriptedLM(vocab=64, eos=3, stop_at=[4, 5, 100])
    prompts = [[5, 6], [5, 6, 7, 8, 9], [1]]  # left padding must not shift positions
    params = SamplingParams(temperature=0.0, max_new_tokens=8, stop_check_every=2)
    out = generate(model, prompts, stop_ids=[3], pad_id=0, params=params)
    (a, ta), (b, tb), (c, tc) = out
    assert a == [11, 12, 3] and not ta  # tokens at positions 2, 3, then eos at position 4
    assert b == [3] and not tb  # already past stop_at
    assert len(c) == 8 and tc and 3 not in c  # truncated at max_new_tokens
    # the stop check ends decoding early once every row is done
    out = generate(ScriptedLM(64, 3, [2, 2]), [[1, 2], [1, 2]], stop_ids=[3], pad_id=0, params=params)
    assert [ids for ids, _ in out] == [[3], [3]]


def test_batched_left_padding_matches_single(tiny):
    model, tokenizer = tiny
    from exgrpo_fast.data.dialogue import encode_prompt, end_of_turn_ids

    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in ("1+2=?", "what is 17*3-4?", "9")]
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    stop = list(end_of_turn_ids(tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    batched = generate(model, [list(p) for p in prompts], stop_ids=stop, pad_id=pad, params=params)
    for p, (ids, _) in zip(prompts, batched):
        single, _ = generate(model, [list(p)], stop_ids=stop, pad_id=pad, params=params)[0]
        assert ids == single


def test_sample_next_top_p_and_greedy():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    assert sample_next(logits, 0.0, 1.0, None).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 0.5, g).item() for _ in range(50)}
    assert draws == {1}  # top-p 0.5 keeps only the top token (p ~ 0.52)
    draws = {sample_next(logits.repeat(200, 1), 1.0, 1.0, g)[i].item() for i in range(200)}
    assert {1, 2} <= draws


def test_rollout_dialogues_shapes_determinism_and_conditioning(tiny, problems):
    model, tokenizer = tiny
    from exgrpo_fast.data.tasks import rollout_user_turns

    from exgrpo_fast.data.dialogue import end_of_turn_ids

    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=6)

    def run(seed):
        return rollout_dialogues(
            model,
            tokenizer,
            problems[:3],
            group_size=2,
            params=params,
            batch_size=4,
            generator=torch.Generator().manual_seed(seed),
        )

    a, b, c = run(1), run(1), run(2)
    assert len(a) == 6 and [r.problem_index for r in a] == [0, 0, 1, 1, 2, 2]
    assert [r.ids for r in a] == [r.ids for r in b]  # same seed, same samples
    assert [r.ids for r in a] != [r.ids for r in c]
    stop = set(map(int, end_of_turn_ids(tokenizer)))
    for r in a:
        users = rollout_user_turns(problems[r.problem_index])
        assert len(r.responses) == len(users) == len(r.truncated)
        assert [t["role"] for t in r.turns] == ["user", "assistant"] * len(users)
        assert len(r.ids) == len(r.loss_mask)
        # trained-on tokens are exactly the sampled ones: the masked spans decode to the responses
        spans, cur = [], []
        for tok, m in zip(r.ids, r.loss_mask):
            if m:
                cur.append(tok)
            elif cur:
                spans.append(cur)
                cur = []
        if cur:
            spans.append(cur)
        assert len(spans) == len(users)
        for span, text, trunc in zip(spans, r.responses, r.truncated):
            assert len(span) <= params.max_new_tokens
            assert (span[-1] in stop) != trunc
            assert tokenizer.decode([t for t in span if t not in stop], skip_special_tokens=True) == text
        # multi-turn conditioning: each later turn's context holds the earlier responses
        first_span_end = max(i for i, m in enumerate(r.loss_mask[: r.loss_mask.index(1) + len(spans[0])]) if m)
        assert r.ids[: first_span_end + 1][-len(spans[0]) :] == spans[0]


def test_rollout_without_probes_and_greedy_is_deterministic(tiny, problems):
    model, tokenizer = tiny
    params = SamplingParams(temperature=0.0, max_new_tokens=5)
    a = rollout_dialogues(model, tokenizer, problems[:2], group_size=2, params=params, include_probes=False)
    assert all(len(r.responses) == 1 for r in a)
    assert a[0].ids == a[1].ids  # greedy: the G copies agree


def test_second_turn_depends_on_first_answer(tiny, problems):
    """The probe turn is prefilled with the sampled first answer: changing it changes the context."""
    model, tokenizer = tiny
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    rs = rollout_dialogues(
        model, tokenizer, problems[:1], group_size=4, params=params, generator=torch.Generator().manual_seed(0)
    )
    contexts = {tuple(r.ids[: len(r.ids) - sum(r.loss_mask[-1:])]) for r in rs}
    firsts = {r.responses[0] for r in rs}
    assert len(firsts) > 1 and len(contexts) > 1
