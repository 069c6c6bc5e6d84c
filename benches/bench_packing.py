"""Packed (varlen) vs padded forward+backward throughput on skewed sequence lengths, per attention backend; then
shared-prefix packing (a GRPO group's prompt once, its completions attending to it) against packing every sample
whole, on a GRPO-shaped workload and a long-prompt one.

Part 1: both providers see the same sequences and the same random-weight model; tokens/s counts real (non-pad)
tokens only. The padded provider is the ordinary transformers batch (right padding + attention mask, SDPA); the
packed one is one row with cu_seqlens through each available varlen backend. Logits are checked equal before timing.

Part 2: P groups of G samples (a prompt, then completions of varied length, loss on the completions); per backend,
the forward+backward of the hidden states at the loss positions (what the train step's passes compute) packed whole
and with shared prefixes, the tokens each computes, and their max difference (the two are the same computation).

    python benches/bench_packing.py            # GPU: the ~0.5B preset in bf16, 32 sequences, lognormal lengths
    python benches/bench_packing.py --smoke    # CPU: the tiny preset, a few short sequences
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benches._common import env_facts, model_setup, peak_extra_bytes, rel, time_ms, write_csv  # noqa: E402
from exgrpo_fast.data.packing import pack_sequences  # noqa: E402
from exgrpo_fast.model import attention  # noqa: E402
from exgrpo_fast.model.forward import packed_hidden, packed_hidden_states  # noqa: E402
from exgrpo_fast.model.tiny import build_tiny_tokenizer, tiny_config  # noqa: E402


def skewed_lengths(n: int, mean_log: float, sigma: float, max_len: int, seed: int) -> list[int]:
    torch.manual_seed(seed)
    lengths = torch.distributions.LogNormal(mean_log, sigma).sample((n,)).clamp(8, max_len).long()
    return lengths.tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny CPU-sized run")
    p.add_argument("--preset", default=None, help="model preset (default: gpu-0.5b on GPU, tiny otherwise)")
    p.add_argument("--num-seqs", type=int, default=None)
    p.add_argument("--max-len", type=int, default=None, help="longest sequence (default: 1024 on GPU, 96 on CPU)")
    args = p.parse_args()

    device, preset, dtype = model_setup(args.preset, cpu=args.smoke)
    # GPU: 32 x up to 1024 tokens keeps the padded provider's activations (~1.3 MB a token for gpu-0.5b) near 40 GB
    n = args.num_seqs or (32 if device.type == "cuda" else 8)
    mean_log, max_len = (6.0, args.max_len or 1024) if device.type == "cuda" else (3.5, args.max_len or 96)
    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    config = tiny_config(preset, len(tok), tok)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention.IMPLEMENTATION).to(device, dtype)
    lengths = skewed_lengths(n, mean_log, 1.0, max_len, seed=0)
    seqs = [torch.randint(0, len(tok), (k,)).tolist() for k in lengths]
    real_tokens = sum(lengths)
    (batch,) = pack_sequences([(s, [True] * len(s)) for s in seqs], token_budget=real_tokens)
    batch = batch.to(device)

    # padded batch (right padding), the same sequences
    L = max(lengths)
    ids = torch.zeros(n, L, dtype=torch.long)
    mask = torch.zeros(n, L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)

    def padded_step():
        out = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        (out * mask[..., None]).float().square().mean().backward()

    def packed_step():
        out = packed_hidden_states(model, batch)
        out.float().square().mean().backward()

    # equal outputs before timing
    with torch.no_grad():
        padded_out = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        want = torch.cat([padded_out[i, : len(s)] for i, s in enumerate(seqs)]).float()
    facts = env_facts(device)
    rows = []
    t_pad = time_ms(padded_step, device, warmup=1 if args.smoke else 3, rep=3 if args.smoke else 10)
    mem_pad = peak_extra_bytes(padded_step, device)
    print(
        f"device {facts['device']} | preset {preset} | {n} seqs, {real_tokens} real tokens, padded to {n}x{L}"
        f" ({n * L} slots, {100 * real_tokens / (n * L):.0f}% useful)"
    )
    print(f"{'provider':<22}{'ms':>10}{'tokens/s':>14}{'vs padded':>11}{'peak MB':>10}{'max |diff|':>12}")
    print(
        f"{'padded (sdpa)':<22}{t_pad:>10.2f}{real_tokens / t_pad * 1e3:>14.0f}{1.0:>11.2f}"
        f"{(mem_pad or 0) / 2**20:>10.0f}{'-':>12}"
    )
    rows.append({"provider": "padded-sdpa", "ms": t_pad, "tokens_per_s": real_tokens / t_pad * 1e3, "speedup": 1.0})
    for backend in attention.available_backends(device):
        attention.bind_backend(model, attention.select_backend(device, backend))
        with torch.no_grad():
            diff = (packed_hidden_states(model, batch).float() - want).abs().max().item()
        t = time_ms(packed_step, device, warmup=1 if args.smoke else 3, rep=3 if args.smoke else 10)
        mem = peak_extra_bytes(packed_step, device)
        print(
            f"{'packed ' + backend:<22}{t:>10.2f}{real_tokens / t * 1e3:>14.0f}{t_pad / t:>11.2f}"
            f"{(mem or 0) / 2**20:>10.0f}{diff:>12.2e}"
        )
        rows.append(
            {
                "provider": f"packed-{backend}",
                "ms": t,
                "tokens_per_s": real_tokens / t * 1e3,
                "speedup": t_pad / t,
                "max_abs_diff": diff,
            }
        )
    for r in rows:
        r.update(num_seqs=n, real_tokens=real_tokens, padded_slots=n * L)
    rows += shared_prefix_part(model, device, len(tok), args.smoke)
    for r in rows:
        r.update(facts, preset=preset, dtype=str(dtype).removeprefix("torch."))
    print("wrote", rel(write_csv("packing", rows)))


def grouped_sequences(P: int, G: int, prompt: int, completion: int, vocab: int, seed: int):
    """P groups of G samples: a shared prompt of `prompt` tokens, completions of completion/2 .. 3*completion/2."""
    g = torch.Generator().manual_seed(seed)
    seqs, groups = [], []
    for p in range(P):
        ids = torch.randint(0, vocab, (prompt,), generator=g).tolist()
        for _ in range(G):
            n = int(torch.randint(completion // 2, completion * 3 // 2 + 1, (1,), generator=g))
            seqs.append((ids + torch.randint(0, vocab, (n,), generator=g).tolist(), [False] * prompt + [True] * n))
            groups.append(p)
    return seqs, groups


def shared_prefix_part(model, device, vocab: int, smoke: bool) -> list[dict]:
    """Forward+backward at the loss positions, packed whole vs with shared prefixes, per backend and workload."""
    if device.type == "cuda":
        workloads = [("grpo", 16, 8, 256, 256, 16384), ("long-prompt", 8, 16, 512, 64, 16384)]
    elif smoke:
        workloads = [("grpo", 2, 4, 30, 12, 1024), ("long-prompt", 1, 8, 128, 16, 2048)]
    else:  # the e2e bench's shapes on CPU: prompt ~60, completions ~24, G 8; the long prompt: 512, 64, G 16
        workloads = [("grpo", 4, 8, 60, 24, 4096), ("long-prompt", 2, 16, 512, 64, 8192)]
    rows = []
    print(f"\n{'workload':<13}{'backend':<16}{'packing':<9}{'tokens':>8}{'micro-b':>8}{'ms':>10}{'vs whole':>10}"
          f"{'peak MB':>9}{'max |diff|':>12}")  # fmt: skip
    for name, P, G, prompt, completion, budget in workloads:
        seqs, groups = grouped_sequences(P, G, prompt, completion, vocab, seed=1)
        packings = {
            "whole": [b.to(device) for b in pack_sequences(seqs, budget)],
            "shared": [b.to(device) for b in pack_sequences(seqs, budget, groups=groups)],
        }
        for backend in attention.available_backends(device):
            try:
                attention.bind_backend(model, attention.select_backend(device, backend))
                with torch.no_grad():
                    want = torch.cat([packed_hidden(model, b) for b in packings["whole"]]).float()
            except (NotImplementedError, ValueError) as err:
                print(f"{name:<13}{backend:<16}skipped: {err}")
                continue
            t_whole = None
            for packing, batches in packings.items():

                def step(batches=batches):
                    for b in batches:
                        packed_hidden(model, b).float().square().mean().backward()

                with torch.no_grad():
                    got = torch.cat([packed_hidden(model, b) for b in batches]).float()
                # a sample's loss rows come in the same order in both packings: sort rows into the callers' sample
                # order (stable) and compare row by row
                key_w = torch.cat([b.sample_index[b.loss_seq_ids].cpu() for b in packings["whole"]])
                key_g = torch.cat([b.sample_index[b.loss_seq_ids].cpu() for b in batches])
                diff = (got[torch.argsort(key_g, stable=True)] - want[torch.argsort(key_w, stable=True)]).abs().max()
                cpu = device.type == "cpu"
                t = time_ms(step, device, warmup=1 if cpu else 3, rep=3 if cpu else 10)
                mem = peak_extra_bytes(step, device)
                t_whole = t_whole or t
                tokens = sum(b.num_tokens for b in batches)
                print(f"{name:<13}{backend:<16}{packing:<9}{tokens:>8}{len(batches):>8}{t:>10.2f}{t_whole / t:>10.2f}"
                      f"{(mem or 0) / 2**20:>9.0f}{diff.item():>12.2e}")  # fmt: skip
                rows.append({"provider": f"{packing}-{backend}", "workload": name, "P": P, "G": G, "prompt": prompt,
                             "completion": completion, "tokens": tokens, "micro_batches": len(batches), "ms": t,
                             "speedup": t_whole / t, "max_abs_diff": diff.item()})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
