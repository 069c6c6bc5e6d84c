"""fused_policy_loss forward+backward, side by side in one run:

    ours          exgrpo_fast.ops.fused_policy_loss (Triton log-prob kernel + loss head, dlogits in place)
    reference     exgrpo_fast.reference.fused_policy_loss, eager
    compiled      torch.compile of the reference
    liger         Liger-Kernel's triton_grpo_loss with the same options (when liger_kernel is installed)
    trl-style     selective log-softmax (row-chunked logsumexp - gathered logit) + the eager loss, autograd

All use the same options: PPO clip 0.2/0.28, k3 KL to the reference with beta 0.04, token-mean, temperature 0.9
(Liger's triton_grpo_loss covers exactly this set). Reported: median ms; effective GB/s against the minimum traffic
of a logits-input loss (read the logits twice, write dlogits once: 3*T*V*bytes); that as a fraction of the device
copy bandwidth measured in the same run; peak memory beyond the logits and their gradient, as % of the logits.

    python benches/bench_loss.py            # GPU: T=16384, V=151936, bf16
    python benches/bench_loss.py --smoke    # tiny sizes, any device (CPU: the ops fall back to the reference
                                            # unless TRITON_INTERPRET=1, which then times the interpreter)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benches._common import copy_bandwidth_gbs, env_facts, peak_extra_bytes, time_ms, write_csv  # noqa: E402
from exgrpo_fast import ops  # noqa: E402
from exgrpo_fast import reference as R  # noqa: E402

TEMPERATURE, BETA, EPS_LOW, EPS_HIGH = 0.9, 0.04, 0.2, 0.28
CFG = R.LossConfig(clip_low=EPS_LOW, clip_high=EPS_HIGH, kl_estimator="k3", kl_beta=BETA, loss_agg="token-mean")


def make_inputs(T: int, V: int, S: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(T, V, device=device, dtype=dtype, generator=g)
    labels = torch.randint(0, V, (T,), device=device, generator=g)
    seq_ids = torch.arange(T, device=device) // (T // S)  # S equal-length sequences (Liger's [B, L] layout)
    mask = torch.rand(T, device=device, generator=g) > 0.1
    old = -torch.rand(T, device=device, generator=g) * 12 - 1
    ref = old + 0.1 * torch.randn(T, device=device, generator=g)
    adv = torch.randn(S, device=device, generator=g)
    return logits, labels, old, ref, adv, seq_ids, mask


def selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """TRL-style: per row chunk, gathered logit minus logsumexp (fp32), under autograd."""
    out = []
    for lg, lab in zip(logits.split(chunk), labels.split(chunk)):
        lg = lg.float() / TEMPERATURE
        out.append(lg.gather(-1, lab[:, None]).squeeze(-1) - torch.logsumexp(lg, -1))
    return torch.cat(out)


def providers(inputs, S: int):
    logits, labels, old, ref, adv, seq_ids, mask = inputs
    T, V = logits.shape
    out = {}

    ours_logits = logits.clone()  # ours writes dlogits into its input: keep the shared logits intact for the others

    def run_ours():
        x = ours_logits.detach().requires_grad_()  # this buffer receives dlogits in place
        loss, _ = ops.fused_policy_loss(x, labels, old, adv, seq_ids, mask, ref_logp=ref, temperature=TEMPERATURE,
                                        cfg=CFG)
        return torch.autograd.grad(loss, x)[0]

    out["ours"] = run_ours

    def run_reference():
        x = logits.detach().requires_grad_()
        loss, _ = R.fused_policy_loss(x, labels, old, adv, seq_ids, mask, ref_logp=ref, temperature=TEMPERATURE,
                                      cfg=CFG)
        return torch.autograd.grad(loss, x)[0]

    out["reference"] = run_reference

    compiled_loss = torch.compile(R.fused_policy_loss, dynamic=False)

    def run_compiled():
        x = logits.detach().requires_grad_()
        loss, _ = compiled_loss(x, labels, old, adv, seq_ids, mask, ref_logp=ref, temperature=TEMPERATURE, cfg=CFG)
        return torch.autograd.grad(loss, x)[0]

    out["compiled"] = run_compiled

    def run_trl():
        x = logits.detach().requires_grad_()
        logp = selective_log_softmax(x, labels)
        loss, _ = R.policy_loss(logp, old, adv, seq_ids, mask, ref_logp=ref, cfg=CFG)
        return torch.autograd.grad(loss, x)[0]

    out["trl-style"] = run_trl

    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception as e:  # not installed (CPU CI) or broken
        out["liger"] = f"skipped: {type(e).__name__}: {e}"
    else:
        B, L = S, T // S
        # Liger reads [B, L+1, V] logits (the last position of each row is not scored): one extra row per sequence
        liger_logits = torch.randn(B, L + 1, V, device=logits.device, dtype=logits.dtype)
        liger_logits[:, :L] = logits.view(B, L, V)
        ids, old_b, ref_b, mask_b = labels.view(B, L), old.view(B, L), ref.view(B, L), mask.view(B, L).int()

        def run_liger():
            x = liger_logits.detach().requires_grad_()
            res = triton_grpo_loss(x, old_b, ref_b, ids, adv, mask_b, TEMPERATURE, BETA, EPS_LOW, EPS_HIGH, True)
            per_token = res[0] if isinstance(res, tuple) else res
            loss = (per_token * mask_b).sum() / mask_b.sum().clamp_min(1)
            return torch.autograd.grad(loss, x)[0]

        out["liger"] = run_liger
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds, any device)")
    p.add_argument("-T", type=int, default=None)
    p.add_argument("-V", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--providers", default="ours,reference,compiled,liger,trl-style")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.smoke or device.type != "cuda"
    T = args.T or (64 if small else 16384)
    V = args.V or (4099 if small else 151936)
    S = max(1, T // 256) if not small else 4
    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(T, V, S, dtype, device)
    logits_bytes = T * V * inputs[0].element_size()
    min_bytes = 3 * logits_bytes
    copy_bw = copy_bandwidth_gbs(device)
    facts = env_facts(device)
    backend = ops.backend_for(device)
    print(f"device {facts['device']} | torch {facts['torch']} triton {facts['triton']} | ops backend {backend}")
    print(f"T={T} V={V} S={S} {args.dtype} | logits {logits_bytes / 2**20:.1f} MiB | min traffic "
          f"{min_bytes / 2**20:.1f} MiB" + (f" | copy bandwidth {copy_bw:.0f} GB/s" if copy_bw else ""))
    rows, times = [], {}
    wanted = args.providers.split(",")
    runs = providers(inputs, S)
    print(f"{'provider':<12}{'ms':>10}{'GB/s':>9}{'% copy bw':>11}{'extra mem %':>13}{'ours x faster':>15}")
    for name in wanted:
        fn = runs.get(name)
        if isinstance(fn, str) or fn is None:
            print(f"{name:<12}{fn or 'unknown provider'}")
            continue
        try:
            reps = 3 if small else 20
            ms = time_ms(fn, device, warmup=2 if small else 5, rep=reps)
            extra = peak_extra_bytes(fn, device)
        except Exception as e:  # e.g. torch.compile without a working compiler, or OOM for the eager paths
            print(f"{name:<12}failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        times[name] = ms
        gbs = min_bytes / (ms * 1e-3) / 1e9
        # extra memory beyond the logits and one [T, V] gradient
        extra_pct = None if extra is None else 100 * max(0, extra - logits_bytes) / logits_bytes
        rows.append({"provider": name, "ms": ms, "gb_per_s": gbs, "copy_bw_frac": gbs / copy_bw if copy_bw else None,
                     "extra_mem_pct": extra_pct})
    for r in rows:
        ratio = r["ms"] / times["ours"] if "ours" in times else None
        r["ours_speedup"] = ratio
        cb = f"{100 * r['copy_bw_frac']:.0f}%" if r["copy_bw_frac"] else "-"
        em = f"{r['extra_mem_pct']:.2f}" if r["extra_mem_pct"] is not None else "-"
        print(f"{r['provider']:<12}{r['ms']:>10.3f}{r['gb_per_s']:>9.1f}{cb:>11}{em:>13}"
              f"{(f'{ratio:.2f}x' if ratio else '-'):>15}")
        r.update(facts, T=T, V=V, S=S, dtype=args.dtype, ops_backend=backend, copy_bw_gbs=copy_bw)
    if rows and not args.no_csv:
        print("wrote", write_csv("loss", rows))


if __name__ == "__main__":
    main()
