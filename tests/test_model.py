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


# ---- the model directory is checked before anything is loaded; every error names the path


def _copy(ckpt, dst):
    shutil.copytree(ckpt, dst)
    return dst


def test_truncated_weights_named_by_path(tmp_path, ckpt):
    from exgrpo_fast.errors import ModelError, UserError
    from exgrpo_fast.model.loading import check_model_dir

    broken = _copy(ckpt, tmp_path / "trunc")
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    for keep in (len(data) - 1, len(data) // 2, 100, 5):
        weights.write_bytes(data[:keep])
        with pytest.raises(ModelError, match=rf"{weights}: (truncated|corrupt)") as info:
            load_model(broken)
        assert isinstance(info.value, UserError)
    weights.write_bytes(data)
    assert check_model_dir(broken) == broken


def test_no_tokenizer_files_is_a_clear_error(tmp_path, ckpt):
    from exgrpo_fast.errors import ModelError

    bare = _copy(ckpt, tmp_path / "bare")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (bare / f).unlink(missing_ok=True)
    with pytest.raises(ModelError, match=rf"model path {bare} has no tokenizer files .*tokenizer\.json") as info:
        load_model(bare)
    assert "sentencepiece" not in str(info.value)
    corrupt = _copy(ckpt, tmp_path / "corrupt")
    (corrupt / "tokenizer.json").write_text((ckpt / "tokenizer.json").read_text()[:300])
    with pytest.raises(ModelError, match=rf"cannot load the tokenizer in {corrupt}"):
        load_model(corrupt)


def test_bad_config_and_missing_shard(tmp_path, ckpt):
    from exgrpo_fast.errors import MissingPathError, ModelError

    bad = _copy(ckpt, tmp_path / "cfg")
    (bad / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ModelError, match=rf"{bad / 'config.json'}: not valid JSON"):
        load_model(bad)
    (bad / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ModelError, match="no model_type"):
        load_model(bad)
    sharded = _copy(ckpt, tmp_path / "sharded")
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(MissingPathError, match="shard model-00002-of-00002.safetensors listed in .* is missing"):
        load_model(sharded)
    with pytest.raises(MissingPathError, match=f"model path {tmp_path / 'x.bin'} does not exist"):
        load_model(tmp_path / "x.bin")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MissingPathError, match="is not a directory"):
        load_model(tmp_path / "file")
