"""Resume is invisible: a run killed in the middle of a checkpoint save and resumed ends with the same summary.json,
the same final console line (timings aside), the same metrics.jsonl rows (each step once) and bit-identical final
weights as a straight run. Also: the default checkpoint cadence, retention, and no stage-end checkpoint written
twice; a user error exits 2 before any run directory exists."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exgrpo_fast import checkpoint as ckpt_lib
from exgrpo_fast.train import TIMING_METRICS

TIMING = set(TIMING_METRICS)
ARGS = ["--preset", "test", "--log.keep_last", "2"]  # test preset: 3 SFT + 3 GRPO steps -> a checkpoint every step


def run_cli(*args, env_extra=None, timeout=1500):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "exgrpo_fast.train", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=Path(__file__).parent.parent
    )


def metrics(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def summary_line(stdout: str) -> str:
    line = [x for x in stdout.splitlines() if x.startswith("summary |")][-1]
    return re.sub(r"\| wall \d+s \| load [\d.na]+ \| .*$", "", line)


@pytest.mark.slow
def test_killed_mid_save_and_resumed_equals_straight(tmp_path):
    straight = run_cli(*ARGS, "--log.out_dir", str(tmp_path), "--log.run_name", "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert not straight.stdout.splitlines()[0].lower().startswith("warning"), straight.stdout.splitlines()[0]
    ckpts = tmp_path / "straight" / "checkpoints"
    # cadence: every step here (10% of 3 steps, rounded up); keep_last 2 per stage; each stage's end saved once:
    # 6 saves in all (sft 1-3, grpo 1-3), so the last one's seq is 6
    assert sorted(p.name for p in ckpts.iterdir()) == ["grpo-000002", "grpo-000003", "latest", "sft-000002",
                                                        "sft-000003"]  # fmt: skip
    assert ckpt_lib.checkpoint_meta(ckpts / "grpo-000003")["seq"] == 6

    # killed while writing the 5th checkpoint (grpo step 2): grpo step 2 is already in metrics.jsonl
    killed = run_cli(*ARGS, "--log.out_dir", str(tmp_path), "--log.run_name", "cut",
                     env_extra={ckpt_lib.CRASH_ENV: "writing:5"})  # fmt: skip
    assert killed.returncode == ckpt_lib.CRASH_EXIT, killed.stderr[-3000:]
    cut = tmp_path / "cut"
    assert [(r["stage"], r["step"]) for r in metrics(cut) if r["stage"] == "grpo"] == [("grpo", 0), ("grpo", 1)]
    assert ckpt_lib.resolve_checkpoint(cut).name == "grpo-000001"
    resumed = run_cli("--resume", str(cut))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert metrics(cut) == metrics(tmp_path / "straight")  # every step once, every value equal
    a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    drop = TIMING | {"run_dir", "final_ckpt"}
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    assert summary_line(straight.stdout) == summary_line(resumed.stdout)
    wa, wb = (
        load_file(str(Path(a["final_ckpt"]) / "model.safetensors")),
        load_file(str(Path(b["final_ckpt"]) / "model.safetensors")),
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not any(p.name.startswith(".") for p in (cut / "checkpoints").iterdir())  # the crash's temp dir is gone


def test_user_error_exits_2_without_a_run_dir(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "q", "answer": 1e400}\n')
    out = tmp_path / "runs"
    proc = run_cli("--preset", "test", "--data.train_path", str(data), "--log.out_dir", str(out), timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"error: {data}: line 1: field 'answer': 1e400 is outside the float64 "
                                                "range"]  # fmt: skip
    assert not out.exists()  # no junk run directory
    proc = run_cli("--preset", "test", "--grpo.lr", "inf", "--log.out_dir", str(out), "--debug", timeout=600)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "grpo.lr=inf" in proc.stderr
    assert not out.exists()


def test_grpo_log_line_fits_120_columns():
    from exgrpo_fast import train as T

    worst = dict(reward=-2.345, reward_task=0.99, reward_probe=0.99, reward_dsu=0.99, reward_std=1.34,
                 kl_ref=-1.234e-10, grad_norm=123456.7, step_s=999.6)  # fmt: skip
    line = T.grpo_log_line(9998, 9999, worst) + " | SKIPPED"
    assert len(line) <= 120, (len(line), line)


def test_ckpt_interval_bounds_lost_work():
    from exgrpo_fast.train import ckpt_interval

    assert [ckpt_interval(0, n) for n in (1, 3, 10, 60, 150, 1001)] == [1, 1, 1, 6, 15, 101]
    assert ckpt_interval(25, 60) == 25
