"""Results tables (one run, or mean and 95% interval over seeds), rationale pictures and training curves.

`python -m exgrpo_fast.rekd.report RUN_DIR [RUN_DIR ...]` prints the markdown table of the runs' results.json
(one run: its rows; several: mean +- 95% t-interval half-width per model and metric).
"""

from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches as mpatches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

METRICS = ("acc", "rationale_f1", "sparsity")
MODELS = ("teacher", "student_re", "student_rekd")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def markdown_table(rows: list[dict]) -> str:
    """One run's rows as a markdown table."""
    lines = ["| model | params | acc | rationale F1 | sparsity |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r.get('params', 0) / 1e6:.2f}M | {_fmt(r['acc'])} | {_fmt(r['rationale_f1'])} "
            f"| {_fmt(r['sparsity'])} |"
        )
    return "\n".join(lines)


# two-sided 95% Student-t quantiles by degrees of freedom (scipy-free)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (0 for one value)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()), 0.0
    t = _T95.get(len(x) - 1, 1.96)
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(len(x)))


def aggregate(results: list[dict]) -> list[dict]:
    """Per model, {metric: (mean, half-width)} over a list of results.json contents (one per seed)."""
    out = []
    for m in MODELS:
        rows = [r for res in results for r in res["rows"] if r["model"] == m]
        if not rows:
            continue
        agg = {"model": m, "n": len(rows)}
        for k in METRICS:
            vals = [r[k] for r in rows if r[k] is not None]
            agg[k] = mean_ci(vals) if vals else None
        out.append(agg)
    return out


def aggregate_table(agg: list[dict]) -> str:
    cell = lambda v: "n/a" if v is None else f"{v[0]:.3f} ± {v[1]:.3f}"  # noqa: E731
    lines = ["| model | seeds | acc | rationale F1 | sparsity |", "| --- | ---: | ---: | ---: | ---: |"]
    for a in agg:
        lines.append(
            f"| {a['model']} | {a['n']} | {cell(a['acc'])} | {cell(a['rationale_f1'])} | {cell(a['sparsity'])} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# pictures


def text_html(
    words: list[list[str]],
    labels: list[int],
    label_names: list[str],
    masks: dict[str, torch.Tensor],
    gold: list[set[int]] | None,
) -> str:
    """HTML: per example one line per model, selected words highlighted, gold words underlined and bold."""
    style = (
        "body{font-family:sans-serif;max-width:70em}"
        ".sel{background:#ffd54f;border-radius:3px}.gold{text-decoration:underline;font-weight:bold}"
        "td{padding:2px 8px;vertical-align:top}td.m{color:#555;white-space:nowrap}"
    )
    parts = [
        f"<html><head><meta charset='utf-8'><style>{style}</style></head><body>",
        "<h2>Rationales: selected words (highlighted) vs gold cues (underlined, bold)</h2>",
    ]
    for i, ws in enumerate(words):
        parts.append(f"<h4>example {i}: label {html.escape(label_names[labels[i]])}</h4><table>")
        for name, mk in masks.items():
            toks = []
            for j, w in enumerate(ws):
                cls = []
                if j < mk.shape[1] and bool(mk[i, j]):
                    cls.append("sel")
                if gold is not None and j in gold[i]:
                    cls.append("gold")
                t = html.escape(w)
                toks.append(f"<span class='{' '.join(cls)}'>{t}</span>" if cls else t)
            parts.append(f"<tr><td class='m'>{name}</td><td>{' '.join(toks)}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def image_grid(
    images: torch.Tensor,
    labels: list[int],
    masks: dict[str, torch.Tensor],
    gold: torch.Tensor | None,
    patch_size: int,
    path: Path,
) -> None:
    """PNG grid: rows = examples, columns = gold + one per model; selected patches outlined."""
    cols = (["gold"] if gold is not None else []) + list(masks)
    n = len(images)
    fig, axes = plt.subplots(n, len(cols), figsize=(2.2 * len(cols), 2.2 * n), squeeze=False)
    g = images.shape[-1] // patch_size
    for i in range(n):
        img = images[i].float()
        img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
        for c, name in enumerate(cols):
            ax = axes[i][c]
            ax.imshow(img.numpy(), cmap="gray", vmin=float(img.min()), vmax=float(img.max()))
            m = gold[i] if name == "gold" else masks[name][i]
            color = "#00e676" if name == "gold" else "#ff1744"
            for p in torch.nonzero(m).flatten().tolist():
                r, q = divmod(p, g)
                ax.add_patch(
                    mpatches.Rectangle(
                        (q * patch_size - 0.5, r * patch_size - 0.5),
                        patch_size,
                        patch_size,
                        fill=False,
                        edgecolor=color,
                        linewidth=2.5,
                    )
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=10)
            if c == 0:
                ax.set_ylabel(f"class {labels[i]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def rationale_pictures(prep, masks: dict[str, torch.Tensor], run_dir: Path, n: int, seed: int = 0) -> list[Path]:
    """rationales.html (text) or rationales.png (image) for n sampled test examples."""
    total = len(prep.test["labels"])
    idx = sorted(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False).tolist())
    labels = [int(prep.test["labels"][i]) for i in idx]
    sub = {k: v[idx] for k, v in masks.items()}
    if prep.task == "text":
        raw = prep.test_raw
        gold = None if raw.gold is None else [raw.gold[i] for i in idx]
        path = run_dir / "rationales.html"
        path.write_text(text_html([raw.words[i] for i in idx], labels, prep.label_names, sub, gold))
    else:
        gold = prep.test.get("gold")
        path = run_dir / "rationales.png"
        images = prep.test["pixel_values"][idx]
        patch = images.shape[-1] // int(round(math.sqrt(next(iter(masks.values())).shape[1])))
        image_grid(images, labels, sub, None if gold is None else gold[idx], patch, path)
    return [path]


def plot_metrics(metrics_path: Path, out: Path) -> Path:
    """plot.png: loss, CE, batch accuracy, selected fraction, KD and rationale loss per training step and stage."""
    rows = [json.loads(x) for x in Path(metrics_path).read_text().splitlines() if x.strip()]
    panels = [
        ("loss", "loss"),
        ("ce", "cross-entropy"),
        ("acc", "batch accuracy (sampled masks)"),
        ("sel_frac", "selected fraction"),
        ("kd", "KD (T^2 KL)"),
        ("rationale", "rationale BCE"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        for stage in MODELS:
            pts = [(r["step"], r[key]) for r in rows if r.get("stage") == stage and key in r]
            if pts:
                ax.plot(*zip(*pts), label=stage)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m exgrpo_fast.rekd.report RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        raise SystemExit(2)
    results = [json.loads((Path(d) / "results.json").read_text()) for d in argv]
    if len(results) == 1:
        print(markdown_table(results[0]["rows"]))
    else:
        print(aggregate_table(aggregate(results)))


if __name__ == "__main__":
    main()
