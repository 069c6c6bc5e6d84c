"""Explanatory probes written by an HF teacher model for user problems, checked by self-consistency and cached.

The built-in task's symbolic teacher lives with the task (exgrpo_fast.data.tasks.write_probes); this module is the
teacher for user problems. Both depend on exgrpo_fast.data.problem only, never on each other.

HF teacher (`write_probes_with_teacher`), per problem:

    1. draw K probe kinds (inverse / counterfactual / step / verify, seeded by (seed, problem id));
    2. per kind, a prompt template shows the problem, its gold answer and rationale, and asks the teacher for
       "Probe: <question>" + "Answer: <answer>";
    3. self-consistency: the teacher answers each parsed probe `n_checks` more times (sampled) from the problem and
       the probe alone; a probe is kept when the fraction of re-answers matching its written answer is at least
       `min_consistency` (default: all of them). Problems short of K kept probes get `rounds - 1` more draws.

The result is a datasets.Dataset of problem rows (probes filled in) with provenance columns: teacher, probe_template
(the template kind of each kept probe), probe_consistency (its agreement fraction), probe_candidates (how many
probes the teacher wrote for the problem). It is saved under cache_dir, keyed by a hash of (problems, teacher path
and config hash, templates, seed, k, generation settings); a second call with the same inputs loads it and never
calls the teacher. This cache is one of the two edges where `datasets` appears: the trainer turns its rows into
Problems (Problem.from_dict). Problems that already carry probes pass through unchanged (teacher = "").
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from exgrpo_fast.data.problem import CHECKABLE, Problem, as_problem
from exgrpo_fast.rewards import answers_match, extract_answer

if TYPE_CHECKING:
    from datasets import Dataset

CACHE_VERSION = 1

_HEADER = "Problem: {question}\nCorrect answer: {answer}\nWorked solution: {rationale}\n\n"
_FOOTER = "\nReply in exactly two lines:\nProbe: <the question>\nAnswer: <its short answer>"
TEMPLATES = {
    "inverse": _HEADER + "Write an inverse question: hide one number given in the problem, state the final answer "
    "{answer}, and ask for the hidden number. The answer is that hidden number." + _FOOTER,
    "counterfactual": _HEADER + "Write a counterfactual question: change one number in the problem and ask for the "
    "new final answer. The answer is that new final answer." + _FOOTER,
    "step": _HEADER + "Write a question asking for one intermediate result of the worked solution. The answer is "
    "that intermediate number." + _FOOTER,
    "verify": _HEADER + "Write a question asking whether a candidate final answer (either the correct one or a "
    "wrong one) is right. The answer is yes or no." + _FOOTER,
    "explain": _HEADER + "Write a question asking why the answer holds, and a one-sentence explanation as its "
    "answer." + _FOOTER,
}
"""Probe-writing prompt per kind (format fields: question, answer, rationale)."""
ANSWER_TEMPLATE = "Problem: {question}\nQuestion: {probe}\nReply with the short answer only, as: Answer: <answer>"
"""Prompt the teacher re-answers a probe from (self-consistency check; the gold answer is not shown)."""

_PROBE = re.compile(r"probe\s*:\s*(.+?)\s*(?:\n|$)", re.IGNORECASE)
_WRITTEN_ANSWER = re.compile(r"answer\s*:\s*(.+?)\s*(?:\n|$)", re.IGNORECASE)

_NUMBER = re.compile(r"\d")

GenerateFn = Callable[[list[str]], list[str]]


# ----------------------------------------------------------------------------------------------------------------
# parsing and checking


def parse_probe(text: str, kind: str) -> dict | None:
    """{"kind", "question", "answer"} from a teacher's "Probe: ... / Answer: ..." reply; None when malformed."""
    q = _PROBE.search(text or "")
    if not q:
        return None
    a = _WRITTEN_ANSWER.search(text[q.end() - 1 :])
    if not a:
        return None
    question, answer = q.group(1).strip(), a.group(1).strip().rstrip(".").strip()
    if not question or not answer:
        return None
    if kind == "verify":
        answer = answer.lower()
        if answer not in ("yes", "no"):
            return None
    elif kind != "explain":
        answer = extract_answer(f"Answer: {answer}") or ""
        if not answer or (kind in ("inverse", "step") and not _NUMBER.search(answer)):
            return None  # inverse and step probes ask for a number
    return {"kind": kind, "question": question, "answer": answer}


def consistency(probe: dict, replies: Sequence[str]) -> float:
    """Fraction of the teacher's re-answers that match the probe's written answer (1.0 for explain: unchecked)."""
    if probe["kind"] == "explain":
        return 1.0
    if not replies:
        return 0.0
    return sum(answers_match(extract_answer(r), probe["answer"]) for r in replies) / len(replies)


# ----------------------------------------------------------------------------------------------------------------
# the HF teacher


def hf_generate_fn(
    teacher_path: str,
    *,
    max_new_tokens: int = 64,
    seed: int = 0,
    temperature: float = 0.7,
    batch_size: int = 16,
    device: str | None = None,
) -> GenerateFn:
    """prompts -> sampled completions from a local HF causal LM (local_files_only: never downloads)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(teacher_path, local_files_only=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    generator_seed = [seed]

    def render(prompt: str) -> str:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt + "\n"

    @torch.no_grad()
    def generate(prompts: list[str]) -> list[str]:
        out = []
        cuda = [torch.device(device).index or 0] if str(device).startswith("cuda") else []
        for i in range(0, len(prompts), batch_size):
            with torch.random.fork_rng(devices=cuda):  # seeded sampling without moving the caller's RNG
                torch.manual_seed(generator_seed[0])
                generator_seed[0] += 1
                enc = tokenizer(
                    [render(p) for p in prompts[i : i + batch_size]],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                ).to(device)
                ids = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    temperature=temperature,
                    top_p=1.0,
                    pad_token_id=tokenizer.pad_token_id,
                )
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return out

    return generate


def teacher_config_hash(teacher_path: str) -> str:
    """Hash of the teacher's config.json (and weight file names/sizes), so a changed checkpoint misses the cache."""
    h = hashlib.sha256()
    root = Path(teacher_path)
    if root.is_dir():
        cfg = root / "config.json"
        if cfg.is_file():
            h.update(cfg.read_bytes())
        for f in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# writing probes with the teacher


def _as_rows(problems: Iterable[Problem | Mapping]) -> list[dict]:
    return [as_problem(p).to_dict() for p in problems]


def cache_key(
    problems: list[dict],
    teacher_path: str,
    *,
    k: int,
    seed: int,
    max_new_tokens: int,
    n_checks: int,
    min_consistency: float,
    rounds: int,
    kinds: Sequence[str] = CHECKABLE,
) -> str:
    """Hash of everything the written probes depend on: the cache directory's name."""
    payload = {
        "version": CACHE_VERSION,
        "problems": problems,
        "teacher": str(teacher_path),
        "teacher_config": teacher_config_hash(teacher_path),
        "templates": TEMPLATES,
        "answer_template": ANSWER_TEMPLATE,
        "seed": seed,
        "k": k,
        "max_new_tokens": max_new_tokens,
        "n_checks": n_checks,
        "min_consistency": min_consistency,
        "rounds": rounds,
        "kinds": list(kinds),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def write_probes_with_teacher(
    problems: Iterable[Problem | Mapping],
    teacher_path: str,
    *,
    k: int = 3,
    cache_dir: str,
    seed: int = 0,
    max_new_tokens: int = 64,
    generate_fn: GenerateFn | None = None,
    n_checks: int = 2,
    min_consistency: float = 1.0,
    rounds: int = 2,
    kinds: Sequence[str] = CHECKABLE,
) -> Dataset:
    """Problems with up to k teacher-written, self-consistent probes each, as a datasets.Dataset (cached).

    problems: Problems or problem rows (dicts, a Dataset); teacher_path: local HF checkpoint (loaded only on a cache
    miss and only when generate_fn is None); generate_fn: prompts -> completions, replaces the HF teacher (tests,
    servers).
    """
    from datasets import Dataset

    if k < 0 or n_checks < 1 or rounds < 1 or not 0.0 <= min_consistency <= 1.0:
        raise ValueError(
            f"k={k}, n_checks={n_checks}, rounds={rounds}, min_consistency={min_consistency}: "
            "expected k >= 0, n_checks >= 1, rounds >= 1, 0 <= min_consistency <= 1"
        )
    bad = set(kinds) - set(TEMPLATES)
    if bad or not kinds:
        raise ValueError(f"kinds={list(kinds)}: expected some of {sorted(TEMPLATES)}")
    problems = _as_rows(problems)
    if not problems:
        raise ValueError("write_probes_with_teacher: no problems")
    key = cache_key(
        problems,
        teacher_path,
        k=k,
        seed=seed,
        max_new_tokens=max_new_tokens,
        n_checks=n_checks,
        min_consistency=min_consistency,
        rounds=rounds,
        kinds=kinds,
    )
    target = Path(cache_dir) / f"probes-{key}"
    if (target / "dataset_info.json").is_file():
        return Dataset.load_from_disk(str(target))

    todo = [i for i, p in enumerate(problems) if not p.get("probes")]
    if todo and k > 0 and generate_fn is None:
        generate_fn = hf_generate_fn(teacher_path, max_new_tokens=max_new_tokens, seed=seed)
    kept: dict[int, list[tuple[dict, str, float]]] = {i: [] for i in todo}
    candidates = {i: 0 for i in todo}
    for rnd in range(rounds if k > 0 else 0):
        jobs = []  # (problem index, kind)
        for i in todo:
            need = k - len(kept[i])
            if need <= 0:
                continue
            rng = random.Random(f"{seed}-{problems[i].get('id', i)}-{rnd}")
            pool = list(kinds)
            rng.shuffle(pool)
            jobs += [(i, pool[j % len(pool)]) for j in range(need)]
        if not jobs:
            break
        prompts = [
            TEMPLATES[kind].format(
                question=problems[i]["question"],
                answer=problems[i]["answer"],
                rationale=problems[i].get("rationale") or "(none)",
            )
            for i, kind in jobs
        ]
        written = _call(generate_fn, prompts)
        parsed = []
        for (i, kind), text in zip(jobs, written):
            candidates[i] += 1
            probe = parse_probe(text, kind)
            if probe is not None:
                parsed.append((i, probe))
        checks = [
            ANSWER_TEMPLATE.format(question=problems[i]["question"], probe=probe["question"])
            for i, probe in parsed
            if probe["kind"] != "explain"
        ]
        replies = _call(generate_fn, checks * n_checks) if checks else []
        c = 0
        for i, probe in parsed:
            if probe["kind"] == "explain":
                agree = 1.0
            else:
                agree = consistency(probe, [replies[c + r * len(checks)] for r in range(n_checks)])
                c += 1
            duplicate = any(q["question"] == probe["question"] for q, _, _ in kept[i])
            if agree >= min_consistency and len(kept[i]) < k and not duplicate:
                kept[i].append((probe, probe["kind"], agree))

    rows = []
    for i, p in enumerate(problems):
        row = {
            "id": str(p.get("id", i)),
            "question": p["question"],
            "answer": str(p["answer"]),
            "rationale": p.get("rationale") or "",
            "split": p.get("split") or "",
            "meta": p.get("meta") or "",
        }
        if not isinstance(row["meta"], str):
            row["meta"] = json.dumps(row["meta"], default=str)
        if i in kept:
            row["probes"] = [probe for probe, _, _ in kept[i]]
            row.update(
                teacher=str(teacher_path),
                probe_template=[t for _, t, _ in kept[i]],
                probe_consistency=[a for _, _, a in kept[i]],
                probe_candidates=candidates[i],
            )
        else:
            row["probes"] = [
                {"kind": q["kind"], "question": q["question"], "answer": str(q["answer"])} for q in p["probes"]
            ]
            row.update(
                teacher="",
                probe_template=[q["kind"] for q in p["probes"]],
                probe_consistency=[1.0] * len(p["probes"]),
                probe_candidates=0,
            )
        rows.append(row)
    ds = Dataset.from_list(rows)
    # save to a private temp dir, then rename: a crash or a concurrent writer never leaves a half-written cache
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    ds.save_to_disk(str(tmp))
    try:
        os.replace(tmp, target)
    except OSError:  # another writer won the race: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return Dataset.load_from_disk(str(target))


def _call(generate_fn: GenerateFn, prompts: list[str]) -> list[str]:
    out = list(generate_fn(prompts))
    if len(out) != len(prompts):
        raise ValueError(f"generate_fn returned {len(out)} completions for {len(prompts)} prompts")
    return [o if isinstance(o, str) else "" for o in out]
