"""Rewards of an ExGRPO rollout: answer extraction and checking, probe scoring, the Dialogue Structure Utility bonus.

    total = task_weight * r_task + probe_weight * mean_k r_k + dsu_weight * DSU + format_weight * r_format

r_task: the first response's answer matches the gold answer. r_k: the k-th checkable probe's answer matches its
reference (a missing response counts wrong). DSU (RewardConfig.dsu_mode) rewards a dialogue that holds together:
"correct" (default) r_task * mean_k r_k; "coherent" mean_k c_k, where c_k says whether probe k's answer is what the
student's OWN main answer implies (data/coherence.py: a counterfactual answer moved from its own answer by the
changed premise, a verdict matching its own answer, an intermediate step consistent with its own answer), whatever
the truth; "coherent_correct" r_task * mean_k c_k (equal to "correct" wherever c_k is exact: a right main answer
makes coherent and right probe answers the same); "all" 1 when the answer and every probe are right. With no
checkable probe there is no dialogue structure to reward and DSU is 0. r_format: fraction of responses with a
parseable answer. Every term is returned separately so the trainer logs each.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from exgrpo_fast.data.coherence import coherence_available, probe_coherence
from exgrpo_fast.data.numbers import NUMBER
from exgrpo_fast.data.problem import Problem, as_problem, dialogue_probes

_ANSWER = re.compile(r"\banswer[ \t]*:[ \t]*([^\n<]*)", re.IGNORECASE)  # "Answer: X" (our format)
_ANSWER_IS = re.compile(r"\banswer[ \t]+is[ \t]*:?[ \t]*([^\n<]*)", re.IGNORECASE)  # "the answer is X"
_HASHES = re.compile(r"####[ \t]*([^\n<]*)")  # GSM8K
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")  # LaTeX
_NUMBER = re.compile(r"(?:(?<!\w)-)?" + NUMBER)  # "7-2": 7 and 2, not -2; commas: thousands only (data.numbers)
_LEAD = re.compile(r"(-?" + NUMBER + r")\s+[A-Za-z]+$")  # "5 apples"
_YESNO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def _clean(text: str) -> str | None:
    """The answer part of what follows a marker: up to the end of its sentence, markdown and dots stripped; a
    leading yes/no is the whole answer ("Yes, it is right" -> "yes")."""
    text = re.split(r"[.!?;]\s", text.strip(), maxsplit=1)[0]  # "5. Because 3+2=5" -> "5" (but "1.5" stays)
    text = text.strip().strip("*`$").strip()
    text = re.sub(r"[.\s]+$", "", text)
    m = re.match(r"(yes|no)\b", text, re.IGNORECASE)
    if m:
        return m.group(1).lower()
    return text or None


def extract_answer(text: str | None) -> str | None:
    """The answer in a response: after the last "Answer:" marker, else after "####", else in the last \\boxed{},
    else after "the answer is", else the last number, else the last yes/no. None when there is none."""
    if not text:
        return None
    for pattern in (_ANSWER, _HASHES, _BOXED, _ANSWER_IS):
        found = [c for c in map(_clean, pattern.findall(text)) if c]
        if found:
            return found[-1]
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].rstrip(",")
    words = _YESNO.findall(text)
    return words[-1].lower() if words else None


def _as_number(text: str) -> Fraction | None:
    t = text.strip().lstrip("$").rstrip("%")
    if not _NUMBER.fullmatch(t):
        lead = _LEAD.match(t)  # an answer like "5 apples": a single leading number counts
        if not lead:
            return None
        t = lead.group(1)
    try:
        return Fraction(t.replace(",", ""))  # the grammar allows commas only as thousands separators
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(pred: str | None, gold: str | None) -> bool:
    """Numeric comparison (1,000 == 1000, 5.0 == 5, 1/2 == 0.5) when both parse, else normalised text. A comma is
    a thousands separator only between groups of three digits (data.numbers): "1,2" is not 12, "0,5" not 5 or 0.5."""
    if pred is None or gold is None:
        return False
    a, b = _as_number(pred), _as_number(gold)
    if a is not None and b is not None:
        return abs(a - b) <= Fraction(1, 10**6) * max(1, abs(b))
    norm = lambda s: re.sub(r"\s+", " ", s.strip().lower().rstrip("."))  # noqa: E731
    return norm(pred) == norm(gold)


DSU_MODES = ("correct", "coherent", "coherent_correct", "all")


@dataclass
class RewardConfig:
    """Weights of the reward terms."""

    task_weight: float = 1.0
    """Weight of task correctness (the first response's answer)."""
    probe_weight: float = 0.5
    """Weight of the mean correctness over the checkable probes."""
    dsu_weight: float = 0.5
    """Weight of the Dialogue Structure Utility bonus."""
    format_weight: float = 0.0
    """Weight of the fraction of responses with a parseable answer."""
    dsu_mode: Literal["correct", "coherent", "coherent_correct", "all"] = "correct"
    """Dialogue Structure Utility bonus. "correct" (default): r_task * mean probe correctness; "coherent": mean over
    probes of whether the student's probe answer is consistent with its OWN main answer (data.coherence; independent
    of the gold answer; problems without a symbolic chain fall back to probe correctness); "coherent_correct":
    r_task * coherence (equals "correct" on the built-in task); "all": 1 only when the answer and every probe are
    right. Default chosen by the paper experiment (README "Experiments"): the modes tie within their intervals, and
    under "coherent" the DSU term rises while the task reward stays flat (coherence learned without correctness)."""

    def __post_init__(self) -> None:
        for name in ("task_weight", "probe_weight", "dsu_weight", "format_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"RewardConfig.{name}={v!r}: expected a finite number >= 0")
        if self.dsu_mode not in DSU_MODES:
            raise ValueError(f"RewardConfig.dsu_mode={self.dsu_mode!r}: expected one of {DSU_MODES}")


def score_dialogue(problem: Problem | Mapping, responses: list[str], cfg: RewardConfig | None = None) -> dict:
    """Reward terms of one dialogue. responses[0] answers the question, responses[1:] the checkable probes in
    rollout order (data.problem.dialogue_probes, the order rollout_user_turns asks them in). Returns total, task,
    probe, dsu, format and per-kind probe correctness ("probe_<kind>")."""
    cfg = cfg or RewardConfig()
    if not responses:
        raise ValueError("responses is empty: a dialogue needs at least the answer to the question")
    problem = as_problem(problem)
    main = extract_answer(responses[0])
    task = float(answers_match(main, problem.answer))
    symbolic = coherence_available(problem.meta)
    probe_right, coherent = [], []
    per_kind: dict[str, list[float]] = {}
    k = 0
    for index, p in dialogue_probes(problem):  # index: in the problem's probes (meta's order, explain included)
        if p.kind == "explain":
            continue
        k += 1
        reply = extract_answer(responses[k]) if k < len(responses) else None
        ok = float(answers_match(reply, p.answer))
        probe_right.append(ok)
        coherent.append(probe_coherence(problem.meta, index, main, reply) if symbolic else ok)
        per_kind.setdefault(p.kind, []).append(ok)
    probe = sum(probe_right) / len(probe_right) if probe_right else 0.0
    coherence = sum(coherent) / len(coherent) if coherent else 0.0
    if not probe_right:
        dsu = 0.0
    elif cfg.dsu_mode == "correct":
        dsu = task * probe
    elif cfg.dsu_mode == "coherent":
        dsu = coherence
    elif cfg.dsu_mode == "coherent_correct":
        dsu = task * coherence
    else:  # all
        dsu = float(task == 1.0 and all(probe_right))
    fmt = sum(extract_answer(r) is not None for r in responses) / len(responses)
    total = cfg.task_weight * task + cfg.probe_weight * probe + cfg.dsu_weight * dsu + cfg.format_weight * fmt
    out = {"total": total, "task": task, "probe": probe, "dsu": dsu, "coherence": coherence, "format": fmt}
    out.update({f"probe_{kind}": sum(v) / len(v) for kind, v in per_kind.items()})
    return out
