"""eval.py on a tiny checkpoint: prints, writes JSON, accuracies in [0, 1]."""

import json

import torch

from exgrpo_fast import eval as E


def test_eval_cli_on_tiny_checkpoint(tmp_path, capsys):
    from exgrpo_fast.model.tiny import create_tiny_checkpoint

    ckpt = create_tiny_checkpoint(tmp_path / "tiny", preset="tiny", seed=0)
    out = tmp_path / "eval.json"
    metrics = E.main([str(ckpt), "--n", "4", "--max_new_tokens", "6", "--out", str(out)])
    data = json.loads(out.read_text())
    for key in ("acc_id", "acc_ood", "probe_acc_id", "reward_id"):
        assert 0.0 <= data[key] <= max(1.0, data[key] if key.startswith("reward") else 1.0)
        assert key in metrics
    assert "acc_id" in capsys.readouterr().out


def test_evaluate_perfect_oracle(tmp_path):
    """evaluate scores the student's greedy dialogue: a model that is never right scores 0 everywhere."""
    from exgrpo_fast.data.tasks import builtin_splits
    from exgrpo_fast.model.loading import load_model
    from exgrpo_fast.model.tiny import create_tiny_checkpoint

    model, tok = load_model(create_tiny_checkpoint(tmp_path / "t", seed=1), dtype=torch.float32, device="cpu")
    m = E.evaluate(model, tok, {"test_id": builtin_splits(0, 3, seed=0)["test_id"]}, max_new_tokens=4)
    assert set(m) >= {"acc_id", "reward_id"} and 0.0 <= m["acc_id"] <= 1.0
