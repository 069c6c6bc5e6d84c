"""Local checkpoints: the built-in student round-trips bit-exactly; bad paths and mismatches fail clearly."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from exgrpo_fast.model.loading import lm_head, load_model
from exgrpo_fast.model.tiny import TINY_PRESETS, build_tiny_tokenizer, create_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return create_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=3)


def test_roundtrip_bit_exact(ckpt, tmp_path):
    model, tok = load_model(ckpt)
    saved = load_file(str(ckpt / "model.safetensors"))
    state = model.state_dict()
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
    model.save_pretrained(tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    # plain transformers can read it too
    assert AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True).config.vocab_size == len(tok)
    assert AutoTokenizer.from_pretrained(ckpt, local_files_only=True)("12+3")["input_ids"] == tok("12+3")["input_ids"]


def test_same_seed_same_weights(tmp_path):
    a = load_file(str(create_tiny_checkpoint(tmp_path / "a", seed=5) / "model.safetensors"))
    b = load_file(str(create_tiny_checkpoint(tmp_path / "b", seed=5) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_and_lm_head(ckpt):
    model, _ = load_model(ckpt, dtype=torch.bfloat16)
    weight, bias = lm_head(model)
    assert weight.dtype == torch.bfloat16 and bias is None
    assert weight.shape == (model.config.vocab_size, model.config.hidden_size)


def test_softcapping_refused(ckpt):
    model, _ = load_model(ckpt)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        lm_head(model)


def test_missing_path_and_missing_weights(tmp_path, ckpt):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(broken)
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(broken)


def test_vocab_mismatch(tmp_path, ckpt):
    small = tmp_path / "small"
    shutil.copytree(ckpt, small)
    model = AutoModelForCausalLM.from_pretrained(small, local_files_only=True)
    model.resize_token_embeddings(50)
    model.save_pretrained(small)
    cfg = json.loads((small / "config.json").read_text())
    assert cfg["vocab_size"] == 50
    with pytest.raises(ValueError, match="tokenizer .* has 104 tokens but the model's embedding has only 50"):
        load_model(small)


def test_presets_and_tokenizer():
    tok = build_tiny_tokenizer()
    text = "Tom has 3 apples.\nAnswer: 5"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text  # one char = one token
    assert {"tiny", "small", "gpu-0.5b"} <= set(TINY_PRESETS)


def test_backend_bound_per_model(ckpt):
    model, _ = load_model(ckpt, attn_backend="sdpa_ref")
    assert all(m._packed_attn_backend == "sdpa_ref" for m in model.modules())
    with pytest.raises(ValueError, match="not available on cpu"):
        load_model(ckpt, attn_backend="flash_attn")
