"""Answer extraction, matching, probe scoring and the DSU bonus on hand-made cases."""

import pytest

from exgrpo_fast.rewards import RewardConfig, answers_match, extract_answer, score_dialogue

PROBLEM = {
    "question": "Tom has 3 apples. He gets 4 more. He gives away 2. How many apples does Tom have?",
    "answer": "5",
    "probes": [
        {"kind": "step", "question": "How many after step 1?", "answer": "7"},
        {"kind": "explain", "question": "Why?", "answer": "Because 3+4=7 and 7-2=5."},
        {"kind": "verify", "question": "Is 6 right?", "answer": "no"},
    ],
}


@pytest.mark.parametrize(
    "text, want",
    [("3+4=7. 7-2=5. Answer: 5", "5"), ("Answer: 5.", "5"), ("the answer is 12", "12"), ("blah #### 1,000", "1,000"),
     ("3+4=7 so 7", "7"), ("Answer: no", "no"), ("I think yes", "yes"), ("", None), ("no digits here", "no"),
     ("nothing", None), ("Answer: 3\nAnswer: 4", "4"), ("I answered 3", "3")],
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize(
    "pred, gold, ok",
    [("5", "5", True), ("5.0", "5", True), ("1,000", "1000", True), ("1/2", "0.5", True), ("$12", "12", True),
     ("5 apples", "5", True), ("6", "5", False), ("Yes", "yes", True), ("no", "yes", False), (None, "5", False),
     ("-3", "-3", True), ("five", "5", False)],
)
def test_answers_match(pred, gold, ok):
    assert answers_match(pred, gold) is ok


def test_all_right_pays_full_dsu():
    r = score_dialogue(PROBLEM, ["3+4=7. 7-2=5. Answer: 5", "Answer: 7", "Answer: no"])
    assert r == {"total": 2.0, "task": 1.0, "probe": 1.0, "dsu": 1.0, "format": 1.0, "probe_step": 1.0,
                 "probe_verify": 1.0}


def test_partial_probes_scale_dsu():
    r = score_dialogue(PROBLEM, ["Answer: 5", "Answer: 8", "Answer: no"])
    assert (r["task"], r["probe"], r["dsu"]) == (1.0, 0.5, 0.5)
    assert r["total"] == pytest.approx(1.0 + 0.5 * 0.5 + 0.5 * 0.5)
    assert RewardConfig(dsu_mode="all") and score_dialogue(PROBLEM, ["Answer: 5", "Answer: 8", "Answer: no"],
                                                           RewardConfig(dsu_mode="all"))["dsu"] == 0.0


def test_no_dsu_when_the_answer_is_wrong():
    """Probes right but the final answer wrong: the dialogue is not coherent with the truth, so no bonus."""
    r = score_dialogue(PROBLEM, ["Answer: 6", "Answer: 7", "Answer: no"])
    assert (r["task"], r["probe"], r["dsu"]) == (0.0, 1.0, 0.0)
    assert r["total"] == pytest.approx(0.5)


def test_missing_and_unparseable_responses():
    r = score_dialogue(PROBLEM, ["I do not know"])
    assert (r["task"], r["probe"], r["dsu"], r["format"]) == (0.0, 0.0, 0.0, 0.0)
    r = score_dialogue(PROBLEM, ["Answer: 5"], RewardConfig(format_weight=0.1))
    assert r["probe"] == 0.0 and r["total"] == pytest.approx(1.1)  # missing probe answers count wrong
    with pytest.raises(ValueError, match="responses is empty"):
        score_dialogue(PROBLEM, [])


def test_problem_without_probes():
    r = score_dialogue({"question": "q", "answer": "3", "probes": []}, ["Answer: 3"])
    assert (r["task"], r["probe"], r["dsu"], r["total"]) == (1.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("kwargs, field", [({"task_weight": -1}, "task_weight"), ({"dsu_mode": "max"}, "dsu_mode"),
                                           ({"probe_weight": float("nan")}, "probe_weight")])
def test_reward_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RewardConfig(**kwargs)
