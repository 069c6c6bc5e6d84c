"""The student as training holds it (exgrpo_fast.model.student): float32 masters under a bf16 compute dtype that
actually learn at RL learning rates, FSDP2 on a mesh of one, N ranks = one process, activation checkpointing with
identical gradients, LoRA through peft, hooks that do not pile up, the FLOP count behind MFU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from exgrpo_fast import config as C
from exgrpo_fast import ops
from exgrpo_fast import train as T
from exgrpo_fast.data.dialogue import encode_dialogue
from exgrpo_fast.data.packing import pack_sequences
from exgrpo_fast.data.tasks import make_problems, sft_dialogue
from exgrpo_fast.errors import ConfigError
from exgrpo_fast.model import student as S
from exgrpo_fast.model.flops import FlopShape, forward_flops, peak_flops
from exgrpo_fast.model.tiny import create_tiny_checkpoint

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return create_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m", seed=3)


@pytest.fixture
def one_process_group():
    """A one-process gloo group (what the trainer makes for a sharded student), torn down after the test."""
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if owned:
        dist.destroy_process_group()


def model_cfg(**fields) -> C.ModelConfig:
    m = C.ModelConfig()
    for k, v in fields.items():
        setattr(m, k, v)
    return m


def batch(tokenizer, n=6, budget=4096):
    seqs = [encode_dialogue(tokenizer, sft_dialogue(p)) for p in make_problems("train", n, seed=1)]
    return pack_sequences(seqs, budget)


def sft_backward(student, batches) -> float:
    """One SFT step's forward and backward through the trainer's micro-batch protocol; returns the loss."""
    total = sum(b.num_loss_tokens for b in batches)
    loss_sum = 0.0
    with ops.backend("reference"):
        for i, b in enumerate(batches):
            student.micro_batch(last=i == len(batches) - 1)
            hidden, weight, bias = student.policy(b)
            loss = -ops.token_logprobs_linear(hidden, weight, b.loss_labels, bias=bias).sum() / total
            (loss * student.loss_scale).backward()
            loss_sum += loss.item()
    return loss_sum


def sft_grads(student, batches) -> tuple[float, dict[str, torch.Tensor]]:
    """One SFT step's loss and full float32 gradients (then zeroed)."""
    from torch.distributed.tensor import DTensor

    loss = sft_backward(student, batches)
    out = {}
    for n, p in student.model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            out[n] = g.float().clone()
    student.model.zero_grad(set_to_none=True)
    return loss, out


# ----------------------------------------------------------------------------------------------------------------
# mixed precision


def _fixed_batch_losses(student, batches, steps: int, lr: float) -> list[float]:
    """SFT steps on one fixed batch through the trainer's optimizer step (AdamW, no warm-up): the loss before each."""
    optimizer, _ = T.make_optimizer(student.model, C.preset_test(), lr, 0, steps)
    update = T.OptimizerStep(student, optimizer, grad_clip=0.0)
    losses = []
    for _ in range(steps):
        loss = sft_backward(student, batches)
        losses.append(loss)
        update(torch.tensor(loss))
    return losses


def test_bf16_with_fp32_masters_learns_like_fp32(tiny, one_process_group):
    """At lr 5e-6 (an RL learning rate) a bf16 student lowers the loss about as much as a float32 one. Pure bf16
    weights under AdamW (what the trainer had before) round nearly every such update away."""
    from exgrpo_fast.model.loading import load_model

    cpu, steps, lr = torch.device("cpu"), 6, 5e-6
    fp32 = S.load_student(tiny, model_cfg(), cpu, 1)
    batches = batch(fp32.tokenizer, n=4)
    drop32 = -torch.diff(torch.tensor(_fixed_batch_losses(fp32, batches, steps, lr))).sum().item()
    masters = S.load_student(tiny, model_cfg(dtype="bfloat16"), cpu, 1)
    drop_masters = -torch.diff(torch.tensor(_fixed_batch_losses(masters, batches, steps, lr))).sum().item()
    model, tok = load_model(tiny, dtype=torch.bfloat16)  # the old way: bf16 parameters in the optimizer
    pure = S.Student(model, S.PackedPolicy(model), model, tok, torch.bfloat16, 1, False, False)
    drop_pure = -torch.diff(torch.tensor(_fixed_batch_losses(pure, batches, steps, lr))).sum().item()
    assert drop32 > 1e-3, drop32
    assert drop_masters > 0.7 * drop32, (drop_masters, drop32)
    assert drop_pure < 0.3 * drop32, (drop_pure, drop32)


def test_bf16_run_checkpoints_float32_masters(tmp_path):
    """5 SFT steps at lr 1e-6 in bf16: the masters move (in pure bf16, 99.2% of the weights stayed bit-identical);
    the checkpoint's HF export is bf16 and equals the masters rounded once."""
    cfg = C.preset_test()
    cfg.model.dtype = "bfloat16"
    cfg.sft.steps, cfg.sft.batch_size, cfg.sft.lr, cfg.sft.warmup_steps = 5, 2, 1e-6, 0
    cfg.grpo.steps, cfg.log.eval_start, cfg.log.eval_n, cfg.log.keep_last = 0, False, 1, 1
    T.train(cfg.validate(), run_dir=str(tmp_path / "run"))
    init = load_file(str(tmp_path / "run" / "init_model" / "model.safetensors"))
    ckpt = tmp_path / "run" / "checkpoints" / "sft-000005"
    export, masters = load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / S.MASTER_FILE))
    name = "model.layers.1.mlp.down_proj.weight"
    assert (masters[name] != init[name].float()).float().mean().item() > 0.9
    assert {t.dtype for t in export.values()} == {torch.bfloat16}
    assert {t.dtype for t in masters.values()} == {torch.float32}
    assert all(torch.equal(export[k], masters[k].to(torch.bfloat16)) for k in masters if k in export)


def test_fp16_training_is_refused():
    cfg = C.preset_test()
    cfg.model.dtype = "float16"
    with pytest.raises(ConfigError, match="model.dtype.*loss scaler"):
        cfg.validate()
    cfg.sft.steps = cfg.grpo.steps = 0  # eval-only configs may use fp16
    cfg.validate()


def test_sharded_float32_student_has_the_unsharded_gradients(tiny, one_process_group):
    """FSDP2 on a mesh of one changes nothing in float32; in bf16 the gradients are the float32 ones to bf16
    round-off, and they arrive as float32 on float32 master DTensors."""
    plain = S.load_student(tiny, model_cfg(), torch.device("cpu"), 1)
    batches = batch(plain.tokenizer, budget=400)
    assert len(batches) > 1
    loss0, g0 = sft_grads(plain, batches)
    sharded = S.load_student(tiny, model_cfg(), torch.device("cpu"), 1)
    S.shard(sharded.policy, torch.float32, torch.device("cpu"), 1)
    sharded.sharded = True
    loss1, g1 = sft_grads(sharded, batches)
    assert loss0 == pytest.approx(loss1, rel=1e-6)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7)
    half = S.load_student(tiny, model_cfg(dtype="bfloat16"), torch.device("cpu"), 1)
    assert half.sharded and half.sampler is not half.model
    assert all(p.dtype == torch.float32 for p in half.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in half.sampler.parameters())
    loss2, g2 = sft_grads(half, batches)
    assert loss2 == pytest.approx(loss0, rel=1e-2)
    for k in g0:
        assert g2[k].dtype == torch.float32
        assert (g2[k] - g0[k]).norm() <= 0.05 * g0[k].norm() + 1e-6, k


def test_no_grad_forward_does_not_leave_the_root_gathered(tiny, one_process_group):
    """A no-grad forward through the FSDP2 root (reshard_after_forward=False) left it gathered: an optimizer built
    then got the root's temporary copies and the embeddings / LM head stopped learning. release_root reshards it;
    make_optimizer refuses a gathered root."""
    student = S.load_student(tiny, model_cfg(dtype="bfloat16"), torch.device("cpu"), 1)
    b = batch(student.tokenizer)[0]
    with torch.no_grad():
        student.policy(b)
    cfg = C.preset_test()
    with pytest.raises(RuntimeError, match="gathered"):
        T.make_optimizer(student.model, cfg, 1e-3, 0, 1)
    T.release_root(student.policy)
    optimizer, _ = T.make_optimizer(student.model, cfg, 1e-3, 0, 1)
    emb = student.model.get_input_embeddings().weight
    before = emb.full_tensor().clone()
    with ops.backend("reference"):
        student.micro_batch(last=True)
        hidden, weight, bias = student.policy(b)
        (-ops.token_logprobs_linear(hidden, weight, b.loss_labels).sum()).backward()
    optimizer.step()
    assert not torch.equal(student.model.get_input_embeddings().weight.full_tensor(), before)


def _bf16_student_after_a_backward(tiny, lr: float):
    """A bf16 student with float32 masters, its optimizer, and the gradients of one micro-batch."""
    student = S.load_student(tiny, model_cfg(dtype="bfloat16"), torch.device("cpu"), 1)
    optimizer, _ = T.make_optimizer(student.model, C.preset_test(), lr, 0, 1)
    with ops.backend("reference"):
        b = batch(student.tokenizer)[0]
        student.micro_batch(last=True)
        hidden, weight, bias = student.policy(b)
        (-ops.token_logprobs_linear(hidden, weight, b.loss_labels).sum()).backward()
    return student, optimizer


def test_sampler_copy_follows_the_masters(tiny, one_process_group):
    student, optimizer = _bf16_student_after_a_backward(tiny, 1e-2)
    ptrs = [p.data_ptr() for p in student.sampler.parameters()]
    update = T.OptimizerStep(student, optimizer, grad_clip=1.0)
    update(torch.zeros(()))
    masters = S.full_parameters(student.model)
    for n, p in student.sampler.named_parameters():
        assert torch.equal(p, masters[n].to(torch.bfloat16)), n
    assert ptrs == [p.data_ptr() for p in student.sampler.parameters()]  # refreshed in place: graphs stay valid


def test_sharded_student_reaches_the_device_one_layer_at_a_time(tiny, one_process_group, monkeypatch):
    """A sharded student's float32 weights load on the host (load_model keep_on_host) and FSDP2's fully_shard moves
    them to the device as it shards: one decoder layer per call, then the root's rest, never the whole model (a 7B
    student would put 28 GiB on every GPU first); the sampler's copy loads after the host copy is gone. On a CPU the
    move itself is a no-op, so this checks the calls that make it on a GPU."""
    from torch.distributed.fsdp._fully_shard import _fsdp_init

    events = []
    move, load = _fsdp_init._move_states_to_device, S.load_model

    def recording_move(params, buffers, device):
        events.append(("move", sum(p.numel() * p.element_size() for p in params)))
        return move(params, buffers, device)

    def recording_load(*args, keep_on_host=False, **kwargs):
        events.append(("load", kwargs["dtype"], keep_on_host))
        return load(*args, keep_on_host=keep_on_host, **kwargs)

    monkeypatch.setattr(_fsdp_init, "_move_states_to_device", recording_move)
    monkeypatch.setattr(S, "load_model", recording_load)
    student = S.load_student(tiny, model_cfg(dtype="bfloat16"), torch.device("cpu"), 1)
    assert events[0] == ("load", torch.float32, True) and events[-1] == ("load", torch.bfloat16, False)
    layers = S.decoder_layers(student.sampler)
    layer_bytes = 4 * sum(p.numel() for p in layers[0].parameters())
    total = 4 * sum(p.numel() for p in student.sampler.parameters())
    assert events[1:-1] == [("move", layer_bytes)] * len(layers) + [("move", total - len(layers) * layer_bytes)]


def test_only_the_writing_rank_keeps_the_gathered_checkpoint(tiny, one_process_group, monkeypatch):
    """A save gathers the float32 masters and AdamW's states on every rank (collectives), but only rank 0, which
    writes, keeps them in host memory: 8 ranks of a 7B student would otherwise each hold 28 + 61 GB."""
    from exgrpo_fast import checkpoint as ckpt_lib

    student, optimizer = _bf16_student_after_a_backward(tiny, 1e-3)
    T.OptimizerStep(student, optimizer, grad_clip=1.0)(torch.zeros(()))
    _, _, files = student.export()
    _, osd = ckpt_lib._full_state(student.model, optimizer)
    n = sum(1 for _ in student.model.parameters())
    assert len(files[S.MASTER_FILE]) == n and len(osd["state"]) == n  # rank 0: everything, full tensors
    monkeypatch.setattr(ckpt_lib, "_rank", lambda: 1)  # what rank 1 of a sharded run sees
    _, _, files = student.export()
    assert files[S.MASTER_FILE] == {} and ckpt_lib._full_state(student.model, optimizer)[1] is None


# ----------------------------------------------------------------------------------------------------------------
# one normaliser across ranks


@pytest.mark.slow
def test_two_gloo_ranks_give_one_process_gradients(tiny, tmp_path):
    """tests/dist_step.py: one SFT step and one off-policy GRPO update on the same global batch, packed into
    different micro-batch counts per rank. Two ranks = one process: loss, every gradient, the stats (token-weighted
    means, the max of maxima)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    script = str(ROOT / "tests" / "dist_step.py")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    runs = (
        [sys.executable, script, str(tiny), str(one), "float32"],
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537", script,
         str(tiny), str(two), "float32"],
    )  # fmt: skip
    for cmd in runs:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    a, b = torch.load(one), torch.load(two)
    assert a["sft_loss"] == pytest.approx(b["sft_loss"], rel=1e-6)
    for key in ("sft_grads", "grpo_grads"):
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=1e-4, atol=1e-7)
    assert a["grpo"]["clip_frac_low"] + a["grpo"]["clip_frac_high"] > 0  # the update is off-policy: clipping acts
    for k, v in a["grpo"].items():
        assert b["grpo"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


def test_reduce_metrics_by_meaning(monkeypatch):
    """Sums for shares of global values, max for maxima and wall times, the rest untouched (a fake 2-rank world:
    each all-reduce combines this rank's values with a second rank's)."""
    other = {"loss": 0.5, "tokens": 30.0, "ratio_max": 3.0, "step_s": 0.2, "reward": 9.0}
    mine = {"loss": 0.25, "tokens": 10.0, "ratio_max": 2.0, "step_s": 0.7, "reward": 0.4}

    def all_reduce(t, op=dist.ReduceOp.SUM):
        keys = [k for k in (T.SUM_METRICS if op == dist.ReduceOp.SUM else T.MAX_METRICS) if k in mine]
        theirs = torch.tensor([other[k] for k in keys], dtype=t.dtype)
        t.copy_(t + theirs if op == dist.ReduceOp.SUM else torch.maximum(t, theirs))

    monkeypatch.setattr(T.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(T.dist, "get_backend", lambda: "gloo")
    out = T.reduce_metrics(mine, 2, torch.device("cpu"))
    assert out == {"loss": 0.75, "tokens": 40.0, "ratio_max": 3.0, "step_s": 0.7, "reward": 0.4}


# ----------------------------------------------------------------------------------------------------------------
# activation checkpointing


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_checkpointing_gives_identical_gradients(tiny, dtype, one_process_group):
    """Per-layer recomputation: the same gradients bit for bit (also through FSDP2 in bf16 and the LM-head loss),
    and each decoder layer really runs twice per training step (forward, then recompute in the backward)."""
    results = []
    for ac in (False, True):
        student = S.load_student(tiny, model_cfg(dtype=dtype, activation_checkpointing=ac), torch.device("cpu"), 1)
        student.model.train()
        calls: list[int] = []  # a module inside the layer: its hooks fire again when the layer is recomputed
        S.decoder_layers(student.model)[0].mlp.register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        batches = batch(student.tokenizer, budget=400)
        results.append(sft_grads(student, batches))
        assert len(calls) == len(batches) * (2 if ac else 1)
    (l0, g0), (l1, g1) = results
    assert l0 == l1
    assert all(torch.equal(g0[k], g1[k]) for k in g0)


# ----------------------------------------------------------------------------------------------------------------
# FSDP2 hooks


def test_backward_hooks_do_not_pile_up_on_the_lm_head(tiny, one_process_group):
    """The FSDP2 root registers a pre-backward hook on every tensor its forward returns. PackedPolicy's forward
    returns the hidden states only (a fresh tensor each step), so no persistent tensor collects hooks; returning the
    LM-head Parameter (as before) added one per step."""
    student = S.load_student(tiny, model_cfg(dtype="bfloat16"), torch.device("cpu"), 1)
    b = batch(student.tokenizer)[0]

    def hook_counts():
        state = student.policy._get_fsdp_state()
        return [len(fp._unsharded_param._backward_hooks or {}) for fp in state._fsdp_param_group.fsdp_params]

    counts = []
    for _ in range(4):
        student.micro_batch(last=True)
        with ops.backend("reference"):
            hidden, weight, bias = student.policy(b)
            (-ops.token_logprobs_linear(hidden, weight, b.loss_labels).sum()).backward()
        student.model.zero_grad(set_to_none=True)
        counts.append(hook_counts())
    assert counts[0] == counts[-1], counts

    class Leaky(S.PackedPolicy):  # the old contract: the weight Parameter is a forward output
        def forward(self, b):
            return super().forward(b), self.model.get_output_embeddings().weight

        def __call__(self, b):
            return torch.nn.Module.__call__(self, b)

    old = S.load_student(tiny, model_cfg(), torch.device("cpu"), 1)
    leaky = Leaky(old.model)
    S.shard(leaky, torch.bfloat16, torch.device("cpu"), 1)
    seen = []
    for _ in range(3):
        with ops.backend("reference"):
            hidden, weight = leaky(b)
            (-ops.token_logprobs_linear(hidden, weight, b.loss_labels).sum()).backward()
        state = leaky._get_fsdp_state()
        seen.append(sum(len(fp._unsharded_param._backward_hooks or {}) for fp in state._fsdp_param_group.fsdp_params))
    assert seen[-1] > seen[0], seen  # the test would catch the old behaviour


# ----------------------------------------------------------------------------------------------------------------
# LoRA


def test_lora_trains_adapters_only_and_its_reference_is_the_base(tiny):
    pytest.importorskip("peft")
    from exgrpo_fast.model.loading import load_model

    student = S.load_student(tiny, model_cfg(lora_rank=4, lora_alpha=8.0), torch.device("cpu"), 1)
    assert student.lora and student.sampler is student.model and not student.sharded
    trainable = {n for n, p in student.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {p.dtype for n, p in student.model.named_parameters() if p.requires_grad} == {torch.float32}
    base, _ = load_model(tiny)
    b = batch(student.tokenizer)[0]
    with torch.no_grad(), ops.backend("reference"):
        for p in student.model.parameters():  # make the adapters non-trivial (B starts at 0)
            if p.requires_grad:
                p.normal_(0, 0.05)
        ref = T._logp(base, b, 1.0)
        with student.reference():
            ref_lora = T._logp(student.policy, b, 1.0)
        live = T._logp(student.policy, b, 1.0)
    torch.testing.assert_close(ref_lora, ref, rtol=0, atol=0)
    assert (live - ref).abs().max() > 1e-3
    _, grads = sft_grads(student, [b])
    assert set(grads) == trainable
    # the export merges the adapters: the plain HF model from it gives the LoRA model's log-probs
    export, state, files = student.export()
    assert set(files) == {S.ADAPTER_FILE} and set(files[S.ADAPTER_FILE]) == trainable
    merged, _ = load_model(tiny)
    merged.load_state_dict(state, strict=True)
    with torch.no_grad(), ops.backend("reference"):
        torch.testing.assert_close(T._logp(merged, b, 1.0), live, rtol=1e-5, atol=1e-5)


def test_lora_run_resumes_exactly_and_grpo_refers_to_the_sft_export(tmp_path):
    pytest.importorskip("peft")
    cfg = C.preset_test()
    cfg.model.lora_rank, cfg.sft.lr, cfg.grpo.lr, cfg.loss.kl_beta = 4, 1e-2, 1e-2, 0.05
    cfg.validate()
    straight = T.train(cfg, run_dir=str(tmp_path / "straight"))
    T.train(cfg, run_dir=str(tmp_path / "cut"), stop_after=4)  # 3 SFT steps, 1 GRPO step
    resumed = T.train(cfg, resume=str(tmp_path / "cut"))
    a = load_file(str(Path(straight["final_ckpt"]) / S.ADAPTER_FILE))
    b = load_file(str(Path(resumed["final_ckpt"]) / S.ADAPTER_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(Path(straight["final_ckpt"]) / "trainer_state.pt", weights_only=False)
    assert state["extra"]["lora_base"] == state["extra"]["ref_path"]
    assert Path(state["extra"]["ref_path"]).name == "sft-000003"
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    grpo = [r for r in rows if r["stage"] == "grpo"]
    # GRPO starts with fresh adapters on the SFT export, which is also the reference: KL 0 at its first step (a
    # reference at the pre-SFT base would be far from it after 3 SFT steps at lr 1e-2)
    assert grpo[0]["kl_ref"] == pytest.approx(0.0, abs=1e-7)
    sft = [r for r in rows if r["stage"] == "sft"]
    assert sft[-1]["loss"] < sft[0]["loss"] - 0.05


def test_lora_config_checks():
    cfg = C.preset_test()
    cfg.model.lora_rank, cfg.model.lora_targets = 4, ("q_proj", "lm_head")
    with pytest.raises(ConfigError, match="lora_targets"):
        cfg.validate()


# ----------------------------------------------------------------------------------------------------------------
# device and FLOPs


def test_single_process_on_cuda_n_makes_it_current(monkeypatch):
    """Triton launches and CUDA graph capture use the current device: a one-process run on cuda:1 must set it."""
    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append(torch.device(d)))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = C.preset_test()
    cfg.model.device = "cuda:1"
    with T.distributed(cfg) as (rank, world, device):
        assert (rank, world, device) == (0, 1, torch.device("cuda", 1))
    assert seen == [torch.device("cuda", 1)]


def test_flops_match_a_hand_count(tiny):
    from exgrpo_fast.model.loading import load_model

    model, _ = load_model(tiny)
    c = model.config
    H, inter, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = c.num_key_value_heads * (H // c.num_attention_heads)
    body = L * (H * H + 2 * H * kv + H * H + 3 * H * inter)  # q, k, v, o, gate, up, down
    shape = FlopShape.of(model)
    assert shape == FlopShape(body, V * H, L, H)
    lens, loss_rows = [7, 12, 3], 9
    want = 2 * body * 22 + 4 * L * H * (49 + 144 + 9) + 2 * V * H * loss_rows
    assert forward_flops(shape, lens, loss_rows) == want
    # a shared prompt of 5 and two continuations of 3 and 4 tokens attending to it: 5x5 + 3x8 + 4x9 attention pairs
    assert forward_flops(shape, [5, 3, 4], 6, [5, 8, 9]) == 2 * body * 12 + 4 * L * H * (25 + 24 + 36) + 2 * V * H * 6
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756.0e12
    assert peak_flops("NVIDIA H100 NVL", torch.bfloat16) == 835.0e12  # not the SXM part's 989 TF
    assert peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) == 19.5e12
    assert peak_flops("Some GPU", torch.bfloat16) is None


def test_sft_padding_micro_batches_add_no_loss_no_gradient_and_no_flops(tiny):
    """A rank with fewer micro-batches than another runs padding copies of its last with weight 0 (FSDP's
    collectives pair up): the step's loss, gradients and the FLOPs that MFU counts are those of its live ones."""
    student = S.load_student(tiny, model_cfg(), torch.device("cpu"), 1)
    batches = batch(student.tokenizer, n=4, budget=400)
    total = float(sum(b.num_loss_tokens for b in batches))
    head = {"chunk_size": None, "fp32_logits": True}
    want = 3 * sum(forward_flops(student.flop_shape, b.seq_lens, b.num_loss_tokens, b.seq_lens_k) for b in batches)
    out = []
    with ops.backend("reference"):
        for n in (len(batches), len(batches) + 2):
            loss, flops = T.sft_backward(student, batches, n, total, torch.device("cpu"), head)
            grads = {k: p.grad.clone() for k, p in student.model.named_parameters() if p.grad is not None}
            student.model.zero_grad(set_to_none=True)
            out.append((loss, flops, grads))
    (loss, flops, grads), (loss_p, flops_p, grads_p) = out
    assert len(batches) > 1 and flops == want and flops_p == want
    assert torch.equal(loss_p, loss)
    for k in grads:
        torch.testing.assert_close(grads_p[k], grads[k], rtol=0, atol=0)
