"""collect: residual-stream activations of two checkpoints on one token stream, as sharded safetensors.

The token stream is the teacher's Explanatory-Inversion dialogues (exgrpo_fast.data.tasks.sft_dialogue) of the
built-in task or of a user problems file, packed into padding-free forwards (exgrpo_fast.data.packing). The
residual stream at layer l is the output of decoder block l (a forward hook on it), the same place steering adds
its direction. Both models read exactly the same packed batches.

Layout under <out_dir>/acts/:

    manifest.json        models, layers, sources, d_model, kinds, the collect fingerprint, shards (tokens, done)
    shard-00000.safetensors
        acts    [N, S, H]  S = 2 x len(layers) sources: model A's layers, then model B's (storage dtype)
        tokens  [N] int32  token id
        doc     [N] int32  dialogue index in the stream
        pos     [N] int32  position in the dialogue
        turn    [N] int16  turn index (user 0, assistant 1, user 2, ...)
        kind    [N] int8   exchange kind: index into manifest["kinds"] ("question", then the probe kinds)
        role    [N] int8   1 on tokens the assistant writes (the loss mask), 0 on user / template tokens

A shard is a run of whole packed batches of about collect.shard_tokens tokens; its file is written to a temporary
name and renamed, so a file that exists is complete. Re-running collect with the same settings skips finished shards;
different settings in the same directory are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from exgrpo_fast.data.dialogue import encode_dialogue
from exgrpo_fast.data.packing import PackedBatch, pack_sequences
from exgrpo_fast.data.problem import dialogue_probes
from exgrpo_fast.data.tasks import PROBE_KINDS

KINDS = ("question",) + PROBE_KINDS
LABELS = ("tokens", "doc", "pos", "turn", "kind", "role")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------------------
# helpers shared by the subcommands


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Write to a temporary name, fsync, rename: a reader sees the old file or the complete new one."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a transformers causal LM (model.model.layers for Llama-style models)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, model.base_model_prefix)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: cannot find its decoder layers (expected .model.layers)")
    return layers


def resolve_layers(requested: tuple[int, ...], num_layers: int) -> list[int]:
    """0-based layer indices; negative ones count from the end; () = the middle layer."""
    if not requested:
        return [num_layers // 2]
    out = []
    for layer in requested:
        idx = layer + num_layers if layer < 0 else layer
        if not 0 <= idx < num_layers:
            raise ValueError(f"collect.layers: layer {layer} is out of range for a model with {num_layers} layers")
        if idx in out:
            raise ValueError(f"collect.layers: layer {layer} is listed twice")
        out.append(idx)
    return out


@contextlib.contextmanager
def record_layers(model, layers: list[int]):
    """Forward hooks that store the output of each decoder block in `layers`; yields the dict layer -> tensor."""
    blocks = decoder_layers(model)
    store: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:

        def hook(_module, _inputs, output, layer=layer):
            store[layer] = (output[0] if isinstance(output, tuple) else output).detach()

        handles.append(blocks[layer].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------------------------
# the token stream


def _probe_kinds(problem) -> list[str]:
    """Kinds of a problem's probes in dialogue order (data.problem.dialogue_probes, the order sft_dialogue asks
    them in), for a Problem or a problem row."""
    return [p.kind for _, p in dialogue_probes(problem)]


def dialogue_labels(tokenizer, turns: list[dict], kinds: list[str]) -> dict[str, list[int]]:
    """Token ids of a dialogue and per-token labels: turn index, exchange kind index (into KINDS), role (1 on the
    assistant's tokens). kinds[e] names exchange e (turns 2e and 2e + 1)."""
    ids, mask = encode_dialogue(tokenizer, turns)
    turn = [0] * len(ids)
    start = 0
    for j in range(1, len(turns) + 1):
        end = len(encode_dialogue(tokenizer, turns[:j])[0]) if j < len(turns) else len(ids)
        if end < start or end > len(ids):
            raise ValueError("the chat template does not render a dialogue as an extension of its first turns")
        for t in range(start, end):
            turn[t] = j - 1
        start = end
    for j in range(len(turns)):
        if turns[j]["role"] != ("user" if j % 2 == 0 else "assistant"):
            raise ValueError(f"dialogue turn {j} has role {turns[j]['role']!r}: expected user/assistant alternation")
    kind_ids = []
    for t in turn:
        name = kinds[t // 2] if t // 2 < len(kinds) else "question"
        if name not in KINDS:
            raise ValueError(f"probe kind {name!r}: expected one of {KINDS}")
        kind_ids.append(KINDS.index(name))
    return {"tokens": list(map(int, ids)), "turn": turn, "kind": kind_ids, "role": [int(m) for m in mask]}


def build_stream(tokenizer, cfg) -> list[dict[str, list[int]]]:
    """Per-dialogue token ids and labels of the configured stream (cfg is a DataConfig)."""
    from exgrpo_fast.data.tasks import make_problems, sft_dialogue

    if cfg.path:
        from exgrpo_fast.data.sources import load_problems

        problems = list(load_problems(cfg.path))[: cfg.n]
    else:
        problems = make_problems(cfg.split, cfg.n, seed=cfg.seed)
    stream = []
    for doc, problem in enumerate(problems):
        labels = dialogue_labels(tokenizer, sft_dialogue(problem), ["question"] + _probe_kinds(problem))
        labels["doc"] = [doc] * len(labels["tokens"])
        labels["pos"] = list(range(len(labels["tokens"])))
        stream.append(labels)
    return stream


def plan_shards(batches: list[PackedBatch], shard_tokens: int) -> list[list[int]]:
    """Consecutive runs of whole batches holding >= shard_tokens tokens each (the last may hold fewer)."""
    shards, current, n = [], [], 0
    for i, b in enumerate(batches):
        current.append(i)
        n += b.num_tokens
        if n >= shard_tokens:
            shards.append(current)
            current, n = [], 0
    if current:
        shards.append(current)
    return shards


# ----------------------------------------------------------------------------------------------------------------
# collect


@torch.no_grad()
def _activations(model, batches: list[PackedBatch], layers: list[int], device: torch.device) -> torch.Tensor:
    """[N, L, H] fp32 outputs of `layers` over the batches' tokens, in batch order."""
    from exgrpo_fast.model.forward import packed_hidden_states

    out = []
    with record_layers(model, layers) as store:
        for b in batches:
            packed_hidden_states(model, b.to(device))
            out.append(torch.stack([store[i][0] for i in layers], dim=1)[: b.num_tokens].float().cpu())  # (T, L, H)
    return torch.cat(out)


def _fingerprint(cfg, layers: list[int]) -> str:
    key = {
        "a": str(Path(cfg.models.a).resolve()), "b": str(Path(cfg.models.b).resolve()), "layers": layers,
        "data": {k: getattr(cfg.data, k) for k in ("path", "split", "n", "seed", "token_budget")},
        "shard_tokens": cfg.collect.shard_tokens, "dtype": cfg.collect.dtype, "model_dtype": cfg.models.dtype,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _check_models(cfg) -> None:
    for name in ("a", "b"):
        path = getattr(cfg.models, name)
        if not path:
            raise ValueError(f"models.{name} is empty: give the checkpoint directory of model {name.upper()}")
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"models.{name}={path}: not a checkpoint directory (no config.json)")


def collect(cfg) -> dict:
    """Run the collect subcommand (cfg: crosscoder.Collect); returns the manifest."""
    from exgrpo_fast.model.loading import load_model

    _check_models(cfg)
    device = resolve_device(cfg.models.device)
    dtype = getattr(torch, cfg.models.dtype)
    out = Path(cfg.log.out_dir) / "acts"
    model_a, tok_a = load_model(cfg.models.a, dtype=dtype, device=device, attn_backend=cfg.models.attn_backend)
    model_b, tok_b = load_model(cfg.models.b, dtype=dtype, device=device, attn_backend=cfg.models.attn_backend)
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise ValueError("models.a and models.b have different tokenizers: a crosscoder needs one token stream")
    n_a, n_b = model_a.config.num_hidden_layers, model_b.config.num_hidden_layers
    h_a, h_b = model_a.config.hidden_size, model_b.config.hidden_size
    if (n_a, h_a) != (n_b, h_b):
        raise ValueError(f"models.a has {n_a} layers of width {h_a}, models.b {n_b} of {h_b}: they must match")
    layers = resolve_layers(cfg.collect.layers, n_a)
    fingerprint = _fingerprint(cfg, layers)

    stream = build_stream(tok_a, cfg.data)
    batches = pack_sequences([(d["tokens"], [False] * len(d["tokens"])) for d in stream], cfg.data.token_budget)
    plan = plan_shards(batches, cfg.collect.shard_tokens)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{out} holds activations collected with other settings (models, layers, data or shard size); "
                "choose another --log.out_dir or delete it"
            )
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "version": 1,
        "fingerprint": fingerprint,
        "models": {"a": {"path": cfg.models.a, "label": cfg.models.label_a},
                   "b": {"path": cfg.models.b, "label": cfg.models.label_b}},
        "layers": layers,
        "sources": [{"model": m, "layer": i} for m in ("a", "b") for i in layers],
        "d_model": h_a,
        "dtype": cfg.collect.dtype,
        "kinds": list(KINDS),
        "data": dataclasses.asdict(cfg.data),
        "num_docs": len(stream),
        "num_tokens": sum(len(d["tokens"]) for d in stream),
        "shards": [],
    }  # fmt: skip
    t0, skipped = time.perf_counter(), 0
    for s, members in enumerate(plan):
        name = f"shard-{s:05d}.safetensors"
        tokens = sum(batches[i].num_tokens for i in members)
        docs = sum(len(batches[i].seq_lens) for i in members)
        entry = {"file": name, "tokens": tokens, "docs": docs}
        if (out / name).is_file():
            manifest["shards"].append(entry)
            skipped += 1
            continue
        shard_batches = [batches[i] for i in members]
        acts_a = _activations(model_a, shard_batches, layers, device)
        acts_b = _activations(model_b, shard_batches, layers, device)
        acts = torch.cat([acts_a, acts_b], dim=1).to(_DTYPES[cfg.collect.dtype])  # (N, 2L, H)
        order = [int(i) for b in shard_batches for i in b.sample_index.tolist()]
        tensors = {"acts": acts}
        dtypes = {"tokens": torch.int32, "doc": torch.int32, "pos": torch.int32, "turn": torch.int16,
                  "kind": torch.int8, "role": torch.int8}  # fmt: skip
        for key, dt in dtypes.items():
            tensors[key] = torch.tensor([v for i in order for v in stream[i][key]], dtype=dt)
        if tensors["tokens"].numel() != acts.shape[0]:
            raise RuntimeError(f"shard {s}: {acts.shape[0]} activation rows but {tensors['tokens'].numel()} labels")
        save_safetensors_atomic(out / name, tensors)
        manifest["shards"].append(entry)
        write_json_atomic(manifest_path, {**manifest, "complete": False})
        print(f"collect | shard {s + 1}/{len(plan)} | {tokens} tokens | {time.perf_counter() - t0:.1f}s", flush=True)
    manifest["complete"] = True
    write_json_atomic(manifest_path, manifest)
    print(f"collect | {manifest['num_tokens']} tokens x {len(manifest['sources'])} sources x {h_a} | layers "
          f"{layers} | {len(plan)} shards ({skipped} already done) | {out}", flush=True)  # fmt: skip
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# reading


class ActivationStore:
    """Read access to a collected acts/ directory: the manifest, and shards one at a time (memory-bounded)."""

    def __init__(self, acts_dir: str | Path):
        self.dir = Path(acts_dir)
        path = self.dir / "manifest.json"
        if not path.is_file():
            raise ValueError(f"{self.dir}: no manifest.json (run `collect` with the same --log.out_dir first)")
        self.manifest = json.loads(path.read_text())
        if not self.manifest.get("complete"):
            raise ValueError(f"{path}: collect did not finish (re-run it: finished shards are kept)")
        self.shards = [self.dir / s["file"] for s in self.manifest["shards"]]
        for f in self.shards:
            if not f.is_file():
                raise ValueError(f"{f}: shard listed in the manifest is missing")

    @property
    def num_sources(self) -> int:
        return len(self.manifest["sources"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    def load(self, i: int, keys: tuple[str, ...] = ("acts",) + LABELS) -> dict[str, torch.Tensor]:
        """Tensors `keys` of shard i (acts as float32)."""
        out = {}
        with safe_open(str(self.shards[i]), framework="pt") as f:
            for k in keys:
                t = f.get_tensor(k)
                out[k] = t.float() if k == "acts" else t.long()
        return out
