"""The BatchTopK crosscoder and its training loop (the `train` subcommand).

Sources s = 1..S are (model, layer) pairs (model A's layers, then model B's), each an H-vector per token. One
shared latent code f [F] per token reads all sources and each latent has one decoder vector per source:

    x_s <- x_s * scale_s                                  per-source normalisation: E |x_s|^2 = 1 (train data)
    pre = relu(sum_s x_s W_enc[s] + b_enc)                (N, F)
    score_i = pre_i * sum_s |W_dec[i, s]|                 decoder-norm-weighted (Anthropic's sparsity weighting,
                                                          here inside the selection, as BatchTopK crosscoders do)
    f = pre where score is among the top k*N of the batch (training) / above the threshold (inference), else 0
    x_hat_s = f W_dec[:, s] + b_dec[s]
    loss = mean_n sum_s |x_s - x_hat_s|^2  +  aux_coef * AuxK

The score is invariant to trading scale between encoder and decoder, so a latent cannot win the selection by
shrinking its decoder. AuxK (Gao et al. 2024): the aux_k most active dead latents (no firing for dead_tokens
tokens) reconstruct the main reconstruction's error, loss normalised by the error's variance; it gives dead latents
a gradient. The inference threshold is the mean smallest selected score per batch (Bussmann et al. 2024): an EMA
during training (logged), recalibrated with the final weights at the end.

Relative decoder norm of latent i: r_i = |d_i,B| / (|d_i,A| + |d_i,B|), |d_i,m| the norm of its decoder vectors of
model m (concatenated over layers): 0 = A-only, 1 = B-only.

The decode is a dense (N, F) x (F, S*H) GEMM on the top-k-sparse code. A Triton sparse top-k decode was not written:
at the dictionary sizes this tool trains (F ~ 1e3-1e4, k ~ 16-64) the GEMM is a small part of a step and a gather
kernel would not pay for itself; the torch path is the only path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from exgrpo_fast.analysis.activations import ActivationStore, resolve_device, save_safetensors_atomic


class Crosscoder(nn.Module):
    """Shared-latent crosscoder over S sources of width H with F latents and BatchTopK sparsity k."""

    def __init__(self, n_sources: int, d_model: int, n_latents: int, k: int):
        super().__init__()
        if min(n_sources, d_model, n_latents, k) < 1 or k > n_latents:
            raise ValueError(f"Crosscoder: bad sizes S={n_sources} H={d_model} F={n_latents} k={k}")
        self.n_sources, self.d_model, self.n_latents, self.k = n_sources, d_model, n_latents, k
        self.W_enc = nn.Parameter(torch.empty(n_sources, d_model, n_latents))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_latents, n_sources, d_model))
        self.b_dec = nn.Parameter(torch.zeros(n_sources, d_model))
        self.register_buffer("scale", torch.ones(n_sources))  # input multiplier per source
        self.register_buffer("threshold", torch.tensor(-1.0))  # inference threshold on scores; < 0 = not set
        self.register_buffer("since_fired", torch.zeros(n_latents, dtype=torch.int64))  # training tokens
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.int64))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, init_norm: float = 0.1) -> None:
        """Decoder vectors of norm init_norm per source in random directions; encoder = decoder transposed."""
        w = torch.randn(self.n_latents, self.n_sources, self.d_model)
        w = w / w.norm(dim=-1, keepdim=True) * init_norm
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.permute(1, 2, 0))
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ------------------------------------------------------------------------------------------------------------

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations [N, S, H] -> the normalised space the crosscoder works in."""
        return x * self.scale[:, None]

    def decoder_norms(self) -> torch.Tensor:
        """|W_dec[i, s]|, (F, S)."""
        return self.W_dec.norm(dim=-1)

    def preacts(self, x: torch.Tensor) -> torch.Tensor:
        """relu encoder pre-activations of normalised x [N, S, H] -> (N, F)."""
        n = x.shape[0]
        return torch.relu(x.reshape(n, -1) @ self.W_enc.reshape(-1, self.n_latents) + self.b_enc)

    def select(self, pre: torch.Tensor, *, batch_topk: bool) -> torch.Tensor:
        """Sparse code (N, F): BatchTopK over the batch on decoder-norm-weighted scores (training), or the
        inference threshold (falls back to per-token top-k while the threshold is unset)."""
        score = pre * self.decoder_norms().sum(-1)
        if batch_topk:
            n_keep = min(self.k * pre.shape[0], score.numel())
            flat = score.flatten()
            top = flat.topk(n_keep, sorted=False)
            mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, top.indices, True).view_as(score)
            return pre * (mask & (score > 0))
        if self.threshold.item() < 0:  # sync: once per call, inference only
            top = score.topk(self.k, dim=-1)
            mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, top.indices, True)
            return pre * (mask & (score > 0))
        return pre * (score > self.threshold)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Inference code (N, F) of normalised x."""
        return self.select(self.preacts(x), batch_topk=False)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Code (N, F) -> normalised reconstruction (N, S, H)."""
        return (f @ self.W_dec.reshape(self.n_latents, -1)).view(-1, self.n_sources, self.d_model) + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(code, reconstruction) of normalised x at inference."""
        f = self.encode(x)
        return f, self.decode(f)

    # ------------------------------------------------------------------------------------------------------------

    def train_step_loss(
        self, x: torch.Tensor, *, aux_k: int, aux_coef: float, dead_tokens: int, momentum: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss on a normalised batch x [N, S, H]; updates the firing counters and the threshold."""
        n = x.shape[0]
        pre = self.preacts(x)
        f = self.select(pre, batch_topk=True)
        x_hat = self.decode(f)
        err = x - x_hat
        mse = err.pow(2).sum(dim=(1, 2)).mean()
        loss = mse
        stats = {"mse": mse.detach()}
        with torch.no_grad():
            active = f > 0
            fired = active.any(0)
            self.since_fired.add_(n).masked_fill_(fired, 0)
            score = f * self.decoder_norms().sum(-1)
            min_score = torch.where(active, score, torch.full_like(score, float("inf"))).min()
            # a running mean for the first 1 / (1 - momentum) batches, an EMA after (no bias toward the first batch)
            m = torch.clamp(1 - 1 / (self.threshold_updates + 1).double(), max=momentum).float()
            new = torch.where(self.threshold < 0, min_score, m * self.threshold + (1 - m) * min_score)
            ok = torch.isfinite(min_score)
            self.threshold.copy_(torch.where(ok, new, self.threshold))
            self.threshold_updates.add_(ok.long())
            stats["l0"] = active.sum(1).float().mean()
            dead = self.since_fired > dead_tokens
            stats["dead"] = dead.float().mean()
            denom = (x - x.mean(0)).pow(2).sum(dim=(0, 2))
            stats["fve"] = 1 - err.detach().pow(2).sum(dim=0).sum(-1) / denom.clamp_min(1e-12)  # (S,)
        if aux_k > 0 and aux_coef > 0:
            # AuxK: the dead latents' own top-aux_k pre-activations reconstruct the (detached) error.
            masked = pre * dead
            k_aux = min(aux_k, self.n_latents)
            top = masked.topk(k_aux, dim=-1)
            f_aux = torch.zeros_like(pre).scatter_(1, top.indices, top.values)
            e = err.detach()
            e_hat = (f_aux @ self.W_dec.reshape(self.n_latents, -1)).view_as(e)
            aux = (e - e_hat).pow(2).sum(dim=(1, 2)).mean() / (e - e.mean(0)).pow(2).sum(dim=(1, 2)).mean().clamp_min(
                1e-12
            )
            # no dead latent: f_aux is all zero and aux is a constant (zero gradient); keep it out of the loss
            aux = torch.where(dead.any(), aux, torch.zeros_like(aux))
            loss = loss + aux_coef * aux
            stats["aux"] = aux.detach()
        return loss, stats

    # ------------------------------------------------------------------------------------------------------------

    def relative_norms(self, n_layers: int) -> torch.Tensor:
        """r_i = |d_B| / (|d_A| + |d_B|) per latent, (F,); sources are A's n_layers then B's n_layers."""
        sq = self.W_dec.detach().pow(2).sum(-1)  # (F, S)
        na = sq[:, :n_layers].sum(-1).sqrt()
        nb = sq[:, n_layers:].sum(-1).sqrt()
        return nb / (na + nb).clamp_min(1e-12)

    def model_cosines(self, n_layers: int) -> torch.Tensor:
        """Cosine between a latent's A decoder and its B decoder (each concatenated over layers), (F,)."""
        w = self.W_dec.detach()
        da = w[:, :n_layers].reshape(self.n_latents, -1)
        db = w[:, n_layers:].reshape(self.n_latents, -1)
        return torch.nn.functional.cosine_similarity(da, db, dim=-1)

    def raw_direction(self, latent: int, source: int) -> torch.Tensor:
        """Decoder vector of `latent` at `source` in the raw activation units, (H,)."""
        return self.W_dec.detach()[latent, source] / self.scale[source]


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def save_crosscoder(path: Path, model: Crosscoder, meta: dict) -> None:
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    sizes = {"n_sources": model.n_sources, "d_model": model.d_model, "n_latents": model.n_latents, "k": model.k}
    save_safetensors_atomic(path, tensors, metadata={"sizes": json.dumps(sizes), "meta": json.dumps(meta)})


def load_crosscoder(path: str | Path, device: torch.device | str = "cpu") -> tuple[Crosscoder, dict]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no crosscoder checkpoint (run `train` with the same --log.out_dir first)")
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model = Crosscoder(**json.loads(md["sizes"]))
    model.load_state_dict(tensors)
    return model.to(device), json.loads(md["meta"])


# ----------------------------------------------------------------------------------------------------------------
# data


def _eval_mask(doc: torch.Tensor, every: int) -> torch.Tensor:
    return (doc % every == 0) if every > 0 else torch.zeros_like(doc, dtype=torch.bool)


def _batches(store: ActivationStore, every: int, batch_size: int, gen: torch.Generator):
    """Endless shuffled training batches (raw [B, S, H]), one shard in memory at a time plus a remainder."""
    rest = None
    while True:
        for i in torch.randperm(len(store.shards), generator=gen).tolist():
            shard = store.load(i, ("acts", "doc"))
            x = shard["acts"][~_eval_mask(shard["doc"], every) if every > 0 else slice(None)]
            if rest is not None:
                x = torch.cat([rest, x])
            x = x[torch.randperm(x.shape[0], generator=gen)]
            n_full = x.shape[0] // batch_size
            for b in range(n_full):
                yield x[b * batch_size : (b + 1) * batch_size]
            rest = x[n_full * batch_size :]


def _first_pass(store: ActivationStore, every: int, eval_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean squared norm per source over training tokens, held-out eval acts, number of training tokens)."""
    sq = torch.zeros(store.num_sources, dtype=torch.float64)
    n_train, held = 0, []
    n_held = 0
    for i in range(len(store.shards)):
        shard = store.load(i, ("acts", "doc"))
        ev = _eval_mask(shard["doc"], every)
        tr = shard["acts"][~ev]
        sq += tr.double().pow(2).sum(dim=(0, 2))
        n_train += tr.shape[0]
        if n_held < eval_tokens:
            take = shard["acts"][ev] if every > 0 else shard["acts"]
            take = take[: eval_tokens - n_held]
            held.append(take)
            n_held += take.shape[0]
    if n_train == 0:
        raise ValueError("no training tokens: every dialogue is held out (raise train.eval_every_doc)")
    return (sq / n_train).float(), torch.cat(held), n_train


@torch.no_grad()
def evaluate(model: Crosscoder, x_raw: torch.Tensor, batch_size: int = 4096) -> dict:
    """Inference metrics on raw activations: FVE per source, normalised MSE, L0, fraction of latents never firing."""
    device = model.W_dec.device
    err_sq = torch.zeros(model.n_sources, dtype=torch.float64)
    fired = torch.zeros(model.n_latents, dtype=torch.bool, device=device)
    l0_sum, n = 0.0, x_raw.shape[0]
    xs = model.normalize(x_raw.to(device))
    mean = xs.mean(0)
    var = (xs - mean).pow(2).sum(dim=(0, 2)).double().cpu()
    for s in range(0, n, batch_size):
        x = xs[s : s + batch_size]
        f, x_hat = model(x)
        err_sq += (x - x_hat).pow(2).sum(dim=(0, 2)).double().cpu()
        l0_sum += float((f > 0).sum())  # sync: evaluation only
        fired |= (f > 0).any(0)
    fve = (1 - err_sq / var.clamp_min(1e-12)).tolist()
    return {"fve": fve, "mse": float(err_sq.sum()) / n, "l0": l0_sum / n, "never_fired": float((~fired).float().mean())}


# ----------------------------------------------------------------------------------------------------------------
# the train subcommand


def fit(
    model: Crosscoder, next_batch, tc, *, log=None, names: list[str] | None = None, calibration_batches: int = 16
) -> None:
    """Train `model` for tc.steps steps on raw batches [B, S, H] from next_batch() (tc: crosscoder.TrainConfig):
    Adam, constant lr then linear decay over the last 20%; the decoder bias starts at the first batch's mean.
    Every tc.log_every steps a metrics row goes to `log` (a text file, JSON lines) and a line to stdout. At the end
    the inference threshold is calibrated on calibration_batches more batches."""
    device = model.W_dec.device
    names = names or [f"s{i}" for i in range(model.n_sources)]
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=(0.9, 0.999))
    decay_from = int(0.8 * tc.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < decay_from else max(0.0, (tc.steps - s) / max(1, tc.steps - decay_from))
    )
    t0 = time.perf_counter()
    for step in range(1, tc.steps + 1):
        x = model.normalize(next_batch().to(device, non_blocking=True))
        if step == 1:
            with torch.no_grad():
                model.b_dec.copy_(x.mean(0))  # start the decoder bias at the data mean
        loss, stats = model.train_step_loss(
            x, aux_k=tc.aux_k, aux_coef=tc.aux_coef, dead_tokens=tc.dead_tokens, momentum=tc.threshold_momentum
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % tc.log_every == 0 or step == tc.steps:
            row = {k: v.tolist() for k, v in stats.items()}  # sync: logging
            row.update(step=step, loss=float(loss.detach()), lr=sched.get_last_lr()[0], s=time.perf_counter() - t0)
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            fve = " ".join(f"{n} {v:.3f}" for n, v in zip(names, row["fve"]))
            print(f"train {step:6d}/{tc.steps} | mse {row['mse']:.4f} | aux {row.get('aux', 0):.3f} | "
                  f"l0 {row['l0']:.1f} | dead {row['dead']:.3f} | fve {fve} | {row['s']:.0f}s", flush=True)  # fmt: skip
    calibrate_threshold(model, [next_batch() for _ in range(calibration_batches)])


@torch.no_grad()
def calibrate_threshold(model: Crosscoder, batches: list[torch.Tensor]) -> None:
    """Set the inference threshold to the mean over `batches` (raw [B, S, H]) of the smallest score BatchTopK keeps,
    with the final weights (the EMA kept during training lags behind weights that are still moving)."""
    device = model.W_dec.device
    norms = model.decoder_norms().sum(-1)
    mins = []
    for b in batches:
        f = model.select(model.preacts(model.normalize(b.to(device))), batch_topk=True)
        score = f * norms
        mins.append(torch.where(f > 0, score, torch.full_like(score, float("inf"))).min())
    m = torch.stack(mins)
    m = m[torch.isfinite(m)]
    if m.numel():
        model.threshold.copy_(m.mean())


def source_names(manifest: dict) -> list[str]:
    labels = {m: manifest["models"][m]["label"] for m in ("a", "b")}
    return [f"{labels[s['model']]}@L{s['layer']}" for s in manifest["sources"]]


def train(cfg) -> dict:
    """Run the train subcommand (cfg: crosscoder.Train); writes crosscoder/{crosscoder.safetensors, metrics.jsonl,
    summary.json} and returns the summary."""
    tc = cfg.train
    out = Path(cfg.log.out_dir) / "crosscoder"
    store = ActivationStore(Path(cfg.log.out_dir) / "acts")
    device = resolve_device(tc.device)
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    names = source_names(store.manifest)
    n_layers = len(store.manifest["layers"])

    mean_sq, held, n_train = _first_pass(store, tc.eval_every_doc, tc.eval_tokens)
    model = Crosscoder(store.num_sources, store.d_model, tc.latents, tc.k).to(device)
    with torch.no_grad():
        model.scale.copy_(mean_sq.clamp_min(1e-12).rsqrt().to(device))
    out.mkdir(parents=True, exist_ok=True)
    batches = _batches(store, tc.eval_every_doc, tc.batch_size, gen)
    t0 = time.perf_counter()
    print(f"train | {n_train} tokens x {store.num_sources} sources ({', '.join(names)}) x {store.d_model} | "
          f"F {tc.latents} | k {tc.k} | {tc.steps} steps of {tc.batch_size} | device {device}", flush=True)  # fmt: skip
    with (out / "metrics.jsonl").open("w") as log:
        fit(model, lambda: next(batches), tc, log=log, names=names)

    ev = evaluate(model, held)
    r = model.relative_norms(n_layers)
    alive = model.since_fired <= tc.dead_tokens
    summary = {
        "sources": names,
        "train_tokens": n_train,
        "eval_tokens": int(held.shape[0]),
        "steps": tc.steps,
        "fve": dict(zip(names, ev["fve"])),
        "mse": ev["mse"],
        "l0": ev["l0"],
        "dead_fraction": float((~alive).float().mean()),
        "never_fired_on_eval": ev["never_fired"],
        "threshold": float(model.threshold),
        "relative_norm_mean": float(r[alive].mean()) if bool(alive.any()) else math.nan,
        "train_s": time.perf_counter() - t0,
    }
    meta = {"train": dataclasses.asdict(tc), "manifest": store.manifest, "summary": summary}
    save_crosscoder(out / "crosscoder.safetensors", model, meta)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    fve = " ".join(f"{n} {v:.3f}" for n, v in summary["fve"].items())
    print(f"train | eval {summary['eval_tokens']} tokens | fve {fve} | l0 {summary['l0']:.1f} | dead "
          f"{summary['dead_fraction']:.3f} | {out / 'crosscoder.safetensors'}", flush=True)  # fmt: skip
    return summary
