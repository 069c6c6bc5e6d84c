"""How answers write numbers: one grammar for the file loader (data.sources), the rewards (rewards.extract_answer,
answers_match), coherence (data.coherence) and the teacher's probe parsing (data.probes, through rewards).

    7   -3   2.5   3/4   1,234   1,234,567.25   $1,234.50 (the loader and answers_match drop the "$")

A comma is a thousands separator only inside \\d{1,3}(,\\d{3})+: "1,2", "0,5" and "12,34" are not numbers (a
decimal comma, a list), so they are never rewritten ("0,5" stays "0,5", never "05") and never equal 12 or 5; they
compare as text.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["NUMBER", "parse_number", "drop_separators"]

DIGITS = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
"""An integer part: plain digits, or 1-3 digits then groups of three, each after a comma."""
NUMBER = DIGITS + r"(?:\.\d+)?(?:/\d+)?"
"""An unsigned number: integer part, optional decimals, optional /denominator (callers add sign and currency)."""
_SIGNED = re.compile(r"-?" + NUMBER)


def drop_separators(text: str) -> str:
    """text without its thousands separators; text unchanged when a comma in it is not one ("1,2" stays)."""
    if "," not in text:
        return text
    return text.replace(",", "") if _SIGNED.fullmatch(text.strip()) else text


def parse_number(text: str | None) -> Fraction | None:
    """An exact number from answer text ("7", "-3", "2.5", "3/4", "1,234"); None when it is none (a comma that is
    not a thousands separator included: "1,2" and "0,5" are None)."""
    if text is None:
        return None
    t = text.strip()
    if "," in t:
        if not _SIGNED.fullmatch(t):
            return None
        t = t.replace(",", "")
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None
