"""steer: sample with +-alpha x a latent's decoder direction added to the residual stream, measure what changes.

For latent i and the steered model m (A or B), the direction is its decoder vector at (m, layer) in raw activation
units, made unit-length and scaled by the layer's mean residual norm (rms = 1 / scale of that source): a forward hook
on decoder block `layer` adds alpha x rms x d / |d| to its output at every position, during prefill and decoding.
alpha = 0 adds exact zeros, so it reproduces unsteered sampling bit for bit (tested).

Greedy multi-turn rollouts (question, then every checkable probe) on steer.n built-in problems per (latent, alpha);
metrics per point: answer accuracy, probe accuracy (exgrpo_fast.rewards.score_dialogue) and mean response length in
tokens. Writes steer/steer.json, steer/steer.md and steer/steer.png (one curve per latent).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from exgrpo_fast.analysis.activations import decoder_layers, resolve_device


@contextlib.contextmanager
def steering(model, layer: int, vector: torch.Tensor | None):
    """Add `vector` [H] to the output of decoder block `layer` while the context is open (None: no hook)."""
    if vector is None:
        yield
        return
    block = decoder_layers(model)[layer]

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (output[0] + vector.to(output[0].dtype),) + tuple(output[1:])
        return output + vector.to(output.dtype)

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def steering_vector(xcoder, manifest: dict, latent: int, model_key: str, alpha: float, layer: int | None = None):
    """(layer, vector [H]) for `latent` steering model `model_key` ("a" or "b") with strength alpha."""
    if not 0 <= latent < xcoder.n_latents:
        raise ValueError(f"steer.latents: latent {latent} is out of range (the crosscoder has {xcoder.n_latents})")
    sources = [i for i, s in enumerate(manifest["sources"]) if s["model"] == model_key]
    if layer is not None:
        match = [i for i in sources if manifest["sources"][i]["layer"] == layer]
        if not match:
            raise ValueError(f"steer.layer={layer}: not a collected layer ({manifest['layers']})")
        src = match[0]
    else:
        norms = xcoder.decoder_norms().detach()[latent, sources]
        src = sources[int(norms.argmax())]
    d = xcoder.raw_direction(latent, src)
    rms = 1.0 / float(xcoder.scale[src])
    vec = alpha * rms * d / d.norm().clamp_min(1e-12)
    return manifest["sources"][src]["layer"], vec


def run_point(model, tokenizer, problems: list, *, layer: int, vector: torch.Tensor | None, sc) -> dict:
    """Greedy rollouts under one steering vector -> {acc, probe_acc, length} and the rollouts."""
    from exgrpo_fast.rewards import score_dialogue
    from exgrpo_fast.rollout import SamplingParams, rollout_dialogues

    # the lean sampling forward (and CUDA graphs) bypass the decoder modules, so forward hooks would never fire
    params = SamplingParams(
        temperature=0.0, top_p=1.0, max_new_tokens=sc.max_new_tokens, lean_forward=False, cuda_graphs=False
    )
    with steering(model, layer, vector):
        rollouts = rollout_dialogues(model, tokenizer, problems, group_size=1, params=params,
                                     batch_size=sc.batch_size)  # fmt: skip
    scores = [score_dialogue(problems[r.problem_index], r.responses) for r in rollouts]
    n = len(scores)
    with_probes = [s for s, r in zip(scores, rollouts) if len(r.responses) > 1]
    n_resp = sum(len(r.responses) for r in rollouts)
    return {
        "acc": sum(s["task"] for s in scores) / n,
        "probe_acc": sum(s["probe"] for s in with_probes) / len(with_probes) if with_probes else float("nan"),
        "length": sum(sum(r.loss_mask) for r in rollouts) / max(n_resp, 1),
        "rollouts": rollouts,
    }


def auto_latents(xcoder, n_layers: int, model_key: str, n_auto: int, dead_tokens: int) -> list[int]:
    """The n_auto most exclusive live latents of the steered model, then the live latent closest to r = 0.5 (a shared
    control). Live: fired within the last dead_tokens training tokens."""
    r = xcoder.relative_norms(n_layers).cpu()
    idx = (xcoder.since_fired.cpu() <= dead_tokens).nonzero().flatten()
    order = idx[r[idx].argsort(descending=model_key == "b")]
    picks = order[:n_auto].tolist()
    shared = idx[(r[idx] - 0.5).abs().argsort()]
    picks += [i for i in shared.tolist() if i not in picks][:1]
    return picks


def steer(cfg) -> dict:
    """Run the steer subcommand (cfg: crosscoder.Steer); returns steer.json's content."""
    from exgrpo_fast.analysis.report import load_pair
    from exgrpo_fast.data.tasks import make_problems
    from exgrpo_fast.model.loading import load_model

    sc = cfg.steer
    root = Path(cfg.log.out_dir)
    device = resolve_device(cfg.models.device)
    store, xcoder, meta = load_pair(root, "cpu")
    manifest = store.manifest
    path = getattr(cfg.models, sc.model) or manifest["models"][sc.model]["path"]
    label = manifest["models"][sc.model]["label"]
    model, tokenizer = load_model(path, dtype=getattr(torch, cfg.models.dtype), device=device,
                                  attn_backend=cfg.models.attn_backend)  # fmt: skip
    latents = list(sc.latents) or auto_latents(
        xcoder, len(manifest["layers"]), sc.model, sc.n_auto, meta["train"]["dead_tokens"]
    )
    problems = make_problems(sc.split, sc.n, seed=sc.seed)
    r = xcoder.relative_norms(len(manifest["layers"])).cpu()
    out = root / "steer"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = run_point(model, tokenizer, problems, layer=0, vector=None, sc=sc)
    base.pop("rollouts")
    curves = {}
    for i in latents:
        points = []
        for alpha in sc.alphas:
            layer, vec = steering_vector(xcoder, manifest, i, sc.model, alpha, sc.layer)
            res = (
                base if alpha == 0 else run_point(model, tokenizer, problems, layer=layer, vector=vec.to(device), sc=sc)
            )
            res = {k: v for k, v in res.items() if k != "rollouts"}
            points.append({"alpha": alpha, **res})
            print(f"steer | {label} latent {i} (r {r[i]:.2f}) @L{layer} | alpha {alpha:+.2f} | acc {res['acc']:.3f} | "
                  f"probe {res['probe_acc']:.3f} | len {res['length']:.1f} | {time.perf_counter() - t0:.0f}s",
                  flush=True)  # fmt: skip
        curves[i] = {"r": float(r[i]), "layer": layer, "points": points}
    result = {"model": sc.model, "label": label, "path": str(path), "n": sc.n, "split": sc.split,
              "unsteered": base, "curves": curves}  # fmt: skip
    (out / "steer.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, out / "steer.png")
    (out / "steer.md").write_text(_markdown(result))
    return result


def _plot(res: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, name in zip(axes, ("acc", "probe_acc", "length"), ("answer accuracy", "probe accuracy",
                                                                     "response length (tokens)")):  # fmt: skip
        for i, c in res["curves"].items():
            ax.plot([p["alpha"] for p in c["points"]], [p[key] for p in c["points"]], marker="o",
                    label=f"latent {i} (r {c['r']:.2f})")  # fmt: skip
        ax.set_xlabel("alpha (x mean residual norm)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"steering {res['label']} ({res['n']} {res['split']} problems, greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(res: dict) -> str:
    b = res["unsteered"]
    lines = [f"# Steering {res['label']}", "",
             f"{res['n']} {res['split']} problems, greedy; unsteered: accuracy {b['acc']:.3f}, probe accuracy "
             f"{b['probe_acc']:.3f}, response length {b['length']:.1f} tokens.", "",
             "| latent | r | layer | alpha | accuracy | probe accuracy | length |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for i, c in res["curves"].items():
        for p in c["points"]:
            lines.append(f"| {i} | {c['r']:.2f} | {c['layer']} | {p['alpha']:+.2f} | {p['acc']:.3f} | "
                         f"{p['probe_acc']:.3f} | {p['length']:.1f} |")  # fmt: skip
    lines += ["", "![steering](steer.png)", ""]
    return "\n".join(lines)
