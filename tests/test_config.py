"""Config: defaults, validation naming the field, TOML < CLI precedence, presets, --help, mapping to LossConfig."""

import dataclasses
import re

import pytest

from exgrpo_fast import config as C


def test_defaults_validate_and_sections_are_the_op_configs():
    from exgrpo_fast.ops import LossConfig
    from exgrpo_fast.rewards import RewardConfig

    cfg = C.preset_cpu_default().validate()
    assert isinstance(cfg.loss, LossConfig) and isinstance(cfg.reward, RewardConfig)
    assert {n for n, *_ in C.iter_fields() if n.startswith("loss.")} == {
        f"loss.{f.name}" for f in dataclasses.fields(LossConfig)
    }
    names = [n for n, *_ in C.iter_fields()]
    assert "grpo.group_size" in names and "loss.kl_beta" in names and "seed" in names


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--grpo.group_size", "1"], "grpo.group_size"),
        (["--rollout.top_p", "0"], "rollout.top_p"),
        (["--loss.clip_low", "1.5"], "loss.clip_low"),
        (["--loss.loss_type", "foo"], "loss.loss_type"),
        (["--model.dtype", "int8"], "model.dtype"),
        (["--model.lm_head_chunk_size", "0"], "model.lm_head_chunk_size"),
        (["--sft.lr", "-1"], "sft.lr"),
        (["--grpo.adv_scale", "x"], "grpo.adv_scale"),
        (["--log.eval_n", "1000"], "log.eval_n"),
        (["--loss.teacher_beta", "0.1"], "loss.teacher_beta"),
        (["--grpo.steps", "2.5"], "grpo.steps"),
        (["--grpo.use_probes", "maybe"], "grpo.use_probes"),
        (["--loss.kl_beta", "-0.1"], "loss"),
        (["--loss.delta", "1.1"], "loss.delta"),
        (["--reward.dsu_weight", "-1"], "reward.dsu_weight"),
        (["--reward.dsu_mode", "sum"], "reward.dsu_mode"),
        (["--data.token_budget", "0"], "data.token_budget"),
    ],
)
def test_validation_names_the_field(flags, field):
    with pytest.raises(C.ConfigError, match=field.replace(".", r"\.")) as e:
        C.parse_args(flags)
    assert flags[1] in str(e.value) and isinstance(e.value, ValueError)  # ...and the value


def test_todays_flag_spelling_keeps_working(tmp_path):
    cfg, args = C.parse_args(
        [
            "--grpo.steps",
            "12",
            "--log.out_dir",
            "D",
            "--data.train_path",
            "f.jsonl",
            "--resume",
            str(tmp_path),
            "--grpo.use_probes",
            "false",
            "--loss.dual_clip_c",
            "None",
            "--log.progress=False",
            "--seed",
            "4",
        ]
    )
    assert (cfg.grpo.steps, cfg.log.out_dir, cfg.data.train_path, args.resume) == (12, "D", "f.jsonl", str(tmp_path))
    assert (cfg.grpo.use_probes, cfg.loss.dual_clip_c, cfg.log.progress, cfg.seed) == (False, None, False, 4)
    with pytest.raises(C.ConfigError, match="Unrecognized options: --grpo.stepz"):
        C.parse_args(["--grpo.stepz", "1"])


def test_resume_starts_from_the_saved_config(tmp_path):
    saved = C.preset_test()
    saved.grpo.steps = 5
    (tmp_path / "config.json").write_text(__import__("json").dumps(saved.to_dict()))
    cfg, _ = C.parse_args(["--resume", str(tmp_path / "checkpoints" / "grpo-000002"), "--sft.steps", "1"])
    assert cfg.grpo.steps == 5 and cfg.ops_backend == "reference" and cfg.sft.steps == 1


def test_toml_then_cli_override(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("seed = 3\n[grpo]\nsteps = 7\ngroup_size = 4\n[loss]\ndual_clip_c = 3.0\n[rollout]\ntop_p = 0.9\n")
    cfg, _ = C.parse_args(["--config", str(path), "--grpo.steps", "9", "--loss.dual_clip_c", "none"])
    assert cfg.seed == 3 and cfg.grpo.group_size == 4 and cfg.rollout.top_p == 0.9
    assert cfg.grpo.steps == 9  # CLI beats TOML
    assert cfg.loss.dual_clip_c is None
    for text, match in [
        ("[grpo]\nnot_a_field = 1\n", "bad.toml: unknown config field 'grpo.not_a_field'"),
        ('[grpo]\nsteps = "7"\n', "grpo.steps='7': expected int"),
        ("[grpo]\nsteps = 2.5\n", "grpo.steps=2.5"),
        ("grpo = 3\n", "grpo=3: expected a table"),
        ("[loss]\nclip_low = 1.5\n", "loss.clip_low=1.5"),
        ("[grpo\n", "bad.toml"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(C.ConfigError, match=re.escape(match)):
            C.parse_args(["--config", str(bad)])


def test_progress_is_auto_true_or_false_everywhere(tmp_path):
    """log.progress: "auto" by default (bars on a terminal only); true / false from flags, TOML and a saved
    config.json (older runs saved a bool); anything else names the field."""
    assert C.parse_args([])[0].log.progress == "auto"
    for flag, want in (("auto", "auto"), ("true", True), ("False", False)):
        assert C.parse_args(["--log.progress", flag])[0].log.progress == want
    for text, want in (('progress = "auto"', "auto"), ("progress = false", False), ("progress = true", True)):
        (tmp_path / "p.toml").write_text(f"[log]\n{text}\n")
        assert C.parse_args(["--config", str(tmp_path / "p.toml")])[0].log.progress == want
    assert C.from_dict({"log": {"progress": False}}).log.progress is False
    assert C.from_dict(C.TrainConfig().to_dict()).log.progress == "auto"
    with pytest.raises(C.ConfigError, match="log.progress='sometimes': expected bool or"):
        C.from_dict({"log": {"progress": "sometimes"}})
    with pytest.raises(C.ConfigError, match="--log.progress"):
        C.parse_args(["--log.progress", "sometimes"])


def test_toml_dump_roundtrip(tmp_path):
    cfg = C.preset_gpu()
    path = tmp_path / "dump.toml"
    path.write_text(C.to_toml(cfg))
    back, _ = C.parse_args(["--config", str(path)])
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)


def test_presets():
    cfg, _ = C.parse_args(["--preset", "grpo-no-probes"])
    assert cfg.grpo.use_probes is False and cfg.reward.probe_weight == 0 and cfg.reward.dsu_weight == 0
    cfg, _ = C.parse_args(["--preset", "gpu", "--grpo.steps", "5"])
    assert cfg.model.preset == "gpu-0.5b" and cfg.grpo.steps == 5
    with pytest.raises(ValueError, match="preset"):
        C.parse_args(["--preset", "nope"])


def test_shipped_toml_configs_parse():
    from pathlib import Path

    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.toml")):
        C.parse_args(["--config", str(path)])


def test_help_documents_every_field(capsys):
    """--help lists every field with the docstring written under it (tyro reads them, base classes included)."""
    with pytest.raises(SystemExit) as e:
        C.parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(re.sub(r"[\u2500-\u257f]", " ", capsys.readouterr().out).split())  # without the panel frames
    for name, _, _ in C.iter_fields():
        doc = re.search(rf"--{re.escape(name)} \S+ (.*?)\(default", text)
        assert doc and re.search("[a-z]{3}", doc.group(1)), f"--{name} has no docstring in --help"
    for launcher in ("--config", "--preset", "--resume"):
        assert launcher in text
    assert "Rollouts per problem" in text and "Sampling temperature" in text  # rollout.* docs from SamplingParams


def test_cli_user_error_exits_2_with_one_message(capsys):
    from exgrpo_fast import eval as E
    from exgrpo_fast import train as T

    for main, argv, field in [
        (T.main, ["--grpo.steps", "x"], "--grpo.steps"),
        (E.main, ["ckpt", "--dtype", "int8"], "--dtype"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and field in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_eval_command_line():
    args = C.parse_eval_args(["runs/x", "--n", "4", "--no_probes", "--max_new_tokens", "6"])
    assert (args.ckpt, args.n, args.probes, args.max_new_tokens) == ("runs/x", 4, False, 6)
    assert args.dtype is None and args.batch_size is None  # unset: the run's model.dtype / rollout.batch_size
