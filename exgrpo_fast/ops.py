"""Public ops: thin autograd Functions over the Triton kernels in csrc_triton, input validation, dispatch.

This is the only module that imports csrc_triton. Every public function has a plain-PyTorch twin of the same name
in exgrpo_fast.reference (the truth for tests). Dispatch: CUDA tensors run the Triton kernels; CPU tensors run them
through the Triton interpreter when TRITON_INTERPRET=1 was set before triton was imported, and otherwise fall back
to reference.py (logged once). `set_backend("reference" | "triton" | "auto")` or EXGRPO_FAST_BACKEND forces one.

Validation raises ValueError / TypeError naming the argument. Checks on tensor *values* (labels in [0, V), ids in
range, NaN rewards) need a host sync; they are on by default and can be turned off for a hot loop with
`set_value_checks(False)` or EXGRPO_FAST_VALUE_CHECKS=0.
"""

from __future__ import annotations

import logging
import os

import torch

from exgrpo_fast import reference
from exgrpo_fast.reference import LossConfig

__all__ = [
    "LossConfig",
    "token_logprobs",
    "group_advantages",
    "policy_loss",
    "fused_policy_loss",
    "token_logprobs_linear",
    "fused_linear_policy_loss",
    "set_backend",
    "set_value_checks",
    "backend_for",
]

_log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# dispatch

_BACKENDS = ("auto", "triton", "reference")
_backend = os.environ.get("EXGRPO_FAST_BACKEND", "auto")
_value_checks = os.environ.get("EXGRPO_FAST_VALUE_CHECKS", "1") != "0"
_fallback_logged = False


def set_backend(name: str) -> None:
    """Force the backend of every op: "auto" (Triton where it can run), "triton", or "reference"."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend={name!r}: expected one of {_BACKENDS}")
    _backend = name


def set_value_checks(enabled: bool) -> None:
    """Turn the checks that read tensor values (and so sync with the device) on or off."""
    global _value_checks
    _value_checks = bool(enabled)


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
    """Values of an index tensor in [0, upper). Reads values: a host sync, skipped when value checks are off."""
    if not _value_checks or x.numel() == 0:
        return
    lo, hi = int(x.min()), int(x.max())  # sync: input validation
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must lie in [0, {what}={upper}), found values in [{lo}, {hi}]")


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
    """logp (and entropy) from logits; the backward writes dlogits, in place into the logits buffer by default."""

    @staticmethod
    def forward(ctx, logits, labels, temperature: float, return_entropy: bool, inplace_backward: bool):
        from csrc_triton import logprob

        logp, lse, entropy = logprob.logprob_forward(logits, labels, temperature, return_entropy)
        ctx.temperature = temperature
        ctx.inplace_backward = inplace_backward
        ctx.save_for_backward(logits, labels, lse, entropy)
        if return_entropy:
            return logp, entropy
        return logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        from csrc_triton import logprob

        logits, labels, lse, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        dlogits = logprob.logprob_backward(
            logits, labels, lse, grad_logp, ctx.temperature,
            grad_entropy=grad_entropy, entropy=entropy, inplace=ctx.inplace_backward,
        )  # fmt: skip
        if ctx.inplace_backward:
            # the logits buffer now holds the gradient: any other node that saved it must fail loudly, not silently
            torch.autograd.graph.increment_version(logits)
        return dlogits, None, None, None, None


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
    _check_range("labels", labels, logits.shape[1], "V")


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    inplace_backward: bool = True,
):
    """logp[T] fp32 (and entropy[T] fp32) of labels under softmax(logits / temperature). Differentiable w.r.t.
    logits (both outputs). With inplace_backward (default) the backward writes dlogits into the logits buffer
    itself, so no second [T, V] tensor is allocated; the logits then hold their gradient."""
    _check_logits_labels(logits, labels)
    temperature = _check_temperature(temperature)
    if backend_for(logits.device) == "reference":
        return reference.token_logprobs(logits, labels, temperature=temperature, return_entropy=return_entropy)
    return _TokenLogprobs.apply(logits, labels, temperature, return_entropy, inplace_backward)


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
    # sync: one [S] check per step; NaN rewards are an error unless asked for, even with value checks off
    if not nan_to_zero and bool(torch.isnan(rewards).any()):
        raise ValueError("rewards contain NaN; pass nan_to_zero=True to give those samples advantage 0")
    if backend_for(rewards.device) == "reference":
        return reference.group_advantages(rewards, group_ids, scale=scale, eps=eps, nan_to_zero=True)
    from csrc_triton import loss_head

    return loss_head.group_advantages(rewards, group_ids, scale, float(eps))


class _PolicyLoss(torch.autograd.Function):
    """The loss head: forward computes the loss, stats and g = dL/dlogp at once; backward scales g."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, cfg):
        from csrc_triton import loss_head

        loss, grad, stats = loss_head.loss_head(logp, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, cfg)
        ctx.logp_dtype = logp.dtype
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(*stats.values())
        return (loss, *stats.values())

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.logp_dtype), None, None, None, None, None, None, None


def _policy_loss(logp, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, cfg):
    """policy_loss without validation (the fused ops validate once and call this)."""
    if backend_for(logp.device) == "reference":
        return reference.policy_loss(
            logp, old_logp, advantages, seq_ids, mask, ref_logp=ref_logp, teacher_logp=teacher_logp, cfg=cfg
        )
    loss, *values = _PolicyLoss.apply(logp, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, cfg)
    return loss, dict(zip(reference.STAT_NAMES, values))


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    seq_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    teacher_logp: torch.Tensor | None = None,
    cfg: LossConfig | None = None,
):
    """(loss, stats) of the clipped policy loss; differentiable w.r.t. logp. See reference.policy_loss."""
    _check_tensor("logp", logp, ndim=1)
    _check_float("logp", logp)
    cfg = _check_token_inputs(
        "logp", logp.shape[0], logp.device, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, cfg
    )
    return _policy_loss(logp, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, cfg)


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
    inplace_backward: bool = True,
):
    """(loss, stats) from logits[T, V]; grads w.r.t. logits, written in place into the logits buffer unless
    inplace_backward=False. stats also hold the masked mean entropy. See reference.fused_policy_loss."""
    _check_logits_labels(logits, labels)
    temperature = _check_temperature(temperature)
    cfg = _check_token_inputs(
        "logits", logits.shape[0], logits.device, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, cfg
    )
    if backend_for(logits.device) == "reference":
        return reference.fused_policy_loss(
            logits, labels, old_logp, advantages, seq_ids, mask,
            ref_logp=ref_logp, teacher_logp=teacher_logp, temperature=temperature, cfg=cfg,
        )  # fmt: skip
    logp, entropy = _TokenLogprobs.apply(logits, labels, temperature, True, inplace_backward)
    loss, stats = _policy_loss(logp, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, cfg)
    stats["entropy"] = reference.masked_mean(entropy.detach(), mask)
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# linear (LM head) path  (csrc_triton/linear_logprob.py)


class _LinearLogprobs(torch.autograd.Function):
    """logp (and entropy) of labels under the LM head, without ever holding [T, V] logits; the backward recomputes
    the logit tiles from the saved fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature: float, return_entropy: bool):
        from csrc_triton import linear_logprob

        logp, lse, entropy = linear_logprob.linear_logprob_forward(
            hidden, weight, bias, labels, temperature, return_entropy
        )
        ctx.temperature = temperature
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        if return_entropy:
            return logp, entropy
        return logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        from csrc_triton import linear_logprob

        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dh, dw, db = linear_logprob.linear_logprob_backward(
            hidden, weight, bias, labels, lse, grad_logp, ctx.temperature,
            grad_entropy=grad_entropy, entropy=entropy, need_hidden=need_hidden, need_weight=need_weight or need_bias,
        )  # fmt: skip
        return dh, dw if need_weight else None, db if need_bias else None, None, None, None


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
        _check_len("bias", bias, weight.shape[0], "V (weight.shape[0])")
    _check_tensor("labels", labels, ndim=1, device=hidden.device)
    _check_index("labels", labels)
    _check_len("labels", labels, hidden.shape[0], "T (hidden.shape[0])")
    if hidden.shape[0] == 0:
        raise ValueError("hidden is empty: the batch has no tokens")
    _check_range("labels", labels, weight.shape[0], "V")


def token_logprobs_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """logp[T] fp32 (and entropy[T]) of labels under logits = hidden @ weight^T (+ bias), without materialising
    [T, V]. Under no_grad (old, reference and teacher log-probs) nothing is saved; when hidden, weight or bias
    require grad it is differentiable (the SFT stage's cross-entropy)."""
    _check_linear_inputs(hidden, weight, labels, bias)
    temperature = _check_temperature(temperature)
    if backend_for(hidden.device) == "reference":
        return reference.token_logprobs_linear(
            hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=return_entropy
        )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if not needs_grad:
        from csrc_triton import linear_logprob

        logp, _, entropy = linear_logprob.linear_logprob_forward(
            hidden.detach(), weight.detach(), None if bias is None else bias.detach(), labels, temperature,
            return_entropy,
        )
        return (logp, entropy) if return_entropy else logp
    return _LinearLogprobs.apply(hidden, weight, bias, labels, temperature, return_entropy)


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    seq_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    teacher_logp: torch.Tensor | None = None,
    temperature: float = 1.0,
    cfg: LossConfig | None = None,
):
    """(loss, stats) from hidden[T, H] and the LM head weight[V, H] (+ bias[V]); grads for hidden, weight and bias.
    The logits never exist in memory: the loss head gives g = dL/dlogp and the backward recomputes logit tiles."""
    _check_linear_inputs(hidden, weight, labels, bias)
    temperature = _check_temperature(temperature)
    cfg = _check_token_inputs(
        "hidden", hidden.shape[0], hidden.device, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, cfg
    )
    if backend_for(hidden.device) == "reference":
        return reference.fused_linear_policy_loss(
            hidden, weight, labels, old_logp, advantages, seq_ids, mask,
            bias=bias, ref_logp=ref_logp, teacher_logp=teacher_logp, temperature=temperature, cfg=cfg,
        )  # fmt: skip
    logp, entropy = _LinearLogprobs.apply(hidden, weight, bias, labels, temperature, True)
    loss, stats = _policy_loss(logp, old_logp, advantages, seq_ids, mask, ref_logp, teacher_logp, cfg)
    stats["entropy"] = reference.masked_mean(entropy.detach(), mask)
    return loss, stats
