"""Up-front validation: config values, data files, model dirs and the token budget, each a UserError naming it."""

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
