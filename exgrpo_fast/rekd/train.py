"""The REKD pipeline: teacher RE -> student RE alone (baseline) -> student REKD, evaluation, results, pictures.

Both student stages start from the same initialisation (same seed) and get the same budget (student_train), so
the difference between student_re and student_rekd is the teacher's signal only. The teacher's targets (its
class logits and hard eval mask on every training example) are computed once after the teacher stage.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from exgrpo_fast.checkpoint import numpy_rng_state, safe_load, set_numpy_rng_state
from exgrpo_fast.errors import UserError
from exgrpo_fast.eval import bars_on
from exgrpo_fast.rekd import data as D
from exgrpo_fast.rundir import locked_dir
from exgrpo_fast.rekd import model as M
from exgrpo_fast.rekd.config import ConfigError, REKDConfig, StageConfig, parse_args, to_dict

STAGES = ("teacher", "student_re", "student_rekd")

# ----------------------------------------------------------------------------------------------------------------
# data


class Prepared:
    """Encoded train/test tensors of either modality, plus what the models need to be built."""

    def __init__(self, task: str, train: dict, test: dict, label_names: list[str], tokenizer=None, test_raw=None):
        self.task, self.train, self.test, self.label_names = task, train, test, label_names
        self.tokenizer, self.test_raw = tokenizer, test_raw

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def _split(n: int, seed: int, frac: float = 0.1) -> tuple[list[int], list[int]]:
    idx = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * frac)))
    return sorted(idx[k:].tolist()), sorted(idx[:k].tolist())


def _subset_text(d: D.TextData, idx: list[int]) -> D.TextData:
    gold = None if d.gold is None else [d.gold[i] for i in idx]
    return D.TextData([d.words[i] for i in idx], [d.labels[i] for i in idx], gold, d.label_names)


def prepare_data(cfg: REKDConfig) -> Prepared:
    """Load or make the data and encode it; every user-data problem raises DataError before anything is written."""
    dc = cfg.data
    if cfg.task == "text":
        if dc.train_path:
            train = D.load_text_file(dc.train_path)
            if dc.test_path:
                test = D.load_text_file(dc.test_path, train.label_names)
            else:  # hold out 10% of the user's training file
                tr, te = _split(len(train.labels), cfg.seed)
                train, test = _subset_text(train, tr), _subset_text(train, te)
        else:
            train = D.make_text_task(dc.n_train, cfg.seed, dc.max_distractors)
            test = D.make_text_task(dc.n_test, cfg.seed + 10_000, dc.max_distractors)
        tok_path = cfg.student.path or cfg.teacher.path
        if tok_path:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(tok_path)
            except Exception as e:  # noqa: BLE001 - many kinds of loading errors
                raise D.DataError(f"{tok_path}: no loadable tokenizer: {e}") from None
            if not tokenizer.is_fast:
                raise D.DataError(f"{tok_path}: word alignment needs a fast tokenizer (tokenizer.json)")
        else:
            tokenizer = D.build_word_tokenizer(train.words)
        return Prepared(
            "text",
            D.encode_texts(tokenizer, train, dc.max_tokens),
            D.encode_texts(tokenizer, test, dc.max_tokens),
            train.label_names,
            tokenizer,
            test,
        )
    if dc.train_path:
        train = D.load_image_file(dc.train_path, dc.patch_size)
        if dc.test_path:
            test = D.load_image_file(dc.test_path, dc.patch_size, train.label_names)
            if test.images.shape[1:] != train.images.shape[1:]:
                raise D.DataError(f"{dc.test_path}: image shape {tuple(test.images.shape[1:])} differs from train's")
        else:
            tr, te = _split(len(train.labels), cfg.seed)
            sub = lambda d, i: D.ImageData(  # noqa: E731
                d.images[i], d.labels[i], None if d.gold is None else d.gold[i], d.label_names
            )
            train, test = sub(train, tr), sub(train, te)
    else:
        kw = dict(image_size=dc.image_size, patch_size=dc.patch_size, num_classes=dc.num_classes)
        train = D.make_image_task(dc.n_train, cfg.seed, **kw)
        test = D.make_image_task(dc.n_test, cfg.seed + 10_000, **kw)
    return Prepared("image", D.encode_images(train), D.encode_images(test), train.label_names, None, test)


def build_re_model(cfg: REKDConfig, who: str, prep: Prepared) -> M.REModel:
    enc = getattr(cfg, who)
    if prep.task == "text":
        kw = dict(vocab_size=len(prep.tokenizer), max_tokens=prep.train["input_ids"].shape[1])
        kw["max_tokens"] = max(kw["max_tokens"], prep.test["input_ids"].shape[1])
        mask_id = prep.tokenizer.mask_token_id
    else:
        img = prep.train["pixel_values"]
        kw = dict(image_size=img.shape[-1], patch_size=cfg.data.patch_size, num_channels=img.shape[1])
        mask_id = 0
    sel, pred = M.build_encoder(enc, prep.task, **kw), M.build_encoder(enc, prep.task, **kw)
    if prep.task == "text" and sel.get_input_embeddings().num_embeddings < len(prep.tokenizer):
        raise ConfigError(f"{who}.path={enc.path!r}: its vocabulary is smaller than the tokenizer's")
    if prep.task == "image" and enc.path and sel.config.patch_size != cfg.data.patch_size:
        raise ConfigError(f"{who}.path={enc.path!r}: patch_size {sel.config.patch_size} != data.patch_size")
    ctx = cfg.select.head_context if prep.task == "text" else 0
    return M.REModel(prep.task, sel, pred, prep.num_classes, mask_id, head_context=ctx)


def _batch(t: dict, idx: torch.Tensor, device) -> dict:
    return {k: v[idx].to(device) for k, v in t.items() if k not in ("gold", "n_words")}


# ----------------------------------------------------------------------------------------------------------------
# evaluation


def unit_masks(task: str, batch_cpu: dict, z: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Selected units [B, W] bool: words (a word counts as selected if any of its tokens is) or patches.

    width: W for text (default: the batch's longest text); pass the data set's so batches concatenate."""
    if task == "image":
        return z > 0.5
    wi = batch_cpu["word_index"]
    w = int(batch_cpu["n_words"].max()) if width is None else width
    out = torch.zeros(z.shape[0], w + 1)
    out.scatter_reduce_(1, torch.where(wi >= 0, wi, w), z.float().cpu(), "amax", include_self=True)
    return out[:, :w] > 0.5


def rationale_f1(pred: torch.Tensor, gold: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-example F1 of selected vs gold units [B] (1 when both are empty)."""
    pred, gold = pred & valid, gold & valid
    tp = (pred & gold).sum(1).float()
    denom = (pred.sum(1) + gold.sum(1)).float()
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.ones_like(tp))


@torch.no_grad()
def evaluate(model: M.REModel, t: dict, cfg: REKDConfig, bs: int = 256) -> dict:
    """Accuracy, rationale F1 (None without gold) and selected fraction of the eval-mode (hard) masks."""
    model.eval()
    n = len(t["labels"])
    correct, f1s, fracs, masks = 0, [], [], []
    width = int(t["n_words"].max()) if model.task == "text" else None
    for s in range(0, n, bs):
        idx = torch.arange(s, min(n, s + bs))
        b = _batch(t, idx, cfg.device)
        out = model(b, sample=False)
        correct += int((out.logits.argmax(-1).cpu() == t["labels"][idx]).sum())  # sync: eval only
        cpu = {k: v[idx] for k, v in t.items()}
        units = unit_masks(model.task, cpu, out.z.cpu(), width)
        w = units.shape[1]
        valid = torch.arange(w)[None] < cpu["n_words"][:, None] if model.task == "text" else torch.ones_like(units)
        fracs.append((units & valid).sum(1).float() / valid.sum(1).clamp_min(1))
        if "gold" in t:
            f1s.append(rationale_f1(units, cpu["gold"][:, :w], valid))
        masks.append(units)
    model.train()
    return {
        "acc": correct / n,
        "rationale_f1": float(torch.cat(f1s).mean()) if f1s else None,
        "sparsity": float(torch.cat(fracs).mean()),
        "masks": masks,
    }


@torch.no_grad()
def teacher_targets(teacher: M.REModel, t: dict, cfg: REKDConfig, bs: int = 256) -> dict:
    """The teacher's class logits [N, C], selector logits and hard eval mask [N, U] on every training example."""
    teacher.eval()
    logits, sel_logits = [], []
    for s in range(0, len(t["labels"]), bs):
        out = teacher(_batch(t, torch.arange(s, min(len(t["labels"]), s + bs)), cfg.device), sample=False)
        logits.append(out.logits.float().cpu())
        sel_logits.append(out.sel_logits.float().cpu())
    a = torch.cat(sel_logits)
    return {"t_logits": torch.cat(logits), "t_mask": M.eval_mask(a), "t_prob": torch.sigmoid(a)}


# ----------------------------------------------------------------------------------------------------------------
# checkpoints (atomic) and metrics


def _atomic_write_dir(final: Path, write) -> None:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = final.with_name(final.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, stage: str, step: int, done: bool, model, opt, sched, gen) -> Path:
    """checkpoints/<stage>/step-NNNNNN/state.pt, then checkpoints/<stage>/latest -> it, then older ones removed."""
    root = run_dir / "checkpoints" / stage
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    state = {
        "stage": stage,
        "step": step,
        "done": done,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": numpy_rng_state(),  # tensors and plain values: loads with weights_only=True
    }
    _atomic_write_dir(final, lambda tmp: torch.save(state, tmp / "state.pt"))
    _atomic_text(root / "latest", final.name)
    for old in root.glob("step-*"):
        if old.name != final.name and not old.name.endswith((".tmp", ".old")):
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(run_dir: Path, stage: str) -> dict | None:
    """The newest checkpoint of a stage, loaded without running code from it (a crafted pickle is refused with a
    CheckpointError naming the file)."""
    latest = run_dir / "checkpoints" / stage / "latest"
    if not latest.is_file():
        return None
    return safe_load(latest.parent / latest.read_text().strip() / "state.pt")


def save_models(run_dir: Path, stage: str, model: M.REModel, tokenizer=None) -> None:
    """HF-loadable encoders (models/<stage>/selector, predictor; reusable as teacher.path / student.path) + heads."""

    def write(tmp: Path) -> None:
        for part in ("selector", "predictor"):
            getattr(model, part).save_pretrained(tmp / part)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / part)
        torch.save(
            {"select_head": model.select_head.state_dict(), "classify_head": model.classify_head.state_dict()},
            tmp / "heads.pt",
        )

    (run_dir / "models").mkdir(exist_ok=True)
    tmp = run_dir / "models" / (stage + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    final = run_dir / "models" / stage
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


class Metrics:
    """metrics.jsonl writer; on resume, rows a checkpoint had not yet seen are dropped so resuming is invisible."""

    def __init__(self, path: Path):
        self.path = path

    def truncate(self, stage: str, step: int) -> None:
        if not self.path.exists():
            return
        rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
        keep = [r for r in rows if not (r.get("stage") in (stage, "eval_" + stage) and r.get("step", 0) > step)]
        keep = [r for r in keep if not (r.get("stage") == "eval" and r.get("model") == stage)]
        _atomic_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def log(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# one stage


def lr_factor(sc: StageConfig, step: int, warm: int) -> float:
    """Multiplier of sc.lr at a step: linear warm-up over `warm` steps, then constant or cosine to sc.min_lr_frac."""
    if step + 1 < warm:
        return (step + 1) / warm
    if sc.lr_schedule == "constant":
        return 1.0
    t = min(1.0, (step + 1 - warm) / max(1, sc.steps - warm))
    return sc.min_lr_frac + (1 - sc.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))


def train_stage(
    stage: str,
    model: M.REModel,
    prep: Prepared,
    cfg: REKDConfig,
    sc: StageConfig,
    run_dir: Path,
    metrics: Metrics,
    targets: dict | None = None,
) -> M.REModel:
    """Train one RE model (stage teacher / student_re: RE objective; student_rekd: + KD + rationale terms)."""
    model.to(cfg.device).train()
    # two parameter groups: the selector side (encoder + head) and the predictor side (encoder + class head)
    sel_params = list(model.selector.parameters()) + list(model.select_head.parameters())
    pred_params = list(model.predictor.parameters()) + list(model.classify_head.parameters())
    groups = [{"params": sel_params}, {"params": pred_params}]
    opt = torch.optim.AdamW(groups, lr=sc.lr, weight_decay=sc.weight_decay)
    warm = max(1, int(0.05 * sc.steps))
    n_pre = int(cfg.select.predictor_warmup_frac * sc.steps)  # predictor-only steps on randomly masked inputs
    mult = cfg.select.predictor_lr_mult

    def sel_factor(s: int) -> float:
        return 0.0 if s < n_pre else lr_factor(sc, s, warm)

    def pred_factor(s: int) -> float:
        return lr_factor(sc, s, warm) * (1.0 if s < n_pre else mult)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, [sel_factor, pred_factor])
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + STAGES.index(stage))
    start = 0
    if cfg.log.resume and (state := load_latest(run_dir, stage)) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        set_numpy_rng_state(state["numpy_rng"])
        start = state["step"]
        metrics.truncate(stage, start)
        if state["done"]:
            return model
    train, n = prep.train, len(prep.train["labels"])
    kd = stage == "student_rekd"
    bar = tqdm(range(start, sc.steps), desc=stage, disable=not bars_on(cfg.log.progress), dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in bar:
        idx = torch.randint(n, (sc.batch_size,), generator=gen)
        b = _batch(train, idx, cfg.device)
        if step < n_pre:  # predictor warm-up: random subsets (keep rate ~ U(0.2, 1) per example), CE only
            sel = M.selectable(b)
            shape = sel.shape if sel is not None else (sc.batch_size, model.num_units(b))
            keep = 0.2 + 0.8 * torch.rand((shape[0], 1), generator=gen)
            z = (torch.rand(shape, generator=gen) < keep).float().to(cfg.device)
            if sel is not None:
                z = torch.where(sel, z, torch.ones_like(z))
            logits = model.predict(b, z)
            ce = F.cross_entropy(logits.float(), b["labels"])
            out = M.REOutput(logits, torch.zeros_like(z), z, z)
            terms = {"ce": ce, "loss": ce}
            loss = ce
        else:
            out = model(b, estimator=cfg.select.estimator, tau=cfg.select.tau, sample=True)
            terms = M.re_loss(out, b, cfg.select, prep.task, M.target_at(cfg.select, step - n_pre, sc.steps - n_pre))
            loss = terms["loss"]
        if kd and step >= n_pre:
            t_logits = targets["t_logits"][idx].to(cfg.device)
            t_mask = targets["t_mask" if cfg.kd.rationale_target == "hard" else "t_prob"][idx].to(cfg.device)
            keep, unit_keep = None, M.selectable(b)
            if cfg.kd.only_correct:  # the teacher's signal only where the teacher is right
                keep = t_logits.argmax(-1) == b["labels"]
                ones = torch.ones_like(out.sel_logits, dtype=torch.bool)
                unit_keep = keep[:, None] & (ones if unit_keep is None else unit_keep)
            terms["kd"] = M.kd_loss(out.logits, t_logits, cfg.kd.temperature, keep)
            terms["rationale"] = M.rationale_loss(out.sel_logits, t_mask, unit_keep)
            loss = loss + cfg.kd.kd_weight * terms["kd"] + cfg.kd.rationale_weight * terms["rationale"]
            terms["loss"] = loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), sc.grad_clip if sc.grad_clip > 0 else math.inf)
        opt.step()
        sched.step()
        done = step + 1 == sc.steps
        if (step + 1) % cfg.log.log_every == 0 or done:
            sel = M.selectable(b)
            frac = M._masked_mean(out.z.detach(), sel)
            row = {k: float(v.detach()) for k, v in terms.items()}  # sync: logging only
            row.update(
                stage=stage,
                step=step + 1,
                acc=float((out.logits.argmax(-1) == b["labels"]).float().mean()),
                sel_frac=float(frac),
                grad_norm=float(gn),
                lr=sched.get_last_lr()[0],
                lr_predictor=sched.get_last_lr()[1],
                ex_per_s=cfg.log.log_every * sc.batch_size / max(time.perf_counter() - t0, 1e-9),
            )
            metrics.log(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['acc']:.2f}", sel=f"{row['sel_frac']:.3f}")
            t0 = time.perf_counter()
        if cfg.log.eval_every and (step + 1) % cfg.log.eval_every == 0 and not done:
            sub = {k: v[:500] for k, v in prep.test.items()}
            ev = evaluate(model, sub, cfg)
            ev.pop("masks")
            metrics.log({"stage": "eval_" + stage, "step": step + 1, **ev})
            bar.write(
                f"{stage} step {step + 1}: "
                + " | ".join(f"{k} {v if v is None else round(v, 3)}" for k, v in ev.items())
            )
        if (step + 1) % cfg.log.save_every == 0 or done:
            save_checkpoint(run_dir, stage, step + 1, done, model, opt, sched, gen)
    return model


# ----------------------------------------------------------------------------------------------------------------
# the pipeline


def run(cfg: REKDConfig, prep: Prepared | None = None) -> dict:
    """All three stages; returns {"rows": [...], "run_dir": str}. prep may be given (tests) to skip loading."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    prep = prep or prepare_data(cfg)
    run_dir = Path(cfg.log.out_dir)
    if (run_dir / "metrics.jsonl").exists() and not cfg.log.resume:
        raise ConfigError(f"log.out_dir={str(run_dir)!r} already holds a run: pass --log.resume True or a new dir")
    with locked_dir(run_dir, "REKD run dir"):  # one writer: a second run on the same dir is refused
        return _run(cfg, prep, run_dir)


def _run(cfg: REKDConfig, prep: Prepared, run_dir: Path) -> dict:
    _atomic_text(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
    metrics = Metrics(run_dir / "metrics.jsonl")
    results, models = [], {}

    def init(who: str, seed: int) -> M.REModel:
        torch.manual_seed(seed)
        return build_re_model(cfg, who, prep)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    teacher = train_stage("teacher", init("teacher", cfg.seed), prep, cfg, cfg.teacher_train, run_dir, metrics)
    targets = teacher_targets(teacher, prep.train, cfg)
    models["teacher"] = teacher
    for stage in ("student_re", "student_rekd"):
        student = init("student", cfg.seed + 1)  # the same initialisation for both student stages
        models[stage] = train_stage(
            stage, student, prep, cfg, cfg.student_train, run_dir, metrics, targets if stage == "student_rekd" else None
        )
    masks = {}
    for stage in STAGES:
        ev = evaluate(models[stage], prep.test, cfg)
        masks[stage] = torch.cat(ev.pop("masks"))
        row = {"model": stage, "params": M.num_params(models[stage]), **ev}
        results.append(row)
        metrics.log({"stage": "eval", **row})
        save_models(run_dir, stage, models[stage], prep.tokenizer)
    _atomic_text(run_dir / "results.json", json.dumps({"task": cfg.task, "seed": cfg.seed, "rows": results}, indent=2))

    from exgrpo_fast.rekd import report

    print(report.markdown_table(results))
    if cfg.log.n_pictures:
        report.rationale_pictures(prep, masks, run_dir, cfg.log.n_pictures, seed=cfg.seed)
    if cfg.log.plot:
        report.plot_metrics(run_dir / "metrics.jsonl", run_dir / "plot.png")
    print(f"run dir: {run_dir}")
    return {"rows": results, "run_dir": str(run_dir)}


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        cfg = parse_args(argv)
        debug = cfg.debug
        prep = prepare_data(cfg)
        return run(cfg, prep)
    except (ConfigError, D.DataError, UserError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
