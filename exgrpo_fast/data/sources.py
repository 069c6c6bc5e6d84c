"""User problems from files (JSONL / JSON / Parquet / CSV), normalised to our problem dicts, every row checked.

    load_problems("gsm8k_train.jsonl")  ->  [{"id", "question", "answer", "rationale", "probes", "split", "meta"}]

GSM8K answers ("Natalia sold 48/2 = <<48/2=24>>24 clips ... #### 72") become answer "72" with the text before
"####" as the rationale. A plain answer is kept as written (numbers: thousands separators and "$" dropped; a comma
that is not a thousands separator, "0,5" or "1,2", keeps the answer as text, see data.numbers). Rows may carry
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

Size: with token_budget set, a row holding more text (question, answer, rationale and probes together) than
token_budget tokens can hold (MAX_CHARS_PER_TOKEN characters each) is a bad row, refused before any tokenizer sees
it. Files are read as a stream (JSONL and CSV line by line, Parquet a row at a time): memory grows with the problems
kept, not with the file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import sys
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, NamedTuple

from exgrpo_fast.data.numbers import NUMBER
from exgrpo_fast.data.problem import PROBE_KINDS
from exgrpo_fast.errors import ConfigError, DataError

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ON_ERROR = ("raise", "skip")
_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
_NUMBER = re.compile(r"-?\$?" + NUMBER)  # commas: thousands separators only (data.numbers)
_SURROGATE = re.compile(r"[\udc80-\udcff]")  # undecodable bytes kept by errors="surrogateescape"
_BOM = b"\xef\xbb\xbf"
_FLOAT_MAX = sys.float_info.max
MAX_CHARS_PER_TOKEN = 32
"""Characters one token is assumed to cover at most, for the size bound on a row's raw text: prose averages ~4 per
token and numbers and code fewer, so a row longer than token_budget * 32 characters cannot fit one micro-batch; the
bound refuses it up front (a 50 MB line would otherwise take GBs to tokenise, then abort)."""
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


_refused = [0]  # _BadNumber markers the JSON hooks made so far (one decode at a time: rows are read serially)


def _bad(text: str, why: str) -> _BadNumber:
    _refused[0] += 1
    return _BadNumber(text, why)


def _json_constant(name: str) -> _BadNumber:
    return _bad(name, f"{name} is not a finite number")


def _json_float(text: str) -> float | _BadNumber:
    value = float(text)
    return value if math.isfinite(value) else _bad(text, f"{_short(text)} is outside the float64 range")


def _json_int(text: str) -> int | _BadNumber:
    digits = len(text.lstrip("-"))
    if digits > 309 or abs(value := int(text)) > _FLOAT_MAX:
        return _bad(text, f"a {digits}-digit integer is too large (beyond the float64 range)")
    return value


_DECODER = json.JSONDecoder(parse_constant=_json_constant, parse_float=_json_float, parse_int=_json_int)


def _loads(text: str):
    """json.loads where NaN / Infinity / out-of-range numbers become _BadNumber markers instead of floats."""
    return _DECODER.decode(text)


def _loads_checked(text: str):
    """(_loads(text), whether it holds no _BadNumber marker): the row check walks only rows that may hold one."""
    before = _refused[0]
    value = _loads(text)
    return value, _refused[0] == before


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
Read = tuple[int, Row, bool]  # (line or row number, row or error, whether the row surely holds no bad number)


def _jsonl_line(path: Path, lineno: int, line: bytes) -> Read | None:
    where = f"line {lineno}"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return lineno, DataError(path, where, _utf8_error(line, e)), True
    if not text.strip():
        return None
    try:
        row, clean = _loads_checked(text)
    except json.JSONDecodeError as e:
        return lineno, DataError(path, where, f"bad JSON ({e.msg} at column {e.colno})"), True
    if not isinstance(row, dict):
        return lineno, DataError(path, where, f"expected a JSON object, got {type(row).__name__}"), True
    return lineno, row, clean


def _read_jsonl(path: Path) -> Iterator[Read]:
    """(line, row or error, clean) per non-blank line, read as a stream. Parsed with json rather than arrow: arrow
    would coerce mixed types (7 and "7") and its errors don't name the line. Lines end at \n, \r\n or a lone \r
    (bytes.splitlines' rule)."""
    lineno = 0
    with _open(path) as f:
        for chunk in f:
            if lineno == 0 and chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
            if chunk.endswith(b"\n"):
                body = chunk[:-2] if chunk.endswith(b"\r\n") else chunk[:-1]
            else:  # the last line, with no terminator or a lone \r
                body = chunk[:-1] if chunk.endswith(b"\r") else chunk
            for line in body.split(b"\r"):  # a lone \r inside ends a line too (old Mac files)
                lineno += 1
                read = _jsonl_line(path, lineno, line)
                if read is not None:
                    yield read


def _open(path: Path):
    try:
        return path.open("rb")
    except OSError as e:
        raise DataError(path, "", f"cannot read: {e.strerror or e}") from None


def _ends_with_line_break(path: Path) -> bool:
    with _open(path) as f:
        f.seek(0, io.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, io.SEEK_END)
        return f.read(1) in (b"\n", b"\r")


def _read_csv(path: Path) -> Iterator[Read]:
    """(line, row or error, clean) per record, line = the line the record starts on, read as a stream. Cells stay
    text ("1,000" and "007" as written); a quoted cell may span lines, so the line numbers come from the reader, not
    from the row index."""
    with _open(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(text, strict=True)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise DataError(path, "line 1", f"bad CSV header ({e})") from None
        if header is None:
            return
        if any(_SURROGATE.search(h) for h in header):
            raise DataError(path, "line 1", "not valid UTF-8 in the header")
        header = [h.strip() for h in header]
        end = reader.line_num
        last: Read | None = None  # held back one record: the file's last row is checked for a line break
        while True:
            start = end + 1
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                end = reader.line_num
                read = (start, DataError(path, f"line {start}", f"bad CSV ({e})"), True)
            else:
                end = reader.line_num
                where = f"line {start}"
                if not record or all(not c.strip() for c in record):
                    continue
                bad = next((c for c in record if _SURROGATE.search(c)), None)
                if bad is not None:
                    byte = ord(_SURROGATE.search(bad).group()) - 0xDC00
                    read = (start, DataError(path, where, f"not valid UTF-8 (byte 0x{byte:02x})"), True)
                elif len(record) > len(header):
                    read = (start, DataError(path, where, f"{len(record)} cells but {len(header)} columns"), True)
                else:
                    read = (start, dict(zip(header, record)), True)  # text cells: no number to refuse
            if last is not None:
                yield last
            last = read
    if last is not None:
        if not _ends_with_line_break(path):
            why = ("the file ends inside this row, with no line break after it (truncated? if the row is complete, "
                   "end the file with a newline)")  # fmt: skip
            last = (last[0], DataError(path, f"line {last[0]}", why), True)
        yield last


def _read_json(path: Path) -> Iterator[Read] | None:
    """(row index, row or error, clean) per element of a JSON array (or of {"data": [...]}); None when the file
    holds JSON lines instead (then it is read as JSONL). An array is parsed whole (JSON has no row boundaries)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(path, "", f"cannot read: {e.strerror or e}") from None
    raw = raw[len(_BOM) :] if raw.startswith(_BOM) else raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        raise DataError(path, f"line {line}", _utf8_error(raw, e, line_start)) from None
    del raw
    try:
        data, clean = _loads_checked(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines saved under a .json name
            return None
        raise DataError(path, f"line {e.lineno}", f"bad JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(path, "", "expected a JSON array of objects")
    return (
        (i, row if isinstance(row, dict) else DataError(path, f"row {i}", f"expected a JSON object, got "
                                                        f"{type(row).__name__}"), clean)
        for i, row in enumerate(data)
    )  # fmt: skip


def _read_parquet(path: Path) -> Iterator[Read]:
    from datasets import Dataset

    try:
        ds = Dataset.from_parquet(str(path))
    except Exception as e:  # noqa: BLE001 - arrow parse errors: name the file
        raise DataError(path, "", f"cannot read as parquet: {type(e).__name__}: {e}") from None
    for i, row in enumerate(ds):  # memory-mapped arrow table: one row at a time
        yield i, row, False  # floats may be NaN / inf: the row check walks it


def _read_rows(path: Path) -> tuple[str, Iterator[Read]]:
    """("line" or "row": what the numbers count, then (number, row or error, clean) for every row of the file)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "row", _read_parquet(path)
    if suffix == ".json":
        rows = _read_json(path)
        if rows is not None:
            return "row", rows
    return "line", (_read_csv(path) if suffix == ".csv" else _read_jsonl(path))


def _text_field(row: dict, name: str, *, allow_int: bool = False) -> str | None:
    value = row.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str) or (allow_int and isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    kind = "text or an integer" if allow_int else "text"
    raise ValueError(f"field {name!r} is a {type(value).__name__}, expected {kind}")


def _problem(
    row: dict,
    i: int,
    path: Path,
    question_field: str,
    answer_field: str,
    split: str | None,
    *,
    clean: bool = False,
    token_budget: int = 0,
) -> dict:
    """One checked problem dict from one parsed row; ValueError saying what is wrong. clean: the reader knows the
    row holds no refused number (skips the walk); token_budget > 0: the row's text is bounded (see read_problems)."""
    for name in (question_field, answer_field):
        if name not in row or row[name] is None:
            raise ValueError(f"missing field {name!r}")
    bad = None if clean else _find_bad_number(row)
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
    if token_budget > 0:
        max_chars = max_text_chars(token_budget)
        n = len(question) + len(answer) + len(rationale) + sum(len(p["question"]) + len(p["answer"]) for p in probes)
        if n > max_chars:
            raise ValueError(f"{n:,} characters of text (question, answer, rationale, probes), more than the "
                             f"{max_chars:,} a dialogue can hold (data.token_budget={token_budget} tokens of at most "
                             f"{MAX_CHARS_PER_TOKEN} characters)")  # fmt: skip
    row_id = _text_field(row, "id", allow_int=True)
    row_split = _text_field(row, "split")
    extra = {k: v for k, v in row.items() if k not in (question_field, answer_field, "probes", "rationale")}
    return {
        "id": row_id if row_id is not None else f"{path.stem}-{i}",
        "question": question.strip(),
        "answer": answer,
        "rationale": rationale,
        "probes": probes,
        "split": sys.intern(split if split is not None else (row_split or path.stem)),  # one string per split
        "meta": json.dumps(extra, default=str),
    }


class LoadedProblems(NamedTuple):
    problems: list[dict]
    """the valid rows as problem dicts, in file order"""
    skipped: list[DataError]
    """why each left-out row was bad (empty unless on_error="skip")"""
    numbers: array = array("q")
    """where each problem is in the file: its line (JSONL, CSV; 1-based) or row index (Parquet, JSON array)"""
    unit: str = "line"
    """what the numbers count: line or row"""

    def where(self, i: int) -> str:
        """Where problem i is, as DataError names it: line N or row N."""
        return f"{self.unit} {self.numbers[i]}"


def max_text_chars(token_budget: int) -> int:
    """The size bound on a row's raw text for a run whose dialogues must fit token_budget tokens."""
    return token_budget * MAX_CHARS_PER_TOKEN


def read_problems(
    path: str | Path,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    split: str | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    token_budget: int = 0,
) -> LoadedProblems:
    """Problems in a .jsonl / .json / .parquet / .csv file and the rows left out (see the module docstring).
    token_budget > 0: a row with more text than max_text_chars(token_budget) is a bad row, never tokenised."""
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
    problems, skipped, numbers = [], [], array("q")
    unit, reads = _read_rows(path)
    for i, (number, row, clean) in enumerate(reads):
        if not isinstance(row, DataError):
            try:
                problems.append(_problem(row, i, path, question_field, answer_field, split, clean=clean,
                                         token_budget=token_budget))  # fmt: skip
                numbers.append(number)
                continue
            except ValueError as e:
                row = DataError(path, f"{unit} {number}", str(e))
        if on_error == "raise":
            raise row
        skipped.append(row)
    if not problems:
        why = f" ({len(skipped)} bad rows skipped; first: {skipped[0]})" if skipped else ""
        raise DataError(path, "", f"no problems{why}")
    return LoadedProblems(problems, skipped, numbers, unit)


def load_problems(
    path: str | Path,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    split: str | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    token_budget: int = 0,
) -> list[dict]:
    """Problems in a .jsonl / .json / .parquet / .csv file as our problem dicts (see the module docstring).

    question_field / answer_field name the columns to read; split labels the problems (default: the row's "split"
    field, else the file's stem). Other fields are kept as JSON in meta; a "rationale" field fills the rationale.
    on_error="raise" (default): the first bad row raises DataError naming file and line; "skip": bad rows are left
    out and their count is logged (a warning). token_budget > 0 bounds each row's text (see read_problems).
    """
    loaded = read_problems(path, question_field=question_field, answer_field=answer_field, split=split,
                           on_error=on_error, token_budget=token_budget)  # fmt: skip
    if loaded.skipped:
        log.warning(
            "%s: skipped %d bad row(s) of %d (data.on_error=skip); first: %s",
            path, len(loaded.skipped), len(loaded.skipped) + len(loaded.problems), loaded.skipped[0],
        )  # fmt: skip
    return loaded.problems
