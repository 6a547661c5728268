"""KDAS (Q.-H. Trinh, M.-V. Nguyen and P.-T. Vo Thi, "KDAS: Knowledge Distillation via Attention
Supervision Framework for Polyp Segmentation", arXiv:2312.08555, 2023; official code:
github.com/huyquoctrinh/KDAS, `train_kd_paper.py`), on the two output maps P1 (CFM head) and
P2 (SAM head).

Two terms, both on one map per image (an H x W matrix):

- Attention supervision: A(X) = softmax(X X^T / sqrt(W)) X treats rows as tokens; A is flattened
  over its H*W positions into a distribution with temperature tau, and the loss is
  KL(teacher || student), times tau^2. The published code feeds the student side through
  `softmax` over a channel axis of size 1 (a constant: no gradient, and KLDivLoss on it is not
  a divergence); here both sides are differentiable functions of their maps and only the
  teacher is detached.
- Symmetrical Guiding Module (SGM): MSE between S + S^T of student and teacher, which matches
  only the symmetric part of the two maps. S + S^T needs a square matrix: both maps are
  bilinearly resized to a k x k square, k = min(H, W) of the teacher map (a no-op for square
  inputs), so any batch size and aspect ratio work.

Objective: (1 - alpha) * [L_seg(P1) + L_seg(P2)] + alpha * [tau^2 * (KL1 + KL2) + SGM], alpha = 0.3,
tau = 2. Two forms are registered:

- `kdas-paper`: the published form, on raw logits, SGM on P1 only (as the official script).
  Logits reach +-20..30, so its SGM term is tens of times the segmentation loss at first
  (RESULTS.md, "KD against no KD").
- `kdas`: the same objective made scale-free. SGM compares probability maps sigmoid(P), which
  are bounded in [0, 1] (so the term is at most 4), on both heads; attention supervision works
  on per-image standardised logits (zero mean, unit variance over the map), which keep the
  map's spatial structure but not the teacher's confidence scale (the KL is unchanged when
  all logits are scaled; tests check both properties). Its KD terms carry a default weight
  of 0.5 (`--kd kdas` = `--kd kdas:0.5`, i.e. 0.7 * seg + 0.15 * KD), chosen on the validation
  split among 1 and 0.5 (RESULTS.md, "Parts 3 + 4"); `--kd kdas:1` is the paper's 0.3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdas_core.losses.base import Distiller, register
from kdas_core.losses.methods.common import mean_over_teachers, resize_to, scaled, standardise


def self_attention_map(x: torch.Tensor) -> torch.Tensor:
    """A(X) = softmax(X X^T / sqrt(W)) X for x of shape (B,1,H,W); returns (B,H,W)."""
    m = x[:, 0].float()
    scores = torch.matmul(m, m.transpose(1, 2)) / math.sqrt(m.shape[-1])
    return torch.matmul(torch.softmax(scores, dim=-1), m)


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float = 2.0) -> torch.Tensor:
    """KL(teacher || student) between temperature-tau distributions of the attention maps."""
    student = resize_to(student, teacher.shape)
    a_s = self_attention_map(student).flatten(1)
    a_t = self_attention_map(teacher.detach()).flatten(1)
    log_p_s = F.log_softmax(a_s / tau, dim=1)
    log_p_t = F.log_softmax(a_t / tau, dim=1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


def _square(x: torch.Tensor, k: int) -> torch.Tensor:
    return resize_to(x, (k, k))[:, 0].float()


def sgm_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between S_s + S_s^T and S_t + S_t^T on a k x k square, k = min(H, W) of the teacher."""
    k = min(teacher.shape[-2:])
    s, t = _square(student, k), _square(teacher.detach(), k)
    return F.mse_loss(s + s.transpose(1, 2), t + t.transpose(1, 2))


# A frame without a polyp gives a flat logit map (spread a few hundredths of a logit); standardised
# to unit variance, its noise would be what the student must match. Maps with less spread than
# one logit are only centred; a map with a polyp spans several logits and is unaffected.
STD_FLOOR = 1.0
MAPS = {"logit": lambda x: x, "prob": lambda x: torch.sigmoid(x.float()),
        "std": lambda x: standardise(x, floor=STD_FLOOR),
        "std-nofloor": lambda x: standardise(x)}  # every map to unit variance, flat ones too (ablation)


def kdas_terms(s_out: dict, t_out: dict, tau: float = 2.0, attn_space: str = "logit", sgm_space: str = "logit",
               sgm_heads: tuple[str, ...] = ("p1", "p2")) -> dict[str, torch.Tensor]:
    """tau^2 * (KL1 + KL2) on P1/P2 and the SGM summed over `sgm_heads`; each on the maps given by
    its space: 'logit' (raw), 'prob' (sigmoid) or 'std' (per-image standardised logits)."""
    fa, fs = MAPS[attn_space], MAPS[sgm_space]
    kl = sum(attention_kl(fa(s_out[h]), fa(t_out[h]), tau) for h in ("p1", "p2"))
    sgm = sum(sgm_loss(fs(s_out[h]), fs(t_out[h])) for h in sgm_heads)
    return {"attn_kl": tau * tau * kl, "sgm": sgm}


class _KDASBase(Distiller):
    attn_space = sgm_space = "logit"
    sgm_heads: tuple[str, ...] = ("p1", "p2")
    teacher_outputs = ("p1", "p2")  # output maps only: cached teacher targets can stand in for the teacher

    def __init__(self, student, teachers, weight: float = 1.0, alpha: float = 0.3, tau: float = 2.0):
        super().__init__(student, teachers, weight)
        self.alpha, self.tau = alpha, tau
        self.seg_weight = 1.0 - alpha

    def forward(self, s_out, t_outs, batch):
        terms = mean_over_teachers(t_outs, lambda _, t: kdas_terms(s_out, t, self.tau, self.attn_space, self.sgm_space,
                                                                          self.sgm_heads))
        return scaled(self.name, terms, self.alpha * self.weight)


@register
class KDAS(_KDASBase):
    name = "kdas"
    summary = ('KDAS, scale-free: SGM on probabilities (P1+P2) + attention KL on standardised logits; (1-a)*seg '
               '+ a*w*KD, a=0.3, tau=2, w=0.5 (chosen on validation; kdas:1 = paper weights)')
    attn_space, sgm_space = "std", "prob"
    # Chosen on the validation split (seed 0, the comparison's 8-epoch schedule): weight 0.5 gave
    # validation mDice .8767 against .8674 for 1 (RESULTS.md, "Parts 3 + 4"); never on test.
    default_weight = 0.5


@register
class KDASNoFloor(KDAS):
    name = "kdas-nofloor"
    summary = ('kdas without the std floor: flat (no-polyp) logit maps standardised to unit variance too, '
               'the ablation of that floor')
    attn_space = "std-nofloor"


@register
class KDASPaper(_KDASBase):
    name = "kdas-paper"
    summary = 'KDAS as published: raw-logit SGM on P1 only + attention KL on P1/P2; (1-a)*seg + a*KD, a=0.3, tau=2'
    sgm_heads = ("p1",)
