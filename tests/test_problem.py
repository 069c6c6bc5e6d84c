"""Probe hygiene (data.problem.dialogue_probes) for every problem source: a user's file read by the loader, probes
written by the HF teacher, and the built-in task; and in every consumer: SFT dialogues, rollout turns, rewards,
reference reply lengths, the trainer's and the eval CLI's data (data.splits.load_data)."""

import itertools
import json
import logging
import re

import pytest

from exgrpo_fast.config import TrainConfig
from exgrpo_fast.data.lengths import reference_replies
from exgrpo_fast.data.probes import TEMPLATES, write_probes_with_teacher
from exgrpo_fast.data.problem import (
    CHECKABLE,
    PROBE_KINDS,
    Probe,
    Problem,
    checkable_probes,
    dialogue_probes,
    hygienic_order,
    rollout_user_turns,
    sft_dialogue,
)
from exgrpo_fast.data.sources import load_problems
from exgrpo_fast.data.splits import load_data
from exgrpo_fast.rewards import score_dialogue

QUESTION = "Tom has 3 apples. He gets 4 more. How many apples does Tom have?"
# arriving inverse-first: the inverse probe states the final amount (7) that the verify and counterfactual probes
# after it ask about, and explain (the whole solution) is not last
RAW_PROBES = [
    {"kind": "inverse", "question": "Tom has some apples. He gets 4 more. Now he has 7. How many at first?",
     "answer": "3"},
    {"kind": "explain", "question": "Why?", "answer": "Because 3+4=7."},
    {"kind": "verify", "question": "Is 7 right?", "answer": "yes"},
    {"kind": "counterfactual", "question": "If he had 5 at first, how many now?", "answer": "9"},
    {"kind": "step", "question": "How many after step 1?", "answer": "7"},
]  # fmt: skip
HYGIENIC = ["verify", "counterfactual", "step", "inverse", "explain"]


def assert_hygienic(kinds: list[str]) -> None:
    """No probe that states the final amount (inverse) before one that asks about it; explain (the whole
    solution) last."""
    if "inverse" in kinds:
        assert all(k in ("inverse", "explain") for k in kinds[kinds.index("inverse") :]), kinds
    if "explain" in kinds:
        assert kinds.index("explain") == len(kinds) - 1, kinds


def user_file(tmp_path, n=10, name="user.jsonl"):
    path = tmp_path / name
    rows = [{"id": f"q{i}", "question": QUESTION.replace("3 apples", f"{i + 3} apples"), "answer": str(i + 7),
             "probes": RAW_PROBES} for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hygienic_order_every_ordering_of_kinds():
    """For every ordering of every subset of kinds: the result is hygienic, a permutation, and stable (the kinds
    that may come in any order keep their relative order)."""
    for k in range(len(PROBE_KINDS) + 1):
        for kinds in itertools.permutations(PROBE_KINDS, k):
            order = hygienic_order(kinds)
            assert sorted(order) == list(range(len(kinds)))
            out = [kinds[i] for i in order]
            assert_hygienic(out)
            free = [x for x in kinds if x not in ("inverse", "explain")]
            assert [x for x in out if x not in ("inverse", "explain")] == free


def test_user_rows_through_the_loader_are_asked_in_hygienic_order(tmp_path):
    row = load_problems(user_file(tmp_path, n=1))[0]
    assert [p["kind"] for p in row["probes"]] == [p["kind"] for p in RAW_PROBES]  # the loader keeps the file order
    problem = Problem.from_dict(row)
    assert [p.kind for _, p in dialogue_probes(problem)] == HYGIENIC
    # SFT dialogue: question, answer, then the probes in that order (explain included, last)
    sft = sft_dialogue(problem)
    asked = [t["content"] for t in sft.turns[2::2]]
    by_question = {p["question"]: p["kind"] for p in RAW_PROBES}
    assert [by_question[q] for q in asked] == HYGIENIC
    assert "Now he has 7" not in " ".join(t["content"] for t in sft.turns[: 2 * HYGIENIC.index("inverse") + 2])
    # rollouts and evaluation: the question, then the checkable probes, in the same order
    turns = rollout_user_turns(problem)
    assert turns[0] == problem.question
    assert [by_question[q] for q in turns[1:]] == [k for k in HYGIENIC if k in CHECKABLE]
    assert [p.kind for p in checkable_probes(problem)] == [k for k in HYGIENIC if k in CHECKABLE]
    # rewards pair each response with the probe asked in that turn
    answers = {p["kind"]: p["answer"] for p in RAW_PROBES}
    responses = ["Answer: 7"] + [f"Answer: {answers[by_question[q]]}" for q in turns[1:]]
    score = score_dialogue(problem, responses)
    assert score["probe"] == 1.0 and score["task"] == 1.0
    assert all(score[f"probe_{k}"] == 1.0 for k in ("inverse", "verify", "counterfactual", "step"))
    # the reference replies the auto max_new_tokens measures come in the same order
    assert reference_replies(problem)[1:] == [f"Answer: {answers[k]}" for k in HYGIENIC if k in CHECKABLE]


def test_raw_order_is_the_explicit_opt_out(tmp_path):
    problem = Problem.from_dict({**load_problems(user_file(tmp_path, n=1))[0], "probe_order": "raw"})
    assert [p.kind for _, p in dialogue_probes(problem)] == [p["kind"] for p in RAW_PROBES]
    assert [t["content"] for t in sft_dialogue(problem).turns[2::2]] == [p["question"] for p in RAW_PROBES]
    assert problem.to_dict()["probe_order"] == "raw" and Problem.from_dict(problem.to_dict()) == problem
    assert "probe_order" not in Problem("a", "q", "1").to_dict()  # default rows (and probe cache keys) unchanged
    with pytest.raises(ValueError, match="probe_order='sorted'"):
        Problem("a", "q", "1", probe_order="sorted")


class InverseFirstTeacher:
    """A fake HF teacher: writes a probe of the kind its prompt asks for and re-answers it consistently."""

    def __call__(self, prompts):
        out = []
        for p in prompts:
            if "Correct answer:" in p:
                kind = next(k for k, t in TEMPLATES.items() if t.format(question="", answer="", rationale="")
                            .split("\n\n", 1)[1][:40] in p)  # fmt: skip
                out.append(f"Probe: {kind} check of this problem?\nAnswer: {'yes' if kind == 'verify' else 7}")
            else:
                kind = re.search(r"Question: (\w+) check", p).group(1)
                out.append(f"Answer: {'yes' if kind == 'verify' else 7}")
        return out


def test_teacher_written_probes_are_asked_in_hygienic_order(tmp_path):
    rows = [{"id": f"u{i}", "question": f"Ann has {i + 2} pens. She gets 3 more. How many?", "answer": str(i + 5),
             "rationale": f"{i + 2}+3={i + 5}.", "probes": []} for i in range(12)]  # fmt: skip
    kinds = ("inverse", "verify", "counterfactual")
    ds = write_probes_with_teacher(rows, "fake/teacher", k=3, cache_dir=str(tmp_path), seed=0, rounds=1, kinds=kinds,
                                   generate_fn=InverseFirstTeacher())  # fmt: skip
    written = [[p["kind"] for p in row["probes"]] for row in ds]
    inverse_first = [i for i, kinds in enumerate(written) if kinds and kinds[0] == "inverse" and len(kinds) > 1]
    assert inverse_first, written  # the teacher's seeded draw writes some inverse probes first: the case under test
    for row in ds:
        problem = Problem.from_dict(row)
        kinds = [p.kind for _, p in dialogue_probes(problem)]
        assert sorted(kinds) == sorted(p["kind"] for p in row["probes"])
        assert_hygienic(kinds)
        assert [q for q in rollout_user_turns(problem)[1:]] == [f"{k} check of this problem?" for k in kinds]


def test_builtin_task_order_is_unchanged():
    """The built-in teacher already writes hygienic order: dialogues ask the probes exactly as stored."""
    from exgrpo_fast.data.tasks import make_problems

    for p in make_problems("train", 200, seed=3):
        assert [i for i, _ in dialogue_probes(p)] == list(range(len(p.probes)))


def test_load_data_applies_hygiene_and_logs_the_opt_out(tmp_path, caplog):
    cfg = TrainConfig()
    cfg.data.train_path, cfg.data.n_test = str(user_file(tmp_path)), 2
    with caplog.at_level(logging.WARNING):
        train, held_out = load_data(cfg, tmp_path)
    assert "10 of 10 problems ask their probes in another order than stored" in caplog.text
    for p in train + held_out["test_id"]:
        assert [q.kind for _, q in dialogue_probes(p)] == HYGIENIC
    caplog.clear()
    cfg.data.probe_order = "raw"
    with caplog.at_level(logging.WARNING):
        train, held_out = load_data(cfg, tmp_path)
    assert "data.probe_order=raw: probes are asked as stored; 10 of 10 problems" in caplog.text
    for p in train + held_out["test_id"]:
        assert [q.kind for _, q in dialogue_probes(p)] == [r["kind"] for r in RAW_PROBES]


def test_probe_kinds_are_one_string_each():
    a, b = Probe("".join(["ver", "ify"]), "q", "a"), Probe("verify", "q", "a")
    assert a.kind is b.kind
