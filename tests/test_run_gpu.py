"""benches/run_gpu.py, the one-command GPU run: its CPU-side logic (plan, step runner, report writer, arguments)."""

from __future__ import annotations

import sys
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
    text = G.render(facts, steps)
    assert text.startswith("# GPU run: NVIDIA H200 (132 SMs, 140 GiB), 2026-11-30 04:00\n")
    assert "| liger-kernel | not installed |" in text
    assert "| commit | abc1234 |" in text
    assert "| gpu tests | passed | 12.3 | 5 passed in 12s |" in text
    assert "| bench_loss | failed (rc 1) | 1.0 | a \\| b |" in text  # pipes escaped: the table stays a table
    assert "| bench_packing | skipped: time budget (5 s) spent | 0.0 |  |" in text
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
    assert [s.name for s in full] == ["gpu tests", "bench_loss", "bench_linear_loss", "bench_packing", "bench_e2e"]
    assert all("--smoke" not in s.argv for s in full)  # headline sizes: the benches' GPU defaults
    assert full[0].argv[:6] == ["py", "-m", "pytest", "-q", "-m", "gpu"]
    assert sum(s.timeout for s in full[1:]) + full[0].timeout > 570  # the budget, not the sum, bounds the run
    assert all("--smoke" in s.argv for s in G.plan(smoke=True)[1:4])
    assert "gpu-0.5b" in full[4].argv and "tiny" in G.plan(smoke=True)[4].argv  # bench_e2e has sizes, not --smoke


def test_main_dry_run_writes_report(tmp_path, capsys):
    rc = G.main(["--dry-run", "--results-dir", str(tmp_path / "r"), "--copy-to", str(tmp_path / "out")])
    assert rc == 0
    (report,) = (tmp_path / "r").glob("gpu-run-*.md")
    text = report.read_text()
    assert "(dry run)" in text and text.count("| dry run |") == 5 and "| triton |" in text
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
