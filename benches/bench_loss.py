"""fused_policy_loss forward+backward, side by side in one run:

    ours          exgrpo_fast.ops.fused_policy_loss (Triton log-prob kernel + loss head, dlogits in place)
    reference     exgrpo_fast.reference.fused_policy_loss, eager
    compiled      torch.compile of the reference
    liger         Liger-Kernel's triton_grpo_loss with the same options (when liger_kernel is installed)
    trl-style     selective log-softmax (row-chunked logsumexp - gathered logit) + the eager loss, autograd

All use the same options: PPO clip 0.2/0.28, k3 KL to the reference with beta 0.04, token-mean (Liger's "dapo"
normaliser), temperature 0.9 (Liger's triton_grpo_loss covers exactly this set). Masked rows (the prompt prefix of
each sequence, --masked fraction of it) are handled the same way by ours and Liger: both get the loss mask and skip
those rows (never read, gradient rows written with zeros); the eager peers compute every row. Value checks are off
inside every timed region (ops.value_checks("off")): no host sync is timed.

GPU mode reports: median ms; effective GB/s against the roofline traffic of a logits-input loss that skips masked
rows (live rows: read twice + write once, masked rows: write once); `ratio_to_roofline` = roofline time at the
device copy bandwidth measured in the same run / measured time; peak memory beyond the logits and their
gradient, as % of the logits; every peer's version.

CPU mode (no CUDA; needs TRITON_INTERPRET=1, set by this script) counts instead the bytes each kernel requests
through the Triton interpreter (benches/interp_bytes.py), ours and Liger's on the same inputs, and prints passes
over the logits (bytes read + written / logits bytes) at several masked fractions.

    python benches/bench_loss.py            # GPU: T=16384, V=151936, bf16; CPU: byte counts, T=192, V=4099
    python benches/bench_loss.py --smoke    # tiny timed run on any device (CPU: times the interpreter)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from pathlib import Path

if __name__ == "__main__" and "--smoke" not in sys.argv:
    import torch

    if not torch.cuda.is_available():  # CPU mode counts bytes through the interpreter: set before triton imports
        os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benches._common import copy_bandwidth_gbs, env_facts, peak_extra_bytes, rel, time_ms, write_csv  # noqa: E402
from exgrpo_fast import ops  # noqa: E402
from exgrpo_fast import reference as R  # noqa: E402

TEMPERATURE, BETA, EPS_LOW, EPS_HIGH = 0.9, 0.04, 0.2, 0.28
CFG = R.LossConfig(clip_low=EPS_LOW, clip_high=EPS_HIGH, kl_estimator="k3", kl_beta=BETA, loss_agg="token-mean")


def make_inputs(T: int, V: int, S: int, dtype: torch.dtype, device: torch.device, masked: float = 0.1):
    """S equal-length sequences (Liger's [B, L] layout) whose first round(masked * L) tokens (the prompt) are
    masked. old/ref log-probs are the current ones plus noise (a slightly off-policy step: some tokens clip)."""
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(T, V, device=device, dtype=dtype, generator=g)
    labels = torch.randint(0, V, (T,), device=device, generator=g)
    L = T // S
    seq_ids = torch.arange(T, device=device) // L
    mask = (torch.arange(T, device=device) % L) >= round(masked * L)
    logp = torch.cat(
        [R.token_logprobs(c, lab, temperature=TEMPERATURE) for c, lab in zip(logits.split(2048), labels.split(2048))]
    )
    old = logp + 0.1 * torch.randn(T, device=device, generator=g)
    ref = logp + 0.1 * torch.randn(T, device=device, generator=g)
    adv = torch.randn(S, device=device, generator=g)
    return logits, labels, old, ref, adv, seq_ids, mask


def peer_versions() -> dict[str, str]:
    """Versions of every peer in the comparison (and of the libraries the numbers depend on)."""
    out = {}
    for dist in ("torch", "triton", "liger-kernel", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """TRL-style: per row chunk, gathered logit minus logsumexp (fp32), under autograd."""
    out = []
    for lg, lab in zip(logits.split(chunk), labels.split(chunk)):
        lg = lg.float() / TEMPERATURE
        out.append(lg.gather(-1, lab[:, None]).squeeze(-1) - torch.logsumexp(lg, -1))
    return torch.cat(out)


def providers(inputs, S: int) -> dict[str, object]:
    """name -> (fn, setup) with fn() running forward+backward and setup() (untimed) restoring the logits buffer
    that an in-place provider overwrote with its gradient; or name -> a string saying why it is skipped."""
    logits, labels, old, ref, adv, seq_ids, mask = inputs
    T, V = logits.shape
    out: dict[str, object] = {}

    ours_logits = logits.clone()  # ours writes dlogits into its input: a private buffer, refilled before each run

    def run_ours():
        x = ours_logits.detach().requires_grad_()  # this buffer receives dlogits in place
        loss, _ = ops.fused_policy_loss(
            x, labels, old, adv, seq_ids, mask, ref_logp=ref, temperature=TEMPERATURE, cfg=CFG
        )
        return torch.autograd.grad(loss, x)[0]

    out["ours"] = (run_ours, lambda: ours_logits.copy_(logits))

    def run_reference():
        x = logits.detach().requires_grad_()
        loss, _ = R.fused_policy_loss(
            x, labels, old, adv, seq_ids, mask, ref_logp=ref, temperature=TEMPERATURE, cfg=CFG
        )
        return torch.autograd.grad(loss, x)[0]

    out["reference"] = (run_reference, None)

    compiled_loss = torch.compile(R.fused_policy_loss, dynamic=False)

    def run_compiled():
        x = logits.detach().requires_grad_()
        loss, _ = compiled_loss(x, labels, old, adv, seq_ids, mask, ref_logp=ref, temperature=TEMPERATURE, cfg=CFG)
        return torch.autograd.grad(loss, x)[0]

    out["compiled"] = (run_compiled, None)

    def run_trl():
        x = logits.detach().requires_grad_()
        logp = selective_log_softmax(x, labels)
        loss, _ = R.policy_loss(logp, old, adv, seq_ids, mask, ref_logp=ref, cfg=CFG)
        return torch.autograd.grad(loss, x)[0]

    out["trl-style"] = (run_trl, None)

    liger = liger_provider(inputs, S)
    out["liger"] = liger if isinstance(liger, str) else (liger[0], liger[1])
    return out


def liger_provider(inputs, S: int):
    """(fn, setup, logits buffer [B, L+1, V]) for Liger's triton_grpo_loss on the same inputs, or why not."""
    logits, labels, old, ref, adv, seq_ids, mask = inputs
    T, V = logits.shape
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception as e:  # not installed (CPU CI) or broken
        return f"skipped: {type(e).__name__}: {e}"
    B, L = S, T // S
    # Liger reads [B, L+1, V] logits (the last position of each row is not scored): one extra row per sequence
    source = torch.zeros(B, L + 1, V, device=logits.device, dtype=logits.dtype)
    source[:, :L] = logits.view(B, L, V)
    buf = source.clone()  # Liger writes dlogits in place (inplace=True): refilled before each run
    ids, old_b, ref_b, mask_b = labels.view(B, L), old.view(B, L), ref.view(B, L), mask.view(B, L).int()

    def run_liger():
        x = buf.detach().requires_grad_()
        res = triton_grpo_loss(x, old_b, ref_b, ids, adv, mask_b, TEMPERATURE, BETA, EPS_LOW, EPS_HIGH, True)
        per_token = res[0] if isinstance(res, tuple) else res
        loss = (per_token * mask_b).sum() / mask_b.sum().clamp_min(1)
        return torch.autograd.grad(loss, x)[0]

    return run_liger, lambda: buf.copy_(source), buf


# ----------------------------------------------------------------------------------------------------------------
# CPU mode: bytes requested, counted through the Triton interpreter


def count_passes(T: int, V: int, S: int, masked: float, dtype: torch.dtype = torch.bfloat16) -> dict[str, dict]:
    """Forward+backward bytes over the scored logits rows, ours and Liger's (if installed), on the same inputs.

    Returns {provider: {"passes", "passes_live", "passes_masked", "read_live_max", "read_masked_max",
    "written_min", "written_max"}} with per-row figures in units of one row (V * element size), plus
    {"inputs": {"masked_rows", "clipped_rows"}}."""
    from benches.interp_bytes import count_bytes

    inputs = make_inputs(T, V, S, dtype, torch.device("cpu"), masked=masked)
    mask = inputs[6].numpy()
    row = V * inputs[0].element_size()
    res: dict[str, dict] = {}

    def summarise(read, written):
        return {
            "passes": float((read.sum() + written.sum()) / (row * T)),
            "passes_live": float((read[mask].sum() + written[mask].sum()) / (row * max(1, mask.sum()))),
            "passes_masked": float((read[~mask].sum() + written[~mask].sum()) / (row * max(1, (~mask).sum()))),
            "read_live_max": float(read[mask].max() / row) if mask.any() else 0.0,
            "read_masked_max": float(read[~mask].max() / row) if (~mask).any() else 0.0,
            "written_min": float(written.min() / row),
            "written_max": float(written.max() / row),
        }

    logits, labels, old, ref, adv, seq_ids, _ = inputs
    buf = logits.clone()  # receives dlogits in place
    with ops.value_checks("off"), count_bytes() as c:
        c.track("logits", buf)
        x = buf.requires_grad_()
        loss, _ = ops.fused_policy_loss(
            x, labels, old, adv, seq_ids, inputs[6], ref_logp=ref, temperature=TEMPERATURE, cfg=CFG
        )
        (g,) = torch.autograd.grad(loss, x)
    res["ours"] = summarise(*c.row_bytes("logits"))
    lg = inputs[0].detach().float().requires_grad_()
    loss, _ = R.fused_policy_loss(
        lg, *inputs[1:3], inputs[4], inputs[5], inputs[6], ref_logp=inputs[3], temperature=TEMPERATURE, cfg=CFG
    )
    (g_ref,) = torch.autograd.grad(loss, lg)
    res["ours"]["max_abs_err_vs_reference"] = float((g.detach().float() - g_ref).abs().max())
    liger = liger_provider(inputs, S)
    if isinstance(liger, str):
        res["liger"] = {"skipped": liger}
    else:
        run_liger, setup_liger, buf = liger
        setup_liger()
        B, L = S, T // S
        with count_bytes() as c:
            c.track("logits", buf.view(B * (L + 1), V))
            run_liger()
        read, written = c.row_bytes("logits")
        scored = (np.arange(B * (L + 1)) % (L + 1)) < L  # the [B, L+1] layout's unscored last rows are excluded
        res["liger"] = summarise(read[scored], written[scored])
    ratio = torch.exp(R.token_logprobs(inputs[0], inputs[1], temperature=TEMPERATURE) - inputs[2])
    adv_t = inputs[4][inputs[5]]
    clipped = ((ratio > 1 + EPS_HIGH) & (adv_t > 0)) | ((ratio < 1 - EPS_LOW) & (adv_t < 0))
    res["inputs"] = {"masked_rows": int((~inputs[6]).sum()), "clipped_rows": int((clipped & inputs[6]).sum())}
    return res


def main_bytes(T: int, V: int, S: int, fractions: list[float]) -> list[dict]:
    versions = peer_versions()
    print(
        f"CPU byte count through the Triton interpreter | T={T} V={V} S={S} bf16 | "
        + " ".join(f"{k} {v}" for k, v in versions.items())
    )
    print(
        "Both providers get the loss mask and skip masked rows (never read, zero gradient rows written); passes ="
        " (bytes read + written over the scored logits rows) / logits bytes; per-row figures in rows of V*b bytes;"
        " clipped = PPO-clipped live tokens (ours skips their second read only when g is exactly 0, i.e. without KL)"
    )
    print(
        f"{'masked':>7}{'clipped':>9}{'provider':>10}{'passes':>8}{'live':>7}{'masked':>8}{'rd live':>9}"
        f"{'rd masked':>11}{'written':>9}{'max |err|':>11}"
    )
    rows = []
    for frac in fractions:
        res = count_passes(T, V, S, frac)
        info = res.pop("inputs")
        for name, r in res.items():
            if "skipped" in r:
                print(f"{frac:>7.2f}{'':>9}{name:>10}  {r['skipped']}")
                continue
            err = r.get("max_abs_err_vs_reference")
            print(
                f"{frac:>7.2f}{info['clipped_rows']:>9}{name:>10}{r['passes']:>8.4f}{r['passes_live']:>7.3f}"
                f"{r['passes_masked']:>8.2f}{r['read_live_max']:>9.2f}{r['read_masked_max']:>11.2f}"
                f"{r['written_max']:>9.2f}{(f'{err:.1e}' if err is not None else '-'):>11}"
            )
            rows.append({"provider": name, "masked_frac": frac, **info, **r, **versions, "T": T, "V": V, "S": S})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny timed run (seconds, any device)")
    p.add_argument("--bytes", action="store_true", help="count bytes through the interpreter (the CPU default)")
    p.add_argument("--masked", default=None, help="masked fraction(s) of each sequence, comma-separated")
    p.add_argument("-T", type=int, default=None)
    p.add_argument("-V", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--providers", default="ours,reference,compiled,liger,trl-style")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.bytes or (device.type == "cpu" and not args.smoke):
        T, V = args.T or 192, args.V or 4099
        fractions = [float(f) for f in (args.masked or "0,0.35,0.7").split(",")]
        rows = main_bytes(T, V, 4, fractions)
        if rows and not args.no_csv:
            print("wrote", rel(write_csv("loss-bytes", [dict(r, **env_facts(device)) for r in rows])))
        return
    small = args.smoke or device.type != "cuda"
    T = args.T or (64 if small else 16384)
    V = args.V or (4099 if small else 151936)
    S = max(1, T // 256) if not small else 4
    frac = float(args.masked or 0.1)
    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(T, V, S, dtype, device, masked=frac)
    mask = inputs[6]
    logits_bytes = T * V * inputs[0].element_size()
    live = int(mask.sum())  # sync: bench set-up, outside the timed region
    roofline_bytes = (3 * live + (T - live)) * V * inputs[0].element_size()
    copy_bw = copy_bandwidth_gbs(device)
    facts = env_facts(device)
    versions = peer_versions()
    backend = ops.backend_for(device)
    print(
        f"device {facts['device']} | " + " ".join(f"{k} {v}" for k, v in versions.items()) + f" | ops backend {backend}"
    )
    print(
        f"T={T} V={V} S={S} {args.dtype} | {T - live} of {T} rows masked (prompt prefix; ours and Liger skip them,"
        f" the eager peers compute them) | logits {logits_bytes / 2**20:.1f} MiB | roofline traffic "
        f"{roofline_bytes / 2**20:.1f} MiB" + (f" | copy bandwidth {copy_bw:.0f} GB/s" if copy_bw else "")
    )
    rows, times = [], {}
    wanted = args.providers.split(",")
    with ops.value_checks("off"):  # no host sync inside any timed region
        runs = providers(inputs, S)
        print(f"{'provider':<12}{'ms':>10}{'GB/s':>9}{'ratio_to_roofline':>19}{'extra mem %':>13}{'ours x faster':>15}")
        for name in wanted:
            entry = runs.get(name)
            if isinstance(entry, str) or entry is None:
                print(f"{name:<12}{entry or 'unknown provider'}")
                continue
            fn, setup = entry
            try:
                reps = 3 if small else 20
                ms = time_ms(fn, device, warmup=2 if small else 5, rep=reps, setup=setup)
                if setup is not None:
                    setup()
                extra = peak_extra_bytes(fn, device)
            except Exception as e:  # e.g. torch.compile without a working compiler, or OOM for the eager paths
                print(f"{name:<12}failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            times[name] = ms
            gbs = roofline_bytes / (ms * 1e-3) / 1e9
            # extra memory beyond the logits and one [T, V] gradient
            extra_pct = None if extra is None else 100 * max(0, extra - logits_bytes) / logits_bytes
            rows.append(
                {
                    "provider": name,
                    "ms": ms,
                    "gb_per_s": gbs,
                    "ratio_to_roofline": gbs / copy_bw if copy_bw else None,
                    "extra_mem_pct": extra_pct,
                }
            )
    for r in rows:
        ratio = r["ms"] / times["ours"] if "ours" in times else None
        r["ours_speedup"] = ratio
        rr = f"{r['ratio_to_roofline']:.2f}" if r["ratio_to_roofline"] else "-"
        em = f"{r['extra_mem_pct']:.2f}" if r["extra_mem_pct"] is not None else "-"
        print(
            f"{r['provider']:<12}{r['ms']:>10.3f}{r['gb_per_s']:>9.1f}{rr:>19}{em:>13}"
            f"{(f'{ratio:.2f}x' if ratio else '-'):>15}"
        )
        r.update(
            facts,
            **versions,
            T=T,
            V=V,
            S=S,
            dtype=args.dtype,
            masked_frac=frac,
            ops_backend=backend,
            copy_bw_gbs=copy_bw,
        )
    if rows and not args.no_csv:
        print("wrote", rel(write_csv("loss", rows)))


if __name__ == "__main__":
    main()
