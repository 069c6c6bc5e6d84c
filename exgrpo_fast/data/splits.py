"""The trainer's problems and held-out splits from its config: built-in tasks or user files (one place, so the
trainer and the eval CLI evaluate the same problems).

What it does to user data, each logged as a warning with counts:
- probe order (data.probe_order): "hygienic" asks every problem's probes in dialogue order (data.problem.
  dialogue_probes); the problems whose stored order that changes are counted. "raw" marks every problem to keep its
  stored order, and says how many of them then ask a probe after one that gives its answer away.
- duplicates: questions that appear more than once in data.train_path or data.ood_path (same text up to case and
  whitespace) are counted (kept: a file may repeat a question on purpose);
- overlap: training problems whose question is also in a held-out split (test_id, drawn from data.train_path, or
  test_ood) are removed from training, so no held-out question is ever trained on; a run left with no training
  problem is refused (DataError).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from exgrpo_fast.data.probes import write_probes_with_teacher
from exgrpo_fast.data.problem import Problem, needs_reorder
from exgrpo_fast.data.sources import load_problems
from exgrpo_fast.data.tasks import builtin_splits
from exgrpo_fast.errors import DataError

if TYPE_CHECKING:
    from exgrpo_fast.config import TrainConfig

__all__ = ["drop_overlap", "duplicate_questions", "load_data", "require_training", "split_test_id"]

log = logging.getLogger(__name__)
P = TypeVar("P", Problem, dict)


def load_data(cfg: TrainConfig, run_dir: Path) -> tuple[list[Problem], dict[str, list[Problem]]]:
    """(train problems, held-out splits) as plain lists: datasets only at the edges (files, the probe cache).
    Built-in: test_id and the data.ood_splits of data.tasks. data.train_path: test_id is min(data.n_test, rows // 5)
    rows drawn by a shuffle seeded with data.seed (the rest train, in file order). data.ood_path: its first
    data.n_test rows are test_ood (replacing the built-in one). Then duplicates are reported and the training
    problems whose question is held out are removed (module docstring)."""
    if not cfg.data.train_path:
        splits = builtin_splits(cfg.data.n_train, cfg.data.n_test, seed=cfg.data.seed, ood_splits=cfg.data.ood_splits)
        train, held_out = splits.pop("train"), splits
    else:
        problems = _user_problems(cfg, cfg.data.train_path, run_dir, "data.train_path")
        train, test = split_test_id(problems, cfg.data.n_test, cfg.data.seed)
        held_out = {"test_id": test}
    if cfg.data.ood_path:
        held_out["test_ood"] = _user_problems(cfg, cfg.data.ood_path, run_dir, "data.ood_path")[: cfg.data.n_test]
    train, removed = drop_overlap(train, held_out)
    if removed:
        counts = ", ".join(f"{n} in {split}" for split, n in removed.items())
        log.warning("data: %d training problem(s) removed: their question is held out (%s)", sum(removed.values()),
                    counts)  # fmt: skip
    require_training(train, cfg.data.train_path or "built-in tasks")
    return train, held_out


def require_training(train: Sequence, source: str | Path) -> None:
    """DataError naming `source` when no training problem is left once the held-out questions are removed (the
    trainer here, validate before anything is created)."""
    if not train:
        raise DataError(source, "", "no training problem left: every question is also in a held-out split (is "
                        "data.ood_path the training file?)")  # fmt: skip


def split_test_id(problems: Sequence[P], n_test: int, seed: int) -> tuple[list[P], list[P]]:
    """(train, test_id) of a user file: min(n_test, len // 5) problems drawn by a shuffle seeded with seed (kept in
    file order), the rest train."""
    order = list(range(len(problems)))
    random.Random(f"{seed}-test_id").shuffle(order)
    test = set(order[: min(n_test, len(problems) // 5)])
    return [p for i, p in enumerate(problems) if i not in test], [problems[i] for i in sorted(test)]


def question_key(question: str) -> str:
    """What makes two questions the same: their text up to case and runs of whitespace."""
    return " ".join(question.split()).casefold()


def _question(p: Problem | Mapping) -> str:
    return p["question"] if isinstance(p, Mapping) else p.question


def drop_overlap(train: list[P], held_out: Mapping[str, Sequence[P]]) -> tuple[list[P], dict[str, int]]:
    """(train without the problems whose question is in a held-out split, {split: problems removed for it})."""
    where = {}
    for split, problems in held_out.items():
        for p in problems:
            where.setdefault(question_key(_question(p)), split)
    if not where:
        return train, {}
    kept, removed = [], {}
    for p in train:
        split = where.get(question_key(_question(p)))
        if split is None:
            kept.append(p)
        else:
            removed[split] = removed.get(split, 0) + 1
    return (kept, removed) if removed else (train, {})


def duplicate_questions(problems: Sequence[Problem | Mapping]) -> tuple[int, int, int, tuple[int, int] | None]:
    """(questions that appear more than once, rows that repeat an earlier one, of those with another answer, the
    first pair of indices). Memory: one 8-byte digest per distinct question (texts compared exactly on a match)."""
    first: dict[bytes, int] = {}
    repeated: set[int] = set()
    extra = conflicting = 0
    example = None
    for i, p in enumerate(problems):
        key = question_key(_question(p))
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        j = first.setdefault(digest, i)
        if j == i or question_key(_question(problems[j])) != key:
            continue  # new (or a digest collision: counted as distinct)
        extra += 1
        repeated.add(j)
        conflicting += _answer(problems[j]) != _answer(p)
        example = example or (j, i)
    return len(repeated), extra, conflicting, example


def _answer(p: Problem | Mapping) -> str:
    return str(p["answer"] if isinstance(p, Mapping) else p.answer)


def _user_problems(cfg: TrainConfig, path: str, run_dir: Path, name: str) -> list[Problem]:
    """The problems of a user file (checked row by row, data.on_error; each row's text bounded by data.token_budget),
    probes written by the teacher when missing, probe order and duplicates logged."""
    rows = load_problems(path, on_error=cfg.data.on_error, token_budget=cfg.data.token_budget)
    problems = [Problem.from_dict(row) for row in rows]
    del rows
    if any(not p.probes for p in problems) and cfg.data.num_probes > 0:
        if not cfg.model.teacher_path:
            raise ValueError(f"{path}: problems without probes need model.teacher_path to write them")
        written = write_probes_with_teacher(
            problems, cfg.model.teacher_path, k=cfg.data.num_probes,
            cache_dir=cfg.data.cache_dir or str(run_dir / "probe_cache"), seed=cfg.data.seed,
        )  # fmt: skip
        problems = [Problem.from_dict(row) for row in written]  # the cache is a datasets.Dataset
    out_of_order = sum(needs_reorder(p) for p in problems)
    if cfg.data.probe_order == "raw":
        for p in problems:
            p.probe_order = "raw"
        log.warning("%s=%s: data.probe_order=raw: probes are asked as stored; %d of %d problems then ask a probe "
                    "after one that gives its answer away (an inverse or explain probe first)", name, path,
                    out_of_order, len(problems))  # fmt: skip
    elif out_of_order:
        log.warning("%s=%s: %d of %d problems ask their probes in another order than stored (probe hygiene: an "
                    "inverse probe after the counterfactual / step / verify ones, explain last; data.probe_order=raw "
                    "keeps the stored order)", name, path, out_of_order, len(problems))  # fmt: skip
    repeated, extra, conflicting, example = duplicate_questions(problems)
    if repeated:
        a, b = example
        log.warning("%s=%s: %d question(s) appear more than once (%d repeated rows, %d with another answer), e.g. "
                    "problems %r and %r", name, path, repeated, extra, conflicting, problems[a].id,
                    problems[b].id)  # fmt: skip
    return problems
