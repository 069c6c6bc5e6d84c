"""eval.py on a tiny checkpoint: prints, writes JSON, accuracies in [0, 1]; the eval CLI reproduces a run's final
eval from its config; rollout.max_new_tokens from the data (0 = auto) and its truncation warning; user data's
seeded held-out split and OOD file."""

import dataclasses
import json
import logging
import shutil

import pytest
import torch

from exgrpo_fast import eval as E
from exgrpo_fast.errors import ConfigError, UserError


def test_eval_cli_on_tiny_checkpoint(tmp_path, capsys):
    from exgrpo_fast.model.tiny import create_tiny_checkpoint

    ckpt = create_tiny_checkpoint(tmp_path / "tiny", preset="tiny", seed=0)
    out = tmp_path / "eval.json"
    metrics = E.main([str(ckpt), "--n", "4", "--max_new_tokens", "6", "--out", str(out)])
    data = json.loads(out.read_text())
    for key in ("acc_id", "acc_ood", "probe_acc_id", "reward_id"):
        assert 0.0 <= data[key] <= max(1.0, data[key] if key.startswith("reward") else 1.0)
        assert key in metrics
    assert "acc_id" in capsys.readouterr().out


def test_eval_cli_checks_out_before_the_eval(tmp_path, capsys, monkeypatch):
    """--out is checked before any problem is evaluated (a directory, a file in the way), one line and exit 2."""
    from exgrpo_fast.model.tiny import create_tiny_checkpoint

    ckpt = create_tiny_checkpoint(tmp_path / "tiny", preset="tiny", seed=0)
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: pytest.fail("evaluated before --out was checked"))
    (tmp_path / "blocker").write_text("a file")
    cases = {
        str(tmp_path): f"error: --out {tmp_path}: is a directory; give a file path such as {tmp_path / 'eval.json'}",
        str(tmp_path / "blocker" / "e.json"): f"error: --out {tmp_path / 'blocker' / 'e.json'}: cannot write it: "
        f"{tmp_path / 'blocker'} is not a directory",
    }
    capsys.readouterr()
    for out, message in cases.items():
        with pytest.raises(SystemExit) as info:
            E.main([str(ckpt), "--n", "2", "--out", out])
        assert info.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [message]


def test_eval_cli_on_a_run_that_evaluated_nothing(tmp_path, capsys):
    """A run with log.eval_n 0 (no evals): the eval CLI takes its whole held-out split instead of asking for --n."""
    from exgrpo_fast import config as C
    from exgrpo_fast import train as T

    cfg = C.preset_test()
    cfg.sft.steps, cfg.grpo.steps, cfg.log.eval_n = 1, 0, 0
    T.train(cfg.validate(), run_dir=str(tmp_path / "run"))
    capsys.readouterr()
    E.main([str(tmp_path / "run"), "--out", str(tmp_path / "e" / "eval.json")])  # its folder is created
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["n"] == cfg.data.n_test
    assert f"n {cfg.data.n_test} |" in capsys.readouterr().out


def test_evaluate_perfect_oracle(tmp_path):
    """evaluate scores the student's greedy dialogue: a model that is never right scores 0 everywhere."""
    from exgrpo_fast.data.tasks import builtin_splits
    from exgrpo_fast.model.loading import load_model
    from exgrpo_fast.model.tiny import create_tiny_checkpoint

    model, tok = load_model(create_tiny_checkpoint(tmp_path / "t", seed=1), dtype=torch.float32, device="cpu")
    m = E.evaluate(model, tok, {"test_id": builtin_splits(0, 3, seed=0)["test_id"]}, max_new_tokens=4)
    assert set(m) >= {"acc_id", "reward_id"} and 0.0 <= m["acc_id"] <= 1.0


# ----------------------------------------------------------------------------------------------------------------
# one config for the eval CLI and the trainer's evals

BOOKKEEPING = {"stage", "step", "global_step", "time", "tag", "ckpt", "n", "max_new_tokens", "eval_s"}
"""Keys that are not metrics: the log row's place and time, the eval file's header, and the eval's wall time."""


def test_eval_cli_defaults_reproduce_final_eval(tmp_path, capsys):
    """Train a test-preset run; the eval CLI on its final checkpoint, with no options, writes the same metrics, to
    the last digit, as the run's final eval row in metrics.jsonl (same splits, reward, max_new_tokens, batch)."""
    from exgrpo_fast import config as C
    from exgrpo_fast import train as T

    cfg = C.preset_test()
    run_dir = tmp_path / "run"
    T.train(cfg.validate(), run_dir=str(run_dir))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    final = [r for r in rows if r["stage"] == "eval" and r["tag"] == "final"]
    assert len(final) == 1
    ckpt = run_dir / "checkpoints" / f"grpo-{cfg.grpo.steps:06d}"
    E.main([str(ckpt)])
    data = json.loads((ckpt / "eval.json").read_text())
    metrics = {k: v for k, v in final[0].items() if k not in BOOKKEEPING}
    assert {"acc_id", "acc_ood", "probe_acc_id", "reward_id", "reward_ood"} <= metrics.keys()
    assert {k: v for k, v in data.items() if k not in BOOKKEEPING} == metrics
    assert (data["n"], data["max_new_tokens"]) == (cfg.log.eval_n, cfg.rollout.max_new_tokens)
    # an explicit option overrides the run's value
    capsys.readouterr()
    E.main([str(ckpt), "--n", "2", "--max_new_tokens", "5", "--out", str(tmp_path / "e2.json")])
    assert json.loads((tmp_path / "e2.json").read_text())["n"] == 2
    assert "max_new_tokens 5" in capsys.readouterr().out


def test_auto_max_new_tokens_in_the_trainer_and_the_eval_cli(tmp_path, capsys):
    """rollout.max_new_tokens 0: the run samples with the longest reference reply + 8 (its header says so, the
    saved config keeps 0), and the eval CLI on the run's checkpoint measures the same value."""
    from exgrpo_fast import config as C
    from exgrpo_fast import train as T
    from exgrpo_fast.data.lengths import auto_max_new_tokens
    from exgrpo_fast.data.tasks import builtin_splits
    from exgrpo_fast.model.tiny import build_tiny_tokenizer

    cfg = C.preset_test()
    cfg.rollout.max_new_tokens = 0
    auto = auto_max_new_tokens(build_tiny_tokenizer(), builtin_splits(16, 4, seed=0))
    with T.distributed(cfg) as (rank, world, device):
        run, *_ = T.setup_run(cfg.validate(), rank, world, device, None, str(tmp_path / "run"), None)
    assert run.cfg.rollout.max_new_tokens == auto > 8
    assert f"max_new_tokens {auto} (auto)" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["rollout"]["max_new_tokens"] == 0
    ckpt = tmp_path / "run" / "checkpoints" / "sft-000000"
    shutil.copytree(tmp_path / "run" / "init_model", ckpt)
    E.main([str(ckpt), "--n", "1", "--batch_size", "2"])
    assert json.loads((ckpt / "eval.json").read_text())["max_new_tokens"] == auto


def test_eval_config_from_saved_run_and_flags():
    """eval_config: the saved run config is the base, set options override it, unset ones keep it; without a run
    config the trainer's defaults (TrainConfig()) are the base."""
    from exgrpo_fast import config as C

    base = C.eval_config(C.parse_eval_args(["ckpt"]), None)
    assert base.log.eval_n == C.TrainConfig().log.eval_n
    assert base.rollout.max_new_tokens == C.TrainConfig().rollout.max_new_tokens
    saved = C.preset_test()
    saved.reward.dsu_weight, saved.rollout.batch_size, saved.data.seed = 0.25, 3, 7
    cfg = C.eval_config(C.parse_eval_args(["ckpt", "--max_new_tokens", "11"]), saved.to_dict())
    assert (cfg.reward.dsu_weight, cfg.rollout.batch_size, cfg.data.seed) == (0.25, 3, 7)
    assert (cfg.rollout.max_new_tokens, cfg.log.eval_n) == (11, saved.log.eval_n)
    cfg = C.eval_config(C.parse_eval_args(["ckpt", "--n", "9", "--seed", "2"]), saved.to_dict())
    assert (cfg.log.eval_n, cfg.data.n_test, cfg.data.seed) == (9, 9, 2)  # built-in splits grow to n
    for flag, bad in (("--n", "0"), ("--batch_size", "0"), ("--max_new_tokens", "-1")):
        with pytest.raises(ConfigError, match=flag.lstrip("-")):
            C.eval_config(C.parse_eval_args(["ckpt", flag, bad]), None)


def test_find_run_config_skips_the_model_config(tmp_path):
    """A checkpoint dir's own config.json is the model's: the run's is the one above it."""
    from exgrpo_fast import config as C

    ckpt = tmp_path / "run" / "checkpoints" / "grpo-000003"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 5}))
    assert C.find_run_config(ckpt) is None
    (tmp_path / "run" / "config.json").write_text(json.dumps(C.preset_test().to_dict()))
    saved, run_dir = C.find_run_config(ckpt)
    assert run_dir == tmp_path / "run" and saved["data"]["n_test"] == C.preset_test().data.n_test


# ----------------------------------------------------------------------------------------------------------------
# rollout.max_new_tokens from the data


def test_auto_max_new_tokens_fits_every_reference_reply():
    from exgrpo_fast.data.lengths import AUTO_MARGIN, auto_max_new_tokens, reference_replies, reply_lengths
    from exgrpo_fast.data.problem import ANSWER_PREFIX, format_answer
    from exgrpo_fast.data.tasks import builtin_splits
    from exgrpo_fast.model.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    splits = builtin_splits(40, 10, seed=3)
    p = splits["test_ood"][0]
    replies = reference_replies(p)
    assert replies[0] == format_answer(p.rationale, p.answer)
    assert replies[1:] == [f"{ANSWER_PREFIX}{q.answer}" for q in p.probes if q.kind != "explain"]
    lengths = reply_lengths(tok, [p])
    assert lengths == [len(tok(r, add_special_tokens=False)["input_ids"]) + 1 for r in replies]  # + end-of-turn
    longest = max(max(reply_lengths(tok, ps)) for ps in splits.values())
    assert auto_max_new_tokens(tok, splits) == longest + AUTO_MARGIN
    # the OOD split (longer chains) sets it: a value measured on train alone would cut OOD answers
    assert max(reply_lengths(tok, splits["test_ood"])) > max(reply_lengths(tok, splits["train"]))


def test_explicit_max_new_tokens_warns_naming_the_split(caplog):
    from exgrpo_fast.data.lengths import reply_lengths, resolve_max_new_tokens, truncated_fractions
    from exgrpo_fast.data.tasks import builtin_splits
    from exgrpo_fast.model.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    splits = builtin_splits(40, 20, seed=0)
    fit = max(reply_lengths(tok, splits["train"]) + reply_lengths(tok, splits["test_id"]))
    ood = reply_lengths(tok, splits["test_ood"])
    assert max(ood) > fit
    with caplog.at_level(logging.WARNING, logger="exgrpo_fast.data.lengths"):
        assert resolve_max_new_tokens(tok, splits, fit) == fit
    frac = sum(n > fit for n in ood) / len(ood)
    assert truncated_fractions(tok, splits, fit) == {"train": 0.0, "test_id": 0.0, "test_ood": frac}
    assert len(caplog.records) == 1  # only the split that is cut
    msg = caplog.records[0].getMessage()
    assert "test_ood" in msg and f"{100 * frac:.1f}%" in msg and f"max_new_tokens={fit}" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="exgrpo_fast.data.lengths"):
        resolve_max_new_tokens(tok, splits, max(ood))
    assert not caplog.records
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        resolve_max_new_tokens(tok, splits, -1)


# ----------------------------------------------------------------------------------------------------------------
# user data: a seeded held-out split, an OOD file


def _write_jsonl(path, problems):
    path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in problems))
    return str(path)


def test_user_data_test_split_is_a_seeded_shuffle(tmp_path):
    from exgrpo_fast import config as C
    from exgrpo_fast import train as T
    from exgrpo_fast.data.tasks import builtin_splits

    rows = builtin_splits(30, 0, seed=0)["train"]
    cfg = C.preset_test()
    cfg.data.train_path, cfg.data.n_test = _write_jsonl(tmp_path / "train.jsonl", rows), 5
    train, held = T.load_data(cfg, tmp_path)
    assert set(held) == {"test_id"} and len(held["test_id"]) == 5 and len(train) == 25  # min(n_test, rows // 5)
    test_ids, train_ids = [p.id for p in held["test_id"]], [p.id for p in train]
    assert not set(test_ids) & set(train_ids) and set(test_ids) | set(train_ids) == {p.id for p in rows}
    assert test_ids != [p.id for p in rows[:5]]  # not simply the first rows
    assert train_ids == [p.id for p in rows if p.id not in test_ids]  # training rows keep the file's order
    assert [p.id for p in T.load_data(cfg, tmp_path)[1]["test_id"]] == test_ids  # deterministic
    cfg.data.seed = 1
    assert [p.id for p in T.load_data(cfg, tmp_path)[1]["test_id"]] != test_ids  # and drawn by data.seed


def test_ood_path_is_the_test_ood_split(tmp_path):
    from exgrpo_fast import config as C
    from exgrpo_fast import train as T
    from exgrpo_fast.data.tasks import builtin_splits
    from exgrpo_fast.validate import validate_run

    data = builtin_splits(30, 6, seed=0)
    cfg = C.preset_test()
    cfg.data.train_path = _write_jsonl(tmp_path / "train.jsonl", data["train"])
    cfg.data.ood_path = _write_jsonl(tmp_path / "ood.jsonl", data["test_ood"])
    validate_run(cfg.validate())
    train, held = T.load_data(cfg, tmp_path)
    assert set(held) == {"test_id", "test_ood"}
    assert [p.id for p in held["test_ood"]] == [p.id for p in data["test_ood"][: cfg.data.n_test]]
    assert not {p.id for p in held["test_ood"]} & {p.id for p in train}
    cfg.data.train_path = ""  # with the built-in tasks it replaces the built-in test_ood
    assert [p.id for p in T.load_data(cfg, tmp_path)[1]["test_ood"]] == [p.id for p in held["test_ood"]]
    # read and checked like data.train_path: a bad row names the file and line, up front
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(data["test_ood"][0].to_dict()) + "\n" + json.dumps({"question": "q"}) + "\n")
    cfg.data.ood_path = str(bad)
    with pytest.raises(UserError, match="bad.jsonl"):
        validate_run(cfg)
    # rows without probes need a teacher to write them (or data.num_probes 0)
    cfg.data.ood_path = _write_jsonl(tmp_path / "plain.jsonl", [dataclasses.replace(data["test_ood"][0], probes=[])])
    with pytest.raises(ConfigError, match="data.ood_path=.*plain.jsonl.*without probes"):
        validate_run(cfg)
    # the eval CLI takes it too
    from exgrpo_fast.model.tiny import create_tiny_checkpoint

    ckpt = create_tiny_checkpoint(tmp_path / "tiny", preset="tiny", seed=0)
    ood = _write_jsonl(tmp_path / "ood2.jsonl", data["test_ood"][:2])
    m = E.main([str(ckpt), "--n", "2", "--max_new_tokens", "4", "--ood_path", ood, "--out", str(tmp_path / "o.json")])
    assert "acc_ood" in m and "acc_id" in m


def test_max_new_tokens_zero_is_valid_negative_is_not():
    from exgrpo_fast import config as C

    C.parse_args(["--rollout.max_new_tokens", "0"])
    with pytest.raises(ConfigError, match="rollout.max_new_tokens=-1"):
        C.parse_args(["--rollout.max_new_tokens", "-1"])


# ----------------------------------------------------------------------------------------------------------------
# progress bars only on a terminal (log.progress "auto")


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, s):  # tqdm may draw to it
        return len(s)

    def flush(self):
        pass


def test_bars_on_a_terminal_only():
    assert E.bars_on("auto", _Stream(True)) and not E.bars_on("auto", _Stream(False))
    assert not E.bars_on("auto", object())  # a stream without isatty: not a terminal
    assert E.bars_on(True, _Stream(False)) and not E.bars_on(False, _Stream(True))


@pytest.mark.parametrize("tty", [True, False])
def test_progress_auto_in_the_trainer_and_eval(tmp_path, monkeypatch, capsys, tty):
    """log.progress "auto" (the default): on a terminal the stage and eval bars are drawn; otherwise no bar, the step
    lines alone, and a long eval prints a plain line every EVAL_NOTE_EVERY_S (0 here: every batch)."""
    import sys

    from exgrpo_fast import train as T
    from exgrpo_fast.config import TrainConfig
    from exgrpo_fast.data.tasks import builtin_splits
    from exgrpo_fast.model.loading import load_model
    from exgrpo_fast.model.tiny import create_tiny_checkpoint

    assert TrainConfig().log.progress == "auto"
    monkeypatch.setattr(sys, "stderr", _Stream(tty))
    cfg = TrainConfig()
    assert T._progress(cfg, 0, 10, 0, "sft").disable is not tty
    assert T._progress(cfg, 1, 10, 0, "sft").disable  # other ranks never draw
    drawn = []
    monkeypatch.setattr(E, "tqdm", lambda *a, **k: drawn.append(not k["disable"]) or T.tqdm(*a, **k))
    monkeypatch.setattr(E, "EVAL_NOTE_EVERY_S", 0.0)
    model, tok = load_model(create_tiny_checkpoint(tmp_path / "t", seed=1), dtype=torch.float32, device="cpu")
    capsys.readouterr()
    E.evaluate(model, tok, {"test_id": builtin_splits(0, 4, seed=0)["test_id"]}, max_new_tokens=2, batch_size=2,
               progress="auto")  # fmt: skip
    out = capsys.readouterr().out
    assert drawn == [tty]
    if tty:
        assert "eval |" not in out
    else:
        assert [line.rsplit(" | ", 1)[0] for line in out.splitlines()] == ["eval | 2/4 problems", "eval | 4/4 problems"]
        assert all(line.endswith(" s") for line in out.splitlines())
