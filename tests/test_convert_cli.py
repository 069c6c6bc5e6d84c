"""model.convert follows the trainer's rules without a GGUF file at hand: user errors are one line and exit 2,
--out is checked before any work, a non-empty --out is refused unless --overwrite, which replaces the directory as
a whole (no stale shard of the old checkpoint survives). The conversion itself: tests/test_convert.py (slow)."""

import pytest

from exgrpo_fast.errors import OutputExistsError
from exgrpo_fast.model import convert as V


def run(capsys, *args) -> tuple[int, list[str]]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        V.main(list(args))
    return info.value.code, capsys.readouterr().err.strip().splitlines()


def test_user_errors_are_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(V, "smollm2_gguf_path", lambda: pytest.fail("--out must be checked first"))
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run(capsys, "--out", str(out)) == (2, [
        f"error: out={str(out)!r} is not empty (notes.txt); pass --overwrite to replace it, or choose an empty "
        "directory"
    ])  # fmt: skip
    (out / "sub").mkdir()
    code, err = run(capsys, "--out", str(out), "--overwrite")
    assert code == 2 and err == [
        f"error: out={str(out)!r} holds the directory 'sub': --overwrite replaces only a checkpoint directory "
        "(files); remove it yourself or choose another --out"
    ]
    assert run(capsys, "--out", str(tmp_path / "new"), "--dtype", "int8") == (
        2, ["error: dtype='int8': expected float32, bfloat16 or float16"]
    )  # fmt: skip
    monkeypatch.undo()
    code, err = run(capsys, "--out", str(tmp_path / "new"), "--gguf", str(tmp_path / "absent.gguf"))
    assert code == 2 and err == [f"error: gguf={str(tmp_path / 'absent.gguf')!r}: no such file"]
    code, err = run(capsys, "--out", str(tmp_path / "new"), "--no-such-flag", "1")
    assert code == 2 and len(err) == 1 and "--no-such-flag" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing created


def test_overwrite_replaces_the_directory_as_a_whole(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    for name in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json"):  # fmt: skip
        (out / name).write_text("old sharded checkpoint")
    with pytest.raises(OutputExistsError, match="not empty"):
        V.check_out(out, overwrite=False)
    V.check_out(out, overwrite=True)

    def write(folder):
        (folder / "config.json").write_text("new")
        (folder / "model.safetensors").write_text("new single file")

    V.publish_dir(out, write)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or displaced dir left

    def fail(folder):
        (folder / "config.json").write_text("half")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        V.publish_dir(out, fail)
    assert (out / "config.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
