"""Teacher-written probes: parsing, the self-consistency filter, and the cache (a fake teacher, no model)."""

import json
import re

import pytest

from exgrpo_fast.data.probes import TEMPLATES, consistency, parse_probe, write_probes_with_teacher
from exgrpo_fast.data.tasks import make_problems, recompute_probe_answer


def user_problems(n=4):
    return [
        {
            "id": f"u{i}",
            "question": f"Ann has {i + 2} pens. She gets 3 more. How many pens does Ann have?",
            "answer": str(i + 5),
            "rationale": f"{i + 2}+3={i + 5}.",
            "probes": [],
            "split": "train",
            "meta": "",
        }
        for i in range(n)
    ]


class FakeTeacher:
    """Writes "Probe: <kind> of <question>? / Answer: 7" (verify: "yes"); re-answers consistently except for the
    kinds in `flaky`, whose second re-answer is wrong."""

    def __init__(self, flaky=(), garbage=()):
        self.calls, self.prompts, self.flaky, self.garbage, self.seen = 0, 0, set(flaky), set(garbage), {}

    def __call__(self, prompts):
        self.calls += 1
        self.prompts += len(prompts)
        out = []
        for p in prompts:
            if "Correct answer:" in p:  # writing a probe
                kind = next(
                    k
                    for k, t in TEMPLATES.items()
                    if t.format(question="", answer="", rationale="").split("\n\n", 1)[1][:40] in p
                )
                out.append(
                    "rubbish"
                    if kind in self.garbage
                    else f"Probe: {kind} check of this problem?\nAnswer: {'yes' if kind == 'verify' else 7}"
                )
            else:  # re-answering a probe
                kind = re.search(r"Question: (\w+) check", p).group(1)
                n = self.seen[p] = self.seen.get(p, 0) + 1
                gold = "yes" if kind == "verify" else "7"
                wrong = "no" if kind == "verify" else "8"
                out.append(f"Answer: {wrong if kind in self.flaky and n == 2 else gold}")
        return out


def test_parse_probe():
    assert parse_probe("Probe: How many at first?\nAnswer: 12.", "inverse") == {
        "kind": "inverse",
        "question": "How many at first?",
        "answer": "12",
    }
    assert parse_probe("probe: Is 5 right?\nanswer: Yes", "verify")["answer"] == "yes"
    assert parse_probe("Probe: Is 5 right?\nAnswer: maybe", "verify") is None
    assert parse_probe("Answer: 3", "step") is None and parse_probe("", "step") is None
    assert parse_probe("Probe: What after step 1?\nAnswer: unknown", "step") is None
    assert consistency({"kind": "step", "answer": "7"}, ["Answer: 7", "it is 8"]) == 0.5


def test_self_consistency_filter_and_provenance(tmp_path):
    teacher = FakeTeacher(flaky={"step"}, garbage={"counterfactual"})
    ds = write_probes_with_teacher(
        user_problems(), "fake/teacher", k=4, cache_dir=str(tmp_path), seed=0, generate_fn=teacher, rounds=1
    )
    assert len(ds) == 4 and set(ds.column_names) >= {
        "id",
        "question",
        "answer",
        "rationale",
        "probes",
        "split",
        "meta",
        "teacher",
        "probe_template",
        "probe_consistency",
    }
    for row in ds:
        kinds = [p["kind"] for p in row["probes"]]
        # k=4 draws every checkable kind once: step (inconsistent) and counterfactual (unparseable) are dropped
        assert sorted(kinds) == ["inverse", "verify"], kinds
        assert row["probe_template"] == kinds and row["probe_consistency"] == [1.0, 1.0]
        assert row["teacher"] == "fake/teacher" and row["probe_candidates"] == 4
        assert {p["answer"] for p in row["probes"]} == {"7", "yes"}
    # a lower threshold keeps the half-consistent step probes
    ds = write_probes_with_teacher(
        user_problems(),
        "fake/teacher",
        k=4,
        cache_dir=str(tmp_path),
        seed=0,
        generate_fn=FakeTeacher(flaky={"step"}),
        rounds=1,
        min_consistency=0.5,
    )
    assert all(0.5 in row["probe_consistency"] for row in ds)


def test_cache_is_reused_and_keyed(tmp_path):
    kw = dict(k=2, cache_dir=str(tmp_path), seed=0)
    first = FakeTeacher()
    a = write_probes_with_teacher(user_problems(), "fake/teacher", generate_fn=first, **kw)
    assert first.calls > 0
    again = FakeTeacher()
    b = write_probes_with_teacher(user_problems(), "fake/teacher", generate_fn=again, **kw)
    assert again.calls == 0 and a.to_list() == b.to_list()
    assert all(len(r["probes"]) == 2 for r in b)
    # another seed, k or problem set misses the cache
    for change in ({"seed": 1}, {"k": 1}):
        t = FakeTeacher()
        write_probes_with_teacher(user_problems(), "fake/teacher", generate_fn=t, **{**kw, **change})
        assert t.calls > 0, change
    t = FakeTeacher()
    write_probes_with_teacher(user_problems(3), "fake/teacher", generate_fn=t, **kw)
    assert t.calls > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_problems_with_probes_pass_through(tmp_path):
    built = make_problems("train", 2, seed=0)
    t = FakeTeacher()
    ds = write_probes_with_teacher(
        built + user_problems(1), "fake/teacher", k=2, cache_dir=str(tmp_path), generate_fn=t
    )
    rows = ds.to_list()
    assert [r["probes"] for r in rows[:2]] == [p.to_dict()["probes"] for p in built] and rows[0]["teacher"] == ""
    assert len(rows[2]["probes"]) == 2 and t.calls > 0
    for r in rows[:2]:  # symbolic answers still recompute from meta after the round trip
        meta = json.loads(r["meta"])
        assert all(q["answer"] == recompute_probe_answer(meta, i) for i, q in enumerate(r["probes"]))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="kinds"):
        write_probes_with_teacher(
            user_problems(), "t", cache_dir=str(tmp_path), generate_fn=FakeTeacher(), kinds=("nope",)
        )
    with pytest.raises(ValueError, match="completions"):
        write_probes_with_teacher(user_problems(), "t", cache_dir=str(tmp_path), generate_fn=lambda ps: ["x"])


def test_hf_teacher_from_a_local_checkpoint(tmp_path, monkeypatch):
    """The real path: a local HF checkpoint (the random tiny student) as teacher; its gibberish is filtered out,
    and the cached result is loaded without touching the model again."""
    from exgrpo_fast.data import probes as probes_mod
    from exgrpo_fast.model.tiny import create_tiny_checkpoint

    ckpt = str(create_tiny_checkpoint(tmp_path / "teacher", preset="tiny", seed=0))
    kw = dict(k=1, cache_dir=str(tmp_path / "cache"), seed=0, max_new_tokens=4)
    ds = write_probes_with_teacher(user_problems(2), ckpt, **kw)
    assert len(ds) == 2 and all(r["teacher"] == ckpt and r["probe_candidates"] >= 1 for r in ds)
    assert all(len(r["probes"]) == len(r["probe_consistency"]) <= 1 for r in ds)

    def boom(*a, **k):
        raise AssertionError("the teacher was loaded on a cache hit")

    monkeypatch.setattr(probes_mod, "hf_generate_fn", boom)
    assert write_probes_with_teacher(user_problems(2), ckpt, **kw).to_list() == ds.to_list()
    with pytest.raises(AssertionError, match="cache hit"):  # a different teacher config misses the cache
        write_probes_with_teacher(user_problems(2), ckpt, **{**kw, "max_new_tokens": 5})


def test_changed_teacher_checkpoint_misses_the_cache(tmp_path):
    teacher_dir = tmp_path / "t"
    teacher_dir.mkdir()
    (teacher_dir / "config.json").write_text('{"n_layer": 1}')
    kw = dict(k=1, cache_dir=str(tmp_path / "cache"))
    write_probes_with_teacher(user_problems(1), str(teacher_dir), generate_fn=FakeTeacher(), **kw)
    t = FakeTeacher()
    write_probes_with_teacher(user_problems(1), str(teacher_dir), generate_fn=t, **kw)
    assert t.calls == 0
    (teacher_dir / "config.json").write_text('{"n_layer": 2}')
    write_probes_with_teacher(user_problems(1), str(teacher_dir), generate_fn=t, **kw)
    assert t.calls > 0


def test_rounds_refill_and_duplicates(tmp_path):
    """k above the number of kinds: kinds repeat, but a probe the teacher writes twice is kept once."""
    ds = write_probes_with_teacher(
        user_problems(1), "fake", k=6, cache_dir=str(tmp_path), generate_fn=FakeTeacher(), rounds=3
    )
    qs = [p["question"] for p in ds[0]["probes"]]
    assert len(qs) == len(set(qs)) == 4
    with pytest.raises(ValueError, match="no problems"):
        write_probes_with_teacher([], "fake", cache_dir=str(tmp_path), generate_fn=FakeTeacher())
