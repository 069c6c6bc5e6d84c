"""cli_main: user errors exit 2 with one line (traceback only under --debug); internal errors keep theirs."""

import subprocess
import sys

import pytest

from exgrpo_fast.errors import ConfigError, DataError, UserError, cli_main

SCRIPT = """
import sys
from exgrpo_fast.errors import cli_main, DataError

def main(argv):
    assert "--debug" not in argv, argv
    if argv[0] == "user":
        raise DataError("d.jsonl", "line 3", "NaN is not a finite number")
    if argv[0] == "bug":
        raise KeyError("internal")
    print("ok", argv)

cli_main(main)
"""


def run(*args):
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=60)


def test_cli_main_exit_codes_and_messages():
    user = run("user")
    assert user.returncode == 2 and user.stdout == ""
    assert user.stderr == "error: d.jsonl: line 3: NaN is not a finite number\n"
    debug = run("user", "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and debug.stderr.endswith("finite number\n")
    bug = run("bug")
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError: 'internal'" in bug.stderr
    ok = run("fine", "--debug")
    assert ok.returncode == 0 and ok.stdout == "ok ['fine']\n"


def test_cli_main_in_process(capsys):
    assert cli_main(lambda argv: len(argv), ["a", "--debug", "b"]) == 2

    def bad(argv):
        raise ConfigError("grpo.lr=inf: expected a finite positive number")

    with pytest.raises(SystemExit) as info:
        cli_main(bad, [])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: grpo.lr=inf: expected a finite positive number\n"
    assert issubclass(DataError, ValueError) and issubclass(ConfigError, UserError)


def test_eval_missing_path_names_it(tmp_path, capsys):
    from exgrpo_fast import eval as E

    with pytest.raises(SystemExit) as info:
        E.main([str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err == f"error: checkpoint path {tmp_path / 'nope'} does not exist\n"
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit):
        E.main([str(tmp_path / "run")])
    assert "no complete checkpoint in" in capsys.readouterr().err
