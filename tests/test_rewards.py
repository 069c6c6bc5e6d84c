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
    [
        ("3+4=7. 7-2=5. Answer: 5", "5"),
        ("Answer: 5.", "5"),
        ("the answer is 12", "12"),
        ("blah #### 1,000", "1,000"),
        ("3+4=7 so 7", "7"),
        ("Answer: no", "no"),
        ("I think yes", "yes"),
        ("", None),
        ("no digits here", "no"),
        ("nothing", None),
        ("Answer: 3\nAnswer: 4", "4"),
        ("I answered 3", "3"),
        ("Answer: 5. Because 3+2=5.", "5"),
        ("Answer: 1.5", "1.5"),
        ("Answer: Yes, it is right.", "yes"),
        ("Answer: **42**", "42"),
        ("so \\boxed{17}.", "17"),
        ("it is 7-2", "2"),
        ("Answer: 3<|im_end|>", "3"),
        ("Answer: 7. So the answer is clear", "7"),
        ("Answer:\nthen 9", "9"),
        ("1,000, then 2,500,", "2,500"),
        ("-4 degrees", "-4"),
        ("the answer is Paris.", "Paris"),
    ],
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize(
    "pred, gold, ok",
    [
        ("5", "5", True),
        ("5.0", "5", True),
        ("1,000", "1000", True),
        ("1/2", "0.5", True),
        ("$12", "12", True),
        ("5 apples", "5", True),
        ("6", "5", False),
        ("Yes", "yes", True),
        ("no", "yes", False),
        (None, "5", False),
        ("-3", "-3", True),
        ("five", "5", False),
    ],
)
def test_answers_match(pred, gold, ok):
    assert answers_match(pred, gold) is ok


@pytest.mark.parametrize(
    "pred, gold, ok",
    [
        ("12", "1,2", False),  # a list or a decimal comma is not a thousands separator
        ("1,2", "12", False),
        ("5", "0,5", False),
        ("05", "0,5", False),
        ("0,5", "0,5", True),  # compared as text
        ("12,34", "1234", False),
        ("1,234", "1234", True),
        ("1,234,567.5", "1234567.5", True),
        ("-1,000", "-1000", True),
        ("1,000 apples", "1000", True),
        ("1,2345", "12345", False),
    ],
)
def test_commas_are_thousands_separators_only(pred, gold, ok):
    assert answers_match(pred, gold) is ok


def test_extracted_numbers_keep_their_commas_only_as_thousands_separators():
    assert extract_answer("the values are 1,2") == "2"  # two numbers, not 12
    assert extract_answer("it costs 1,234,567 in all") == "1,234,567"
    assert extract_answer("Answer: 0,5") == "0,5"


def test_all_right_pays_full_dsu():
    r = score_dialogue(PROBLEM, ["3+4=7. 7-2=5. Answer: 5", "Answer: 7", "Answer: no"])
    assert r == {
        "total": 2.0,
        "task": 1.0,
        "probe": 1.0,
        "dsu": 1.0,
        "coherence": 1.0,
        "format": 1.0,
        "probe_step": 1.0,
        "probe_verify": 1.0,
    }


def test_partial_probes_scale_dsu():
    r = score_dialogue(PROBLEM, ["Answer: 5", "Answer: 8", "Answer: no"])
    assert (r["task"], r["probe"], r["dsu"]) == (1.0, 0.5, 0.5)
    assert r["total"] == pytest.approx(1.0 + 0.5 * 0.5 + 0.5 * 0.5)
    assert (
        RewardConfig(dsu_mode="all")
        and score_dialogue(PROBLEM, ["Answer: 5", "Answer: 8", "Answer: no"], RewardConfig(dsu_mode="all"))["dsu"]
        == 0.0
    )


def test_no_dsu_when_the_answer_is_wrong():
    """DSU "correct": probes right but the final answer wrong, so no bonus. "coherent" on a problem without a
    symbolic chain falls back to probe correctness, whatever the main answer."""
    responses = ["Answer: 6", "Answer: 7", "Answer: no"]
    r = score_dialogue(PROBLEM, responses, RewardConfig(dsu_mode="correct"))
    assert (r["task"], r["probe"], r["dsu"]) == (0.0, 1.0, 0.0)
    assert r["total"] == pytest.approx(0.5)
    assert score_dialogue(PROBLEM, responses, RewardConfig(dsu_mode="coherent"))["dsu"] == 1.0


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


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"task_weight": -1}, "task_weight"),
        ({"dsu_mode": "max"}, "dsu_mode"),
        ({"probe_weight": float("nan")}, "probe_weight"),
        ({"format_weight": float("inf")}, "format_weight"),
        ({"dsu_weight": "1"}, "dsu_weight"),
    ],
)
def test_reward_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RewardConfig(**kwargs)


@pytest.mark.parametrize("split", ["train", "test_ood"])
def test_teacher_dialogues_score_full_marks(split):
    """The symbolic teacher's own replies (sft_dialogue, in rollout_user_turns order) are all right; shifting every
    numeric answer by one makes the checkable numeric ones wrong."""
    from exgrpo_fast.data.tasks import make_problems, rollout_user_turns, sft_dialogue

    for p in make_problems(split, 100, seed=1):
        turns = sft_dialogue(p)
        by_question = {turns[i]["content"]: turns[i + 1]["content"] for i in range(0, len(turns), 2)}
        replies = [by_question[q] for q in rollout_user_turns(p)]
        r = score_dialogue(p, replies)
        assert (r["task"], r["probe"], r["dsu"], r["format"]) == (1.0, 1.0, 1.0, 1.0), (p, replies)
        assert all(r[f"probe_{q.kind}"] == 1.0 for q in p.probes if q.kind != "explain")
        assert "probe_explain" not in r
        wrong = [f"Answer: {int(p.answer) + 1}"] + replies[1:]
        assert score_dialogue(p, wrong, RewardConfig(dsu_mode="correct"))["dsu"] == 0.0
        r = score_dialogue(p, wrong, RewardConfig(dsu_mode="coherent"))
        assert r["task"] == 0.0 and r["dsu"] == r["coherence"]
        # a gold counterfactual / step reply contradicts the shifted answer (inverse and most verify replies do not)
        kinds = {q.kind for q in p.probes}
        assert r["coherence"] < 1.0 or not kinds & {"counterfactual", "step"}, (p, wrong)


def test_dsu_all_mode_and_extra_responses():
    right = ["Answer: 5", "Answer: 7", "Answer: no"]
    assert score_dialogue(PROBLEM, right, RewardConfig(dsu_mode="all"))["dsu"] == 1.0
    assert score_dialogue(PROBLEM, right + ["Answer: 3"])["total"] == 2.0  # replies past the probes are ignored
    r = score_dialogue({**PROBLEM, "answer": "1000"}, ["Answer: 1,000.", "7", "No, it is not"])
    assert (r["task"], r["probe"]) == (1.0, 1.0)


# ---- DSU modes: coherence with the student's own main answer


def _builtin_with(kinds):
    from exgrpo_fast.data.tasks import make_problems

    for p in make_problems("train", 400, seed=5):
        if [q.kind for q in p.probes if q.kind != "explain"] == list(kinds):
            return p
    raise AssertionError(f"no problem with probes {kinds}")


def test_dsu_coherent_rewards_self_consistency_not_truth():
    import json as _json

    from exgrpo_fast.rewards import RewardConfig, score_dialogue

    p = _builtin_with(("counterfactual", "verify"))
    meta = _json.loads(p.meta)
    cf, verify = p.probes[0], p.probes[1]
    wrong = int(p.answer) + 3  # a wrong main answer, and the probe answers it implies
    implied_cf = int(cf.answer) + 3
    implied_verdict = "yes" if meta["probes"][1]["candidate"] == wrong else "no"
    responses = [f"Answer: {wrong}", f"Answer: {implied_cf}", f"Answer: {implied_verdict}"]
    coherent = score_dialogue(p, responses, RewardConfig(dsu_mode="coherent"))
    assert coherent["task"] == 0.0 and coherent["coherence"] == 1.0 and coherent["dsu"] == 1.0
    assert score_dialogue(p, responses, RewardConfig(dsu_mode="coherent_correct"))["dsu"] == 0.0
    assert score_dialogue(p, responses, RewardConfig(dsu_mode="correct"))["dsu"] == 0.0
    # the gold probe answers after a wrong main answer: correct probes, but not what the student's answer implies
    gold = [f"Answer: {wrong}", f"Answer: {cf.answer}", f"Answer: {verify.answer}"]
    s = score_dialogue(p, gold, RewardConfig(dsu_mode="coherent"))
    assert s["probe"] == 1.0 and s["coherence"] < 1.0
    right = [f"Answer: {p.answer}", f"Answer: {cf.answer}", f"Answer: {verify.answer}"]
    for mode in ("correct", "coherent", "coherent_correct", "all"):
        assert score_dialogue(p, right, RewardConfig(dsu_mode=mode))["dsu"] == 1.0


def test_dsu_coherent_falls_back_to_correctness_without_a_chain():
    from exgrpo_fast.data.problem import Probe, Problem
    from exgrpo_fast.rewards import RewardConfig, score_dialogue

    p = Problem("u1", "What is 2+3?", "5", probes=[Probe("step", "And 2+2?", "4")])
    s = score_dialogue(p, ["Answer: 5", "Answer: 4"], RewardConfig(dsu_mode="coherent"))
    assert s["coherence"] == 1.0 and s["dsu"] == 1.0
    s = score_dialogue(p, ["Answer: 5", "Answer: 9"], RewardConfig(dsu_mode="coherent"))
    assert s["coherence"] == 0.0


def test_dsu_mode_is_validated():
    import pytest as _pytest

    from exgrpo_fast.rewards import RewardConfig

    with _pytest.raises(ValueError, match="dsu_mode"):
        RewardConfig(dsu_mode="product")
