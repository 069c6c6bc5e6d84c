"""User problems from files (JSONL / JSON / Parquet / CSV), normalised to our problem dicts.

    load_problems("gsm8k_train.jsonl")  ->  [{"id", "question", "answer", "rationale", "probes", "split", "meta"}]

GSM8K answers ("Natalia sold 48/2 = <<48/2=24>>24 clips ... #### 72") become answer "72" with the text before
"####" as the rationale. A plain answer is kept as written (numbers: commas and "$" dropped). Rows may carry
probes already ([{kind, question, answer}]); otherwise probes is [] and exgrpo_fast.data.probes writes them.

Parquet is read through `datasets`; JSONL and CSV through json / csv, which keep each row's line number (a quoted
CSV cell may span lines) and don't coerce mixed types (7 and "7") the way arrow does.

Malformed input raises ValueError naming the file and where: the 1-based line for JSONL and CSV (the header is
line 1 of a CSV, so its first row is line 2), the 0-based row index for Parquet and JSON arrays. A CSV row shorter
than the header leaves its last fields missing; an empty cell is an empty value.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from exgrpo_fast.data.tasks import PROBE_KINDS

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def parse_answer(raw) -> tuple[str, str]:
    """(answer, rationale) from a raw answer field; ValueError when there is no usable answer."""
    if raw is None or isinstance(raw, bool):
        raise ValueError(f"unusable answer {raw!r}")
    if isinstance(raw, (int, float)):
        if raw != raw:  # NaN: an empty CSV cell
            raise ValueError("empty answer")
        return (str(int(raw)) if float(raw).is_integer() else str(raw)), ""
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
    if _NUMBER.fullmatch(text):
        text = text.replace(",", "").replace("$", "")
    elif gsm8k:  # a GSM8K-style answer must be a number
        raise ValueError(f"unparsable answer {text!r} after '####'")
    return text, rationale


def _check_probes(probes) -> list[dict]:
    if probes is None:
        return []
    if isinstance(probes, str):
        probes = json.loads(probes) if probes.strip() else []
    if not isinstance(probes, list):
        raise ValueError(f"probes must be a list, got {type(probes).__name__}")
    out = []
    for p in probes:
        if not isinstance(p, dict) or not {"kind", "question", "answer"} <= set(p):
            raise ValueError(f"each probe needs kind, question and answer, got {p!r}")
        if p["kind"] not in PROBE_KINDS:
            raise ValueError(f"probe kind {p['kind']!r}: expected one of {PROBE_KINDS}")
        out.append({"kind": str(p["kind"]), "question": str(p["question"]), "answer": str(p["answer"])})
    return out


def _read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """(rows, their 1-based line numbers); blank lines are skipped, a bad line raises with its number. Parsed with
    json rather than arrow: arrow would coerce mixed types (7 and "7") and its errors don't name the line."""
    rows, lines = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno}: bad JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            lines.append(lineno)
    return rows, lines


def _read_csv(path: Path) -> tuple[list[dict], list[int]]:
    """(rows, the line each row starts on). Cells stay text ("1,000" and "007" as written); a quoted cell may span
    lines, so the line numbers come from the reader, not from the row index."""
    import csv

    rows, lines = [], []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return [], []
            header = [h.strip() for h in header]
            end = reader.line_num
            for record in reader:
                start, end = end + 1, reader.line_num
                if not record or all(not c.strip() for c in record):
                    continue
                if len(record) > len(header):
                    raise ValueError(f"{path}: line {start}: {len(record)} cells but {len(header)} columns")
                rows.append(dict(zip(header, record)))
                lines.append(start)
        except csv.Error as e:
            raise ValueError(f"{path}: line {reader.line_num}: bad CSV ({e})") from None
    return rows, lines


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """(rows, where each row is: "line N" or "row N")."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # JSON lines saved under a .json name
                suffix = ".jsonl"
            else:
                raise ValueError(f"{path}: line {e.lineno}: bad JSON ({e.msg})") from None
        else:
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON array of objects")
            for i, row in enumerate(data):
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
            return data, [f"row {i}" for i in range(len(data))]
    if suffix in (".jsonl", ".csv"):
        rows, lines = (_read_jsonl if suffix == ".jsonl" else _read_csv)(path)
        return rows, [f"line {n}" for n in lines]
    from datasets import Dataset

    try:
        rows = Dataset.from_parquet(str(path)).to_list()
    except Exception as e:  # noqa: BLE001 - arrow parse errors: name the file
        raise ValueError(f"{path}: cannot read as parquet: {type(e).__name__}: {e}") from None
    return rows, [f"row {i}" for i in range(len(rows))]


def load_problems(
    path: str | Path, *, question_field: str = "question", answer_field: str = "answer", split: str | None = None
) -> list[dict]:
    """Problems in a .jsonl / .json / .parquet / .csv file as our problem dicts (see the module docstring).

    question_field / answer_field name the columns to read; split labels the problems (default: the row's "split"
    field, else the file's stem). Other fields are kept as JSON in meta; a "rationale" field fills the rationale.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unsupported format {suffix!r}; expected one of {sorted(FORMATS)}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    rows, places = _read_rows(path)
    problems = []
    for i, (row, where) in enumerate(zip(rows, places)):
        try:
            for name in (question_field, answer_field):
                if name not in row or row[name] is None:
                    raise ValueError(f"missing field {name!r}")
            question = row[question_field]
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"empty question in field {question_field!r}")
            answer, rationale = parse_answer(row[answer_field])
            if not rationale and isinstance(row.get("rationale"), str):
                rationale = row["rationale"].strip()
            probes = _check_probes(row.get("probes"))
        except (ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: {where}: {e}") from None
        extra = {k: v for k, v in row.items() if k not in (question_field, answer_field, "probes", "rationale")}
        problems.append({
            "id": str(row["id"]) if row.get("id") not in (None, "") else f"{path.stem}-{i}",
            "question": question.strip(),
            "answer": answer,
            "rationale": rationale,
            "probes": probes,
            "split": split if split is not None else str(row.get("split") or path.stem),
            "meta": json.dumps(extra, default=str),
        })
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems
