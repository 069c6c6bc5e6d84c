"""User problems from files (JSONL / JSON / Parquet / CSV), normalised to our problem dicts, every row checked.

    load_problems("gsm8k_train.jsonl")  ->  [{"id", "question", "answer", "rationale", "probes", "split", "meta"}]

GSM8K answers ("Natalia sold 48/2 = <<48/2=24>>24 clips ... #### 72") become answer "72" with the text before
"####" as the rationale. A plain answer is kept as written (numbers: commas and "$" dropped). Rows may carry
probes already ([{kind, question, answer}]); otherwise probes is [] and exgrpo_fast.data.probes writes them.

Parquet is read through `datasets`; JSONL and CSV through json / csv, which keep each row's line number (a quoted
CSV cell may span lines) and don't coerce mixed types (7 and "7") the way arrow does.

Every row is parsed and checked up front, and a bad one raises exgrpo_fast.errors.DataError (a ValueError) naming
the file and where: the 1-based line for JSONL and CSV (the header is line 1 of a CSV, so its first row is line 2),
the 0-based row index for Parquet and JSON arrays. Checked: the text is UTF-8 (a byte that is not is reported with
its line, never as a UnicodeDecodeError); every number anywhere in a row is finite and within the float64 range
(JSON's NaN / Infinity, 1e400 and a 400-digit integer are errors, never silently "inf"), numeric answer text too
("NaN", "1e400"); fields have the right types (question: text; answer: text or a number; id: text or an integer;
rationale, split: text; probes: a list of {kind, question, answer}). A CSV must end with a line break: a last row
without one cannot be told from a truncated file, whose last value would silently be cut short.

on_error="skip" keeps the valid rows, leaves out the bad ones and logs how many (read_problems returns them);
errors about the whole file (missing, unreadable, a broken JSON array, a bad CSV header) always raise. A CSV row
shorter than the header leaves its last fields missing; an empty cell is an empty value.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Literal, NamedTuple

from exgrpo_fast.data.problem import PROBE_KINDS
from exgrpo_fast.errors import ConfigError, DataError

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ON_ERROR = ("raise", "skip")
_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_SURROGATE = re.compile(r"[\udc80-\udcff]")  # undecodable bytes kept by errors="surrogateescape"
_BOM = b"\xef\xbb\xbf"
_FLOAT_MAX = sys.float_info.max
log = logging.getLogger(__name__)


class _BadNumber:
    """A JSON number we refuse (NaN, +-Infinity, out of float64 range), kept as a marker so that the row check can
    name the field it sits in."""

    def __init__(self, text: str, why: str) -> None:
        self.text, self.why = text, why

    def __repr__(self) -> str:
        return self.text


def _short(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:10]}...{text[-6:]} ({len(text)} characters)"


def _json_constant(name: str) -> _BadNumber:
    return _BadNumber(name, f"{name} is not a finite number")


def _json_float(text: str) -> float | _BadNumber:
    value = float(text)
    return value if math.isfinite(value) else _BadNumber(text, f"{_short(text)} is outside the float64 range")


def _json_int(text: str) -> int | _BadNumber:
    digits = len(text.lstrip("-"))
    if digits > 309 or abs(value := int(text)) > _FLOAT_MAX:
        return _BadNumber(text, f"a {digits}-digit integer is too large (beyond the float64 range)")
    return value


def _loads(text: str):
    """json.loads where NaN / Infinity / out-of-range numbers become _BadNumber markers instead of floats."""
    return json.loads(text, parse_constant=_json_constant, parse_float=_json_float, parse_int=_json_int)


def _find_bad_number(value, where: str = "") -> str | None:
    """A message naming the first non-finite or out-of-range number inside value (markers from _loads, or float
    NaN / inf from Parquet), else None."""
    if isinstance(value, _BadNumber):
        return f"field {where!r}: {value.why}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"field {where!r}: {value} is not a finite number"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for k, v in items:
        name = f"{where}{k}" if str(k).startswith("[") else (f"{where}.{k}" if where else str(k))
        found = _find_bad_number(v, name)
        if found:
            return found
    return None


def _check_numeric_text(text: str) -> None:
    """Numeric answer text must be a finite float64: "NaN", "inf", "1e400" and 400 digits are refused."""
    if _NUMBER.fullmatch(text):
        for part in text.replace(",", "").replace("$", "").split("/"):
            if not math.isfinite(float(part)):
                raise ValueError(f"answer {_short(text)} is too large (beyond the float64 range)")
        return
    try:
        value = float(text)
    except ValueError:
        return
    if not math.isfinite(value):
        raise ValueError(f"answer {text!r} is not a finite number")


def _format_number(raw: int | float) -> str:
    if isinstance(raw, float):
        if raw != raw:
            raise ValueError("answer is NaN (not a number)")
        if not math.isfinite(raw):
            raise ValueError(f"answer is {raw} (not a finite number)")
        return str(int(raw)) if raw.is_integer() else repr(raw)
    if abs(raw) > _FLOAT_MAX:
        raise ValueError(f"answer is a {len(str(abs(raw)))}-digit integer, too large (beyond the float64 range)")
    return str(raw)


def parse_answer(raw) -> tuple[str, str]:
    """(answer, rationale) from a raw answer field; ValueError when there is no usable answer."""
    if isinstance(raw, _BadNumber):
        raise ValueError(f"answer: {raw.why}")
    if raw is None or isinstance(raw, bool):
        raise ValueError(f"unusable answer {raw!r}")
    if isinstance(raw, (int, float)):
        return _format_number(raw), ""
    if not isinstance(raw, str):
        raise ValueError(f"answer is a {type(raw).__name__}, expected text or a number")
    text = raw.strip()
    rationale, gsm8k = "", "####" in text
    if gsm8k:
        m = _GSM8K.search(text)
        if not m:
            raise ValueError(f"nothing after '####' in answer {raw[-60:]!r}")
        rationale = text[: m.start()].strip()
        text = m.group(1).strip()
    if not text:
        raise ValueError("empty answer")
    _check_numeric_text(text)
    if _NUMBER.fullmatch(text):
        text = text.replace(",", "").replace("$", "")
    elif gsm8k:  # a GSM8K-style answer must be a number
        raise ValueError(f"unparsable answer {text!r} after '####'")
    return text, rationale


def _check_probes(probes) -> list[dict]:
    if probes is None:
        return []
    if isinstance(probes, str):
        if not probes.strip():
            return []
        try:
            probes = _loads(probes)
        except json.JSONDecodeError as e:
            raise ValueError(f"probes: bad JSON ({e.msg} at column {e.colno})") from None
        bad = _find_bad_number(probes, "probes")
        if bad:
            raise ValueError(bad)
    if not isinstance(probes, list):
        raise ValueError(f"probes must be a list, got {type(probes).__name__}")
    out = []
    for i, p in enumerate(probes):
        if not isinstance(p, dict) or not {"kind", "question", "answer"} <= set(p):
            raise ValueError(f"each probe needs kind, question and answer, got {p!r}")
        if not isinstance(p["kind"], str) or p["kind"] not in PROBE_KINDS:
            raise ValueError(f"probe kind {p['kind']!r}: expected one of {PROBE_KINDS}")
        if not isinstance(p["question"], str) or not p["question"].strip():
            raise ValueError(f"probes[{i}].question must be non-empty text, got {p['question']!r}")
        answer = p["answer"]
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = _format_number(answer)
        elif not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"probes[{i}].answer must be text or a number, got {answer!r}")
        else:
            _check_numeric_text(answer.strip())
        out.append({"kind": p["kind"], "question": p["question"], "answer": answer})
    return out


def _utf8_error(raw: bytes, e: UnicodeDecodeError, offset: int = 0) -> str:
    return f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start - offset + 1})"


Row = dict | DataError  # a parsed row, or why it could not be parsed


def _read_jsonl(path: Path, raw: bytes) -> list[tuple[str, Row]]:
    """(where, row or error) per non-blank line. Parsed with json rather than arrow: arrow would coerce mixed types
    (7 and "7") and its errors don't name the line."""
    out = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        where = f"line {lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append((where, DataError(path, where, _utf8_error(line, e))))
            continue
        if not text.strip():
            continue
        try:
            row = _loads(text)
        except json.JSONDecodeError as e:
            out.append((where, DataError(path, where, f"bad JSON ({e.msg} at column {e.colno})")))
            continue
        if not isinstance(row, dict):
            out.append((where, DataError(path, where, f"expected a JSON object, got {type(row).__name__}")))
            continue
        out.append((where, row))
    return out


def _read_csv(path: Path, raw: bytes) -> list[tuple[str, Row]]:
    """(where, row or error) per record, where = the line the record starts on. Cells stay text ("1,000" and "007"
    as written); a quoted cell may span lines, so the line numbers come from the reader, not from the row index."""
    text = raw.decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(path, "line 1", f"bad CSV header ({e})") from None
    if header is None:
        return []
    if any(_SURROGATE.search(h) for h in header):
        raise DataError(path, "line 1", "not valid UTF-8 in the header")
    header = [h.strip() for h in header]
    out, end = [], reader.line_num
    while True:
        start = end + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            end = reader.line_num
            out.append((f"line {start}", DataError(path, f"line {start}", f"bad CSV ({e})")))
            continue
        end = reader.line_num
        where = f"line {start}"
        if not record or all(not c.strip() for c in record):
            continue
        bad = next((c for c in record if _SURROGATE.search(c)), None)
        if bad is not None:
            byte = ord(_SURROGATE.search(bad).group()) - 0xDC00
            out.append((where, DataError(path, where, f"not valid UTF-8 (byte 0x{byte:02x})")))
        elif len(record) > len(header):
            out.append((where, DataError(path, where, f"{len(record)} cells but {len(header)} columns")))
        else:
            out.append((where, dict(zip(header, record))))
    if out and not text.endswith(("\n", "\r")):
        where = out[-1][0]
        out[-1] = (where, DataError(path, where, "the file ends inside this row, with no line break after it "
                                    "(truncated? if the row is complete, end the file with a newline)"))  # fmt: skip
    return out


def _read_json(path: Path, raw: bytes) -> list[tuple[str, Row]] | None:
    """(where, row or error) per element of a JSON array (or of {"data": [...]}); None when the file holds JSON
    lines instead (then it is read as JSONL)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        raise DataError(path, f"line {line}", _utf8_error(raw, e, line_start)) from None
    try:
        data = _loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines saved under a .json name
            return None
        raise DataError(path, f"line {e.lineno}", f"bad JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(path, "", "expected a JSON array of objects")
    return [
        (f"row {i}", row if isinstance(row, dict) else DataError(path, f"row {i}", f"expected a JSON object, got "
                                                                 f"{type(row).__name__}"))
        for i, row in enumerate(data)
    ]  # fmt: skip


def _read_rows(path: Path) -> list[tuple[str, Row]]:
    """(where, row or error) for every row of the file: "line N" or "row N"."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        from datasets import Dataset

        try:
            rows = Dataset.from_parquet(str(path)).to_list()
        except Exception as e:  # noqa: BLE001 - arrow parse errors: name the file
            raise DataError(path, "", f"cannot read as parquet: {type(e).__name__}: {e}") from None
        return [(f"row {i}", row) for i, row in enumerate(rows)]
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(path, "", f"cannot read: {e.strerror or e}") from None
    raw = raw[len(_BOM) :] if raw.startswith(_BOM) else raw
    if suffix == ".json":
        rows = _read_json(path, raw)
        if rows is not None:
            return rows
        return _read_jsonl(path, raw)
    return (_read_jsonl if suffix == ".jsonl" else _read_csv)(path, raw)


def _text_field(row: dict, name: str, *, allow_int: bool = False) -> str | None:
    value = row.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str) or (allow_int and isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    kind = "text or an integer" if allow_int else "text"
    raise ValueError(f"field {name!r} is a {type(value).__name__}, expected {kind}")


def _problem(row: dict, i: int, path: Path, question_field: str, answer_field: str, split: str | None) -> dict:
    """One checked problem dict from one parsed row; ValueError saying what is wrong."""
    for name in (question_field, answer_field):
        if name not in row or row[name] is None:
            raise ValueError(f"missing field {name!r}")
    bad = _find_bad_number(row)
    if bad:
        raise ValueError(bad)
    question = row[question_field]
    if not isinstance(question, str):
        raise ValueError(f"field {question_field!r} is a {type(question).__name__}, expected text")
    if not question.strip():
        raise ValueError(f"empty question in field {question_field!r}")
    answer, rationale = parse_answer(row[answer_field])
    extra_rationale = _text_field(row, "rationale") if answer_field != "rationale" else None
    if not rationale and extra_rationale:
        rationale = extra_rationale.strip()
    probes = _check_probes(row.get("probes"))
    row_id = _text_field(row, "id", allow_int=True)
    row_split = _text_field(row, "split")
    extra = {k: v for k, v in row.items() if k not in (question_field, answer_field, "probes", "rationale")}
    return {
        "id": row_id if row_id is not None else f"{path.stem}-{i}",
        "question": question.strip(),
        "answer": answer,
        "rationale": rationale,
        "probes": probes,
        "split": split if split is not None else (row_split or path.stem),
        "meta": json.dumps(extra, default=str),
    }


class LoadedProblems(NamedTuple):
    problems: list[dict]
    """the valid rows as problem dicts, in file order"""
    skipped: list[DataError]
    """why each left-out row was bad (empty unless on_error="skip")"""


def read_problems(
    path: str | Path,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    split: str | None = None,
    on_error: Literal["raise", "skip"] = "raise",
) -> LoadedProblems:
    """Problems in a .jsonl / .json / .parquet / .csv file and the rows left out (see the module docstring)."""
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error={on_error!r}: expected one of {ON_ERROR}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(path, "", f"unsupported format {suffix!r}; expected one of {sorted(FORMATS)}")
    if not path.exists():
        raise DataError(path, "", "no such file")
    if not path.is_file():
        raise DataError(path, "", "not a file")
    problems, skipped = [], []
    for i, (where, row) in enumerate(_read_rows(path)):
        if not isinstance(row, DataError):
            try:
                problems.append(_problem(row, i, path, question_field, answer_field, split))
                continue
            except ValueError as e:
                row = DataError(path, where, str(e))
        if on_error == "raise":
            raise row
        skipped.append(row)
    if not problems:
        why = f" ({len(skipped)} bad rows skipped; first: {skipped[0]})" if skipped else ""
        raise DataError(path, "", f"no problems{why}")
    return LoadedProblems(problems, skipped)


def load_problems(
    path: str | Path,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    split: str | None = None,
    on_error: Literal["raise", "skip"] = "raise",
) -> list[dict]:
    """Problems in a .jsonl / .json / .parquet / .csv file as our problem dicts (see the module docstring).

    question_field / answer_field name the columns to read; split labels the problems (default: the row's "split"
    field, else the file's stem). Other fields are kept as JSON in meta; a "rationale" field fills the rationale.
    on_error="raise" (default): the first bad row raises DataError naming file and line; "skip": bad rows are left
    out and their count is logged (a warning).
    """
    loaded = read_problems(path, question_field=question_field, answer_field=answer_field, split=split,
                           on_error=on_error)  # fmt: skip
    if loaded.skipped:
        log.warning(
            "%s: skipped %d bad row(s) of %d (data.on_error=skip); first: %s",
            path, len(loaded.skipped), len(loaded.skipped) + len(loaded.problems), loaded.skipped[0],
        )  # fmt: skip
    return loaded.problems
