"""fused_linear_policy_loss forward+backward, side by side in one run:

    ours        exgrpo_fast.ops.fused_linear_policy_loss (logits never stored, not even per chunk)
    gemms       the bare GEMMs: logits = h W^T, then dh = dL W and dW = dL^T h (the 3-GEMM compute floor)
    chunked     PyTorch: per chunk of tokens, logits -> log_softmax -> gather under autograd (checkpointed chunks)
    liger       Liger-Kernel's LigerFusedLinearGRPOLoss, same options (when liger_kernel is installed)
    cce         cut-cross-entropy's linear_cross_entropy, the log-prob part only (when installed)

Options: PPO clip 0.2/0.2, k3 KL to precomputed reference log-probs with beta 0.04, token-mean, temperature 1.
Reported: median ms, TFLOP/s counting 3 GEMMs (2*T*V*H each), the ratio to the bare GEMMs and to our design's own
5 GEMM-equivalents (forward 1; backward 2 recomputes + 2 gradient GEMMs; a no-materialisation design needs at least
4), peak memory beyond inputs, and (GPU) the loss-stage peak memory as T grows.

    python benches/bench_linear_loss.py                 # GPU: bf16, V=151936, T=16384, H in {896, 1536, 3584}
    python benches/bench_linear_loss.py --smoke         # tiny sizes on any device
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benches._common import env_facts, peak_extra_bytes, time_ms, write_csv  # noqa: E402
from exgrpo_fast import ops  # noqa: E402
from exgrpo_fast import reference as R  # noqa: E402

CFG = R.LossConfig(clip_low=0.2, clip_high=0.2, kl_estimator="k3", kl_beta=0.04, loss_agg="token-mean")


def make_inputs(T, H, V, S, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(T, H, device=device, dtype=dtype, generator=g)
    weight = (torch.randn(V, H, device=device, generator=g) / H**0.5).to(dtype)
    labels = torch.randint(0, V, (T,), device=device, generator=g)
    seq_ids = torch.arange(T, device=device) // (T // S)
    mask = torch.ones(T, dtype=torch.bool, device=device)
    old = -torch.rand(T, device=device, generator=g) * 10 - 1
    ref = old + 0.1 * torch.randn(T, device=device, generator=g)
    adv = torch.randn(S, device=device, generator=g)
    return hidden, weight, labels, old, ref, adv, seq_ids, mask


def providers(inputs, S, chunk):
    hidden, weight, labels, old, ref, adv, seq_ids, mask = inputs
    T, H = hidden.shape
    runs = {}

    def grads(loss, h, w):
        return torch.autograd.grad(loss, (h, w))

    def run_ours():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss, _ = ops.fused_linear_policy_loss(h, w, labels, old, adv, seq_ids, mask, ref_logp=ref, cfg=CFG)
        return grads(loss, h, w)

    runs["ours"] = run_ours

    def run_gemms():
        logits = hidden @ weight.T  # (T, V)
        dlogits = logits  # stand-in for dL/dlogits: the floor counts only the three GEMMs
        return dlogits @ weight, dlogits.T @ hidden

    runs["gemms"] = run_gemms

    def chunk_logp(h, w, lab):
        return R.token_logprobs(h @ w.T, lab)

    def run_chunked():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        logp = torch.cat([checkpoint(chunk_logp, hc, w, lc, use_reentrant=False)
                          for hc, lc in zip(h.split(chunk), labels.split(chunk))])
        loss, _ = R.policy_loss(logp, old, adv, seq_ids, mask, ref_logp=ref, cfg=CFG)
        return grads(loss, h, w)

    runs["chunked"] = run_chunked

    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=CFG.kl_beta, use_ref_model=True, epsilon_low=CFG.clip_low,
                                         epsilon_high=CFG.clip_high, loss_type="bnpo", temperature=1.0)
    except Exception as e:
        runs["liger"] = f"skipped: {type(e).__name__}: {e}"
    else:
        B, L = S, T // S

        def run_liger():
            h, w = hidden.detach().view(B, L, H).requires_grad_(), weight.detach().requires_grad_()
            out = liger(_input=h, lin_weight=w, selected_token_ids=labels.view(B, L),
                        attention_mask=mask.view(B, L).int(), advantages=adv, ref_per_token_logps=ref.view(B, L),
                        old_per_token_logps=old.view(B, L))
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
            nll = linear_cross_entropy(h, w, labels, reduction="none")  # -logp per token
            loss, _ = R.policy_loss(-nll.float(), old, adv, seq_ids, mask, ref_logp=ref, cfg=CFG)
            return grads(loss, h, w)

        runs["cce"] = run_cce
    return runs


def bench_one(T, H, V, S, dtype, device, small, wanted, facts):
    inputs = make_inputs(T, H, V, S, dtype, device)
    flops3 = 3 * 2 * T * V * H
    runs = providers(inputs, S, chunk=max(1, T // 8))
    rows, times = [], {}
    print(f"\nT={T} H={H} V={V} {str(dtype).removeprefix('torch.')}")
    print(f"{'provider':<10}{'ms':>10}{'TFLOP/s':>10}{'x gemms':>9}{'x 5-gemm':>10}{'peak extra MB':>15}")
    for name in wanted:
        fn = runs.get(name)
        if not callable(fn):
            print(f"{name:<10}{fn or 'unknown provider'}")
            continue
        try:
            ms = time_ms(fn, device, warmup=1 if small else 3, rep=3 if small else 10)
            extra = peak_extra_bytes(fn, device)
        except Exception as e:
            print(f"{name:<10}failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        times[name] = ms
        rows.append({"provider": name, "ms": ms, "tflops": flops3 / (ms * 1e-3) / 1e12,
                     "peak_extra_mb": None if extra is None else extra / 2**20})
    for r in rows:
        g = times.get("gemms")
        r["x_gemms"] = r["ms"] / g if g else None
        r["x_5gemm_floor"] = r["ms"] / (g * 5 / 3) if g else None
        mem = f"{r['peak_extra_mb']:.0f}" if r["peak_extra_mb"] is not None else "-"
        xg = f"{r['x_gemms']:.2f}" if r["x_gemms"] else "-"
        x5 = f"{r['x_5gemm_floor']:.2f}" if r["x_5gemm_floor"] else "-"
        print(f"{r['provider']:<10}{r['ms']:>10.3f}{r['tflops']:>10.2f}{xg:>9}{x5:>10}{mem:>15}")
        r.update(facts, T=T, H=H, V=V, dtype=str(dtype).removeprefix("torch."), ops_backend=ops.backend_for(device))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--providers", default="ours,gemms,chunked,liger,cce")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.smoke or device.type != "cuda"
    facts = env_facts(device)
    print(f"device {facts['device']} | torch {facts['torch']} triton {facts['triton']} | ops backend "
          f"{ops.backend_for(device)}")
    wanted = args.providers.split(",")
    rows = []
    if small:
        rows += bench_one(64, 32, 1000, 4, torch.float32, device, True, wanted, facts)
    else:
        for H in (896, 1536, 3584):
            rows += bench_one(16384, H, 151936, 64, torch.bfloat16, device, False, wanted, facts)
        print("\nloss-stage peak memory as T grows (H=896): flat is the goal")
        for T in (4096, 8192, 16384, 32768, 65536):
            rows += [dict(r, curve=True) for r in bench_one(T, 896, 151936, 64, torch.bfloat16, device, False,
                                                            ["ours", "chunked"], facts)]
    if rows and not args.no_csv:
        print("wrote", write_csv("linear_loss", rows))


if __name__ == "__main__":
    main()
