"""The memory plan (python -m exgrpo_fast.plan): a configured step traced on fake tensors under torch's MemTracker.
Checked here: the plan of the tiny model agrees with the same step run for real on the CPU (within 10%, both fp32
and bf16 with FSDP2 masters); the CLI plans a 7B student from a bare config.json, and its figures move the right way
with the number of GPUs, activation checkpointing and LoRA. tests marked gpu compare it with the GPU's allocator."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from exgrpo_fast import config as C
from exgrpo_fast import plan as P
from exgrpo_fast.model.tiny import create_tiny_checkpoint

ROOT = Path(__file__).parent.parent
MODELS = ROOT / "configs" / "models"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return create_tiny_checkpoint(tmp_path_factory.mktemp("plan") / "tiny", seed=2)


def _cfg(path, dtype: str) -> C.TrainConfig:
    cfg = C.preset_test()
    cfg.model.path, cfg.model.dtype, cfg.loss.kl_beta = str(path), dtype, 0.05
    cfg.data.token_budget, cfg.sft.batch_size, cfg.grpo.problems_per_step, cfg.grpo.group_size = 1024, 8, 4, 4
    return cfg.validate()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plan_agrees_with_a_real_cpu_step(tiny, dtype):
    """The same step (shapes, code) on fake tensors and on real ones, each under the same tracker: every phase's
    peak within 10% (the fake trace allocates what the real run allocates)."""
    cfg, shape = _cfg(tiny, dtype), P.PlanShape(64, 48, 2)
    with P.fake_world(1):
        planned = P.trace_step(cfg, tiny, 1, shape, fake=True, device_kind="cpu", gpu_bytes=0)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        measured = P.trace_step(cfg, tiny, 1, shape, fake=False, device_kind="cpu", gpu_bytes=0)
    finally:
        dist.destroy_process_group()
    for phase in P.PHASES:
        a, b = planned[phase].total, measured[phase].total
        assert b > 0 and abs(a - b) <= 0.10 * b, (phase, a, b)
    assert planned["grpo"].components["optimizer states"] > 0
    assert planned["grpo"].micro_batches >= 1


def _cli(*args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "exgrpo_fast.plan", *args, "--json"], capture_output=True, text=True,
                          timeout=900, env=env, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


BASE = ["--model.dtype", "bfloat16", "--data.token_budget", "4096", "--loss.kl_beta", "0.01"]


def test_plan_moves_the_right_way(tmp_path):
    """A Qwen2.5-0.5B-shaped student from a bare config.json (4 of its 24 decoder layers: a plan's time is its op
    count): more GPUs, activation checkpointing and LoRA each lower the planned peak per GPU; a small GPU does not
    fit (in-process: one import for the five plans)."""
    assert P.count_params(MODELS / "qwen2.5-0.5b") == 494032768
    config = json.loads((MODELS / "qwen2.5-0.5b" / "config.json").read_text())
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    shape = P.PlanShape(128, 64, 2)

    def plan(gpus=1, gpu_gib=80.0, **model):
        cfg = C.preset_test()
        cfg.model.path, cfg.model.dtype, cfg.loss.kl_beta, cfg.data.token_budget = str(tmp_path / "m"), \
            "bfloat16", 0.01, 4096  # fmt: skip
        cfg.sft.batch_size, cfg.grpo.problems_per_step, cfg.grpo.group_size = 16, 8, 8
        for k, v in model.items():
            setattr(cfg.model, k, v)
        return P.make_plan(cfg.validate(), gpus, gpu_gib, shape).to_json()

    one = plan()
    assert one["params"] == 494032768 - 20 * 14912384 and one["fits"]  # 20 decoder layers of 14.9M fewer
    eight, ac, lora = plan(gpus=8), plan(activation_checkpointing=True), plan(lora_rank=16)
    assert eight["peak_bytes"] < one["peak_bytes"]
    assert ac["peak_bytes"] < one["peak_bytes"]
    assert lora["peak_bytes"] < one["peak_bytes"]
    assert one["phases"]["grpo"]["components"]["master copy"] == 4 * one["params"]
    assert eight["phases"]["grpo"]["components"]["master copy"] < one["params"]  # 1/8 of 4 bytes per parameter
    assert lora["phases"]["grpo"]["components"].get("frozen models", 0) == 0  # the reference is the base
    assert not plan(gpu_gib=2.0)["fits"]


@pytest.mark.slow
def test_plan_a_7b_student_from_a_bare_config():
    """Qwen2.5-7B shaped (7.62B params, V = 152064) on 8 H200s with checkpointing: planned on a 2-core CPU."""
    out = _cli("--model.path", str(MODELS / "qwen2.5-7b"), *BASE, "--gpus", "8",
               "--model.activation_checkpointing", "true")  # fmt: skip
    assert out["params"] == 7615616512
    assert out["fits"] and 20 * 2**30 < out["peak_bytes"] < 141 * 2**30
    grpo = out["phases"]["grpo"]["components"]
    assert grpo["parameters"] == 2 * out["params"]  # the bf16 sampler copy on every GPU
    assert grpo["frozen models"] == 2 * out["params"]  # the bf16 reference
    phases = {k: v["total"] for k, v in out["phases"].items()}
    assert phases["model"] < phases["grpo"]  # loading (its host copy counted as if on the GPU) is not the peak


def test_plan_user_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "exgrpo_fast.plan", "--model.path", str(empty)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2 and "config.json" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.gpu
def test_plan_against_the_gpu_allocator(tmp_path):
    """The plan of a gpu-0.5b student's step vs torch.cuda.max_memory_allocated of the same step run for real."""
    path = create_tiny_checkpoint(tmp_path / "m", preset="gpu-0.5b", seed=0)
    cfg = _cfg(path, "bfloat16")
    cfg.data.token_budget, cfg.grpo.problems_per_step, cfg.grpo.group_size = 8192, 8, 8
    shape = P.PlanShape(256, 128, 2)
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    with P.fake_world(1):
        planned = P.trace_step(cfg, path, 1, shape, fake=True, device_kind="cuda", gpu_bytes=gpu_bytes)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        P.trace_step(cfg, path, 1, shape, fake=False, device_kind="cuda", gpu_bytes=gpu_bytes)
        measured = torch.cuda.max_memory_allocated() - base
    finally:
        dist.destroy_process_group()
    peak = max(p.total for p in planned.values())
    print(f"planned {peak / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB")
    assert abs(peak - measured) <= 0.15 * measured, (peak, measured)
