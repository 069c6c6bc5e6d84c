"""Varlen (packed, padding-free) attention backends, plugged into transformers through AttentionInterface.

A packed micro-batch is one row of T tokens holding S documents; `cu_seqlens` (int32 [S+1]) and `max_seqlen` say where
each starts. The model forward receives them as explicit keyword arguments (`cu_seq_lens_q`, `cu_seq_lens_k`,
`max_length_q`, `max_length_k`, the names transformers' flash-attention path uses, plus `seq_lens_host` for the CPU
reference), so no layer has to derive them from position_ids with a host sync.

Shared prefixes (data.packing, `groups`): a GRPO group's prompt is one segment of the row and each sample's
continuation another, whose queries must see the prompt's keys and then their own. The batch then also carries
`kv_index` (int64 [T_k]: for each segment, the rows its queries see, prompt rows first) and `cu_seq_lens_k` /
`max_length_k` over those gathered keys (`seq_lens_k_host` for the reference). The CUDA backends gather K and V
once per layer (index_select: its backward sums the prompt rows' gradients over the continuations) and call the
kernel with separate q and k cu_seqlens: a segment with more keys than queries aligns its causal (and sliding-window)
mask to the bottom right, flash-attn's semantics since 2.1, so continuation token j sees prompt + its own first j+1
tokens, and a window reaches back into the prompt. sdpa_ref builds the same masks explicitly.

Backends, in order of preference when "auto":
    flash_attn       flash_attn.flash_attn_varlen_func (flash-attn 2/3), native GQA
    flash_attn_cute  flash_attn.cute.flash_attn_varlen_func (flash-attn 4; refuses sliding windows)
    torch_varlen     torch.nn.attention.varlen.varlen_attn (PyTorch >= 2.10, CUDA SM80+)
    sdpa_ref         reference: causal SDPA per document, similar lengths batched (any device; the CPU default)

The backend is a property of each model, never process-wide state: select_backend picks one for a device and dtype,
bind_backend pins it to a model's modules (load_model does both), and the attention forward reads only its module's
binding. A model can therefore hold a bf16 flash-attn policy next to an fp32 reference-backend teacher.

Without packing kwargs (rollouts: left-padded batches with a KV cache) the same registered implementation falls
through to transformers' SDPA path with its ordinary padding mask.

Traps guarded: tokens of the buffer beyond cu_seqlens[-1] get a zero output (they cannot poison gradients); GQA
heads are repeated only where the backend lacks native GQA.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

_log = logging.getLogger(__name__)

IMPLEMENTATION = "exgrpo_packed"  # the attn_implementation name models are loaded with
BACKENDS = ("flash_attn", "flash_attn_cute", "torch_varlen", "sdpa_ref")
_logged: set[str] = set()  # choices already logged (log once per backend)


@functools.cache
def _importable(module: str, name: str) -> bool:
    """Whether `from module import name` works: a backend is available only when its entry point imports. A spec
    alone is not enough: an FA4-only install leaves a `flash_attn` namespace package without flash_attn_varlen_func,
    and an FA2 wheel built for another torch has a spec but fails to load its extension (ImportError / OSError)."""
    try:
        return callable(getattr(importlib.import_module(module), name))
    except Exception as e:  # noqa: BLE001 - any failure to import makes the backend unavailable
        _log.debug("packed attention: %s.%s unavailable (%s: %s)", module, name, type(e).__name__, e)
        return False


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on `device`, in order of preference."""
    device = torch.device(device)
    found = []
    if device.type == "cuda":
        if _importable("flash_attn", "flash_attn_varlen_func"):
            found.append("flash_attn")
        if _importable("flash_attn.cute", "flash_attn_varlen_func"):
            found.append("flash_attn_cute")
        major, _ = torch.cuda.get_device_capability(device)
        if major >= 8 and _importable("torch.nn.attention.varlen", "varlen_attn"):
            found.append("torch_varlen")
    found.append("sdpa_ref")
    return found


_HALF = (torch.float16, torch.bfloat16)


def select_backend(device: torch.device | str, override: str | None = None, *, dtype: torch.dtype | None = None) -> str:
    """The packed-attention backend for `device` ("auto" / None = the first available), logged once; bind it to a
    model with bind_backend. With `dtype` given, "auto" skips the CUDA kernels that need fp16/bf16 when it is fp32,
    and an explicit choice that cannot run it is an error."""
    options = available_backends(device)
    if dtype is not None and dtype not in _HALF:
        options = [b for b in options if b == "sdpa_ref"] if override in (None, "auto") else options
    if override not in (None, "auto"):
        if override not in BACKENDS:
            raise ValueError(f"attn_backend={override!r}: expected 'auto' or one of {BACKENDS}")
        if override not in options:
            raise ValueError(f"attn_backend={override!r} is not available on {device} (available: {options})")
        if dtype is not None and dtype not in _HALF and override != "sdpa_ref":
            raise ValueError(f"attn_backend={override!r} needs float16 or bfloat16 weights, got {dtype}")
        choice = override
    else:
        choice = options[0]
    if choice not in _logged:
        _log.info("packed attention backend: %s (available on %s: %s)", choice, device, ", ".join(options))
        _logged.add(choice)
    return choice


def bind_backend(model: torch.nn.Module, backend: str, *, deterministic: bool = False) -> None:
    """Pin `backend` to this model's attention layers, so models loaded with different backends or dtypes (policy in
    bf16, a teacher in fp32) keep their own. A packed forward through an unbound model is an error. deterministic:
    the backend's deterministic backward where it has one (flash_attn: no atomics in dq accumulation)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    for m in model.modules():
        m._packed_attn_backend = backend
        m._packed_attn_deterministic = deterministic


# ----------------------------------------------------------------------------------------------------------------
# backends: q [T, Hq, D], k/v [T, Hkv, D] -> out [T, Hq, D]


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _length_buckets(lens: list[int], fill: float = 0.75) -> list[list[int]]:
    """Documents grouped for one padded SDPA call each: sorted longest first, a bucket takes documents down to `fill`
    of its longest, so padding costs at most 1/fill**2 of the attention work (usually far less)."""
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    buckets: list[list[int]] = []
    for i in order:
        if lens[i] == 0:
            continue
        if buckets and lens[i] >= fill * lens[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def _offset_buckets(q_lens: list[int], k_lens: list[int], idx: list[int], fill: float = 0.75) -> list[list[int]]:
    """Segments whose queries see more keys than themselves (continuations of a shared prefix), grouped for one
    padded, masked SDPA call each: longest key set first, a segment joins the first bucket whose first member's
    query and key lengths it reaches to within `fill` (so padding costs at most 1/fill**2 of the work)."""
    buckets: list[list[int]] = []
    for i in sorted(idx, key=lambda i: (-k_lens[i], -q_lens[i])):
        for b in buckets:
            q0, k0 = q_lens[b[0]], k_lens[b[0]]
            if fill * q0 <= q_lens[i] <= q0 and k_lens[i] >= fill * k0:
                b.append(i)
                break
        else:
            buckets.append([i])
    return buckets


def _cumsum(lens: list[int]) -> list[int]:
    out = [0]
    for n in lens[:-1]:
        out.append(out[-1] + n)
    return out


def _sdpa_ref(q, k, v, seq_lens, scaling, sliding_window, seq_lens_k=None, kv_index=None):
    """Causal SDPA over each segment separately (any device; host-side lengths). Documents of similar length are
    right-padded into one batched SDPA call per bucket: with right padding, causality alone keeps every real query
    off the padding, and the padded rows' outputs are dropped. Tokens beyond the segments get a zero output.

    Shared prefixes (seq_lens_k, kv_index: see data.packing): segment i's keys are rows kv_index[cu_k[i]:cu_k[i+1]]
    and its queries sit at the end of them (bottom-right causal). Segments with as many keys as queries take the
    path above; the others get an explicit mask per bucket (query j of segment b sees key s <= j + offset_b, and
    within the window), under which padded keys are never seen by a real query and no row is fully masked."""
    T, Hq, D = q.shape
    n_rep = Hq // k.shape[1]
    lens = [int(n) for n in seq_lens]
    lens_k = lens if seq_lens_k is None else [int(n) for n in seq_lens_k]
    starts, starts_k = _cumsum(lens), _cumsum(lens_k)
    zero = lambda x: torch.cat([x, x.new_zeros(1, *x.shape[1:])])  # noqa: E731 - row T is the padding row
    qz, kz, vz = zero(q), zero(k), zero(v)
    # key position -> row of k/v (the padding position len(kv_map) - 1 -> the zero row T)
    kv_map = None if kv_index is None else torch.cat([kv_index, kv_index.new_full((1,), T)])
    pad_k = T if kv_index is None else kv_map.shape[0] - 1
    square = [i for i in range(len(lens)) if lens_k[i] == lens[i]]
    offset = [i for i in range(len(lens)) if lens_k[i] != lens[i] and lens[i] > 0]
    vals, rows = [], []

    def attend(idx, kidx, q_lens, **mask):
        krows = kidx if kv_map is None else kv_map[kidx]
        qs = qz[idx].transpose(1, 2)  # (m, Hq, n_q, D)
        ks = _repeat_kv(kz[krows].flatten(0, 1), n_rep).unflatten(0, krows.shape).transpose(1, 2)
        vs = _repeat_kv(vz[krows].flatten(0, 1), n_rep).unflatten(0, krows.shape).transpose(1, 2)
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scaling, **mask)
        # the real (unpadded) queries, found on the host: no data-dependent shape (traceable on fake tensors)
        n = idx.shape[1]
        keep = torch.tensor([j * n + t for j, m in enumerate(q_lens) for t in range(m)], device=q.device)
        vals.append(o.transpose(1, 2).flatten(0, 1).index_select(0, keep))  # (tokens, Hq, D)
        rows.append(idx.flatten().index_select(0, keep))

    sub = [lens[i] for i in square]
    for bucket in _length_buckets(sub):
        bucket = [square[j] for j in bucket]
        n_max = lens[bucket[0]]
        t = torch.arange(n_max)
        idx = torch.stack([torch.where(t < lens[i], starts[i] + t, T) for i in bucket]).to(q.device)  # [m, n_max]
        kidx = torch.stack([torch.where(t < lens[i], starts_k[i] + t, pad_k) for i in bucket]).to(q.device)
        if sliding_window is not None and sliding_window < n_max:
            i = torch.arange(n_max, device=q.device)
            allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < sliding_window)
            attend(idx, kidx, [lens[i] for i in bucket], attn_mask=allowed)
        else:
            attend(idx, kidx, [lens[i] for i in bucket], is_causal=True)
    for bucket in _offset_buckets(lens, lens_k, offset):
        nq, nk = max(lens[i] for i in bucket), max(lens_k[i] for i in bucket)
        tq, tk = torch.arange(nq), torch.arange(nk)
        idx = torch.stack([torch.where(tq < lens[i], starts[i] + tq, T) for i in bucket]).to(q.device)  # [m, nq]
        kidx = torch.stack([torch.where(tk < lens_k[i], starts_k[i] + tk, pad_k) for i in bucket]).to(q.device)
        off = torch.tensor([lens_k[i] - lens[i] for i in bucket])[:, None, None]  # (m, 1, 1)
        last = tq[None, :, None] + off  # (m, nq, 1): the last key each query sees
        allowed = tk[None, None, :] <= last
        if sliding_window is not None:
            allowed &= tk[None, None, :] > last - sliding_window
        attend(idx, kidx, [lens[i] for i in bucket], attn_mask=allowed[:, None].to(q.device))  # (m, 1, nq, nk)
    if not vals:
        return torch.zeros_like(q)
    return torch.zeros_like(q).index_put((torch.cat(rows),), torch.cat(vals))


@functools.cache
def _varlen_attn_params() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)  # once, not per layer call


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scaling, sliding_window):
    """torch varlen_attn (its FlashAttention-2 kernel: causal masks align bottom-right when a segment has more keys
    than queries, as shared prefixes need)."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_attn_params()
    kwargs = {"scale": scaling}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
    else:
        k, v = _repeat_kv(k, q.shape[1] // k.shape[1]), _repeat_kv(v, q.shape[1] // v.shape[1])
    # causality is `is_causal=True` in some PyTorch releases and window_size=(-1, 0) in others
    left = -1 if sliding_window is None else sliding_window - 1
    if "is_causal" in params:
        kwargs["is_causal"] = True
        if sliding_window is not None:
            if "window_size" not in params:
                raise NotImplementedError("torch varlen_attn of this PyTorch has no sliding window")
            kwargs["window_size"] = (left, 0)
    elif "window_size" in params:
        kwargs["window_size"] = (left, 0)
    else:
        raise NotImplementedError("torch varlen_attn of this PyTorch takes neither is_causal nor window_size")
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def _flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, scaling, sliding_window, softcap, deterministic=False):
    """flash-attn 2/3 (>= 2.1: causal masks align bottom-right when seqlen_k > seqlen_q); deterministic: its
    backward without atomic adds (Model.deterministic)."""
    from flash_attn import flash_attn_varlen_func

    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max_q,
        max_k,
        softmax_scale=scaling,
        causal=True,
        window_size=window,
        softcap=softcap or 0.0,
        deterministic=deterministic,
    )


@functools.cache
def _cute_params() -> frozenset[str]:
    from flash_attn.cute import flash_attn_varlen_func

    return frozenset(inspect.signature(flash_attn_varlen_func).parameters)


def _flash_attn_cute(q, k, v, cu_q, cu_k, max_q, max_k, scaling, sliding_window):
    """flash-attn 4 (CuTe DSL; causal aligns bottom-right). Sliding windows are refused: not wired up here."""
    from flash_attn.cute import flash_attn_varlen_func

    if sliding_window is not None:
        raise NotImplementedError("flash_attn_cute backend: sliding window not wired up")
    lengths = {"max_seqlen_q": max_q, "max_seqlen_k": max_k} if "max_seqlen_k" in _cute_params() else {}
    out = flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, softmax_scale=scaling, causal=True, **lengths
    )
    return out[0] if isinstance(out, tuple) else out


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
):
    """transformers attention function: varlen attention when packing kwargs are present, SDPA otherwise."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            sliding_window=sliding_window,
            softcap=softcap,
            **kwargs,
        )
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row, got batch size {query.shape[0]}")
    if dropout and module.training:
        raise NotImplementedError("attention dropout is not supported in packed mode")
    # (1, H, T, D) -> (T, H, D)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    max_q = int(kwargs["max_length_q"])
    cu_k, max_k = kwargs.get("cu_seq_lens_k", cu), int(kwargs.get("max_length_k", max_q))
    kv_index = kwargs.get("kv_index")  # shared prefixes: the rows each segment's queries see, gathered
    backend = getattr(module, "_packed_attn_backend", None)
    if backend is None:
        raise ValueError(
            f"{type(module).__name__} has no packed-attention backend: load the model with "
            "exgrpo_fast.model.loading.load_model or call attention.bind_backend(model, backend) first"
        )
    if softcap and backend != "flash_attn":
        raise NotImplementedError(f"attention logit softcapping needs the flash_attn backend, not {backend}")
    if backend == "sdpa_ref":
        lens_k = kwargs["seq_lens_k_host"] if kv_index is not None else None
        out = _sdpa_ref(q, k, v, kwargs["seq_lens_host"], scaling, sliding_window, lens_k, kv_index)
    else:
        if kv_index is not None:  # (T_k, Hkv, D): each continuation's prefix rows repeated before its own
            k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)
        if backend == "torch_varlen":
            out = _torch_varlen(q, k, v, cu, cu_k, max_q, max_k, scaling, sliding_window)
        elif backend == "flash_attn":
            deterministic = getattr(module, "_packed_attn_deterministic", False)
            out = _flash_attn(q, k, v, cu, cu_k, max_q, max_k, scaling, sliding_window, softcap, deterministic)
        else:
            out = _flash_attn_cute(q, k, v, cu, cu_k, max_q, max_k, scaling, sliding_window)
    total = kwargs.get("total_tokens")
    if total is not None and total < out.shape[0]:
        out = torch.cat([out[:total], out.new_zeros(out.shape[0] - total, *out.shape[1:])])
    return out.unsqueeze(0), None  # (1, T, H, D)


AttentionInterface.register(IMPLEMENTATION, packed_attention_forward)
# Rollouts (padded batches with a KV cache) still need the ordinary padding mask: reuse transformers' SDPA mask.
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)
