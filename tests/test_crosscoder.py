"""Crosscoder analysis (exgrpo_fast.analysis): the planted-feature test, collect -> train -> report on tiny
checkpoints, steering with alpha = 0, and the config (TOML + flags)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from exgrpo_fast.analysis import crosscoder as cc
from exgrpo_fast.analysis.activations import KINDS, record_layers
from exgrpo_fast.analysis.xcoder import Crosscoder, fit, load_crosscoder


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from exgrpo_fast.model.tiny import create_tiny_checkpoint

    root = tmp_path_factory.mktemp("models")
    return str(create_tiny_checkpoint(root / "a", seed=0)), str(create_tiny_checkpoint(root / "b", seed=1))


# ----------------------------------------------------------------------------------------------------------------
# planted features


def test_planted_b_only_directions_are_found():
    """B = A + 3 known directions, each active on known tokens: the crosscoder finds one B-only latent per direction
    (decoder cosine > 0.9, firing exactly on those tokens) and no other exclusive latent."""
    g = torch.Generator().manual_seed(0)
    H, n_shared, n_planted, N = 24, 32, 3, 16384
    shared = torch.nn.functional.normalize(torch.randn(n_shared, H, generator=g), dim=-1)
    planted = torch.nn.functional.normalize(torch.randn(n_planted, H, generator=g), dim=-1)
    coef = (torch.rand(N, n_shared, generator=g) < 3 / n_shared) * (0.5 + 1.5 * torch.rand(N, n_shared, generator=g))
    x_a = coef @ shared + 0.02 * torch.randn(N, H, generator=g)
    known = torch.rand(N, n_planted, generator=g) < 0.08  # the inputs on which each planted direction is active
    x_b = x_a + (known * (1.0 + torch.rand(N, n_planted, generator=g))) @ planted
    x = torch.stack([x_a, x_b], 1)  # (N, S=2, H)

    tc = cc.TrainConfig(latents=96, k=4, batch_size=256, steps=600, lr=3e-3, aux_k=16, dead_tokens=8192, log_every=600)
    torch.manual_seed(0)
    model = Crosscoder(2, H, tc.latents, tc.k)
    model.scale.copy_(x.pow(2).sum(-1).mean(0).rsqrt())
    fit(model, lambda: x[torch.randint(0, N, (tc.batch_size,), generator=g)], tc)

    with torch.no_grad():
        f, x_hat = model(model.normalize(x))
    live = (f > 0).any(0)
    r = model.relative_norms(1)
    b_only = ((r > 0.9) & live).nonzero().flatten().tolist()
    a_only = ((r < 0.1) & live).nonzero().flatten().tolist()
    cos = torch.nn.functional.normalize(model.W_dec.detach()[:, 1], dim=-1) @ planted.T  # (F, n_planted)
    print(f"live {int(live.sum())} | B-only {b_only} r {r[b_only].tolist()} | A-only {a_only}")
    assert a_only == [], f"spurious A-only latents {a_only} (r {r[a_only].tolist()})"
    matched = set()
    for i in b_only:
        j = int(cos[i].argmax())
        assert cos[i, j] > 0.9, f"B-only latent {i} is not aligned with any planted direction: cos {cos[i].tolist()}"
        on = f[:, i] > 0
        precision = float((on & known[:, j]).sum() / on.sum())
        recall = float((on & known[:, j]).sum() / known[:, j].sum())
        assert precision > 0.9 and recall > 0.9, f"latent {i}: precision {precision:.3f} recall {recall:.3f}"
        matched.add(j)
    assert matched == set(range(n_planted)), f"planted directions without a B-only latent: {set(range(3)) - matched}"
    assert len(b_only) == n_planted, f"spurious B-only latents: {b_only}"
    fve = 1 - (model.normalize(x) - x_hat).pow(2).sum((0, 2)) / (model.normalize(x) - model.normalize(x).mean(0)).pow(
        2
    ).sum((0, 2))
    assert (fve > 0.8).all(), fve


def test_batch_topk_keeps_k_per_token_and_scores_by_decoder_norm():
    torch.manual_seed(0)
    model = Crosscoder(2, 8, 16, 3)
    pre = torch.rand(10, 16)
    f = model.select(pre, batch_topk=True)
    assert int((f > 0).sum()) == 30
    with torch.no_grad():
        model.W_dec[5] *= 1000  # a huge decoder norm wins the selection everywhere
    f = model.select(pre, batch_topk=True)
    assert bool((f[:, 5] > 0).all())
    # scale symmetry: trading scale between the encoder and the decoder leaves the selection unchanged
    x = torch.randn(10, 2, 8)
    before = model.select(model.preacts(x), batch_topk=True) > 0
    with torch.no_grad():
        model.W_enc[..., 7] *= 4
        model.b_enc[7] *= 4
        model.W_dec[7] /= 4
    after = model.select(model.preacts(x), batch_topk=True) > 0
    assert torch.equal(before, after)


# ----------------------------------------------------------------------------------------------------------------
# collect -> train -> report


def _read_shard(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_collect_train_report_end_to_end(tiny_pair, tmp_path, capsys):
    a, b = tiny_pair
    out = str(tmp_path / "work")
    common = ["--log.out_dir", out]
    collect = ["collect", *common, "--models.a", a, "--models.b", b, "--data.n", "10", "--data.token_budget", "1024",
               "--collect.shard_tokens", "1500", "--collect.layers", "1", "-1", "--models.label_b", "bee"]  # fmt: skip
    manifest = cc.main(collect)
    acts_dir = tmp_path / "work" / "acts"
    assert manifest["complete"] and manifest["layers"] == [1, 3] and len(manifest["shards"]) >= 2
    assert [s["model"] for s in manifest["sources"]] == ["a", "a", "b", "b"]
    assert manifest["num_tokens"] == sum(s["tokens"] for s in manifest["shards"])
    shard = _read_shard(acts_dir / manifest["shards"][0]["file"])
    n = shard["tokens"].numel()
    assert shard["acts"].shape == (n, 4, 128)
    for key in ("doc", "pos", "turn", "kind", "role"):
        assert shard[key].shape == (n,)
    kinds_seen = {KINDS[k] for s in manifest["shards"] for k in _read_shard(acts_dir / s["file"])["kind"].tolist()}
    assert "question" in kinds_seen and len(kinds_seen & {"inverse", "counterfactual", "step", "verify"}) >= 2

    # the stored activations are the unpacked model's layer outputs for that dialogue
    from exgrpo_fast.model.loading import load_model

    model_b, _ = load_model(b)
    doc = int(shard["doc"][0])
    rows = (shard["doc"] == doc).nonzero().flatten()
    ids = shard["tokens"][rows].long()
    assert shard["pos"][rows].tolist() == list(range(rows.numel()))
    with torch.no_grad(), record_layers(model_b, [1, 3]) as store:
        model_b(input_ids=ids[None], use_cache=False)
        want = torch.stack([store[1][0], store[3][0]], 1)
    got = shard["acts"][rows][:, 2:]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # resumable: a second run skips every finished shard and rewrites none
    mtimes = {p.name: p.stat().st_mtime_ns for p in acts_dir.glob("shard-*")}
    capsys.readouterr()
    cc.main(collect)
    assert f"({len(mtimes)} already done)" in capsys.readouterr().out
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in acts_dir.glob("shard-*")}
    # other settings in the same directory are refused (exit 2, one line)
    with pytest.raises(SystemExit) as e:
        cc.main([*collect, "--data.n", "11"])
    assert e.value.code == 2
    assert "other settings" in capsys.readouterr().err

    train = ["--train.steps", "40", "--train.latents", "64", "--train.k", "8", "--train.batch_size", "128"]
    summary = cc.main(["train", *common, *train, "--train.log_every", "20", "--train.dead_tokens", "2000"])
    assert set(summary["fve"]) == {"A@L1", "A@L3", "bee@L1", "bee@L3"}
    assert all(v > 0 for v in summary["fve"].values()), summary["fve"]
    assert 0 <= summary["dead_fraction"] <= 1 and summary["l0"] > 0
    xcoder, meta = load_crosscoder(tmp_path / "work" / "crosscoder" / "crosscoder.safetensors")
    assert (
        xcoder.n_sources == 4 and xcoder.n_latents == 64 and meta["manifest"]["fingerprint"] == manifest["fingerprint"]
    )
    rows = [json.loads(line) for line in (tmp_path / "work" / "crosscoder" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 40]

    result = cc.main(["report", *common, "--report.top_latents", "2", "--report.contexts", "2"])
    rep = tmp_path / "work" / "report"
    for name in ("report.md", "report.json", "relative_norm.png", "shared_cosine.png", "kinds.png"):
        assert (rep / name).is_file(), name
    counts = result["counts"]
    assert sum(counts.values()) == 64
    assert sum(result["relative_norm_hist"]) == counts["A-only"] + counts["shared"] + counts["B-only"]
    text = (rep / "report.md").read_text()
    assert "## Latents leaning most to bee (highest r): top contexts" in text and "[[" in text
    assert "Per probe kind" in text
    assert any(seg.startswith("verify") or seg.startswith("inverse") for seg in result["token_share"])


def _report_result(counts: dict, latents: dict) -> dict:
    seg = {"question:user": 0.5, "verify:asst": 0.5}
    return {
        "models": {"a": {"path": "runs/a"}, "b": {"path": "runs/b"}}, "layers": [1], "tokens_scanned": 100,
        "train": {"fve": {"sft@1": 0.9, "grpo@1": 0.9}, "l0": 8.0, "dead_fraction": 0.0}, "counts": counts,
        "exclusive": 0.1, "relative_norm_hist": [0] * 10, "shared_cosine": {"n": 0, "median": None,
        "frac_above_0.9": None}, "latents": latents, "token_share": seg, "kinds": {},
        "class_share": {c: dict.fromkeys(seg, 0.0) for c in ("A-only", "shared", "B-only")},
    }  # fmt: skip


def test_report_titles_say_what_the_sections_show_and_when_a_class_is_empty():
    """No latent is sft-only: the section on the sft side is titled by what it shows (the latents leaning most to
    sft) and says they are shared ones; an empty class reads '-' in the per-kind table, not 0.0%."""
    from exgrpo_fast.analysis.report import _markdown

    info = {"r": 0.41, "cos": 0.8, "freq": 0.1, "contexts": [{"act": 1.0, "text": "a[[b]]c"}]}
    latents = {3: {**info, "side": "A", "class": "shared"}, 5: {**info, "r": 0.95, "side": "B", "class": "B-only"},
               7: {**info, "r": 0.7, "side": "B", "class": "shared"}}  # fmt: skip
    text = _markdown(_report_result({"A-only": 0, "shared": 40, "B-only": 1, "dead": 3}, latents), "sft", "grpo",
                     ["sft@1", "grpo@1"])  # fmt: skip
    assert "Most sft-only" not in text and "## Latents leaning most to sft (lowest r): top contexts" in text
    assert "No live latent is sft-only (r < 0.1): those below are the shared latents nearest to it." in text
    assert "## Latents leaning most to grpo (highest r): top contexts" in text
    assert "1 of the 2 below is grpo-only (r > 0.9); the rest are shared." in text
    assert "Empty classes (no live latent): sft-only (r < 0.1)." in text
    assert "| question:user | 50.0% | - | 0.0% | 0.0% |" in text and "A column of '-': the class is empty." in text
    both = {3: {**info, "r": 0.02, "side": "A", "class": "A-only"}, 5: latents[5]}
    text = _markdown(_report_result({"A-only": 2, "shared": 40, "B-only": 1, "dead": 3}, both), "sft", "grpo",
                     ["sft@1", "grpo@1"])  # fmt: skip
    assert "All 1 below are sft-only (r < 0.1)." in text and "Empty classes" not in text and "| - |" not in text


# ----------------------------------------------------------------------------------------------------------------
# steering


def test_steering_alpha_zero_reproduces_unsteered_dialogues(tiny_pair):
    from exgrpo_fast.analysis.steer import steering, steering_vector
    from exgrpo_fast.data.tasks import make_problems
    from exgrpo_fast.model.loading import load_model
    from exgrpo_fast.rollout import SamplingParams, rollout_dialogues

    model, tokenizer = load_model(tiny_pair[1])
    problems = make_problems("test_id", 3, seed=0)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    xcoder = Crosscoder(4, 128, 32, 4)
    manifest = {"layers": [1, 3], "sources": [{"model": m, "layer": i} for m in ("a", "b") for i in (1, 3)]}

    def run(layer, vec):
        with steering(model, layer, vec):
            return rollout_dialogues(model, tokenizer, problems, group_size=1, params=params)

    base = run(0, None)
    layer, zero = steering_vector(xcoder, manifest, 5, "b", 0.0, layer=3)
    assert layer == 3 and not zero.any()
    steered = run(layer, zero)
    assert [r.ids for r in steered] == [r.ids for r in base]
    assert [r.responses for r in steered] == [r.responses for r in base]
    # the hook is live: a large alpha changes what is sampled, and it is removed afterwards
    _, big = steering_vector(xcoder, manifest, 5, "b", 20.0, layer=3)
    assert [r.ids for r in run(3, big)] != [r.ids for r in base]
    assert [r.ids for r in run(0, None)] == [r.ids for r in base]
    with pytest.raises(ValueError, match="steer.layer=2"):
        steering_vector(xcoder, manifest, 5, "b", 1.0, layer=2)


# ----------------------------------------------------------------------------------------------------------------
# config


def test_config_toml_then_flags(tmp_path):
    f = tmp_path / "cc.toml"
    f.write_text('[log]\nout_dir = "somewhere"\n[train]\nk = 4\nlatents = 64\nlr = 1\n[collect]\nlayers = [1, -1]\n')
    cfg = cc.parse(["train", "--config", str(f), "--train.k", "8"])
    assert isinstance(cfg, cc.Train)
    assert (cfg.train.k, cfg.train.latents, cfg.train.lr, cfg.log.out_dir) == (8, 64, 1.0, "somewhere")
    cfg = cc.parse(["collect", "--config", str(f), "--log.out_dir", "elsewhere"])
    assert cfg.collect.layers == (1, -1) and cfg.log.out_dir == "elsewhere"


@pytest.mark.parametrize(
    "toml, argv, message",
    [
        ("[train]\nkk = 3\n", [], "unknown key 'kk' in [train]"),
        ("[nope]\nk = 3\n", [], "unknown section [nope]"),
        ("[train]\nk = 'x'\n", [], "[train] k='x': expected int"),
        ("", ["--train.k", "5000"], "train.k=5000: expected <= train.latents"),
    ],
)
def test_config_errors_exit_2_with_one_line(tmp_path, capsys, toml, argv, message):
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(SystemExit) as e:
        cc.main(["train", "--config", str(f), "--log.out_dir", str(tmp_path), *argv])
    assert e.value.code == 2
    err = " ".join(capsys.readouterr().err.split())  # tyro boxes and wraps its messages
    assert message in err, err


def test_a_second_command_on_the_same_out_dir_is_refused(tmp_path, capsys):
    from exgrpo_fast.rundir import RunLock

    with RunLock(tmp_path):
        with pytest.raises(SystemExit) as e:
            cc.main(["report", "--log.out_dir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: crosscoder dir {tmp_path} is in use by another process (pid")
