"""fused_linear_policy_loss forward+backward (grads for hidden and weight), side by side in one run:

    gemms           the three bare GEMMs of the same shape: logits = h W^T, dh = dZ W, dW = dZ^T h (the floor)
    chunked         ours, impl="chunked", old log-probs given, token ratio: 3-GEMM mode
    chunked-onpol   ours, impl="chunked", old_logp=None (on-policy): 3-GEMM mode, no separate old-logp pass
    chunked-gspo    ours, impl="chunked", ratio_level="sequence" with old log-probs: 4-GEMM mode
    tiled           ours, impl="tiled": all-Triton, least memory (5 GEMM-equivalents)
    torch-ckpt      PyTorch: per chunk of tokens, logits -> log_softmax -> gather under checkpointed autograd
    liger           Liger-Kernel's LigerFusedLinearGRPOLoss, same options (when liger_kernel is installed)
    cce             cut-cross-entropy's linear_cross_entropy (log-probs only, gradient filter off) + our loss head
    quack           quack's linear_cross_entropy_func (cross-entropy only: a lower bound, not the same loss)

Options: PPO clip 0.2/0.2, k3 KL to precomputed reference log-probs with beta 0.04, token-mean, temperature 1;
every token in the loss (no masked rows), so every provider does the same work. Value checks off while timing.
Columns: median ms; TFLOP/s counting 3 GEMMs (2*T*V*H each); x gemms = ms / the bare GEMMs measured in this run;
peak extra MB beyond the inputs (CUDA); x liger = liger ms / ms (> 1: faster than Liger); mem/liger = peak extra
memory relative to Liger's. A second table sweeps T from 4k to 64k at H=896 for the peak memory (flat is the goal).

    python benches/bench_linear_loss.py            # CUDA: bf16, V=151936, T=16384, H in {896, 2048, 3584}, T sweep
    python benches/bench_linear_loss.py --smoke    # tiny sizes; on CPU the kernels run in the Triton interpreter
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata
from pathlib import Path

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from torch.utils.checkpoint import checkpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benches._common import env_facts, peak_extra_bytes, rel, time_ms, write_csv  # noqa: E402
from exgrpo_fast import ops  # noqa: E402
from exgrpo_fast import reference as R  # noqa: E402

CFG = R.LossConfig(clip_low=0.2, clip_high=0.2, kl_estimator="k3", kl_beta=0.04, loss_agg="token-mean")
GSPO = R.LossConfig(ratio_level="sequence", clip_low=3e-4, clip_high=4e-4, kl_estimator="k3", kl_beta=0.04)
PEERS = {"liger": "liger_kernel", "cce": "cut_cross_entropy", "quack": "quack-kernels"}


def peer_versions() -> dict[str, str]:
    out = {}
    for name, dist in PEERS.items():
        try:
            out[f"{name}_version"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[f"{name}_version"] = "not installed"
    return out


def make_inputs(T, H, V, S, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(T, H, device=device, dtype=dtype, generator=g)
    # peaked, realistic logits (std ~3): near-uniform random logits would let CCE's gradient filter skip the backward
    weight = (3 * torch.randn(V, H, device=device, generator=g) / H**0.5).to(dtype)
    labels = torch.randint(0, V, (T,), device=device, generator=g)
    seq_ids = torch.arange(T, device=device) // (T // S)
    mask = torch.ones(T, dtype=torch.bool, device=device)
    old = -torch.rand(T, device=device, generator=g) * 10 - 1
    ref = old + 0.1 * torch.randn(T, device=device, generator=g)
    adv = torch.randn(S, device=device, generator=g)
    return hidden, weight, labels, old, ref, adv, seq_ids, mask


def providers(inputs, S, chunk_size):
    hidden, weight, labels, old, ref, adv, seq_ids, mask = inputs
    T, H = hidden.shape
    runs = {}

    def grads(loss, h, w):
        return torch.autograd.grad(loss, (h, w))

    def ours(impl, cfg=CFG, old_logp=old):
        def run():
            h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            loss, _ = ops.fused_linear_policy_loss(
                h,
                w,
                labels,
                old_logp,
                adv,
                seq_ids,
                mask,
                ref_logp=ref,
                cfg=cfg,
                impl=impl,
                chunk_size=chunk_size if impl == "chunked" else None,
            )
            return grads(loss, h, w)

        return run

    def run_gemms():
        z = hidden @ weight.T  # (T, V)
        return z @ weight, z.T @ hidden  # dZ stand-in: the floor counts the three GEMMs only

    runs["gemms"] = run_gemms
    runs["chunked"] = ours("chunked")
    runs["chunked-onpol"] = ours("chunked", old_logp=None)
    runs["chunked-gspo"] = ours("chunked", cfg=GSPO)
    runs["tiled"] = ours("tiled")

    def chunk_logp(h, w, lab):
        return R.token_logprobs(h @ w.T, lab)

    def run_torch_ckpt():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        step = max(1, T // 8)
        logp = torch.cat([checkpoint(chunk_logp, hc, w, lc, use_reentrant=False)
                          for hc, lc in zip(h.split(step), labels.split(step))])  # fmt: skip
        loss, _ = R.policy_loss(logp, old, adv, seq_ids, mask, ref_logp=ref, cfg=CFG)
        return grads(loss, h, w)

    runs["torch-ckpt"] = run_torch_ckpt

    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=CFG.kl_beta, use_ref_model=True, epsilon_low=CFG.clip_low,
                                         epsilon_high=CFG.clip_high, loss_type="bnpo", temperature=1.0)  # fmt: skip
    except Exception as e:
        runs["liger"] = f"skipped: {type(e).__name__}: {e}"
    else:
        B, L = S, T // S

        def run_liger():
            h, w = hidden.detach().view(B, L, H).requires_grad_(), weight.detach().requires_grad_()
            out = liger(_input=h, lin_weight=w, selected_token_ids=labels.view(B, L),
                        attention_mask=mask.view(B, L).int(), advantages=adv, ref_per_token_logps=ref.view(B, L),
                        old_per_token_logps=old.view(B, L))  # fmt: skip
            loss = out[0] if isinstance(out, tuple) else out
            return grads(loss, h, w)

        runs["liger"] = run_liger

    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:
        runs["cce"] = f"skipped: {type(e).__name__}: {e}"
    else:

        def run_cce():
            h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            nll = linear_cross_entropy(h, w, labels, reduction="none", filter_eps=None)  # filter off: full backward
            loss, _ = R.policy_loss(-nll.float(), old, adv, seq_ids, mask, ref_logp=ref, cfg=CFG)
            return grads(loss, h, w)

        runs["cce"] = run_cce

    try:
        from quack.linear_cross_entropy import linear_cross_entropy_func
    except Exception as e:
        runs["quack"] = f"skipped: {type(e).__name__}: {e}"
    else:

        def run_quack():
            h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            return grads(linear_cross_entropy_func(h, w, None, labels, reduction="mean"), h, w)

        runs["quack"] = run_quack
    return runs


def bench_one(T, H, V, S, dtype, device, small, wanted, facts, chunk_size=None):
    inputs = make_inputs(T, H, V, S, dtype, device)
    flops3 = 3 * 2 * T * V * H
    runs = providers(inputs, S, chunk_size)
    rows = []
    print(f"\nT={T} H={H} V={V} {str(dtype).removeprefix('torch.')}")
    print(f"{'provider':<15}{'ms':>10}{'TFLOP/s':>9}{'x gemms':>9}{'peak extra MB':>15}{'x liger':>9}{'mem/liger':>11}")
    for name in wanted:
        fn = runs.get(name)
        if not callable(fn):
            print(f"{name:<15}{fn or 'unknown provider'}")
            continue
        try:
            ms = time_ms(fn, device, warmup=1 if small else 3, rep=2 if small else 10)
            extra = peak_extra_bytes(fn, device)
        except Exception as e:
            print(f"{name:<15}failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        rows.append({"provider": name, "ms": ms, "tflops": flops3 / (ms * 1e-3) / 1e12,
                     "peak_extra_mb": None if extra is None else extra / 2**20})  # fmt: skip
    by_name = {r["provider"]: r for r in rows}
    gemms, liger = by_name.get("gemms"), by_name.get("liger")
    for r in rows:
        r["x_gemms"] = r["ms"] / gemms["ms"] if gemms else None
        r["x_liger"] = liger["ms"] / r["ms"] if liger else None
        lm, rm = (liger or {}).get("peak_extra_mb"), r["peak_extra_mb"]
        r["mem_vs_liger"] = rm / lm if (lm and rm is not None) else None

        def fmt(x, spec):
            return format(x, spec) if x is not None else "-"

        print(
            f"{r['provider']:<15}{r['ms']:>10.3f}{r['tflops']:>9.2f}{fmt(r['x_gemms'], '.2f'):>9}"
            f"{fmt(r['peak_extra_mb'], '.0f'):>15}{fmt(r['x_liger'], '.2f'):>9}{fmt(r['mem_vs_liger'], '.2f'):>11}"
        )
        r.update(facts, T=T, H=H, V=V, dtype=str(dtype).removeprefix("torch."), ops_backend=ops.backend_for(device))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU: kernels in the Triton interpreter)")
    p.add_argument("--providers", default="gemms,chunked,chunked-onpol,chunked-gspo,tiled,torch-ckpt,liger,cce,quack")
    p.add_argument("--no-sweep", action="store_true", help="skip the T sweep of peak memory")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.smoke or device.type != "cuda"
    facts = {**env_facts(device), **peer_versions()}
    print(" | ".join(f"{k} {v}" for k, v in facts.items()) + f" | ops backend {ops.backend_for(device)}")
    ops.set_value_checks(False)  # no host syncs inside the timed regions
    wanted = args.providers.split(",")
    rows = []
    if small:
        # chunk of 16 tokens: the smoke run exercises several chunks
        rows += bench_one(48, 32, 203, 4, torch.float32, device, True, wanted, facts, chunk_size=16)
    else:
        for H in (896, 2048, 3584):
            rows += bench_one(16384, H, 151936, 64, torch.bfloat16, device, False, wanted, facts)
        if not args.no_sweep:
            print("\npeak extra memory as T grows (H=896): flat is the goal")
            for T in (4096, 8192, 16384, 32768, 65536):
                sweep = [n for n in ("gemms", "chunked", "tiled", "liger") if n in wanted]
                rows += [dict(r, curve=True) for r in bench_one(T, 896, 151936, 64, torch.bfloat16, device, False,
                                                                sweep, facts)]  # fmt: skip
    if rows and not args.no_csv:
        print("wrote", rel(write_csv("linear_loss", rows)))


if __name__ == "__main__":
    main()
