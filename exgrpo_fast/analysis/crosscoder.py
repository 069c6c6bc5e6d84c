"""What did training change inside the student? A crosscoder on two checkpoints A and B (e.g. SFT and ExGRPO).

    python -m exgrpo_fast.analysis.crosscoder collect --models.a SFT_DIR --models.b GRPO_DIR --log.out_dir OUT
    python -m exgrpo_fast.analysis.crosscoder train   --log.out_dir OUT
    python -m exgrpo_fast.analysis.crosscoder report  --log.out_dir OUT
    python -m exgrpo_fast.analysis.crosscoder steer   --models.a SFT_DIR --models.b GRPO_DIR --log.out_dir OUT

collect  residual-stream activations (output of decoder layer l) of A and B on the same token stream (the teacher's
         Explanatory-Inversion dialogues of the built-in task, or of a user problems file), packed forwards,
         sharded safetensors + manifest.json with per-token labels (dialogue, turn, probe kind, role); resumable.
train    a BatchTopK crosscoder (Baek & Tegmark 2025; Anthropic's "Sparse Crosscoders"; Bussmann et al. 2024): one
         shared latent code, one decoder per (model, layer), the batch top-k chosen on activation x summed decoder
         norm, an AuxK loss on dead latents; FVE per model, L0 and dead fraction; safetensors checkpoint.
report   relative decoder norm per latent (A-only / shared / B-only), decoder cosine of shared latents, top
         contexts of the most exclusive latents, which latents fire on which probe kind: report.md + PNGs.
steer    add +-alpha x a latent's decoder direction to the residual stream of its layer while the model samples,
         and measure answer accuracy, probe accuracy and response length on the built-in task (a curve per latent).

Configuration: dataclasses below, one docstring per field (`--help` of each subcommand prints them). Precedence,
lowest first: defaults < TOML file (`--config F`, sections named like the CLI sections: [log], [models], [data],
[collect], [train], [report], [steer]; one file may serve every subcommand, each reads the sections it has) < flags
(`--section.field value`, e.g. `--train.k 32`). Everything lives under `--log.out_dir`: acts/, crosscoder/,
report/, steer/. User errors exit with code 2 and one line naming the field or file (`--log.debug` for tracebacks).
Each subcommand holds the lock of `--log.out_dir` while it runs (exgrpo_fast.rundir.RunLock): a second command on
the same directory is refused instead of mixing its files with the first's.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union

import tyro

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# ----------------------------------------------------------------------------------------------------------------
# sections


def _positive(section: str, name: str, value: float, *, zero_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{section}.{name}={value!r}: expected a number {'>=' if zero_ok else '>'} 0")


def _choose(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{section}.{name}={value!r}: expected one of {allowed}")


@dataclass
class LogConfig:
    out_dir: str = "crosscoder-out"
    """Work directory: collect writes acts/, train crosscoder/, report report/, steer steer/ under it."""
    debug: bool = False
    """Show tracebacks on user errors instead of one line."""


@dataclass
class ModelsConfig:
    a: str = ""
    """HF checkpoint directory of model A (e.g. the SFT student)."""
    b: str = ""
    """HF checkpoint directory of model B (e.g. the ExGRPO student)."""
    label_a: str = "A"
    """Name of model A in reports (e.g. "sft")."""
    label_b: str = "B"
    """Name of model B in reports (e.g. "exgrpo")."""
    dtype: str = "float32"
    """Compute dtype of the models: float32, bfloat16 or float16 (activations are stored in collect.dtype)."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ..."""
    attn_backend: str = "auto"
    """Packed attention backend (see exgrpo_fast.model.attention)."""

    def __post_init__(self) -> None:
        _choose("models", "dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclass
class DataConfig:
    path: str = ""
    """User problems file (JSONL / Parquet / CSV, see exgrpo_fast.data.sources); "" = the built-in task."""
    split: str = "test_id"
    """Built-in split whose teacher dialogues form the token stream: train, test_id or test_ood."""
    n: int = 512
    """Number of dialogues (problems) in the token stream."""
    seed: int = 0
    """Seed of the built-in problem generator."""
    token_budget: int = 4096
    """Max tokens per packed forward (bounds activation memory of one forward)."""

    def __post_init__(self) -> None:
        _choose("data", "split", self.split, ("train", "test_id", "test_ood"))
        _positive("data", "n", self.n)
        _positive("data", "token_budget", self.token_budget)


@dataclass
class CollectConfig:
    layers: tuple[int, ...] = ()
    """Decoder layers whose output (the residual stream after that block) is recorded, 0-based, negative from
    the end; () = the middle layer. Several layers give one crosscoder with a decoder per (model, layer)."""
    shard_tokens: int = 65536
    """Tokens per shard (whole packed batches, so a shard may hold a little more): bounds memory and is the unit
    of resumption."""
    dtype: str = "float32"
    """Storage dtype of the activations: float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        _positive("collect", "shard_tokens", self.shard_tokens)
        _choose("collect", "dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclass
class TrainConfig:
    latents: int = 1024
    """Dictionary size F (shared latents)."""
    k: int = 16
    """Mean active latents per token (BatchTopK keeps k x batch_size activations per batch)."""
    batch_size: int = 1024
    """Tokens per optimizer step."""
    steps: int = 3000
    """Optimizer steps (shards are cycled in a random order as often as needed)."""
    lr: float = 1e-3
    """Adam learning rate (constant, then linear decay to 0 over the last 20% of steps)."""
    aux_k: int = 64
    """Dead latents that reconstruct the residual error in the AuxK loss (0 = no auxiliary loss)."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss (relative to the normalised reconstruction loss)."""
    dead_tokens: int = 50_000
    """A latent that has not fired for this many training tokens counts as dead (AuxK and the dead fraction)."""
    eval_every_doc: int = 10
    """Every eval_every_doc-th dialogue is held out for evaluation (never trained on); 0 = evaluate on train."""
    eval_tokens: int = 32768
    """At most this many held-out tokens are evaluated."""
    threshold_momentum: float = 0.99
    """EMA momentum of the inference threshold (the smallest selected score of each batch): at evaluation a
    latent fires when its score exceeds it, so L0 varies per token and averages about k."""
    log_every: int = 100
    """Log a metrics line every this many steps."""
    device: str = "auto"
    """"auto", "cpu", "cuda", ..."""
    seed: int = 0
    """Seed of the initialisation and of the data order."""

    def __post_init__(self) -> None:
        for name in ("latents", "k", "batch_size", "steps", "lr", "log_every", "dead_tokens"):
            _positive("train", name, getattr(self, name))
        for name in ("aux_k", "aux_coef", "eval_every_doc", "eval_tokens"):
            _positive("train", name, getattr(self, name), zero_ok=True)
        if self.k > self.latents:
            raise ValueError(f"train.k={self.k}: expected <= train.latents={self.latents}")
        if not 0 <= self.threshold_momentum < 1:
            raise ValueError(f"train.threshold_momentum={self.threshold_momentum}: expected in [0, 1)")


@dataclass
class ReportConfig:
    exclusive: float = 0.1
    """Relative decoder norm r = |d_B| / (|d_A| + |d_B|): A-only when r < exclusive, B-only when r > 1 - exclusive,
    shared otherwise."""
    top_latents: int = 6
    """How many of the most A-only and of the most B-only (live) latents get their top contexts listed."""
    contexts: int = 4
    """Top-activating contexts shown per latent."""
    context_before: int = 48
    """Tokens of context shown before the activating token."""
    context_after: int = 4
    """Tokens of context shown after the activating token."""
    min_frequency: float = 1e-4
    """Latents firing on fewer tokens than this fraction are left out of the top-context lists."""
    max_tokens: int = 0
    """Encode at most this many tokens for frequencies and contexts (0 = all collected tokens)."""
    batch_size: int = 4096
    """Tokens per encoder batch."""
    device: str = "auto"
    """"auto", "cpu", "cuda", ..."""

    def __post_init__(self) -> None:
        if not 0 < self.exclusive < 0.5:
            raise ValueError(f"report.exclusive={self.exclusive}: expected in (0, 0.5)")
        for name in ("top_latents", "contexts", "batch_size"):
            _positive("report", name, getattr(self, name))
        for name in ("context_before", "context_after", "min_frequency", "max_tokens"):
            _positive("report", name, getattr(self, name), zero_ok=True)


@dataclass
class SteerConfig:
    model: str = "b"
    """Which model samples under steering ("a" or "b"); the direction is that model's decoder of the latent."""
    latents: tuple[int, ...] = ()
    """Latents to steer with; () = the n_auto most exclusive live latents of the steered model and the most
    frequent shared one (a control)."""
    n_auto: int = 2
    """Exclusive latents picked when steer.latents is empty."""
    layer: int | None = None
    """Layer to steer at (must be a collected layer); None = where the latent's decoder for the model is largest."""
    alphas: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)
    """Steering strengths, in units of the mean residual norm at the layer: alpha x rms x d / |d| is added."""
    split: str = "test_id"
    """Built-in split whose problems are sampled."""
    n: int = 64
    """Problems per (latent, alpha)."""
    seed: int = 0
    """Seed of the built-in problem generator."""
    max_new_tokens: int = 24
    """Max tokens per turn."""
    batch_size: int = 64
    """Dialogues per KV cache."""

    def __post_init__(self) -> None:
        _choose("steer", "model", self.model, ("a", "b"))
        _choose("steer", "split", self.split, ("train", "test_id", "test_ood"))
        for name in ("n", "max_new_tokens", "batch_size"):
            _positive("steer", name, getattr(self, name))
        _positive("steer", "n_auto", self.n_auto, zero_ok=True)
        if not self.alphas:
            raise ValueError("steer.alphas is empty")


# ----------------------------------------------------------------------------------------------------------------
# subcommands


@dataclass
class Collect:
    """Record residual-stream activations of models A and B on one token stream (sharded, resumable)."""

    log: LogConfig = field(default_factory=LogConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    config: str = ""
    """TOML file with sections named like the flags' (flags override it)."""


@dataclass
class Train:
    """Train a BatchTopK crosscoder on the collected activations."""

    log: LogConfig = field(default_factory=LogConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    config: str = ""
    """TOML file with sections named like the flags' (flags override it)."""


@dataclass
class Report:
    """Relative decoder norms, decoder cosines, top contexts and the per-probe-kind breakdown (markdown + PNG)."""

    log: LogConfig = field(default_factory=LogConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    config: str = ""
    """TOML file with sections named like the flags' (flags override it)."""


@dataclass
class Steer:
    """Steer a model with +-alpha x latent decoder directions; accuracy / probe accuracy / length curves."""

    log: LogConfig = field(default_factory=LogConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)
    config: str = ""
    """TOML file with sections named like the flags' (flags override it)."""


SUBCOMMANDS: dict[str, type] = {"collect": Collect, "train": Train, "report": Report, "steer": Steer}
SECTIONS = {f.name for cls in SUBCOMMANDS.values() for f in dataclasses.fields(cls) if f.name != "config"}


# ----------------------------------------------------------------------------------------------------------------
# TOML


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """A TOML value as the field's type (ints for floats, lists for tuples); ValueError naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or str(origin) == "types.UnionType":
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(where, value, arg)
            except ValueError:
                pass
        raise ValueError(f"{where}={value!r}: expected {tp}")
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(f"{where}={value!r}: expected a list")
        elem = args[0] if args else Any
        return tuple(_coerce(f"{where}[{i}]", v, elem) for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ValueError(f"{where}={value!r}: expected {tp.__name__}")
    return value


def defaults_from_toml(cls: type, path: str | Path) -> Any:
    """An instance of subcommand `cls` with the values of the TOML file at `path`; sections of other subcommands are
    ignored, unknown sections or keys are errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: {e}") from None
    own = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for section, body in data.items():
        if section not in SECTIONS:
            raise ValueError(f"{path}: unknown section [{section}]; expected some of {sorted(SECTIONS)}")
        if not isinstance(body, dict):
            raise ValueError(f"{path}: {section} must be a [section] table")
        if section not in own:
            continue
        sec_cls = hints[section]
        sec_hints = typing.get_type_hints(sec_cls)
        kwargs = {}
        for key, value in body.items():
            if key not in sec_hints:
                raise ValueError(f"{path}: unknown key {key!r} in [{section}]; expected one of {sorted(sec_hints)}")
            kwargs[key] = _coerce(f"{path}: [{section}] {key}", value, sec_hints[key])
        try:
            values[section] = sec_cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return cls(**values, config=str(path))


# ----------------------------------------------------------------------------------------------------------------
# CLI


def parse(argv: list[str] | None = None) -> Collect | Train | Report | Steer:
    """The chosen subcommand's config: defaults < --config TOML < flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "python -m exgrpo_fast.analysis.crosscoder"
    description = __doc__.split("\n\n")[0]

    def cli(defaults: dict[str, Any]):
        options = tuple(Annotated[cls, tyro.conf.subcommand(name, default=defaults[name])]
                        for name, cls in SUBCOMMANDS.items())  # fmt: skip
        return tyro.cli(Union[options], args=argv, prog=prog, description=description,  # noqa: UP007
                        config=(tyro.conf.OmitSubcommandPrefixes,), use_underscores=True)  # fmt: skip

    cfg = cli({name: cls() for name, cls in SUBCOMMANDS.items()})
    if cfg.config:  # second pass: the file's values become the defaults, the flags override them
        name = next(n for n, c in SUBCOMMANDS.items() if isinstance(cfg, c))
        cfg = cli({**{n: c() for n, c in SUBCOMMANDS.items()}, name: defaults_from_toml(type(cfg), cfg.config)})
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """Run one subcommand; returns its summary dict. User errors exit with code 2 and one line (or a traceback with
    --log.debug)."""
    from exgrpo_fast.errors import UserError
    from exgrpo_fast.rundir import locked_dir

    debug = "--log.debug" in (sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse(argv)
        debug = cfg.log.debug
        with locked_dir(cfg.log.out_dir, "crosscoder dir"):  # one writer per out_dir
            return _run(cfg)
    except (ValueError, FileNotFoundError, UserError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(cfg: Collect | Train | Report | Steer) -> dict:
    if isinstance(cfg, Collect):
        from exgrpo_fast.analysis.activations import collect

        return collect(cfg)
    if isinstance(cfg, Train):
        from exgrpo_fast.analysis.xcoder import train

        return train(cfg)
    if isinstance(cfg, Report):
        from exgrpo_fast.analysis.report import report

        return report(cfg)
    from exgrpo_fast.analysis.steer import steer

    return steer(cfg)


if __name__ == "__main__":
    main()
