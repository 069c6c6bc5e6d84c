"""Up-front validation: config values, data files, model dirs and the token budget, each a UserError naming it."""

import re

import pytest

from exgrpo_fast import config as C
from exgrpo_fast.errors import ConfigError, DataError, MissingPathError, ModelError
from exgrpo_fast.validate import check_config, validate_run


@pytest.mark.parametrize("field, value, why", [
    ("grpo.lr", float("inf"), r"grpo\.lr=inf: expected a finite number"),
    ("sft.lr", float("nan"), r"sft\.lr=nan"),
    ("grpo.lr", 0.0, r"grpo\.lr=0\.0: expected a finite number > 0"),
    ("optim.grad_clip", float("inf"), r"optim\.grad_clip=inf: expected a finite number"),
])  # fmt: skip
def test_config_values(field, value, why):
    cfg = C.preset_test()
    section, name = field.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=why):
        check_config(cfg)


def test_per_rank_shares():
    cfg = C.preset_test()
    check_config(cfg, world=2)
    cfg.grpo.problems_per_step = 1
    with pytest.raises(ConfigError, match=r"grpo\.problems_per_step=1: expected >= the number of processes \(2\)"):
        check_config(cfg, world=2)


def test_token_budget_against_the_longest_dialogue():
    cfg = C.preset_test()
    validate_run(cfg)
    cfg.data.token_budget = 40
    with pytest.raises(ConfigError, match=r"data\.token_budget=40: the SFT dialogue of problem .* has \d+ tokens"):
        validate_run(cfg)
    cfg.sft.steps = 0
    with pytest.raises(ConfigError, match=r"a rollout of problem .* can reach \d+ tokens .*max_new_tokens=8"):
        validate_run(cfg)


def test_files_and_dirs_named(tmp_path):
    cfg = C.preset_test()
    cfg.data.train_path = str(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="absent.jsonl: no such file"):
        validate_run(cfg)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": 1, "probes": [{"kind": "step", "question": "s", "answer": "1"}]}\n'
                   '{"question": "q", "answer": NaN}\n')  # fmt: skip
    cfg.data.train_path = str(bad)
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: .*NaN"):
        validate_run(cfg)
    cfg.data.on_error = "skip"
    validate_run(cfg)  # one good row with probes remains
    cfg = C.preset_test()
    cfg.model.path = str(tmp_path / "no_model")
    with pytest.raises(MissingPathError, match=f"model path {tmp_path / 'no_model'} does not exist"):
        validate_run(cfg)
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "empty_model" / "config.json").write_text("{")
    cfg.model.path = str(tmp_path / "empty_model")
    with pytest.raises(ModelError, match="config.json: not valid JSON"):
        validate_run(cfg)
    with pytest.raises(MissingPathError, match=f"checkpoint path {tmp_path / 'run'} does not exist"):
        validate_run(C.preset_test(), resume=str(tmp_path / "run"))
    cfg = C.preset_test()
    cfg.loss.teacher_beta = 0.1
    with pytest.raises(ConfigError, match="needs model.teacher_path"):
        validate_run(cfg)


def test_model_config_checked_against_the_weights_before_allocating(tmp_path, capsys, monkeypatch):
    """A config.json that does not match its safetensors (here: it implies a 4096-wide model, 4 GB of embeddings at
    V = 262k) or with vocab_size 0 is a one-line user error found before any run dir or model exists."""
    import json
    import shutil

    import torch

    from exgrpo_fast import train as T
    from exgrpo_fast.model import loading
    from exgrpo_fast.model.tiny import create_tiny_checkpoint

    good = create_tiny_checkpoint(tmp_path / "good", preset="tiny", seed=0)
    capsys.readouterr()  # transformers' progress bars
    config = json.loads((good / "config.json").read_text())
    cases = {
        "wide": ({"hidden_size": 4096, "vocab_size": 262144}, "does not match the weights: model.embed_tokens.weight "
                 "is [262144, 4096] by the config but [104, 128] in model.safetensors"),
        "zero": ({"vocab_size": 0}, "vocab_size=0: expected a positive integer"),
        "float": ({"num_hidden_layers": 2.5}, "num_hidden_layers=2.5: expected a positive integer"),
    }  # fmt: skip
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", None)  # never reached: nothing allocated
    for name, (change, message) in cases.items():
        bad = tmp_path / name
        shutil.copytree(good, bad)
        (bad / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ModelError, match=re.escape(f"{bad / 'config.json'}")):
            loading.check_model_dir(bad)
        out = tmp_path / f"runs-{name}"
        with pytest.raises(SystemExit) as info:
            T.main(["--preset", "test", "--model.path", str(bad), "--log.out_dir", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1 and message in err[0], err
        assert not out.exists()
    loading.check_model_dir(good)
    assert torch.is_tensor(torch.zeros(1))


# ---- user data: characters the tokenizer cannot represent, the size bound on raw text, memory on large files


def _rows(path, questions, probes=True):
    import json

    probe = [{"kind": "step", "question": "How many after step 1?", "answer": "1"}] if probes else []
    path.write_text("".join(json.dumps({"question": q, "answer": str(i % 97), "probes": probe}) + "\n"
                            for i, q in enumerate(questions)))  # fmt: skip
    return path


def _user_cfg(path):
    cfg = C.preset_test()
    cfg.data.train_path, cfg.data.n_test, cfg.log.eval_n = str(path), 4, 4
    return cfg


def test_characters_the_tokenizer_cannot_represent(tmp_path, caplog):
    """The built-in character tokenizer maps every non-ASCII character to <unk>: a few are a warning with counts and
    the first line; more than validate.UNKNOWN_CHAR_ERROR_FRAC of the characters are refused, naming file and line."""
    import logging

    from exgrpo_fast.validate import UNKNOWN_CHAR_ERROR_FRAC

    questions = [f"What does {i} apples cost at the store down the road today?" for i in range(40)]
    questions[5] = "What does a café charge for 2 crêpes and a résumé, in €?"
    with caplog.at_level(logging.WARNING):
        validate_run(_user_cfg(_rows(tmp_path / "few.jsonl", questions)))
    assert "5 of its" in caplog.text and "'é' x3, 'ê' x1, '€' x1" in caplog.text
    assert "read as '<unk>'" in caplog.text and "first at line 6" in caplog.text
    questions = [f"{i} " + "日本語の質問です" * 2 for i in range(40)]
    with pytest.raises(DataError, match=r"cjk\.jsonl: line 1: .*not in the tokenizer's vocabulary .*'日' x80.*more "
                       r"than validate\.UNKNOWN_CHAR_ERROR_FRAC=1%"):  # fmt: skip
        validate_run(_user_cfg(_rows(tmp_path / "cjk.jsonl", questions)))
    assert UNKNOWN_CHAR_ERROR_FRAC == 0.01


def test_raw_text_is_bounded_before_any_tokenizer_sees_it(tmp_path, monkeypatch):
    """A 5 MB question (data.token_budget 4096: at most 131,072 characters) is a bad row named by file and line,
    found by the loader: no tokenizer is ever built (a 50 MB line used to be tokenised first: 12.6 GB, then an
    abort)."""
    import time

    import exgrpo_fast.validate as V

    questions = ["What is 1 + 1?", "x" * 5_000_000 + "?", "What is 2 + 2?"]
    cfg = _user_cfg(_rows(tmp_path / "huge.jsonl", questions))
    monkeypatch.setattr(V, "_tokenizer_for", lambda *a: pytest.fail("tokenizer built before the size check"))
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"huge\.jsonl: line 2: 5,000,025 characters of text .*more than the 131,072 "
                       r"a dialogue can hold \(data\.token_budget=4096 tokens of at most 32 characters\)"):  # fmt: skip
        validate_run(cfg)
    assert time.perf_counter() - t0 < 5
    cfg.data.on_error = "skip"  # like any bad row
    from exgrpo_fast.data.sources import read_problems

    assert len(read_problems(cfg.data.train_path, on_error="skip", token_budget=4096).problems) == 2


def test_large_file_validates_in_bounded_memory(tmp_path):
    """10,000 rows: validation holds the rows it read and one chunk of token ids, never every tokenised dialogue.
    tracemalloc: validate_run's peak above the rows' own memory (8 MiB) stays under 4 MiB whatever the row count
    (measured 1.1 MiB at 10k and 20k rows; the previous code: 60 MiB at 10k, 121 MiB at 20k), and loading streams
    the file (its peak above the problems it returns: under 1 MiB, was the file's size twice)."""
    import gc
    import tracemalloc

    from exgrpo_fast.data.sources import read_problems

    validate_run(_user_cfg(_rows(tmp_path / "warm.jsonl", [f"Is {i} even?" for i in range(30)])))  # imports
    path = _rows(tmp_path / "large.jsonl", [f"Is {i} odd?" for i in range(10_000)])
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        rows = read_problems(path)
        held, read_peak = (m - base for m in tracemalloc.get_traced_memory())
        del rows
        gc.collect()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        validate_run(_user_cfg(path))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    mib = 2**20
    assert held > 4 * mib  # the bound below is small next to the data
    assert read_peak - held < 1 * mib, (read_peak / mib, held / mib)
    assert peak - held < 4 * mib, (peak / mib, held / mib)
