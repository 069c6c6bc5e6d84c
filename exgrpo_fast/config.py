"""One typed config for `python -m exgrpo_fast.train` (and eval): dataclasses, TOML files, CLI flags, presets.

Every field has a docstring (the string literal under it); `--help` prints them. Precedence, lowest first:
preset (`--preset`, default "cpu-default") < TOML file (`--config file.toml`, sections named like the dataclass
sections below) < CLI flags (`--section.field value`, e.g. `--grpo.steps 40 --loss.kl_beta 0.01`).
Presets are plain functions returning a TrainConfig. The `loss` section is exgrpo_fast.ops.LossConfig itself and the
`reward` section exgrpo_fast.rewards.RewardConfig itself: their fields, defaults, docs and checks are the CLI's.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import math
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from exgrpo_fast.reference import LossConfig
from exgrpo_fast.rewards import RewardConfig
from exgrpo_fast.rollout import SamplingParams

# ----------------------------------------------------------------------------------------------------------------
# sections


@dataclass
class ModelConfig:
    path: str = ""
    """HF checkpoint dir of the student; "" = create the built-in tiny model (model.preset) in the run dir."""
    preset: str = "tiny"
    """Built-in model preset used when model.path is empty: one of exgrpo_fast.model.tiny.TINY_PRESETS."""
    dtype: str = "float32"
    """Parameter / compute dtype: float32, bfloat16 or float16."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ..."""
    attn_backend: str = "auto"
    """Varlen attention backend for packed training forwards (see exgrpo_fast.model.loading)."""
    teacher_path: str = ""
    """HF checkpoint of the teacher for token-level guidance (loss.teacher_beta) and probe writing; "" = none."""


@dataclass
class DataConfig:
    n_train: int = 2048
    """Number of built-in training problems (ignored when data.train_path is set)."""
    n_test: int = 200
    """Number of built-in problems in each held-out split (test_id, test_ood)."""
    seed: int = 0
    """Seed of the built-in problem generator."""
    train_path: str = ""
    """User problems (JSONL / Parquet / CSV, see exgrpo_fast.data.sources); "" = built-in tasks."""
    num_probes: int = 2
    """Explanatory probes per problem (K) written by the teacher when problems carry none."""
    cache_dir: str = ""
    """Where teacher-written probes are cached; "" = <run_dir>/probe_cache."""
    token_budget: int = 4096
    """Max tokens per packed micro-batch (SFT, log-prob and policy passes); bounds activation memory."""


@dataclass
class SFTConfig:
    steps: int = 150
    """Stage 1 (Explanatory Inversion distillation) optimizer steps; 0 skips SFT."""
    batch_size: int = 32
    """Teacher dialogues per SFT step."""
    lr: float = 3e-3
    """Peak learning rate of stage 1."""
    warmup_steps: int = 10
    """Linear warmup steps of stage 1 (then cosine decay to optim.min_lr_frac * lr)."""


@dataclass
class GRPOConfig:
    steps: int = 60
    """Stage 2 (ExGRPO) optimizer steps; 0 skips it."""
    problems_per_step: int = 16
    """Problems (groups, P) sampled per step."""
    group_size: int = 8
    """Rollouts per problem (G)."""
    lr: float = 1e-4
    """Peak learning rate of stage 2."""
    warmup_steps: int = 3
    """Linear warmup steps of stage 2."""
    updates_per_batch: int = 1
    """Optimizer steps on the same rollouts (>1 makes the clipped ratio matter; 1 = strictly on-policy)."""
    adv_scale: str = "group"
    """Advantage normalisation: "group" (GRPO), "batch", or "none" (Dr. GRPO)."""
    adv_eps: float = 1e-6
    """Epsilon added to the std in advantage normalisation."""
    use_probes: bool = True
    """Roll out the probe turns after the answer (False = plain GRPO on the question only)."""


@dataclass
class RolloutConfig(SamplingParams):
    """rollout.SamplingParams (temperature, top_p, max_new_tokens, stop_check_every) plus the sampling batch."""

    batch_size: int = 64
    """Dialogues sampled together (rows of one KV cache)."""


@dataclass
class OptimConfig:
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    min_lr_frac: float = 0.1
    """Cosine schedule floor as a fraction of the peak lr."""


@dataclass
class LogConfig:
    out_dir: str = "runs"
    """Parent folder of run dirs."""
    run_name: str = ""
    """Run dir name under out_dir; "" = a timestamp."""
    log_every: int = 1
    """Print a log line every this many steps."""
    eval_n: int = 200
    """Problems per held-out split in the short evals (<= data.n_test)."""
    eval_every: int = 30
    """Extra greedy eval every this many GRPO steps (0 = only before, after SFT and at the end)."""
    ckpt_every: int = 0
    """Checkpoint every this many steps of each stage (0 = only at the end of each stage)."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    progress: bool = True
    """Show tqdm progress bars."""


@dataclass
class TrainConfig:
    seed: int = 0
    """Seed of torch / numpy / python RNGs (rollout sampling, batch order, init of the built-in model)."""
    ops_backend: str = "auto"
    """exgrpo_fast.ops backend: auto, triton or reference."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def logprob_temperature(self) -> float:
        """Temperature of every log-prob of stage 2 (old, policy, reference, teacher): the sampling temperature, so
        the ratio is taken against the distribution the tokens were drawn from; 1 when sampling is greedy."""
        return self.rollout.temperature if self.rollout.temperature > 0 else 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        validate(self)
        return self


SECTIONS = ("model", "data", "sft", "grpo", "loss", "reward", "rollout", "optim", "log")

# ----------------------------------------------------------------------------------------------------------------
# validation


def _fail(name: str, value: Any, why: str) -> None:
    raise ValueError(f"{name}={value!r}: {why}")


def validate(cfg: TrainConfig) -> None:
    """Raise ValueError naming the first invalid field."""

    def choose(name: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            _fail(name, value, f"expected one of {allowed}")

    def positive(name: str, value: float, *, zero_ok: bool = False) -> None:
        if math.isnan(value) or value < 0 or (value == 0 and not zero_ok):
            _fail(name, value, "expected >= 0" if zero_ok else "expected > 0")

    choose("ops_backend", cfg.ops_backend, ("auto", "triton", "reference"))
    choose("model.dtype", cfg.model.dtype, ("float32", "bfloat16", "float16"))
    if not (cfg.model.device == "auto" or cfg.model.device.split(":")[0] in ("cpu", "cuda")):
        _fail("model.device", cfg.model.device, "expected auto, cpu, cuda or cuda:N")
    for name in ("data.n_train", "data.n_test", "sft.batch_size", "grpo.problems_per_step", "grpo.updates_per_batch",
                 "rollout.max_new_tokens", "rollout.stop_check_every", "rollout.batch_size", "data.token_budget",
                 "log.log_every"):  # fmt: skip
        positive(name, _get(cfg, name))
    for name in ("data.num_probes", "sft.steps", "sft.warmup_steps", "grpo.steps", "grpo.warmup_steps",
                 "sft.lr", "grpo.lr", "optim.weight_decay", "optim.grad_clip", "log.eval_n", "log.eval_every",
                 "log.ckpt_every", "rollout.temperature", "grpo.adv_eps"):  # fmt: skip
        positive(name, _get(cfg, name), zero_ok=True)
    if cfg.grpo.group_size < 2:
        _fail("grpo.group_size", cfg.grpo.group_size, "expected >= 2 (advantages are relative within a group)")
    choose("grpo.adv_scale", cfg.grpo.adv_scale, ("group", "batch", "none"))
    choose("reward.dsu_mode", cfg.reward.dsu_mode, ("product", "all"))
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        _fail("rollout.top_p", cfg.rollout.top_p, "expected 0 < top_p <= 1")
    if not 0.0 <= cfg.optim.beta1 < 1.0:
        _fail("optim.beta1", cfg.optim.beta1, "expected 0 <= beta1 < 1")
    if not 0.0 <= cfg.optim.beta2 < 1.0:
        _fail("optim.beta2", cfg.optim.beta2, "expected 0 <= beta2 < 1")
    if not 0.0 <= cfg.optim.min_lr_frac <= 1.0:
        _fail("optim.min_lr_frac", cfg.optim.min_lr_frac, "expected in [0, 1]")
    if cfg.log.eval_n > cfg.data.n_test:
        _fail("log.eval_n", cfg.log.eval_n, f"expected <= data.n_test={cfg.data.n_test}")
    if cfg.loss.teacher_beta > 0 and not cfg.model.teacher_path:
        _fail("loss.teacher_beta", cfg.loss.teacher_beta, "> 0 needs model.teacher_path")
    for section, cls in (("loss", "LossConfig"), ("reward", "RewardConfig")):
        try:  # these sections check themselves on construction; rebuild them to run the checks on CLI / TOML values
            dataclasses.replace(getattr(cfg, section))
        except ValueError as e:
            raise ValueError(str(e).replace(f"{cls}: ", f"{section}: ").replace(f"{cls}.", f"{section}.")) from None


# ----------------------------------------------------------------------------------------------------------------
# presets (plain functions)


def preset_cpu_default() -> TrainConfig:
    """The no-argument run: tiny built-in model, built-in tasks, both stages in a few minutes on 2 CPU cores."""
    return TrainConfig()


def preset_gpu() -> TrainConfig:
    """A larger built-in model (model.preset "gpu-0.5b"), more problems and longer stages, bf16 on CUDA."""
    cfg = TrainConfig()
    cfg.model.preset, cfg.model.dtype, cfg.model.device = "gpu-0.5b", "bfloat16", "cuda"
    cfg.data.n_train, cfg.data.n_test = 4096, 256
    cfg.sft.steps, cfg.sft.batch_size, cfg.sft.lr = 400, 64, 3e-4
    cfg.grpo.steps, cfg.grpo.problems_per_step, cfg.grpo.group_size, cfg.grpo.lr = 200, 32, 16, 1e-5
    cfg.rollout.max_new_tokens, cfg.rollout.batch_size = 64, 512
    cfg.data.token_budget, cfg.loss.kl_beta = 32768, 0.01
    cfg.log.eval_n, cfg.log.eval_every, cfg.log.ckpt_every = 256, 50, 50
    return cfg


def preset_grpo_no_probes() -> TrainConfig:
    """Ablation: plain GRPO on the question only (no probe turns in rollouts, probe and DSU reward weights 0)."""
    cfg = TrainConfig()
    cfg.grpo.use_probes = False
    cfg.reward.probe_weight = 0.0
    cfg.reward.dsu_weight = 0.0
    return cfg


def preset_test() -> TrainConfig:
    """Seconds-long run for tests: few problems, few steps, short turns."""
    cfg = TrainConfig()
    cfg.ops_backend = "reference"
    cfg.data.n_train, cfg.data.n_test = 16, 4
    cfg.sft.steps, cfg.sft.batch_size, cfg.sft.warmup_steps = 3, 4, 1
    cfg.grpo.steps, cfg.grpo.problems_per_step, cfg.grpo.group_size, cfg.grpo.warmup_steps = 3, 2, 2, 1
    cfg.rollout.max_new_tokens = 8
    cfg.log.eval_n, cfg.log.tensorboard, cfg.log.progress = 4, False, False
    return cfg


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "cpu-default": preset_cpu_default,
    "gpu": preset_gpu,
    "grpo-no-probes": preset_grpo_no_probes,
    "test": preset_test,
}

# ----------------------------------------------------------------------------------------------------------------
# field introspection, TOML and CLI


def _get(cfg: TrainConfig, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under each field, parsed from the source of the class and of its dataclass bases."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # a subclass's doc wins
        try:
            body = ast.parse(inspect.getsource(klass).lstrip()).body[0].body
        except (OSError, TypeError):
            continue
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def iter_fields(cls: type = TrainConfig, prefix: str = ""):
    """Yield (dotted_name, type, default, doc) for every leaf field of the config tree."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, prefix + f.name + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield prefix + f.name, tp, default, docs.get(f.name, "")


_LEAVES = None


def _leaves() -> dict[str, tuple[Any, Any, str]]:
    global _LEAVES
    if _LEAVES is None:
        _LEAVES = {name: (tp, default, doc) for name, tp, default, doc in iter_fields()}
    return _LEAVES


def _base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of a field annotation like `float | None`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:  # LossConfig's option types (exgrpo_fast.loss_spec)
        return type(args[0]), False
    if args:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) < len(args)
    return tp, False


def coerce(name: str, value: Any) -> Any:
    """Convert a TOML / CLI value to the field's type, raising ValueError naming the field."""
    if name not in _leaves():
        raise ValueError(f"unknown config field {name!r}")
    tp, optional = _base_type(_leaves()[name][0])
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            return value
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}={value!r}: {e}") from None
    raise ValueError(f"{name}: unsupported field type {tp}")


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Set dotted fields (`{"grpo.steps": 10}`) in place; values are coerced to the field types."""
    for name, value in overrides.items():
        value = coerce(name, value)
        *parents, leaf = name.split(".")
        obj = cfg
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)
    return cfg


def flatten_toml(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten_toml(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Flat {dotted_name: value} from a TOML file; a top-level `preset = "..."` key is returned as "preset"."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    flat = flatten_toml(data)
    for name in flat:
        if name != "preset" and name not in _leaves():
            raise ValueError(f"{path}: unknown config field {name!r}")
    return flat


def build_parser(prog: str = "python -m exgrpo_fast.train", description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=description or __doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="TOML config file (overrides the preset; CLI flags override it)")
    p.add_argument("--preset", help=f"base preset: {', '.join(PRESETS)} (default cpu-default)")
    p.add_argument("--resume", help="run dir or checkpoint dir to continue from (its config is the base)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, tp, default, doc in iter_fields():
        section = name.split(".")[0] if "." in name else "general"
        if section not in groups:
            groups[section] = p.add_argument_group(section)
        base, optional = _base_type(tp)
        metavar = {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}[base] + ("|none" if optional else "")
        shown = "none" if default is None else repr(default) if base is str else default
        groups[section].add_argument(f"--{name}", dest=name, metavar=metavar, help=f"{doc} (default: {shown})")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Config from preset < --config TOML < CLI flags. Returns (validated config, raw namespace)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    ns = vars(args)
    toml_values = load_toml(ns["config"]) if "config" in ns else {}
    preset = ns.get("preset") or toml_values.pop("preset", None) or "cpu-default"
    toml_values.pop("preset", None)
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {tuple(PRESETS)}")
    cfg = PRESETS[preset]()
    if "resume" in ns:
        saved = find_saved_config(ns["resume"])
        if saved is not None:
            cfg = from_dict(saved)
    apply_overrides(cfg, toml_values)
    apply_overrides(cfg, {k: v for k, v in ns.items() if k in _leaves()})
    validate(cfg)
    return cfg, args


def from_dict(d: dict) -> TrainConfig:
    cfg = TrainConfig()
    apply_overrides(cfg, {k: v for k, v in flatten_toml(d).items() if k in _leaves()})
    return cfg


def find_saved_config(path: str | Path) -> dict | None:
    """The config.json of a run dir or of the run dir above a checkpoint dir, if any."""
    import json

    path = Path(path)
    for cand in (path / "config.json", path.parent / "config.json", path.parent.parent / "config.json"):
        if cand.is_file():
            return json.loads(cand.read_text())
    return None


def to_toml(cfg: TrainConfig) -> str:
    """A TOML dump of the config (None fields are left out: TOML has no null; they take their default)."""
    lines, section = [], None
    for name, _, _, _ in iter_fields():
        value = _get(cfg, name)
        if value is None:
            continue
        sec, _, leaf = name.rpartition(".")
        if sec != section:
            if sec:
                lines.append(f"\n[{sec}]")
            section = sec
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            text = repr(value)
        lines.append(f"{leaf} = {text}")
    return "\n".join(lines) + "\n"
