"""The types every data module shares: a Problem with its explanatory Probes, and the Dialogue built from them.

    Problem(id, question, answer, rationale, probes=[Probe(kind, question, answer), ...], split, meta)

The built-in arithmetic task (data.tasks) and the teacher-probe writer (data.probes) both produce Problems and
depend on this module, never on each other. The training loop passes plain lists of Problems; `datasets` appears
only at the edges (reading user files, the teacher-probe cache), where rows convert with Problem.from_dict and
Problem.to_dict.

A Dialogue is a list of {"role", "content"} turns, the format chat templates consume. `sft_dialogue` is the
teacher's Explanatory Inversion dialogue a student is distilled on; `rollout_user_turns` are the user messages a
rollout feeds turn by turn (the question, then every checkable probe: `explain` is free text, SFT only).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypedDict, get_args

ProbeKind = Literal["inverse", "counterfactual", "step", "verify", "explain"]
PROBE_KINDS: tuple[str, ...] = get_args(ProbeKind)
CHECKABLE: tuple[str, ...] = tuple(k for k in PROBE_KINDS if k != "explain")
"""Kinds a reward can check against a reference answer (explain is free text)."""
ANSWER_PREFIX = "Answer: "
"""What precedes the parseable answer in every assistant reply of a teacher dialogue."""


@dataclass
class Probe:
    """One explanatory question about a problem, with its reference answer (DESIGN.md section 5)."""

    kind: str
    """One of PROBE_KINDS: inverse, counterfactual, step, verify or explain."""
    question: str
    answer: str

    def __post_init__(self) -> None:
        if self.kind not in PROBE_KINDS:
            raise ValueError(f"probe kind {self.kind!r}: expected one of {PROBE_KINDS}")

    @classmethod
    def from_dict(cls, row: Mapping) -> Probe:
        return cls(kind=str(row["kind"]), question=str(row["question"]), answer=str(row["answer"]))

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "question": self.question, "answer": self.answer}


@dataclass
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
        )

    def to_dict(self) -> dict:
        return {
            "id": self.id, "question": self.question, "answer": self.answer, "rationale": self.rationale,
            "probes": [p.to_dict() for p in self.probes], "split": self.split, "meta": self.meta,
        }  # fmt: skip


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


def sft_dialogue(problem: Problem | Mapping, *, include_probes: bool = True) -> Dialogue:
    """The teacher's EI dialogue: question -> rationale + answer, then each probe -> its answer (explain included).
    include_probes=False: the question and its answer only (vanilla fine-tuning, the paper's baseline)."""
    p = as_problem(problem)
    dialogue = Dialogue().add("user", p.question).add("assistant", format_answer(p.rationale, p.answer))
    for probe in p.probes if include_probes else []:
        reply = probe.answer if probe.kind == "explain" else f"{ANSWER_PREFIX}{probe.answer}"
        dialogue.add("user", probe.question).add("assistant", reply)
    return dialogue


def checkable_probes(problem: Problem | Mapping) -> list[Probe]:
    """The probes a reward can check (every kind but explain), in dialogue order."""
    return [p for p in as_problem(problem).probes if p.kind != "explain"]


def rollout_user_turns(problem: Problem | Mapping, *, include_probes: bool = True) -> list[str]:
    """User messages a rollout feeds turn by turn: the question, then the checkable probes."""
    p = as_problem(problem)
    return [p.question] + ([q.question for q in checkable_probes(p)] if include_probes else [])


def problem_rows(problems: Iterable[Problem]) -> list[dict]:
    """Problems as plain rows (for datasets.Dataset.from_list, JSON files)."""
    return [p.to_dict() for p in problems]
