"""The sampling engine: prefill and decode_one_token over a RowKVCache, a fixed-shape decode state, CUDA graphs.

A Chunk is one batch of rows (dialogues) sharing one preallocated cache sized for the whole dialogue. Its life:
    prefill_prompts(prompts, repeats=G)  the P prompts prefilled once, the cache expanded to P*G rows (shared prefix)
    decode(logits, active)               sample a turn for every active row in one batch
    prefill(pending)                     extend each row with its new tokens only (closed turn + next user turn)
    decode(...)                          ... and so on, turn by turn.

decode_one_token is a pure function of fixed-shape device tensors (DecodeState + the cache), so on CUDA it is
captured in a CUDA graph once per batch shape and bucket of attended slots (the live cache length rounded up to 256,
so a step reads the live cache, not all of it) and replayed; on CPU the same function runs eagerly. Host syncs: the
stop check every `stop_check_every` steps (all-reduced across ranks when torch.distributed is initialised so that
all ranks run the same number of forwards and FSDP all-gathers stay in step) and one copy of the sampled tokens per
turn.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from exgrpo_fast.rollout import lean
from exgrpo_fast.rollout.cache import RowKVCache
from exgrpo_fast.rollout.lean import LeanDecoder
from exgrpo_fast.rollout.sampling import sample_next

_log = logging.getLogger(__name__)

_KV_BUCKET = 64  # eager mode: attend over the live cache rounded up to this many slots, not all of it
_GRAPH_KV_BUCKET = 256  # CUDA graphs: one captured decode step per this many attended slots
_MIN_COMPACT_ROWS = 8  # eager mode: below this many rows, compacting finished rows away is not worth a copy


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# ----------------------------------------------------------------------------------------------------------------
# ranks agree on every stop (issue 11: FSDP all-gathers must stay in step)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def agree_max(value: int, device: torch.device) -> int:
    """The largest `value` over all ranks (the value itself in a single process)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())  # sync: once per agreement (turn/chunk counts, stop checks)


# ----------------------------------------------------------------------------------------------------------------
# model adapters


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _body(model):
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    return body if body is not None else getattr(model, model.base_model_prefix)


@dataclass
class DecodeState:
    """Fixed-shape device tensors of one decode batch of B rows (what a captured graph reads and writes)."""

    tok: torch.Tensor  # (B,) int64: last sampled token, fed by the next step
    lens: torch.Tensor  # (B,) int64: tokens in the cache = the slot (and position) of tok
    done: torch.Tensor  # (B,) bool: row finished this turn (stop token, budget, or not taking part)
    n_gen: torch.Tensor  # (B,) int64: tokens sampled this turn
    budget: torch.Tensor  # (B,) int64: max tokens this turn (max_new_tokens, less where the cache is short)
    out: torch.Tensor  # (B, N + 1) int64: sampled tokens; column N is a trash column for finished rows
    seeds: torch.Tensor  # (B,) int64: per-row sampling seeds

    def select(self, rows: torch.Tensor) -> DecodeState:
        return DecodeState(**{name: getattr(self, name).index_select(0, rows) for name in self.__dataclass_fields__})

    def write_rows(self, dst: DecodeState, dst_rows: torch.Tensor) -> None:
        for name in self.__dataclass_fields__:
            getattr(dst, name).index_copy_(0, dst_rows, getattr(self, name))

    def copy_(self, other: DecodeState) -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).copy_(getattr(other, name))

    def clone(self) -> DecodeState:
        return DecodeState(**{name: getattr(self, name).clone() for name in self.__dataclass_fields__})


def _is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def graphs_supported(model) -> tuple[bool, str]:
    """(whether a decode step of `model` can be captured in a CUDA graph, why not). A model whose rotary embedding
    is "dynamic" (dynamic NTK scaling) compares the longest position with its cache on the host and re-registers its
    frequencies inside the forward: a host sync during capture, and buffers that move after it."""
    for m in model.modules():
        rope = getattr(m, "rope_type", None)
        types = rope.values() if isinstance(rope, dict) else [rope] if isinstance(rope, str) else []
        dynamic = [t for t in types if "dynamic" in t]
        if dynamic:
            return False, f"rope_type {dynamic[0]!r} recomputes its frequencies on the host"
    return True, ""


class Engine:
    """Model adapter + sampling parameters, kept across rollout calls (any transformers decoder: Llama, Qwen2/3,
    Gemma). What it holds for reuse: the lean decoder (its fused buffers refreshed in place when the weights change)
    and, in CUDA graph mode, the captured graphs with the caches and decode states they read (`reuse`). Graphs read
    the model's parameters by address, so they stay valid while the weights are updated in place (optimizer steps,
    the sampler copy's refresh); `valid()` tells when the parameters were replaced."""

    def __init__(self, model, *, temperature: float, top_p: float, max_new_tokens: int, stop_check_every: int,
                 stop_ids: list[int], pad_id: int, cuda_graphs: bool = True, lean_forward: bool = True,
                 lean_fuse: bool | None = None):  # fmt: skip
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        if stop_check_every < 1:
            raise ValueError(f"stop_check_every={stop_check_every}: must be >= 1")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p}: must be in (0, 1]")
        if not temperature >= 0.0:
            raise ValueError(f"temperature={temperature}: must be >= 0")
        self.model, self.body, self.head = model, _body(model), model.get_output_embeddings()
        config = _text_config(model)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.layer_types = list(getattr(config, "layer_types", None) or [])
        self.window = getattr(config, "sliding_window", None)
        for t in set(self.layer_types) - {"full_attention", "sliding_attention"}:
            raise NotImplementedError(f"{type(model).__name__}: layer type {t!r} is not supported by the sampler")
        self.max_positions = getattr(config, "max_position_embeddings", None)
        self.device = next(model.parameters()).device
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.max_new_tokens, self.stop_check_every = int(max_new_tokens), int(stop_check_every)
        self.stop = torch.tensor(stop_ids, dtype=torch.int64, device=self.device)
        self.pad_id = int(pad_id)
        # Rollouts sample from a plain (unsharded) model: the trainer's sampler copy. Should a sharded model come
        # here, neither CUDA graphs nor the lean forward may bypass the FSDP hooks that gather its weights.
        sharded = _is_sharded(model)
        graphs_ok, why = graphs_supported(model)
        if cuda_graphs and self.device.type == "cuda" and not graphs_ok:
            _log.warning("rollout: no CUDA graphs for %s: %s", type(model).__name__, why)
        self.use_graphs = bool(cuda_graphs) and self.device.type == "cuda" and not sharded and graphs_ok
        use_lean = lean_forward and not sharded and lean.supports(model)
        self.lean = LeanDecoder(model, fuse=lean_fuse) if use_lean else None
        self.reuse: dict = {}  # CUDA graph mode: caches, decode states and graphs by shape, across calls
        self._param_ptrs = self._ptrs()
        params = inspect.signature(type(self.body).forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.forwards = 0  # model forwards run (prefills + decode steps): equal on every rank

    def _ptrs(self) -> tuple[int, ...]:
        try:
            return tuple(p.data_ptr() for p in self.model.parameters())
        except RuntimeError:  # tensors without data (fake tensors of the memory plan): nothing to compare
            return ()

    def valid(self) -> bool:
        """Still usable for its model: the parameters have not been replaced (in-place updates are fine)."""
        return self._ptrs() == self._param_ptrs

    # -- one forward -------------------------------------------------------------------------------------------
    def _mask(self, lens: torch.Tensor, n: torch.Tensor | None, q: int, kv_len: int):
        """4-D boolean masks [B, 1, q, kv_len]: query i of row b sees slots <= lens[b] + i (and within the sliding
        window on sliding layers); padding queries (i >= n[b]) see slot 0 only (finite, ignored outputs).
        n=None is a decode step (q = 1, every row's query is real: finished rows' outputs are ignored)."""
        j = torch.arange(kv_len, device=lens.device)
        if n is None:
            qpos = lens[:, None]  # (B, 1)
            causal = (j[None, :] <= qpos)[:, None]  # (B, 1, K)
            valid = pad = None
        else:
            i = torch.arange(q, device=lens.device)
            qpos = lens[:, None] + i[None, :]  # (B, q)
            valid = (i[None, :] < n[:, None])[:, :, None]  # (B, q, 1)
            causal = j[None, None, :] <= qpos[:, :, None]  # (B, q, K)
            pad = (j == 0)[None, None, :]
        full = (causal if n is None else torch.where(valid, causal, pad))[:, None]
        needs_window = "sliding_attention" in self.layer_types or (not self.layer_types and self.window)
        if not needs_window:
            return full
        in_window = causal & (qpos[:, :, None] - j[None, None, :] < self.window)
        sliding = (in_window if n is None else torch.where(valid, in_window, pad))[:, None]
        if not self.layer_types:
            return sliding
        return {"full_attention": full, "sliding_attention": sliding}

    def forward(self, cache: RowKVCache, input_ids: torch.Tensor, lens: torch.Tensor, n: torch.Tensor | None,
                kv_len: int) -> torch.Tensor:  # fmt: skip
        """Run input_ids [B, q] (row b's first n[b] are real, written at slots lens[b]...) -> hidden [B, q, H].
        n=None is a decode step: q = 1, rows with cache.write_idx already set (finished rows -> trash slot)."""
        if n is None:
            position_ids = lens[:, None]
        else:
            q = input_ids.shape[1]
            i = torch.arange(q, device=input_ids.device)
            valid = i[None, :] < n[:, None]
            slots = lens[:, None] + i[None, :]
            cache.write_idx = torch.where(valid, slots, cache.max_len)
            position_ids = torch.where(valid, slots, 0)
        cache.kv_len = kv_len
        mask = self._mask(lens, n, input_ids.shape[1], kv_len)
        self.forwards += 1
        if self.lean is not None:
            return self.lean(input_ids, position_ids, mask, cache)
        out = self.body(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            use_cache=True,
            **{self.cache_kw: cache},
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head (and final logit softcapping where the model has it): hidden [B, H] -> logits [B, V]. Half logits
        stay half when there is no softcap: the sampler upcasts them exactly as it reads them, so a decode step writes
        and re-reads no fp32 copy of [B, V] (the same tokens). Softcapped or other dtypes: fp32."""
        logits = self.head(hidden)
        if self.softcap or logits.dtype not in (torch.bfloat16, torch.float16):
            logits = logits.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    # -- decode ------------------------------------------------------------------------------------------------
    def record(self, state: DecodeState, tok: torch.Tensor, active: torch.Tensor) -> None:
        """Store sampled tokens of active rows, then mark rows that sampled a stop id or spent their budget."""
        col = torch.where(active, state.n_gen, state.out.shape[1] - 1)
        state.out.scatter_(1, col[:, None], tok[:, None])
        state.tok.copy_(torch.where(active, tok, state.tok))
        state.n_gen.add_(active.long())
        stopped = (tok[:, None] == self.stop[None, :]).any(-1)
        state.done.logical_or_(active & (stopped | (state.n_gen >= state.budget)))

    def decode_one_token(self, state: DecodeState, cache: RowKVCache, kv_len: int) -> None:
        """One decode step for every row, in place: feed tok, sample the next one. Finished rows write to the trash
        slot and keep their state. No host sync: capturable in a CUDA graph."""
        active = ~state.done
        cache.write_idx = torch.where(active, state.lens, cache.max_len)[:, None]  # finished rows -> trash slot
        hidden = self.forward(cache, state.tok[:, None], state.lens, None, kv_len)
        logits = self.logits(hidden[:, 0])
        state.lens.add_(active.long())
        tok = sample_next(logits, self.temperature, self.top_p, state.seeds, state.lens)
        self.record(state, tok, active)


class Chunk:
    """One batch of rows sharing a preallocated cache for the whole dialogue (see the module docstring)."""

    def __init__(self, engine: Engine, n_rows: int, max_len: int, seeds: list[int], reuse: dict | None = None):
        self.engine, self.n_rows, self.max_len = engine, n_rows, max_len
        self.seeds = torch.tensor(seeds, dtype=torch.int64, device=engine.device)
        self.lens = [0] * n_rows  # host copy of the cache lengths
        self.cache: RowKVCache | None = None
        # CUDA graph mode: buffers, state and graph are reused by later chunks of the same shape (`reuse` dict)
        self.reuse = reuse if reuse is not None else {}

    def _run(self, cache: RowKVCache, pending: list[list[int]], lens: list[int]) -> torch.Tensor:
        """Forward the ragged pending tokens of every row (right-padded) -> logits at each row's last token [B, V]."""
        e = self.engine
        n_host = [len(p) for p in pending]
        q = max(1, max(n_host))
        ids = torch.full((len(pending), q), e.pad_id, dtype=torch.int64)
        for b, p in enumerate(pending):
            ids[b, : len(p)] = torch.tensor(p, dtype=torch.int64)
        dev = e.device
        n = torch.tensor(n_host, dtype=torch.int64, device=dev)
        lens_t = torch.tensor(lens, dtype=torch.int64, device=dev)
        kv_len = min(cache.max_len, _round_up(max(a + b for a, b in zip(lens, n_host)) or 1, _KV_BUCKET))
        hidden = e.forward(cache, ids.to(dev), lens_t, n, kv_len)
        last = (n - 1).clamp_min(0)
        h = hidden.gather(1, last[:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0]  # (B, H)
        return e.logits(h)

    def prefill_prompts(self, prompts: list[list[int]], repeats: int) -> torch.Tensor:
        """Prefill P prompts once, expand the cache to P * repeats rows (row p*repeats + g copies prompt p).
        Returns the logits of each row's next token [P * repeats, V]."""
        if len(prompts) * repeats != self.n_rows:
            raise ValueError(f"{len(prompts)} prompts x {repeats} != {self.n_rows} rows")
        used = max(1, max(len(p) for p in prompts))
        if used > self.max_len:
            raise ValueError(f"a prompt of {used} tokens does not fit a cache of {self.max_len}")
        small = RowKVCache(len(prompts), used, self.engine.device)
        logits = self._run(small, prompts, [0] * len(prompts))
        into = self.reuse.get(("cache", self.n_rows, self.max_len)) if self.engine.use_graphs else None
        self.cache = small.expand(repeats, self.max_len, used, into=into)
        if self.engine.use_graphs:
            self.reuse[("cache", self.n_rows, self.max_len)] = self.cache
        self.lens = [len(p) for p in prompts for _ in range(repeats)]
        return logits.repeat_interleave(repeats, dim=0) if repeats > 1 else logits

    def prefill(self, pending: list[list[int]]) -> torch.Tensor:
        """Extend each row's cache with its pending tokens (may be empty) -> next-token logits [B, V]."""
        if any(a + len(p) > self.max_len for a, p in zip(self.lens, pending)):
            raise ValueError("pending tokens overflow the cache (the caller must cut the dialogue first)")
        logits = self._run(self.cache, pending, self.lens)
        self.lens = [a + len(p) for a, p in zip(self.lens, pending)]
        return logits

    def decode(self, logits: torch.Tensor, active: list[bool]) -> list[tuple[list[int], bool, bool] | None]:
        """Sample one turn for the active rows, starting from their next-token logits [B, V]. Returns per row
        (sampled ids up to and including the stop id, finished with a stop id?, cut short by the cache?) or None for
        rows not taking part."""
        e, B, N = self.engine, self.n_rows, self.engine.max_new_tokens
        dev = e.device
        active_t = torch.tensor(active, dtype=torch.bool, device=dev)
        budget_host = [max(0, min(N, self.max_len - a)) if act else 0 for a, act in zip(self.lens, active)]
        if any(act and b < 1 for act, b in zip(active, budget_host)):
            raise ValueError("an active row has no room left in the cache (the caller must cut the dialogue first)")
        lens = torch.tensor(self.lens, dtype=torch.int64, device=dev)
        fresh = DecodeState(
            tok=torch.full((B,), e.pad_id, dtype=torch.int64, device=dev),
            lens=lens,
            done=~active_t,
            n_gen=torch.zeros(B, dtype=torch.int64, device=dev),
            budget=torch.tensor(budget_host, dtype=torch.int64, device=dev),
            out=torch.full((B, N + 1), e.pad_id, dtype=torch.int64, device=dev),
            seeds=self.seeds,
        )
        state = fresh
        if e.use_graphs:  # graphs read fixed addresses: one state per batch shape, refilled in place
            key = ("state", B, self.max_len)
            if key in self.reuse:
                state = self.reuse[key]
                state.copy_(fresh)
            else:
                self.reuse[key] = state
        e.record(state, sample_next(logits, e.temperature, e.top_p, state.seeds, state.lens), active_t)

        # Eager mode compacts: when at most half the working rows are still running at a stop check, the running
        # ones move to a smaller working cache (finished rows stop costing compute); they are written back at the
        # end. CUDA graphs keep the captured shape instead.
        full_state, work_state, work_cache, work_rows = state, state, self.cache, None
        start_max = max(self.lens) if self.lens else 0
        for s in range(1, N):
            if (s - 1) % e.stop_check_every == 0:
                done_host = work_state.done.tolist()  # sync: stop check every stop_check_every steps
                n_running = len(done_host) - sum(done_host)
                if not agree_max(int(n_running > 0), dev):
                    break
                if not e.use_graphs and len(done_host) >= _MIN_COMPACT_ROWS and 0 < n_running <= len(done_host) // 2:
                    keep = torch.tensor([i for i, d in enumerate(done_host) if not d], device=dev)
                    gone = torch.tensor([i for i, d in enumerate(done_host) if d], device=dev)
                    used = min(self.max_len, start_max + s)  # slots written so far (upper bound)
                    if work_rows is not None:  # flush the rows that leave the working set
                        work_state.write_rows(full_state, work_rows)
                        work_cache.write_rows(self.cache, work_rows[gone], gone, used)
                        work_rows = work_rows[keep]
                    else:
                        work_rows = keep
                    work_state, work_cache = work_state.select(keep), work_cache.select_rows(keep, used)
            if e.use_graphs:  # one graph per (batch shape, attended-slots bucket), captured on first use
                kv_len = min(self.max_len, _round_up(start_max + s, _GRAPH_KV_BUCKET))
                gkey = ("graph", B, self.max_len, kv_len)
                if gkey not in self.reuse:
                    pool = self.reuse.setdefault("pool", torch.cuda.graph_pool_handle())
                    self.reuse[gkey] = _capture(e, state, self.cache, kv_len, pool)
                self.reuse[gkey].replay()
                e.forwards += 1
            else:
                kv_len = min(self.max_len, _round_up(start_max + s, _KV_BUCKET))
                e.decode_one_token(work_state, work_cache, kv_len)
        if work_rows is not None:  # write the working rows back
            used = min(self.max_len, start_max + N)
            work_state.write_rows(full_state, work_rows)
            work_cache.write_rows(self.cache, work_rows, torch.arange(len(work_rows), device=dev), used)

        # sync: one copy of the sampled tokens per turn
        out, n_gen = state.out.tolist(), state.n_gen.tolist()
        stop = set(e.stop.tolist())
        results: list[tuple[list[int], bool, bool] | None] = []
        for b in range(B):
            if not active[b]:
                results.append(None)
                continue
            ids = out[b][: n_gen[b]]
            finished = bool(ids) and ids[-1] in stop
            cut = not finished and n_gen[b] >= budget_host[b] and budget_host[b] < N
            self.lens[b] += max(0, n_gen[b] - 1)  # the last sampled token is fed by the next prefill
            results.append((ids, finished, cut))
        return results


def _capture(e: Engine, state: DecodeState, cache: RowKVCache, kv_len: int, pool) -> torch.cuda.CUDAGraph:
    """Capture decode_one_token attending over the first kv_len slots in a CUDA graph. The warm-up steps advance the
    state and scribble past each row's live slots; the state is restored afterwards (the scribbled slots lie beyond
    lens and are overwritten before they are read). All graphs of a call share one memory pool: they only hold
    intermediates, and replays are sequential on one stream. Capture runs on a stream of the model's device with
    that device current (a model on cuda:1 in a process whose current device is cuda:0 would otherwise be captured on
    the wrong device's stream)."""
    backup = state.clone()
    with torch.cuda.device(e.device):
        stream = torch.cuda.Stream(device=e.device)
        stream.wait_stream(torch.cuda.current_stream(e.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy inits, cuBLAS workspaces, allocator
                e.decode_one_token(state, cache, kv_len)
        torch.cuda.current_stream(e.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream(device=e.device)):
            e.decode_one_token(state, cache, kv_len)
    e.forwards -= 3  # warm-up and capture are not decode steps of the rollout
    state.copy_(backup)
    return graph
