"""What fits where, PLANNED (not measured): the memory plan (exgrpo_fast.plan) of the configs/student-*.toml workload
for students shaped like public checkpoints (configs/models/), full fine-tuning and LoRA, on 1 and 8 GPUs.

    python benches/plan_table.py            # -> benches/results/plan_table.md and plan_table.csv (~10 min on 2 cores)

Every row is one `make_plan` (a steady-state SFT step and GRPO step traced on fake tensors, rank 0); "fits" adds the
plan's reserve (2 GiB + 5% of the peak) to the peak and compares with the GPU's memory.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benches._common import rel  # noqa: E402
from exgrpo_fast.config import parse_args  # noqa: E402
from exgrpo_fast.plan import GiB, PlanShape, count_params, make_plan  # noqa: E402

MODELS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "gemma-7b")
MODES = {"full": "configs/student-7b.toml", "LoRA r=64": "configs/student-7b-lora.toml"}
GPUS = {"H200": 141.0, "H100": 80.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--gpus", nargs="*", type=int, default=[1, 8])
    p.add_argument("--out", default=str(ROOT / "benches" / "results" / "plan_table"))
    a = p.parse_args(argv)
    shape = PlanShape(prompt_tokens=256, response_tokens=256, turns=3)
    rows = []
    for model in a.models:
        path = ROOT / "configs" / "models" / model
        n = count_params(path)
        for mode, config in MODES.items():
            for gpus in a.gpus:
                cfg, _ = parse_args(["--config", str(ROOT / config), "--model.path", str(path)])
                t0 = time.perf_counter()
                plan = make_plan(cfg, gpus, GPUS["H200"], shape)
                sft, grpo = plan.phases["sft"].total, plan.phases["grpo"].total
                fits = {name: plan.peak_bytes + plan.reserve_bytes <= gib * GiB for name, gib in GPUS.items()}
                row = {"student": model, "params_b": round(n / 1e9, 2), "mode": mode, "gpus": gpus,
                       "sft_gib": round(sft / GiB, 1), "grpo_gib": round(grpo / GiB, 1),
                       "peak_gib": round(plan.peak_bytes / GiB, 1), "reserve_gib": round(plan.reserve_bytes / GiB, 1),
                       "fits_h200_141": fits["H200"], "fits_h100_80": fits["H100"],
                       "plan_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
                print(row, flush=True)
                rows.append(row)
    out = Path(a.out)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "| student (shaped like) | params | mode | GPUs | SFT peak / GPU | GRPO peak / GPU | fits 141 GB (H200) | "
        "fits 80 GB (H100) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        yes = lambda b: "yes" if b else "**no**"  # noqa: E731
        lines.append(
            f"| {r['student']} | {r['params_b']}B | {r['mode']} | {r['gpus']} | {r['sft_gib']} GiB | "
            f"{r['grpo_gib']} GiB | {yes(r['fits_h200_141'])} | {yes(r['fits_h100_80'])} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("wrote", rel(out.with_suffix(".md")), "and", rel(out.with_suffix(".csv")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
