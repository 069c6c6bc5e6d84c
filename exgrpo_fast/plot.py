"""Training curves from a run's metrics.jsonl: `python -m exgrpo_fast.plot RUN_DIR [--out DIR]`.

Writes one PNG per panel group (sft.png, grpo.png, eval.png) and overview.png with all panels, under RUN_DIR/plots.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PANELS = {
    "sft": [("loss", ["loss"]), ("grad norm", ["grad_norm"]), ("lr", ["lr"]), ("tokens/s", ["tok_per_s"])],
    "grpo": [
        ("reward", ["reward", "reward_task", "reward_probe", "reward_dsu", "reward_format"]),
        ("reward, trailing mean of 10 steps", ["reward~10", "acc~10"]),
        ("accuracy (rollouts)", ["acc", "probe_acc"]),
        ("reward std / zero-std groups", ["reward_std", "frac_zero_std"]),
        ("KL", ["kl_ref", "kl_teacher"]),
        ("entropy", ["entropy"]),
        ("clip fraction", ["clip_frac_low", "clip_frac_high"]),
        ("loss", ["loss"]),
        ("grad norm", ["grad_norm"]),
        ("time split (s)", ["t_rollout", "t_logp", "t_update"]),
        ("tokens/s", ["tok_per_s"]),
    ],
    "eval": [
        ("greedy accuracy", ["acc_id", "acc_ood", "probe_acc_id", "probe_acc_ood"]),
        ("greedy reward (held-out)", ["reward_id", "reward_ood"]),
    ],
}


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def _series(rows: list[dict], stage: str, key: str) -> tuple[list[float], list[float]]:
    """(x, y) of one metric of a stage; "name~N" is the trailing mean of name over N logged steps."""
    if "~" in key:
        name, n = key.split("~")
        xs, ys = _series(rows, stage, name)
        return xs, [sum(ys[max(0, i + 1 - int(n)) : i + 1]) / min(i + 1, int(n)) for i in range(len(ys))]
    xs, ys = [], []
    for i, r in enumerate(rows):
        if r.get("stage") != stage or not isinstance(r.get(key), (int, float)):
            continue
        x = r.get("global_step", r.get("step", i)) if stage == "eval" else r.get("step", i)
        xs.append(x)
        ys.append(r[key])
    return xs, ys


def _draw(ax, rows: list[dict], stage: str, title: str, keys: list[str]) -> bool:
    drawn = False
    for key in keys:
        xs, ys = _series(rows, stage, key)
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=key)
            drawn = True
    ax.set_title(f"{stage}: {title}", fontsize=9)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Render the PNGs; returns their paths."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    all_panels = [(stage, t, k) for stage, panels in PANELS.items() for t, k in panels]
    for stage, panels in [*PANELS.items(), ("overview", None)]:
        items = [(stage, t, k) for t, k in panels] if panels else all_panels
        cols = min(3, len(items))
        nrows = math.ceil(len(items) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
        for ax, (st, title, keys) in zip(axes.flat, items):
            _draw(ax, rows, st, title, keys)
        for ax in list(axes.flat)[len(items) :]:
            ax.axis("off")
        fig.suptitle(f"{run_dir.name}: {stage}")
        fig.tight_layout()
        path = out / f"{stage}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exgrpo_fast.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="run dir holding metrics.jsonl")
    p.add_argument("--out", default=None, help="output dir (default RUN_DIR/plots)")
    args = p.parse_args(argv)
    for path in plot_run(args.run_dir, args.out):
        print(path)


if __name__ == "__main__":
    main()
