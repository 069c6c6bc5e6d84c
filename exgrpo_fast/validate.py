"""Everything a training run needs from the user, checked before any run directory or model is created.

    validate_run(cfg, resume=None, world=1)   # raises a UserError (exit code 2 under errors.cli_main)

Checked, in order: config values (the config's own checks, every float finite, learning rates > 0, enough problems
and dialogues per step for every rank); the resume checkpoint; the model directories (student, teacher: config,
weights, tokenizer, see model.loading.check_model_dir); the data files (every row, see data.sources, each row's text
bounded before any tokenizer sees it), that training problems remain once the held-out questions are removed
(data.splits), and the characters the tokenizer cannot represent (a warning, an error above UNKNOWN_CHAR_ERROR_FRAC);
and the longest dialogue against data.token_budget: an SFT dialogue, and a rollout whose every student turn runs to
rollout.max_new_tokens, must fit one micro-batch, or packing would fail when that problem is drawn, hours in.

Memory: the data's texts are tokenised CHUNK problems at a time, each text once, keeping only the EXACT_CHECKS
longest candidates; validation holds the rows of the files, never their token ids.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
from collections.abc import Iterator
from pathlib import Path

from exgrpo_fast.data.dialogue import encode_dialogue
from exgrpo_fast.data.lengths import AUTO_MARGIN, auto_max_new_tokens, token_counts
from exgrpo_fast.data.problem import (
    ANSWER_PREFIX,
    Dialogue,
    as_problem,
    dialogue_probes,
    format_answer,
    rollout_user_turns,
    sft_dialogue,
)
from exgrpo_fast.errors import ConfigError, DataError, UserError

log = logging.getLogger(__name__)

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


CHUNK = 512
"""Problems whose texts are tokenised in one call: validation holds one chunk's token ids at a time, never every
dialogue's (10^6 rows took 6.3 GB that way)."""


def _heap_push(heap: list, item: tuple, k: int = EXACT_CHECKS) -> None:
    """Keep the k largest items; among equal values the earliest (items are (value, -index, ...))."""
    heapq.heappush(heap, item)
    if len(heap) > k:
        heapq.heappop(heap)


@dataclasses.dataclass
class _Scan:
    """What one streamed tokenisation of a split's texts tells: the candidates for the exact length checks and the
    longest reference reply."""

    sft: list = dataclasses.field(default_factory=list)  # heap of (estimate, -index)
    grpo: dict = dataclasses.field(default_factory=dict)  # turns -> heap of (user-turn tokens, -index)
    longest_reply: int = 0  # tokens of the longest reference reply, end of turn included (data.lengths)


def _scan(tokenizer, problems: list, cfg) -> _Scan:
    """One pass over the problems, CHUNK at a time, tokenising each text once: an SFT dialogue's estimate (its turns'
    tokens + 16 per turn, a generous template overhead), a rollout's user-turn tokens per number of turns (its
    estimate adds the answers, up to max_new_tokens each, which auto sets only after this pass), and the reference
    replies' lengths (data.lengths.reference_replies)."""
    out = _Scan()
    sft_probes, grpo_probes = cfg.sft.use_probes, cfg.grpo.use_probes
    for lo in range(0, len(problems), CHUNK):
        chunk = [as_problem(p) for p in problems[lo : lo + CHUNK]]
        texts, spans = [], []
        for p in chunk:
            start = len(texts)
            texts += [p.question, format_answer(p.rationale, p.answer)]
            kinds = []
            for _, q in dialogue_probes(p):
                texts += [q.question, q.answer if q.kind == "explain" else f"{ANSWER_PREFIX}{q.answer}"]
                kinds.append(q.kind)
            spans.append((start, kinds))
        counts = token_counts(tokenizer, texts) if texts else []
        for j, (start, kinds) in enumerate(spans):
            i = lo + j
            question, reply = counts[start], counts[start + 1]
            probes = [(kind, counts[start + 2 + 2 * k], counts[start + 3 + 2 * k]) for k, kind in enumerate(kinds)]
            sft = question + reply + (sum(a + b for _, a, b in probes) if sft_probes else 0)
            sft_turns = 2 + (2 * len(probes) if sft_probes else 0)
            _heap_push(out.sft, (sft + 16 * sft_turns, -i))
            checkable = [(a, b) for kind, a, b in probes if kind != "explain"]
            users = question + (sum(a for a, _ in checkable) if grpo_probes else 0)
            _heap_push(out.grpo.setdefault(1 + (len(checkable) if grpo_probes else 0), []), (users, -i))
            out.longest_reply = max(out.longest_reply, reply + 1, *(b + 1 for _, b in checkable))
    return out


def check_token_budget(cfg, tokenizer, problems: list, source: str, scan: _Scan | None = None) -> None:
    """The longest SFT dialogue and the longest possible rollout must each fit data.token_budget: the EXACT_CHECKS
    longest by the streamed estimate (_scan) are encoded exactly (encode_dialogue renders turn by turn: too slow for
    every one). cfg.rollout.max_new_tokens must be resolved (not 0) when there is a GRPO stage."""
    budget = cfg.data.token_budget
    scan = scan or _scan(tokenizer, problems, cfg)
    if cfg.sft.steps > 0 and scan.sft:
        found = []
        for _, neg in scan.sft:
            p = as_problem(problems[-neg])
            found.append((len(encode_dialogue(tokenizer, sft_dialogue(p, include_probes=cfg.sft.use_probes))[0]), p.id))
        n, pid = max(found)
        if n > budget:
            raise ConfigError(
                f"data.token_budget={budget}: the SFT dialogue of problem {pid!r} ({source}) has {n} tokens; raise "
                "data.token_budget or drop that problem"
            )
    if cfg.grpo.steps > 0 and scan.grpo:
        m = cfg.rollout.max_new_tokens
        candidates = []  # the EXACT_CHECKS longest rollouts by estimate, from the longest of each turn count
        for turns, heap in scan.grpo.items():
            for users, neg in heap:
                _heap_push(candidates, (users + turns * (2 * 16 + m), neg, turns))
        found = []
        for _, neg, turns in candidates:
            p = as_problem(problems[-neg])
            d = Dialogue()
            for question in rollout_user_turns(p, include_probes=cfg.grpo.use_probes):
                d.add("user", question).add("assistant", "")
            found.append((len(encode_dialogue(tokenizer, d)[0]) + turns * m, p.id))
        n, pid = max(found)
        if n > budget:
            raise ConfigError(
                f"data.token_budget={budget}: a rollout of problem {pid!r} ({source}) can reach {n} tokens (its "
                f"turns, each answer up to rollout.max_new_tokens={m}); raise data.token_budget or lower "
                "rollout.max_new_tokens"
            )


UNKNOWN_CHAR_ERROR_FRAC = 0.01
"""A user file where more than this fraction of the characters is unknown to the tokenizer (each read as <unk>:
e.g. every non-ASCII character for the built-in character tokenizer) is refused; fewer are a warning with counts."""


def _texts(p) -> Iterator[str]:
    """Every text of a problem row (data.sources) or Problem."""
    if isinstance(p, dict):
        yield from (p["question"], p["answer"], p["rationale"])
        for q in p["probes"]:
            yield from (q["question"], str(q["answer"]))
        return
    yield from (p.question, p.answer, p.rationale)
    for q in p.probes:
        yield from (q.question, q.answer)


def check_characters(tokenizer, loaded, path: str, name: str) -> None:
    """Characters of a user file (a sources.LoadedProblems) that the tokenizer cannot represent (it maps them to its
    unknown token): a warning with the counts, or a DataError above UNKNOWN_CHAR_ERROR_FRAC. Tokenizers without an
    unknown token (byte-level BPE, byte fallback) represent every character: nothing to check."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    chars: set[str] = set()
    total = 0
    for p in loaded.problems:
        for text in _texts(p):
            chars.update(text)
            total += len(text)
    distinct = sorted(chars)
    ids = tokenizer(distinct, add_special_tokens=False)["input_ids"] if distinct else []
    bad = {c for c, t in zip(distinct, ids) if unk in t}
    if not bad:
        return
    counts: dict[str, int] = dict.fromkeys(sorted(bad), 0)
    first = None
    for i, p in enumerate(loaded.problems):
        for text in _texts(p):
            if not bad.isdisjoint(text):
                first = i if first is None else first
                for c in bad.intersection(text):
                    counts[c] += text.count(c)
    n = sum(counts.values())
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{c!r} x{k:,}" for c, k in top[:8]) + (f" and {len(top) - 8} more" if len(top) > 8 else "")
    what = (f"{n:,} of its {total:,} characters ({100 * n / total:.2f}%) are not in the tokenizer's vocabulary and "
            f"would each be read as {tokenizer.unk_token!r}: {shown}")  # fmt: skip
    if n > UNKNOWN_CHAR_ERROR_FRAC * total:
        limit = f"validate.UNKNOWN_CHAR_ERROR_FRAC={UNKNOWN_CHAR_ERROR_FRAC:.0%}"
        raise DataError(path, loaded.where(first), f"{what} (first here); more than {limit}: use a model whose "
                        "tokenizer covers them, or clean the data")  # fmt: skip
    log.warning("%s=%s: %s (first at %s)", name, path, what, loaded.where(first))


def _tokenizer_for(cfg, model_dir: str | None):
    if model_dir:
        from exgrpo_fast.model.loading import load_tokenizer

        return load_tokenizer(model_dir)
    from exgrpo_fast.model.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def validate_run(cfg, resume: str | None = None, world: int = 1) -> None:
    """Every user input of a run, checked up front (see the module docstring); raises a UserError."""
    from exgrpo_fast import checkpoint as ckpt_lib
    from exgrpo_fast.data.splits import drop_overlap, require_training, split_test_id
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
    files = {}  # config field -> LoadedProblems
    if cfg.data.train_path:
        files["data.train_path"] = _user_rows(cfg, "data.train_path")
        problems, source = files["data.train_path"].problems, str(cfg.data.train_path)
    else:
        n_test = cfg.data.n_test if cfg.rollout.max_new_tokens == 0 else 0  # held-out splits: for auto only
        ood = getattr(cfg.data, "ood_splits", ("test_ood",))
        splits = builtin_splits(cfg.data.n_train, n_test, seed=cfg.data.seed, ood_splits=ood if n_test else ())
        problems, source = splits.pop("train"), "built-in tasks"
        held_out = splits
    if getattr(cfg.data, "ood_path", ""):
        files["data.ood_path"] = _user_rows(cfg, "data.ood_path")
        held_out["test_ood"] = files["data.ood_path"].problems
    if any(not p["probes"] for f in files.values() for p in f.problems) and cfg.data.num_probes > 0:
        needs_teacher = True  # _user_rows checked that model.teacher_path is set
    if files:  # what data.splits.load_data will train on: the file's rows less test_id, less held-out questions
        train, test = split_test_id(problems, cfg.data.n_test, cfg.data.seed) if cfg.data.train_path else (problems, [])
        ood_rows = held_out.get("test_ood", [])[: cfg.data.n_test] if "data.ood_path" in files else []
        kept, _ = drop_overlap(train, {"test_id": test, "test_ood": ood_rows})
        require_training(kept, cfg.data.train_path or "built-in tasks")
    if needs_teacher:
        if not cfg.model.teacher_path:
            raise ConfigError(f"loss.teacher_beta={cfg.loss.teacher_beta}: needs model.teacher_path")
        check_model_dir(Path(cfg.model.teacher_path))
    tokenizer = _tokenizer_for(cfg, student)
    for name, loaded in files.items():
        check_characters(tokenizer, loaded, getattr(cfg.data, name.split(".")[1]), name)
    scan = _scan(tokenizer, problems, cfg)
    if cfg.rollout.max_new_tokens == 0 and cfg.grpo.steps > 0:  # auto: the budget check needs the measured value
        auto = max(scan.longest_reply + AUTO_MARGIN, auto_max_new_tokens(tokenizer, held_out))
        cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_new_tokens=auto))
    check_token_budget(cfg, tokenizer, problems, source, scan)


def _user_rows(cfg, name: str):
    """Every row of the user file named by the config field name (data.train_path or data.ood_path), checked and
    each row's text bounded by data.token_budget (a sources.LoadedProblems); a file with problems that lack probes
    needs model.teacher_path unless data.num_probes is 0."""
    from exgrpo_fast.data.sources import read_problems

    path = getattr(cfg.data, name.split(".")[1])
    loaded = read_problems(path, on_error=getattr(cfg.data, "on_error", "raise"), token_budget=cfg.data.token_budget)
    if any(not p["probes"] for p in loaded.problems) and cfg.data.num_probes > 0 and not cfg.model.teacher_path:
        raise ConfigError(
            f"{name}={path!r} has problems without probes: set model.teacher_path to write them, or data.num_probes=0"
        )
    return loaded
