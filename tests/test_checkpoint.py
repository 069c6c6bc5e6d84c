"""Checkpoints: round trip, overwrite, retention, a stale pointer, and a crash at every step of the save sequence
(fault injection in a forked child) after which the newest complete checkpoint is found and loads."""

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from exgrpo_fast import checkpoint as C
from exgrpo_fast.errors import CheckpointError, MissingPathError, UserError
from exgrpo_fast.model.loading import load_model
from exgrpo_fast.model.tiny import create_tiny_checkpoint


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    path = create_tiny_checkpoint(tmp_path_factory.mktemp("student") / "tiny", preset="tiny", seed=7)
    return load_model(path)


def _opt(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.zero_grad()
    model(torch.tensor([[5, 6, 7]])).logits.sum().backward()
    opt.step()
    opt.zero_grad()
    return opt


def save(root, student, stage, step, tag="", **kw):
    model, tok = student
    return C.save_checkpoint(root / f"{stage}-{step:06d}", model, tok, stage=stage, step=step, extra={"tag": tag}, **kw)


def entries(root):
    return sorted(p.name for p in Path(root).iterdir())


def test_round_trip_restores_optimizer_and_rng(tmp_path, student):
    model, tok = student
    opt = _opt(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    torch.manual_seed(11)
    path = C.save_checkpoint(tmp_path / "checkpoints" / "sft-000003", model, tok, optimizer=opt, scheduler=sched,
                             stage="sft", step=3, extra={"pos": 9})  # fmt: skip
    expected_draw = torch.rand(3)
    assert C.resolve_checkpoint(tmp_path) == path == C.resolve_checkpoint(tmp_path / "checkpoints")
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "sft-000003"
    assert C.checkpoint_meta(path) == {"stage": "sft", "step": 3, "seq": 1}
    state = C.load_trainer_state(path)
    assert (state["stage"], state["step"], state["extra"]) == ("sft", 3, {"pos": 9})
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    C.restore(state, model, fresh)
    for a, b in zip(opt.state.values(), fresh.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored to the saved point
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
    assert entries(tmp_path / "checkpoints") == ["latest", "sft-000003"]  # no temp dirs left behind


def test_overwrite_same_name(tmp_path, student):
    root = tmp_path / "checkpoints"
    save(root, student, "sft", 2, "first")
    save(root, student, "sft", 2, "second")
    path = C.resolve_checkpoint(tmp_path)
    assert path.name == "sft-000002" and C.load_trainer_state(path)["extra"]["tag"] == "second"
    assert C.checkpoint_meta(path)["seq"] == 2
    assert entries(root) == ["latest", "sft-000002"]


def test_keep_last_prunes_this_stage_only(tmp_path, student):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save(root, student, "sft", step, keep_last=2)
    assert entries(root) == ["latest", "sft-000003", "sft-000004"]
    for step in (1, 2, 3):
        save(root, student, "grpo", step, keep_last=1, keep=[root / "sft-000003"])
    assert entries(root) == ["grpo-000003", "latest", "sft-000003", "sft-000004"]
    assert C.resolve_checkpoint(tmp_path).name == "grpo-000003"
    with pytest.raises(ValueError, match="keep_last=-1"):
        save(root, student, "grpo", 4, keep_last=-1)


def test_stale_or_missing_pointer_and_leftovers(tmp_path, student):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save(root, student, "sft", step)
    pointer = root / "latest"
    pointer.write_text("sft-000001\n")  # stale
    assert C.resolve_checkpoint(tmp_path).name == "sft-000003"
    pointer.write_text("sft-000009\n")  # dangling
    assert C.resolve_checkpoint(tmp_path).name == "sft-000003"
    pointer.unlink()
    assert C.resolve_checkpoint(tmp_path).name == "sft-000003"
    # half-written / half-deleted dirs are never taken for checkpoints, even with the newest-looking content
    (root / ".sft-000009.tmp-123").mkdir()
    (root / ".sft-000009.tmp-123" / C.STATE_FILE).write_bytes(b"partial")
    (root / "sft-000004").mkdir()  # a visible dir without checkpoint.json: not complete
    (root / "sft-000004" / C.STATE_FILE).write_bytes(b"partial")
    (root / "sft-000004" / C.META_FILE).write_text("{trunc")
    assert C.resolve_checkpoint(tmp_path).name == "sft-000003"
    save(root, student, "sft", 5)  # the next save tidies the temp dir and rewrites the pointer
    assert ".sft-000009.tmp-123" not in entries(root) and pointer.read_text().strip() == "sft-000005"


def test_errors_name_the_path(tmp_path, student):
    with pytest.raises(MissingPathError, match=f"checkpoint path {tmp_path / 'nope'} does not exist"):
        C.resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingPathError, match=f"no complete checkpoint in {tmp_path / 'empty'}"):
        C.resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(MissingPathError, match="trainer_state.pt does not exist"):
        C.load_trainer_state(tmp_path / "empty")
    path = save(tmp_path / "checkpoints", student, "sft", 1)
    data = (path / C.STATE_FILE).read_bytes()
    (path / C.STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trainer_state.pt: cannot read"):
        C.load_trainer_state(path)
    assert issubclass(CheckpointError, UserError) and issubclass(MissingPathError, FileNotFoundError)


def _crashing_save(root, student, stage, step, tag, point, keep_last=None) -> int:
    """Fork; the child saves with the fault-injection hook set to `point` and dies there. Returns its exit code."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.environ[C.CRASH_ENV] = point
            save(root, student, stage, step, tag, keep_last=keep_last)
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child saving with crash point {point} hung")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fault injection forks a child")
@pytest.mark.parametrize(
    "point, overwrite",
    [(p, o) for o in (False, True) for p in C.CRASH_POINTS if o or p != "old_aside"],  # old_aside: overwrites only
    ids=lambda v: {False: "new-name", True: "overwrite"}.get(v, v) if isinstance(v, bool) else v,
)
def test_crash_at_every_step_of_a_save(tmp_path, student, point, overwrite):
    root = tmp_path / "checkpoints"
    save(root, student, "sft", 1, "one")
    save(root, student, "sft", 2, "two")
    step = 2 if overwrite else 3
    code = _crashing_save(root, student, "sft", step, "new", point, keep_last=2)
    assert code == C.CRASH_EXIT, f"the child did not stop at {point} (exit {code})"
    committed = C.CRASH_POINTS.index(point) >= C.CRASH_POINTS.index("committed")
    found = C.resolve_checkpoint(tmp_path)  # what resume / eval would use
    state = C.load_trainer_state(found)
    assert (state["step"], state["extra"]["tag"]) == ((step, "new") if committed else (2, "two")), (point, found)
    model, _ = load_model(found)  # the weights and tokenizer load
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the next save (as a resumed run would do) repairs what the crash left and ends with a clean dir
    save(root, student, "sft", 4, "after")
    names = [n for n in entries(root) if n.startswith(".")]
    assert names == [], names
    assert C.resolve_checkpoint(tmp_path).name == "sft-000004"
    assert (root / "latest").read_text().strip() == "sft-000004"
    if overwrite or not committed:  # sft-000002 survives with one of its complete versions
        assert C.load_trainer_state(root / "sft-000002")["extra"]["tag"] in ("two", "new")


# ----------------------------------------------------------------------------------------------------------------
# loading never runs code; a live process's save is never tidied away; a full disk is named


class _Payload:
    """A pickle that runs a shell command when loaded with pickle's full powers (what torch.load(weights_only=False)
    did to trainer_state.pt)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_trainer_state_is_refused_without_running_it(tmp_path, student, capsys):
    path = save(tmp_path / "checkpoints", student, "sft", 1)
    marker = tmp_path / "pwned"
    torch.save({"stage": "sft", "step": 1, "extra": {"x": _Payload(marker)}}, path / C.STATE_FILE)
    with pytest.raises(CheckpointError, match=r"trainer_state.pt: refused: it is not a plain trainer state .*system"):
        C.load_trainer_state(path)
    assert not marker.exists()
    from exgrpo_fast import train as T

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:  # --resume: one line, exit 2, nothing run
        T.main(["--resume", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and "refused: it is not a plain trainer state" in err[0]
    assert not marker.exists()


def test_trainer_states_of_older_checkpoints_still_load(tmp_path, student):
    """Before numpy_rng_state, the NumPy RNG state was pickled as an ndarray: allowed by name, nothing else."""
    import random

    import numpy as np

    path = save(tmp_path / "checkpoints", student, "sft", 1)
    np.random.seed(5)
    legacy = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    expected = np.random.rand(3)
    torch.save({"stage": "sft", "step": 1, "optimizer": None, "scheduler": None, "rng": legacy, "extra": {}},
               path / C.STATE_FILE)  # fmt: skip
    state = C.load_trainer_state(path)
    C.set_rng_state(state["rng"])
    assert np.array_equal(np.random.rand(3), expected)
    # the new form is plain tensors and numbers, and round-trips exactly too
    np.random.seed(6)
    plain_state = C.numpy_rng_state()
    expected = np.random.rand(3)
    C.set_numpy_rng_state(plain_state)
    assert np.array_equal(np.random.rand(3), expected)


def test_extra_that_would_not_load_safely_is_refused_at_save(tmp_path, student):
    import numpy as np

    assert C.plain({"a": [np.float64(1.5), (np.int64(2), "s")], "t": None}) == {"a": [1.5, (2, "s")], "t": None}
    with pytest.raises(TypeError, match=r"extra\['path'\] is a PosixPath"):
        C.save_checkpoint(tmp_path / "sft-000001", *student, stage="sft", step=1, extra={"path": tmp_path})
    assert not (tmp_path / "sft-000001").exists()


def test_tidy_up_leaves_a_live_process_save_alone(tmp_path, student):
    import subprocess
    import sys

    root = tmp_path / "checkpoints"
    save(root, student, "sft", 1)
    save(root, student, "sft", 2)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp = root / f".sft-000003.tmp-{live.pid}"  # another process is writing sft-000003 ...
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"partial")
        os.replace(root / "sft-000002", root / f".sft-000002.old-{live.pid}")  # ... and overwriting sft-000002
        C.repair_checkpoints(root)
        assert tmp.is_dir() and (root / f".sft-000002.old-{live.pid}").is_dir() and not (root / "sft-000002").exists()
    finally:
        live.kill()
        live.wait()
    C.repair_checkpoints(root)  # now it is crash debris: removed, the displaced checkpoint back in place
    assert entries(root) == ["latest", "sft-000001", "sft-000002"]


@pytest.mark.parametrize(
    "failure",
    [
        OSError(28, "No space left on device"),
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],  # fmt: skip
    ids=["errno", "rust-writer"],
)
def test_full_disk_during_a_save_is_named_and_leaves_the_older_checkpoints(tmp_path, student, monkeypatch, failure):
    from exgrpo_fast.errors import DiskFullError

    root = tmp_path / "checkpoints"
    save(root, student, "sft", 1, "one")

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(C.torch, "save", full)
    with pytest.raises(DiskFullError) as info:
        save(root, student, "sft", 2, "two")
    assert str(info.value) == (
        f"no space left on device writing {root / f'.sft-000002.tmp-{os.getpid()}'}; the checkpoint was not written; "
        "the older ones are intact"
    )
    assert isinstance(info.value, UserError)
    assert entries(root) == ["latest", "sft-000001"]  # the half-written temp dir is gone (space freed)
    assert C.load_trainer_state(C.resolve_checkpoint(tmp_path))["extra"]["tag"] == "one"


@pytest.mark.parametrize("rank", [0, 1])
def test_sharded_optimizer_state_is_gathered_to_rank_0_only(monkeypatch, rank):
    """Every rank joins the all-gathers of the optimizer state, but only rank 0 (the writer) keeps the full CPU
    copies: on 8 ranks of a 7B model the others would each hold 56 GB of AdamW moments until the save returned."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        moment = torch.arange(6.0).view(3, 2)
        osd = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": distribute_tensor(moment, mesh, [Shard(0)])}},
               "param_groups": [{"params": [0]}]}  # fmt: skip
        gathered = []
        real = type(osd["state"][0]["exp_avg"]).full_tensor
        monkeypatch.setattr(C, "_rank", lambda: rank)
        monkeypatch.setattr(type(osd["state"][0]["exp_avg"]), "full_tensor", lambda t: gathered.append(1) or real(t))
        out = C._full_tensors(osd)
    finally:
        if owned:
            dist.destroy_process_group()
    assert gathered == [1]  # the collective ran on this rank either way
    if rank == 0:
        assert type(out["state"][0]["exp_avg"]) is torch.Tensor and out["state"][0]["exp_avg"].device.type == "cpu"
        assert torch.equal(out["state"][0]["exp_avg"], moment) and out["param_groups"] == osd["param_groups"]
    else:
        assert out is None


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's memory maps (Linux)")
def test_trainer_state_is_memory_mapped(tmp_path, student):
    """Every rank of a resume loads the full trainer state (optimizer moments: 56 GB at 7B): mapped from the file,
    the ranks of a node share the page cache instead of each holding a private copy."""
    model, tok = student
    ckpt = C.save_checkpoint(tmp_path / "sft-000001", model, tok, optimizer=_opt(model), stage="sft", step=1)
    state = C.load_trainer_state(ckpt)
    assert str((ckpt / C.STATE_FILE).resolve()) in Path("/proc/self/maps").read_text()
    assert state["optimizer"]["state"]  # the moments are there (and readable) all the same
