"""One command for a machine with one H100/H200: every gpu-marked test and every bench at its headline sizes, within
a time budget (10 minutes by default), then a dated markdown report in benches/results/ with the device, the
versions (torch, triton, CUDA, transformers, peers such as Liger-Kernel; "not installed" when absent), the date and
the commit, one table row per step and each step's output.

    bash benches/run_gpu.sh                     # from the repo root, on the GPU machine
    bash benches/run_gpu.sh --copy-to "$OUT"    # also copy the report and the CSVs this run wrote to a folder
    python benches/run_gpu.py --dry-run         # any machine: write the report with nothing run (checks plumbing)
    python benches/run_gpu.py --smoke           # any machine: tiny sizes (benches' --smoke), gpu tests skip on CPU

The budget holds by construction:
- every step of PLAN has a planned time, which is also its hard cap: it runs in its own process group and is killed
  (the whole group) when the cap is reached; the plan's planned times plus a per-step margin must fit the budget
  (checked before anything runs, and by tests/test_run_gpu.py), so no step can take another's time;
- benches write their CSV rows as each measurement finishes, and benches that can stop themselves get their cap
  (bench_linear_loss --max-seconds), so a cut-short step still leaves its rows;
- the report is rewritten (and, with --copy-to, copied with the CSVs) after every step, so a run killed from
  outside still leaves everything finished before it.

Adding a step is one line in PLAN: (name, planned seconds, command); "{py}" is the interpreter and "{smoke}" expands
to --smoke (plus "{no_csv}" to --no-csv) in smoke runs. Shrink another step, or the budget check fails.

The exit status is 0 when every step passed, 1 otherwise (a failure, a timeout, or a step skipped), 2 for bad
arguments, a plan over budget, or no CUDA device without --smoke / --dry-run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import importlib.metadata as md
import importlib.util
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benches" / "results"
BUDGET_S = 570.0  # 10 minutes of device time, less the machine's start-up and the report
STEP_MARGIN_S = 5.0  # per step: process start, killing a process group, writing the report

# (name, planned seconds = the step's hard cap, command). One line per step.
PLAN: list[tuple[str, float, str]] = [
    ("gpu tests", 150, "{py} -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors {timeout} tests"),
    ("bench_loss", 90, "{py} benches/bench_loss.py {smoke} {no_csv}"),  # includes torch.compile's compile time
    ("bench_linear_loss", 90, "{py} benches/bench_linear_loss.py {smoke} {no_csv} --max-seconds 75"),
    ("bench_packing", 60, "{py} benches/bench_packing.py {smoke}"),
    ("bench_sampling", 35, "{py} benches/bench_sampling.py {smoke} {no_csv}"),
    # the GRPO step on gpu-0.5b with and without shared prefixes (and TRL where installed), then the long-prompt
    # workload (prompt ~512, completion 64, G 16)
    ("bench_e2e", 100, "{py} benches/bench_e2e.py {e2e}"),
]

# distributions whose versions the report records: ours, then the peers the benches compare with
VERSIONED = ("torch", "triton", "transformers", "tyro", "datasets", "safetensors", "numpy", "liger-kernel",
             "flash-attn", "flash-attn-4", "cut-cross-entropy", "trl", "pytest")  # fmt: skip


@dataclasses.dataclass
class Step:
    """One command of the run and, once run, its outcome."""

    name: str
    argv: list[str]
    planned: float  # seconds: the plan's time for this step and its hard cap
    status: str = "not run"  # passed | failed (rc N) | timed out after N s | skipped: why | dry run
    seconds: float = 0.0
    summary: str = ""  # one line: pytest's result line, or the last line a bench printed
    output: str = ""  # the tail of stdout+stderr


def plan(smoke: bool, python: str = sys.executable, entries: list[tuple[str, float, str]] | None = None) -> list[Step]:
    """The steps of PLAN (or `entries`), in order, with their commands expanded."""
    fill = {
        "py": python,
        "smoke": "--smoke" if smoke else "",
        "no_csv": "--no-csv" if smoke else "",
        # a test that hangs must not take the whole step (pytest-timeout is on the GPU image; skipped when absent)
        "timeout": "--timeout 120" if importlib.util.find_spec("pytest_timeout") else "",
        # bench_e2e has no --smoke: tiny sizes spelled out
        "e2e": "--preset tiny --problems 2 --group-size 2 --max-new-tokens 8 --steps 2 --trainers ours ours-noshare "
        "--long-prompt 128 --long-new-tokens 8 --long-group-size 4 --long-problems 1 --long-steps 2"
        if smoke
        else "--preset gpu-0.5b --problems 16 --group-size 8 --max-new-tokens 256 --steps 4 --long-problems 8 "
        "--long-steps 3",
    }
    steps = []
    for name, planned, command in PLAN if entries is None else entries:
        steps.append(Step(name, [w for w in command.format(**fill).split() if w], float(planned)))
    return steps


def check_budget(steps: list[Step], budget: float) -> None:
    """Raise ValueError unless the planned times, with a margin per step, fit the budget."""
    need = sum(s.planned + STEP_MARGIN_S for s in steps)
    if need > budget:
        table = ", ".join(f"{s.name} {s.planned:.0f} s" for s in steps)
        raise ValueError(f"the plan needs {need:.0f} s ({table}, + {STEP_MARGIN_S:.0f} s each) but the budget is "
                         f"{budget:.0f} s: shrink a step's planned time")  # fmt: skip


def rel(path: str | Path) -> str:
    """path relative to the repository root when inside it, else as given: a report names no directory of the
    machine it ran on."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def shown(argv: list[str]) -> str:
    """A step's command as the report prints it: the interpreter by its name ("python3.11", not its absolute path),
    paths inside the repository relative to it."""
    head = Path(argv[0]).name if Path(argv[0]).is_absolute() else argv[0]
    return " ".join([head] + [rel(a) if Path(a).is_absolute() else a for a in argv[1:]])


def scrub(text: str) -> str:
    """Output with the repository's absolute path cut out (pytest and tracebacks print it)."""
    return text.replace(f"{ROOT}/", "").replace(str(ROOT), ".")


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
    """Run one step in the repo root in its own process group, killed as a group at `timeout`; fill in status,
    seconds, summary and output (the tail; what a killed step printed so far is kept)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        try:
            proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=out_f, stderr=err_f, text=True,
                                    start_new_session=True)  # fmt: skip
        except OSError as e:
            step.status, step.seconds, step.summary = f"failed ({type(e).__name__}: {e})", 0.0, ""
            return
        try:
            rc = proc.wait(timeout=timeout)
            # pytest exit code 5: no tests collected (e.g. -m gpu deselected everything): not a failure of the run
            ok = rc == 0 or (rc == 5 and "pytest" in step.argv)
            step.status = "passed" if ok else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the step and everything it started
            proc.wait()
            step.status = f"timed out after {timeout:.0f} s"
        out_f.seek(0)
        err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read()
    step.seconds = time.perf_counter() - t0
    out = stdout + (("\n" + stderr) if stderr.strip() else "")
    step.output = scrub(out)[-tail_chars:]
    step.summary = summarize(scrub(stdout if stdout.strip() else stderr))


def render(facts: dict[str, str], steps: list[Step], title: str = "GPU run", budget: float | None = None) -> str:
    """The markdown report: facts table, steps table (planned and used seconds), then each step's command and
    output tail."""

    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = [f"# {title}: {facts.get('device', '?')}, {facts.get('date (UTC)', '?')}", ""]
    out += ["| fact | value |", "|---|---|"]
    out += [f"| {cell(k)} | {cell(v)} |" for k, v in facts.items()]
    if budget is not None:
        out += [f"| budget | {budget:.0f} s; planned {sum(s.planned for s in steps):.0f} s; used "
                f"{sum(s.seconds for s in steps):.0f} s |"]  # fmt: skip
    out += ["", "| step | status | planned s | seconds | result |", "|---|---|---|---|---|"]
    out += [f"| {cell(s.name)} | {cell(s.status)} | {s.planned:.0f} | {s.seconds:.1f} | {cell(s.summary)} |"
            for s in steps]  # fmt: skip
    for s in steps:
        out += ["", f"## {s.name}", "", "`" + shown(s.argv) + "`", ""]
        if s.output:
            out += ["```", s.output.rstrip("\n").replace("```", "'''"), "```"]
    return "\n".join(out) + "\n"


def report_path(results_dir: Path, stamp: str | None = None) -> Path:
    """A new <results_dir>/gpu-run-<UTC stamp>.md that no earlier run wrote (never overwrites another run's)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = stamp or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = results_dir / f"gpu-run-{stamp}.md"
    n = 1
    while path.exists():
        path = results_dir / f"gpu-run-{stamp}-{n}.md"
        n += 1
    return path


def write_report(text: str, results_dir: Path, stamp: str | None = None) -> Path:
    """Write the report to a new report_path(...) and return it."""
    path = report_path(results_dir, stamp)
    path.write_text(text)
    return path


def copy_results(report: Path, results_dir: Path, since: float, dest: Path) -> int:
    """Copy the report and every CSV of results_dir modified since `since` to dest; the number of files."""
    dest.mkdir(parents=True, exist_ok=True)
    fresh = [f for f in results_dir.glob("*.csv") if f.stat().st_mtime >= since]
    for f in [report, *fresh]:
        shutil.copy2(f, dest / f.name)
    return 1 + len(fresh)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="run nothing; write the report with the plan")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes (benches' --smoke); works without a GPU")
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for all steps (default {BUDGET_S:.0f})")
    p.add_argument("--only", default=None, help="comma-separated step names to run (default: all)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the report goes")
    p.add_argument("--copy-to", type=Path, default=None, help="also copy the report and new CSVs here (each step)")
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
    try:
        check_budget(steps, a.budget)
    except ValueError as e:
        p.error(str(e))

    facts = environment()
    if not (a.dry_run or a.smoke) and facts["device"].startswith("none"):
        print("run_gpu: no CUDA device; use --smoke or --dry-run on a machine without one", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" or a.smoke}
    env["PYTHONUNBUFFERED"] = "1"
    title = "GPU run" + (" (dry run)" if a.dry_run else " (smoke)" if a.smoke else "")
    path = report_path(a.results_dir)
    start, t_start = time.time(), time.perf_counter()

    def publish() -> None:
        path.write_text(render(facts, steps, title, a.budget))
        if a.copy_to is not None:
            copy_results(path, a.results_dir, start, a.copy_to)

    publish()
    for s in steps:
        if a.dry_run:
            s.status = "dry run"
            continue
        left = a.budget - (time.perf_counter() - t_start)
        cap = min(s.planned, left - STEP_MARGIN_S)
        if cap < 1:  # only when an earlier step overran its cap by more than its margin
            s.status = f"skipped: time budget ({a.budget:.0f} s) spent"
            continue
        print(f"[run_gpu] {s.name}: {shown(s.argv)} (cap {cap:.0f} s)", flush=True)
        run_step(s, cap, env)
        print(f"[run_gpu] {s.name}: {s.status} in {s.seconds:.1f} s | {s.summary}", flush=True)
        publish()
    publish()
    print(render(facts, steps, title, a.budget).split("\n## ", 1)[0])
    print(f"wrote {rel(path)}")
    if a.copy_to is not None:
        print(f"copied {copy_results(path, a.results_dir, start, a.copy_to)} file(s) to {a.copy_to}")
    return 0 if all(s.status in ("passed", "dry run") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
