"""Multi-turn rollouts: G dialogues per problem, sampled turn by turn with a preallocated, prefix-shared KV cache.

A rollout is one dialogue: the student answers the question, then each explanatory probe, every turn conditioned
on its own earlier answers. Per batch of problems (a Chunk of P x G rows, engine.py):
- one KV cache sized for the whole dialogue is allocated once (RowKVCache: per-row slots, no padding inside);
- each problem's prompt is prefilled once and copied to its G rows (copy-on-expand);
- later turns prefill only the new tokens (the closed previous turn and the next user turn), never earlier turns;
- all rows decode together; sampling runs on the device from per-row seeds (sampling.py), so a dialogue's tokens do
  not depend on the other dialogues in its batch; on CUDA the decode step is a captured CUDA graph;
- the stop check runs every `stop_check_every` tokens (`# sync:`) and, under torch.distributed, is agreed across
  ranks (as are the numbers of batches and turns), so every rank runs the same number of model forwards;
- a dialogue that would overflow the cache stops there with `overflow=True` (its last turn marked truncated).

The token ids and loss mask of each dialogue are built from the sampled ids themselves (never re-tokenised text):
loss_mask is 1 exactly on the tokens the student sampled. A turn cut at max_new_tokens gets the end-of-turn id
appended with loss_mask 0 so that the next turn reads a closed turn.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from exgrpo_fast.rollout.cache import RowKVCache
from exgrpo_fast.rollout.engine import Chunk, Engine, agree_max
from exgrpo_fast.rollout.sampling import mix_seed, sample_next

__all__ = [
    "Chunk",
    "Engine",
    "Rollout",
    "RowKVCache",
    "SamplingParams",
    "generate",
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
    max_context: int = 0
    """KV-cache length per dialogue in tokens (0 = the model's max_position_embeddings). A dialogue that would
    exceed it stops there and is flagged (Rollout.overflow)."""
    cuda_graphs: bool = True
    """On CUDA (single process), replay the decode step as a captured CUDA graph."""
    lean_forward: bool = True
    """Llama/Mistral/Qwen2/Qwen3: sample through a lean forward (same maths, about a third of the ops per layer);
    other models always use their transformers forward."""
    persistent: bool = True
    """Keep the sampling engine of a model across rollout calls: the lean decoder's fused weights (refreshed in place
    when the weights change) and, on CUDA, the captured graphs with the KV caches and decode states they read (those
    stay allocated between calls: see the memory plan). False: built per call and freed after it."""


@dataclass
class Rollout:
    """One sampled dialogue."""

    problem_index: int
    """Index of the problem in the list given to rollout_dialogues (the GRPO group id)."""
    turns: list[dict] = field(default_factory=list)
    """[{role, content}, ...] with the student's decoded responses."""
    responses: list[str] = field(default_factory=list)
    """The student's decoded responses, one per user turn that was sampled."""
    ids: list[int] = field(default_factory=list)
    """Token ids of the whole dialogue (prompt template + sampled tokens)."""
    loss_mask: list[int] = field(default_factory=list)
    """1 on tokens the student sampled, 0 elsewhere (same length as ids)."""
    truncated: list[bool] = field(default_factory=list)
    """Per turn: the response ended without an end-of-turn token (max_new_tokens or the cache length)."""
    overflow: bool = False
    """The dialogue reached the KV-cache length (SamplingParams.max_context): its last turn was cut short and the
    remaining user turns were not sampled (responses is shorter than the problem's user turns)."""


# ----------------------------------------------------------------------------------------------------------------
# chat template pieces, computed once per problem and turn where the template allows


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
    k = 0  # common prefix (all of base for a prefix-stable template)
    while k < min(len(full), len(base)) and full[k] == base[k]:
        k += 1
    return full[k:]


def _assistant_tail(tokenizer, turns: list[dict]) -> list[int]:
    """Template tokens after the last assistant turn's end-of-turn (e.g. chatml's newline); usually empty."""
    ids, mask = _encode(tokenizer, turns)
    last = max((i for i, m in enumerate(mask) if m), default=len(ids) - 1)
    return ids[last + 1 :]


class _Template:
    """Caches the user-turn deltas and assistant tails per (problem, turn) when the template renders them
    independently of the assistant's text (checked once); otherwise computes them per dialogue."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        a = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "x"}]
        b = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "y z 12."}]
        self.shared = _user_delta(tokenizer, a, "2") == _user_delta(tokenizer, b, "2") and _assistant_tail(
            tokenizer, a
        ) == _assistant_tail(tokenizer, b)
        self._delta: dict = {}
        self._tail: dict = {}

    def delta(self, key, turns: list[dict], user: str) -> list[int]:
        if not self.shared:
            return _user_delta(self.tokenizer, turns, user)
        if key not in self._delta:
            self._delta[key] = _user_delta(self.tokenizer, turns, user)
        return self._delta[key]

    def tail(self, key, turns: list[dict]) -> list[int]:
        if not self.shared:
            return _assistant_tail(self.tokenizer, turns)
        if key not in self._tail:
            self._tail[key] = _assistant_tail(self.tokenizer, turns)
        return self._tail[key]


@contextlib.contextmanager
def _sampling_attention(model):
    """The sampler passes 4-D masks: use SDPA while sampling (exgrpo_packed falls through to SDPA when not packed)."""
    impl = getattr(model.config, "_attn_implementation", None)
    switch = impl not in (None, "sdpa", "eager", "exgrpo_packed") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("sdpa")
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        if switch:
            model.set_attn_implementation(impl)


def _has_hooks(model) -> bool:
    """Whether any module of the model carries forward (pre-)hooks: steering, probes or activation capture that the
    lean forward and captured graphs would silently bypass."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


_ENGINES = "_exgrpo_engines"  # model attribute: {sampling key: Engine} kept across calls (SamplingParams.persistent)


def _engine(model, params: SamplingParams, stop_ids: list[int], pad_id: int) -> Engine:
    """The model's engine for these sampling parameters: the one kept from an earlier call (weights refreshed into
    its lean buffers) when params.persistent and the model's parameters are the same tensors, else a new one."""
    hooked = _has_hooks(model)  # hooks must fire: sample through the model's own modules, eagerly
    cuda_graphs = getattr(params, "cuda_graphs", True) and not hooked
    lean_forward = getattr(params, "lean_forward", True) and not hooked
    key = (float(params.temperature), float(params.top_p), int(params.max_new_tokens), int(params.stop_check_every),
           tuple(stop_ids), int(pad_id), cuda_graphs, lean_forward)  # fmt: skip
    kept = model.__dict__.setdefault(_ENGINES, {}) if getattr(params, "persistent", True) else {}
    engine = kept.get(key)
    if engine is not None and engine.valid():
        if engine.lean is not None:
            engine.lean.refresh()
        return engine
    engine = Engine(
        model, temperature=params.temperature, top_p=params.top_p, max_new_tokens=params.max_new_tokens,
        stop_check_every=params.stop_check_every, stop_ids=stop_ids, pad_id=pad_id, cuda_graphs=cuda_graphs,
        lean_forward=lean_forward,
    )  # fmt: skip
    kept[key] = engine
    return engine


def release_engines(model) -> None:
    """Free what rollouts keep on `model` across calls (graphs, their caches, lean buffers)."""
    model.__dict__.pop(_ENGINES, None)


def _base_seed(generator: torch.Generator | None) -> int:
    """One 62-bit draw from the caller's generator (or torch's global RNG): the root of every row's seed."""
    device = generator.device if generator is not None else "cpu"
    draw = torch.randint(0, 2**62, (1,), generator=generator, device=device)
    return int(draw.item())  # sync: once per call


def _context_cap(engine: Engine, params: SamplingParams) -> int:
    cap = int(getattr(params, "max_context", 0) or 0)
    if cap < 0:
        raise ValueError(f"max_context={cap}: must be >= 0 (0 = the model's max_position_embeddings)")
    return cap or int(engine.max_positions or 1 << 30)


# ----------------------------------------------------------------------------------------------------------------
# public API


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
    """Sample one response per prompt (single turn, one batch). Returns [(ids up to and including the first stop
    id, truncated?)]. A prompt that fills the context (max_context) gets an empty, truncated response."""
    if not prompts:
        return []
    engine = _engine(model, params, list(map(int, stop_ids)), pad_id)
    cap = _context_cap(engine, params)
    max_len = min(cap, _round_up(max(len(p) for p in prompts) + params.max_new_tokens, 64))
    fits = [0 < len(p) < max_len for p in prompts]
    base = _base_seed(generator)
    with _sampling_attention(model):
        chunk = Chunk(engine, len(prompts), max_len, [mix_seed(base, i) for i in range(len(prompts))])
        logits = chunk.prefill_prompts([list(p) if ok else [] for p, ok in zip(prompts, fits)], 1)
        results = chunk.decode(logits, fits)
    return [(res[0], not res[1]) if res is not None else ([], True) for res in results]


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _cache_len(engine: Engine, bound: int) -> int:
    """Cache slots for dialogues of at most `bound` tokens: a multiple of 64, or with CUDA graphs (captured per cache
    shape and kept across calls) the next power of two, so that calls with slightly different problems reuse them."""
    bound = max(bound, 1)
    return max(64, 1 << (bound - 1).bit_length()) if engine.use_graphs else _round_up(bound, 64)


@torch.no_grad()
def rollout_dialogues(
    model,
    tokenizer,
    problems: list,
    *,
    group_size: int,
    params: SamplingParams,
    include_probes: bool = True,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> list[Rollout]:
    """G = group_size dialogues per problem, sampled turn by turn. Rollouts are ordered problem-major
    (rollouts[p * G + g] belongs to problems[p]). Problems are batched so that a batch holds at most batch_size
    dialogues (at least one problem). Under torch.distributed every rank must call this together (possibly with
    different or no problems): the ranks agree on the number of batches, turns and decode steps."""
    from exgrpo_fast.data.dialogue import encode_prompt, end_of_turn_ids
    from exgrpo_fast.data.tasks import rollout_user_turns

    if group_size < 1:
        raise ValueError(f"group_size={group_size}: must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    G = group_size
    stop_ids = list(map(int, end_of_turn_ids(tokenizer)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    engine = _engine(model, params, stop_ids, pad_id)
    users = [rollout_user_turns(p, include_probes=include_probes) for p in problems]
    for i, u in enumerate(users):
        if not u:
            raise ValueError(f"problem {i} has no user turn")
    rollouts = [Rollout(problem_index=p) for p in range(len(problems)) for _ in range(G)]
    template = _Template(tokenizer)

    # One cache length for the call: the longest dialogue (user turns + max_new_tokens per turn), capped.
    first = [list(map(int, encode_prompt(tokenizer, [{"role": "user", "content": u[0]}]))) for u in users]
    bound = 0
    for u in users:
        skeleton = [m for q in u for m in ({"role": "user", "content": q}, {"role": "assistant", "content": ""})]
        bound = max(bound, len(encode_prompt(tokenizer, skeleton[:-1])) + len(u) * (params.max_new_tokens + 2) + 8)
    max_len = min(_context_cap(engine, params), _cache_len(engine, bound))

    base = _base_seed(generator)
    per_chunk = max(1, batch_size // G)
    chunks = [list(range(s, min(s + per_chunk, len(problems)))) for s in range(0, len(problems), per_chunk)]
    n_chunks = agree_max(len(chunks), engine.device)
    reuse = engine.reuse
    with _sampling_attention(model):
        for c in range(n_chunks):
            if c < len(chunks):
                _run_chunk(engine, template, chunks[c], G, users, first, rollouts, max_len, base, stop_ids, reuse)
            else:
                _run_idle_chunk(engine)
    return rollouts


def _run_idle_chunk(engine: Engine) -> None:
    """A rank with no problems left still runs the agreed turns (one dummy row, finished from the start)."""
    chunk = Chunk(engine, 1, 64, [0])
    logits = chunk.prefill_prompts([[engine.pad_id]], 1)
    n_turns = agree_max(0, engine.device)
    for t in range(n_turns):
        if t > 0:
            logits = chunk.prefill([[]])
        chunk.decode(logits, [False])


def _run_chunk(engine, template, problem_ids, G, users, first, rollouts, max_len, base, stop_ids, reuse) -> None:
    tokenizer = template.tokenizer
    rows = [rollouts[p * G + g] for p in problem_ids for g in range(G)]
    row_users = [users[r.problem_index] for r in rows]
    fits = [len(first[p]) < max_len for p in problem_ids]  # room for the prompt and at least one token
    seeds = [mix_seed(base, p, g) for p in problem_ids for g in range(G)]
    chunk = Chunk(engine, len(rows), max_len, seeds, reuse=reuse)
    logits = chunk.prefill_prompts([first[p] if ok else [] for p, ok in zip(problem_ids, fits)], G)
    alive = [fits[b // G] for b in range(len(rows))]
    for b, r in enumerate(rows):
        prompt = first[r.problem_index]
        r.turns.append({"role": "user", "content": row_users[b][0]})
        if alive[b]:
            r.ids, r.loss_mask = list(prompt), [0] * len(prompt)
        else:  # the question alone fills the context: an empty, truncated answer (reward as for any wrong one)
            r.ids, r.loss_mask = list(prompt[:max_len]), [0] * min(len(prompt), max_len)
            r.responses.append("")
            r.truncated.append(True)
            r.turns.append({"role": "assistant", "content": ""})
            r.overflow = True

    n_turns = agree_max(max(len(u) for u in row_users), engine.device)
    for t in range(n_turns):
        active = [alive[b] and t < len(row_users[b]) for b in range(len(rows))]
        if t > 0:
            pending: list[list[int]] = []
            for b, r in enumerate(rows):
                if active[b]:
                    user = row_users[b][t]
                    delta = template.delta((r.problem_index, t), r.turns, user)
                    if len(r.ids) + len(delta) >= max_len:  # no room for the turn and one sampled token
                        active[b] = alive[b] = False
                        r.overflow = True
                    else:
                        r.ids += delta
                        r.loss_mask += [0] * len(delta)
                        r.turns.append({"role": "user", "content": user})
                pending.append(r.ids[chunk.lens[b] :] if active[b] else [])
            logits = chunk.prefill(pending)
        for b, res in enumerate(chunk.decode(logits, active)):
            if res is None:
                continue
            r, (ids, finished, cut) = rows[b], res
            r.ids += ids
            r.loss_mask += [1] * len(ids)
            if not finished:  # close the turn; this token was not sampled, so no loss on it
                r.ids += stop_ids[:1]
                r.loss_mask += [0]
            text = tokenizer.decode([i for i in ids if i not in stop_ids], skip_special_tokens=True)
            r.responses.append(text)
            r.truncated.append(not finished)
            r.turns.append({"role": "assistant", "content": text})
            tail = template.tail((r.problem_index, t), r.turns)
            r.ids += tail
            r.loss_mask += [0] * len(tail)
            if cut:
                alive[b] = False
                r.overflow = True
