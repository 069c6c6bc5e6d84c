"""Dialogue encoding: loss masks cover exactly the assistant's tokens (content + end-of-turn), through the chat
template, the built-in fallback and a chatml-style template; broken templates are reported."""

import pytest

from exgrpo_fast.data.dialogue import encode_dialogue, encode_prompt, end_of_turn_ids
from exgrpo_fast.data.packing import pack_sequences
from exgrpo_fast.model.tiny import build_tiny_tokenizer

TURNS = [
    {"role": "user", "content": "2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "why"},
    {"role": "assistant", "content": "2+3=5"},
]


def hand_built(tok, pieces):
    ids, mask = [], []
    for text, on in pieces:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        mask += [on] * len(t)
    return ids, mask


def builtin_pieces():
    return [
        ("<|user|>", False),
        ("2+3?", False),
        ("<|end|>", False),
        ("<|assistant|>", False),
        ("5", True),
        ("<|end|>", True),
        ("<|user|>", False),
        ("why", False),
        ("<|end|>", False),
        ("<|assistant|>", False),
        ("2+3=5", True),
        ("<|end|>", True),
    ]


def test_mask_matches_hand_built_two_turns():
    tok = build_tiny_tokenizer()
    ids, mask = encode_dialogue(tok, TURNS)
    want_ids, want_mask = hand_built(tok, builtin_pieces())
    assert ids == want_ids and mask == want_mask
    assert encode_prompt(tok, TURNS[:1]) == want_ids[:7]  # <|user|> 2+3? <|end|> <|assistant|>
    assert encode_prompt(tok, TURNS[:3]) == want_ids[: len(want_ids) - 6]  # up to the second <|assistant|>
    assert tok.convert_tokens_to_ids("<|end|>") in end_of_turn_ids(tok)
    assert tok.eos_token_id in end_of_turn_ids(tok)


def test_fallback_without_template_is_the_builtin_format():
    tok = build_tiny_tokenizer()
    want = encode_dialogue(tok, TURNS)
    tok.chat_template = None
    assert encode_dialogue(tok, TURNS) == want
    assert encode_prompt(tok, TURNS[:1]) == want[0][:7]


def test_chatml_style_template_masks_up_to_end_of_turn_only():
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>'"
        " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}"
    )
    assert tok.convert_tokens_to_ids("<|im_end|>") in end_of_turn_ids(tok)
    ids, mask = encode_dialogue(tok, TURNS[:2])
    want = hand_built(
        tok,
        [
            ("<|im_start|>", False),
            ("user\n2+3?", False),
            ("<|im_end|>", False),
            ("\n", False),
            ("<|im_start|>", False),
            ("assistant\n", False),
            ("5", True),
            ("<|im_end|>", True),
            ("\n", False),
        ],
    )  # the template's newline after <|im_end|> is never sampled
    assert (ids, mask) == want


def test_dialogue_ending_with_user_turn_and_label_shift():
    tok = build_tiny_tokenizer()
    ids, mask = encode_dialogue(tok, TURNS[:3])
    assert not any(mask[len(mask) - 5 :])  # the trailing user turn is not trained on
    (b,) = pack_sequences([(ids, mask)], 1000)
    # every loss label is a student token: "5" and its <|end|>
    assert tok.decode(b.loss_labels.tolist(), skip_special_tokens=False) == "5<|end|>"


def test_prefix_property_violation_is_reported():
    tok = build_tiny_tokenizer()
    # a template that drops earlier assistant turns (as some reasoning templates do) breaks the prefix property
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' or loop.last %}"
        "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    turns = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    with pytest.raises(ValueError, match="prefix property"):
        encode_dialogue(tok, turns)


def test_bad_turns():
    tok = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="turn 0"):
        encode_dialogue(tok, [{"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match="turn 1"):
        encode_dialogue(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}])
    with pytest.raises(ValueError, match="empty"):
        encode_prompt(tok, [])
