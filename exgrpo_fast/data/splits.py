"""The trainer's problems and held-out splits from its config: built-in tasks or user files (one place, so the
trainer and the eval CLI evaluate the same problems)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from exgrpo_fast.data.probes import write_probes_with_teacher
from exgrpo_fast.data.problem import Problem
from exgrpo_fast.data.sources import load_problems
from exgrpo_fast.data.tasks import builtin_splits

if TYPE_CHECKING:
    from exgrpo_fast.config import TrainConfig

__all__ = ["load_data"]


def load_data(cfg: TrainConfig, run_dir: Path) -> tuple[list[Problem], dict[str, list[Problem]]]:
    """(train problems, held-out splits) as plain lists: datasets only at the edges (files, the probe cache).
    Built-in: test_id and the data.ood_splits of data.tasks. data.train_path: test_id is min(data.n_test, rows // 5)
    rows drawn by a shuffle seeded with data.seed (the rest train, in file order). data.ood_path: its first
    data.n_test rows are test_ood (replacing the built-in one)."""
    if not cfg.data.train_path:
        splits = builtin_splits(cfg.data.n_train, cfg.data.n_test, seed=cfg.data.seed, ood_splits=cfg.data.ood_splits)
        train, held_out = splits.pop("train"), splits
    else:
        problems = _user_problems(cfg, cfg.data.train_path, run_dir)
        order = list(range(len(problems)))
        random.Random(f"{cfg.data.seed}-test_id").shuffle(order)
        test = set(order[: min(cfg.data.n_test, len(problems) // 5)])
        train = [p for i, p in enumerate(problems) if i not in test]
        held_out = {"test_id": [problems[i] for i in sorted(test)]}
    if cfg.data.ood_path:
        held_out["test_ood"] = _user_problems(cfg, cfg.data.ood_path, run_dir)[: cfg.data.n_test]
    return train, held_out


def _user_problems(cfg: TrainConfig, path: str, run_dir: Path) -> list[Problem]:
    """The problems of a user file (checked row by row, data.on_error), probes written by the teacher when missing."""
    problems = [Problem.from_dict(row) for row in load_problems(path, on_error=cfg.data.on_error)]
    if any(not p.probes for p in problems) and cfg.data.num_probes > 0:
        if not cfg.model.teacher_path:
            raise ValueError(f"{path}: problems without probes need model.teacher_path to write them")
        written = write_probes_with_teacher(
            problems, cfg.model.teacher_path, k=cfg.data.num_probes,
            cache_dir=cfg.data.cache_dir or str(run_dir / "probe_cache"), seed=cfg.data.seed,
        )  # fmt: skip
        problems = [Problem.from_dict(row) for row in written]  # the cache is a datasets.Dataset
    return problems
