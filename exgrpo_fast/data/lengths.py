"""How many tokens a student turn needs: rollout.max_new_tokens from the data.

A rollout turn ends when the student samples an end-of-turn token or after rollout.max_new_tokens tokens, the
end-of-turn token included. A turn cut short loses its answer line, so the budget should fit every reference
reply: the teacher's answer to the question (`format_answer(rationale, answer)`) and the reference answer of every
checkable probe (`Answer: <answer>`; explain probes are never rolled out), each as the student would write it,
tokenized, plus one end-of-turn token.

    resolve_max_new_tokens(tokenizer, {"train": ..., "test_id": ..., "test_ood": ...}, requested)

returns `requested` when it is > 0, logging a warning for every split where more than 1% of the reference replies
would not fit, and for 0 ("auto") the longest reference reply over all splits plus AUTO_MARGIN tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

from transformers import PreTrainedTokenizerBase

from exgrpo_fast.data.problem import ANSWER_PREFIX, Problem, as_problem, checkable_probes, format_answer

_log = logging.getLogger(__name__)

AUTO_MARGIN = 8
"""Tokens added to the longest reference reply when rollout.max_new_tokens is 0 (auto)."""
TRUNCATION_WARN_FRAC = 0.01
"""An explicit rollout.max_new_tokens that cuts more than this fraction of a split's reference replies warns."""


def reference_replies(problem: Problem | Mapping) -> list[str]:
    """The replies a rollout of this problem should produce: the answer to the question, then each checkable probe's
    answer line, in dialogue order."""
    p = as_problem(problem)
    return [format_answer(p.rationale, p.answer)] + [f"{ANSWER_PREFIX}{q.answer}" for q in checkable_probes(p)]


CHUNK = 512
"""Problems whose replies are tokenised in one call (memory: one chunk's token ids, never every reply's)."""


def token_counts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    """Tokens of each text without special tokens: len(tokenizer(texts, add_special_tokens=False)["input_ids"][i]),
    counted on the Rust tokenizer of a fast tokenizer when it pads and truncates nothing (transformers' conversion
    of every encoding to Python lists took longer than the tokenisation itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and backend.padding is None and backend.truncation is None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: no character offsets
        return [len(e) for e in encode(texts, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _length_chunks(tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem | Mapping]) -> Iterator[list[int]]:
    for lo in range(0, len(problems), CHUNK):
        texts = [r for p in problems[lo : lo + CHUNK] for r in reference_replies(p)]
        if texts:
            yield [n + 1 for n in token_counts(tokenizer, texts)]


def reply_lengths(tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem | Mapping]) -> list[int]:
    """Tokens (end-of-turn included) of every reference reply of the problems, tokenised CHUNK problems at a time."""
    return [n for lengths in _length_chunks(tokenizer, problems) for n in lengths]


def auto_max_new_tokens(
    tokenizer: PreTrainedTokenizerBase, splits: Mapping[str, Sequence[Problem | Mapping]], margin: int = AUTO_MARGIN
) -> int:
    """The longest reference reply over all splits plus margin tokens (margin + 1 when there are no problems)."""
    longest = max((max(n) for ps in splits.values() for n in _length_chunks(tokenizer, ps)), default=1)
    return longest + margin


def truncated_fractions(
    tokenizer: PreTrainedTokenizerBase, splits: Mapping[str, Sequence[Problem | Mapping]], max_new_tokens: int
) -> dict[str, float]:
    """{split: fraction of its reference replies longer than max_new_tokens} (splits without problems left out)."""
    out = {}
    for split, problems in splits.items():
        cut = total = 0
        for lengths in _length_chunks(tokenizer, problems):
            cut += sum(n > max_new_tokens for n in lengths)
            total += len(lengths)
        if total:
            out[split] = cut / total
    return out


def resolve_max_new_tokens(
    tokenizer: PreTrainedTokenizerBase,
    splits: Mapping[str, Sequence[Problem | Mapping]],
    requested: int,
    *,
    name: str = "rollout.max_new_tokens",
) -> int:
    """requested when > 0 (a warning names each split where it cuts more than 1% of the reference replies), else
    (0 = auto) auto_max_new_tokens over the splits. name: the option named in the warning."""
    if requested < 0:
        raise ValueError(f"{name}={requested}: expected >= 0 (0 = auto from the data)")
    if requested == 0:
        return auto_max_new_tokens(tokenizer, splits)
    for split, frac in truncated_fractions(tokenizer, splits, requested).items():
        if frac > TRUNCATION_WARN_FRAC:
            _log.warning(
                "%s=%d cuts %.1f%% of the reference replies of split %s (their answer line would not fit); "
                "raise it or set 0 (auto: the longest reply + %d)", name, requested, 100 * frac, split, AUTO_MARGIN,
            )  # fmt: skip
    return requested
