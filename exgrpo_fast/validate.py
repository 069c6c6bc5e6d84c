"""Everything a training run needs from the user, checked before any run directory or model is created.

    validate_run(cfg, resume=None, world=1)   # raises a UserError (exit code 2 under errors.cli_main)

Checked, in order: config values (the config's own checks, every float finite, learning rates > 0, enough problems
and dialogues per step for every rank); the resume checkpoint; the model directories (student, teacher: config,
weights, tokenizer, see model.loading.check_model_dir); the data file (every row, see data.sources); and the
longest dialogue against data.token_budget: an SFT dialogue, and a rollout whose every student turn runs to
rollout.max_new_tokens, must fit one micro-batch, or packing would fail when that problem is drawn, hours in.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from exgrpo_fast.data.dialogue import encode_dialogue
from exgrpo_fast.data.problem import Dialogue, Problem, as_problem, rollout_user_turns, sft_dialogue
from exgrpo_fast.errors import ConfigError, UserError

EXACT_CHECKS = 32
"""Dialogues encoded exactly (the longest by a batched estimate); the rest are bounded by the estimate's ranking."""


def _fields(obj, prefix: str = ""):
    """(dotted name, value) of every leaf field of a nested config dataclass."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _fields(value, name + ".")
        else:
            yield name, value


def check_config(cfg, world: int = 1) -> None:
    """Config values: the config's own validation, then every float finite, learning rates > 0, and at least one
    SFT dialogue and one GRPO problem per rank. Raises ConfigError naming the field and value."""
    try:
        cfg.validate()
    except UserError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    for name, value in _fields(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={value!r}: expected a finite number")
    for name, value in (("sft.lr", cfg.sft.lr), ("grpo.lr", cfg.grpo.lr)):
        if not value > 0:
            raise ConfigError(f"{name}={value!r}: expected a finite number > 0")
    if world > 1:
        if cfg.sft.steps and cfg.sft.batch_size < world:
            raise ConfigError(f"sft.batch_size={cfg.sft.batch_size}: expected >= the number of processes ({world})")
        if cfg.grpo.steps and cfg.grpo.problems_per_step < world:
            raise ConfigError(
                f"grpo.problems_per_step={cfg.grpo.problems_per_step}: expected >= the number of processes ({world})"
            )


def _longest(tokenizer, dialogues: list[tuple[str, Dialogue]], extra: list[int]) -> tuple[int, str]:
    """(tokens, problem id) of the longest encoded dialogue plus its extra tokens. The turns' contents are tokenized
    in one batch call, each dialogue estimated as that plus a per-turn template overhead, and the EXACT_CHECKS
    longest by the estimate are encoded exactly (encode_dialogue renders turn by turn: too slow for every one)."""
    contents = [t["content"] for _, d in dialogues for t in d]
    counts = iter(len(ids) for ids in tokenizer(contents, add_special_tokens=False)["input_ids"]) if contents else None
    estimate = []
    for i, (_, d) in enumerate(dialogues):
        estimate.append(sum(next(counts) for _ in d) + len(d) * 16 + extra[i])  # 16: a generous per-turn template
    order = sorted(range(len(dialogues)), key=lambda i: -estimate[i])[:EXACT_CHECKS]
    return max((len(encode_dialogue(tokenizer, dialogues[i][1])[0]) + extra[i], dialogues[i][0]) for i in order)


def check_token_budget(cfg, tokenizer, problems: list[Problem], source: str) -> None:
    """The longest SFT dialogue and the longest possible rollout must each fit data.token_budget."""
    budget = cfg.data.token_budget
    problems = [as_problem(p) for p in problems]
    if cfg.sft.steps > 0:
        n, pid = _longest(tokenizer, [(p.id, sft_dialogue(p)) for p in problems], [0] * len(problems))
        if n > budget:
            raise ConfigError(
                f"data.token_budget={budget}: the SFT dialogue of problem {pid!r} ({source}) has {n} tokens; raise "
                "data.token_budget or drop that problem"
            )
    if cfg.grpo.steps > 0:
        dialogues, extra = [], []
        for p in problems:
            turns = rollout_user_turns(p, include_probes=cfg.grpo.use_probes)
            d = Dialogue()
            for question in turns:
                d.add("user", question).add("assistant", "")
            dialogues.append((p.id, d))
            extra.append(len(turns) * cfg.rollout.max_new_tokens)
        n, pid = _longest(tokenizer, dialogues, extra)
        if n > budget:
            raise ConfigError(
                f"data.token_budget={budget}: a rollout of problem {pid!r} ({source}) can reach {n} tokens (its "
                f"turns, each answer up to rollout.max_new_tokens={cfg.rollout.max_new_tokens}); raise "
                "data.token_budget or lower rollout.max_new_tokens"
            )


def _tokenizer_for(cfg, model_dir: str | None):
    if model_dir:
        from exgrpo_fast.model.loading import load_tokenizer

        return load_tokenizer(model_dir)
    from exgrpo_fast.model.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def validate_run(cfg, resume: str | None = None, world: int = 1) -> None:
    """Every user input of a run, checked up front (see the module docstring); raises a UserError."""
    from exgrpo_fast import checkpoint as ckpt_lib
    from exgrpo_fast.data.tasks import builtin_splits
    from exgrpo_fast.model.loading import check_model_dir

    check_config(cfg, world)
    student = cfg.model.path or None
    if resume:
        student = str(ckpt_lib.resolve_checkpoint(resume))  # complete: checkpoint.json is written last
    if student:
        check_model_dir(student)
    needs_teacher = cfg.loss.teacher_beta > 0
    held_out: dict[str, list] = {}
    user_rows: list[dict] = []
    if cfg.data.train_path:
        problems, source = _user_rows(cfg, "data.train_path"), str(cfg.data.train_path)
        user_rows += problems
    else:
        n_test = cfg.data.n_test if cfg.rollout.max_new_tokens == 0 else 0  # held-out splits: for auto only
        ood = getattr(cfg.data, "ood_splits", ("test_ood",))
        splits = builtin_splits(cfg.data.n_train, n_test, seed=cfg.data.seed, ood_splits=ood if n_test else ())
        problems, source = splits.pop("train"), "built-in tasks"
        held_out = splits
    if getattr(cfg.data, "ood_path", ""):
        held_out["test_ood"] = _user_rows(cfg, "data.ood_path")
        user_rows += held_out["test_ood"]
    if any(not p["probes"] for p in user_rows) and cfg.data.num_probes > 0:
        needs_teacher = True  # _user_rows checked that model.teacher_path is set
    if needs_teacher:
        if not cfg.model.teacher_path:
            raise ConfigError(f"loss.teacher_beta={cfg.loss.teacher_beta}: needs model.teacher_path")
        check_model_dir(Path(cfg.model.teacher_path))
    tokenizer = _tokenizer_for(cfg, student)
    if cfg.rollout.max_new_tokens == 0 and cfg.grpo.steps > 0:  # auto: the budget check needs the measured value
        from exgrpo_fast.data.lengths import auto_max_new_tokens

        auto = auto_max_new_tokens(tokenizer, {"train": problems, **held_out})
        cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_new_tokens=auto))
    check_token_budget(cfg, tokenizer, problems, source)


def _user_rows(cfg, name: str) -> list[dict]:
    """Every row of the user file named by the config field name (data.train_path or data.ood_path), checked; a
    file with problems that lack probes needs model.teacher_path unless data.num_probes is 0."""
    from exgrpo_fast.data.sources import read_problems

    path = getattr(cfg.data, name.split(".")[1])
    rows = read_problems(path, on_error=getattr(cfg.data, "on_error", "raise")).problems
    if any(not p["probes"] for p in rows) and cfg.data.num_probes > 0 and not cfg.model.teacher_path:
        raise ConfigError(
            f"{name}={path!r} has problems without probes: set model.teacher_path to write them, or data.num_probes=0"
        )
    return rows
