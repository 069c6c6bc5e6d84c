"""Fuzz: random corruptions of valid JSONL and CSV problem files (truncation, bytes that are not UTF-8, wrong
types, huge and non-finite numbers), seeded, a fixed number of cases per format.

The oracle, for every corrupted file:
- on_error="raise": a DataError (a UserError) whose message starts with the file's path and whose `where` is the
  first damaged line; or, when no line was damaged (a cut exactly at a line end), exactly the clean rows that are
  left. Never any other exception type.
- on_error="skip": exactly the clean rows of the undamaged lines, every value equal to the clean file's (nothing
  silently altered), and one skipped entry per damaged line, in order.
A file with no row left raises DataError "no problems" in both modes.
"""

import csv
import io
import json
import random
from pathlib import Path

import pytest

from exgrpo_fast.data.sources import read_problems
from exgrpo_fast.errors import DataError, UserError

CASES = 150  # per format
BAD_BYTES = [*range(0x80, 0xC0), 0xC0, 0xC1, *range(0xF5, 0x100)]  # never valid UTF-8 where inserted
PROBE = {"kind": "step", "question": "What is 3+4?", "answer": "7"}
ROWS = [
    {"id": "r0", "question": "Tom has 3 apples and buys 4. How many?", "answer": 7},
    {"id": "r1", "question": "Half of 5?", "answer": 2.5, "probes": [PROBE]},
    {"id": "r2", "question": "Natalia sold clips, how many?", "answer": "48/2 = 24. 48+24 = 72 #### 72"},
    {"id": "r3", "question": "Capital of France?", "answer": "Paris", "rationale": "It is Paris."},
    {"id": "r4", "question": "A big one, café prices in €?", "answer": "1,000", "split": "dev"},
    {"id": "r5", "question": "Ten to the twentieth?", "answer": 10**20},
    {"id": "r6", "question": "Is 2+2 = 4?", "answer": "yes", "probes": [PROBE, {**PROBE, "answer": 7}]},
    {"id": "r7", "question": "Negative? 3-10", "answer": -7},
]
CSV_FIELDS = ["question", "answer", "id", "probes"]


# ---- building files as lists of lines (content without terminator), with the row id of each line


def jsonl_lines() -> tuple[list[str], list[str | None]]:
    lines, ids = [], []
    for i, row in enumerate(ROWS):
        if i == 3:  # a blank line: line numbers are the file's, not row indices
            lines.append("")
            ids.append(None)
        lines.append(json.dumps(row, ensure_ascii=False))
        ids.append(row["id"])
    return lines, ids


def csv_line(cells: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(cells)
    return buf.getvalue()


def csv_cells(row: dict) -> list[str]:
    return [row["question"], str(row["answer"]), row["id"], json.dumps(row["probes"]) if "probes" in row else ""]


def csv_lines() -> tuple[list[str], list[str | None]]:
    return [csv_line(CSV_FIELDS)] + [csv_line(csv_cells(r)) for r in ROWS], [None] + [r["id"] for r in ROWS]


# ---- corruptions: each returns the new content of one line (always an invalid row)

RAW = "\x00RAW\x00"  # placeholder replaced by a raw JSON token after dumping


def _dump_with_raw(row: dict, field: str, token: str) -> str:
    return json.dumps({**row, field: RAW}, ensure_ascii=False).replace(json.dumps(RAW), token)


def corrupt_jsonl(rng: random.Random, row: dict) -> str:
    kind = rng.choice(["huge_int", "huge_float", "non_finite", "wrong_type", "wrong_type"])
    if kind == "huge_int":
        token = ("-" if rng.random() < 0.3 else "") + "9" * rng.randint(310, 600)
        return _dump_with_raw(row, rng.choice(["answer", "score"]), token)
    if kind == "huge_float":
        return _dump_with_raw(row, rng.choice(["answer", "score"]), rng.choice(["1e400", "-1e309", "2.5e999"]))
    if kind == "non_finite":
        token = rng.choice(["NaN", "Infinity", "-Infinity"])
        if "probes" in row and rng.random() < 0.5:
            bad_probe = json.dumps({**PROBE, "answer": RAW}).replace(json.dumps(RAW), token)
            return json.dumps({**row, "probes": RAW}, ensure_ascii=False).replace(json.dumps(RAW), f"[{bad_probe}]")
        return _dump_with_raw(row, rng.choice(["answer", "score", "answer"]), token)
    wrong = {
        "question": [5, 2.5, [1], {"a": 1}, None, True, "", "   "],
        "answer": [[1], {"a": 1}, None, True, False, "", "work #### "],
        "id": [[1], {"a": 1}, 2.5, True],
        "rationale": [5, [1], {"a": 1}, True],
        "split": [5, [1], True],
        "probes": [5, {"a": 1}, [1], [{"kind": "nope", "question": "q", "answer": "1"}], [{"kind": "step"}],
                   [{**PROBE, "question": 3}], [{**PROBE, "answer": None}], [{**PROBE, "answer": "NaN"}]],
    }  # fmt: skip
    field = rng.choice(sorted(wrong))
    value = rng.choice(wrong[field])
    new = {**row, field: value}
    if value is None and field == "question":
        del new["question"]
    return json.dumps(new, ensure_ascii=False)


def corrupt_csv(rng: random.Random, row: dict) -> str:
    cells = csv_cells(row)
    kind = rng.choice(["huge", "non_finite", "wrong", "wrong"])
    if kind == "huge":
        cells[1] = rng.choice(["9" * rng.randint(310, 600), "1e400", "-1e309", "1" + "0" * 400 + ".5"])
    elif kind == "non_finite":
        cells[1] = rng.choice(["nan", "NaN", "inf", "-Infinity", "+inf"])
    else:
        choice = rng.randrange(6)
        if choice == 0:
            cells[1] = ""  # empty answer
        elif choice == 1:
            cells[0] = " "  # empty question
        elif choice == 2:
            cells.append("extra")  # more cells than columns
        elif choice == 3:
            cells = cells[:1]  # the answer column missing
        elif choice == 4:
            cells[3] = rng.choice(["{bad json", '[{"kind": 5}]', '[{"kind": "step", "question": "s", "answer": NaN}]'])
        else:
            cells[1] = "steps #### seventy"
    return csv_line(cells)


def insert_bad_bytes(rng: random.Random, line: bytes) -> bytes:
    for _ in range(rng.randint(1, 3)):
        pos = rng.randint(0, len(line))
        line = line[:pos] + bytes([rng.choice(BAD_BYTES)]) + line[pos:]
    return line


# ---- one case


def make_case(fmt: str, rng: random.Random):
    """(file bytes, damaged line numbers, line number -> row id of the surviving lines)."""
    lines, ids = jsonl_lines() if fmt == "jsonl" else csv_lines()
    term = b"\n" if fmt == "jsonl" else b"\r\n"
    data_lines = [i for i, rid in enumerate(ids) if rid is not None]
    blobs = [line.encode() for line in lines]
    damaged = set()
    for i in rng.sample(data_lines, rng.choice([0, 1, 1, 1, 2, 3])):
        row = next(r for r in ROWS if r["id"] == ids[i])
        if rng.random() < 0.35:
            blobs[i] = insert_bad_bytes(rng, blobs[i])
        else:
            blobs[i] = (corrupt_jsonl(rng, row) if fmt == "jsonl" else corrupt_csv(rng, row)).encode()
        damaged.add(i + 1)
    data = b"".join(b + term for b in blobs)
    alive = {i + 1 for i in range(len(blobs))}
    if rng.random() < 0.4 or not damaged:  # truncate at a random byte
        cut = rng.randrange(len(data))
        data = data[:cut]
        start = 0
        for i, b in enumerate(blobs):
            end = start + len(b)  # content is [start, end), terminator [end, end + len(term))
            if cut <= start:
                alive.discard(i + 1)
                damaged.discard(i + 1)
            elif cut < end or (cut == end and fmt == "csv"):
                damaged.add(i + 1)  # a partial line (CSV: a last row with no line break cannot be trusted)
            start = end + len(term)
    rows_alive = {n: ids[n - 1] for n in alive if ids[n - 1] is not None}
    return data, damaged, rows_alive


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The clean files' problems by id (and a check that they read as written)."""
    out = {}
    for fmt, (lines, _) in {"jsonl": jsonl_lines(), "csv": csv_lines()}.items():
        path = tmp_path_factory.mktemp("clean") / f"clean.{fmt}"
        path.write_bytes(b"".join(line.encode() + (b"\n" if fmt == "jsonl" else b"\r\n") for line in lines))
        problems = read_problems(path, split="x").problems
        assert [p["answer"] for p in problems] == ["7", "2.5", "72", "Paris", "1000", str(10**20), "yes", "-7"]
        assert problems[2]["rationale"] == "48/2 = 24. 48+24 = 72" and problems[4]["question"].endswith("€?")
        assert problems[6]["probes"][1]["answer"] == "7"
        out[fmt] = {p["id"]: p for p in problems}
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_fuzz_corrupted_files(tmp_path, clean, fmt):
    rng = random.Random(1234 if fmt == "jsonl" else 4321)
    seen = {"raised": 0, "loaded": 0, "skipped_rows": 0}
    for case in range(CASES):
        data, damaged, rows_alive = make_case(fmt, rng)
        path = tmp_path / f"case{case:03d}.{fmt}"
        path.write_bytes(data)
        context = f"case {case}: damaged lines {sorted(damaged)}, file {data[-300:]!r}"
        good_lines = sorted(n for n in rows_alive if n not in damaged)
        bad_lines = sorted(n for n in rows_alive if n in damaged)
        expected = [clean[fmt][rows_alive[n]] for n in good_lines]
        for on_error in ("raise", "skip"):
            if not expected and (on_error == "skip" or not bad_lines):
                with pytest.raises(DataError, match="no problems") as info:
                    read_problems(path, split="x", on_error=on_error)
                assert str(info.value).startswith(str(path)), context
                continue
            if on_error == "raise" and bad_lines:
                with pytest.raises(DataError) as info:
                    read_problems(path, split="x", on_error=on_error)
                err = info.value
                assert isinstance(err, UserError) and str(err).startswith(f"{path}: line "), (context, str(err))
                assert err.where == f"line {bad_lines[0]}", (context, str(err))
                seen["raised"] += 1
                continue
            loaded = read_problems(path, split="x", on_error=on_error)
            assert loaded.problems == expected, context  # every value exactly as in the clean file
            assert [e.where for e in loaded.skipped] == [f"line {n}" for n in bad_lines], context
            assert all(str(e).startswith(f"{path}: line ") for e in loaded.skipped)
            seen["loaded"] += 1
            seen["skipped_rows"] += len(loaded.skipped)
    # the seeded cases exercise every branch of the oracle
    assert seen["raised"] > CASES // 3 and seen["loaded"] > CASES // 2 and seen["skipped_rows"] > CASES // 3, seen


def test_bad_csv_header_is_a_file_error_in_both_modes(tmp_path):
    path = Path(tmp_path / "h.csv")
    path.write_bytes(b"question,answ\xffer\r\nq,1\r\n")
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match=r"h\.csv: line 1: not valid UTF-8 in the header"):
            read_problems(path, on_error=on_error)
