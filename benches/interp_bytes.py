"""Count the bytes Triton kernels request, by running them through the Triton interpreter (CPU, no GPU needed).

The interpreter executes every tl.load / tl.store through two builder methods, create_masked_load and
create_masked_store (the unmasked forms call them too). While `count_bytes()` is active both are wrapped: each call
adds (active lanes) x (element size) to the current kernel launch, and, for every tensor registered with
`track(name, tensor)`, to per-row read and write counters of that tensor (lanes are attributed by address). Kernel
launches are delimited by wrapping the interpreter's GridExecutor.__call__.

This measures bytes *requested* by the kernels (what a GPU would move with no cache reuse), so it is the HBM
traffic upper bound: a pass of the logits counts as T*V*b however it is tiled. It is exact for the row-per-program
kernels measured here and needs TRITON_INTERPRET=1 set before triton is imported.

    with count_bytes() as counter:
        counter.track("logits", logits)        # 2-D, unit column stride
        run_fwd_bwd()
    counter.passes("logits")                    # (bytes read + written over those rows) / logits.nbytes
    counter.row_bytes("logits")                 # numpy (read[T], written[T]) bytes per row
    counter.launches                            # [Launch(kernel, read, written)]
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import numpy as np
import torch


@dataclasses.dataclass
class Launch:
    """One kernel launch: its name and the bytes its active lanes requested (all buffers)."""

    kernel: str
    read: int = 0
    written: int = 0


@dataclasses.dataclass
class _Tracked:
    base: int  # address of element [0, 0]
    row_bytes: int  # stride(0) * element size
    num_rows: int
    end: int  # one past the last byte of the last row
    nbytes: int  # logical bytes of the view (rows * V * element size)
    read: np.ndarray
    written: np.ndarray


class ByteCounter:
    """Totals per launch and per row of tracked tensors; see the module docstring."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self._tracked: dict[str, _Tracked] = {}
        self._current: Launch | None = None

    def track(self, name: str, tensor: torch.Tensor) -> None:
        """Attribute the bytes of loads and stores that fall inside a 2-D tensor with unit column stride (a [T, V]
        logits buffer or a row-major view of one) to its rows."""
        if tensor.dim() != 2 or tensor.stride(1) != 1 or tensor.stride(0) < tensor.shape[1]:
            raise ValueError(
                f"track({name!r}): need a 2-D row-major tensor, got {tuple(tensor.shape)} strides {tensor.stride()}"
            )
        T, V = tensor.shape
        es = tensor.element_size()
        base = tensor.data_ptr()
        self._tracked[name] = _Tracked(
            base,
            tensor.stride(0) * es,
            T,
            base + ((T - 1) * tensor.stride(0) + V) * es,
            T * V * es,
            np.zeros(T, np.int64),
            np.zeros(T, np.int64),
        )

    def row_bytes(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(bytes read, bytes written) per row of the tracked tensor."""
        t = self._tracked[name]
        return t.read.copy(), t.written.copy()

    def passes(self, name: str, rows: np.ndarray | None = None) -> float:
        """(bytes read + written) over the selected rows (default all) / their logical bytes."""
        t = self._tracked[name]
        sel = np.ones(t.num_rows, bool) if rows is None else np.asarray(rows, bool)
        per_row = t.nbytes // t.num_rows
        return float((t.read[sel].sum() + t.written[sel].sum()) / max(1, per_row * sel.sum()))

    def _add(self, addrs: np.ndarray, active: np.ndarray, elem_bytes: int, is_store: bool) -> None:
        n = int(active.sum())
        if self._current is not None:
            if is_store:
                self._current.written += n * elem_bytes
            else:
                self._current.read += n * elem_bytes
        if not n or not self._tracked:
            return
        a = addrs[active].astype(np.int64)
        for t in self._tracked.values():
            inside = (a >= t.base) & (a < t.end)
            if not inside.any():
                continue
            rows = (a[inside] - t.base) // t.row_bytes
            counts = np.bincount(rows, minlength=t.num_rows)[: t.num_rows] * elem_bytes
            if is_store:
                t.written += counts
            else:
                t.read += counts


@contextlib.contextmanager
def count_bytes() -> Iterator[ByteCounter]:
    """Wrap the interpreter's load/store builders and its launcher while the block runs."""
    from triton.runtime import interpreter as interp

    if not hasattr(interp, "InterpreterBuilder"):  # pragma: no cover - a Triton without the interpreter
        raise RuntimeError("this Triton has no interpreter to count bytes with")
    counter = ByteCounter()
    builder = interp.InterpreterBuilder
    real_load, real_store, real_call = (
        builder.create_masked_load,
        builder.create_masked_store,
        interp.GridExecutor.__call__,
    )

    def elem_bytes(ptrs) -> int:
        return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        counter._add(np.asarray(ptrs.data).ravel(), np.asarray(mask.data, bool).ravel(), elem_bytes(ptrs), False)
        return real_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        counter._add(np.asarray(ptrs.data).ravel(), np.asarray(mask.data, bool).ravel(), elem_bytes(ptrs), True)
        return real_store(self, ptrs, value, mask, cache_policy)

    def call(self, *args, **kwargs):
        outer = counter._current
        counter._current = Launch(getattr(self.fn, "__name__", str(self.fn)))
        counter.launches.append(counter._current)
        try:
            return real_call(self, *args, **kwargs)
        finally:
            counter._current = outer

    builder.create_masked_load, builder.create_masked_store, interp.GridExecutor.__call__ = load, store, call
    try:
        yield counter
    finally:
        builder.create_masked_load, builder.create_masked_store, interp.GridExecutor.__call__ = (
            real_load, real_store, real_call,
        )  # fmt: skip
