"""Config of `python -m exgrpo_fast.rekd`: nested dataclasses, TOML files and CLI flags through tyro.

Every field has a docstring (the string literal under it); `--help` prints them. Precedence, lowest first:
task preset (`--task text|image`) < TOML file (`--config file.toml`, top-level keys and `[section]` tables named
like the fields below) < CLI flags (`--section.field value`, underscores kept: `--data.train_path F`,
`--log.out_dir DIR`, `--kd.rationale_weight 2`). `validate` checks values and raises ConfigError naming the field.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad config value: the message names the field (and the file, for TOML)."""


# ----------------------------------------------------------------------------------------------------------------
# sections


@dataclass
class DataConfig:
    train_path: str = ""
    """User training data: JSONL/CSV (text: `text`, `label`, optional `rationale` word indices) or .npz / image
    folder (image task); "" = the built-in seeded task."""
    test_path: str = ""
    """User test data, same format as data.train_path; "" = the built-in test split, or with user train data a
    seeded 10% held out from it."""
    n_train: int = 3000
    """Built-in task: number of training examples."""
    n_test: int = 500
    """Built-in task: number of test examples."""
    max_distractors: int = 1
    """Built-in text task: at most this many look-alike distractors ("not awful" in a positive review) per
    review (0 = none: then counting sentiment words solves the task)."""
    max_tokens: int = 64
    """Text: truncate inputs to this many tokens (specials included)."""
    image_size: int = 32
    """Image (built-in): side of the square image in pixels; a multiple of data.patch_size."""
    patch_size: int = 8
    """Image (built-in): side of a ViT patch in pixels; the class-setting pattern fills one patch."""
    num_classes: int = 4
    """Image (built-in): number of classes (one hidden pattern each)."""


@dataclass
class EncoderConfig:
    path: str = ""
    """Local HF checkpoint dir of the encoder (BertModel-like for text, ViTModel for images); "" = tiny from config."""
    hidden_size: int = 32
    """Hidden width of the encoder built from config."""
    num_layers: int = 1
    """Transformer layers of the encoder built from config."""
    num_heads: int = 2
    """Attention heads (must divide hidden_size)."""
    intermediate_size: int = 64
    """MLP width of the encoder built from config."""


@dataclass
class SelectConfig:
    estimator: Literal["gumbel_st", "hard_concrete"] = "gumbel_st"
    """Differentiable selection: straight-through Gumbel-sigmoid (hard 0/1 forward, relaxed backward) or
    hard-concrete (Louizos et al. 2018; stretched, clamped binary concrete with exact zeros)."""
    tau: float = 1.0
    """Temperature of the binary concrete relaxation."""
    target_sparsity: float = 0.1
    """Target selected fraction of the selectable units (words / patches) per batch."""
    anneal_from: float = 0.3
    """Start value of the target sparsity; it moves linearly to select.target_sparsity over the first
    select.anneal_frac of each stage's steps (the predictor first learns from larger subsets)."""
    anneal_frac: float = 0.5
    """Fraction of a stage's steps over which the target sparsity is annealed (0 = fixed target from step 0)."""
    sparsity_weight: float = 0.5
    """Weight of |selected fraction - target| (expected fraction under the selector)."""
    head_context: int = 1
    """Text only: the selector head's context. k > 0: token i's selection logit is a 1-D convolution (kernel 2k+1)
    over the selector encoder's hidden states of tokens i-k..i+k, so it sees its neighbours (e.g. a negator just
    before it) explicitly; 0: a per-token linear head (context only through attention)."""
    predictor_warmup_frac: float = 0.25
    """Fraction of each stage's first steps that train only the predictor, on random subsets of the input (keep
    rate ~ U(0.2, 1) per example; the selector is not updated): the predictor first learns what the words mean,
    so that the selection phase cannot start with a predictor that reads arbitrary positions."""
    predictor_lr_mult: float = 0.1
    """Multiplier of the predictor's lr after the warm-up (< 1 slows the predictor down so the selector has to
    pick what the warmed-up predictor already understands, rather than the two agreeing on a code)."""
    continuity_weight: float = 0.0
    """Text only: weight of the mean |p_t - p_{t-1}| between neighbouring tokens (contiguous rationales). 0 by
    default: the built-in gold rationales are isolated words, which the term penalises."""


@dataclass
class StageConfig:
    steps: int = 600
    """Optimizer steps of the stage."""
    batch_size: int = 32
    """Examples per step."""
    lr: float = 2e-3
    """AdamW peak learning rate (see lr_schedule)."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """After a linear warm-up over 5% of the steps: constant lr, or cosine decay to lr * min_lr_frac (settles the
    selection late in a stage instead of letting it drift)."""
    min_lr_frac: float = 0.1
    """Final lr of the cosine schedule, as a fraction of lr."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max global grad norm (0 = off)."""


@dataclass
class KDConfig:
    kd_weight: float = 1.0
    """Weight of T^2 KL(teacher || student) over the class distributions (temperature kd.temperature)."""
    temperature: float = 2.0
    """Softmax temperature T of the prediction KD term."""
    rationale_weight: float = 1.0
    """Weight of the BCE of the student's selector logits on the teacher's mask."""
    only_correct: bool = False
    """Apply the KD and rationale terms only on training examples the teacher classifies correctly (its
    rationale is then at least sufficient for it); the student's RE objective still covers every example."""
    rationale_target: Literal["hard", "soft"] = "hard"
    """Teacher mask the student's selector learns: its hard eval mask (logit > 0) or its probabilities."""


@dataclass
class LogConfig:
    out_dir: str = "runs/rekd"
    """Run directory: config.json, metrics.jsonl, checkpoints/, results.json, rationales.html/.png, plot.png."""
    log_every: int = 20
    """Log a metrics row every this many steps."""
    eval_every: int = 100
    """Evaluate on (up to 500 of) the test examples every this many steps (0 = only at the end)."""
    save_every: int = 200
    """Checkpoint every this many steps (atomic; the newest complete one survives a crash)."""
    resume: bool = False
    """Continue the run in log.out_dir from its newest checkpoints (finished stages are loaded, not retrained)."""
    n_pictures: int = 8
    """Examples shown in the rationale pictures."""
    plot: bool = True
    """Write plot.png of the training curves at the end."""
    progress: bool | Literal["auto"] = "auto"
    """tqdm progress bars: "auto" (default) draws them only when stderr is a terminal (as the trainer's log.progress),
    true / false always / never."""


def _teacher_enc() -> EncoderConfig:
    return EncoderConfig(hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128)


@dataclass
class REKDConfig:
    """REKD: rationale-extraction distillation (teacher RE -> student RE alone -> student REKD)."""

    task: Literal["text", "image"] = "text"
    """Modality / built-in task; sets the preset defaults that a TOML file and flags override."""
    config: str = ""
    """TOML file with values for any field (top-level keys and [section] tables)."""
    seed: int = 0
    """Seed of the built-in data, the initialisations and the batch order."""
    device: str = "cpu"
    """Torch device ("cpu", "cuda", "cuda:1")."""
    threads: int = 1
    """torch.set_num_threads on CPU (0 = torch's default). 1 is fastest for these tiny models on a busy CPU."""
    debug: bool = False
    """Show tracebacks for user errors."""
    data: DataConfig = field(default_factory=DataConfig)
    teacher: EncoderConfig = field(default_factory=_teacher_enc)
    """The teacher's encoders (selector and predictor each have one)."""
    student: EncoderConfig = field(default_factory=EncoderConfig)
    """The student's encoders (smaller than the teacher's)."""
    select: SelectConfig = field(default_factory=SelectConfig)
    teacher_train: StageConfig = field(default_factory=lambda: StageConfig(steps=800))
    """Teacher RE stage."""
    student_train: StageConfig = field(default_factory=lambda: StageConfig(steps=300))
    """Both student stages (RE alone and REKD get the same budget and the same initialisation)."""
    kd: KDConfig = field(default_factory=KDConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ----------------------------------------------------------------------------------------------------------------
# presets


def preset(task: str) -> REKDConfig:
    """Defaults of a task: CPU-sized so the whole three-stage run takes minutes on 2 cores."""
    if task not in ("text", "image"):
        raise ConfigError(f"task={task!r}: expected 'text' or 'image'")
    cfg = REKDConfig(task=task)  # type: ignore[arg-type]
    if task == "image":
        cfg.select.estimator = "hard_concrete"
        cfg.select.tau = 0.5
        cfg.select.sparsity_weight = 2.0
        cfg.select.anneal_from = 0.5
        cfg.teacher_train.lr = cfg.student_train.lr = 1e-3
        cfg.teacher_train.steps = 600
        # the image defaults as measured in docs/rekd.md (before the text task's warm-up, context head and cosine)
        cfg.select.predictor_warmup_frac, cfg.select.predictor_lr_mult = 0.0, 1.0
        cfg.teacher_train.lr_schedule = cfg.student_train.lr_schedule = "constant"
        cfg.log.out_dir = "runs/rekd-image"
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# TOML, validation, CLI


def _apply(obj: Any, values: dict, where: str, prefix: str = "") -> None:
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        name = prefix + key
        if key not in names:
            raise ConfigError(f"{where}: unknown config field {name!r}")
        cur = getattr(obj, key)
        if dataclasses.is_dataclass(cur):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name} must be a table, got {value!r}")
            _apply(cur, value, where, name + ".")
            continue
        if isinstance(value, dict):
            raise ConfigError(f"{where}: {name} is a value, not a table")
        if isinstance(cur, bool) != isinstance(value, bool) or (
            isinstance(cur, (int, float)) and not isinstance(value, (int, float))
        ):
            raise ConfigError(f"{where}: {name} = {value!r} has the wrong type (default {cur!r})")
        if isinstance(cur, float) and isinstance(value, int):
            value = float(value)
        if isinstance(cur, int) and not isinstance(cur, bool) and isinstance(value, float):
            raise ConfigError(f"{where}: {name} = {value!r} must be an integer")
        if isinstance(cur, str) and not isinstance(value, str):
            raise ConfigError(f"{where}: {name} = {value!r} must be a string")
        setattr(obj, key, value)


def load_toml(cfg: REKDConfig, path: str | Path) -> REKDConfig:
    """Apply a TOML file's values to cfg (in place) and return it; unknown keys and wrong types are errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config={str(path)!r}: no such file")
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    values.pop("config", None)
    values.pop("task", None)  # the preset was chosen from it already
    _apply(cfg, values, str(path))
    return cfg


def _check(cond: bool, name: str, value: Any, need: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r}: {need}")


def validate(cfg: REKDConfig) -> REKDConfig:
    """Range checks; raises ConfigError naming the field and value."""
    _check(cfg.task in ("text", "image"), "task", cfg.task, "expected 'text' or 'image'")
    d = cfg.data
    for name in ("n_train", "n_test"):
        _check(getattr(d, name) > 0, f"data.{name}", getattr(d, name), "must be > 0")
    _check(d.max_distractors >= 0, "data.max_distractors", d.max_distractors, "must be >= 0")
    _check(d.max_tokens >= 4, "data.max_tokens", d.max_tokens, "must be >= 4")
    _check(d.patch_size > 0, "data.patch_size", d.patch_size, "must be > 0")
    _check(
        d.image_size > 0 and d.image_size % d.patch_size == 0,
        "data.image_size",
        d.image_size,
        f"must be a positive multiple of data.patch_size={d.patch_size}",
    )
    _check(d.image_size // max(d.patch_size, 1) >= 2, "data.image_size", d.image_size, "needs >= 2x2 patches")
    _check(d.num_classes >= 2, "data.num_classes", d.num_classes, "must be >= 2")
    _check(not (d.test_path and not d.train_path), "data.test_path", d.test_path, "needs data.train_path too")
    for who in ("teacher", "student"):
        e: EncoderConfig = getattr(cfg, who)
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            _check(getattr(e, name) > 0, f"{who}.{name}", getattr(e, name), "must be > 0")
        _check(
            e.hidden_size % e.num_heads == 0,
            f"{who}.num_heads",
            e.num_heads,
            f"must divide {who}.hidden_size={e.hidden_size}",
        )
        _check(not e.path or Path(e.path).is_dir(), f"{who}.path", e.path, "no such checkpoint directory")
    t, s = cfg.teacher, cfg.student
    if not t.path and not s.path:
        _check(
            t.hidden_size * t.num_layers >= s.hidden_size * s.num_layers,
            "teacher.hidden_size",
            t.hidden_size,
            "the teacher must not be smaller than the student (hidden_size x num_layers)",
        )
    sel = cfg.select
    _check(
        sel.estimator in ("gumbel_st", "hard_concrete"), "select.estimator", sel.estimator, "gumbel_st|hard_concrete"
    )
    _check(sel.tau > 0, "select.tau", sel.tau, "must be > 0")
    _check(0 < sel.target_sparsity < 1, "select.target_sparsity", sel.target_sparsity, "must be in (0, 1)")
    _check(0 < sel.anneal_from < 1, "select.anneal_from", sel.anneal_from, "must be in (0, 1)")
    _check(0 <= sel.anneal_frac <= 1, "select.anneal_frac", sel.anneal_frac, "must be in [0, 1]")
    _check(0 <= sel.predictor_warmup_frac < 1, "select.predictor_warmup_frac", sel.predictor_warmup_frac, "in [0, 1)")
    _check(sel.predictor_lr_mult >= 0, "select.predictor_lr_mult", sel.predictor_lr_mult, "must be >= 0")
    _check(sel.head_context >= 0, "select.head_context", sel.head_context, "must be >= 0")
    for name in ("sparsity_weight", "continuity_weight"):
        _check(getattr(sel, name) >= 0, f"select.{name}", getattr(sel, name), "must be >= 0")
    for who in ("teacher_train", "student_train"):
        st: StageConfig = getattr(cfg, who)
        _check(st.steps > 0, f"{who}.steps", st.steps, "must be > 0")
        _check(0 <= st.min_lr_frac <= 1, f"{who}.min_lr_frac", st.min_lr_frac, "must be in [0, 1]")
        _check(st.batch_size > 0, f"{who}.batch_size", st.batch_size, "must be > 0")
        _check(st.lr > 0, f"{who}.lr", st.lr, "must be > 0")
        _check(st.weight_decay >= 0, f"{who}.weight_decay", st.weight_decay, "must be >= 0")
        _check(st.grad_clip >= 0, f"{who}.grad_clip", st.grad_clip, "must be >= 0")
    k = cfg.kd
    for name in ("kd_weight", "rationale_weight"):
        _check(getattr(k, name) >= 0, f"kd.{name}", getattr(k, name), "must be >= 0")
    _check(k.temperature > 0, "kd.temperature", k.temperature, "must be > 0")
    _check(k.rationale_target in ("hard", "soft"), "kd.rationale_target", k.rationale_target, "hard|soft")
    lg = cfg.log
    _check(bool(lg.out_dir), "log.out_dir", lg.out_dir, "must not be empty")
    _check(lg.eval_every >= 0, "log.eval_every", lg.eval_every, "must be >= 0")
    for name in ("log_every", "save_every"):
        _check(getattr(lg, name) > 0, f"log.{name}", getattr(lg, name), "must be > 0")
    _check(lg.n_pictures >= 0, "log.n_pictures", lg.n_pictures, "must be >= 0")
    _check(cfg.threads >= 0, "threads", cfg.threads, "must be >= 0")
    return cfg


def _pre_scan(argv: list[str], flag: str) -> str | None:
    """Value of `--flag X` / `--flag=X` in argv (the last one wins), before tyro parses everything."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def parse_args(argv: list[str] | None = None) -> REKDConfig:
    """Config from task preset < --config TOML < CLI flags, validated."""
    import tyro

    from exgrpo_fast.config import _REGISTRY  # booleans as the trainer takes them: true/false in any case

    argv = sys.argv[1:] if argv is None else list(argv)
    toml_path = _pre_scan(argv, "--config")
    task = _pre_scan(argv, "--task")
    if task is None and toml_path:
        try:
            with open(toml_path, "rb") as f:
                task = tomllib.load(f).get("task")
        except (OSError, tomllib.TOMLDecodeError):
            task = None  # load_toml below reports it
    base = preset(task or "text")
    if toml_path:
        load_toml(base, toml_path)
        base.config = toml_path
    cfg = tyro.cli(
        REKDConfig,
        default=base,
        args=argv,
        prog="python -m exgrpo_fast.rekd",
        description=__doc__.split("\n\n")[0],
        use_underscores=True,
        config=(tyro.conf.FlagConversionOff,),
        registry=_REGISTRY,
    )
    return validate(cfg)


def to_dict(cfg: REKDConfig) -> dict:
    return dataclasses.asdict(cfg)
