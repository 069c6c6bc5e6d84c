"""Greedy evaluation of any checkpoint: `python -m exgrpo_fast.eval CKPT [--n 200] [--out eval.json]` (flags: --help;
the command line is config.EvalArgs, parsed by the same tyro set-up as training's).

The eval CLI and the trainer's evals share one config: options left unset come from the run that wrote the
checkpoint (its config.json: data seed and files, held-out splits and their size log.eval_n, the reward section,
rollout.max_new_tokens, rollout.batch_size, model.dtype), or from TrainConfig() without one; the splits come from
the trainer's own data.splits.load_data. So `python -m exgrpo_fast.eval RUN/checkpoints/grpo-000060` with no options
reproduces the run's final eval exactly.

For each held-out split (test_id: in-distribution, test_ood: out-of-distribution) the student answers the question
and then every probe greedily, each turn conditioned on its own earlier answers (the same multi-turn rollout as
training, G = 1, temperature 0). Reports final-answer accuracy, probe accuracy and the mean reward per split;
prints one line and writes JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from exgrpo_fast.checkpoint import resolve_checkpoint
from exgrpo_fast.config import eval_config, find_run_config, parse_eval_args
from exgrpo_fast.data.lengths import resolve_max_new_tokens
from exgrpo_fast.data.splits import load_data
from exgrpo_fast.data.problem import Problem
from exgrpo_fast.errors import ConfigError, cli_main, full_disk_named
from exgrpo_fast.model.loading import check_model_dir, load_model, use_device
from exgrpo_fast.rewards import RewardConfig, score_dialogue
from exgrpo_fast.rollout import SamplingParams, rollout_dialogues
from exgrpo_fast.rundir import writable_problem


EVAL_NOTE_EVERY_S = 30.0
"""Seconds between the plain progress lines of a long eval when log.progress is "auto" and stderr is no terminal."""


def bars_on(progress: bool | Literal["auto"], stream=None) -> bool:
    """Whether to draw tqdm bars for log.progress: as set when a bool; "auto": only when stream (default stderr,
    where tqdm draws) is a terminal. Carriage-return frames are noise in a file, a pipe or a CI log."""
    if progress == "auto":
        isatty = getattr(stream if stream is not None else sys.stderr, "isatty", None)
        return bool(isatty is not None and isatty())
    return bool(progress)


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    splits: Mapping[str, list[Problem]],
    *,
    reward_cfg: RewardConfig | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    include_probes: bool = True,
    progress: bool | Literal["auto"] = False,
) -> dict[str, float]:
    """{acc_<split>, probe_acc_<split>, reward_<split>} from greedy multi-turn rollouts (split names shortened:
    test_id -> id, test_ood -> ood). progress (log.progress): a tqdm bar over the problems, shown once an eval has
    run 3 s; "auto" draws it on a terminal and otherwise prints a plain line every EVAL_NOTE_EVERY_S seconds.
    Problems are sampled in chunks of batch_size, the sampler's own batches, in order."""
    reward_cfg = reward_cfg if reward_cfg is not None else RewardConfig()
    # not kept across calls: evals are rare, and a kept engine would hold a second KV cache through training
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, persistent=False)
    out: dict[str, float] = {}
    total = sum(len(p) for p in splits.values())
    bars = bars_on(progress)
    bar = tqdm(total=total, desc="eval", unit="problem", delay=3.0, leave=False, disable=not bars)
    notes = progress == "auto" and not bars
    t0 = last_note = time.perf_counter()
    done = 0
    for split, problems in splits.items():
        if not problems:
            continue
        name = split.removeprefix("test_")
        rollouts = []
        for start in range(0, len(problems), batch_size):
            chunk = rollout_dialogues(
                model, tokenizer, problems[start : start + batch_size], group_size=1, params=params,
                include_probes=include_probes, batch_size=batch_size,
            )  # fmt: skip
            rollouts += [dataclasses.replace(r, problem_index=r.problem_index + start) for r in chunk]
            bar.update(min(batch_size, len(problems) - start))
            done += min(batch_size, len(problems) - start)
            if notes and time.perf_counter() - last_note >= EVAL_NOTE_EVERY_S:
                last_note = time.perf_counter()
                print(f"eval | {done}/{total} problems | {last_note - t0:.0f} s", flush=True)
        scores = [score_dialogue(problems[r.problem_index], r.responses, reward_cfg) for r in rollouts]
        n = len(scores)
        out[f"acc_{name}"] = sum(float(s["task"]) for s in scores) / n
        with_probes = [s for s, r in zip(scores, rollouts) if len(r.responses) > 1]
        if with_probes:
            out[f"probe_acc_{name}"] = sum(float(s["probe"]) for s in with_probes) / len(with_probes)
        out[f"reward_{name}"] = sum(float(s["total"]) for s in scores) / n
    bar.close()
    return out


def format_eval(metrics: dict[str, float]) -> str:
    return " | ".join(f"{k} {v:.3f}" for k, v in metrics.items())


def main(argv: list[str] | None = None) -> dict[str, float]:
    """The command line: user errors (flags, a missing checkpoint, a bad data file) print one line and exit 2."""
    return cli_main(_main, argv)


def _main(argv: list[str]) -> dict[str, float]:
    args = parse_eval_args(argv)
    ckpt = Path(args.ckpt)
    if not (ckpt / "config.json").is_file() or (ckpt / "metrics.jsonl").is_file():
        ckpt = resolve_checkpoint(ckpt)
    check_model_dir(ckpt)
    out = Path(args.out) if args.out else ckpt / "eval.json"
    check_out(out)  # before the eval, not after it
    saved, run_dir = find_run_config(ckpt) or (None, ckpt)
    cfg = eval_config(args, saved)

    if saved is None and cfg.data.num_probes > 0 and not cfg.model.teacher_path:
        cfg.data.num_probes = 0  # no run, no teacher: user problems without probes are asked their question only
    # read (and check every row of) the data before the model is loaded; a run's teacher-written probes come from
    # its probe cache
    problems, held_out = load_data(cfg, run_dir)
    device = use_device(args.device)  # made current: Triton and CUDA graphs launch on the current device
    model, tokenizer = load_model(ckpt, dtype=getattr(torch, cfg.model.dtype), device=device)
    max_new_tokens = resolve_max_new_tokens(
        tokenizer, {"train": problems, **held_out}, cfg.rollout.max_new_tokens,
        name="max_new_tokens" if args.max_new_tokens is not None else "rollout.max_new_tokens",
    )  # fmt: skip
    splits = {k: v[: cfg.log.eval_n] for k, v in held_out.items()}
    t0 = time.perf_counter()
    metrics = evaluate(
        model, tokenizer, splits, reward_cfg=cfg.reward, max_new_tokens=max_new_tokens,
        batch_size=cfg.rollout.batch_size, include_probes=args.probes, progress="auto",
    )  # fmt: skip
    metrics["eval_s"] = time.perf_counter() - t0
    n = cfg.log.eval_n
    print(f"eval {ckpt} | n {n} | max_new_tokens {max_new_tokens} | " + format_eval(metrics))
    out.parent.mkdir(parents=True, exist_ok=True)
    with full_disk_named(out):
        out.write_text(
            json.dumps({"ckpt": str(ckpt), "n": n, "max_new_tokens": max_new_tokens, **metrics}, indent=2) + "\n"
        )
    print(f"wrote {out}")
    return metrics


def check_out(out: Path) -> None:
    """The JSON output path can be written: not a directory, its folder creatable and writable (ConfigError)."""
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory; give a file path such as {out / 'eval.json'}")
    problem = writable_problem(out.parent)
    if problem:
        raise ConfigError(f"--out {out}: cannot write it: {problem}")


if __name__ == "__main__":
    main()
