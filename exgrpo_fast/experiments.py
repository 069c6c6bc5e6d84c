"""The paper's comparisons on the built-in task: `python -m exgrpo_fast.experiments paper`.

Rows (each over `seeds`, mean and 95% t-interval; columns: accuracy in-distribution and on each OOD shift, and
probe accuracy in-distribution):

    zero-shot                 the untrained student
    vanilla FT                SFT on question -> rationale + answer only (no probes), 100% of the problems
    EI SFT                    SFT on the Explanatory Inversion dialogues (question + probes)
    EI SFT + GRPO (no probes) stage 2 on the question only, task reward only
    EI SFT + ExGRPO [mode]    stage 2 on whole dialogues, one row per DSU mode (default: correct, coherent)
    EI SFT + ExGRPO @ f       the data-efficiency sweep: both stages on a fraction f of the training problems

Every cell is an ordinary `exgrpo_fast.train` run in its own folder under `<out_dir>/cells/`, and GRPO cells start
from the EI SFT checkpoint of the same seed and data fraction (trained once, shared). A finished cell leaves
`summary.json`; a rerun of the same command skips it, so the command is resumable and a crash loses one cell.
Results go to `<out_dir>/paper.md` (the table), `paper.json` (every number) and `paper.png` (a bar plot).

The CPU preset is sized to finish within ~45 minutes on 2 cores; the GPU preset uses the larger built-in student.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["Cell", "ExperimentConfig", "paper_cells", "mean_ci", "summarise", "paired_differences", "run_paper"]

# two-sided 95% quantiles of Student's t, by degrees of freedom (1..30); beyond 30 the normal 1.96 is close enough
# fmt: off
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
# fmt: on


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval) of per-seed values; half-width 0 for a single value."""
    if not values:
        raise ValueError("mean_ci needs at least one value")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return mean, 0.0
    df = len(values) - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


@dataclass
class ExperimentConfig:
    """The paper's comparisons on the built-in task (see the module docstring)."""

    preset: Literal["cpu", "gpu"] = "cpu"
    """cpu: the tiny student, sized for ~45 min on 2 cores; gpu: the larger built-in student on one GPU."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds; every row is reported as mean and 95% interval over them."""
    fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    """Fractions of the training problems in the data-efficiency sweep."""
    dsu_modes: tuple[str, ...] = ("correct", "coherent")
    """DSU modes compared in the ExGRPO rows (the first, the trainer's default, also runs the data-efficiency
    sweep). coherent_correct is left out by default: it equals correct whenever the main answer is right, the only
    case it scores (tested; measured identical to the digit), so its row would repeat correct's."""
    out_dir: str = "runs/paper"
    """Folder of the experiment (cells, table, plot); rerunning the command resumes it."""
    only: tuple[str, ...] = ()
    """Run only cells whose name contains one of these strings (empty = all)."""
    dry_run: bool = False
    """Print the plan (cells and their configs) without training."""
    grpo_steps: int = 0
    """ExGRPO steps of the GRPO cells; 0 = the preset's (cpu: 25)."""
    pretrained: str = ""
    """A pretrained student's local checkpoint (e.g. models/smollm2-135m from exgrpo_fast.model.convert): adds its
    zero-shot row (one eval per seed, same splits and config); "" = none."""
    workers: int = 0
    """Cells run at once, each in its own process; 0 = the preset's choice (cpu: one per core, up to 2; gpu: 1)."""
    threads: int = 0
    """torch threads per cell; 0 = the preset's choice (cpu: 1, so the table is the same on any machine; gpu: torch's
    default). Numbers depend on this (float sums), not on workers."""

    def __post_init__(self) -> None:
        import os

        if self.workers == 0:
            self.workers = 1 if self.preset == "gpu" else max(1, min(2, os.cpu_count() or 1))
        if self.threads == 0 and self.preset == "cpu":
            self.threads = 1


@dataclass
class Cell:
    """One training run: a name, the seed, dotted config overrides on top of the preset, and the SFT cell it starts
    from (None = trains its own SFT stage)."""

    name: str
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)
    start_from: str | None = None
    row: str = ""
    """The table row this cell contributes to (several seeds per row)."""
    zero_shot: bool = False
    """Its eval of the starting weights (summary untrained_*) is the seed's entry in the zero-shot row."""


def _preset_overrides(preset: str) -> dict[str, Any]:
    """Base overrides of the experiment's preset (on top of the trainer's cpu-default or gpu preset)."""
    if preset == "gpu":
        return {"preset": "gpu"}
    # 25 GRPO steps and evals only where the weights are new keep 3 seeds (36 cells) within ~45 min on 2 cores
    return {"preset": "cpu-default", "grpo.steps": 25, "log.eval_n": 200, "log.eval_every": 0,
            "data.ood_splits": ("test_ood_long", "test_ood_large"), "log.progress": False}  # fmt: skip


def paper_cells(cfg: ExperimentConfig, n_train: int) -> list[Cell]:
    """The grid of cells. SFT cells (grpo.steps = 0) are shared by the GRPO cells of the same seed and fraction."""
    cells: list[Cell] = []
    for seed in cfg.seeds:
        base = {"seed": seed, "data.seed": seed}
        sft_only = {**base, "grpo.steps": 0}
        # the zero-shot row is the vanilla FT cell's eval of the starting weights; other cells skip that eval
        cells.append(Cell(f"vanilla-ft-s{seed}", seed, {**sft_only, "sft.use_probes": False}, row="vanilla FT",
                          zero_shot=True))  # fmt: skip
        if cfg.pretrained:  # a real pretrained student, evaluated as it is (both stages 0 steps: one eval)
            name = Path(cfg.pretrained).name
            cells.append(Cell(f"zero-shot-{name}-s{seed}", seed, {**base, "model.path": cfg.pretrained,
                              "sft.steps": 0, "grpo.steps": 0}, row=f"zero-shot ({name})"))  # fmt: skip
        sft_only["log.eval_start"] = False
        for frac in cfg.fractions:
            n = max(16, int(round(n_train * frac)))
            tag = f"{int(round(frac * 100))}pct"
            sft = f"ei-sft-{tag}-s{seed}"
            cells.append(Cell(sft, seed, {**sft_only, "data.n_train": n}, row="EI SFT" if frac == 1.0 else ""))
            grpo = {**base, "data.n_train": n, "sft.steps": 0, "log.eval_start": False}
            if frac == 1.0:
                cells.append(Cell(f"grpo-no-probes-s{seed}", seed, {**grpo, "grpo.use_probes": False,
                                  "reward.probe_weight": 0.0, "reward.dsu_weight": 0.0}, start_from=sft,
                                  row="EI SFT + GRPO (no probes)"))  # fmt: skip
                for mode in cfg.dsu_modes:
                    cells.append(Cell(f"exgrpo-{mode}-s{seed}", seed, {**grpo, "reward.dsu_mode": mode},
                                      start_from=sft, row=f"EI SFT + ExGRPO [{mode}]"))  # fmt: skip
            else:
                mode = cfg.dsu_modes[0]
                cells.append(Cell(f"exgrpo-{mode}-{tag}-s{seed}", seed, {**grpo, "reward.dsu_mode": mode},
                                  start_from=sft, row=f"EI SFT + ExGRPO @ {tag} of the data"))  # fmt: skip
    if cfg.only:
        wanted = {c.name for c in cells if any(s in c.name for s in cfg.only)}
        # a GRPO cell needs its SFT cell
        wanted |= {c.start_from for c in cells if c.name in wanted and c.start_from}
        cells = [c for c in cells if c.name in wanted]
    return cells


def summarise(results: dict[str, dict], cells: list[Cell], *, zero_shot: dict[int, dict]) -> list[dict]:
    """Table rows: {"row", "n", metric: (mean, ci), ...} from each cell's final metrics (and the zero-shot evals)."""
    rows: dict[str, list[dict]] = {"zero-shot": list(zero_shot.values())}
    for c in cells:
        if c.row and c.name in results:
            rows.setdefault(c.row, []).append(results[c.name])
    table = []
    for name, runs in rows.items():
        if not runs:
            continue
        metrics = sorted({k for r in runs for k in r if k.startswith(("acc_", "probe_acc_"))})
        entry: dict[str, Any] = {"row": name, "n": len(runs)}
        for k in metrics:
            vals = [float(r[k]) for r in runs if k in r]
            entry[k] = mean_ci(vals)
        table.append(entry)
    return table


def paired_differences(results: dict[str, dict], cells: list[Cell], baseline: str) -> list[dict]:
    """Per-seed differences of each row's accuracies from the `baseline` row's (same seed: same problems, same
    initial model), mean and 95% interval over the seeds both have: the test for "better by more than the interval",
    tighter than comparing two rows' own intervals because seed-to-seed variation cancels."""
    by_row: dict[str, dict[int, dict]] = {}
    for c in cells:
        if c.row and c.name in results:
            by_row.setdefault(c.row, {})[c.seed] = results[c.name]
    base = by_row.get(baseline, {})
    table = []
    for row, runs in by_row.items():
        seeds = sorted(set(runs) & set(base))
        if row == baseline or not seeds:
            continue
        metrics = sorted(k for k in runs[seeds[0]] if k.startswith("acc_") and k in base[seeds[0]])
        entry: dict[str, Any] = {"row": f"{row} - {baseline}", "n": len(seeds)}
        for k in metrics:
            entry[k] = mean_ci([float(runs[s][k]) - float(base[s][k]) for s in seeds])
        table.append(entry)
    return table


def format_table(table: list[dict]) -> str:
    """Markdown: one row per method, `mean ± ci` per metric."""
    metrics = sorted({k for r in table for k in r if k not in ("row", "n")}, key=lambda k: (k.startswith("probe"), k))
    lines = ["| method | seeds | " + " | ".join(metrics) + " |", "| --- | --- |" + " --- |" * len(metrics)]
    for r in table:
        cells = [f"{r[k][0]:.3f} ± {r[k][1]:.3f}" if k in r else "-" for k in metrics]
        lines.append(f"| {r['row']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_table(table: list[dict], path: Path) -> None:
    """Grouped bars (one group per accuracy metric, one bar per method) with 95% interval whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({k for r in table for k in r if k.startswith("acc_")})
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(metrics)), 4.5))
    width = 0.8 / max(1, len(table))
    for i, r in enumerate(table):
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(xs, [r.get(k, (0, 0))[0] for k in metrics], width, yerr=[r.get(k, (0, 0))[1] for k in metrics],
               label=r["row"], capsize=2)  # fmt: skip
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics)
    ax.set_ylabel("greedy accuracy (mean, 95% interval over seeds)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_paper(cfg: ExperimentConfig, train_fn: Callable[..., dict] | None = None, build_cfg=None) -> list[dict]:
    """Run (or resume) every cell, then write paper.md / paper.json / paper.png. `train_fn(cfg, run_dir=...)` and
    `build_cfg(overrides) -> TrainConfig` default to the trainer's; tests pass fakes. With cfg.workers > 1 cells run
    in that many spawned processes (a GRPO cell once its SFT cell is done), each with cfg.threads torch threads and
    its console output in `<cell>/console.log`; the numbers do not depend on the worker count."""
    if train_fn is None or build_cfg is None:
        from exgrpo_fast.config import config_from_overrides
        from exgrpo_fast.train import train

        train_fn, build_cfg = train_fn or train, build_cfg or config_from_overrides
    out = Path(cfg.out_dir)
    base = _preset_overrides(cfg.preset)
    if cfg.grpo_steps:
        base["grpo.steps"] = cfg.grpo_steps  # SFT cells override it with 0
    n_train = build_cfg(dict(base)).data.n_train
    cells = paper_cells(cfg, n_train)
    if cfg.dry_run:
        for c in cells:
            print(f"{c.name:32s} from {c.start_from or '-':24s} {json.dumps(c.overrides)}")
        return []
    t0 = time.perf_counter()
    todo = [c for c in cells if not (out / "cells" / c.name / "summary.json").exists()]
    done_names = {c.name for c in cells} - {c.name for c in todo}
    print(f"paper: {len(cells)} cells, {len(todo)} to run, {cfg.workers} worker(s) x {cfg.threads} thread(s)")

    def job(c: Cell) -> tuple[Any, Path]:
        overrides = {**base, **c.overrides}
        if c.start_from:
            overrides["model.path"] = _sft_checkpoint(out / "cells" / c.start_from)
        _clear_unfinished(out / "cells" / c.name)
        return build_cfg(overrides), out / "cells" / c.name

    def report(c: Cell) -> None:
        summary = json.loads((out / "cells" / c.name / "summary.json").read_text())
        accs = " ".join(f"{k.removeprefix('final_')} {v:.3f}" for k, v in summary.items() if k.startswith("final_acc"))
        print(f"[{len(done_names)}/{len(cells)}] {c.name} done ({time.perf_counter() - t0:.0f}s) | {accs}", flush=True)

    if cfg.workers <= 1:
        _set_threads(cfg.threads)
        for c in todo:
            run_cfg, run_dir = job(c)
            train_fn(run_cfg, run_dir=str(run_dir))
            done_names.add(c.name)
            report(c)
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        pending, running = list(todo), {}
        with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as pool:
            while pending or running:
                ready = [c for c in pending if not c.start_from or c.start_from in done_names]
                for c in ready[: cfg.workers - len(running)]:
                    pending.remove(c)
                    run_cfg, run_dir = job(c)
                    running[pool.submit(_run_cell, train_fn, run_cfg, str(run_dir), cfg.threads)] = c
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    c = running.pop(f)
                    f.result()  # a failed cell stops the experiment (finished cells stay; a rerun resumes)
                    done_names.add(c.name)
                    report(c)
    results: dict[str, dict] = {}
    zero_shot: dict[int, dict] = {}
    for c in cells:
        summary = json.loads((out / "cells" / c.name / "summary.json").read_text())
        results[c.name] = {k.removeprefix("final_"): v for k, v in summary.items() if k.startswith("final_")}
        if c.zero_shot and any(k.startswith("untrained_") for k in summary):
            zero_shot[c.seed] = {k.removeprefix("untrained_"): v for k, v in summary.items()
                                 if k.startswith("untrained_")}  # fmt: skip
    table = summarise(results, cells, zero_shot=zero_shot)
    paired = {b: paired_differences(results, cells, b) for b in ("vanilla FT", "EI SFT")}
    text = format_table(table)
    for b, rows in paired.items():
        if rows:
            text += f"\nPaired by seed, difference from {b} (mean ± 95% interval):\n\n" + format_table(rows)
    (out / "paper.md").write_text(text)
    (out / "paper.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "rows": table, "paired": paired,
                                                "cells": results}, indent=2) + "\n")  # fmt: skip
    plot_table(table, out / "paper.png")
    print(text)
    return table


def _set_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def _run_cell(train_fn: Callable[..., dict], run_cfg: Any, run_dir: str, threads: int) -> None:
    """One cell in a worker process: fixed torch threads, console output to <run_dir>/console.log."""
    import contextlib

    _set_threads(threads)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / "console.log", "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        train_fn(run_cfg, run_dir=run_dir)


def _clear_unfinished(cell_dir: Path) -> None:
    """A cell without summary.json that ran before (killed, failed) starts again from scratch: its run files are
    removed, since the trainer refuses a run dir that already holds a run (console.log stays, appended to)."""
    import shutil

    from exgrpo_fast.rundir import run_contents

    for name in run_contents(cell_dir):
        path = cell_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _sft_checkpoint(cell_dir: Path) -> str:
    """The SFT stage's final checkpoint inside an SFT cell's run directory."""
    ckpts = sorted((cell_dir / "checkpoints").glob("sft-*"))
    if not ckpts:
        raise FileNotFoundError(f"{cell_dir} has no SFT checkpoint: run its cell first")
    return str(ckpts[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    import tyro

    cfg = tyro.extras.subcommand_cli_from_dict({"paper": ExperimentConfig}, args=argv, use_underscores=True)
    return run_paper(cfg)


if __name__ == "__main__":
    main()
