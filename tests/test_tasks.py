"""The built-in task and its symbolic teacher: probes checked by recomputation, determinism, disjoint splits."""

import json

import pytest

from exgrpo_fast.data.problem import Dialogue, Probe, Problem
from exgrpo_fast.data.tasks import (
    PROBE_KINDS,
    ArithConfig,
    builtin_dataset,
    builtin_splits,
    checkable_probes,
    make_problems,
    recompute_probe_answer,
    rollout_user_turns,
    run_chain,
    sft_dialogue,
)


@pytest.mark.parametrize("split", ["train", "test_id", "test_ood"])
def test_every_answer_recomputes_from_meta(split):
    for p in make_problems(split, 200, seed=3):
        assert isinstance(p, Problem) and all(isinstance(q, Probe) for q in p.probes)
        meta = json.loads(p.meta)
        values = run_chain(meta["start"], meta["ops"])
        assert p.answer == str(values[-1]) and all(v >= 0 for v in values)
        # the rationale's equations are true arithmetic
        for eq in p.rationale.rstrip(".").split(". "):
            lhs, rhs = eq.split("=")
            assert eval(lhs) == int(rhs), eq  # noqa: S307 - digits and +/- only
        assert len(p.probes) == len(meta["probes"])
        for i, probe in enumerate(p.probes):
            assert probe.kind in PROBE_KINDS
            assert probe.answer == recompute_probe_answer(meta, i), (p.question, probe)


def test_all_kinds_occur_and_verify_has_both_answers():
    problems = make_problems("train", 300, seed=0)
    kinds = [q.kind for p in problems for q in p.probes]
    assert set(kinds) == set(PROBE_KINDS)
    verify = {q.answer for p in problems for q in p.probes if q.kind == "verify"}
    assert verify == {"yes", "no"}


def test_deterministic_under_seed():
    assert make_problems("train", 50, seed=7) == make_problems("train", 50, seed=7)
    assert make_problems("train", 50, seed=7) != make_problems("train", 50, seed=8)


def test_splits_disjoint_and_ood_harder():
    key = lambda p: json.dumps({k: v for k, v in json.loads(p.meta).items() if k != "probes"})  # noqa: E731
    train = {key(p) for p in make_problems("train", 2000, seed=0)}
    test_id = [key(p) for p in make_problems("test_id", 200, seed=0)]
    assert not train & set(test_id)
    ood = [json.loads(p.meta) for p in make_problems("test_ood", 200, seed=0)]
    idd = [json.loads(p.meta) for p in make_problems("test_id", 200, seed=0)]
    assert min(len(m["ops"]) for m in ood) > max(len(m["ops"]) for m in idd)
    assert max(max(n for _, n in m["ops"]) for m in ood) > ArithConfig().id_max_operand


def test_dialogues():
    p = make_problems("train", 1, seed=0)[0]
    turns = sft_dialogue(p)
    assert [t["role"] for t in turns] == ["user", "assistant"] * (1 + len(p.probes))
    assert turns[1]["content"].endswith(f"Answer: {p.answer}")
    assert turns[-1]["content"].startswith("Because")  # explain is in the SFT dialogue...
    users = rollout_user_turns(p)
    assert users[0] == p.question and len(users) == 1 + len(checkable_probes(p))  # ...not in rollouts
    assert "Why?" not in users
    assert rollout_user_turns(p, include_probes=False) == [p.question]
    # rows (dicts from files or a datasets.Dataset) work wherever a Problem does, and round-trip
    row = p.to_dict()
    assert Problem.from_dict(row) == p and list(sft_dialogue(row)) == list(turns) and rollout_user_turns(row) == users


def test_problem_types_check_their_fields():
    with pytest.raises(ValueError, match="probe kind 'guess'"):
        Probe("guess", "q", "a")
    with pytest.raises(ValueError, match="probe kind"):
        Problem.from_dict(
            {"id": "x", "question": "q", "answer": "1", "probes": [{"kind": "nope", "question": "q", "answer": "1"}]}
        )
    assert Dialogue.of(("user", "hi"), ("assistant", "yo"))[1] == {"role": "assistant", "content": "yo"}


def test_splits_dataset_dict_and_config_validation():
    splits = builtin_splits(20, 5, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 20, "test_id": 5, "test_ood": 5}
    ds = builtin_dataset(20, 5, seed=0)  # the same problems as a datasets.DatasetDict (an edge format)
    assert set(ds) == {"train", "test_id", "test_ood"} and len(ds["train"]) == 20 and len(ds["test_ood"]) == 5
    assert [Problem.from_dict(r) for r in ds["test_id"]] == splits["test_id"]
    with pytest.raises(ValueError, match="num_probes"):
        ArithConfig(num_probes=9)
    with pytest.raises(ValueError, match="id_steps"):
        ArithConfig(id_steps=(3, 1))
    with pytest.raises(ValueError, match="split"):
        make_problems("dev", 3, seed=0)


# ---- probe hygiene and the OOD shifts

# what each checkable kind's question states, and what its answer depends on (by hand, independent of tasks.py)
_STATES = {"inverse": {"final"}, "counterfactual": set(), "step": set(), "verify": set()}
_NEEDS = {"inverse": {"start"}, "counterfactual": {"final"}, "step": set(), "verify": {"final"}}


def test_no_probe_reveals_what_a_later_turn_asks_for_in_any_ordering():
    """Every ordering of kinds the teacher can draw: the main question asks for the final amount, and no probe that
    states a quantity comes before a turn whose answer needs it."""
    import itertools
    import random

    from exgrpo_fast.data.tasks import CHECKABLE, ArithConfig, write_probes

    meta0 = {"name": "Tom", "item": "apples", "start": 5, "ops": [["+", 3], ["-", 2]]}
    seen = set()
    for k in range(1, len(CHECKABLE) + 1):
        for kinds in itertools.permutations(CHECKABLE, k):
            cfg = ArithConfig(num_probes=k, probe_kinds=kinds, include_explain=True)
            for seed in range(8):
                probes = write_probes(random.Random(seed), dict(meta0), cfg)
                order = [p.kind for p in probes if p.kind != "explain"]
                seen.add(tuple(order))
                stated: set[str] = set()
                for kind in order:
                    assert not (_NEEDS[kind] & stated), (order, kind)
                    stated |= _STATES[kind]
                assert probes[-1].kind == "explain"
    assert any(o[-1] == "inverse" and len(o) > 1 for o in seen)


def test_inverse_probe_comes_last_in_generated_problems():
    from exgrpo_fast.data.tasks import make_problems

    for p in make_problems("train", 200, seed=2) + make_problems("test_ood", 50, seed=2):
        kinds = [q.kind for q in p.probes if q.kind != "explain"]
        if "inverse" in kinds:
            assert kinds[-1] == "inverse"
            final = f"has {p.answer}."
            assert all(final not in q.question for q in p.probes[: kinds.index("inverse")])


def test_ood_shift_splits():
    import json

    from exgrpo_fast.data.tasks import ArithConfig, builtin_splits, make_problems

    cfg = ArithConfig()
    long_ = make_problems("test_ood_long", 60, seed=1)
    large = make_problems("test_ood_large", 60, seed=1)
    for p in long_:
        m = json.loads(p.meta)
        assert cfg.ood_steps[0] <= len(m["ops"]) <= cfg.ood_steps[1]
        assert max([m["start"]] + [n for _, n in m["ops"]]) <= cfg.id_max_operand
    for p in large:
        m = json.loads(p.meta)
        assert cfg.id_steps[0] <= len(m["ops"]) <= cfg.id_steps[1]
        assert max([m["start"]] + [n for _, n in m["ops"]]) > cfg.id_max_operand
    splits = builtin_splits(4, 3, seed=0, ood_splits=("test_ood_long", "test_ood_large"))
    assert list(splits) == ["train", "test_id", "test_ood_long", "test_ood_large"]
    import pytest

    with pytest.raises(ValueError, match="ood_splits"):
        builtin_splits(4, 3, ood_splits=("train",))


def test_vanilla_sft_dialogue_has_no_probes():
    from exgrpo_fast.data.problem import sft_dialogue
    from exgrpo_fast.data.tasks import make_problems

    p = make_problems("train", 1, seed=0)[0]
    assert len(sft_dialogue(p)) == 2 + 2 * len(p.probes)
    assert len(sft_dialogue(p, include_probes=False)) == 2
