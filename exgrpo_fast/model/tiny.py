"""The built-in student: a character-level tokenizer built locally with `tokenizers`, and Llama-style configs from a
~1M-parameter CPU model up to a ~0.5B GPU one. Saved and reloaded in the ordinary Hugging Face format (config.json,
model.safetensors, tokenizer.json), so every other path of the trainer treats it like any local checkpoint."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
# One message = role tag, content, <|end|>; the assistant's <|end|> is the token that ends its turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

TINY_PRESETS: dict[str, dict] = {
    # ~0.8M parameters: learns the built-in ID arithmetic in a few minutes on 2 CPU cores.
    "tiny": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    # ~25M parameters: a stronger CPU student, or a quick GPU one.
    "small": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
    # ~0.5B parameters (20 layers of 1536 with GQA 12/4): the GPU preset and the packing benchmark model.
    "gpu-0.5b": dict(
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=20,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII (one char = one token) plus the chat special tokens."""
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))  # letters, digits, punctuation, space, \t, \n
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(preset: str, vocab_size: int, tokenizer: PreTrainedTokenizerFast | None = None) -> LlamaConfig:
    if preset not in TINY_PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {sorted(TINY_PRESETS)}")
    ids = {}
    if tokenizer is not None:
        ids = dict(
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|end|>"),
        )
    return LlamaConfig(vocab_size=vocab_size, rms_norm_eps=1e-5, rope_theta=10000.0, **ids, **TINY_PRESETS[preset])


def create_tiny_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Randomly initialise the built-in student and save it (safetensors + tokenizer) to out_dir; returns the path."""
    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(preset, len(tokenizer), tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
