"""Batched multi-turn sampling with a KV cache (gpt-fast style: small prefill / decode / sample functions).

A rollout is one dialogue: the student answers the question, then each explanatory probe, every turn conditioned on
its own earlier answers. Each turn re-prefills the growing context (left-padded, explicit attention mask and
position ids) and then decodes token by token with a transformers DynamicCache. The only host syncs in the decode
loop are the stop checks, every `stop_check_every` tokens (`# sync:`).

The token ids and loss mask of each dialogue are built from the sampled ids themselves (never re-tokenised text):
loss_mask is 1 exactly on the tokens the student sampled, so the trained-on tokens are the sampled ones. A turn cut
at max_new_tokens gets the end-of-turn ids appended with loss_mask 0 so that the next turn reads a closed turn.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

__all__ = [
    "Rollout",
    "SamplingParams",
    "decode_one_token",
    "generate",
    "prefill",
    "rollout_dialogues",
    "sample_next",
]


@dataclass
class SamplingParams:
    """How the student samples; config.RolloutConfig (the `rollout` section of the CLI) extends it."""

    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    max_new_tokens: int = 48
    """Max tokens the student writes per turn."""
    stop_check_every: int = 4
    """Check for end-of-turn on the host every this many decode steps (the only per-token sync)."""


@dataclass
class Rollout:
    """One sampled dialogue."""

    problem_index: int
    """Index of the problem in the list given to rollout_dialogues (the GRPO group id)."""
    turns: list[dict] = field(default_factory=list)
    """[{role, content}, ...] with the student's decoded responses."""
    responses: list[str] = field(default_factory=list)
    """The student's decoded responses, one per user turn."""
    ids: list[int] = field(default_factory=list)
    """Token ids of the whole dialogue (prompt template + sampled tokens)."""
    loss_mask: list[int] = field(default_factory=list)
    """1 on tokens the student sampled, 0 elsewhere (same length as ids)."""
    truncated: list[bool] = field(default_factory=list)
    """Per turn: the response hit max_new_tokens without an end-of-turn token."""


# ----------------------------------------------------------------------------------------------------------------
# model steps


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, L], attention_mask [B, L]) with the prompts right-aligned."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, L - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _cache_kw(model) -> str:
    """transformers >= 5.x names the KV cache argument `cache` (`past_key_values` is deprecated)."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Run the left-padded prompts; returns (logits of the last position [B, V], cache, next position ids [B, 1])."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # (B, L): 0 at the first real token
    cache = DynamicCache()
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{_cache_kw(model): cache},
    )
    return out.logits[:, -1, :], cache, position_ids[:, -1:] + 1


def decode_one_token(model, token: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache):
    """One decode step for token [B, 1] at position_ids [B, 1]; attention_mask covers cache + token -> logits [B, V]."""
    out = model(
        input_ids=token,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **{_cache_kw(model): cache},
    )
    return out.logits[:, -1, :]


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """Next tokens [B] from logits [B, V]: greedy at temperature 0, else tempered nucleus sampling."""
    if temperature <= 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    *,
    stop_ids: list[int],
    pad_id: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> list[tuple[list[int], bool]]:
    """Sample one response per prompt. Returns [(ids up to and including the first stop id, truncated?)]."""
    device = next(model.parameters()).device
    input_ids, attention_mask = _left_pad(prompts, pad_id, device)
    B, n = len(prompts), params.max_new_tokens
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    out = torch.full((B, n), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    logits, cache, position_ids = prefill(model, input_ids, attention_mask)
    ones = torch.ones((B, 1), dtype=attention_mask.dtype, device=device)
    steps = 0
    for t in range(n):
        token = sample_next(logits, params.temperature, params.top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out[:, t] = token
        done = done | torch.isin(token, stop)
        steps = t + 1
        if steps == n:
            break
        if steps % params.stop_check_every == 0 and bool(done.all()):  # sync: stop check
            break
        attention_mask = torch.cat([attention_mask, ones], dim=1)
        logits = decode_one_token(model, token[:, None], attention_mask, position_ids, cache)
        position_ids = position_ids + 1

    # sync: one copy of the sampled tokens to the host per turn
    out_list, done_list = out[:, :steps].tolist(), done.tolist()
    stop_set = set(stop_ids)
    results = []
    for row, finished in zip(out_list, done_list):
        ids = []
        for tok in row:
            ids.append(tok)
            if tok in stop_set:
                break
        results.append((ids, not finished))
    return results


# ----------------------------------------------------------------------------------------------------------------
# dialogues


@contextlib.contextmanager
def _sampling_attention(model):
    """Padded 2-D masks need an attention implementation that reads them: use SDPA while sampling."""
    impl = getattr(model.config, "_attn_implementation", None)
    # exgrpo_packed (exgrpo_fast.model.attention) falls through to SDPA with the padding mask when not packed
    switch = impl not in (None, "sdpa", "eager", "exgrpo_packed") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(impl)


def _encode(tokenizer, turns: list[dict]) -> tuple[list[int], list[int]]:
    from exgrpo_fast.data.dialogue import encode_dialogue

    ids, mask = encode_dialogue(tokenizer, turns)
    return list(map(int, ids)), list(map(int, mask))


def _user_delta(tokenizer, turns: list[dict], user: str) -> list[int]:
    """Tokens the template adds for the next user turn + assistant generation prompt after `turns`."""
    from exgrpo_fast.data.dialogue import encode_prompt

    full = list(map(int, encode_prompt(tokenizer, turns + [{"role": "user", "content": user}])))
    if not turns:
        return full
    base, _ = _encode(tokenizer, turns)
    if full[: len(base)] == base:
        return full[len(base) :]
    k = 0  # a template that is not prefix-stable: keep what differs after the common prefix
    while k < min(len(full), len(base)) and full[k] == base[k]:
        k += 1
    return full[k:]


def _assistant_tail(tokenizer, turns: list[dict]) -> list[int]:
    """Template tokens after the last assistant turn's end-of-turn (e.g. a newline); usually empty."""
    ids, mask = _encode(tokenizer, turns)
    last = max((i for i, m in enumerate(mask) if m), default=len(ids) - 1)
    return ids[last + 1 :]


@torch.no_grad()
def rollout_dialogues(
    model,
    tokenizer,
    problems: list[dict],
    *,
    group_size: int,
    params: SamplingParams,
    include_probes: bool = True,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> list[Rollout]:
    """G = group_size dialogues per problem, sampled turn by turn. Rollouts are ordered problem-major
    (rollouts[p * G + g] belongs to problems[p])."""
    from exgrpo_fast.data.dialogue import end_of_turn_ids
    from exgrpo_fast.data.tasks import rollout_user_turns

    stop_ids = list(map(int, end_of_turn_ids(tokenizer)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    user_turns = [rollout_user_turns(p, include_probes=include_probes) for p in problems]
    rollouts = [Rollout(problem_index=p) for p in range(len(problems)) for _ in range(group_size)]

    was_training = model.training
    model.eval()
    with _sampling_attention(model):
        for turn in range(max(len(u) for u in user_turns)):
            active = [r for r in rollouts if turn < len(user_turns[r.problem_index])]
            for r in active:  # extend the context with the next user turn
                delta = _user_delta(tokenizer, r.turns, user_turns[r.problem_index][turn])
                r.ids += delta
                r.loss_mask += [0] * len(delta)
                r.turns.append({"role": "user", "content": user_turns[r.problem_index][turn]})
            for start in range(0, len(active), batch_size):
                chunk = active[start : start + batch_size]
                results = generate(
                    model, [r.ids for r in chunk], stop_ids=stop_ids, pad_id=pad_id, params=params, generator=generator
                )
                for r, (ids, truncated) in zip(chunk, results):
                    r.ids += ids
                    r.loss_mask += [1] * len(ids)
                    if truncated:  # close the turn; these tokens were not sampled, so no loss on them
                        r.ids += stop_ids[:1]
                        r.loss_mask += [0]
                    text = tokenizer.decode([t for t in ids if t not in stop_ids], skip_special_tokens=True)
                    r.responses.append(text)
                    r.truncated.append(truncated)
                    r.turns.append({"role": "assistant", "content": text})
                    tail = _assistant_tail(tokenizer, r.turns)
                    r.ids += tail
                    r.loss_mask += [0] * len(tail)
    model.train(was_training)
    return rollouts
