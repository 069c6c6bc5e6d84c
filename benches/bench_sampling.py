"""Next-token sampling at a real vocabulary: the fused Triton sampler (csrc_triton/sampling.py) against the PyTorch
sampler, in bytes (CPU: counted) and time (GPU).

Bytes (any machine, B = 64, V = 151936, bf16 logits, counted at a smaller V and scaled linearly in V, which both
implementations are):
    kernel      bytes its loads and stores request, counted through the Triton interpreter (benches/interp_bytes.py)
    reference   bytes every aten op of sample_next_reference reads and writes (inputs + outputs), counted with a
                TorchDispatchMode (no cache reuse: what separate kernels move)
    previous    the same count for the sampler these replaced (git history, commit d511d6a), when git has it
    forward     a Qwen2.5-0.5B decode step at B = 64, by arithmetic: every weight read once (bf16) + the KV cache
                read at 512 cached tokens per row
GPU: median ms per call of each at B in {1, 64, 256}, V = 151936, bf16, top_p 1 and 0.9 (the counts then run in a
CPU subprocess: they need the Triton interpreter).

    python benches/bench_sampling.py            # counts (CPU: the kernel in the interpreter) and, on CUDA, timings
    python benches/bench_sampling.py --smoke    # smaller counts
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benches._common import env_facts, time_ms, write_csv  # noqa: E402
from exgrpo_fast.rollout import sampling as S  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PREVIOUS_COMMIT = "d511d6a"  # the last commit with the unfused sampler (sampling.py before the fused kernel)


def _inputs(B, V, dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype).to(device)
    seeds = torch.randint(0, 2**32, (B,), generator=g).to(device)
    pos = torch.randint(0, 4096, (B,), generator=g).to(device)
    return logits, seeds, pos


def count_kernel_bytes(B, V, dtype, top_p, temperature=1.0) -> dict:
    """Bytes the fused kernel requests (interpreter), and its logits reads in units of B*V*elem."""
    from benches import interp_bytes

    logits, seeds, pos = _inputs(B, V, dtype)
    with interp_bytes.count_bytes() as counter:
        counter.track("logits", logits)
        S.sample_next(logits, temperature, top_p, seeds, pos, impl="triton")
    read = sum(x.read for x in counter.launches)
    written = sum(x.written for x in counter.launches)
    logit_read, _ = counter.row_bytes("logits")
    return dict(read=read, written=written, total=read + written, logit_reads=logit_read.sum() / logits.nbytes)


_GATHERS = ("take", "gather", "index")
_VIEWS = ("view", "_unsafe_view", "expand", "t", "slice", "select", "unsqueeze", "alias", "as_strided", "detach")


class _OpBytes(TorchDispatchMode):
    """Sum of the bytes of every tensor argument and result of every aten op (views excluded: they move nothing;
    a gather's source counts as many bytes as it yields)."""

    def __init__(self):
        super().__init__()
        self.total, self.ops, self.big_ops = 0, 0, 0
        self.big = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in _VIEWS:
            return out
        tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
        if func.overloadpacket.__name__ in _GATHERS:  # the source is read only where indexed: as many as written
            tensors = tensors[1:] + outs
        tensors += outs
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self.total += nbytes
        self.ops += 1
        if any(t.numel() >= self.big for t in tensors):
            self.big_ops += 1
        return out


def count_torch_bytes(B, V, dtype, top_p, fn=None, temperature=1.0) -> dict:
    """Bytes the PyTorch sampler's ops read + write, and how many ops touch a [B, V] tensor."""
    fn = fn or S.sample_next_reference
    logits, seeds, pos = _inputs(B, V, dtype)
    fn(logits, temperature, top_p, seeds, pos)  # build cached vocab lanes outside the count, as in steady state
    mode = _OpBytes()
    mode.big = B * V
    with mode:
        fn(logits, temperature, top_p, seeds, pos)
    return dict(total=mode.total, ops=mode.ops, full_ops=mode.big_ops)


def load_previous_sampler():
    """sample_next as it was before the fused kernel (git show), or None."""
    try:
        src = subprocess.run(["git", "show", f"{PREVIOUS_COMMIT}:exgrpo_fast/rollout/sampling.py"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType("previous_sampling")
    exec(compile(src, "previous_sampling.py", "exec"), mod.__dict__)
    return mod.sample_next


def forward_bytes_qwen05b(B: int = 64, ctx: int = 512) -> int:
    """A Qwen2.5-0.5B decode step (24 layers, H 896, 14 heads / 2 KV heads of 64, MLP 4864, V 151936, tied
    embedding): bf16 weights read once, plus each row's KV cache (ctx tokens); activations are negligible."""
    H, L, inter, V, kv = 896, 24, 4864, 151936, 2 * 64
    per_layer = H * (H + 2 * kv) + H * H + 3 * H * inter  # q, k, v, o, gate/up/down
    weights = (L * per_layer + V * H) * 2  # the LM head (tied embedding) is read by the logits GEMM
    kv_cache = B * L * 2 * kv * ctx * 2
    return weights + kv_cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="smaller counts")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--counts-only", action="store_true", help="the byte counts only (what a CUDA run starts on CPU)")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    facts = env_facts(device)
    print(" | ".join(f"{k} {v}" for k, v in facts.items()))
    if device.type == "cuda":
        # the counts need the Triton interpreter, which is chosen when triton is imported: a CPU-only subprocess
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        cmd = [sys.executable, __file__, "--counts-only"] + (["--smoke"] if a.smoke else []) + (
            ["--no-csv"] if a.no_csv else [])  # fmt: skip
        subprocess.run(cmd, env=env, check=False)
    else:
        count_table(a, facts)
    if device.type == "cuda" and not a.counts_only:
        time_table(a, facts, device)


def count_table(a, facts) -> None:
    """Bytes per decode step of each sampler (see the module doc), printed and appended to the CSV."""
    B, V_real, dtype = 64, 151936, torch.bfloat16
    B_c, V_c = (4, 1031) if a.smoke else (8, 4099)  # counted here, scaled to B x V_real (linear in B*V)
    scale = (B * V_real) / (B_c * V_c)
    prev = load_previous_sampler()
    fwd = forward_bytes_qwen05b(B)
    rows = []
    print(f"\nbytes per decode step at B={B}, V={V_real}, bf16 (counted at B={B_c}, V={V_c}, scaled x{scale:.0f});"
          f" Qwen2.5-0.5B forward at B={B}, 512 cached tokens: {fwd / 1e9:.3f} GB")  # fmt: skip
    print(f"{'sampler':<12}{'top_p':>6}{'GB':>10}{'x kernel':>10}{'x forward':>11}{'ops':>6}{'[B,V] ops':>11}")
    for top_p in (1.0, 0.9):
        kern = count_kernel_bytes(B_c, V_c, dtype, top_p)
        entries = [("kernel", kern["total"], None, None)]
        ref = count_torch_bytes(B_c, V_c, dtype, top_p)
        entries.append(("reference", ref["total"], ref["ops"], ref["full_ops"]))
        if prev is not None:
            old = count_torch_bytes(B_c, V_c, dtype, top_p, fn=prev)
            entries.append(("previous", old["total"], old["ops"], old["full_ops"]))
        for name, nbytes, n_ops, full in entries:
            gb = nbytes * scale / 1e9
            row = dict(facts, sampler=name, top_p=top_p, B=B, V=V_real, gb_per_step=gb,
                       x_kernel=nbytes / kern["total"], x_forward=nbytes * scale / fwd, ops=n_ops, full_ops=full,
                       logit_reads=kern["logit_reads"] if name == "kernel" else None, ms=None)  # fmt: skip
            rows.append(row)
            print(f"{name:<12}{top_p:>6}{gb:>10.4f}{row['x_kernel']:>10.1f}{row['x_forward']:>11.3f}"
                  f"{n_ops if n_ops is not None else '-':>6}{full if full is not None else '-':>11}")  # fmt: skip
        print(f"{'':<12}kernel reads the logits {kern['logit_reads']:.2f} times")
        if not a.no_csv:
            write_csv("sampling", rows[-len(entries) :])


def time_table(a, facts, device) -> None:
    """GPU time per call of each sampler (the kernel, the PyTorch reference, the previous sampler), printed and
    appended to the CSV; x previous = previous ms / kernel ms."""
    V, dtype, prev = 151936, torch.bfloat16, load_previous_sampler()
    print(f"\nGPU time per call (median ms), V={V}, bf16")
    print(f"{'B':>5}{'top_p':>7}{'kernel':>10}{'reference':>11}{'previous':>10}{'x previous':>12}")
    for B in (1, 64, 256):
        for top_p in (1.0, 0.9):
            ms = time_samplers(B, V, dtype, top_p, prev, device)
            prev_ms = ms.get("previous") or float("nan")
            print(f"{B:>5}{top_p:>7}{ms['kernel']:>10.3f}{ms['reference']:>11.3f}{prev_ms:>10.3f}"
                  f"{prev_ms / ms['kernel']:>12.1f}", flush=True)  # fmt: skip
            base = dict(facts, top_p=top_p, B=B, V=V, gb_per_step=None, x_kernel=None, x_forward=None, ops=None,
                        full_ops=None, logit_reads=None)  # fmt: skip
            if not a.no_csv:
                write_csv("sampling", [dict(base, sampler=k, ms=v) for k, v in ms.items()])


def time_samplers(B, V, dtype, top_p, prev, device) -> dict:
    """Median ms per call of the kernel, the PyTorch reference and the previous sampler (when loaded)."""
    logits, seeds, pos = _inputs(B, V, dtype, device)
    fns = {"kernel": lambda: S.sample_next(logits, 1.0, top_p, seeds, pos, impl="triton"),
           "reference": lambda: S.sample_next_reference(logits, 1.0, top_p, seeds, pos)}  # fmt: skip
    if prev is not None:
        fns["previous"] = lambda: prev(logits, 1.0, top_p, seeds, pos)
    return {name: time_ms(fn, device, warmup=3, rep=20) for name, fn in fns.items()}


if __name__ == "__main__":
    main()
