"""User problem files: every format, GSM8K answers, and malformed rows reported with file and line."""

import json

import pytest

from exgrpo_fast.data.sources import load_problems, parse_answer

GSM = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_csv(path, rows, header="question,answer"):
    import csv

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header.split(","))
        w.writerows(rows)
    return path


def write_parquet(path, rows):
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.mark.parametrize(
    "text, answer, rationale",
    [
        (GSM, "72", GSM.rsplit("####", 1)[0].strip()),
        ("#### 1,000", "1000", ""),
        ("42", "42", ""),
        ("$1,234.50", "1234.50", ""),
        (" Paris ", "Paris", ""),
        (7, "7", ""),
        (2.5, "2.5", ""),
        (3.0, "3", ""),
    ],
)
def test_parse_answer(text, answer, rationale):
    assert parse_answer(text) == (answer, rationale)


@pytest.mark.parametrize(
    "text, answer",
    [("0,5", "0,5"), ("1,2", "1,2"), ("12,34", "12,34"), ("1,234", "1234"), ("-1,234,567.5", "-1234567.5")],
)
def test_parse_answer_drops_commas_only_as_thousands_separators(text, answer):
    """A decimal comma or a list stays text ("0,5" never becomes "05"); "1,234" is the number 1234."""
    assert parse_answer(text) == (answer, "")


@pytest.mark.parametrize(
    "bad", [None, "", "   ", "work #### ", "steps #### seventy", "#### x", True, float("nan"), [1]]
)
def test_parse_answer_rejects(bad):
    with pytest.raises(ValueError):
        parse_answer(bad)


def test_gsm8k_jsonl(tmp_path):
    f = write_jsonl(
        tmp_path / "gsm8k.jsonl",
        [{"question": "Natalia sold clips...", "answer": GSM}, {"question": "Q2", "answer": "So 5 #### 5"}],
    )
    probs = load_problems(f)
    assert [p["answer"] for p in probs] == ["72", "5"]
    assert probs[0]["rationale"].endswith("72 clips.") and "####" not in probs[0]["rationale"]
    assert probs[0]["id"] == "gsm8k-0" and probs[0]["split"] == "gsm8k" and probs[0]["probes"] == []
    assert set(probs[0]) == {"id", "question", "answer", "rationale", "probes", "split", "meta"}
    assert load_problems(f, split="train")[1]["split"] == "train"


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_every_format_and_custom_fields(tmp_path, fmt):
    rows = [
        {"problem": "What is 2+2?", "solution": "#### 4", "id": "a"},
        {"problem": "What is 1,000+1?", "solution": "1,001", "id": "b"},
    ]
    f = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        write_jsonl(f, rows)
    elif fmt == "json":
        f.write_text(json.dumps(rows))
    elif fmt == "csv":
        write_csv(f, [[r["problem"], r["solution"], r["id"]] for r in rows], header="problem,solution,id")
    else:
        write_parquet(f, rows)
    probs = load_problems(f, question_field="problem", answer_field="solution")
    assert [(p["id"], p["question"], p["answer"]) for p in probs] == [
        ("a", "What is 2+2?", "4"),
        ("b", "What is 1,000+1?", "1001"),
    ]


def test_rows_with_probes(tmp_path):
    probe = {"kind": "verify", "question": "Is 4 right?", "answer": "yes"}
    f = write_jsonl(tmp_path / "p.jsonl", [{"question": "2+2?", "answer": "4", "probes": [probe]}])
    assert load_problems(f)[0]["probes"] == [probe]
    f = write_jsonl(tmp_path / "bad.jsonl", [{"question": "2+2?", "answer": "4", "probes": [{"kind": "guess"}]}])
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 1: .*probe"):
        load_problems(f)


GOOD = {"question": "q", "answer": "1"}


@pytest.mark.parametrize(
    "bad_row, why",
    [
        ({"answer": "1"}, "missing field 'question'"),
        ({"question": "q"}, "missing field 'answer'"),
        ({"question": "  ", "answer": "1"}, "empty question"),
        ({"question": "q", "answer": "x #### "}, "####"),
        ("{not json", "bad JSON"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_row, why):
    # a blank line before the bad one: line numbers are the file's, not the row index
    f = tmp_path / "m.jsonl"
    f.write_text(
        json.dumps(GOOD)
        + "\n\n"
        + json.dumps(GOOD)
        + "\n"
        + (bad_row if isinstance(bad_row, str) else json.dumps(bad_row))
        + "\n"
    )
    with pytest.raises(ValueError, match=rf"m\.jsonl: line 4: .*{why}"):
        load_problems(f)


def test_malformed_csv_names_file_and_line(tmp_path):
    f = write_csv(tmp_path / "m.csv", [["q1", "1"], ["q2", ""], ["q3", "3"]])
    with pytest.raises(ValueError, match=r"m\.csv: line 3: .*answer"):
        load_problems(f)
    f = write_csv(tmp_path / "e.csv", [["q1", "1"], ["q2", "2"], ["", "3"]])
    with pytest.raises(ValueError, match=r"e\.csv: line 4: empty question"):
        load_problems(f)
    f = write_csv(tmp_path / "c.csv", [["q1", "1"]], header="prompt,answer")
    with pytest.raises(ValueError, match=r"c\.csv: line 2: missing field 'question'"):
        load_problems(f)


def test_malformed_parquet_names_file_and_row(tmp_path):
    f = write_parquet(tmp_path / "m.parquet", [GOOD, GOOD, {"question": "q", "answer": "x #### oops"}])
    with pytest.raises(ValueError, match=r"m\.parquet: row 2: .*unparsable"):
        load_problems(f)
    f = write_parquet(tmp_path / "n.parquet", [GOOD, {"question": None, "answer": "2"}])
    with pytest.raises(ValueError, match=r"n\.parquet: row 1: missing field 'question'"):
        load_problems(f)


def test_malformed_json_and_files(tmp_path):
    f = tmp_path / "m.json"
    f.write_text('[{"question": "q", "answer": "1"},\n {"question": "q" "answer": 2}]')
    with pytest.raises(ValueError, match=r"m\.json: line 2: bad JSON"):
        load_problems(f)
    f.write_text(json.dumps([GOOD, GOOD, {"question": "q"}]))
    with pytest.raises(ValueError, match=r"m\.json: row 2: missing field 'answer'"):
        load_problems(f)
    with pytest.raises(ValueError, match=r"x\.txt: unsupported"):
        load_problems(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="no such file"):
        load_problems(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no problems"):
        load_problems(tmp_path / "empty.jsonl")
    f = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, {"question": "q2", "answer": 7}])  # int and str answers
    assert [p["answer"] for p in load_problems(f)] == ["1", "7"]


def test_csv_multiline_cells_and_jsonl_named_json(tmp_path):
    f = write_csv(tmp_path / "ml.csv", [["first\nquestion", "1"], ["q2", "2"], ["q3", "#### x"]])
    with pytest.raises(ValueError, match=r"ml\.csv: line 5: unparsable"):  # header 1, row 1 on 2-3, q2 on 4
        load_problems(f)
    f = write_csv(tmp_path / "ok.csv", [["first\nquestion", "1"]])
    assert load_problems(f)[0]["question"] == "first\nquestion"
    f = write_jsonl(tmp_path / "lines.json", [GOOD, {"question": "q", "answer": "2", "split": "dev"}])
    assert [p["split"] for p in load_problems(f)] == ["lines", "dev"]
    (tmp_path / "lines.json").write_text(json.dumps(GOOD) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"lines\.json: line 2: missing field 'answer'"):
        load_problems(tmp_path / "lines.json")


# ---- every row checked up front: numbers, encodings, types; on_error="skip"

BIG = "9" * 400


@pytest.mark.parametrize("line, why", [
    ('{"question": "q", "answer": %s}' % BIG, r"field 'answer': a 400-digit integer is too large"),
    ('{"question": "q", "answer": 1e400}', r"field 'answer': 1e400 is outside the float64 range"),
    ('{"question": "q", "answer": NaN}', r"field 'answer': NaN is not a finite number"),
    ('{"question": "q", "answer": -Infinity}', r"field 'answer': -Infinity is not a finite number"),
    ('{"question": "q", "answer": "1", "difficulty": NaN}', r"field 'difficulty': NaN"),
    ('{"question": "q", "answer": "NaN"}', r"answer 'NaN' is not a finite number"),
    ('{"question": "q", "answer": "1e400"}', r"answer '1e400' is not a finite number"),
    ('{"question": "q", "answer": "%s"}' % BIG, r"answer 9999999999\.\.\.999999 \(400 characters\) is too large"),
    ('{"question": 5, "answer": "1"}', r"field 'question' is a int, expected text"),
    ('{"question": "q", "answer": [1]}', r"answer is a list"),
    ('{"question": "q", "answer": true}', r"unusable answer True"),
    ('{"question": "q", "answer": "1", "id": [1]}', r"field 'id' is a list"),
    ('{"question": "q", "answer": "1", "rationale": 3}', r"field 'rationale' is a int, expected text"),
    ('{"question": "q", "answer": "1", "split": {}}', r"field 'split' is a dict"),
    ('{"question": "q", "answer": "1", "probes": [{"kind": "step", "question": "s", "answer": NaN}]}',
     r"field 'probes\[0\]\.answer': NaN"),
    ('{"question": "q", "answer": "1", "probes": [{"kind": "step", "question": 7, "answer": "1"}]}',
     r"probes\[0\]\.question must be non-empty text"),
    ('[1, 2]', "expected a JSON object, got list"),
])  # fmt: skip
def test_bad_values_named_with_file_and_line(tmp_path, line, why):
    from exgrpo_fast.errors import DataError, UserError

    f = tmp_path / "v.jsonl"
    f.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"v\.jsonl: line 2: .*{why}") as info:
        load_problems(f)
    assert isinstance(info.value, UserError) and info.value.where == "line 2"


def test_numbers_in_range_are_kept_exactly(tmp_path):
    f = write_jsonl(
        tmp_path / "n.jsonl",
        [
            {"question": "q", "answer": 10**300},
            {"question": "q", "answer": 2.5},
            {"question": "q", "answer": -1e20},
            {"question": "q", "answer": "1e5"},
        ],
    )
    assert [p["answer"] for p in load_problems(f)] == [str(10**300), "2.5", "-100000000000000000000", "1e5"]


def test_bad_utf8_named_with_line(tmp_path):
    from exgrpo_fast.errors import DataError

    f = tmp_path / "u.jsonl"
    f.write_bytes(b'{"question": "q", "answer": "1"}\n{"question": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"u\.jsonl: line 2: not valid UTF-8 \(byte 0xe9 at column 18\)"):
        load_problems(f)
    f = tmp_path / "u.csv"
    f.write_bytes(b'question,answer\nq,1\n"multi\nline",2\nq\xff,3\n')
    with pytest.raises(DataError, match=r"u\.csv: line 5: not valid UTF-8 \(byte 0xff\)"):
        load_problems(f)
    f = tmp_path / "u.json"
    f.write_bytes(b'[{"question": "q", "answer": "1"},\n {"question": "\xc3(", "answer": "1"}]')
    with pytest.raises(DataError, match=r"u\.json: line 2: not valid UTF-8 \(byte 0xc3 at column 16\)"):
        load_problems(f)
    f.write_bytes(b'\xef\xbb\xbf[{"question": "caf\xc3\xa9", "answer": "1"}]')  # a BOM and valid UTF-8 are fine
    assert load_problems(f)[0]["question"] == "café"


def test_csv_truncated_last_row_and_bad_quoting(tmp_path):
    from exgrpo_fast.errors import DataError

    f = tmp_path / "t.csv"
    f.write_text("question,answer\nq1,1\nq2,12")  # was "q2,123\n": the 12 must not be taken silently
    with pytest.raises(DataError, match=r"t\.csv: line 3: the file ends inside this row"):
        load_problems(f)
    f.write_text('question,answer\nq1,1\n"q2,5\n')  # unterminated quote
    with pytest.raises(DataError, match=r"t\.csv: line 3: bad CSV"):
        load_problems(f)


def test_on_error_skip_keeps_valid_rows_and_counts(tmp_path, caplog):
    from exgrpo_fast.data.sources import read_problems
    from exgrpo_fast.errors import ConfigError, DataError

    f = tmp_path / "s.jsonl"
    f.write_bytes(
        b'{"question": "a", "answer": "1"}\n{"question": "b", "answer": NaN}\n{bad\n'
        b'{"question": "c\xff", "answer": "3"}\n{"question": "d", "answer": 4}\n'
    )
    loaded = read_problems(f, on_error="skip")
    assert [(p["question"], p["answer"]) for p in loaded.problems] == [("a", "1"), ("d", "4")]
    assert [e.where for e in loaded.skipped] == ["line 2", "line 3", "line 4"]
    with caplog.at_level("WARNING"):
        assert len(load_problems(f, on_error="skip")) == 2
    assert "skipped 3 bad row(s) of 5" in caplog.text
    f.write_text('{"question": "b", "answer": NaN}\n')
    with pytest.raises(DataError, match=r"s\.jsonl: no problems \(1 bad rows skipped; first: .*line 1: .*NaN"):
        load_problems(f, on_error="skip")
    with pytest.raises(ConfigError, match="on_error='ignore'"):
        load_problems(f, on_error="ignore")
