"""The paper harness: the grid, resumability, intervals and the table, with a fake trainer (the real one is slow)."""

import json
import types
from pathlib import Path

import pytest

from exgrpo_fast.experiments import ExperimentConfig, mean_ci, paper_cells, run_paper


def test_mean_ci():
    assert mean_ci([0.5]) == (0.5, 0.0)
    mean, half = mean_ci([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2)
    assert half == pytest.approx(4.303 * 0.1 / 3**0.5)
    with pytest.raises(ValueError):
        mean_ci([])


def test_grid_shares_sft_and_covers_the_rows():
    cfg = ExperimentConfig(seeds=(0, 1, 2))
    cells = paper_cells(cfg, 2048)
    names = {c.name for c in cells}
    for c in cells:
        if c.start_from:
            assert c.start_from in names and c.overrides["sft.steps"] == 0
    rows = {c.row for c in cells if c.row}
    assert {"vanilla FT", "EI SFT", "EI SFT + GRPO (no probes)"} <= rows
    assert {f"EI SFT + ExGRPO [{m}]" for m in cfg.dsu_modes} <= rows
    assert sum(r.startswith("EI SFT + ExGRPO @") for r in rows) == 3  # 10, 25, 50 %
    assert len(cells) == 3 * (1 + 4 + 1 + len(cfg.dsu_modes) + 3)
    pre = paper_cells(ExperimentConfig(seeds=(0, 1), pretrained="models/smollm2-135m"), 2048)
    zs = [c for c in pre if c.row == "zero-shot (smollm2-135m)"]
    assert len(zs) == 2 and all(c.overrides["model.path"] == "models/smollm2-135m" for c in zs)
    assert all(c.overrides["sft.steps"] == c.overrides["grpo.steps"] == 0 and not c.zero_shot for c in zs)
    only = paper_cells(ExperimentConfig(seeds=(0,), only=("grpo-no-probes",)), 2048)
    assert [c.name for c in only] == ["ei-sft-100pct-s0", "grpo-no-probes-s0"]


def _fake(tmp_path):
    calls = []

    def build_cfg(overrides):
        return types.SimpleNamespace(
            data=types.SimpleNamespace(n_train=overrides.get("data.n_train", 64)), overrides=overrides
        )

    def train_fn(cfg, run_dir):
        calls.append(run_dir)
        o = cfg.overrides
        acc = 0.1 * o["seed"] + (0.3 if o.get("sft.steps") == 0 else 0.2)
        from pathlib import Path

        d = Path(run_dir)
        (d / "checkpoints" / "sft-000010").mkdir(parents=True)
        (d / "summary.json").write_text(
            json.dumps({"final_acc_id": acc, "final_probe_acc_id": acc / 2, "untrained_acc_id": 0.0, "wall_s": 1.0})
        )

    return calls, build_cfg, train_fn


def test_run_paper_writes_table_and_resumes(tmp_path):
    calls, build_cfg, train_fn = _fake(tmp_path)
    cfg = ExperimentConfig(seeds=(0, 1), fractions=(0.5, 1.0), dsu_modes=("correct",), out_dir=str(tmp_path), workers=1)
    table = run_paper(cfg, train_fn, build_cfg)
    n_cells = len(calls)
    assert n_cells == 2 * (1 + 2 + 1 + 1 + 1)
    by_row = {r["row"]: r for r in table}
    assert by_row["zero-shot"]["acc_id"] == (0.0, 0.0)
    mean, half = by_row["EI SFT"]["acc_id"]
    assert mean == pytest.approx(0.25) and half == pytest.approx(12.706 * (0.1 / 2**0.5) / 2**0.5)
    assert by_row["EI SFT + ExGRPO [correct]"]["acc_id"][0] == pytest.approx(0.35)
    # paired by seed: every seed's GRPO cell is 0.1 above its EI SFT cell (0.3 vs 0.2 + 0.1 * seed), so the paired
    # interval is 0 while the rows' own intervals are wide
    paired = json.loads((tmp_path / "paper.json").read_text())["paired"]["EI SFT"]
    diff = {r["row"]: r for r in paired}["EI SFT + ExGRPO [correct] - EI SFT"]
    assert diff["n"] == 2 and diff["acc_id"][0] == pytest.approx(0.1) and diff["acc_id"][1] == pytest.approx(0.0)
    text = (tmp_path / "paper.md").read_text()
    assert "difference from vanilla FT" in text
    assert "| EI SFT + ExGRPO [correct] | 2 |" in text
    assert (tmp_path / "paper.png").stat().st_size > 1000
    # resumable: a second call trains nothing and gives the same table
    assert run_paper(cfg, train_fn, build_cfg) == table
    assert len(calls) == n_cells


def test_an_unfinished_cell_starts_again_in_a_clean_dir(tmp_path):
    """A cell killed mid-run (files, no summary.json) reruns from scratch: the trainer refuses a run dir holding a
    run, so its files go first (its console.log stays)."""
    calls, build_cfg, train_fn = _fake(tmp_path)
    seen = {}

    def checking_train_fn(cfg, run_dir):
        seen[run_dir] = sorted(p.name for p in Path(run_dir).iterdir()) if Path(run_dir).exists() else []
        train_fn(cfg, run_dir)

    cfg = ExperimentConfig(seeds=(0,), fractions=(1.0,), dsu_modes=("correct",), out_dir=str(tmp_path), workers=1)
    cell = tmp_path / "cells" / "vanilla-ft-s0"
    (cell / "checkpoints" / "sft-000003").mkdir(parents=True)
    (cell / "metrics.jsonl").write_text("{}\n")
    (cell / "console.log").write_text("killed\n")
    run_paper(cfg, checking_train_fn, build_cfg)
    assert seen[str(cell)] == ["console.log"]
    assert (cell / "console.log").read_text() == "killed\n" and (cell / "summary.json").is_file()


def test_every_cell_is_a_valid_trainer_config():
    """The grid's overrides name real config fields with valid values (the fakes above would not notice)."""
    from exgrpo_fast.config import config_from_overrides
    from exgrpo_fast.experiments import _preset_overrides

    for preset in ("cpu", "gpu"):
        for c in paper_cells(ExperimentConfig(preset=preset), 2048):
            overrides = {**_preset_overrides(preset), **c.overrides}
            if c.start_from:
                overrides["model.path"] = "somewhere/sft-000150"
            cfg = config_from_overrides(overrides)
            assert cfg.seed == c.seed


def _picklable_fake_train(cfg, run_dir):
    """A module-level fake trainer (worker processes import it): records the torch threads it ran with."""
    from pathlib import Path

    import torch

    o = cfg.overrides
    d = Path(run_dir)
    (d / "checkpoints" / "sft-000010").mkdir(parents=True)
    acc = 0.1 * o["seed"] + (0.3 if o.get("sft.steps") == 0 else 0.2)
    summary = {"final_acc_id": acc, "threads": torch.get_num_threads(), "start_from": o.get("model.path", "")}
    if not o.get("model.path"):
        summary["untrained_acc_id"] = 0.0
    (d / "summary.json").write_text(json.dumps(summary))
    print("console line of", d.name)


def _fake_build(overrides):
    return types.SimpleNamespace(data=types.SimpleNamespace(n_train=64), overrides=overrides)


def test_workers_run_cells_in_processes_after_their_sft_cell(tmp_path):
    """workers=2: every cell runs in a spawned process with the requested threads, its console in console.log, a
    GRPO cell only once its SFT checkpoint exists; the table equals the one-worker run's."""
    kw = dict(seeds=(0, 1), fractions=(0.5, 1.0), dsu_modes=("correct",), threads=1)
    table = run_paper(
        ExperimentConfig(out_dir=str(tmp_path / "a"), workers=2, **kw), _picklable_fake_train, _fake_build
    )
    cells = sorted((tmp_path / "a" / "cells").iterdir())
    assert len(cells) == 2 * (1 + 2 + 1 + 1 + 1)
    for d in cells:
        summary = json.loads((d / "summary.json").read_text())
        assert summary["threads"] == 1
        assert (d / "console.log").read_text().strip() == f"console line of {d.name}"
        if summary["start_from"]:
            assert summary["start_from"].startswith(str(tmp_path / "a" / "cells" / "ei-sft-"))
    serial = run_paper(
        ExperimentConfig(out_dir=str(tmp_path / "b"), workers=1, **kw), _picklable_fake_train, _fake_build
    )
    assert serial == table


def test_cells_skip_evals_of_weights_already_evaluated():
    """Only the vanilla FT cell evaluates the starting weights (the zero-shot row); other cells start from weights
    evaluated elsewhere."""
    for c in paper_cells(ExperimentConfig(seeds=(0,)), 2048):
        assert c.overrides.get("log.eval_start", True) == c.name.startswith("vanilla-ft"), c.name


def test_grpo_steps_option_reaches_grpo_cells_only(tmp_path):
    seen = {}

    def train_fn(cfg, run_dir):
        seen[Path(run_dir).name] = cfg.overrides["grpo.steps"]
        _picklable_fake_train(cfg, run_dir)

    cfg = ExperimentConfig(seeds=(0,), fractions=(1.0,), dsu_modes=("correct",), out_dir=str(tmp_path), workers=1,
                           grpo_steps=60)  # fmt: skip
    run_paper(cfg, train_fn, _fake_build)
    assert seen == {"vanilla-ft-s0": 0, "ei-sft-100pct-s0": 0, "grpo-no-probes-s0": 60, "exgrpo-correct-s0": 60}
