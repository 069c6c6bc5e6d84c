"""The types every data module shares: a Problem with its explanatory Probes, and the Dialogue built from them.

    Problem(id, question, answer, rationale, probes=[Probe(kind, question, answer), ...], split, meta)

The built-in arithmetic task (data.tasks) and the teacher-probe writer (data.probes) both produce Problems and
depend on this module, never on each other. The training loop passes plain lists of Problems; `datasets` appears
only at the edges (reading user files, the teacher-probe cache), where rows convert with Problem.from_dict and
Problem.to_dict.

A Dialogue is a list of {"role", "content"} turns, the format chat templates consume. `sft_dialogue` is the
teacher's Explanatory Inversion dialogue a student is distilled on; `rollout_user_turns` are the user messages a
rollout feeds turn by turn (the question, then every checkable probe: `explain` is free text, SFT only).

Probe hygiene (DESIGN.md section 5: no turn reveals what a later turn asks for) lives here, in `dialogue_probes`,
the one order every dialogue takes its probes in: SFT dialogues, rollouts and evaluation (`rollout_user_turns`,
`checkable_probes`), rewards (`rewards.score_dialogue`), reference reply lengths. An inverse probe states the final
amount, which counterfactual, step and verify probes ask about, so it comes after all of them; an explain probe's
answer is the whole worked solution, so it comes last. Otherwise the order is the source's (a stable sort), so the
built-in task, whose teacher already writes this order, is unchanged; probes from a user's file or an HF teacher
are reordered. `Problem.probe_order = "raw"` (config data.probe_order, logged) asks them as given.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypedDict, get_args

ProbeKind = Literal["inverse", "counterfactual", "step", "verify", "explain"]
PROBE_KINDS: tuple[str, ...] = get_args(ProbeKind)
CHECKABLE: tuple[str, ...] = tuple(k for k in PROBE_KINDS if k != "explain")
"""Kinds a reward can check against a reference answer (explain is free text)."""
REVEALS_FINAL: tuple[str, ...] = ("inverse",)
"""Kinds whose question states the final amount: asked after every other checkable probe."""
REVEALS_ALL: tuple[str, ...] = ("explain",)
"""Kinds whose answer is the whole worked solution: asked last."""
PROBE_ORDERS = ("hygienic", "raw")
ANSWER_PREFIX = "Answer: "
"""What precedes the parseable answer in every assistant reply of a teacher dialogue."""


@dataclass(slots=True)
class Probe:
    """One explanatory question about a problem, with its reference answer (DESIGN.md section 5)."""

    kind: str
    """One of PROBE_KINDS: inverse, counterfactual, step, verify or explain."""
    question: str
    answer: str

    def __post_init__(self) -> None:
        if self.kind not in PROBE_KINDS:
            raise ValueError(f"probe kind {self.kind!r}: expected one of {PROBE_KINDS}")
        self.kind = sys.intern(self.kind)  # one string per kind, not one per probe (10^6-row files)

    @classmethod
    def from_dict(cls, row: Mapping) -> Probe:
        return cls(kind=str(row["kind"]), question=str(row["question"]), answer=str(row["answer"]))

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "question": self.question, "answer": self.answer}


@dataclass(slots=True)
class Problem:
    """A question with its gold answer, an optional worked rationale and the teacher's probes."""

    id: str
    question: str
    answer: str
    rationale: str = ""
    probes: list[Probe] = field(default_factory=list)
    split: str = ""
    meta: str = ""
    """JSON text: whatever the source knows beyond the fields above (the built-in task: its chain and probe
    parameters, from which every answer can be recomputed)."""
    probe_order: str = "hygienic"
    """How dialogues order the probes: "hygienic" (default; see dialogue_probes) or "raw" (as stored: the
    opt-out for data whose order is deliberate; data.splits logs it)."""

    def __post_init__(self) -> None:
        if self.probe_order not in PROBE_ORDERS:
            raise ValueError(f"probe_order={self.probe_order!r}: expected one of {PROBE_ORDERS}")

    @classmethod
    def from_dict(cls, row: Mapping) -> Problem:
        """From a row of a file or a datasets.Dataset (probes as dicts; a non-text meta is stored as JSON)."""
        meta = row.get("meta") or ""
        return cls(
            id=str(row.get("id", "")),
            question=str(row["question"]),
            answer=str(row["answer"]),
            rationale=str(row.get("rationale") or ""),
            probes=[p if isinstance(p, Probe) else Probe.from_dict(p) for p in row.get("probes") or []],
            split=str(row.get("split") or ""),
            meta=meta if isinstance(meta, str) else json.dumps(meta, default=str),
            probe_order=str(row.get("probe_order") or "hygienic"),
        )

    def to_dict(self) -> dict:
        """The row; probe_order only when "raw" (the default's rows, and the probe cache keys built from them, stay
        as they were)."""
        row = {
            "id": self.id, "question": self.question, "answer": self.answer, "rationale": self.rationale,
            "probes": [p.to_dict() for p in self.probes], "split": self.split, "meta": self.meta,
        }  # fmt: skip
        if self.probe_order != "hygienic":
            row["probe_order"] = self.probe_order
        return row


def as_problem(problem: Problem | Mapping) -> Problem:
    """A Problem from a Problem or a problem row (a dict, e.g. from data.sources or a datasets.Dataset)."""
    return problem if isinstance(problem, Problem) else Problem.from_dict(problem)


# ----------------------------------------------------------------------------------------------------------------
# dialogues


class Turn(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass
class Dialogue:
    """Turns of a chat, in order; iterates, indexes and measures like the list of turns it holds."""

    turns: list[Turn] = field(default_factory=list)

    @classmethod
    def of(cls, *pairs: tuple[str, str]) -> Dialogue:
        """Dialogue.of(("user", "2+2?"), ("assistant", "Answer: 4"))."""
        return cls([Turn(role=role, content=content) for role, content in pairs])

    def add(self, role: str, content: str) -> Dialogue:
        self.turns.append(Turn(role=role, content=content))
        return self

    def __iter__(self) -> Iterator[Turn]:
        return iter(self.turns)

    def __len__(self) -> int:
        return len(self.turns)

    def __getitem__(self, i):
        return self.turns[i]


def format_answer(rationale: str, answer: str) -> str:
    """The assistant's reply to a question: the worked rationale, then the parseable answer line."""
    return f"{rationale} {ANSWER_PREFIX}{answer}".strip()


def _hygiene_rank(kind: str) -> int:
    return 2 if kind in REVEALS_ALL else 1 if kind in REVEALS_FINAL else 0


def hygienic_order(kinds: Sequence[str]) -> list[int]:
    """Indices of probes of these kinds in the order a dialogue asks them: every probe whose question or answer
    gives away what another asks for comes after it (inverse after the other checkable kinds, explain last), the
    source's order kept otherwise."""
    return sorted(range(len(kinds)), key=lambda i: _hygiene_rank(kinds[i]))


def dialogue_probes(problem: Problem | Mapping) -> list[tuple[int, Probe]]:
    """(index in problem.probes, probe) in the order every dialogue asks them: the one place probe hygiene is
    applied (see the module docstring); as stored when problem.probe_order is "raw"."""
    p = as_problem(problem)
    if p.probe_order == "raw":
        return list(enumerate(p.probes))
    return [(i, p.probes[i]) for i in hygienic_order([q.kind for q in p.probes])]


def needs_reorder(problem: Problem | Mapping) -> bool:
    """Whether the stored probe order breaks hygiene (a dialogue of this problem reorders its probes)."""
    kinds = [q.kind for q in as_problem(problem).probes]
    return hygienic_order(kinds) != list(range(len(kinds)))


def sft_dialogue(problem: Problem | Mapping, *, include_probes: bool = True) -> Dialogue:
    """The teacher's EI dialogue: question -> rationale + answer, then each probe -> its answer (explain included),
    in dialogue order (dialogue_probes). include_probes=False: the question and its answer only (vanilla
    fine-tuning, the paper's baseline)."""
    p = as_problem(problem)
    dialogue = Dialogue().add("user", p.question).add("assistant", format_answer(p.rationale, p.answer))
    for _, probe in dialogue_probes(p) if include_probes else []:
        reply = probe.answer if probe.kind == "explain" else f"{ANSWER_PREFIX}{probe.answer}"
        dialogue.add("user", probe.question).add("assistant", reply)
    return dialogue


def checkable_probes(problem: Problem | Mapping) -> list[Probe]:
    """The probes a reward can check (every kind but explain), in dialogue order (dialogue_probes)."""
    return [q for _, q in dialogue_probes(problem) if q.kind != "explain"]


def rollout_user_turns(problem: Problem | Mapping, *, include_probes: bool = True) -> list[str]:
    """User messages a rollout feeds turn by turn: the question, then the checkable probes."""
    p = as_problem(problem)
    return [p.question] + ([q.question for q in checkable_probes(p)] if include_probes else [])


def problem_rows(problems: Iterable[Problem]) -> list[dict]:
    """Problems as plain rows (for datasets.Dataset.from_list, JSON files)."""
    return [p.to_dict() for p in problems]
