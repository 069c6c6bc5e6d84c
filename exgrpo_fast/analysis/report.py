"""report: what the crosscoder says about A versus B, as report/report.md, report/report.json and PNGs.

1. Relative decoder norm r = |d_B| / (|d_A| + |d_B|) of every live latent: a histogram and the counts of A-only
   (r < e), shared and B-only (r > 1 - e) latents (e = report.exclusive).
2. Cosine between the A and B decoders of shared latents: does a shared feature write the same direction in both?
3. Top-activating contexts (decoded tokens) of the live latents leaning most to A (lowest r) and most to B (highest
   r): A-only / B-only ones when there are, else the shared latents nearest to them (the report says which, and when
   a class is empty).
4. Per probe kind: the firing rate of every latent on the tokens of each exchange kind (question, inverse,
   counterfactual, step, verify, explain) split by role (user prompt vs the assistant's answer), the latents most
   specific to each kind, and which class (A-only / shared / B-only) fires where.

One pass over the collected shards (memory-bounded: one shard and one encoder batch at a time) gathers frequencies,
per-segment counts and each latent's top activations; a latent is live when it fires at least once in that pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from exgrpo_fast.analysis.activations import ActivationStore, resolve_device
from exgrpo_fast.analysis.xcoder import load_crosscoder, source_names


def load_pair(out_dir: str | Path, device: torch.device | str = "cpu"):
    """(store, crosscoder, meta) of a work directory, checked to belong together."""
    root = Path(out_dir)
    store = ActivationStore(root / "acts")
    model, meta = load_crosscoder(root / "crosscoder" / "crosscoder.safetensors", device)
    if meta["manifest"]["fingerprint"] != store.manifest["fingerprint"]:
        raise ValueError(f"{root}: the crosscoder was trained on other activations than acts/ holds (re-run train)")
    return store, model, meta


def classify(r: torch.Tensor, exclusive: float) -> list[str]:
    return ["A-only" if v < exclusive else "B-only" if v > 1 - exclusive else "shared" for v in r.tolist()]


@torch.no_grad()
def scan(model, store: ActivationStore, *, contexts: int, batch_size: int, max_tokens: int = 0) -> dict:
    """One pass over the shards: firing counts, activation sums, per-segment firing counts (segment = kind * 2 +
    role), and the top `contexts` activations of every latent with their (shard, row)."""
    device = model.W_dec.device
    F, G = model.n_latents, 2 * len(store.manifest["kinds"])
    fired = torch.zeros(F, dtype=torch.float64, device=device)
    act_sum = torch.zeros(F, dtype=torch.float64, device=device)
    seg_counts = torch.zeros(F, G, dtype=torch.float64, device=device)
    seg_tokens = torch.zeros(G, dtype=torch.float64, device=device)
    top_val = torch.full((contexts, F), -1.0, device=device)
    top_key = torch.zeros((contexts, F), dtype=torch.int64, device=device)
    n = 0
    for i in range(len(store.shards)):
        if max_tokens and n >= max_tokens:
            break
        shard = store.load(i, ("acts", "kind", "role"))
        seg = (shard["kind"] * 2 + shard["role"]).to(device)
        for s in range(0, shard["acts"].shape[0], batch_size):
            if max_tokens and n >= max_tokens:
                break
            x = model.normalize(shard["acts"][s : s + batch_size].to(device))
            if max_tokens:
                x = x[: max_tokens - n]
            f = model.encode(x)  # (b, F)
            b = x.shape[0]
            on = (f > 0).double()
            fired += on.sum(0)
            act_sum += f.double().sum(0)
            onehot = torch.nn.functional.one_hot(seg[s : s + b], G).double()
            seg_counts += on.T @ onehot
            seg_tokens += onehot.sum(0)
            k = min(contexts, b)
            v, idx = f.topk(k, dim=0)  # (k, F)
            keys = (i << 32) + s + idx
            top_val, order = torch.cat([top_val, v]).topk(contexts, dim=0)
            top_key = torch.cat([top_key, keys]).gather(0, order)
            n += b
    return {"tokens": n, "fired": fired.cpu(), "act_sum": act_sum.cpu(), "seg_counts": seg_counts.cpu(),
            "seg_tokens": seg_tokens.cpu(), "top_val": top_val.cpu(), "top_key": top_key.cpu()}  # fmt: skip


def _context(tokenizer, labels: dict, row: int, before: int, after: int) -> str:
    doc, pos = int(labels["doc"][row]), int(labels["pos"][row])
    lo = row - min(pos, before)
    hi = row + 1
    while hi < labels["doc"].numel() and hi <= row + after and int(labels["doc"][hi]) == doc:
        hi += 1
    ids = labels["tokens"]

    def text(a: int, b: int) -> str:
        s = tokenizer.decode(ids[a:b].tolist(), skip_special_tokens=False)
        return s.replace("\n", "\\n").replace("`", "'")

    return ("..." if pos > before else "") + text(lo, row) + "[[" + text(row, row + 1) + "]]" + text(row + 1, hi)


def _plot_relnorm(r: torch.Tensor, exclusive: float, labels: tuple[str, str], counts: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(r.numpy(), bins=50, range=(0, 1), color="#4c72b0")
    for t in (exclusive, 1 - exclusive):
        ax.axvline(t, color="k", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel(f"relative decoder norm |d_{labels[1]}| / (|d_{labels[0]}| + |d_{labels[1]}|)")
    ax.set_ylabel("live latents (log)")
    ax.set_title(f"{labels[0]}-only {counts['A-only']} | shared {counts['shared']} | {labels[1]}-only "
                 f"{counts['B-only']}  (dead {counts['dead']})")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_cosine(cos: torch.Tensor, labels: tuple[str, str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(cos.numpy(), bins=40, range=(-1, 1), color="#55a868")
    ax.set_xlabel(f"cosine(d_{labels[0]}, d_{labels[1]}) of shared latents")
    ax.set_ylabel("latents")
    med = float(cos.median()) if cos.numel() else float("nan")
    ax.set_title(f"{cos.numel()} shared latents, median cosine {med:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_kinds(rates: torch.Tensor, rows: list[str], cols: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(cols), 1.2 + 0.32 * len(rows)))
    im = ax.imshow(rates.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    fig.colorbar(im, ax=ax, label="firing rate")
    ax.set_title("firing rate per exchange kind : role")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(cfg) -> dict:
    """Run the report subcommand (cfg: crosscoder.Report); returns report.json's content."""
    from exgrpo_fast.model.loading import load_tokenizer

    rc = cfg.report
    root = Path(cfg.log.out_dir)
    device = resolve_device(rc.device)
    store, model, meta = load_pair(root, device)
    manifest = store.manifest
    la, lb = manifest["models"]["a"]["label"], manifest["models"]["b"]["label"]
    n_layers = len(manifest["layers"])
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)

    # 4x the candidates: dialogues share openings ("<|user|>Sam has"), so many top contexts read the same
    stats = scan(model, store, contexts=4 * rc.contexts, batch_size=rc.batch_size, max_tokens=rc.max_tokens)
    n_tok = stats["tokens"]
    freq = stats["fired"] / max(n_tok, 1)
    live = stats["fired"] > 0
    r = model.relative_norms(n_layers).cpu()
    cos = model.model_cosines(n_layers).cpu()
    cls = classify(r, rc.exclusive)
    counts = {c: int(sum(1 for i, k in enumerate(cls) if k == c and live[i])) for c in ("A-only", "shared", "B-only")}
    counts["dead"] = int((~live).sum())
    shared_live = torch.tensor([k == "shared" for k in cls]) & live
    _plot_relnorm(r[live], rc.exclusive, (la, lb), counts, out / "relative_norm.png")
    _plot_cosine(cos[shared_live], (la, lb), out / "shared_cosine.png")

    # top contexts of the most exclusive live latents
    tokenizer = load_tokenizer(manifest["models"]["a"]["path"])
    eligible = (live & (freq >= rc.min_frequency)).nonzero().flatten()
    order = eligible[r[eligible].argsort()]
    picks = {"A": order[: rc.top_latents].tolist(), "B": order.flip(0)[: rc.top_latents].tolist()}
    needed = {int(k) >> 32 for side in picks.values() for i in side for k in stats["top_key"][:, i].tolist()}
    shard_labels = {s: store.load(s, ("tokens", "doc", "pos")) for s in sorted(needed)}
    latents = {}
    for side, ids in picks.items():
        for i in ids:
            ctx, seen = [], set()
            for v, key in zip(stats["top_val"][:, i].tolist(), stats["top_key"][:, i].tolist()):
                if v <= 0 or len(ctx) == rc.contexts:
                    continue
                text = _context(tokenizer, shard_labels[key >> 32], key & 0xFFFFFFFF, rc.context_before,
                                rc.context_after)  # fmt: skip
                if text not in seen:
                    seen.add(text)
                    ctx.append({"act": v, "text": text})
            latents[i] = {"side": side, "r": float(r[i]), "cos": float(cos[i]), "freq": float(freq[i]),
                          "class": cls[i], "contexts": ctx}  # fmt: skip

    # per probe kind
    kinds = manifest["kinds"]
    segs = [f"{k}:{'asst' if role else 'user'}" for k in kinds for role in (0, 1)]
    seg_tokens = stats["seg_tokens"]
    present = (seg_tokens > 0).nonzero().flatten().tolist()
    rates = stats["seg_counts"] / seg_tokens.clamp_min(1)  # (F, G)
    kind_rows = {}
    for g in present:
        lift = rates[:, g] / freq.clamp_min(1e-12)
        ok = live & (stats["seg_counts"][:, g] >= 5) & (rates[:, g] >= 0.01)  # rare latents give noisy lifts
        cand = ok.nonzero().flatten()
        best = cand[lift[cand].argsort(descending=True)][:5].tolist()
        kind_rows[segs[g]] = [{"latent": i, "class": cls[i], "r": float(r[i]), "rate": float(rates[i, g]),
                               "lift": float(lift[i])} for i in best]  # fmt: skip
    class_share = {}
    for c in ("A-only", "shared", "B-only"):
        mask = torch.tensor([k == c for k in cls]) & live
        tot = stats["seg_counts"][mask].sum(0)
        class_share[c] = {segs[g]: float(tot[g] / tot.sum().clamp_min(1)) for g in present}
    token_share = {segs[g]: float(seg_tokens[g] / seg_tokens.sum()) for g in present}
    heat_ids = list(dict.fromkeys(picks["A"] + picks["B"] + [x["latent"] for v in kind_rows.values() for x in v[:1]]))
    if heat_ids:
        _plot_kinds(rates[heat_ids][:, present], [f"#{i} {cls[i]} r={r[i]:.2f}" for i in heat_ids],
                    [segs[g] for g in present], out / "kinds.png")  # fmt: skip

    summary = meta["summary"]
    result = {
        "models": manifest["models"], "layers": manifest["layers"], "tokens_scanned": n_tok,
        "train": summary, "counts": counts, "exclusive": rc.exclusive,
        "shared_cosine": {"n": int(shared_live.sum()),
                          "median": float(cos[shared_live].median()) if bool(shared_live.any()) else None,
                          "frac_above_0.9": float((cos[shared_live] > 0.9).float().mean()) if bool(shared_live.any())
                          else None},
        "relative_norm_hist": torch.histc(r[live], bins=10, min=0, max=1).tolist(),
        "latents": latents, "kinds": kind_rows, "class_share": class_share, "token_share": token_share,
    }  # fmt: skip
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(result, la, lb, source_names(manifest)))
    print(f"report | {n_tok} tokens | {la}-only {counts['A-only']} | shared {counts['shared']} | {lb}-only "
          f"{counts['B-only']} | dead {counts['dead']} | {out / 'report.md'}", flush=True)  # fmt: skip
    return result


def _markdown(res: dict, la: str, lb: str, names: list[str]) -> str:
    t, c = res["train"], res["counts"]
    name = {"A-only": f"{la}-only", "B-only": f"{lb}-only", "shared": "shared"}
    lines = [f"# Crosscoder report: {la} vs {lb}", ""]
    lines += [f"Models: {la} = `{res['models']['a']['path']}`, {lb} = `{res['models']['b']['path']}`; layers "
              f"{res['layers']}; {res['tokens_scanned']} tokens scanned.", ""]  # fmt: skip
    lines += ["| metric | value |", "| --- | --- |"]
    for n in names:
        lines.append(f"| FVE {n} (held-out) | {t['fve'][n]:.3f} |")
    lines += [f"| L0 (held-out, mean active latents per token) | {t['l0']:.1f} |",
              f"| dead fraction (no firing in the last train.dead_tokens tokens) | {t['dead_fraction']:.3f} |",
              f"| latents never firing in the report scan | {c['dead']} |", ""]  # fmt: skip
    e = res["exclusive"]
    rule = {"A-only": f"r < {e:g}", "B-only": f"r > {1 - e:g}", "shared": f"{e:g} <= r <= {1 - e:g}"}
    empty = [k for k in ("A-only", "shared", "B-only") if c[k] == 0]
    lines += ["## Relative decoder norm", "",
              f"r = |d_{lb}| / (|d_{la}| + |d_{lb}|) over live latents: **{la}-only ({rule['A-only']}) "
              f"{c['A-only']}**, **shared {c['shared']}**, **{lb}-only ({rule['B-only']}) {c['B-only']}**. Histogram "
              f"(10 bins, 0 to 1): {[int(x) for x in res['relative_norm_hist']]}."]  # fmt: skip
    if empty:
        lines += ["", "Empty classes (no live latent): " + ", ".join(f"{name[k]} ({rule[k]})" for k in empty) + "."]
    lines += ["", "![relative norm](relative_norm.png)", ""]
    sc = res["shared_cosine"]
    if sc["n"]:
        lines += ["## Decoder cosine of shared latents", "",
                  f"{sc['n']} shared latents: median cosine(d_{la}, d_{lb}) {sc['median']:.3f}, "
                  f"{100 * sc['frac_above_0.9']:.1f}% above 0.9.", "", "![cosine](shared_cosine.png)", ""]  # fmt: skip
    for side, label, lean in (("A", la, "lowest"), ("B", lb, "highest")):
        own = f"{side}-only"
        shown = [info for info in res["latents"].values() if info["side"] == side]
        n_own = sum(info["class"] == own for info in shown)
        lines += [f"## Latents leaning most to {label} ({lean} r): top contexts", ""]
        if not shown:
            lines.append("No live latent fires often enough to be shown here (report.min_frequency).")
        elif c[own] == 0:
            lines.append(f"No live latent is {label}-only ({rule[own]}): those below are the shared latents nearest "
                         "to it.")  # fmt: skip
        elif n_own < len(shown):
            verb = "is" if n_own == 1 else "are"
            lines.append(f"{n_own} of the {len(shown)} below {verb} {label}-only ({rule[own]}); the rest are shared.")
        else:
            lines.append(f"All {len(shown)} below are {label}-only ({rule[own]}).")
        lines += ["", "The activating token is in [[ ]]; `\\n` marks newlines.", ""]
        for i, info in res["latents"].items():
            if info["side"] != side:
                continue
            lines.append(f"- latent {i}: r {info['r']:.3f} ({name[info['class']]}), decoder cosine {info['cos']:.2f}, "
                         f"fires on {100 * info['freq']:.2f}% of tokens")  # fmt: skip
            for ctx in info["contexts"]:
                lines.append(f"  - {ctx['act']:.2f}: `{ctx['text']}`")
        lines.append("")
    lines += ["## Per probe kind", "",
              "Share of each class's firings on the tokens of each exchange kind (user prompt / assistant answer), "
              "against the share of tokens there:", "",
              "| kind:role | tokens | " + " | ".join(name[c] for c in ("A-only", "shared", "B-only")) + " |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for seg, share in res["token_share"].items():
        row = ["-" if c[k] == 0 else f"{100 * res['class_share'][k].get(seg, 0):.1f}%" for k in ("A-only", "shared",
                                                                                             "B-only")]  # fmt: skip
        lines.append(f"| {seg} | {100 * share:.1f}% | " + " | ".join(row) + " |")
    if empty:
        lines += ["", "A column of '-': the class is empty."]
    lines += ["", "Latents most specific to each kind:role (lift = rate there / overall rate; rate >= 1%):",
              ""]  # fmt: skip
    for seg, rows in res["kinds"].items():
        items = ", ".join(
            f"#{x['latent']} ({name[x['class']]}, r {x['r']:.2f}, rate {x['rate']:.2f}, lift {x['lift']:.1f})"
            for x in rows[:3]
        )
        lines.append(f"- {seg}: {items}")
    lines += ["", "![kinds](kinds.png)", ""]
    return "\n".join(lines)
