"""Multi-turn dialogues to token ids, with the loss mask on exactly the tokens the assistant (the student) produces.

Turns are `[{"role": "user" | "assistant", "content": str}, ...]`. The tokenizer's chat template renders them; the
ids of each assistant turn are found by rendering the dialogue incrementally (prefix up to the generation prompt,
then up to the end of the turn) and tokenizing both: what lies past the prefix, up to and including its last
end-of-turn token, is the assistant's (template text after that token, such as chatml's newline, is not).
A template that breaks this prefix property (for example one that rewrites earlier turns) is reported instead of
producing a wrong mask. Tokenizers without a chat template use the built-in format `<|role|>content<|end|>` when
those tokens exist, else plain `role: content\\n` lines.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from transformers import PreTrainedTokenizerBase

from exgrpo_fast.data.problem import Dialogue, Turn

_BUILTIN = ("<|user|>", "<|assistant|>", "<|end|>")


def _render(tokenizer: PreTrainedTokenizerBase, turns: list[dict], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)
    vocab = tokenizer.get_vocab()
    if all(t in vocab for t in _BUILTIN):
        text = "".join(f"<|{t['role']}|>{t['content']}<|end|>" for t in turns)
        return text + ("<|assistant|>" if add_generation_prompt else "")
    eos = tokenizer.eos_token or ""
    text = "".join(f"{t['role']}: {t['content']}{eos if t['role'] == 'assistant' else ''}\n" for t in turns)
    return text + ("assistant: " if add_generation_prompt else "")


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_turns(turns: Iterable[Turn]) -> list[Turn]:
    """The turns as a list (a Dialogue or any sequence of {"role", "content"} dicts), checked."""
    turns = list(turns)
    if not turns:
        raise ValueError("turns is empty")
    for i, t in enumerate(turns):
        ok = isinstance(t, Mapping) and t.get("role") in ("user", "assistant", "system")
        if not ok or not isinstance(t.get("content"), str):
            raise ValueError(f"turn {i} must be {{'role': 'user'|'assistant'|'system', 'content': str}}, got {t!r}")
    return turns


def encode_prompt(tokenizer: PreTrainedTokenizerBase, turns: Dialogue | Iterable[Turn]) -> list[int]:
    """Ids of the dialogue so far followed by the assistant generation prompt (what sampling continues from)."""
    turns = _check_turns(turns)
    return _ids(tokenizer, _render(tokenizer, turns, add_generation_prompt=True))


def encode_dialogue(
    tokenizer: PreTrainedTokenizerBase, turns: Dialogue | Iterable[Turn]
) -> tuple[list[int], list[bool]]:
    """(input_ids, loss_mask) of a whole dialogue; loss_mask is True on assistant-produced tokens only."""
    turns = _check_turns(turns)
    stops = set(end_of_turn_ids(tokenizer))
    ids: list[int] = []
    mask: list[bool] = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prefix = _ids(tokenizer, _render(tokenizer, turns[:i], add_generation_prompt=True)) if i else []
        full = _ids(tokenizer, _render(tokenizer, turns[: i + 1], add_generation_prompt=False))
        if full[: len(ids)] != ids or prefix[: len(ids)] != ids or full[: len(prefix)] != prefix:
            raise ValueError(
                f"the chat template does not render turn {i} as an extension of the earlier turns (prefix property "
                "broken), so the student's tokens cannot be located; use a template that keeps earlier turns as-is"
            )
        mask.extend([False] * (len(prefix) - len(ids)))
        # Tokens the template appends after the end-of-turn token (chatml's "\n" after <|im_end|>) are not the
        # student's: sampling stops at end-of-turn, so they are never generated and must not be trained on.
        span = full[len(prefix) :]
        last_end = max((j for j, t in enumerate(span) if t in stops), default=len(span) - 1)
        mask.extend([True] * (last_end + 1) + [False] * (len(span) - last_end - 1))
        ids = full
    rest = _ids(tokenizer, _render(tokenizer, turns, add_generation_prompt=False))
    if rest[: len(ids)] != ids:
        raise ValueError("the chat template does not render the dialogue as an extension of its assistant turns")
    mask.extend([False] * (len(rest) - len(ids)))
    return rest, mask


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn (sampling stops on any of them)."""
    vocab = tokenizer.get_vocab()
    found = [vocab[t] for t in ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>") if t in vocab]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in found:
        found.append(tokenizer.eos_token_id)
    if not found:
        raise ValueError("the tokenizer has no end-of-turn or eos token")
    return found
