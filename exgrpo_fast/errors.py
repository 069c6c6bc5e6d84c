"""User errors versus internal errors, and the CLI wrapper that tells them apart.

A *user error* is a mistake in what the user gave us: a config value, a data file, a model directory, a checkpoint
path. It is found before any work starts and is reported as one line that names the file/line or the field and
value; the command exits with code 2 and no traceback (``--debug`` or ``EXGRPO_FAST_DEBUG=1`` shows it). Anything
else is a bug or an environment failure and keeps its full traceback.

The concrete classes also derive from the builtin exception a caller would have caught before they existed
(``ValueError`` for bad content, ``FileNotFoundError`` for missing paths), so existing ``except`` clauses and tests
keep working.

    from exgrpo_fast.errors import cli_main
    if __name__ == "__main__":
        cli_main(main)          # main(argv: list[str]) -> anything
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

R = TypeVar("R")

USER_ERROR_EXIT = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "EXGRPO_FAST_DEBUG"


class UserError(Exception):
    """A mistake in the user's input (config, data, model directory, paths): one clear message, exit code 2."""


class ConfigError(UserError, ValueError):
    """An invalid config value; the message names the field and the value."""


class DataError(UserError, ValueError):
    """A malformed data file or row. ``path`` is the file, ``where`` "line N" / "row N" (or "" for the whole file),
    ``reason`` the problem in words; str() is "PATH: WHERE: REASON"."""

    def __init__(self, path, where: str, reason: str) -> None:
        self.path, self.where, self.reason = str(path), where, reason
        super().__init__(": ".join(s for s in (self.path, where, reason) if s))


class ModelError(UserError, ValueError):
    """A model directory whose content cannot be loaded (bad config.json, truncated weights, no tokenizer)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that exists but cannot be used (unreadable trainer state, wrong layout)."""


class RunDirError(UserError, ValueError):
    """A run directory that cannot be used as asked: it holds another run, another process is writing it, it is not
    writable, or a resume asks for a change the run cannot take."""


class DiskFullError(UserError, OSError):
    """No space left (or the quota exhausted) while writing a run's files; the message names the path."""

    def __str__(self) -> str:  # keep our message verbatim (OSError formats "[Errno ...]" only when given errno)
        return self.args[0] if self.args else ""


class OutputExistsError(UserError, FileExistsError):
    """An output path that already holds something the command would overwrite (pass the command's --overwrite)."""


class MissingDependencyError(UserError, ImportError):
    """An optional package a command needs is not installed; the message says what to install."""


class MissingPathError(UserError, FileNotFoundError):
    """A path the user named (model dir, checkpoint, data file) does not exist or lacks a required file."""

    def __init__(self, message: str) -> None:
        super().__init__(message)

    def __str__(self) -> str:  # OSError formats "[Errno ...]" only when given errno; keep our message verbatim
        return self.args[0] if self.args else ""


_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122", "StorageFull")


def is_disk_full(exc: BaseException, path: str | Path | None = None) -> bool:
    """Whether an exception (or one it was raised from / during) says the disk or the quota is full: an OSError with
    ENOSPC / EDQUOT, the same in the words of a Rust or C++ writer (safetensors), or a writer that lost the errno
    (torch's "file write failed") while the filesystem of `path` has no space left."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(w in str(e) for w in _FULL_WORDS):
            return True
        todo += [e.__cause__, e.__context__]
    if path is not None and ("write failed" in str(exc) or "iostream error" in str(exc)):
        p = Path(path)
        while not p.exists() and p.parent != p:
            p = p.parent
        try:
            return shutil.disk_usage(p).free < 2**20
        except OSError:
            return False
    return False


@contextlib.contextmanager
def full_disk_named(path: str | Path, hint: str = "") -> Iterator[None]:
    """Turn a full-disk error raised inside the block into DiskFullError("no space left on device writing PATH")."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if is_disk_full(e, path):
            raise DiskFullError(f"no space left on device writing {path}" + (f"; {hint}" if hint else "")) from e
        raise


def _debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def cli_main(fn: Callable[[list[str]], R], argv: Sequence[str] | None = None) -> R:
    """Run ``fn(argv)`` as a command-line entry point.

    ``--debug`` is taken out of argv (fn never sees it). A UserError prints ``error: MESSAGE`` to stderr and exits
    with code 2 (with the traceback too under --debug); Ctrl-C exits 130 without a traceback; any other exception
    propagates unchanged (Python prints its traceback and exits 1). Returns fn's result otherwise.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return fn(argv)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
