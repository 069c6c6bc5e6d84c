"""The run-directory contract (docs/reliability.md): a run directory is never silently damaged.

- One run per directory. A fresh run refuses a run dir that already holds something (a `.lock` and a
  `console.log` aside) and says to pass --resume or another name; log.run_name stays inside log.out_dir (config
  validation). The run dir's place is checked for writability before anything is created.
- One writer. RunLock: an exclusive OS lock (flock) on RUN_DIR/.lock, taken before the run dir is written and held
  for the run's life by train (fresh or resumed), the crosscoder subcommands and REKD; a second writer is refused
  naming the holder. Under torchrun rank 0 locks and every rank learns the outcome.
- Honest resume. open_run compares the config a resume is given with the run's own (config.json, amendments
  applied): only config.RESUME_MUTABLE may change, a stage's step count never below the steps done nor once the
  stage has ended, and every change is appended to config.json's "amendments" with the stage and step from which
  it applies. A finished run is reported as such and left as it is.
- Preemption. StopRequest: SIGTERM / SIGINT ask the run to stop at the end of its current step (the trainer then
  saves a checkpoint, prints the resume command and exits 128 + the signal: 143 / 130); a second signal later than
  SECOND_SIGNAL_S after the first exits at once (the newest complete checkpoint stays intact: saves are atomic).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from exgrpo_fast.errors import ConfigError, RunDirError, UserError

LOCK_FILE = ".lock"
NOT_A_RUN = frozenset({LOCK_FILE, "console.log"})
"""Entries a fresh run accepts in its run dir: the lock file, and a console log a shell or the experiments runner
opened before the run started (`> RUN/console.log`)."""
SECOND_SIGNAL_S = 1.0
"""A second signal within this many seconds of the first is the same request delivered twice (torchrun forwards
the SIGINT of a terminal as SIGTERM; SLURM signals every process of a job), not a demand to exit at once."""

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


# ----------------------------------------------------------------------------------------------------------------
# places


def writable_problem(path: str | Path) -> str | None:
    """Why a directory could not be created or written at `path` (a file in the way, no permission, a read-only
    filesystem), or None. Creates nothing: the nearest existing ancestor is probed with an unnamed temp file."""
    p = Path(path)
    while not (p.exists() or p.is_symlink()) and p.parent != p:
        p = p.parent
    if not p.is_dir():
        return f"{p} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        return f"{p} is not writable ({e.strerror or e})"
    return None


def run_contents(run_dir: Path) -> list[str]:
    """The entries of a run dir that make it hold a run (sorted; [] for a missing or empty dir)."""
    if not run_dir.is_dir():
        return []
    return sorted(e.name for e in run_dir.iterdir() if e.name not in NOT_A_RUN)


def check_fresh(run_dir: Path, named_by: str) -> None:
    """A fresh run may use run_dir: it can be created / written and holds no run. named_by says which setting named
    it (for the message)."""
    problem = writable_problem(run_dir)
    if problem:
        raise RunDirError(f"{named_by}: cannot write the run dir {run_dir}: {problem}")
    held = run_contents(run_dir)
    if held:
        from exgrpo_fast.checkpoint import list_checkpoints

        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        if not list_checkpoints(run_dir / "checkpoints"):  # a run that died before its first checkpoint
            raise RunDirError(
                f"run dir {run_dir} holds a run that ended before its first checkpoint ({shown}): remove it to start "
                "again, or choose another --log.run_name"
            )
        raise RunDirError(
            f"run dir {run_dir} already holds a run ({shown}): continue it with --resume {run_dir}, or choose "
            "another --log.run_name"
        )


def resume_command(run_dir: str | Path, world: int = 1) -> str:
    """The command line that continues a run."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    launcher = f"torchrun --nproc_per_node {local}" if world > 1 else "python"
    return f"{launcher} -m exgrpo_fast.train --resume {shlex.quote(str(run_dir))}"


# ----------------------------------------------------------------------------------------------------------------
# one writer


class RunLock:
    """An exclusive, non-blocking OS lock on DIR/.lock for as long as it is held (flock: released by the OS when the
    process ends, however it ends; a second holder, in this process or another, is refused). The file keeps the
    holder's pid, host and command line for the refusal message; it is never deleted (deleting a lock file races
    with its next taker). Where flock does not exist (Windows) the lock is a no-op."""

    def __init__(self, directory: str | Path, what: str = "run dir"):
        self.dir, self.what = Path(directory), what
        self.path = self.dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        if fcntl is None:  # pragma: no cover
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder(fd)
            os.close(fd)
            raise RunDirError(
                f"{self.what} {self.dir} is in use by another process ({holder}): one process writes a run at a "
                "time; wait for it to end or use another directory"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "argv": sys.argv}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 65536, 0) or b"{}")
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (ValueError, KeyError, TypeError, OSError):
            return "pid unknown"

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:  # a lock object dropped without release() (an exception, a test) frees its fd
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def locked_dir(directory: str | Path, what: str) -> Iterator[RunLock | None]:
    """Hold the lock of `directory` for a command's life (crosscoder, REKD). The directory is created when it can be
    and removed again if the command fails leaving nothing but the lock in a directory it created."""
    directory = Path(directory)
    created = not directory.exists()
    problem = writable_problem(directory)
    if problem:
        raise ConfigError(f"log.out_dir={str(directory)!r}: {problem}")
    directory.mkdir(parents=True, exist_ok=True)
    lock = RunLock(directory, what).acquire()
    ok = False
    try:
        yield lock
        ok = True
    finally:
        lock.release()
        if not ok and created and not run_contents(directory):
            with contextlib.suppress(OSError):
                (directory / LOCK_FILE).unlink()
                directory.rmdir()


# ----------------------------------------------------------------------------------------------------------------
# opening a run: the dir, the lock, a resume's checks, config.json


@dataclass
class OpenedRun:
    """A run dir locked for writing, and what a resume brings (state, its checkpoint, accepted config changes)."""

    run_dir: Path
    lock: RunLock | None = None
    state: dict | None = None
    resume_dir: Path | None = None
    changes: dict[str, list] = field(default_factory=dict)
    finished: bool = False

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def open_run(cfg, resume: str | None, run_dir: str | None, rank: int, world: int) -> OpenedRun:
    """The run dir of a fresh or resumed run, checked and locked (rank 0), the resume's state loaded and checked
    against the run's config (check_resume), and config.json written: a fresh run's config with an empty list of
    amendments, or the accepted changes of a resume appended. Raises a UserError on every rank when any check
    fails; creates nothing before the checks of a fresh run pass."""
    import torch.distributed as dist

    from exgrpo_fast import checkpoint as ckpt_lib

    resume_dir = ckpt_lib.resolve_checkpoint(resume) if resume else None
    if run_dir:
        path, named_by = Path(run_dir), f"run_dir={run_dir!r}"
    elif resume_dir is not None:
        path, named_by = resume_dir.parent.parent, f"--resume {resume}"
    else:
        name = cfg.log.run_name or time.strftime("%Y%m%d-%H%M%S")
        path, named_by = Path(cfg.log.out_dir) / name, f"log.out_dir={cfg.log.out_dir!r}"
    lock, error = None, ""
    if rank == 0:  # only rank 0 writes; a timestamp name is rank 0's
        try:
            if resume_dir is None:
                check_fresh(path, named_by)
                path.mkdir(parents=True, exist_ok=True)
            else:
                problem = writable_problem(path) or writable_problem(path / "checkpoints")
                if problem:
                    raise RunDirError(f"{named_by}: cannot write the run dir {path}: {problem}")
            lock = RunLock(path).acquire()
            if resume_dir is None:
                check_fresh(path, named_by)  # again under the lock: another run may have started meanwhile
        except UserError as e:
            if lock is not None:
                lock.release()
            error = str(e)
    if world > 1:
        shared = [error, str(path)]
        dist.broadcast_object_list(shared, src=0)
        error, path = shared[0], Path(shared[1])
    if error:
        raise RunDirError(error if rank == 0 else f"rank {rank}: rank 0 refused the run dir: {error}")
    opened = OpenedRun(path, lock, resume_dir=resume_dir)
    try:
        if resume_dir is not None:
            _open_resume(opened, cfg, resume, rank, world)
        if rank == 0 and not opened.finished:
            _write_config(opened, cfg)
    except BaseException:
        opened.release()
        raise
    return opened


def _open_resume(opened: OpenedRun, cfg, resume: str, rank: int, world: int) -> None:
    import torch.distributed as dist

    from exgrpo_fast import checkpoint as ckpt_lib
    from exgrpo_fast.config import config_changes, find_run_config, from_dict

    if opened.resume_dir.parent.name == "checkpoints":  # a crash mid-save: displaced checkpoint back, temp dirs gone
        if rank == 0:
            ckpt_lib.repair_checkpoints(opened.resume_dir.parent)
        if world > 1:
            dist.barrier()
        opened.resume_dir = ckpt_lib.resolve_checkpoint(resume)
    opened.state = state = ckpt_lib.load_trainer_state(opened.resume_dir)
    saved = find_run_config(opened.run_dir)
    run_cfg = from_dict(saved[0]) if saved is not None else cfg
    opened.finished = run_finished(run_cfg, state)
    opened.changes = config_changes(run_cfg, cfg)
    check_resume(opened.changes, state, opened.finished, opened.run_dir, opened.resume_dir)


def run_finished(run_cfg, state: dict) -> bool:
    """Whether a run's checkpoint is its last: GRPO at its end with the final eval on record."""
    evals = state.get("extra", {}).get("evals", {})
    return state["stage"] == "grpo" and state["step"] >= run_cfg.grpo.steps and "final" in evals


def check_resume(changes: dict[str, list], state: dict, finished: bool, run_dir: Path, ckpt: Path) -> None:
    """Refuse a resume's config change that the run cannot take (see config.RESUME_MUTABLE), naming the field."""
    from exgrpo_fast.config import RESUME_MUTABLE

    stage, step = state["stage"], state["step"]
    evals = state.get("extra", {}).get("evals", {})
    for name, (old, new) in changes.items():
        if name not in RESUME_MUTABLE:
            raise ConfigError(
                f"{name}={new!r}: the run in {run_dir} was started with {old!r}; a resume may change only "
                f"{', '.join(RESUME_MUTABLE)} (docs/reliability.md)"
            )
    for name in ("sft.steps", "grpo.steps"):
        if name not in changes:
            continue
        old, new = changes[name]
        if finished:
            raise RunDirError(
                f"{name}={new}: the run in {run_dir} has finished (grpo {step}/{old} steps, final eval done); to "
                f"train on, start a new run from its final checkpoint: --model.path {ckpt}"
            )
        if name == "sft.steps" and (stage != "sft" or "sft" in evals):
            raise ConfigError(f"sft.steps={new}: the SFT stage of the run in {run_dir} has ended ({old} steps)")
        if name.startswith(stage) and new < step:
            raise ConfigError(f"{name}={new}: the run in {run_dir} has done {step} {stage.upper()} steps already")


def _write_config(opened: OpenedRun, cfg) -> None:
    """config.json (+ config.toml for a fresh run): the original config and the list of amendments."""
    from exgrpo_fast.config import AMENDMENTS, find_run_config, to_toml

    path = opened.run_dir / "config.json"
    saved = find_run_config(opened.run_dir) if opened.state is not None else None
    if saved is None:
        doc = {**cfg.to_dict(), AMENDMENTS: []}
        (opened.run_dir / "config.toml").write_text(to_toml(cfg))
    elif opened.changes:
        doc = dict(saved[0])
        at = {"stage": opened.state["stage"], "step": opened.state["step"], "changes": opened.changes}
        doc[AMENDMENTS] = [*doc.get(AMENDMENTS, []), at]
    else:
        return  # a resume with the run's own config: config.json stays as it is
    tmp = path.with_name(f".config.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# signals


class StopRequest:
    """SIGTERM / SIGINT handling for a run. The first signal only sets `signum`; the trainer reads it once per step
    (ranks agree at the step's metrics sync) and stops cleanly. A second signal more than SECOND_SIGNAL_S later
    exits at once with 128 + its number."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._t = 0.0
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if not self.signum:
            self.signum, self._t = signum, now
            _say(f"{name}: stopping after the current step (a checkpoint is saved first; {name} again to exit now)")
        elif now - self._t > SECOND_SIGNAL_S:
            _say(f"{name} again: exiting now; the newest complete checkpoint is intact")
            os._exit(128 + signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """The handlers for the block's duration (main thread only; elsewhere the default behaviour stays)."""
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            pass
        try:
            yield self
        finally:
            for sig, prev in self._previous.items():
                signal.signal(sig, prev)
            self._previous.clear()


def _say(text: str) -> None:
    """One line to stderr from a signal handler (os.write: no buffered stream re-entered)."""
    with contextlib.suppress(OSError):
        os.write(2, (text + "\n").encode())
