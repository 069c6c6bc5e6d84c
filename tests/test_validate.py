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
