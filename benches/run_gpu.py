"""One command for a machine with one H100/H200: every gpu-marked test and every bench at its headline sizes, within
a time budget (10 minutes by default), then a dated markdown report in benches/results/ with the device, the
versions (torch, triton, CUDA, transformers, peers such as Liger-Kernel; "not installed" when absent), the date and
the commit, one table row per step and each step's output.

    bash benches/run_gpu.sh                     # from the repo root, on the GPU machine
    bash benches/run_gpu.sh --copy-to "$OUT"    # also copy the report and the CSVs this run wrote to a folder
    python benches/run_gpu.py --dry-run         # any machine: write the report with nothing run (checks plumbing)
    python benches/run_gpu.py --smoke           # any machine: tiny sizes (benches' --smoke), gpu tests skip on CPU

Steps run as subprocesses with their own timeouts, capped by what is left of the budget; a failing or timed-out
step is recorded and the run goes on. The exit status is 0 when every step passed, 1 otherwise (a failure, a
timeout, or a step skipped because the budget was spent), 2 for bad arguments or no CUDA device without --smoke /
--dry-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.metadata as md
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benches" / "results"

# distributions whose versions the report records: ours, then the peers the benches compare with
VERSIONED = ("torch", "triton", "transformers", "tyro", "datasets", "safetensors", "numpy", "liger-kernel",
             "flash-attn", "flash-attn-4", "cut-cross-entropy", "trl", "pytest")  # fmt: skip


@dataclasses.dataclass
class Step:
    """One command of the run and, once run, its outcome."""

    name: str
    argv: list[str]
    timeout: float  # seconds, before the budget cap
    status: str = "not run"  # passed | failed (rc N) | timed out | skipped: why | dry run
    seconds: float = 0.0
    summary: str = ""  # one line: pytest's result line, or the last line a bench printed
    output: str = ""  # the tail of stdout+stderr


def plan(smoke: bool, python: str = sys.executable) -> list[Step]:
    """The steps, in order. Headline sizes are the benches' GPU defaults; smoke passes their --smoke."""
    s = ["--smoke"] if smoke else []
    no_csv = ["--no-csv"] if smoke else []
    return [
        # a test module that cannot be imported there (a dependency missing on the GPU image) must not stop the rest
        Step(
            "gpu tests",
            [
                python,
                "-m",
                "pytest",
                "-q",
                "-m",
                "gpu",
                "-p",
                "no:cacheprovider",
                "--continue-on-collection-errors",
                "tests",
            ],
            240,
        ),  # fmt: skip
        Step("bench_loss", [python, "benches/bench_loss.py", *s, *no_csv], 150),
        Step("bench_linear_loss", [python, "benches/bench_linear_loss.py", *s, *no_csv], 240),
        Step("bench_packing", [python, "benches/bench_packing.py", *s], 150),
        # the GRPO step on the gpu-0.5b preset with and without shared prefixes (and TRL where installed), then the
        # long-prompt workload (prompt 512, completion 64, G 16); smoke: tiny sizes (bench_e2e has no --smoke)
        Step(
            "bench_e2e",
            [python, "benches/bench_e2e.py"]
            + (
                "--preset tiny --problems 2 --group-size 2 --max-new-tokens 8 --steps 2 --trainers ours ours-noshare "
                "--long-prompt 128 --long-new-tokens 8 --long-group-size 4 --long-problems 1 --long-steps 2"
                if smoke
                else "--preset gpu-0.5b --problems 16 --group-size 8 --max-new-tokens 256 --steps 4 --long-problems 8 "
                "--long-steps 3"
            ).split(),
            240,
        ),
    ]


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _run(cmd: list[str], timeout: float = 20) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    """Short commit of the checkout (+"-dirty"), EXGRPO_COMMIT when set (a copied tree without .git), or
    "unknown"."""
    if os.environ.get("EXGRPO_COMMIT"):
        return os.environ["EXGRPO_COMMIT"]
    head = _run(["git", "rev-parse", "--short", "HEAD"])
    if not head:
        return "unknown (no git checkout; set EXGRPO_COMMIT)"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return head + ("-dirty" if dirty else "")


def environment() -> dict[str, str]:
    """Device, driver, versions, date and commit, as strings (never raises for a missing piece)."""
    facts: dict[str, str] = {}
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            facts["device"] = f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
            facts["compute capability"] = f"{p.major}.{p.minor}"
        else:
            facts["device"] = "none (CPU only)"
        facts["cuda (torch build)"] = torch.version.cuda or "none"
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        facts["device"] = f"unknown ({type(e).__name__}: {e})"
    smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    facts["driver"] = smi.splitlines()[0] if smi else "n/a"
    facts["host"] = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    for dist in VERSIONED:
        facts[dist] = _version(dist)
    facts["date (UTC)"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    facts["commit"] = git_commit()
    return facts


_PYTEST_LINE = re.compile(r"^=*\s*(\d+ (passed|failed|skipped|deselected|error|errors|xfailed|xpassed)\b.*?)=*$")


def summarize(output: str) -> str:
    """pytest's final result line when there is one, else the last non-empty line that is not a bench's
    "wrote <csv>" note (for a bench: the last row of its result table)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = _PYTEST_LINE.match(ln)
        if m:
            return m.group(1).strip()
        if re.match(r"^no tests ran", ln):
            return ln.strip("= ")
    lines = [ln for ln in lines if not ln.startswith("wrote ")] or lines
    return lines[-1][:200] if lines else ""


def run_step(step: Step, timeout: float, env: dict[str, str], tail_chars: int = 8000) -> None:
    """Run one step in the repo root; fill in status, seconds, summary and output (tail)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(step.argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + (("\n" + proc.stderr) if proc.stderr.strip() else "")
        summary_src = proc.stdout if proc.stdout.strip() else proc.stderr
        # pytest exit code 5: no tests collected (e.g. -m gpu deselected everything): not a failure of the run
        ok = proc.returncode == 0 or (proc.returncode == 5 and "pytest" in step.argv)
        step.status = "passed" if ok else f"failed (rc {proc.returncode})"
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        step.status = f"timed out after {timeout:.0f} s"
        summary_src = out
    step.seconds = time.perf_counter() - t0
    step.output = out[-tail_chars:]
    step.summary = summarize(summary_src)


def render(facts: dict[str, str], steps: list[Step], title: str = "GPU run") -> str:
    """The markdown report: facts table, steps table, then each step's command and output tail."""

    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = [f"# {title}: {facts.get('device', '?')}, {facts.get('date (UTC)', '?')}", ""]
    out += ["| fact | value |", "|---|---|"]
    out += [f"| {cell(k)} | {cell(v)} |" for k, v in facts.items()]
    out += ["", "| step | status | seconds | result |", "|---|---|---|---|"]
    out += [f"| {cell(s.name)} | {cell(s.status)} | {s.seconds:.1f} | {cell(s.summary)} |" for s in steps]
    for s in steps:
        out += ["", f"## {s.name}", "", "`" + " ".join(s.argv) + "`", ""]
        if s.output:
            out += ["```", s.output.rstrip("\n").replace("```", "'''"), "```"]
    return "\n".join(out) + "\n"


def write_report(text: str, results_dir: Path, stamp: str | None = None) -> Path:
    """Write the report to <results_dir>/gpu-run-<UTC stamp>.md (a new file each run; never overwrites)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = stamp or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = results_dir / f"gpu-run-{stamp}.md"
    n = 1
    while path.exists():
        path = results_dir / f"gpu-run-{stamp}-{n}.md"
        n += 1
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="run nothing; write the report with the plan")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes (benches' --smoke); works without a GPU")
    p.add_argument("--budget", type=float, default=570.0, help="seconds for all steps together (default 570)")
    p.add_argument("--only", default=None, help="comma-separated step names to run (default: all)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the report goes")
    p.add_argument("--copy-to", type=Path, default=None, help="also copy the report and new CSVs here")
    a = p.parse_args(argv)
    if a.budget <= 0:
        p.error(f"--budget={a.budget}: expected seconds > 0")
    steps = plan(a.smoke)
    if a.only:
        names = [n.strip() for n in a.only.split(",")]
        unknown = [n for n in names if n not in {s.name for s in steps}]
        if unknown:
            p.error(f"--only: unknown step(s) {unknown}; steps are {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in names]

    facts = environment()
    if not (a.dry_run or a.smoke) and facts["device"].startswith("none"):
        print("run_gpu: no CUDA device; use --smoke or --dry-run on a machine without one", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" or a.smoke}
    env["PYTHONUNBUFFERED"] = "1"
    start, t_start = time.time(), time.perf_counter()
    for s in steps:
        if a.dry_run:
            s.status = "dry run"
            continue
        left = a.budget - (time.perf_counter() - t_start)
        if left < 20:
            s.status = f"skipped: time budget ({a.budget:.0f} s) spent"
            continue
        print(f"[run_gpu] {s.name}: {' '.join(s.argv)} (timeout {min(s.timeout, left):.0f} s)", flush=True)
        run_step(s, min(s.timeout, left), env)
        print(f"[run_gpu] {s.name}: {s.status} in {s.seconds:.1f} s | {s.summary}", flush=True)
    title = "GPU run" + (" (dry run)" if a.dry_run else " (smoke)" if a.smoke else "")
    text = render(facts, steps, title)
    path = write_report(text, a.results_dir)
    print(text.split("\n## ", 1)[0])
    print(f"wrote {path}")
    if a.copy_to is not None:
        a.copy_to.mkdir(parents=True, exist_ok=True)
        fresh = [f for f in a.results_dir.glob("*.csv") if f.stat().st_mtime >= start]
        for f in [path, *fresh]:
            shutil.copy2(f, a.copy_to / f.name)
        print(f"copied {1 + len(fresh)} file(s) to {a.copy_to}")
    return 0 if all(s.status in ("passed", "dry run") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
