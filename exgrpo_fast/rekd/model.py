"""Select-predict rationale-extraction (RE) models over transformers encoders, and the REKD losses.

RE model = selector + predictor, each with its own encoder:
  selector:  encoder(x) -> per-unit logit a_i (unit = token of a text, patch of an image)   a: [B, U]
  mask:      z_i in {0, 1} (training: a differentiable sample, eval: z_i = 1[a_i > 0])       z: [B, U]
  predictor: encoder(x with every unit where z_i = 0 replaced) -> CLS -> class logits       [B, C]

How unselected input is hidden. Text: the predictor's input embedding of token i is
`z_i * E(x_i) + (1 - z_i) * E([MASK])` (position and type embeddings are then added as usual); images: the ViT
patch embedding of patch i is `z_i * P(x_i) + (1 - z_i) * m` with a learned mask token m (ViTModel's
`bool_masked_pos` path, fed 1 - z). Where z_i = 0 exactly, the unit's content is multiplied by an exact zero, so the
predictor's output cannot depend on it (tests/test_rekd.py changes unselected tokens/patches and checks the
logits are bit-identical). We replace instead of dropping the unit from attention because (1) a -inf attention
bias gives the selector no gradient through z (the straight-through / hard-concrete gradient needs the
predictor's output to be a smooth function of z), (2) [MASK] is the token an encoder already reads as "hidden
word", and a zero pixel patch would be a real, meaningful input (a dark patch) rather than "nothing here". The
predictor still sees *where* units were hidden and how many (positions), never *what* they were.

Selector head. Per-unit linear head on the selector's hidden states, or (text, head_context = k > 0, the text
default k = 1) a 1-D convolution of kernel 2k+1 over the hidden states of tokens i-k..i+k: token i's logit sees
its neighbours explicitly (e.g. a negator just before it), which our tiny from-scratch encoders did not learn
through attention within a CPU budget. Training schedule (train.py, select.predictor_warmup_frac /
predictor_lr_mult): each stage first trains only the predictor on random subsets, then the predictor's lr is
scaled down, so the selector cannot collude with a co-adapting predictor by coding the label in which filler
words it keeps (measured on the built-in text task: acc 1.0 with rationale F1 0.02 without it).

Selection estimators (u ~ U(0,1) iid, g = log u - log(1 - u) logistic noise, tau the temperature):
  gumbel_st:     hard = 1[a + g > 0], soft = sigmoid((a + g) / tau), z = hard + soft - sg(soft).
                 Forward value hard (exact 0/1), gradient d soft / d a. P(z = 1) = sigmoid(a).
  hard_concrete: s = sigmoid((a + g) / tau), z = clamp(s (zeta - gamma) + gamma, 0, 1), gamma=-0.1, zeta=1.1
                 (Louizos et al. 2018): exact zeros and ones with positive probability, values in between
                 elsewhere (then the predictor sees a blend). P(z > 0) = sigmoid(a - tau log(-gamma / zeta)).
The sparsity term uses P(z > 0) (the expected selected fraction), which has a gradient everywhere.

RE objective (per batch; U_b the selectable units of example b):
  L_RE = CE(f(x, z), y) + w_s |sum_b,i p_bi / sum_b |U_b| - s*| + w_c mean_{i,i+1 in U_b} |p_bi - p_b,i+1| (text)
  (s* is annealed linearly from select.anneal_from to select.target_sparsity over the first select.anneal_frac
  of a stage; w_c defaults to 0 because the built-in gold cues are isolated words.)
REKD objective of the student (teacher frozen; its hard eval mask m^T and class logits t on the same input):
  L = L_RE + w_kd T^2 KL(softmax(t / T) || softmax(f_S(x, z_S) / T))
           + w_r mean_{i in U} BCE(sigmoid(a^S_i), m^T_i)   (m^T hard 0/1 or the teacher's probabilities p^T)
  (kd.only_correct: both teacher terms only on the examples the teacher classifies correctly.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

GAMMA, ZETA = -0.1, 1.1


# ----------------------------------------------------------------------------------------------------------------
# selection


def logistic_noise(shape: torch.Size, device, generator: torch.Generator | None = None) -> torch.Tensor:
    u = torch.rand(shape, device=device, generator=generator).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def sample_mask(
    logits: torch.Tensor, estimator: str, tau: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A differentiable mask sample z (see the module docstring) and P(z > 0), both like logits.

    noise: logistic noise (log u - log(1-u)); drawn here when None (passing it makes the sample reproducible).
    """
    if noise is None:
        noise = logistic_noise(logits.shape, logits.device)
    if estimator == "gumbel_st":
        soft = torch.sigmoid((logits + noise) / tau)
        hard = (logits + noise > 0).to(logits.dtype)
        return hard + (soft - soft.detach()), torch.sigmoid(logits)  # forward value exactly hard
    if estimator == "hard_concrete":
        s = torch.sigmoid((logits + noise) / tau)
        z = (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
        return z, torch.sigmoid(logits - tau * math.log(-GAMMA / ZETA))
    raise ValueError(f"estimator={estimator!r}: expected 'gumbel_st' or 'hard_concrete'")


def eval_mask(logits: torch.Tensor) -> torch.Tensor:
    """The deterministic hard mask used at evaluation and as the teacher's rationale: 1[a > 0]."""
    return (logits > 0).to(logits.dtype)


# ----------------------------------------------------------------------------------------------------------------
# encoders


def build_encoder(
    enc,
    task: str,
    *,
    vocab_size: int = 0,
    max_tokens: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    num_channels: int = 1,
) -> nn.Module:
    """A transformers encoder: loaded from enc.path (local dir) or built tiny from enc's sizes (dropout off)."""
    if task == "text":
        from transformers import AutoModel, BertConfig, BertModel

        if enc.path:
            return AutoModel.from_pretrained(enc.path, add_pooling_layer=False)
        cfg = BertConfig(
            vocab_size=vocab_size,
            hidden_size=enc.hidden_size,
            num_hidden_layers=enc.num_layers,
            num_attention_heads=enc.num_heads,
            intermediate_size=enc.intermediate_size,
            max_position_embeddings=max(max_tokens, 8),
            type_vocab_size=1,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return BertModel(cfg, add_pooling_layer=False)
    from transformers import ViTConfig, ViTModel

    if enc.path:
        return ViTModel.from_pretrained(enc.path, add_pooling_layer=False, use_mask_token=True)
    cfg = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        hidden_size=enc.hidden_size,
        num_hidden_layers=enc.num_layers,
        num_attention_heads=enc.num_heads,
        intermediate_size=enc.intermediate_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTModel(cfg, add_pooling_layer=False, use_mask_token=True)


@dataclass
class REOutput:
    logits: torch.Tensor  # [B, C] class logits of the predictor
    sel_logits: torch.Tensor  # [B, U] selector logits (U = tokens for text, patches for images)
    z: torch.Tensor  # [B, U] the mask the predictor saw (1 on specials/padding for text)
    p: torch.Tensor  # [B, U] P(z > 0)


class REModel(nn.Module):
    """Selector encoder + per-unit head, predictor encoder + class head (see the module docstring)."""

    def __init__(
        self,
        task: str,
        selector: nn.Module,
        predictor: nn.Module,
        num_classes: int,
        mask_token_id: int = 0,
        head_context: int = 0,
    ):
        super().__init__()
        if head_context < 0:
            raise ValueError(f"head_context={head_context}: must be >= 0")
        if head_context > 0 and task != "text":
            raise ValueError(f"head_context={head_context}: only for text (an image's patches are a 2-D grid)")
        self.task = task
        self.selector = selector
        self.predictor = predictor
        self.head_context = head_context
        h = selector.config.hidden_size
        # head_context = k > 0: the logit of token i is a linear function of the selector's hidden states of tokens
        # i-k .. i+k (a 1-D convolution, zero-padded at the ends), i.e. the head sees n-gram context explicitly.
        self.select_head = (
            nn.Linear(h, 1) if head_context == 0 else nn.Conv1d(h, 1, 2 * head_context + 1, padding=head_context)
        )
        self.classify_head = nn.Linear(predictor.config.hidden_size, num_classes)
        self.mask_token_id = mask_token_id

    def select_logits(self, batch: dict) -> torch.Tensor:
        if self.task == "text":
            h = self.selector(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        else:
            h = self.selector(pixel_values=batch["pixel_values"]).last_hidden_state[:, 1:]  # drop CLS: (B, P, H)
        if self.head_context > 0:  # padding rows are zeroed so they add nothing to their neighbours' logits
            h = h * batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            return self.select_head(h.transpose(1, 2)).squeeze(1)
        return self.select_head(h).squeeze(-1)

    def num_units(self, batch: dict) -> int:
        """Selectable units per example: tokens (text) or patches (images)."""
        if self.task == "text":
            return batch["input_ids"].shape[1]
        c = self.predictor.config
        return (c.image_size // c.patch_size) ** 2

    def predict(self, batch: dict, z: torch.Tensor) -> torch.Tensor:
        """Class logits from the input with units where z = 0 replaced ([MASK] embedding / mask token)."""
        if self.task == "text":
            emb = self.predictor.get_input_embeddings()
            e = emb(batch["input_ids"])  # (B, T, H)
            m = emb.weight[self.mask_token_id]  # (H,)
            zz = z.unsqueeze(-1).to(e.dtype)
            h = self.predictor(inputs_embeds=zz * e + (1 - zz) * m, attention_mask=batch["attention_mask"])
        else:
            h = self.predictor(pixel_values=batch["pixel_values"], bool_masked_pos=1 - z)
        return self.classify_head(h.last_hidden_state[:, 0])

    def forward(
        self,
        batch: dict,
        *,
        estimator: str = "gumbel_st",
        tau: float = 0.5,
        sample: bool | None = None,
        noise: torch.Tensor | None = None,
    ) -> REOutput:
        """sample=None: sample in training mode, hard eval mask in eval mode."""
        a = self.select_logits(batch)
        if sample is None:
            sample = self.training
        if sample:
            z, p = sample_mask(a, estimator, tau, noise)
        else:
            z, p = eval_mask(a), torch.sigmoid(a)
        sel = selectable(batch)
        if sel is not None:  # specials stay visible (they carry no content), padding is outside attention anyway
            z = torch.where(sel, z, torch.ones_like(z))
        return REOutput(self.predict(batch, z), a, z, p)


def selectable(batch: dict) -> torch.Tensor | None:
    """[B, T] bool: the tokens that are words (text); None for images (every patch is selectable)."""
    if "word_index" in batch:
        return batch["word_index"] >= 0
    return None


def num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------------------------------------------
# losses


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1)


def sparsity_loss(p: torch.Tensor, sel: torch.Tensor | None, target: float) -> torch.Tensor:
    """|expected selected fraction over the batch's selectable units - target|."""
    return (_masked_mean(p, sel) - target).abs()


def continuity_loss(p: torch.Tensor, sel: torch.Tensor | None) -> torch.Tensor:
    """Mean |p_i - p_{i+1}| over neighbouring selectable units."""
    pair = None if sel is None else sel[:, 1:] & sel[:, :-1]
    return _masked_mean((p[:, 1:] - p[:, :-1]).abs(), pair)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """T^2 KL(softmax(t/T) || softmax(s/T)), mean over the batch (Hinton et al. 2015), or over weight=1 rows."""
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    s = F.log_softmax(student_logits.float() / temperature, -1)
    return temperature**2 * _masked_mean((t.exp() * (t - s)).sum(-1), weight)


def rationale_loss(sel_logits: torch.Tensor, teacher_mask: torch.Tensor, sel: torch.Tensor | None) -> torch.Tensor:
    """Mean BCE of sigmoid(student selector logits) against the teacher's mask (0/1 or probabilities)."""
    bce = F.binary_cross_entropy_with_logits(sel_logits.float(), teacher_mask.float(), reduction="none")
    return _masked_mean(bce, sel)


def target_at(select_cfg, step: int, steps: int) -> float:
    """The annealed target sparsity at a step: anneal_from -> target_sparsity over anneal_frac * steps."""
    n = select_cfg.anneal_frac * steps
    if n <= 0 or step >= n:
        return select_cfg.target_sparsity
    return select_cfg.anneal_from + (select_cfg.target_sparsity - select_cfg.anneal_from) * step / n


def re_loss(out: REOutput, batch: dict, select_cfg, task: str, target: float | None = None) -> dict[str, torch.Tensor]:
    """The RE objective's terms (see module docstring) and their weighted sum under key "loss"."""
    sel = selectable(batch)
    ce = F.cross_entropy(out.logits.float(), batch["labels"])
    sp = sparsity_loss(out.p, sel, select_cfg.target_sparsity if target is None else target)
    terms = {"ce": ce, "sparsity_loss": sp}
    loss = ce + select_cfg.sparsity_weight * sp
    if task == "text" and select_cfg.continuity_weight > 0:
        terms["continuity"] = continuity_loss(out.p, sel)
        loss = loss + select_cfg.continuity_weight * terms["continuity"]
    terms["loss"] = loss
    return terms
