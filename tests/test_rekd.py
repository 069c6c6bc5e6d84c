"""REKD: selection estimators, the predictor's blindness to unselected input, losses, data, config, resume."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from exgrpo_fast.rekd import data as D
from exgrpo_fast.rekd import model as M
from exgrpo_fast.rekd import train as T
from exgrpo_fast.rekd.config import ConfigError, EncoderConfig, parse_args, preset, validate

# ----------------------------------------------------------------------------------------------------------------
# selection estimators


def _noise(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return M.logistic_noise(torch.Size(shape), "cpu", g)


def test_gumbel_st_matches_definition():
    a = torch.tensor([[-1.5, 0.2, 2.0], [0.7, -0.3, 0.0]], dtype=torch.float64, requires_grad=True)
    g = _noise(a.shape).double()
    tau = 0.7
    w = torch.randn(a.shape, dtype=torch.float64)
    z, p = M.sample_mask(a, "gumbel_st", tau, g)
    # forward: exactly the hard sample 1[a + g > 0]
    assert torch.equal(z.detach(), (a.detach() + g > 0).double())
    assert torch.allclose(p, torch.sigmoid(a.detach()))
    (z * w).sum().backward()
    # backward: d/da of the relaxed sample sigmoid((a+g)/tau) = s(1-s)/tau, times the upstream gradient
    s = torch.sigmoid((a.detach() + g) / tau)
    torch.testing.assert_close(a.grad, w * s * (1 - s) / tau)


def test_hard_concrete_matches_definition():
    a = torch.tensor([[-3.0, -0.2, 0.4, 3.0, 1.0]], dtype=torch.float64, requires_grad=True)
    g = _noise(a.shape, 3).double()
    tau = 0.5
    z, _ = M.sample_mask(a, "hard_concrete", tau, g)
    s = torch.sigmoid((a.detach() + g) / tau)
    stretched = s * (M.ZETA - M.GAMMA) + M.GAMMA
    torch.testing.assert_close(z.detach(), stretched.clamp(0, 1))
    w = torch.randn(a.shape, dtype=torch.float64)
    (z * w).sum().backward()
    inside = (stretched > 0) & (stretched < 1)
    want = torch.where(inside, w * (M.ZETA - M.GAMMA) * s * (1 - s) / tau, torch.zeros_like(w))
    torch.testing.assert_close(a.grad, want)
    # P(z > 0): closed form vs Monte Carlo over 200k samples
    a2 = torch.tensor([-1.0, 0.0, 1.5])
    zz, p = M.sample_mask(a2.expand(200_000, 3), "hard_concrete", tau, _noise((200_000, 3), 5))
    torch.testing.assert_close((zz > 0).float().mean(0), p[0], atol=5e-3, rtol=0)


def test_gumbel_st_sampling_probability():
    a = torch.tensor([-1.0, 0.0, 2.0])
    z, p = M.sample_mask(a.expand(200_000, 3), "gumbel_st", 0.5, _noise((200_000, 3), 1))
    torch.testing.assert_close(z.mean(0), p[0], atol=5e-3, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# the predictor cannot see unselected input


def _tiny_prep(task: str, n: int = 16) -> T.Prepared:
    cfg = preset(task)
    cfg.data.n_train, cfg.data.n_test = n, n
    return T.prepare_data(cfg)


def _tiny_model(task: str, prep) -> M.REModel:
    cfg = preset(task)
    cfg.student = EncoderConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    return T.build_re_model(cfg, "student", prep).eval()


@pytest.mark.parametrize("estimator", ["gumbel_st", "hard_concrete"])
def test_text_predictor_blind_to_unselected_tokens(estimator):
    prep = _tiny_prep("text")
    model = _tiny_model("text", prep)
    b = T._batch(prep.train, torch.arange(8), "cpu")
    sel = M.selectable(b)
    a = model.select_logits(b)
    z, _ = M.sample_mask(a, estimator, 0.5, _noise(a.shape, 7))
    z = torch.where(sel, z, torch.ones_like(z))
    hidden = sel & (z == 0)
    assert hidden.any() and (sel & (z > 0)).any()
    base = model.predict(b, z)
    vocab = len(prep.tokenizer)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        other = torch.randint(len(D.SPECIALS), vocab, b["input_ids"].shape, generator=g)
        b2 = dict(b, input_ids=torch.where(hidden, other, b["input_ids"]))
        assert not torch.equal(b2["input_ids"], b["input_ids"])
        assert torch.equal(model.predict(b2, z), base)  # bit-identical
    # sanity: changing a *selected* token does change the prediction
    shown = sel & (z > 0)
    b3 = dict(b, input_ids=torch.where(shown, (b["input_ids"] + 1) % vocab, b["input_ids"]))
    assert not torch.equal(model.predict(b3, z), base)


def test_image_predictor_blind_to_unselected_patches():
    prep = _tiny_prep("image")
    model = _tiny_model("image", prep)
    b = T._batch(prep.train, torch.arange(8), "cpu")
    a = model.select_logits(b)
    z, _ = M.sample_mask(a, "gumbel_st", 0.5, _noise(a.shape, 2))
    base = model.predict(b, z)
    img = b["pixel_values"]
    p = 8
    g = img.shape[-1] // p
    # pixel mask of the unselected patches: (B, P) -> (B, g, g) -> (B, 1, S, S)
    hid = (z == 0).float().reshape(-1, g, g).repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None]
    assert hid.sum() > 0
    noise = 100 * torch.randn_like(img)
    b2 = dict(b, pixel_values=img * (1 - hid) + noise * hid)
    assert torch.equal(model.predict(b2, z), base)
    b3 = dict(b, pixel_values=img * hid + noise * (1 - hid))
    assert not torch.equal(model.predict(b3, z), base)


# ----------------------------------------------------------------------------------------------------------------
# losses against hand-computed values


def test_kd_loss_hand_computed():
    s = torch.tensor([[1.0, 2.0, 0.0]])
    t = torch.tensor([[0.0, 1.0, 3.0]])
    temp = 2.0

    def softmax(x):
        e = [math.exp(v / temp) for v in x]
        return [v / sum(e) for v in e]

    ps, pt = softmax([1.0, 2.0, 0.0]), softmax([0.0, 1.0, 3.0])
    want = temp**2 * sum(q * math.log(q / r) for q, r in zip(pt, ps))
    assert abs(float(M.kd_loss(s, t, temp)) - want) < 1e-6
    # mean over the batch; zero when equal
    two = M.kd_loss(torch.cat([s, t]), torch.cat([t, t]), temp)
    assert abs(float(two) - want / 2) < 1e-6
    # kd.only_correct: rows with weight 0 do not count
    assert abs(float(M.kd_loss(torch.cat([s, t]), torch.cat([t, t]), temp, torch.tensor([True, False]))) - want) < 1e-6


def test_rationale_and_sparsity_losses_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 9.0]])
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    sel = torch.tensor([[True, True, True, False]])  # the last unit does not count
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = -(math.log(sig(2.0)) + math.log(1 - sig(-1.0)) + math.log(1 - sig(0.5))) / 3
    assert abs(float(M.rationale_loss(logits, target, sel)) - want) < 1e-6
    p = torch.tensor([[0.2, 0.6, 0.1, 1.0], [0.0, 0.3, 0.3, 0.9]])
    sel2 = torch.tensor([[True, True, True, False], [True, True, False, False]])
    frac = (0.2 + 0.6 + 0.1 + 0.0 + 0.3) / 5
    assert abs(float(M.sparsity_loss(p, sel2, 0.1)) - abs(frac - 0.1)) < 1e-6
    cont = (0.4 + 0.5 + 0.3) / 3  # pairs (0,1), (1,2) of row 0 and (0,1) of row 1
    assert abs(float(M.continuity_loss(p, sel2)) - cont) < 1e-6


def test_rationale_f1():
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    gold = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    f1 = T.rationale_f1(pred, gold, torch.ones_like(pred))
    torch.testing.assert_close(f1, torch.tensor([0.5, 0.0, 1.0]))


# ----------------------------------------------------------------------------------------------------------------
# data


def test_builtin_text_task_defeats_bag_of_words():
    d = D.make_text_task(3000, 0)
    pos, neg = set(D.POSITIVE), set(D.NEGATIVE)
    right = 0.0
    for words, y, g in zip(d.words, d.labels, d.gold):
        score = sum(w in pos for w in words) - sum(w in neg for w in words)
        right += 0.5 if score == 0 else float((score > 0) == (y == 1))
        for i in g:  # gold = un-negated words of the label's polarity
            assert words[i] in (pos if y == 1 else neg)
            assert i == 0 or words[i - 1] not in D.NEGATORS
        for i, w in enumerate(words):
            if w in (pos | neg) and i not in g:
                assert words[i - 1] in D.NEGATORS
    assert 0.8 < right / 3000 < 0.92  # counting words: 7/8 expected; context gives 100%
    assert D.make_text_task(5, 1).words == D.make_text_task(5, 1).words  # seeded


def test_builtin_image_task():
    d = D.make_image_task(64, 0, image_size=32, patch_size=8, num_classes=4)
    assert d.images.shape == (64, 1, 32, 32) and d.gold.shape == (64, 16)
    assert set(d.gold.sum(1).tolist()) <= {1, 2}
    tmpl = torch.from_numpy(D.image_templates(4, 8))
    for i in range(4):
        r, c = divmod(int(torch.nonzero(d.gold[i])[0]), 4)
        patch = d.images[i, 0, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8]
        assert (patch - tmpl[d.labels[i]]).abs().mean() < 0.5  # the gold patch shows the class pattern (+ noise)


def test_user_text_jsonl_and_csv_with_gold(tmp_path: Path):
    rows = [
        {"text": "the plot was great", "label": "pos", "rationale": [3]},
        {"text": "not great , just awful", "label": "neg", "rationale": [4]},
        {"text": "a fine film", "label": "pos", "rationale": []},
    ]
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    d = D.load_text_file(f)
    assert d.label_names == ["neg", "pos"] and d.labels == [1, 0, 1]
    assert d.gold == [{3}, {4}, set()]
    tok = D.build_word_tokenizer(d.words)
    enc = D.encode_texts(tok, d, 16)
    assert enc["gold"][0].tolist()[:4] == [False, False, False, True]
    assert enc["word_index"][1, 5] == 4  # token 5 is word 4 ([CLS] first)
    c = tmp_path / "test.csv"
    c.write_text('text,label,rationale\n"so great",pos,1\n"so dull",neg,"[1]"\n')
    d2 = D.load_text_file(c, d.label_names)
    assert d2.labels == [1, 0] and d2.gold == [{1}, {1}]


@pytest.mark.parametrize(
    "content, msg",
    [
        ('{"text": "ok", "label": 1}\n{"text": "bad", "label": 0, "rationale": [5]}\n', ":2: rationale indices [5]"),
        ('{"text": "ok", "label": 1}\n{"label": 0}\n', ":2: missing field 'text'"),
        ('{"text": "ok", "label": 1}\nnot json\n', ":2: not valid JSON"),
        ('{"text": "ok", "label": 1, "rationale": [0]}\n{"text": "b", "label": 0}\n', ":2: 'rationale' is missing"),
    ],
)
def test_user_text_bad_file(tmp_path: Path, content: str, msg: str):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(D.DataError, match="bad.jsonl" + msg.replace("[", r"\[").replace("]", r"\]")):
        D.load_text_file(f)


def test_user_image_npz(tmp_path: Path):
    imgs = np.random.default_rng(0).random((6, 16, 16)).astype(np.float32)
    rat = np.zeros((6, 4), dtype=np.int64)
    rat[:, 1] = 1
    np.savez(tmp_path / "ok.npz", images=imgs, labels=np.array([0, 1, 0, 1, 2, 2]), rationale=rat)
    d = D.load_image_file(tmp_path / "ok.npz", 8)
    assert d.images.shape == (6, 1, 16, 16) and d.gold[:, 1].all() and d.label_names == ["0", "1", "2"]
    np.savez(tmp_path / "bad.npz", images=imgs, labels=np.array([0, 1, 0, 1, 2, 2]), rationale=rat[:, :3])
    with pytest.raises(D.DataError, match=r"bad.npz: 'rationale' must have shape \(6, 4\)"):
        D.load_image_file(tmp_path / "bad.npz", 8)


def test_main_bad_data_exits_2_before_writing(tmp_path: Path, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "x", "label": 1}\n{"text": "", "label": 0}\n')
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        T.main(["--data.train_path", str(f), "--log.out_dir", str(out)])
    assert e.value.code == 2
    assert "bad.jsonl:2: 'text' must be a non-empty string" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# config


def test_config_toml_flags_and_errors(tmp_path: Path):
    f = tmp_path / "c.toml"
    f.write_text('task = "image"\nseed = 3\n[kd]\nrationale_weight = 2\n[select]\ntarget_sparsity = 0.2\n')
    cfg = parse_args(["--config", str(f), "--kd.temperature", "3", "--data.train_path", "x.npz"])
    assert cfg.task == "image" and cfg.seed == 3 and cfg.kd.rationale_weight == 2.0 and cfg.kd.temperature == 3.0
    assert cfg.select.target_sparsity == 0.2 and cfg.select.continuity_weight == 0.0  # image preset kept
    assert cfg.data.train_path == "x.npz"
    cfg = parse_args(["--config", str(f), "--select.target_sparsity", "0.3", "--log.out_dir", "/tmp/d"])
    assert cfg.select.target_sparsity == 0.3 and cfg.log.out_dir == "/tmp/d"
    assert cfg.log.progress == "auto"  # bars only on a terminal, as the trainer's log.progress
    assert parse_args(["--log.progress", "false", "--log.plot", "FALSE"]).log.progress is False  # trainer booleans
    with pytest.raises(ConfigError, match="select.target_sparsity=1.5"):
        parse_args(["--select.target_sparsity", "1.5"])
    f.write_text("[kd]\nrationale_wieght = 2\n")
    with pytest.raises(ConfigError, match="unknown config field 'kd.rationale_wieght'"):
        parse_args(["--config", str(f)])
    cfg = preset("text")
    cfg.teacher.hidden_size = 8
    with pytest.raises(ConfigError, match="teacher"):
        validate(cfg)


# ----------------------------------------------------------------------------------------------------------------
# pipeline: results, pictures, resume


def _tiny_run_cfg(out: Path, task: str = "text"):
    cfg = preset(task)
    cfg.data.n_train, cfg.data.n_test = 64, 32
    cfg.teacher = EncoderConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    cfg.student = EncoderConfig(hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16)
    cfg.teacher_train.steps = cfg.student_train.steps = 6
    cfg.teacher_train.batch_size = cfg.student_train.batch_size = 8
    cfg.log.out_dir, cfg.log.log_every, cfg.log.save_every, cfg.log.eval_every = str(out), 2, 2, 0
    cfg.log.progress, cfg.log.n_pictures = False, 3
    return validate(cfg)


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for r in rows:
        r.pop("ex_per_s", None)
    return rows


@pytest.mark.parametrize("task", ["text", pytest.param("image", marks=pytest.mark.slow)])
def test_pipeline_writes_results_pictures_and_resumes_invisibly(tmp_path: Path, task: str, monkeypatch):
    full = T.run(_tiny_run_cfg(tmp_path / "full", task))
    assert [r["model"] for r in full["rows"]] == ["teacher", "student_re", "student_rekd"]
    for r in full["rows"]:
        assert 0 <= r["acc"] <= 1 and 0 <= r["sparsity"] <= 1 and r["rationale_f1"] is not None
    run_dir = tmp_path / "full"
    assert json.loads((run_dir / "results.json").read_text())["rows"][0]["model"] == "teacher"
    assert (run_dir / ("rationales.html" if task == "text" else "rationales.png")).is_file()
    assert (run_dir / "plot.png").is_file() and (run_dir / "models" / "teacher" / "selector").is_dir()
    # crash in the middle of the student REKD stage, then resume: same results, same metrics.jsonl
    calls = {"n": 0}
    real = M.rationale_loss

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(M, "rationale_loss", crashing)
    cfg = _tiny_run_cfg(tmp_path / "crash", task)
    with pytest.raises(KeyboardInterrupt):
        T.run(cfg)
    monkeypatch.setattr(M, "rationale_loss", real)
    cfg.log.resume = True
    resumed = T.run(cfg)
    assert resumed["rows"] == full["rows"]
    assert _rows(tmp_path / "crash" / "metrics.jsonl") == _rows(run_dir / "metrics.jsonl")


def test_teacher_rationale_f1_on_builtin_text(tmp_path: Path):
    """Issue 16: the default text teacher (predictor warm-up + context head) finds the gold cues, F1 > 0.8."""
    cfg = preset("text")
    cfg.data.n_test = 200
    cfg.log.progress, cfg.log.eval_every = False, 0
    prep = T.prepare_data(validate(cfg))
    torch.manual_seed(0)
    teacher = T.build_re_model(cfg, "teacher", prep)
    teacher = T.train_stage("teacher", teacher, prep, cfg, cfg.teacher_train, tmp_path, T.Metrics(tmp_path / "m.jsonl"))
    ev = T.evaluate(teacher, prep.test, cfg)
    assert ev["rationale_f1"] > 0.8, ev
    assert ev["acc"] > 0.9, ev
    assert ev["sparsity"] < 0.2, ev


def test_context_head_sees_neighbours_only():
    """head_context = 1: token i's selection logit changes with tokens i-1, i+1 (given a selector that does not mix
    tokens), never with i+2; head_context = 0 sees token i only."""
    prep = _tiny_prep("text")
    cfg = preset("text")
    for k in (0, 1):
        cfg.select.head_context = k
        torch.manual_seed(0)
        model = T.build_re_model(cfg, "student", prep).eval()
        model.selector = _TokenwiseEncoder(model.selector)
        b = T._batch(prep.test, torch.arange(2), "cpu")
        a = model.select_logits(b)
        b2 = dict(b)
        ids = b["input_ids"].clone()
        ids[:, 3] = (ids[:, 3] + 1) % prep.tokenizer.vocab_size + 4
        b2["input_ids"] = ids
        a2 = model.select_logits(b2)
        changed = (a - a2).abs().amax(0) > 0
        want = {3} if k == 0 else {2, 3, 4}
        assert set(torch.nonzero(changed).flatten().tolist()) == want


class _TokenwiseEncoder(torch.nn.Module):
    """The encoder's word embeddings only (no attention): hidden state i depends on token i alone."""

    def __init__(self, enc):
        super().__init__()
        self.emb = enc.get_input_embeddings()

    def forward(self, input_ids, attention_mask):
        return types.SimpleNamespace(last_hidden_state=self.emb(input_ids))


def test_predictor_warmup_then_slowed_predictor(tmp_path: Path, monkeypatch):
    """Warm-up steps move only the predictor; afterwards, with predictor_lr_mult = 0, only the selector moves."""
    prep = _tiny_prep("text")
    cfg = preset("text")
    cfg.student_train = T.StageConfig(steps=8, batch_size=4, weight_decay=0.0)
    cfg.select.predictor_warmup_frac, cfg.select.predictor_lr_mult = 0.5, 0.0
    cfg.log.progress, cfg.log.eval_every, cfg.log.save_every, cfg.log.log_every = False, 0, 4, 1
    snaps = []
    save = T.save_checkpoint

    def record(run_dir, stage, step, done, model, *a):
        snaps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return save(run_dir, stage, step, done, model, *a)

    monkeypatch.setattr(T, "save_checkpoint", record)
    torch.manual_seed(0)
    model = T.build_re_model(cfg, "student", prep)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    T.train_stage("student_re", model, prep, cfg, cfg.student_train, tmp_path, T.Metrics(tmp_path / "m.jsonl"))
    assert len(snaps) == 2  # after step 4 (end of warm-up) and step 8

    def same(a, b, part):
        return all(torch.equal(a[k], b[k]) for k in a if k.startswith(part))

    for sel_part, pred_part in (("selector.", "predictor."), ("select_head.", "classify_head.")):
        assert same(init, snaps[0], sel_part) and not same(init, snaps[0], pred_part)
        assert same(snaps[0], snaps[1], pred_part) and not same(snaps[0], snaps[1], sel_part)
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["lr_predictor"] > 0 for r in rows] == [True] * 3 + [False] * 5  # lr after each step's sched.step()


def test_evaluate_batches_of_different_text_widths():
    prep = _tiny_prep("text")
    model = _tiny_model("text", prep)
    assert len(set(prep.test["n_words"][i : i + 4].max().item() for i in range(0, 16, 4))) > 1
    ev = T.evaluate(model, prep.test, preset("text"), bs=4)
    assert torch.cat(ev["masks"]).shape == (16, int(prep.test["n_words"].max()))


def test_one_writer_and_no_code_from_checkpoints(tmp_path: Path):
    """A second REKD run on a run dir someone writes is refused; a checkpoint whose pickle would run code is refused
    on resume, and the code does not run."""
    import os

    from exgrpo_fast.errors import CheckpointError, RunDirError
    from exgrpo_fast.rundir import RunLock

    cfg = _tiny_run_cfg(tmp_path / "run")
    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunDirError, match="REKD run dir .* is in use by another process"):
            T.run(cfg)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    ckpt = tmp_path / "run" / "checkpoints" / "teacher" / "step-000002"
    ckpt.mkdir(parents=True)
    torch.save({"stage": "teacher", "step": 2, "model": Payload()}, ckpt / "state.pt")
    (ckpt.parent / "latest").write_text("step-000002")
    with pytest.raises(CheckpointError, match="state.pt: refused"):
        T.load_latest(tmp_path / "run", "teacher")
    assert not (tmp_path / "pwned").exists()
