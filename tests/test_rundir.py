"""The run-directory contract (exgrpo_fast.rundir, docs/reliability.md): one run per directory, names inside
log.out_dir, writability checked before anything is created, one writer (an OS lock), honest resume (allowed
changes recorded as amendments, the rest refused naming the field), a finished run left as it is, and SIGTERM /
SIGINT ending the current step with a checkpoint, a resume command and exit 143 / 130."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exgrpo_fast import checkpoint as ckpt_lib
from exgrpo_fast.train import TIMING_METRICS
from exgrpo_fast import config as C
from exgrpo_fast import rundir
from exgrpo_fast import train as T
from exgrpo_fast.errors import ConfigError, RunDirError


@pytest.fixture(autouse=True)
def _one_thread():
    """The in-process runs here are tiny: one torch thread (two spin-wait for ~10x the time on a loaded 2-core CI)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TIMING = set(TIMING_METRICS)


def main(capsys, *args) -> tuple[int, str, str]:
    """T.main in-process: (exit code, stdout, stderr)."""
    try:
        T.main(["--preset", "test", *args] if "--resume" not in args else list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x]


def plain_rows(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows(run_dir)]


def weights(summary_or_ckpt) -> dict:
    path = summary_or_ckpt["final_ckpt"] if isinstance(summary_or_ckpt, dict) else summary_or_ckpt
    return load_file(str(Path(path) / "model.safetensors"))


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------
# one run per directory, names inside out_dir, writability


def test_fresh_run_into_a_dir_holding_a_run_is_refused(tmp_path, capsys):
    args = ["--sft.steps", "1", "--grpo.steps", "1", "--log.out_dir", str(tmp_path), "--log.run_name", "dup"]
    assert main(capsys, *args)[0] == 0
    run = tmp_path / "dup"
    before = {p: p.read_bytes() for p in (run / "metrics.jsonl", run / "config.json", run / "summary.json")}
    code, _, err = main(capsys, *args, "--seed", "1")
    assert code == 2
    assert one_line_error(err) == (
        f"error: run dir {run} already holds a run (checkpoints, config.json, config.toml, init_model, ...): "
        f"continue it with --resume {run}, or choose another --log.run_name"
    )
    assert {p: p.read_bytes() for p in before} == before  # nothing of the first run touched
    # a console log opened before the run (`> RUN/console.log`) does not make a dir hold a run
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "console.log").write_text("started\n")
    assert rundir.run_contents(tmp_path / "fresh") == []


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/abs/name", "~/x", "."])
def test_run_name_stays_inside_out_dir(tmp_path, capsys, name):
    out = tmp_path / "runs"
    code, _, err = main(capsys, "--log.out_dir", str(out), "--log.run_name", name)
    assert code == 2
    assert one_line_error(err).startswith(f"error: log.run_name={name!r}: expected a name inside log.out_dir")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["runs"] * 0
    cfg = C.preset_test()
    cfg.log.run_name = "group/run-1"  # a relative path inside out_dir is fine
    cfg.validate()


def test_unwritable_out_dir_creates_nothing(tmp_path, capsys):
    a_file = tmp_path / "runs.txt"
    a_file.write_text("not a dir")
    code, _, err = main(capsys, "--log.out_dir", str(a_file), "--log.run_name", "r")
    assert code == 2
    assert one_line_error(err) == (
        f"error: log.out_dir={str(a_file)!r}: cannot write the run dir {a_file / 'r'}: {a_file} is not a directory"
    )
    if Path("/sys").is_dir():  # read-only even for root
        code, _, err = main(capsys, "--log.out_dir", "/sys/exgrpo-test-runs", "--log.run_name", "r")
        assert code == 2 and "cannot write the run dir /sys/exgrpo-test-runs/r: /sys is not writable" in err
        assert not Path("/sys/exgrpo-test-runs").exists()
    if os.geteuid() != 0:  # permissions bind only non-root users
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        code, _, err = main(capsys, "--log.out_dir", str(ro / "runs"), "--log.run_name", "r")
        assert code == 2 and "is not writable" in err and not (ro / "runs").exists()
    assert rundir.writable_problem(tmp_path / "new" / "deeper") is None and not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------------------------------
# one writer


def test_a_second_writer_is_refused(tmp_path, capsys):
    args = ["--sft.steps", "1", "--grpo.steps", "1", "--log.out_dir", str(tmp_path), "--log.run_name", "r"]
    assert main(capsys, *args, "--log.ckpt_every", "1")[0] == 0
    run = tmp_path / "r"
    # another process holds the run dir (a live writer): the resume is refused, naming it, and changes nothing
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from exgrpo_fast.rundir import RunLock; "
         f"lock = RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (run / "metrics.jsonl").read_bytes()
        code, _, err = main(capsys, "--resume", str(run))
        assert code == 2
        assert one_line_error(err).startswith(f"error: run dir {run} is in use by another process (pid {holder.pid}")
        assert (run / "metrics.jsonl").read_bytes() == before
        with pytest.raises(RunDirError, match="in use by another process"):
            rundir.RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    with rundir.RunLock(run):  # the OS released the dead holder's lock
        with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):  # a second holder in the same process too
            rundir.RunLock(run).acquire()


# ----------------------------------------------------------------------------------------------------------------
# honest resume


def test_resume_records_allowed_changes_and_refuses_the_rest(tmp_path, capsys):
    cfg = C.preset_test()  # 3 SFT + 3 GRPO steps
    cut = tmp_path / "cut"
    T.train(cfg, run_dir=str(cut), stop_after=4)  # SFT done, 1 GRPO step done
    original = json.loads((cut / "config.json").read_text())
    assert original["grpo"]["steps"] == 3 and original["amendments"] == []
    refused = {
        ("--loss.kl_beta", "0.1"): "loss.kl_beta=0.1: the run in {run} was started with 0.0; a resume may change "
        "only sft.steps, grpo.steps, log.log_every, log.eval_every, log.ckpt_every, log.keep_last, log.progress, "
        "log.tensorboard (docs/reliability.md)",
        ("--grpo.steps", "0"): "grpo.steps=0: the run in {run} has done 1 GRPO steps already",
        ("--sft.steps", "5"): "sft.steps=5: the SFT stage of the run in {run} has ended (3 steps)",
        ("--log.run_name", "other"): "log.run_name='other': the run in {run} was started with ''",
    }
    for flags, message in refused.items():
        code, _, err = main(capsys, "--resume", str(cut), *flags)
        assert code == 2 and one_line_error(err).startswith("error: " + message.format(run=cut)), err
    assert json.loads((cut / "config.json").read_text()) == original

    wall_at_cut = ckpt_lib.load_trainer_state(ckpt_lib.resolve_checkpoint(cut))["extra"]["wall_s"]
    code, out, _ = main(capsys, "--resume", str(cut), "--grpo.steps", "5", "--log.log_every", "2")
    assert code == 0, out
    saved = json.loads((cut / "config.json").read_text())
    assert {k: v for k, v in saved.items() if k != "amendments"} == {k: v for k, v in original.items()
                                                                     if k != "amendments"}  # fmt: skip
    assert saved["amendments"] == [
        {"stage": "grpo", "step": 1, "changes": {"grpo.steps": [3, 5], "log.log_every": [1, 2]}}
    ]
    assert C.from_dict(saved).grpo.steps == 5  # the run's config now: original + amendments
    grpo = [r for r in rows(cut) if r["stage"] == "grpo"]
    assert [r["step"] for r in grpo] == [0, 2, 4]  # step 0 before the cut; then every 2nd and the last
    # the longer schedule applies from the step the change took effect (step 1), not a step later
    lr = T.lr_lambda(cfg.grpo.warmup_steps, 5, cfg.optim.min_lr_frac)
    assert grpo[1]["lr"] == pytest.approx(cfg.grpo.lr * lr(2), rel=1e-12)
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["final_ckpt"].endswith("grpo-000005") and summary["wall_s"] > wall_at_cut


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    run = tmp_path / "done"
    assert main(capsys, "--sft.steps", "1", "--grpo.steps", "1", "--log.out_dir", str(tmp_path),
                "--log.run_name", "done")[0] == 0  # fmt: skip
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    code, out, err = main(capsys, "--resume", str(run))
    assert code == 0, err
    assert f"run {run} has finished (grpo 1 steps" in out and "nothing to resume" in out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == files
    assert [r["tag"] for r in rows(run) if r["stage"] == "eval"] == ["untrained", "sft", "final"]
    code, _, err = main(capsys, "--resume", str(run), "--grpo.steps", "4")
    assert code == 2 and "has finished" in err and f"--model.path {run / 'checkpoints' / 'grpo-000001'}" in err
    # killed after the final checkpoint, before summary.json: the resume writes it from the checkpoint
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()
    assert main(capsys, "--resume", str(run))[0] == 0
    again = json.loads((run / "summary.json").read_text())
    assert {k: v for k, v in again.items() if k != "wall_s"} == {k: v for k, v in summary.items() if k != "wall_s"}
    assert 0 < again["wall_s"] <= summary["wall_s"]  # the run's own time (to its last checkpoint), not this call's


def test_a_finished_run_summary_is_read_by_rank_0_only(tmp_path, monkeypatch):
    """Resuming a finished run whose summary.json is missing: rank 0 writes it while the other ranks run on, so a
    rank that read it could see it half-written; they get rank 0's summary by broadcast instead (a 2-rank world
    faked for rank 1: the file on disk is rank 0's write in progress)."""
    (tmp_path / "summary.json").write_text('{"run_dir": "')  # half-written
    opened = rundir.OpenedRun(tmp_path, state={"stage": "grpo", "step": 1, "extra": {"evals": {}}},
                              resume_dir=tmp_path / "checkpoints" / "grpo-000001", finished=True)  # fmt: skip
    from_rank_0 = {"run_dir": str(tmp_path), "wall_s": 1.0}

    def broadcast(objects, src=0):
        objects[:] = [from_rank_0]

    monkeypatch.setattr(T.dist, "broadcast_object_list", broadcast)
    monkeypatch.setattr(T.dist, "destroy_process_group", lambda: None)
    assert T._finished(opened, 1, 2) == from_rank_0
    assert (tmp_path / "summary.json").read_text() == '{"run_dir": "'  # rank 1 wrote nothing


def test_stopped_at_the_end_of_sft_resumes_with_the_real_sft_eval(tmp_path):
    cfg = C.preset_test()
    cfg.grpo.steps = 1
    straight = T.train(cfg, run_dir=str(tmp_path / "straight"))
    T.train(cfg, run_dir=str(tmp_path / "cut"), stop_after=cfg.sft.steps)  # before the SFT end eval
    resumed = T.train(cfg, resume=str(tmp_path / "cut"))
    assert plain_rows(tmp_path / "cut") == plain_rows(tmp_path / "straight")  # the sft eval row included
    sft_eval = [r for r in rows(tmp_path / "cut") if r.get("tag") == "sft"]
    assert len(sft_eval) == 1 and sft_eval[0]["eval_s"] > 0  # evaluated, not the untrained numbers copied
    wa, wb = weights(straight), weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------------------------------------------
# signals


def _signal_at(monkeypatch, step_fn: str, at_step: int, sig: int) -> None:
    """Make T.<step_fn> send this process `sig` in the middle of step `at_step` (as a scheduler would)."""
    real = getattr(T, step_fn)

    def step(run, *args):
        if args[-2] == at_step:  # (run, [frozen,] step, update)
            os.kill(os.getpid(), sig)
        return real(run, *args)

    monkeypatch.setattr(T, step_fn, step)


def test_sigterm_mid_grpo_then_resume_equals_a_straight_run(tmp_path, capfd, monkeypatch):
    capsys = capfd  # the handler writes to fd 2 directly
    args = ["--grpo.steps", "4", "--log.out_dir", str(tmp_path)]
    assert main(capsys, *args, "--log.run_name", "straight")[0] == 0
    with monkeypatch.context() as m:
        _signal_at(m, "grpo_step", 1, signal.SIGTERM)
        code, out, err = main(capsys, *args, "--log.run_name", "cut", "--log.ckpt_every", "10")
    cut = tmp_path / "cut"
    assert code == 143, err
    assert "SIGTERM: stopping after the current step" in err
    assert f"stopped by SIGTERM at global step 5 | checkpoint {cut / 'checkpoints' / 'grpo-000002'} | resume: " \
           f"python -m exgrpo_fast.train --resume {cut}" in out  # fmt: skip
    assert ckpt_lib.resolve_checkpoint(cut).name == "grpo-000002"  # the step in flight ended and was saved
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the run
    assert main(capsys, "--resume", str(cut))[0] == 0
    assert plain_rows(cut) == plain_rows(tmp_path / "straight")
    a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigint_stops_with_130_and_a_checkpoint(tmp_path, capsys, monkeypatch):
    _signal_at(monkeypatch, "sft_step", 0, signal.SIGINT)
    code, out, _ = main(capsys, "--log.out_dir", str(tmp_path), "--log.run_name", "int", "--log.ckpt_every", "10")
    assert code == 130 and "stopped by SIGINT at global step 1" in out
    assert ckpt_lib.resolve_checkpoint(tmp_path / "int").name == "sft-000001"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_before_the_first_step_saves_the_evals_done(tmp_path, capsys, monkeypatch):
    real = T.Run.evaluate

    def evaluate(self, tag, *a, **k):
        if tag == "untrained":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, tag, *a, **k)

    monkeypatch.setattr(T.Run, "evaluate", evaluate)
    code, out, _ = main(capsys, "--log.out_dir", str(tmp_path), "--log.run_name", "early")
    assert code == 143 and "stopped by SIGTERM at global step 0" in out
    state = ckpt_lib.load_trainer_state(ckpt_lib.resolve_checkpoint(tmp_path / "early"))
    assert (state["stage"], state["step"]) == ("sft", 0) and "untrained" in state["extra"]["evals"]


def test_a_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(rundir.os, "_exit", exits.append)
    clock = iter([100.0, 100.2, 101.5])
    monkeypatch.setattr(rundir.time, "monotonic", lambda: next(clock))
    stop = rundir.StopRequest()
    stop._handle(signal.SIGTERM, None)
    assert stop.requested and stop.exit_code == 143 and exits == []
    stop._handle(signal.SIGTERM, None)  # 0.2 s later: the same request delivered twice (torchrun, SLURM)
    assert exits == []
    stop._handle(signal.SIGINT, None)  # 1.5 s after the first: exit now
    assert exits == [130]


@pytest.mark.slow
def test_real_sigterm_to_the_cli_then_resume(tmp_path):
    """The command line under a real SIGTERM from outside (what SLURM / Kubernetes send) mid-GRPO: exit 143 after a
    checkpoint and the resume command; the resume finishes the run with every step once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "exgrpo_fast.train", "--preset", "test", "--grpo.steps", "12", "--log.out_dir",
           str(tmp_path), "--log.run_name", "r", "--log.ckpt_every", "100"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("grpo   2/12"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    run = tmp_path / "r"
    assert f"resume: python -m exgrpo_fast.train --resume {run}" in out
    stopped = ckpt_lib.resolve_checkpoint(run)
    assert stopped.name.startswith("grpo-") and 2 <= int(stopped.name[5:]) < 12
    resumed = subprocess.run([sys.executable, "-m", "exgrpo_fast.train", "--resume", str(run)], capture_output=True,
                             text=True, env=env, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in rows(run) if r["stage"] == "grpo"] == list(range(12))


def test_open_run_config_errors_name_fields():
    with pytest.raises(ConfigError, match="sft.steps=1: the run in x has done 2 SFT steps already"):
        rundir.check_resume({"sft.steps": [3, 1]}, {"stage": "sft", "step": 2, "extra": {}}, False, Path("x"), None)
    rundir.check_resume({"grpo.steps": [3, 1]}, {"stage": "sft", "step": 2, "extra": {}}, False, Path("x"), None)
    assert time.time() > 0


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (read from the children's environments)."""
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank}")


@pytest.mark.slow
def test_torchrun_one_rank_signalled_all_stop_at_one_step_and_the_lock_holds(tmp_path):
    """torchrun, 2 gloo processes: SIGTERM reaches rank 1 only, mid-GRPO; the ranks agree (at the step's metrics
    sync) to stop after the same step, rank 0 saves, both exit 143. A resume while another process holds the run dir
    is refused on every rank; the real resume finishes the run with every step once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
              "-m", "exgrpo_fast.train"]  # fmt: skip
    run = tmp_path / "r"
    cmd = [*launch, "--preset", "test", "--sft.steps", "1", "--grpo.steps", "8", "--log.out_dir", str(tmp_path),
           "--log.run_name", "r", "--log.ckpt_every", "100"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("grpo   2/8"):
            os.kill(_rank_pid(proc, 1), signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "143" in err, err[-4000:]  # torchrun reports its workers' exit codes
    assert f"resume: torchrun --nproc_per_node 2 -m exgrpo_fast.train --resume {run}" in out
    stopped = ckpt_lib.resolve_checkpoint(run)
    step = int(stopped.name.split("-")[1])
    assert stopped.name.startswith("grpo-") and 2 <= step < 8
    grpo = [r["step"] for r in rows(run) if r["stage"] == "grpo"]
    assert grpo == list(range(step))  # no rank ran past the agreed step

    with rundir.RunLock(run):
        held = subprocess.run([*launch, "--resume", str(run)], capture_output=True, text=True, env=env, timeout=600)
    assert held.returncode != 0 and f"run dir {run} is in use by another process (pid {os.getpid()}" in held.stderr
    assert "rank 1: rank 0 refused the run dir" in held.stderr
    done = subprocess.run([*launch, "--resume", str(run)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert [r["step"] for r in rows(run) if r["stage"] == "grpo"] == list(range(8))


def test_a_run_that_died_before_its_first_checkpoint_is_named_as_such(tmp_path, capsys, monkeypatch):
    def crash(*a, **k):
        raise RuntimeError("killed during the untrained eval")

    monkeypatch.setattr(T.Run, "evaluate", crash)
    with pytest.raises(RuntimeError):
        T.main(["--preset", "test", "--log.out_dir", str(tmp_path), "--log.run_name", "r"])
    monkeypatch.undo()
    code, _, err = main(capsys, "--log.out_dir", str(tmp_path), "--log.run_name", "r")
    assert code == 2 and one_line_error(err).startswith(
        f"error: run dir {tmp_path / 'r'} holds a run that ended before its first checkpoint ("
    )


def test_a_signal_while_inputs_are_checked_writes_nothing(tmp_path, capsys, monkeypatch):
    real = T.validate_run

    def validate(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(T, "validate_run", validate)
    code, out, _ = main(capsys, "--log.out_dir", str(tmp_path / "runs"))
    assert code == 130 and "stopped by SIGINT before the run started: nothing was written" in out
    assert not (tmp_path / "runs").exists()
