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

Problems are plain dicts (rows of a datasets.Dataset): id, question, answer, rationale, probes [{kind, question,
answer}], split, meta (JSON of the chain and the probe parameters, from which every answer can be recomputed).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field

NAMES = ("Tom", "Ann", "Bob", "Eve", "Sam", "Mia", "Leo", "Ida")
PRONOUNS = {"Tom": "He", "Bob": "He", "Sam": "He", "Leo": "He", "Ann": "She", "Eve": "She", "Mia": "She", "Ida": "She"}
ITEMS = ("apples", "pens", "cards", "coins", "books", "shells")
CHECKABLE = ("inverse", "counterfactual", "step", "verify")
PROBE_KINDS = CHECKABLE + ("explain",)
ANSWER_PREFIX = "Answer: "


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


def write_probes(rng: random.Random, meta: dict, cfg: ArithConfig) -> list[dict]:
    """The symbolic teacher's probes for the chain in meta (see exgrpo_fast.data.probes.write_symbolic_probes)."""
    from exgrpo_fast.data.probes import write_symbolic_probes  # lazy: probes imports this module

    return write_symbolic_probes(rng, meta, cfg)


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
    return "Because " + " and ".join(
        f"{a}{op}{n}={a + n if op == '+' else a - n}" for a, (op, n) in zip(run_chain(start, ops), ops)) + "."


def make_problems(split: str, n: int, *, seed: int, cfg: ArithConfig | None = None) -> list[dict]:
    """n problems of split "train", "test_id" or "test_ood", deterministic under seed."""
    cfg = cfg or ArithConfig()
    if split not in ("train", "test_id", "test_ood"):
        raise ValueError(f"split={split!r}: expected 'train', 'test_id' or 'test_ood'")
    if n < 0:
        raise ValueError(f"n={n}: expected >= 0")
    rng = random.Random(f"{seed}-{split}")
    ood = split == "test_ood"
    steps = cfg.ood_steps if ood else cfg.id_steps
    max_operand = cfg.ood_max_operand if ood else cfg.id_max_operand
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
        if not ood and (key % cfg.test_fraction == 0) != (split == "test_id"):
            continue  # the hash reserves 1 in test_fraction chains for test_id: the ID splits never overlap
        seen.add(key)
        values = run_chain(start, ops)
        meta = {"name": name, "item": item, "start": start, "ops": ops}
        probes = write_probes(rng, meta, cfg)
        problems.append({
            "id": f"{split}-{seed}-{len(problems)}",
            "question": f"{_question(name, item, start, ops)} How many {item} does {name} have?",
            "answer": str(values[-1]),
            "rationale": _rationale(values, ops),
            "probes": probes,
            "split": split,
            "meta": json.dumps(meta),
        })
    return problems


def builtin_dataset(n_train: int, n_test: int, *, seed: int = 0, cfg: ArithConfig | None = None):
    """datasets.DatasetDict with train / test_id / test_ood splits of the built-in task."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({
        split: Dataset.from_list(make_problems(split, n, seed=seed, cfg=cfg))
        for split, n in (("train", n_train), ("test_id", n_test), ("test_ood", n_test))
    })


# ----------------------------------------------------------------------------------------------------------------
# dialogues


def format_answer(rationale: str, answer: str) -> str:
    """The assistant's reply to a question: the worked rationale, then the parseable answer line."""
    return f"{rationale} {ANSWER_PREFIX}{answer}".strip()


def sft_dialogue(problem: dict) -> list[dict]:
    """The teacher's EI dialogue: question -> rationale + answer, then each probe -> its answer (explain included)."""
    turns = [{"role": "user", "content": problem["question"]},
             {"role": "assistant", "content": format_answer(problem.get("rationale", ""), problem["answer"])}]
    for p in problem.get("probes") or []:
        reply = p["answer"] if p["kind"] == "explain" else f"{ANSWER_PREFIX}{p['answer']}"
        turns += [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": reply}]
    return turns


def checkable_probes(problem: dict) -> list[dict]:
    """The probes a reward can check (every kind but explain), in dialogue order."""
    return [p for p in problem.get("probes") or [] if p["kind"] != "explain"]


def rollout_user_turns(problem: dict, *, include_probes: bool = True) -> list[str]:
    """User messages a rollout feeds turn by turn: the question, then the checkable probes."""
    turns = [problem["question"]]
    if include_probes:
        turns += [p["question"] for p in checkable_probes(problem)]
    return turns


def config_dict(cfg: ArithConfig) -> dict:
    return asdict(cfg)
