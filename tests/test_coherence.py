"""Coherence of probe answers with the student's own main answer (the `coherent` DSU modes), on built-in problems."""

import json

import pytest

from exgrpo_fast.data.coherence import coherence_available, parse_number, probe_coherence
from exgrpo_fast.data.tasks import make_problems


def _problems():
    return make_problems("train", 60, seed=3) + make_problems("test_ood", 30, seed=3)


def test_gold_dialogue_is_coherent():
    for p in _problems():
        meta = json.loads(p.meta)
        for i, probe in enumerate(p.probes):
            if probe.kind == "explain":
                continue
            assert probe_coherence(meta, i, p.answer, probe.answer) == 1.0, (p.question, probe)


@pytest.mark.parametrize("shift", [-2, 1, 5])
def test_coherence_follows_the_students_own_answer(shift):
    """A wrong main answer M = gold + shift: the probe answers it implies are coherent, the gold ones are not."""
    for p in _problems():
        meta = json.loads(p.meta)
        main = int(p.answer) + shift
        for i, probe in enumerate(p.probes):
            kind, params = probe.kind, meta["probes"][i]
            if kind == "explain":
                continue
            if kind in ("counterfactual", "step"):
                implied = str(int(probe.answer) + shift)
                assert probe_coherence(meta, i, str(main), implied) == 1.0
                assert probe_coherence(meta, i, str(main), probe.answer) == 0.0
            elif kind == "verify":
                implied = "yes" if params["candidate"] == main else "no"
                assert probe_coherence(meta, i, str(main), implied) == 1.0
                assert probe_coherence(meta, i, str(main), {"yes": "no", "no": "yes"}[implied]) == 0.0
            else:  # inverse: consistency with the final amount the probe itself states (independent of M)
                assert probe_coherence(meta, i, str(main), probe.answer) == 1.0
                assert probe_coherence(meta, i, str(main), str(int(probe.answer) + 1)) == 0.0


def test_unparseable_answers_are_incoherent():
    p = make_problems("train", 20, seed=1)
    for prob in p:
        meta = json.loads(prob.meta)
        for i, probe in enumerate(prob.probes):
            if probe.kind in ("counterfactual", "step", "verify"):
                assert probe_coherence(meta, i, None, probe.answer) == 0.0
            if probe.kind != "explain":
                assert probe_coherence(meta, i, prob.answer, None) == 0.0


def test_availability_and_errors():
    assert not coherence_available("")
    assert not coherence_available({"question": "q"})
    with pytest.raises(ValueError, match="built-in task"):
        probe_coherence({}, 0, "1", "1")
    assert parse_number("3/4") == parse_number("0.75")
    assert parse_number("seven") is None
    assert parse_number("1,234") == 1234 and parse_number("1,2") is None and parse_number("0,5") is None


def test_coherent_correct_equals_correct_when_the_answer_is_right():
    """With a right main answer, the probe answers coherent with it are exactly the right ones, so on the built-in
    task DSU `coherent_correct` (r_task * coherence) equals `correct` (r_task * probe correctness) for any replies
    (the paper experiment measured the two modes identical to the digit); `coherent` is the mode that differs."""
    import random

    from exgrpo_fast.rewards import RewardConfig, score_dialogue

    rng = random.Random(0)
    differs = 0
    for p in _problems():
        checkable = [q for q in p.probes if q.kind != "explain"]
        for _ in range(8):
            main = p.answer if rng.random() < 0.7 else str(int(p.answer) + rng.choice([-3, -1, 2]))
            replies = []
            for q in checkable:  # a mix of right, off-by-some and unparseable probe replies
                r = rng.random()
                if q.answer in ("yes", "no"):
                    replies.append(rng.choice(["yes", "no", "maybe"]))
                else:
                    replies.append(
                        q.answer if r < 0.5 else str(int(q.answer) + rng.choice([-2, 1])) if r < 0.9 else "?"
                    )
            responses = [f"#### {main}"] + [f"#### {x}" for x in replies]
            dsu = {
                m: score_dialogue(p, responses, RewardConfig(dsu_mode=m))["dsu"]
                for m in ("correct", "coherent", "coherent_correct")
            }
            assert dsu["coherent_correct"] == dsu["correct"], (p.question, responses)
            differs += dsu["coherent"] != dsu["correct"]
    assert differs > 50  # the property is not vacuous: `coherent` does differ
