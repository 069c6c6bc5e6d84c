"""The trainer's splits of user data (data.splits): duplicate questions reported, no held-out question trained on."""

import json
import logging

import pytest

from exgrpo_fast.config import TrainConfig
from exgrpo_fast.data.splits import duplicate_questions, load_data, question_key
from exgrpo_fast.errors import DataError
from exgrpo_fast.validate import validate_run

PROBES = [{"kind": "step", "question": "How many after step 1?", "answer": "1"}]


def write(path, questions, answers=None):
    answers = answers or [str(i) for i in range(len(questions))]
    path.write_text("".join(json.dumps({"id": f"r{i}", "question": q, "answer": a, "probes": PROBES}) + "\n"
                            for i, (q, a) in enumerate(zip(questions, answers))))  # fmt: skip
    return path


def config(train, ood="", n_test=20):
    cfg = TrainConfig()
    cfg.data.train_path, cfg.data.ood_path, cfg.data.n_test, cfg.log.eval_n = str(train), str(ood), n_test, n_test
    cfg.sft.steps = cfg.grpo.steps = 1
    return cfg


def test_duplicates_are_reported_with_counts(tmp_path, caplog):
    questions = [f"What is {i} + 1?" for i in range(50)]
    questions += ["what is 3 +  1?", "WHAT IS 3 + 1?", "What is 7 + 1?"]  # 2 questions repeated, 3 extra rows
    answers = [str(i + 1) for i in range(50)] + ["4", "5", "8"]  # one repeat with another answer
    assert duplicate_questions([{"question": q, "answer": a} for q, a in zip(questions, answers)])[:3] == (2, 3, 1)
    with caplog.at_level(logging.WARNING):
        load_data(config(write(tmp_path / "d.jsonl", questions, answers)), tmp_path)
    assert "2 question(s) appear more than once (3 repeated rows, 1 with another answer)" in caplog.text
    assert "problems 'r3' and 'r50'" in caplog.text


def test_no_test_id_question_is_trained_on(tmp_path, caplog):
    """test_id is drawn from data.train_path by a seeded shuffle: a question repeated in the file lands on both sides
    unless the training copies are removed (they are, and counted)."""
    questions = [f"What is {i % 40} + 1?" for i in range(100)]  # every question 2-3 times
    cfg = config(write(tmp_path / "rep.jsonl", questions))
    with caplog.at_level(logging.WARNING):
        train, held_out = load_data(cfg, tmp_path)
    held = {question_key(p.question) for p in held_out["test_id"]}
    assert len(held_out["test_id"]) == 20 and held
    assert not {question_key(p.question) for p in train} & held
    removed = 100 - 20 - len(train)
    assert removed > 0 and f"{removed} training problem(s) removed: their question is held out ({removed} in " \
        "test_id)" in caplog.text  # fmt: skip


def test_no_ood_question_is_trained_on_and_nothing_left_is_refused(tmp_path):
    train_file = write(tmp_path / "train.jsonl", [f"Q {i}?" for i in range(60)])
    ood_file = write(tmp_path / "ood.jsonl", [f"q  {i}?" for i in range(50, 55)])  # 5 questions also in train
    train, held_out = load_data(config(train_file, ood_file, n_test=10), tmp_path)
    assert len(held_out["test_ood"]) == 5 and len(held_out["test_id"]) == 10
    test_id = {question_key(p.question) for p in held_out["test_id"]}
    ood = {question_key(p.question) for p in held_out["test_ood"]}
    assert len(train) == 60 - 10 - len(ood - test_id)  # the rest of the file, less the questions held out as OOD
    assert not {question_key(p.question) for p in train} & ood
    # the training file itself as data.ood_path: no training problem left, refused before anything is created
    cfg = config(train_file, train_file, n_test=60)
    cfg.log.eval_n = 10
    with pytest.raises(DataError, match=r"train\.jsonl: no training problem left: every question is also in a "
                       r"held-out split"):  # fmt: skip
        validate_run(cfg)
    with pytest.raises(DataError, match="no training problem left"):
        load_data(cfg, tmp_path)
