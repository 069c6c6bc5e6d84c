"""Public ops: thin autograd Functions over the Triton kernels in csrc_triton, input validation, dispatch.

This is the only module that imports csrc_triton. Every public function has a plain-PyTorch twin of the same name
in exgrpo_fast.reference (the truth for tests). Dispatch: CUDA tensors run the Triton kernels; CPU tensors run them
through the Triton interpreter when TRITON_INTERPRET=1 was set before triton was imported, and otherwise fall back
to reference.py (logged once). The backend is chosen explicitly with a context manager,

    with ops.backend("reference"):      # "auto" (default) | "triton" | "reference"
        ...

and read with `ops.current_backend()`; EXGRPO_FAST_BACKEND sets the process default and `set_backend(name)` is
kept as a thin wrapper for old callers.

Validation raises ValueError / TypeError naming the argument. Shapes, dtypes and devices are always checked (no
device work). Checks on tensor *values* (labels in [0, V) or -100, ids in range, NaN rewards) would each cost a
host sync, so they have a mode (EXGRPO_FAST_VALUE_CHECKS=eager|deferred|off, or `with ops.value_checks(mode):`):

    "eager"     (default) read the values at the call and raise there: clearest errors, one sync per check.
    "deferred"  the training loop's choice: each check is a few device ops that OR a bad-value flag (and the
                offending min/max) into a device tensor; nothing syncs. `ops.raise_deferred_errors()`, called once
                at the step's existing logging sync, reads all flags at once and raises the first error found.
    "off"       no range checks. Out-of-range labels are still never dereferenced (their logp is NaN), -100 is
                always a masked token. The NaN-rewards check of group_advantages stays eager in this mode (once
                per step, [S] values): a NaN reward must not silently become advantage 0.

A training loop should run its steps under "deferred" and call raise_deferred_errors() at its logging sync, so the
hot path has no host sync (DESIGN.md section 3); tests and interactive use keep "eager".
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import torch

from exgrpo_fast import loss_spec, reference
from exgrpo_fast.loss_spec import LossConfig, LossNorm

__all__ = [
    "LossConfig",
    "LossNorm",
    "token_logprobs",
    "group_advantages",
    "policy_loss",
    "fused_policy_loss",
    "token_logprobs_linear",
    "fused_linear_policy_loss",
    "lm_head_chunk_size",
    "sample_tokens",
    "backend",
    "current_backend",
    "set_backend",
    "value_checks",
    "current_value_checks",
    "set_value_checks",
    "raise_deferred_errors",
    "backend_for",
    "IGNORE_INDEX",
]

_log = logging.getLogger(__name__)

IGNORE_INDEX = reference.IGNORE_INDEX

# ----------------------------------------------------------------------------------------------------------------
# dispatch

_BACKENDS = ("auto", "triton", "reference")
_VALUE_CHECK_MODES = ("eager", "deferred", "off")


def _env_value_checks() -> str:
    raw = os.environ.get("EXGRPO_FAST_VALUE_CHECKS", "eager").strip().lower()
    mode = {"1": "eager", "0": "off", "true": "eager", "false": "off"}.get(raw, raw)
    if mode not in _VALUE_CHECK_MODES:
        raise ValueError(f"EXGRPO_FAST_VALUE_CHECKS={raw!r}: expected one of {_VALUE_CHECK_MODES}")
    return mode


_backend = os.environ.get("EXGRPO_FAST_BACKEND", "auto")
_value_check_mode = _env_value_checks()
_fallback_logged = False


def _validate_backend(name: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(f"backend={name!r}: expected one of {_BACKENDS}")
    return name


def current_backend() -> str:
    """The backend ops use now: "auto", "triton" or "reference" (see backend_for for the one a device gets)."""
    return _backend


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Run the ops inside the block on backend `name` ("auto", "triton" or "reference"); restored on exit."""
    global _backend
    previous = _backend
    _backend = _validate_backend(name)
    try:
        yield name
    finally:
        _backend = previous


def set_backend(name: str) -> None:
    """Set the process-wide backend (thin wrapper kept for old callers; prefer `with ops.backend(name):`)."""
    global _backend
    _backend = _validate_backend(name)


def _validate_mode(mode: str | bool) -> str:
    if isinstance(mode, bool):
        return "eager" if mode else "off"
    if mode not in _VALUE_CHECK_MODES:
        raise ValueError(f"value checks mode={mode!r}: expected one of {_VALUE_CHECK_MODES}")
    return mode


def current_value_checks() -> str:
    """The value-check mode now: "eager", "deferred" or "off"."""
    return _value_check_mode


@contextlib.contextmanager
def value_checks(mode: str) -> Iterator[str]:
    """Run the ops inside the block with value checks `mode` ("eager", "deferred", "off"); restored on exit.
    Leaving a "deferred" block does not drop its recorded errors: raise_deferred_errors() still reports them."""
    global _value_check_mode
    previous = _value_check_mode
    _value_check_mode = _validate_mode(mode)
    try:
        yield _value_check_mode
    finally:
        _value_check_mode = previous


def set_value_checks(mode: str | bool) -> None:
    """Set the process-wide value-check mode (True = "eager", False = "off"; thin wrapper kept for old callers)."""
    global _value_check_mode
    _value_check_mode = _validate_mode(mode)


# deferred checks: message -> (bad flag, min of bad values, max of bad values), all 0-dim device tensors
_deferred: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def raise_deferred_errors() -> None:
    """Raise the first value error recorded by "deferred" checks since the last call, and clear them all.

    One host sync for all pending checks (none when nothing was recorded): call it where the loop already syncs
    (logging). Errors name the argument and the offending values, like the eager checks."""
    if not _deferred:
        return
    pending = list(_deferred.items())
    _deferred.clear()
    values: list[list[float]] = [[]] * len(pending)
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, (flag, _, _)) in enumerate(pending):
        by_device.setdefault(flag.device, []).append(i)
    for idx in by_device.values():
        rows = torch.stack([torch.stack([t.to(torch.float64) for t in pending[i][1]]) for i in idx])
        for i, row in zip(idx, rows.cpu().tolist()):  # sync: the one read of the deferred flags (per device)
            values[i] = row
    for (message, _), (flag, lo, hi) in zip(pending, values):
        if flag:
            raise ValueError(message.format(lo=_fmt(lo), hi=_fmt(hi)) + " (deferred check)")


def _fmt(v: float) -> str:
    return str(int(v)) if v == v and abs(v) < 2**53 and v == int(v) else str(v)


def _value_check(bad: torch.Tensor, values: torch.Tensor, message: str) -> None:
    """Report values where `bad` is set. `message` may use {lo} and {hi}: the smallest and largest bad value.
    eager: one sync, raise now; deferred: OR into device flags; off: nothing. Callers skip the call when off."""
    if _value_check_mode == "off" or bad.numel() == 0:
        return
    if _value_check_mode == "eager":
        if bool(bad.any()):  # sync: eager input validation
            sel = values[bad]
            raise ValueError(message.format(lo=_fmt(sel.min().item()), hi=_fmt(sel.max().item())))
        return
    v = values.double() if values.is_floating_point() else values.long()
    big = torch.finfo(torch.float64).max if v.is_floating_point() else torch.iinfo(torch.int64).max
    lo = torch.where(bad, v, big).min()
    hi = torch.where(bad, v, -big).max()
    flag = bad.any()
    old = _deferred.get(message)
    if old is not None:
        flag, lo, hi = flag | old[0], torch.minimum(lo, old[1].to(lo.dtype)), torch.maximum(hi, old[2].to(hi.dtype))
    _deferred[message] = (flag, lo, hi)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a hard dependency on Linux
        return False
    return True


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_for(device: torch.device, *, announce: bool = True) -> str:
    """The backend ops use for tensors on `device`: "triton" or "reference". The first fallback from "auto" to the
    reference is logged as a warning, unless announce=False: the caller reports it itself (the trainer's header)."""
    global _fallback_logged
    if _backend == "reference":
        return "reference"
    runnable = _triton_importable() and (device.type == "cuda" or (device.type == "cpu" and _interpreter_on()))
    if _backend == "triton":
        if not runnable:
            raise RuntimeError(
                f"backend 'triton' forced but Triton cannot run on {device} "
                "(CPU needs TRITON_INTERPRET=1 set before triton is imported)"
            )
        return "triton"
    if runnable:
        return "triton"
    if not _fallback_logged:
        if announce:
            _log.warning(
                "exgrpo_fast.ops: Triton cannot run on %s (set TRITON_INTERPRET=1 before importing triton to use the "
                "interpreter); falling back to exgrpo_fast.reference",
                device,
            )
        _fallback_logged = True
    return "reference"


# ----------------------------------------------------------------------------------------------------------------
# validation helpers (shared by every op; each raises naming the argument)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int64, torch.int32)


def _check_tensor(name: str, x, *, ndim: int, device: torch.device | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but the other inputs are on {device}")


def _check_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def _check_index(name: str, x: torch.Tensor) -> None:
    if x.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be int64 or int32, got {x.dtype}")


def _check_len(name: str, x: torch.Tensor, n: int, what: str) -> None:
    if x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} entries but {what} is {n}")


def _check_range(name: str, x: torch.Tensor, upper: int, what: str) -> None:
    """Values of an index tensor in [0, upper), checked in the current value-check mode (see the module doc)."""
    if _value_check_mode == "off" or x.numel() == 0:
        return
    _value_check((x < 0) | (x >= upper), x, f"{name} must lie in [0, {what}={upper}), found values in [{{lo}}, {{hi}}]")


def _check_labels(name: str, labels: torch.Tensor, V: int) -> None:
    """Labels in [0, V) or equal to -100 (IGNORE_INDEX: a masked token), in the current value-check mode."""
    if _value_check_mode == "off" or labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= V)) & (labels != IGNORE_INDEX)
    _value_check(bad, labels, f"{name} must lie in [0, V={V}) or be {IGNORE_INDEX} (ignored), found {{lo}}..{{hi}}")


_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64)


def _check_mask(name: str, x: torch.Tensor, n: int, device: torch.device) -> None:
    _check_tensor(name, x, ndim=1, device=device)
    _check_len(name, x, n, "T")
    if x.dtype not in _MASK_DTYPES:
        raise TypeError(f"{name} must be bool or 0/1 integers, got {x.dtype}")


def _check_token_inputs(
    logp_name: str,
    num_tokens: int,
    device: torch.device,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    seq_ids: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    teacher_logp: torch.Tensor | None,
    cfg: LossConfig | None,
) -> LossConfig:
    """The arguments policy_loss and the fused losses share; returns the (validated) config."""
    if cfg is None:
        cfg = LossConfig()
    if not isinstance(cfg, LossConfig):
        raise TypeError(f"cfg must be an exgrpo_fast.ops.LossConfig, got {type(cfg).__name__}")
    if num_tokens == 0:
        raise ValueError(f"{logp_name} is empty: the batch has no tokens")
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("teacher_logp", teacher_logp)):
        if x is None:
            continue
        _check_tensor(name, x, ndim=1, device=device)
        _check_float(name, x)
        _check_len(name, x, num_tokens, "T")
    _check_tensor("advantages", advantages, ndim=1, device=device)
    _check_float("advantages", advantages)
    if advantages.shape[0] == 0:
        raise ValueError("advantages is empty: the batch has no sequences")
    _check_tensor("seq_ids", seq_ids, ndim=1, device=device)
    _check_index("seq_ids", seq_ids)
    _check_len("seq_ids", seq_ids, num_tokens, "T")
    _check_range("seq_ids", seq_ids, advantages.shape[0], "S (len(advantages))")
    _check_mask("mask", mask, num_tokens, device)
    if cfg.kl_beta > 0 and ref_logp is None:
        raise ValueError("cfg.kl_beta > 0 needs ref_logp")
    if cfg.teacher_beta > 0 and teacher_logp is None:
        raise ValueError("cfg.teacher_beta > 0 needs teacher_logp")
    return cfg


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, torch.Tensor):
        raise TypeError("temperature must be a Python float, not a tensor")
    temperature = float(temperature)
    if not temperature > 0.0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


# ----------------------------------------------------------------------------------------------------------------
# token_logprobs  (csrc_triton/logprob.py)


class _TokenLogprobs(torch.autograd.Function):
    """logp (and entropy) from logits; the backward writes dlogits, in place into the logits buffer by default.

    `live` (optional [T]) is the loss's mask: rows where it is 0 or the label is -100 are never read, get outputs
    0 and an exact zero gradient. Grads of outputs the graph does not use arrive as None (materialize_grads off),
    so an unused entropy costs nothing in the backward."""

    @staticmethod
    def forward(ctx, logits, labels, live, temperature: float, return_entropy: bool, inplace_backward: bool):
        from csrc_triton import logprob

        logp, lse, entropy = logprob.logprob_forward(logits, labels, temperature, return_entropy, live)
        ctx.temperature = temperature
        ctx.inplace_backward = inplace_backward
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, labels, live, lse, entropy)
        if return_entropy:
            return logp, entropy
        return logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        from csrc_triton import logprob

        logits, labels, live, lse, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        dlogits = logprob.logprob_backward(
            logits, labels, lse, grad_logp, ctx.temperature,
            grad_entropy=grad_entropy, entropy=entropy, live=live, inplace=ctx.inplace_backward,
        )  # fmt: skip
        if dlogits is logits:
            # the logits buffer now holds the gradient: any other node that saved it must fail loudly, not silently
            torch.autograd.graph.increment_version(logits)
        return dlogits, None, None, None, None, None


def _check_logits_labels(logits, labels) -> None:
    _check_tensor("logits", logits, ndim=2)
    _check_float("logits", logits)
    _check_tensor("labels", labels, ndim=1, device=logits.device)
    _check_index("labels", labels)
    _check_len("labels", labels, logits.shape[0], "T (logits.shape[0])")
    if logits.shape[0] == 0:
        raise ValueError("logits is empty: the batch has no tokens")
    if logits.shape[1] == 0:
        raise ValueError("logits has V=0 columns")
    _check_labels("labels", labels, logits.shape[1])


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    inplace_backward: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """logp[T] fp32 (and entropy[T] fp32) of labels under softmax(logits / temperature). Differentiable w.r.t.
    logits (both outputs). Labels equal to -100 (IGNORE_INDEX) are masked tokens: logp 0, entropy 0, zero
    gradient, and their logits row is never read (it may hold NaN). Any logits/labels strides are accepted.

    With inplace_backward (default) the backward writes dlogits into the logits buffer itself, through the view's
    own strides, so no second [T, V] tensor is allocated; the logits then hold their gradient. A view that overlaps
    itself (an expanded tensor) gets a fresh gradient tensor instead."""
    _check_logits_labels(logits, labels)
    temperature = _check_temperature(temperature)
    if backend_for(logits.device) == "reference":
        return reference.token_logprobs(logits, labels, temperature=temperature, return_entropy=return_entropy)
    return _TokenLogprobs.apply(logits, labels, None, temperature, return_entropy, inplace_backward)


# ----------------------------------------------------------------------------------------------------------------
# group_advantages and policy_loss  (csrc_triton/loss_head.py)


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    scale: str = "group",
    eps: float = 1e-6,
    nan_to_zero: bool = False,
) -> torch.Tensor:
    """GRPO advantages fp32 [S]; see reference.group_advantages."""
    _check_tensor("rewards", rewards, ndim=1)
    _check_float("rewards", rewards)
    _check_tensor("group_ids", group_ids, ndim=1, device=rewards.device)
    _check_index("group_ids", group_ids)
    _check_len("group_ids", group_ids, rewards.shape[0], "S (len(rewards))")
    if rewards.shape[0] == 0:
        raise ValueError("rewards is empty: the batch has no samples")
    if scale not in reference.ADV_SCALES:
        raise ValueError(f"scale={scale!r}: expected one of {reference.ADV_SCALES}")
    if not eps >= 0.0:
        raise ValueError(f"eps={eps}: expected >= 0")
    _check_range("group_ids", group_ids, rewards.shape[0], "S (len(rewards))")
    if not nan_to_zero:
        # eager (and off): one [S] sync per step, NaN rewards are an error even with value checks off;
        # deferred: a device-side flag read by raise_deferred_errors()
        nan = torch.isnan(rewards)
        if _value_check_mode == "deferred":
            _value_check(nan, rewards, "rewards contain NaN; pass nan_to_zero=True to give those samples advantage 0")
        elif bool(nan.any()):  # sync: the once-per-step NaN check
            raise ValueError("rewards contain NaN; pass nan_to_zero=True to give those samples advantage 0")
    if backend_for(rewards.device) == "reference":
        return reference.group_advantages(rewards, group_ids, scale=scale, eps=eps, nan_to_zero=True)
    from csrc_triton import loss_head

    return loss_head.group_advantages(rewards, group_ids, scale, float(eps))


class _PolicyLoss(torch.autograd.Function):
    """The loss head: forward computes the loss, stats and g = dL/dlogp at once; backward scales g."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, params):
        from csrc_triton import loss_head

        loss, grad, stats = loss_head.loss_head(
            logp, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, loss_head.HeadParams(**params)
        )
        values = [stats[name] for name in reference.STAT_NAMES]
        ctx.logp_dtype = logp.dtype
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(*values)
        return (loss, *values)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.logp_dtype), None, None, None, None, None, None, None


def _policy_loss(logp, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, cfg, norm=None):
    """policy_loss without validation (the fused ops validate once and call this). old_logp=None: on-policy (the
    detached logp itself, so the ratio is exactly 1); norm: the optimizer step's LossNorm or None."""
    if backend_for(logp.device) == "reference":
        return reference.policy_loss(
            logp, old_logp, advantages, seq_ids, mask, ref_logp=ref_logp, teacher_logp=teacher_logp, cfg=cfg,
            norm=norm,
        )  # fmt: skip
    if old_logp is None:
        old_logp = logp.detach()
    params = loss_spec.kernel_args(cfg, norm)
    loss, *values = _PolicyLoss.apply(logp, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, params)
    return loss, dict(zip(reference.STAT_NAMES, values))


def _check_norm(norm) -> None:
    if norm is not None and not isinstance(norm, LossNorm):
        raise TypeError(f"norm must be an exgrpo_fast.ops.LossNorm or None, got {type(norm).__name__}")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    seq_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    teacher_logp: torch.Tensor | None = None,
    cfg: LossConfig | None = None,
    norm: LossNorm | None = None,
):
    """(loss, stats) of the clipped policy loss; differentiable w.r.t. logp. See reference.policy_loss.
    old_logp=None means on-policy (ratio 1). norm: the whole optimizer step's LossNorm (then this call's loss is its
    share of the step loss); None = this batch's own."""
    _check_tensor("logp", logp, ndim=1)
    _check_float("logp", logp)
    _check_norm(norm)
    cfg = _check_token_inputs(
        "logp", logp.shape[0], logp.device, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, cfg
    )
    return _policy_loss(logp, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, cfg, norm)


# ----------------------------------------------------------------------------------------------------------------
# fused_policy_loss  (token_logprobs kernel + loss head, dlogits in place)


def fused_policy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    seq_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    teacher_logp: torch.Tensor | None = None,
    temperature: float = 1.0,
    cfg: LossConfig | None = None,
    norm: LossNorm | None = None,
    inplace_backward: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, stats) from logits[T, V]; grads w.r.t. logits, written in place into the logits buffer unless
    inplace_backward=False. stats also hold the masked mean entropy. See reference.fused_policy_loss.
    old_logp=None: on-policy (ratio 1); norm: the optimizer step's LossNorm (None = this call's own counts).

    Tokens with mask 0 or label -100 are masked: their logits rows are never read (in either pass; they may hold
    NaN) and get an exact zero gradient. Any input strides are accepted."""
    _check_logits_labels(logits, labels)
    temperature = _check_temperature(temperature)
    cfg = _check_token_inputs(
        "logits", logits.shape[0], logits.device, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, cfg
    )
    if backend_for(logits.device) == "reference":
        return reference.fused_policy_loss(
            logits, labels, old_logp, advantages, seq_ids, mask,
            ref_logp=ref_logp, teacher_logp=teacher_logp, temperature=temperature, cfg=cfg, norm=norm,
        )  # fmt: skip
    live = reference.live_rows(labels, mask)  # O(T), on device: the loss mask with -100 labels folded in
    logp, entropy = _TokenLogprobs.apply(logits, labels, live, temperature, True, inplace_backward)
    loss, stats = _policy_loss(logp, old_logp, advantages, seq_ids, live, ref_logp, teacher_logp, cfg, norm)
    stats["entropy"] = reference.masked_mean(entropy.detach(), live)
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# linear (LM head) path: impl="chunked" (csrc_triton/linear_chunked.py: vendor GEMMs on token chunks around an
# in-place Triton row kernel) or impl="tiled" (csrc_triton/linear_logprob.py: all-Triton, minimum memory)

_LINEAR_IMPLS = ("auto", "chunked", "tiled")


def _linear_impl(impl: str, hidden: torch.Tensor, weight: torch.Tensor) -> str:
    if impl not in _LINEAR_IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {_LINEAR_IMPLS}")
    if impl == "auto":
        return "chunked" if hidden.device.type == "cuda" else "tiled"
    if impl == "tiled" and hidden.device.type == "cuda":
        _warn_if_tiled_is_heavy(hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype)
    return impl


_tiled_warned: set[tuple[int, int, int]] = set()


def _warn_if_tiled_is_heavy(T: int, V: int, H: int, dtype: torch.dtype) -> None:
    """impl="tiled" moves bytes in proportion to T*V*H (csrc_triton/linear_logprob.py): say so, once per shape,
    when a forward + backward would request more than linear_logprob.TILED_WARN_BYTES."""
    from csrc_triton import linear_chunked, linear_logprob

    b = linear_logprob.tiled_bytes(T, V, H, dtype)
    total = b["fwd"] + b["dh"] + b["dw"]
    if total > linear_logprob.TILED_WARN_BYTES and (T, V, H) not in _tiled_warned:
        _tiled_warned.add((T, V, H))
        _log.warning(
            "impl='tiled' at T=%d, V=%d, H=%d requests ~%.2f TB per forward + backward (its fp32 accumulators and "
            "operand tiles are re-read per tile pair); impl='chunked' moves ~%.0f GB",
            T, V, H, total / 1e12, linear_chunked.chunked_bytes(T, V, H, dtype, linear_chunked.MAX_CHUNK) / 1e9,
        )  # fmt: skip


def _valid_rows(labels: torch.Tensor, vocab: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [T]: 1 where the row counts (label in [0, V), and mask set). Label -100 (and, with value checks off, any
    out-of-range label) marks a masked row, which the kernels never read."""
    valid = (labels >= 0) & (labels < vocab)
    if mask is not None:
        valid &= mask != 0
    return valid.view(torch.uint8)


def lm_head_chunk_size(
    vocab: int,
    hidden_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    chunk_size: int | None = None,
    fp32_logits: bool = True,
) -> int:
    """Tokens per chunk of impl="chunked" (before clamping to a batch's token count): `chunk_size` when given, else
    on CUDA the largest power of two in [512, 4096] whose chunk buffers (V logits in fp32, or in `dtype` with
    fp32_logits=False, plus one hidden row, per token) fit in 1/32 of the device's TOTAL memory; 32 elsewhere.

    A pure function of its arguments and the device's total memory, never of the allocator's free memory: every
    process of a run, a resumed one included, runs the same GEMM shapes and the same fp32 summation order for dW.
    Record it with a checkpoint and pass it back as chunk_size to resume bit-exactly on another device."""
    from csrc_triton import linear_chunked

    _check_chunk_size(chunk_size)
    device = torch.device(device)
    return linear_chunked.chunk_size(None, vocab, hidden_size, dtype, device, chunk_size, fp32_logits=fp32_logits)


def _chunk(chunk_size: int | None, hidden: torch.Tensor, weight: torch.Tensor, fp32_logits: bool) -> int:
    from csrc_triton import linear_chunked

    return linear_chunked.chunk_size(hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype, hidden.device,
                                     chunk_size, fp32_logits=fp32_logits)  # fmt: skip


class _LinearLogprobs(torch.autograd.Function):
    """impl="tiled": logp (and entropy) of labels under the LM head, without ever holding [T, V] logits; the
    backward recomputes the logit tiles from the saved fp32 log-sum-exp (5 GEMM-equivalents in all)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, temperature: float, return_entropy: bool, allow_tf32: bool):
        from csrc_triton import linear_logprob

        logp, lse, entropy = linear_logprob.linear_logprob_forward(
            hidden, weight, bias, labels, valid, temperature, return_entropy, allow_tf32
        )
        ctx.temperature, ctx.allow_tf32 = temperature, allow_tf32
        ctx.set_materialize_grads(False)  # an unused entropy output costs nothing in the backward
        ctx.save_for_backward(hidden, weight, bias, labels, valid, lse, entropy)
        if return_entropy:
            return logp, entropy
        return logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        from csrc_triton import linear_logprob

        hidden, weight, bias, labels, valid, lse, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dh, dw, db = linear_logprob.linear_logprob_backward(
            hidden, weight, bias, labels, valid, lse, grad_logp, ctx.temperature,
            grad_entropy=grad_entropy, entropy=entropy, need_hidden=need_hidden,
            need_weight=need_weight or need_bias, allow_tf32=ctx.allow_tf32,
        )  # fmt: skip
        return dh, dw if need_weight else None, db if need_bias else None, None, None, None, None, None


class _ChunkedLogprobs(torch.autograd.Function):
    """impl="chunked", gradient unknown in the forward: the forward keeps [T] values only (logp, lse, entropy) and
    the backward recomputes each chunk's logits (4 GEMMs in all)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, temperature, return_entropy, chunk, allow_tf32, fp32_logits):
        from csrc_triton import linear_chunked

        out = linear_chunked.chunked_linear(
            hidden, weight, bias, labels, valid, temperature, chunk, return_entropy=return_entropy,
            allow_tf32=allow_tf32, fp32_logits=fp32_logits,
        )  # fmt: skip
        ctx.temperature, ctx.chunk, ctx.allow_tf32, ctx.fp32_logits = temperature, chunk, allow_tf32, fp32_logits
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, labels, valid, out["lse"], out["entropy"])
        if return_entropy:
            return out["logp"], out["entropy"]
        return out["logp"]

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        from csrc_triton import linear_chunked

        hidden, weight, bias, labels, valid, lse, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        out = linear_chunked.chunked_linear(
            hidden, weight, bias, labels, valid, ctx.temperature, ctx.chunk, forward=False,
            lse=lse, entropy=entropy, grad_logp=grad_logp, grad_entropy=grad_entropy,
            need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias, allow_tf32=ctx.allow_tf32,
            fp32_logits=ctx.fp32_logits,
        )  # fmt: skip
        dw = out["dw"].to(weight.dtype) if need_weight else None
        db = out["db"].to(bias.dtype) if need_bias else None
        return out["dh"], dw, db, None, None, None, None, None, None, None


class _ChunkedPolicyLoss(torch.autograd.Function):
    """impl="chunked", per-token gradient known in the forward (token-level ratio, or on-policy): the forward runs
    the loss head's token phase on each chunk as soon as its log-probs exist, and the gradient GEMMs in the same
    chunk loop (3 GEMMs in all); the backward only scales the saved gradients by dL/dloss."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, old_logp, advantages, seq_ids, ref_logp, teacher_logp,
                params, temperature, chunk, allow_tf32, fp32_logits):  # fmt: skip
        from csrc_triton import linear_chunked, loss_head

        T, device = hidden.shape[0], hidden.device
        p = loss_head.HeadParams(**params)
        seq = loss_head.seq_phase(seq_ids, valid, advantages.shape[0], p)  # counts and weights only: no logp needed
        starts = list(range(0, T, chunk))
        cols = [0]
        for c0 in starts:
            cols.append(cols[-1] + loss_head.num_partial_blocks(min(c0 + chunk, T) - c0, device))
        partials = torch.empty(len(loss_head.ROWS), cols[-1], dtype=torch.float32, device=device)
        grad = torch.empty(T, dtype=torch.float32, device=device)

        def grad_fn(c0: int, c1: int, logp_c: torch.Tensor) -> torch.Tensor:
            i = c0 // chunk

            def sl(x):
                return x[c0:c1] if x is not None else None

            old_c = logp_c if old_logp is None else old_logp[c0:c1]  # on-policy: ratio exactly 1
            loss_head.token_phase(
                logp_c, old_c, advantages, seq_ids[c0:c1], valid[c0:c1], sl(ref_logp), sl(teacher_logp), seq, p,
                grad[c0:c1], partials[:, cols[i] : cols[i + 1]],
            )  # fmt: skip
            return grad[c0:c1]

        out = linear_chunked.chunked_linear(
            hidden, weight, bias, labels, valid, temperature, chunk, return_entropy=True, grad_fn=grad_fn,
            need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1],
            need_bias=ctx.needs_input_grad[2], allow_tf32=allow_tf32, fp32_logits=fp32_logits,
        )  # fmt: skip
        loss, stats = loss_head.finalize(partials, seq.count)
        values = [stats[name] for name in reference.STAT_NAMES]
        values.append(reference.masked_mean(out["entropy"], valid))
        ctx.grads = (out["dh"], out["dw"], out["db"])
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(*values)
        return (loss, *values)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        grads = []
        for g, dtype in zip(ctx.grads, ctx.dtypes):
            grads.append(None if g is None else g.mul_(grad_loss.to(g.dtype)).to(dtype))
        ctx.grads = None
        need_bias = ctx.needs_input_grad[2]
        return grads[0], grads[1], grads[2] if need_bias else None, *([None] * 12)


def _check_linear_inputs(hidden, weight, labels, bias) -> None:
    _check_tensor("hidden", hidden, ndim=2)
    _check_float("hidden", hidden)
    _check_tensor("weight", weight, ndim=2, device=hidden.device)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight is {weight.dtype} but hidden is {hidden.dtype}: they must match")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight has H={weight.shape[1]} columns but hidden has H={hidden.shape[1]}")
    if weight.shape[0] == 0:
        raise ValueError("weight has V=0 rows")
    if bias is not None:
        _check_tensor("bias", bias, ndim=1, device=hidden.device)
        _check_float("bias", bias)
        _check_len("bias", bias, weight.shape[0], "V (weight.shape[0])")
    _check_tensor("labels", labels, ndim=1, device=hidden.device)
    _check_index("labels", labels)
    _check_len("labels", labels, hidden.shape[0], "T (hidden.shape[0])")
    if hidden.shape[0] == 0:
        raise ValueError("hidden is empty: the batch has no tokens")
    _check_labels("labels", labels, weight.shape[0])


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}: expected a positive int or None (auto)")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def token_logprobs_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
    chunk_size: int | None = None,
    allow_tf32: bool = False,
    fp32_logits: bool = True,
):
    """logp[T] fp32 (and entropy[T]) of labels under logits = hidden @ weight^T (+ bias), without materialising
    [T, V]. Labels equal to -100 are masked rows: logp and entropy 0, exact zero gradient, never read. Under
    no_grad (old, reference and teacher log-probs) nothing is saved; when hidden, weight or bias require grad it is
    differentiable (the SFT stage's cross-entropy).

    impl: "chunked" (vendor GEMMs on chunks of chunk_size tokens, default `lm_head_chunk_size(...)`: from the
    device's total memory; the CUDA default), "tiled" (all-Triton, least memory, small shapes only: its backward
    re-reads fp32 accumulator rows, see docs/kernels.md; the default elsewhere) or "auto". allow_tf32: let fp32
    inputs use TF32 tensor cores (default: IEEE fp32 products). fp32_logits (chunked): keep each chunk's logits in
    fp32 (default; False rounds them to the input dtype, 2 bytes instead of 4 per logit for bf16 inputs)."""
    _check_linear_inputs(hidden, weight, labels, bias)
    temperature = _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    _check_flag("fp32_logits", fp32_logits)
    impl = _linear_impl(impl, hidden, weight)
    if backend_for(hidden.device) == "reference":
        return reference.token_logprobs_linear(
            hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=return_entropy
        )
    valid = _valid_rows(labels, weight.shape[0])
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if impl == "chunked":
        chunk = _chunk(chunk_size, hidden, weight, fp32_logits)
        if not needs_grad:
            from csrc_triton import linear_chunked

            out = linear_chunked.chunked_linear(
                hidden.detach(), weight.detach(), None if bias is None else bias.detach(), labels, valid, temperature,
                chunk, return_entropy=return_entropy, allow_tf32=allow_tf32, fp32_logits=fp32_logits,
            )  # fmt: skip
            return (out["logp"], out["entropy"]) if return_entropy else out["logp"]
        return _ChunkedLogprobs.apply(hidden, weight, bias, labels, valid, temperature, return_entropy, chunk,
                                      allow_tf32, fp32_logits)  # fmt: skip
    if not needs_grad:
        from csrc_triton import linear_logprob

        logp, _, entropy = linear_logprob.linear_logprob_forward(
            hidden.detach(), weight.detach(), None if bias is None else bias.detach(), labels, valid, temperature,
            return_entropy, allow_tf32,
        )  # fmt: skip
        return (logp, entropy) if return_entropy else logp
    return _LinearLogprobs.apply(hidden, weight, bias, labels, valid, temperature, return_entropy, allow_tf32)


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    seq_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    teacher_logp: torch.Tensor | None = None,
    temperature: float = 1.0,
    cfg: LossConfig | None = None,
    norm: LossNorm | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
    allow_tf32: bool = False,
    fp32_logits: bool = True,
):
    """(loss, stats) from hidden[T, H] and the LM head weight[V, H] (+ bias[V]); grads for hidden, weight and bias.
    The [T, V] logits never exist. stats also hold the masked mean entropy.

    old_logp=None means on-policy: ratio 1 (old = the detached current log-probs), so no separate no-grad LM-head
    pass is needed for the old log-probs. Tokens with label -100 count as masked. norm: the optimizer step's
    LossNorm (then this micro-batch's loss is its share of the step loss); None = this batch's own.

    impl="chunked" (CUDA default): 3 GEMMs when the per-token gradient is known in the forward (token-level ratio,
    or on-policy), else 4 (GSPO with old_logp); memory chunk_size*V*4 bytes beyond the gradients (fp32 logits;
    chunk_size*V*2 for bf16 inputs with fp32_logits=False, which rounds the logits to bf16). impl="tiled":
    all-Triton, 5 GEMM-equivalents, least memory, small shapes only (docs/kernels.md). allow_tf32: TF32 for fp32
    inputs (default IEEE fp32)."""
    _check_linear_inputs(hidden, weight, labels, bias)
    temperature = _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    _check_flag("fp32_logits", fp32_logits)
    _check_norm(norm)
    impl = _linear_impl(impl, hidden, weight)
    cfg = _check_token_inputs(
        "hidden", hidden.shape[0], hidden.device, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, cfg
    )
    if backend_for(hidden.device) == "reference":
        return reference.fused_linear_policy_loss(
            hidden, weight, labels, old_logp, advantages, seq_ids, mask,
            bias=bias, ref_logp=ref_logp, teacher_logp=teacher_logp, temperature=temperature, cfg=cfg, norm=norm,
        )  # fmt: skip
    valid = _valid_rows(labels, weight.shape[0], mask)
    if impl == "chunked":
        chunk = _chunk(chunk_size, hidden, weight, fp32_logits)
        if cfg.ratio_level == "token" or old_logp is None:
            loss, *values = _ChunkedPolicyLoss.apply(
                hidden, weight, bias, labels, valid, old_logp, advantages, seq_ids, ref_logp, teacher_logp,
                loss_spec.kernel_args(cfg, norm), temperature, chunk, allow_tf32, fp32_logits,
            )  # fmt: skip
            return loss, dict(zip((*reference.STAT_NAMES, "entropy"), values))
        logp, entropy = _ChunkedLogprobs.apply(hidden, weight, bias, labels, valid, temperature, True, chunk,
                                               allow_tf32, fp32_logits)  # fmt: skip
    else:
        logp, entropy = _LinearLogprobs.apply(hidden, weight, bias, labels, valid, temperature, True, allow_tf32)
    loss, stats = _policy_loss(logp, old_logp, advantages, seq_ids, valid, ref_logp, teacher_logp, cfg, norm)
    stats["entropy"] = reference.masked_mean(entropy.detach(), valid)
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# next-token sampling (csrc_triton/sampling.py; the PyTorch twin is exgrpo_fast.rollout.sampling)


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, seeds: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Next tokens int64 [B] from logits [B, V] in one fused kernel: Gumbel-max with the counter-based noise of
    exgrpo_fast.rollout.sampling (a pure function of seed, position and vocab id), top-p without a sort, greedy at
    temperature 0. The same tokens as rollout.sampling.sample_next_reference (bit for bit at top_p = 1). No host
    sync: capturable in a CUDA graph. Rollouts call it through rollout.sampling.sample_next."""
    _check_tensor("logits", logits, ndim=2)
    _check_float("logits", logits)
    B, V = logits.shape
    if V == 0:
        raise ValueError("logits has V=0 columns")
    for name, x in (("seeds", seeds), ("positions", positions)):
        _check_tensor(name, x, ndim=1, device=logits.device)
        if x.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {x.dtype}")
        _check_len(name, x, B, "B (logits.shape[0])")
    if isinstance(temperature, torch.Tensor) or isinstance(top_p, torch.Tensor):
        raise TypeError("temperature and top_p must be Python floats, not tensors")
    temperature, top_p = float(temperature), float(top_p)
    if not 0.0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if B == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    if backend_for(logits.device, announce=False) != "triton":
        raise RuntimeError(
            f"sample_tokens needs Triton on {logits.device} (CPU: TRITON_INTERPRET=1 before triton is imported); "
            "use exgrpo_fast.rollout.sampling.sample_next, which falls back to PyTorch"
        )
    from csrc_triton import sampling

    return sampling.sample(logits, temperature, top_p, seeds.contiguous(), positions.contiguous())
