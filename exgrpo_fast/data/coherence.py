"""Dialogue coherence for the built-in arithmetic task: is each probe answer consistent with the student's OWN
main answer, whatever the truth? (the `coherent` modes of the Dialogue Structure Utility bonus, DESIGN.md sec. 5).

The chain is start, then +n / -n steps, so the final amount is linear in the start: final(s) = s + net(ops), and
the amount after step k is final - net(ops[k:]). With M the student's own main answer, a probe answer is coherent
when it is what M implies:

    counterfactual  (start changed to s')      answer == M + (s' - s)
    step k          (amount after step k)      answer + net(ops[k:]) == M
    verify          (is candidate c right?)    verdict == "yes" iff c == M
    inverse         (final F stated, start?)   answer + net(ops) == F      (the probe states F itself, so this is
                                                                            consistency with the stated premise)

None of these look at the gold answer: a student that answers 8 instead of 7 and then says 10 to "if he had 5
at first" (s' - s = 2) is coherent though wrong. An unparseable main answer makes the probes that lean on it
(counterfactual, step, verify) incoherent. Problems without a chain in meta (user data) have no symbolic teacher to
judge coherence; callers fall back to probe correctness there (`coherence_available` says which).
"""

from __future__ import annotations

import json
from fractions import Fraction

from exgrpo_fast.data.numbers import parse_number

__all__ = ["coherence_available", "parse_number", "probe_coherence"]


def _meta_dict(meta) -> dict | None:
    if isinstance(meta, str):
        if not meta:
            return None
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            return None
    return meta if isinstance(meta, dict) else None


def coherence_available(meta) -> bool:
    """Whether meta holds the chain and the probe parameters that coherence needs (the built-in task's)."""
    m = _meta_dict(meta)
    return bool(m) and all(k in m for k in ("start", "ops", "probes"))


def _net(ops) -> int:
    return sum(n if op == "+" else -n for op, n in ops)


def probe_coherence(meta, probe_index: int, main_answer: str | None, probe_answer: str | None) -> float:
    """1.0 when the answer to probe `probe_index` (its index in meta["probes"], the problem's probe order, explain
    included) is consistent with the student's own main answer `main_answer`, else 0.0. Answers are the
    extracted answer strings (rewards.extract_answer); verdicts "yes" / "no"."""
    m = _meta_dict(meta)
    if m is None or not coherence_available(m):
        raise ValueError("meta has no chain (start, ops, probes): coherence is only defined for the built-in task")
    params = m["probes"][probe_index]
    kind, start, ops = params["kind"], m["start"], m["ops"]
    main = parse_number(main_answer)
    if kind == "verify":
        verdict = (probe_answer or "").strip().lower()
        if main is None or verdict not in ("yes", "no"):
            return 0.0
        return float((verdict == "yes") == (Fraction(params["candidate"]) == main))
    value = parse_number(probe_answer)
    if value is None:
        return 0.0
    if kind == "inverse":
        final = start + _net(ops)  # the amount the probe states
        return float(value + _net(ops) == final)
    if main is None:
        return 0.0
    if kind == "counterfactual":
        return float(value == main + (params["start"] - start))
    if kind == "step":
        return float(value + _net(ops[params["step"] :]) == main)
    raise ValueError(f"probe {probe_index} has kind {kind!r}: coherence is defined for checkable probes only")
