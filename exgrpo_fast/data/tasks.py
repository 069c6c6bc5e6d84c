"""The built-in task: multi-step arithmetic word problems with a symbolic teacher.

A problem is a chain: a start amount, then +n / -n steps ("Tom has 3 apples. He gets 4 more. He gives away 2.
How many apples does Tom have?"). The symbolic teacher knows the chain, so it writes an exact step-by-step rationale
("3+4=7. 7-2=5.") and exact explanatory probes (DESIGN.md section 5):

    inverse         hide the start amount, state the final one, ask for the start
    counterfactual  change the start amount, ask for the new final amount
    step            ask for the amount after an intermediate step
    verify          is this candidate final amount right? (yes / no, both occur)
    explain         free text: why the answer holds (SFT only: not checkable)

Splits: "train" and "test_id" share one distribution and are disjoint (a hash of the chain decides which split
may hold it); "test_ood" has longer chains and larger numbers. Everything is a pure function of (split, seed, cfg).

Problems are exgrpo_fast.data.problem.Problem: meta is the JSON of the chain and the probe parameters, from which
every answer can be recomputed (recompute_probe_answer). `builtin_splits` gives plain lists for the trainer;
`builtin_dataset` the same problems as a datasets.DatasetDict (an edge: saving, sharing, the Hub format).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from exgrpo_fast.data.problem import (  # noqa: F401 - the dialogue helpers are re-exported for callers of this module
    ANSWER_PREFIX,
    CHECKABLE,
    PROBE_KINDS,
    REVEALS_FINAL,
    Probe,
    Problem,
    checkable_probes,
    format_answer,
    hygienic_order,
    problem_rows,
    rollout_user_turns,
    sft_dialogue,
)

if TYPE_CHECKING:
    from datasets import DatasetDict

NAMES = ("Tom", "Ann", "Bob", "Eve", "Sam", "Mia", "Leo", "Ida")
PRONOUNS = {"Tom": "He", "Bob": "He", "Sam": "He", "Leo": "He", "Ann": "She", "Eve": "She", "Mia": "She", "Ida": "She"}
ITEMS = ("apples", "pens", "cards", "coins", "books", "shells")


@dataclass
class ArithConfig:
    """Difficulty of the built-in task."""

    id_steps: tuple[int, int] = (1, 2)
    """Range (inclusive) of the number of +/- steps in train / test_id problems."""
    id_max_operand: int = 9
    """Largest start amount and step operand in train / test_id problems."""
    ood_steps: tuple[int, int] = (3, 4)
    """Range (inclusive) of the number of steps in test_ood problems (longer chains)."""
    ood_max_operand: int = 30
    """Largest operand in test_ood problems (larger numbers)."""
    num_probes: int = 2
    """Checkable probes per problem (kinds drawn without replacement from inverse/counterfactual/step/verify)."""
    include_explain: bool = True
    """Also add an `explain` probe (free text, used by SFT only)."""
    test_fraction: int = 10
    """1 in test_fraction of all ID chains is reserved for test_id (never appears in train)."""
    probe_kinds: tuple[str, ...] = field(default=CHECKABLE)
    """Checkable kinds to draw from."""

    def __post_init__(self) -> None:
        for name in ("id_steps", "ood_steps"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"ArithConfig.{name}={getattr(self, name)}: expected 1 <= low <= high")
        if self.id_max_operand < 2 or self.ood_max_operand < 2:
            raise ValueError("ArithConfig.id_max_operand and ood_max_operand must be >= 2")
        bad = set(self.probe_kinds) - set(CHECKABLE)
        if bad:
            raise ValueError(f"ArithConfig.probe_kinds has unknown kinds {sorted(bad)}; expected some of {CHECKABLE}")
        if not 0 <= self.num_probes <= len(self.probe_kinds):
            raise ValueError(f"ArithConfig.num_probes={self.num_probes}: expected 0..{len(self.probe_kinds)}")
        if self.test_fraction < 2:
            raise ValueError("ArithConfig.test_fraction must be >= 2")


# ----------------------------------------------------------------------------------------------------------------
# the chain and its symbolic teacher


def run_chain(start: int, ops: list[list]) -> list[int]:
    """Amounts after each step: [start, x1, ..., xn]."""
    values = [start]
    for op, n in ops:
        values.append(values[-1] + n if op == "+" else values[-1] - n)
    return values


def _step_text(name: str, op: str, n: int) -> str:
    return f"{PRONOUNS[name]} gets {n} more." if op == "+" else f"{PRONOUNS[name]} gives away {n}."


def _question(name: str, item: str, start: int | None, ops: list[list]) -> str:
    have = f"{name} has {start} {item}." if start is not None else f"{name} has some {item}."
    return " ".join([have] + [_step_text(name, op, n) for op, n in ops])


def _rationale(values: list[int], ops: list[list]) -> str:
    return " ".join(f"{values[i]}{op}{n}={values[i + 1]}." for i, (op, n) in enumerate(ops))


def _sample_chain(rng: random.Random, steps: tuple[int, int], max_operand: int) -> tuple[int, list[list]]:
    start = rng.randint(1, max_operand)
    ops, value = [], start
    for _ in range(rng.randint(*steps)):
        if value > 1 and rng.random() < 0.5:
            n = rng.randint(1, min(value - 1, max_operand))  # never below 1: keeps the story sensible
            ops.append(["-", n])
            value -= n
        else:
            n = rng.randint(1, max_operand)
            ops.append(["+", n])
            value += n
    return start, ops


def _chain_key(name: str, item: str, start: int, ops: list[list]) -> int:
    text = json.dumps([name, item, start, ops])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def write_probes(rng: random.Random, meta: dict, cfg: ArithConfig) -> list[Probe]:
    """The symbolic teacher: exact probes for the chain in meta, cfg.num_probes checkable kinds drawn without
    replacement (plus explain when cfg.include_explain). Each probe's parameters (the changed start, the step, the
    candidate) are recorded in meta["probes"], so every answer can be recomputed from meta."""
    name, item, start, ops = meta["name"], meta["item"], meta["start"], meta["ops"]
    pronoun = PRONOUNS[name].lower()
    values = run_chain(start, ops)
    final = values[-1]
    probes, params = [], []
    for kind in rng.sample(list(cfg.probe_kinds), cfg.num_probes):
        if kind == "inverse":
            q = f"{_question(name, item, None, ops)} Now {pronoun} has {final}. How many at first?"
            probes.append(Probe(kind, q, str(start)))
            params.append({"kind": kind})
        elif kind == "counterfactual":
            new_start = start + rng.choice([-1, 1]) * rng.randint(1, 3)
            low = max(0, -min(run_chain(0, ops)))  # smallest start that never goes below zero
            new_start = max(new_start, low + 1)
            if new_start == start:
                new_start += 1
            q = f"If {pronoun} had {new_start} at first, how many now?"
            probes.append(Probe(kind, q, str(run_chain(new_start, ops)[-1])))
            params.append({"kind": kind, "start": new_start})
        elif kind == "step":
            k = rng.randint(1, len(ops))
            probes.append(Probe(kind, f"How many after step {k}?", str(values[k])))
            params.append({"kind": kind, "step": k})
        else:  # verify
            right = rng.random() < 0.5
            candidate = final if right else final + rng.choice([-1, 1]) * rng.randint(1, 3)
            if candidate < 0:
                candidate = final + rng.randint(1, 3)
            probes.append(Probe(kind, f"Is {candidate} right?", "yes" if candidate == final else "no"))
            params.append({"kind": kind, "candidate": candidate})
    # stored in dialogue order (data.problem.hygienic_order: the inverse probe, which states the final amount, after
    # every other checkable probe), so meta's probe parameters and the dialogues' turns line up as written
    order = hygienic_order([p.kind for p in probes])
    probes, params = [probes[i] for i in order], [params[i] for i in order]
    if cfg.include_explain:
        steps = " and ".join(f"{values[i]}{op}{n}={values[i + 1]}" for i, (op, n) in enumerate(ops))
        probes.append(Probe("explain", "Why?", f"Because {steps}."))
        params.append({"kind": "explain"})
    meta["probes"] = params
    return probes


def recompute_probe_answer(meta: dict, index: int) -> str:
    """A probe's answer derived from meta alone (independently of write_probes): the check used by the tests."""
    p = meta["probes"][index]
    start, ops = meta["start"], meta["ops"]
    total = start + sum(n if op == "+" else -n for op, n in ops)
    if p["kind"] == "inverse":  # undo the steps from the final amount, last step first
        x = total
        for op, n in reversed(ops):
            x = x - n if op == "+" else x + n
        return str(x)
    if p["kind"] == "counterfactual":
        return str(p["start"] + sum(n if op == "+" else -n for op, n in ops))
    if p["kind"] == "step":
        return str(start + sum(n if op == "+" else -n for op, n in ops[: p["step"]]))
    if p["kind"] == "verify":
        return "yes" if p["candidate"] == total else "no"
    return (
        "Because "
        + " and ".join(f"{a}{op}{n}={a + n if op == '+' else a - n}" for a, (op, n) in zip(run_chain(start, ops), ops))
        + "."
    )


SPLITS = ("train", "test_id", "test_ood", "test_ood_long", "test_ood_large")
"""train / test_id share one distribution; the OOD shifts: test_ood longer chains AND larger numbers, test_ood_long
longer chains of ID-sized numbers, test_ood_large ID-length chains with at least one number above the ID range."""


def make_problems(split: str, n: int, *, seed: int, cfg: ArithConfig | None = None) -> list[Problem]:
    """n problems of a split in SPLITS, deterministic under seed."""
    cfg = cfg or ArithConfig()
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    if n < 0:
        raise ValueError(f"n={n}: expected >= 0")
    rng = random.Random(f"{seed}-{split}")
    ood = split.startswith("test_ood")
    steps = cfg.ood_steps if split in ("test_ood", "test_ood_long") else cfg.id_steps
    max_operand = cfg.ood_max_operand if split in ("test_ood", "test_ood_large") else cfg.id_max_operand
    problems, seen = [], set()
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {split} problems: widen ArithConfig's ranges")
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        start, ops = _sample_chain(rng, steps, max_operand)
        key = _chain_key(name, item, start, ops)
        if key in seen:
            continue
        if split == "test_ood_large" and max([start] + [n for _, n in ops]) <= cfg.id_max_operand:
            continue  # all numbers in the ID range: not a shift
        if not ood and (key % cfg.test_fraction == 0) != (split == "test_id"):
            continue  # the hash reserves 1 in test_fraction chains for test_id: the ID splits never overlap
        seen.add(key)
        values = run_chain(start, ops)
        meta = {"name": name, "item": item, "start": start, "ops": ops}
        probes = write_probes(rng, meta, cfg)
        problems.append(
            Problem(
                id=f"{split}-{seed}-{len(problems)}",
                question=f"{_question(name, item, start, ops)} How many {item} does {name} have?",
                answer=str(values[-1]),
                rationale=_rationale(values, ops),
                probes=probes,
                split=split,
                meta=json.dumps(meta),
            )
        )
    return problems


def builtin_splits(
    n_train: int,
    n_test: int,
    *,
    seed: int = 0,
    cfg: ArithConfig | None = None,
    ood_splits: tuple[str, ...] = ("test_ood",),
) -> dict[str, list[Problem]]:
    """{"train", "test_id", *ood_splits}: lists of built-in problems (n_test in each held-out split)."""
    bad = [s for s in ood_splits if not s.startswith("test_ood") or s not in SPLITS]
    if bad:
        raise ValueError(f"ood_splits has {bad}: expected some of {SPLITS[2:]}")
    sizes = (("train", n_train), ("test_id", n_test), *((s, n_test) for s in ood_splits))
    return {split: make_problems(split, n, seed=seed, cfg=cfg) for split, n in sizes}


def builtin_dataset(n_train: int, n_test: int, *, seed: int = 0, cfg: ArithConfig | None = None) -> DatasetDict:
    """The built-in splits as a datasets.DatasetDict of problem rows (Problem.to_dict)."""
    from datasets import Dataset, DatasetDict  # an edge: the trainer uses builtin_splits

    splits = builtin_splits(n_train, n_test, seed=seed, cfg=cfg)
    return DatasetDict({split: Dataset.from_list(problem_rows(problems)) for split, problems in splits.items()})


def config_dict(cfg: ArithConfig) -> dict:
    return asdict(cfg)
