"""Sampler throughput: generated tokens/s of our engine vs transformers `model.generate` vs the previous sampler.

All three providers get the same model, problems, batch (P problems x G samples), sampling (temperature, top-p),
max new tokens per turn and stop ids, and are timed side by side in one run. Tokens/s counts the tokens each
provider actually sampled (up to and including each turn's end-of-turn token, no padding).

    ours       exgrpo_fast.rollout (static per-row KV cache, one prompt prefill per problem shared by its G rows,
               delta-only turn prefills, on-device sampling, CUDA graph decode on GPU)
    previous   the sampler this engine replaced: exgrpo_fast/rollout.py at commit PREVIOUS_COMMIT (transformers
               DynamicCache, the whole context re-prefilled every turn, mask rebuilt every token), loaded from git
               history, unchanged
    hf         transformers GenerationMixin.generate on the left-padded prompts (for 3 turns: one generate call per
               turn over the whole context, as a user would write it)

Modes: single-turn (the question only) and 3-turn (the question and two probes, each turn conditioned on the
earlier sampled answers).

    python benches/bench_rollout.py                 # CPU: tiny preset, batches 8 32 128
    python benches/bench_rollout.py --preset gpu-0.5b --batches 8 32 128 256   # GPU (bf16)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benches._common import env_facts, model_setup, rel, sync, write_csv  # noqa: E402
from exgrpo_fast.data.dialogue import encode_prompt, end_of_turn_ids  # noqa: E402
from exgrpo_fast.data.tasks import builtin_dataset, rollout_user_turns  # noqa: E402
from exgrpo_fast.model.loading import load_model  # noqa: E402
from exgrpo_fast.model.tiny import create_tiny_checkpoint  # noqa: E402
from exgrpo_fast.rollout import SamplingParams, rollout_dialogues  # noqa: E402

PREVIOUS_COMMIT = "8d02fdd"  # last commit with the DynamicCache sampler (exgrpo_fast/rollout.py)


def load_previous_sampler():
    """The previous sampler module, exactly as committed at PREVIOUS_COMMIT (None if git history is unavailable)."""
    try:
        source = subprocess.run(["git", "show", f"{PREVIOUS_COMMIT}:exgrpo_fast/rollout.py"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"previous sampler unavailable (git show {PREVIOUS_COMMIT}: {err}); skipping it")
        return None
    path = Path(tempfile.mkdtemp()) / "previous_rollout.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("previous_rollout", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["previous_rollout"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def problems_with_turns(n: int, turns: int, seed: int = 0) -> list:
    """n built-in problems that have at least `turns` user turns (question + probes)."""
    out, k = [], 0
    while len(out) < n:
        for p in builtin_dataset(max(4 * n, 16), 2, seed=seed + k)["train"]:
            if len(rollout_user_turns(p)) >= turns and len(out) < n:
                out.append(p)
        k += 1
    return out


def limit_turns(problem, turns: int):
    p = dict(problem)
    p["probes"] = [q for q in problem["probes"] if q.get("kind") != "explain"][: turns - 1] if turns > 1 else []
    return p


def count_sampled(rollouts) -> int:
    return sum(sum(r.loss_mask) for r in rollouts)


def run_ours(model, tok, problems, G, params, turns, batch):
    rs = rollout_dialogues(model, tok, problems, group_size=G, params=params, include_probes=turns > 1,
                           batch_size=batch, generator=torch.Generator().manual_seed(0))  # fmt: skip
    return count_sampled(rs)


def run_previous(prev, model, tok, problems, G, params, turns, batch):
    old_params = prev.SamplingParams(
        temperature=params.temperature, top_p=params.top_p, max_new_tokens=params.max_new_tokens,
        stop_check_every=params.stop_check_every,
    )  # fmt: skip
    gen = torch.Generator(device=model.device).manual_seed(0)
    rs = prev.rollout_dialogues(model, tok, problems, group_size=G, params=old_params, include_probes=turns > 1,
                                batch_size=batch, generator=gen)  # fmt: skip
    return count_sampled(rs)


@torch.no_grad()
def run_hf(model, tok, problems, G, params, turns, batch):
    """transformers generate, turn by turn over the whole context (left padding), the same stops and sampling."""
    stop = end_of_turn_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    dialogues = [([], rollout_user_turns(p, include_probes=turns > 1)) for p in problems for _ in range(G)]
    sampled = 0
    device = model.device
    for t in range(turns):
        live = [d for d in dialogues if t < len(d[1])]
        for s in range(0, len(live), batch):
            chunk = live[s : s + batch]
            prompts = [encode_prompt(tok, d[0] + [{"role": "user", "content": d[1][t]}]) for d in chunk]
            L = max(map(len, prompts))
            ids = torch.full((len(prompts), L), pad, dtype=torch.long)
            mask = torch.zeros((len(prompts), L), dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, L - len(p) :] = torch.tensor(p)
                mask[i, L - len(p) :] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=params.max_new_tokens,
                do_sample=params.temperature > 0, temperature=params.temperature or None, top_p=params.top_p,
                top_k=0, eos_token_id=stop, pad_token_id=pad,
            )  # fmt: skip
            for d, row in zip(chunk, out[:, L:].tolist()):
                ids_ = []
                for x in row:
                    ids_.append(x)
                    if x in stop:
                        break
                sampled += len(ids_)
                text = tok.decode([x for x in ids_ if x not in stop], skip_special_tokens=True)
                d[0].extend([{"role": "user", "content": d[1][t]}, {"role": "assistant", "content": text}])
    return sampled


@torch.no_grad()
def decode_roofline(model, batch: int, context: int, steps: int, device) -> tuple[float, float]:
    """(ms per decode step of our engine at `batch` rows with `context` cached tokens each, ms to read the weights
    and that live KV cache once at the measured copy bandwidth). No stop token, so every step decodes every row."""
    from benches._common import copy_bandwidth_gbs
    from exgrpo_fast.rollout.engine import Chunk, Engine

    e = Engine(model, temperature=1.0, top_p=1.0, max_new_tokens=steps, stop_check_every=steps + 1, stop_ids=[-1],
               pad_id=0)  # fmt: skip
    chunk = Chunk(e, batch, context + steps + 1, list(range(batch)))
    logits = chunk.prefill_prompts([[5] * context] * batch, 1)
    chunk.decode(logits, [True] * batch)  # warm-up and graph capture
    chunk = Chunk(e, batch, context + steps + 1, list(range(batch)), reuse=chunk.reuse)
    logits = chunk.prefill_prompts([[5] * context] * batch, 1)
    sync(device)
    t0 = time.perf_counter()
    chunk.decode(logits, [True] * batch)
    sync(device)
    step_ms = (time.perf_counter() - t0) / (steps - 1) * 1e3
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = sum(k.numel() * k.element_size() for k in chunk.cache.keys + chunk.cache.values)
    live = (context + steps / 2) / (chunk.max_len + 1)  # the mean live fraction of the cache over the run
    gbs = copy_bandwidth_gbs(device) or float("nan")
    return step_ms, (weight_bytes + kv_bytes * live) / (gbs * 1e9) * 1e3


def timed(fn, device) -> tuple[float, int]:
    sync(device)
    t0 = time.perf_counter()
    n = fn()
    sync(device)
    return time.perf_counter() - t0, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="tiny (CPU default) or gpu-0.5b (GPU default)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="dialogues per batch (P x G)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--turns", type=int, nargs="+", default=[1, 3])
    p.add_argument("--providers", nargs="+", default=["ours", "previous", "hf"])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per provider (median reported)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = p.parse_args()

    device, preset, dtype = model_setup(args.preset, args.threads)
    batches = args.batches or ([8, 32, 128, 256] if device.type == "cuda" else [8, 32, 128])
    path = create_tiny_checkpoint(Path(tempfile.mkdtemp()) / preset, preset=preset, seed=0)
    model, tok = load_model(path, dtype=dtype, device=device)
    model.eval()
    prev = load_previous_sampler() if "previous" in args.providers else None
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    G = args.group_size
    facts = env_facts(device)
    print(f"# {facts['device']} | torch {facts['torch']} | threads {torch.get_num_threads()} | preset {preset} | "
          f"G {G} | max_new_tokens {params.max_new_tokens} | T {params.temperature} top_p {params.top_p}")  # fmt: skip
    print(f"{'turns':>5} {'batch':>5} {'provider':>9} {'tokens':>7} {'s':>7} {'tok/s':>8} {'vs prev':>7} {'vs hf':>6}")

    # warm-up (allocator, lazy inits, graph capture paths) on a small batch
    warm = [limit_turns(x, 1) for x in problems_with_turns(1, 1)]
    run_ours(model, tok, warm, 2, params, 1, 2)

    rows = []
    for turns in args.turns:
        for batch in batches:
            P = max(1, batch // G)
            probs = [limit_turns(x, turns) for x in problems_with_turns(P, turns, seed=batch)]
            runners = {
                "ours": lambda probs=probs, turns=turns, batch=batch: run_ours(model, tok, probs, G, params, turns,
                                                                                batch),
                "previous": lambda probs=probs, turns=turns, batch=batch: run_previous(prev, model, tok, probs, G,
                                                                                        params, turns, batch),
                "hf": lambda probs=probs, turns=turns, batch=batch: run_hf(model, tok, probs, G, params, turns, batch),
            }  # fmt: skip
            names = [n for n in args.providers if n in runners and (n != "previous" or prev is not None)]
            times: dict[str, list[float]] = {n: [] for n in names}
            counts: dict[str, int] = {}
            for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit all providers
                for name in names:
                    secs, n = timed(runners[name], device)
                    times[name].append(secs)
                    counts[name] = n
            res = {}
            for name in names:
                secs = statistics.median(times[name])
                res[name] = (secs, counts[name], counts[name] / secs)
            for name, (secs, n, tps) in res.items():
                vs_prev = tps / res["previous"][2] if "previous" in res else float("nan")
                vs_hf = tps / res["hf"][2] if "hf" in res else float("nan")
                print(f"{turns:>5} {P * G:>5} {name:>9} {n:>7} {secs:>7.2f} {tps:>8.0f} {vs_prev:>7.2f} {vs_hf:>6.2f}")
                rows.append({**facts, "preset": preset, "dtype": str(dtype).replace("torch.", ""),
                             "threads": torch.get_num_threads(), "turns": turns, "batch": P * G, "group_size": G,
                             "max_new_tokens": params.max_new_tokens, "provider": name, "tokens": n,
                             "seconds": round(secs, 4), "tokens_per_s": round(tps, 1)})  # fmt: skip
    if device.type == "cuda":  # issue 13: a decode step within 2x of reading the weights and the live KV cache once
        for batch in batches:
            step_ms, bound_ms = decode_roofline(model, batch, context=512, steps=64, device=device)
            print(f"decode step, batch {batch}, 512 cached tokens: {step_ms:.3f} ms vs {bound_ms:.3f} ms to read "
                  f"weights + live KV once (x{step_ms / bound_ms:.2f})")  # fmt: skip
            rows.append({**facts, "preset": preset, "dtype": str(dtype).replace("torch.", ""), "turns": 0,
                         "batch": batch, "provider": "ours-decode-step", "seconds": step_ms / 1e3,
                         "roofline_seconds": bound_ms / 1e3})  # fmt: skip
    out = write_csv("bench_rollout", rows)
    print(f"wrote {rel(out)}")


if __name__ == "__main__":
    main()
