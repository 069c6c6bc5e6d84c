"""Trainer: a seconds-long run of both stages, exact resume, non-finite loss skipped, HF-loadable checkpoints, plots."""

import json
from pathlib import Path

import pytest
import torch

from exgrpo_fast import config as C
from exgrpo_fast import train as T


@pytest.fixture(scope="module", autouse=True)
def teacher(tmp_path_factory):
    """A differently initialised tiny model as the teacher: its KL term keeps GRPO losses and grads nonzero even
    when every reward of a barely trained student is equal (advantages 0)."""
    from exgrpo_fast.model.tiny import create_tiny_checkpoint

    global TEACHER
    TEACHER = str(create_tiny_checkpoint(tmp_path_factory.mktemp("teacher") / "t", preset="tiny", seed=123))
    return TEACHER


def small_cfg(**overrides) -> C.TrainConfig:
    cfg = C.preset_test()
    cfg.log.tensorboard = True
    cfg.model.teacher_path, cfg.loss.teacher_beta = TEACHER, 0.1
    cfg.loss.kl_beta = 0.05  # exercises the reference model (the frozen SFT checkpoint)
    cfg.grpo.updates_per_batch = 2  # exercises old_logp + clipping
    cfg.rollout.temperature = 1.5  # diverse samples from a barely trained model
    C.apply_overrides(cfg, overrides)
    return cfg.validate()


def rows(run_dir, stage=None):
    out = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in out if stage is None or r["stage"] == stage]


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "e2e"
    summary = T.train(small_cfg(), run_dir=str(run_dir))
    return run_dir, summary


def test_end_to_end_both_stages(e2e_run):
    run_dir, summary = e2e_run
    cfg = small_cfg()
    assert len(rows(run_dir, "sft")) == cfg.sft.steps
    grpo = rows(run_dir, "grpo")
    assert len(grpo) == cfg.grpo.steps
    for key in (
        "reward",
        "reward_std",
        "frac_zero_std",
        "acc",
        "probe_acc",
        "kl_ref",
        "entropy",
        "clip_frac_low",
        "clip_frac_high",
        "grad_norm",
        "tok_per_s",
        "t_rollout",
        "t_logp",
        "t_update",
        "update_tokens",
        "loss",
    ):
        assert key in grpo[0], key
    assert all(r["skipped"] == 0 for r in grpo)
    tags = [r["tag"] for r in rows(run_dir, "eval")]
    assert tags == ["untrained", "sft", "final"]
    assert {"untrained_acc_id", "sft_acc_id", "final_acc_id", "final_acc_ood"} <= set(summary)
    assert (run_dir / "config.json").is_file() and (run_dir / "config.toml").is_file()
    assert list((run_dir / "tb").iterdir())
    # the final checkpoint is a plain HF model dir
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(summary["final_ckpt"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (Path(summary["final_ckpt"]) / "trainer_state.pt").is_file()


def test_plot(e2e_run):
    from exgrpo_fast.plot import plot_run

    paths = plot_run(e2e_run[0])
    assert {p.name for p in paths} >= {"sft.png", "grpo.png", "eval.png", "overview.png"}
    assert all(p.stat().st_size > 1000 for p in paths)


def test_plot_trailing_mean():
    from exgrpo_fast.plot import _series

    rows = [{"stage": "grpo", "step": i, "reward": r} for i, r in enumerate([1.0, 3.0, 5.0, 9.0])]
    rows.insert(2, {"stage": "eval", "step": 0, "reward": 100.0})
    assert _series(rows, "grpo", "reward~2") == ([0, 1, 2, 3], [1.0, 2.0, 4.0, 7.0])


def _state(ckpt):
    from safetensors.torch import load_file

    return load_file(str(Path(ckpt) / "model.safetensors"))


@pytest.mark.parametrize("stop_after", [2, 4])  # mid-SFT, mid-GRPO (sft.steps = 3)
def test_resume_is_exact(tmp_path, stop_after):
    cfg = small_cfg()
    straight = T.train(cfg, run_dir=str(tmp_path / "straight"))
    T.train(cfg, run_dir=str(tmp_path / "cut"), stop_after=stop_after)
    resumed = T.train(
        C.from_dict(json.loads((tmp_path / "cut" / "config.json").read_text())), resume=str(tmp_path / "cut")
    )
    a = {(r["stage"], r["step"]): r for r in rows(tmp_path / "straight") if r["stage"] in ("sft", "grpo")}
    b = {(r["stage"], r["step"]): r for r in rows(tmp_path / "cut") if r["stage"] in ("sft", "grpo")}
    assert a.keys() == b.keys()
    for k, row in a.items():  # every step after the cut equals the uninterrupted run's, on CPU bit for bit
        for m in ("loss", "grad_norm", "reward", "kl_ref", "entropy"):
            if m in row:
                assert row[m] == b[k][m], (k, m, row[m], b[k][m])
    assert any(a[k]["loss"] != 0 for k in a if k[0] == "grpo")
    sa, sb = _state(straight["final_ckpt"]), _state(resumed["final_ckpt"])
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_non_finite_loss_is_skipped(tmp_path, monkeypatch):
    real = T.ops.fused_linear_policy_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 1 else loss), stats

    monkeypatch.setattr(T.ops, "fused_linear_policy_loss", poisoned)
    cfg = small_cfg()
    cfg.grpo.updates_per_batch = 1
    summary = T.train(cfg, run_dir=str(tmp_path / "nan"))
    grpo = rows(tmp_path / "nan", "grpo")
    assert grpo[0]["skipped"] == 1 and all(r["skipped"] == 0 for r in grpo[1:])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(summary["final_ckpt"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_zero_step_stages_reuse_the_eval_of_their_weights(tmp_path, monkeypatch):
    """A stage of 0 steps hands on the weights it got: its end eval reuses the earlier eval (logged, eval_s 0)
    instead of rerunning it; log.eval_start false skips the starting weights' eval."""
    calls = []
    real = T.evaluate
    monkeypatch.setattr(T, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = C.preset_test()
    cfg.sft.steps, cfg.grpo.steps, cfg.log.tensorboard = 0, 0, False
    summary = T.train(cfg, run_dir=str(tmp_path / "a"))
    evals = {r["tag"]: r for r in rows(tmp_path / "a", "eval")}
    assert len(calls) == 1 and list(evals) == ["untrained", "sft", "final"]
    assert evals["final"]["eval_s"] == 0.0 and evals["sft"]["eval_s"] == 0.0
    assert summary["final_acc_id"] == summary["untrained_acc_id"] == evals["final"]["acc_id"]
    calls.clear()
    cfg.log.eval_start, cfg.grpo.steps = False, 1
    summary = T.train(cfg, run_dir=str(tmp_path / "b"))
    assert len(calls) == 1 and [r["tag"] for r in rows(tmp_path / "b", "eval")] == ["final"]
    assert "untrained_acc_id" not in summary and "final_acc_id" in summary


def test_cli_main_runs(tmp_path, capsys):
    summary = T.main(
        [
            "--preset",
            "test",
            "--sft.steps",
            "1",
            "--grpo.steps",
            "1",
            "--log.out_dir",
            str(tmp_path),
            "--log.run_name",
            "cli",
        ]
    )
    assert Path(summary["run_dir"]) == tmp_path / "cli"
    assert "| share_prefix on |" in capsys.readouterr().out  # the run header says how GRPO batches are packed


def test_fsdp2_two_processes_gloo(tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo): both stages run sharded and the checkpoint is a full HF model."""
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "exgrpo_fast.train",
        "--preset",
        "test",
        "--sft.steps",
        "2",
        "--grpo.steps",
        "2",
        "--log.out_dir",
        str(tmp_path),
        "--log.run_name",
        "fsdp",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(summary["final_ckpt"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(rows(tmp_path / "fsdp", "grpo")) == 2


@pytest.fixture(scope="module")
def policy_and_ref(tmp_path_factory):
    from exgrpo_fast.model.loading import load_model
    from exgrpo_fast.model.tiny import create_tiny_checkpoint

    policy, _ = load_model(create_tiny_checkpoint(tmp_path_factory.mktemp("policy") / "p", preset="tiny", seed=7))
    ref, _ = load_model(TEACHER)
    return T.PackedPolicy(policy), ref.requires_grad_(False)


def _one_update(policy, ref, seqs, advantages, budget, loss_cfg, *, step_norm=True, groups=None, old=False):
    """Loss and grads of one GRPO update of `seqs` packed under `budget` (KL to ref; on-policy unless `old`: then
    old log-probs from a no-grad pass of the policy itself, as grpo.updates_per_batch > 1 takes them)."""
    packed = T.pack_sequences(seqs, budget, groups=groups)
    norm = T.step_loss_norm(packed) if step_norm else None  # None: per-micro-batch counts, what the step norm fixes
    none = [None] * len(packed)
    with torch.no_grad():
        refs = [T._logp(ref, b, 1.0) for b in packed]
        olds = [T._logp(policy, b, 1.0) for b in packed] if old else none
    live = [True] * len(packed)
    loss, _ = T.policy_loss_backward(policy, packed, advantages, olds, refs, none, live, norm, loss_cfg, 1.0)
    grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad(set_to_none=True)
    return loss, grads, len(packed)


@pytest.mark.parametrize(
    "loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_step_loss_does_not_depend_on_packing(policy_and_ref, loss_agg):
    """One GRPO update's loss and gradients are the same (to fp32 round-off) whether the step's sequences share one
    micro-batch or are spread over several: the normaliser (tokens, sequences, longest masked length) is the
    step's, computed once on the host."""
    policy, ref = policy_and_ref
    g = torch.Generator().manual_seed(0)
    lengths = [37, 5, 22, 9, 30, 14, 3, 26]
    seqs = [
        (torch.randint(3, 60, (n,), generator=g).tolist(), (torch.rand(n, generator=g) < 0.6).tolist()) for n in lengths
    ]
    seqs[6] = (seqs[6][0], [False] * 3)  # a sequence without a loss token counts in no normaliser
    advantages = torch.randn(len(seqs), generator=g)
    loss_cfg = T.LossConfig(loss_agg=loss_agg, kl_beta=0.1)
    with T.ops.backend("reference"):
        whole, grads_whole, n_whole = _one_update(policy, ref, seqs, advantages, 4096, loss_cfg)
        split, grads_split, n_split = _one_update(policy, ref, seqs, advantages, 40, loss_cfg)
        naive, _, _ = _one_update(policy, ref, seqs, advantages, 40, loss_cfg, step_norm=False)
    assert n_whole == 1 and n_split >= 4
    assert whole.abs() > 1e-3
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads_split, grads_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert (naive - whole).abs() > 1e-3 * whole.abs()  # per-micro-batch normalisers make the loss packing-dependent


# ----------------------------------------------------------------------------------------------------------------
# shared prefixes: every GRPO forward packs a group's prompt once; the step's loss and gradients do not change


def _grpo_like(g, spec):
    """Rollout-like (ids, loss_mask) per sample and its group: a shared prompt, then sampled tokens (some not trained
    on: a closing end-of-turn, a template tail), spec = [(prompt_len, [continuation lengths])]."""
    seqs, groups = [], []
    for gid, (lp, conts) in enumerate(spec):
        prompt = torch.randint(3, 60, (lp,), generator=g).tolist()
        for n in conts:
            cont = torch.randint(3, 60, (n,), generator=g).tolist()
            seqs.append((prompt + cont, [False] * lp + (torch.rand(n, generator=g) < 0.85).tolist()))
            groups.append(gid)
    return seqs, groups


@pytest.mark.parametrize(
    "loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
@pytest.mark.parametrize("budget", [4096, 70])  # one micro-batch; groups split across micro-batches
def test_shared_prefix_step_equals_unshared(policy_and_ref, loss_agg, budget):
    """One GRPO update with old, reference log-probs and clipping, shared-prefix packing against packing every
    sample whole: the same LossNorm, loss and gradients (fp32), with fewer tokens through each forward."""
    policy, ref = policy_and_ref
    g = torch.Generator().manual_seed(1)
    spec = [(40, [12, 0, 25, 7]), (1, [9, 14, 3, 30]), (23, [18]), (31, [20, 22, 5, 16])]  # empty, 1-token, alone
    seqs, groups = _grpo_like(g, spec)
    advantages = torch.randn(len(seqs), generator=g)
    loss_cfg = T.LossConfig(loss_agg=loss_agg, kl_beta=0.1, clip_low=0.1, clip_high=0.1)
    whole_packed = T.pack_sequences(seqs, budget)
    shared_packed = T.pack_sequences(seqs, budget, groups=groups)
    assert T.step_loss_norm(shared_packed) == T.step_loss_norm(whole_packed)
    assert sum(b.num_tokens for b in shared_packed) < 0.75 * sum(b.num_tokens for b in whole_packed)
    with T.ops.backend("reference"):
        policy.model.model.layers[0].mlp.down_proj.weight.data.mul_(1.01)  # old != current: clipping comes into play
        whole, grads_whole, _ = _one_update(policy, ref, seqs, advantages, budget, loss_cfg, old=True)
        shared, grads_shared, n = _one_update(policy, ref, seqs, advantages, budget, loss_cfg, old=True, groups=groups)
    assert n > 1 if budget == 70 else n == 1
    assert whole.abs() > 1e-3
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-7)
    for (name, _), a, b in zip(policy.named_parameters(), grads_shared, grads_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def _shared_prefix_worker(rank: int, world: int, tmp: str, ckpt: str, ref_ckpt: str):
    """One rank of test_shared_prefix_two_processes: FSDP2-sharded policy, rank-specific groups whose micro-batch
    counts differ between ranks and between the two packings; full gradients of both packings saved."""
    import torch.distributed as dist

    from exgrpo_fast.model.loading import load_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        model, _ = load_model(ckpt)
        ref, _ = load_model(ref_ckpt)
        ref.requires_grad_(False)
        from exgrpo_fast.model.student import shard

        policy = shard(T.PackedPolicy(model), torch.float32, torch.device("cpu"), world)
        g = torch.Generator().manual_seed(10 + rank)
        spec = [(30, [10, 14, 0, 8]), (12, [25, 20, 19])] if rank == 0 else [(45, [6, 9, 3, 11]), (2, [7, 8])]
        seqs, groups = _grpo_like(g, spec)
        advantages = torch.randn(len(seqs), generator=g)
        loss_cfg = T.LossConfig(kl_beta=0.1)
        out = {}
        for name, grp in (("whole", None), ("shared", groups)):
            packed = T.pack_sequences(seqs, 64, groups=grp)
            counts = T.step_counts(packed, world, torch.device("cpu"))  # the global normaliser and micro-batch count
            norm, n_pad = counts.norm, counts.micro_batches - len(packed)
            batches = packed + packed[-1:] * n_pad
            live = [True] * len(packed) + [False] * n_pad
            none = [None] * len(batches)
            with torch.no_grad():
                refs = [T._logp(ref, b, 1.0) for b in batches]
                olds = [T._logp(policy, b, 1.0) for b in batches]
            with T.ops.backend("reference"):
                loss, _ = T.policy_loss_backward(
                    policy, batches, advantages, olds, refs, none, live, norm, loss_cfg, 1.0, loss_scale=float(world)
                )
            grads = {k: p.grad.full_tensor().clone() for k, p in policy.named_parameters()}
            policy.zero_grad(set_to_none=True)
            out[name] = {"loss": loss.item(), "grads": grads, "micro_batches": len(packed),
                         "tokens": sum(b.num_tokens for b in packed)}  # fmt: skip
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_shared_prefix_two_processes(tmp_path, policy_and_ref):
    """2 gloo processes, FSDP2: with ranks packing different micro-batch counts (padding micro-batches keep the
    collectives in step), the shared-prefix update's loss and gradients equal the unshared update's on each rank."""
    import time

    import torch.multiprocessing as mp

    from exgrpo_fast.model.tiny import create_tiny_checkpoint

    ckpt = create_tiny_checkpoint(tmp_path / "policy", preset="tiny", seed=7)
    ctx = mp.start_processes(_shared_prefix_worker, args=(2, str(tmp_path), str(ckpt), TEACHER), nprocs=2,
                             join=False, start_method="spawn")  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail("ranks did not finish within 240 s (deadlock?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    counts = [(o["whole"]["micro_batches"], o["shared"]["micro_batches"]) for o in out]
    assert len({c for pair in counts for c in pair}) > 1, counts  # padding micro-batches were needed
    for o in out:
        assert o["shared"]["tokens"] < o["whole"]["tokens"]
        assert abs(o["shared"]["loss"] - o["whole"]["loss"]) <= 1e-5 * abs(o["whole"]["loss"]) + 1e-7
        for k, want in o["whole"]["grads"].items():
            torch.testing.assert_close(o["shared"]["grads"][k], want, rtol=1e-4, atol=1e-7)
    # the gradient is the global one: both ranks hold the same full gradient
    for k, want in out[0]["shared"]["grads"].items():
        torch.testing.assert_close(out[1]["shared"]["grads"][k], want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("scale", ["batch", "group"])
def test_advantages_of_a_rank_are_its_slice_of_one_process_advantages(monkeypatch, scale):
    """Ranks hold whole groups, so group statistics are local; adv_scale "batch" divides by the std of the global
    batch, which a rank computing over its own samples gets wrong (a faked 2-rank world, this process rank 1)."""
    from exgrpo_fast import ops

    mine = ([1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])  # rank 1: two groups of 2 (one of equal rewards)
    other = ([5.0, -3.0, 0.5, 0.0], [0, 0, 1, 1])  # rank 0: a much wider spread
    calls = []

    def all_gather_object(parts, obj):
        calls.append(obj)
        parts[:] = [other, obj]

    monkeypatch.setattr(T.dist, "all_gather_object", all_gather_object)
    grpo = C.GRPOConfig(adv_scale=scale)
    got = T.step_advantages(*mine, grpo, 1, 2, torch.device("cpu"))
    whole = ops.group_advantages(torch.tensor(other[0] + mine[0]), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
                                 scale=scale, eps=grpo.adv_eps, nan_to_zero=True)  # fmt: skip
    torch.testing.assert_close(got, whole[4:], rtol=0, atol=0)
    assert len(calls) == (1 if scale == "batch" else 0)  # group scale needs nothing from the other ranks
    local = T.step_advantages(*mine, grpo, 0, 1, torch.device("cpu"))
    assert torch.equal(local, got) == (scale == "group")  # what a rank alone computes: wrong for "batch"
