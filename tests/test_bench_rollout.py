"""The rollout and end-to-end benches measure what they claim: every provider samples real tokens for the same
problems (counts in the same range), the previous sampler is the real one from git history, and one GRPO step of
ours trains (finite loss, the weights move). TRL runs only where it is installed (the `bench` extra)."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from exgrpo_fast.model.loading import load_model
    from exgrpo_fast.model.tiny import create_tiny_checkpoint

    path = create_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)
    model, tokenizer = load_model(path, dtype=torch.float32, device=torch.device("cpu"))
    return path, model.eval(), tokenizer


def test_bench_rollout_providers_sample_comparable_tokens(tiny):
    from benches import bench_rollout as b

    _, model, tok = tiny
    params = b.SamplingParams(temperature=1.0, max_new_tokens=6)
    probs = [b.limit_turns(p, 3) for p in b.problems_with_turns(2, 3)]
    ours = b.run_ours(model, tok, probs, 2, params, 3, 4)
    hf = b.run_hf(model, tok, probs, 2, params, 3, 4)
    prev = b.load_previous_sampler()
    if prev is None:
        pytest.skip("git history with the previous sampler is not available")
    assert "DynamicCache" in Path(prev.__file__).read_text()  # really the old implementation
    old = b.run_previous(prev, model, tok, probs, 2, params, 3, 4)
    max_tokens = 2 * 2 * 3 * params.max_new_tokens  # P x G x turns x max_new_tokens
    for n in (ours, hf, old):
        assert max_tokens // 4 < n <= max_tokens


def test_bench_e2e_our_step_trains(tiny):
    from benches import bench_e2e as b

    path, _, _ = tiny
    args = argparse.Namespace(max_new_tokens=6, group_size=2, lr=1e-2, token_budget=2048)
    model, tok = b.load_model(path, dtype=torch.float32, device=torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    probs = b.make_problems(2, seed=0)
    for include_probes in (False, True):
        out = b.our_step(model, tok, opt, probs, args, include_probes, step=0)
        assert out["rollout_tokens"] > 0 and out["trained_tokens"] > out["rollout_tokens"]
        assert torch.isfinite(torch.tensor(out["loss"])) and out["seconds"] >= out["rollout_seconds"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_bench_e2e_shared_prefix_is_the_same_step(tiny):
    """ours and ours-noshare sample the same rollouts from the same weights and compute the same loss; sharing only
    cuts the tokens the update computes. Long-prompt problems share a few-shot context within the asked size."""
    from benches import bench_e2e as b

    path, _, _ = tiny
    args = argparse.Namespace(max_new_tokens=6, group_size=3, lr=1e-2, token_budget=2048)
    probs = b.make_problems(2, seed=0, prompt_len=200)
    context = probs[0]["question"].rsplit("\n", 1)[0]  # worked examples, then the question
    assert context.startswith("Q: ") and all(p["question"].startswith(context) for p in probs)
    assert max(len(p["question"]) for p in probs) <= 200 - 3  # + the template's 3 tokens
    for include_probes in (False, True):  # single turn; 3-turn dialogues share their first prompt only
        out = {}
        for share in (True, False):
            model, tok = b.load_model(path, dtype=torch.float32, device=torch.device("cpu"))
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
            out[share] = b.our_step(model, tok, opt, probs, args, include_probes, step=0, share=share)
        assert out[True]["trained_tokens"] == out[False]["trained_tokens"] == out[False]["update_tokens"]
        saved = out[False]["update_tokens"] - out[True]["update_tokens"]
        assert saved >= sum((args.group_size - 1) * len(p["question"]) for p in probs)  # the prompt, G - 1 times
        assert abs(out[True]["loss"] - out[False]["loss"]) <= 1e-5 * abs(out[False]["loss"]) + 1e-7


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is in the bench extra")
def test_bench_e2e_trl_runs(tiny):
    from benches import bench_e2e as b

    path, _, _ = tiny
    args = argparse.Namespace(max_new_tokens=6, group_size=2, lr=1e-3, token_budget=2048)
    probs = b.make_problems(4, seed=0)
    steps = b.run_trl(path, [probs[:2], probs[2:]], args, torch.device("cpu"), torch.float32)
    assert len(steps) == 2
    for s in steps:
        assert s["rollout_tokens"] > 0 and s["trained_tokens"] > s["rollout_tokens"] and s["seconds"] > 0
        assert s["reward"] == s["reward"] and s["loss"] == s["loss"]  # logged, not NaN


def test_bench_rollout_decode_roofline_runs(tiny):
    from benches import bench_rollout as b

    _, model, _ = tiny
    step_ms, bound_ms = b.decode_roofline(model, batch=2, context=16, steps=4, device=torch.device("cpu"))
    assert step_ms > 0 and bound_ms != bound_ms  # no bandwidth figure on CPU: NaN, not a made-up number
