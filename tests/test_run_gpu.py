"""benches/run_gpu.py, the one-command GPU run: its CPU-side logic (plan, step runner, report writer, arguments)."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benches import run_gpu as G  # noqa: E402


def test_render_and_write_report(tmp_path):
    facts = {"device": "NVIDIA H200 (132 SMs, 140 GiB)", "torch": "2.11.0", "liger-kernel": "not installed",
             "date (UTC)": "2026-11-30 04:00", "commit": "abc1234"}  # fmt: skip
    steps = [
        G.Step(
            "gpu tests",
            ["python", "-m", "pytest"],
            10,
            status="passed",
            seconds=12.3,
            summary="5 passed in 12s",
            output="....\n5 passed in 12s\n",
        ),  # fmt: skip
        G.Step(
            "bench_loss",
            ["python", "benches/bench_loss.py"],
            10,
            status="failed (rc 1)",
            seconds=1.0,
            summary="a | b",
            output="x ``` y",
        ),  # fmt: skip
        G.Step("bench_packing", ["python", "benches/bench_packing.py"], 10, status="skipped: time budget (5 s) spent"),
    ]
    text = G.render(facts, steps, budget=570)
    assert text.startswith("# GPU run: NVIDIA H200 (132 SMs, 140 GiB), 2026-11-30 04:00\n")
    assert "| liger-kernel | not installed |" in text
    assert "| commit | abc1234 |" in text
    assert "| budget | 570 s; planned 30 s; used 13 s |" in text
    assert "| gpu tests | passed | 10 | 12.3 | 5 passed in 12s |" in text
    assert "| bench_loss | failed (rc 1) | 10 | 1.0 | a \\| b |" in text  # pipes escaped: the table stays a table
    assert "| bench_packing | skipped: time budget (5 s) spent | 10 | 0.0 |  |" in text
    assert "## bench_loss" in text and "x ''' y" in text  # a fence in the output cannot close the code block
    assert text.count("```") % 2 == 0
    p1 = G.write_report(text, tmp_path / "results", stamp="20261130-040000")
    p2 = G.write_report(text, tmp_path / "results", stamp="20261130-040000")
    assert p1.name == "gpu-run-20261130-040000.md" and p2 != p1 and p1.read_text() == p2.read_text() == text


def test_summarize():
    assert G.summarize("..s.\n===== 3 passed, 1 skipped in 2.50s =====\n") == "3 passed, 1 skipped in 2.50s"
    assert G.summarize("x\n12 deselected in 0.3s\n") == "12 deselected in 0.3s"
    assert G.summarize("provider  ms\nours  1.23\nwrote benches/results/loss.csv\n\n") == "ours  1.23"
    assert G.summarize("") == ""


def test_run_step_records_failure_and_timeout():
    env = {"PATH": "/usr/bin:/bin"}
    ok = G.Step("ok", [sys.executable, "-c", "print('hello')"], 30)
    G.run_step(ok, 30, env)
    assert ok.status == "passed" and ok.summary == "hello" and ok.seconds > 0
    bad = G.Step("bad", [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], 30)
    G.run_step(bad, 30, env)
    assert bad.status == "failed (rc 3)" and "boom" in bad.output and bad.summary == "boom"
    warn = G.Step("warn", [sys.executable, "-c", "import sys; print('row 1'); print('a warning', file=sys.stderr)"], 30)
    G.run_step(warn, 30, env)
    assert warn.summary == "row 1" and "a warning" in warn.output  # the summary comes from stdout
    slow = G.Step("slow", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"], 30)
    G.run_step(slow, 1.5, env)
    assert slow.status == "timed out after 2 s" and slow.seconds < 20


def test_environment_records_missing_peers(monkeypatch):
    monkeypatch.setattr(G, "VERSIONED", ("torch", "surely-not-a-real-dist-xyz"))
    monkeypatch.setenv("EXGRPO_COMMIT", "deadbee")
    facts = G.environment()
    assert facts["torch"] != "not installed"
    assert facts["surely-not-a-real-dist-xyz"] == "not installed"
    assert facts["commit"] == "deadbee"
    assert {"device", "driver", "host", "date (UTC)"} <= set(facts)


def test_plan_headline_and_smoke():
    full = G.plan(smoke=False, python="py")
    assert [s.name for s in full] == [
        "gpu tests",
        "bench_loss",
        "bench_linear_loss",
        "bench_packing",
        "bench_sampling",
        "bench_e2e",
    ]
    assert all("--smoke" not in s.argv for s in full)  # headline sizes: the benches' GPU defaults
    assert full[0].argv[:6] == ["py", "-m", "pytest", "-q", "-m", "gpu"] and full[0].argv[-1] == "tests"
    smoke = G.plan(smoke=True)
    assert all("--smoke" in s.argv for s in smoke[1:] if s.name != "bench_e2e")
    assert "tiny" in smoke[-1].argv and "gpu-0.5b" in full[-1].argv  # bench_e2e spells its smoke sizes out
    assert "--max-seconds" in full[2].argv  # a bench that can stop itself gets its cap
    # the budget holds by construction: planned times (the caps) plus a margin each fit the 10-minute budget
    G.check_budget(full, G.BUDGET_S)
    assert sum(s.planned + G.STEP_MARGIN_S for s in full) <= G.BUDGET_S <= 600
    extra = G.plan(smoke=False, entries=[*G.PLAN, ("memory plan", 100, "{py} -m exgrpo_fast.plan")])  # one line
    assert extra[-1].argv[1:] == ["-m", "exgrpo_fast.plan"] and extra[-1].planned == 100
    with pytest.raises(ValueError, match="shrink a step's planned time"):
        G.check_budget(extra, G.BUDGET_S)


def test_run_step_kills_the_whole_process_group(tmp_path):
    """A step over its cap is killed with everything it started; what it printed before is kept."""
    pid_file = tmp_path / "child.pid"
    code = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(c.pid)); print('child started', "
            f"flush=True); time.sleep(60)")  # fmt: skip
    step = G.Step("hang", [sys.executable, "-c", code], 2)
    G.run_step(step, 2, {"PATH": "/usr/bin:/bin"})
    assert step.status == "timed out after 2 s" and "child started" in step.output and step.seconds < 20
    child = int(pid_file.read_text())
    for _ in range(50):  # the kill is asynchronous: the child is gone (or a zombie of init) within moments
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child {child} outlived the step")


def test_main_caps_steps_and_rewrites_the_report_after_each(tmp_path, monkeypatch):
    """A step that overruns its planned time is cut at it and the next step still runs with its full time; the
    report on disk is rewritten after every step (the second step reads the first one's row from it) and copied."""
    results, out = tmp_path / "r", tmp_path / "out"
    slow, reader = tmp_path / "slow.py", tmp_path / "reader.py"
    slow.write_text("import time\nprint('begun', flush=True)\ntime.sleep(30)\n")
    reader.write_text(f"import glob\nt = open(sorted(glob.glob({str(results)!r} + '/gpu-run-*.md'))[-1]).read()\n"
                      "print([ln for ln in t.splitlines() if ln.startswith('| slow ')][0])\n")  # fmt: skip
    monkeypatch.setattr(G, "PLAN", [("slow", 2, f"{{py}} {slow}"), ("reader", 20, f"{{py}} {reader}")])
    rc = G.main(["--smoke", "--budget", "60", "--results-dir", str(results), "--copy-to", str(out)])
    assert rc == 1  # the slow step timed out
    (report,) = results.glob("gpu-run-*.md")
    text = report.read_text()
    assert "| slow | timed out after 2 s | 2 |" in text and "begun" in text
    assert "| reader | passed | 20 |" in text
    assert "| slow | timed out after 2 s" in text.split("## reader", 1)[1]  # the report as the reader saw it
    assert (out / report.name).read_text() == text


def test_main_dry_run_writes_report(tmp_path, capsys):
    rc = G.main(["--dry-run", "--results-dir", str(tmp_path / "r"), "--copy-to", str(tmp_path / "out")])
    assert rc == 0
    (report,) = (tmp_path / "r").glob("gpu-run-*.md")
    text = report.read_text()
    assert "(dry run)" in text and text.count("| dry run |") == len(G.PLAN) and "| triton |" in text
    assert (tmp_path / "out" / report.name).read_text() == text
    assert f"wrote {report}" in capsys.readouterr().out


def test_main_arguments(tmp_path):
    with pytest.raises(SystemExit) as e:
        G.main(["--only", "nope", "--dry-run", "--results-dir", str(tmp_path)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        G.main(["--budget", "0", "--dry-run"])
    assert e.value.code == 2
    assert G.main(["--dry-run", "--only", "bench_loss", "--results-dir", str(tmp_path)]) == 0
    if not torch.cuda.is_available():
        assert G.main(["--results-dir", str(tmp_path)]) == 2  # no GPU: refuses unless --smoke / --dry-run


# ---- no result file names a directory of the machine it ran on

ABSOLUTE = re.compile(r"(?<![\w./:~-])/(?:[\w.+-]+/)+[\w.+-]*|(?<![\w])[A-Za-z]:\\[\w\\.-]+|~/[\w.-]+")
"""A Unix path from the root (/a/b..., not "tok/s" or a URL), a Windows drive path, or a home path."""


def test_no_file_in_benches_results_names_an_absolute_path():
    results = Path(__file__).resolve().parent.parent / "benches" / "results"
    files = sorted(p for p in results.rglob("*") if p.is_file())
    assert files
    found = {str(p.relative_to(results)): ABSOLUTE.findall(p.read_text(errors="replace")) for p in files}
    assert not {k: v for k, v in found.items() if v}, found
    assert ABSOLUTE.findall("wrote /work/main/benches/results/x.csv | C:\\runs\\a | ~/x") == [
        "/work/main/benches/results/x.csv", "C:\\runs\\a", "~/x"]  # fmt: skip
    assert not ABSOLUTE.findall("12 tok/s, 3 ms/iter, https://github.com/a/b, 1/2, a / b, benches/results/x.csv")


def test_benches_print_paths_relative_to_the_repo(tmp_path):
    from benches import _common

    root = Path(__file__).resolve().parent.parent
    assert _common.rel(root / "benches" / "results" / "x.csv") == "benches/results/x.csv"
    assert G.rel(root / "benches" / "results" / "gpu-run-1.md") == "benches/results/gpu-run-1.md"
    assert _common.rel(tmp_path / "y.csv") == str(tmp_path / "y.csv")  # outside the repo: as given
    argv = [sys.executable, str(root / "benches" / "bench_loss.py"), "--smoke"]
    assert G.shown(argv) == f"{Path(sys.executable).name} benches/bench_loss.py --smoke"
    text = G.render({"device": "cpu"}, [G.Step("s", argv, 10)])
    assert sys.executable not in text and f"`{Path(sys.executable).name} benches/bench_loss.py --smoke`" in text
    step = G.Step("echo", [sys.executable, "-c", f"print('{root}/tests/test_x.py:3: boom')"], 30)
    G.run_step(step, 30, dict(os.environ))  # output naming the repo's absolute path (pytest, tracebacks)
    assert step.output.strip() == "tests/test_x.py:3: boom" and step.summary == "tests/test_x.py:3: boom"
