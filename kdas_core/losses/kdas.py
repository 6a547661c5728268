"""KDAS distillation terms (Le et al., "KDAS: Knowledge Distillation via Attention Supervision
Framework for Polyp Segmentation", 2023), on the two output maps P1 (CFM) and P2 (SAM).

Attention supervision: for a logit map X (an HxW matrix per image) the self-attention
A(X) = softmax(X X^T / sqrt(W)) X treats rows as tokens. A is flattened over its H*W positions
and turned into a distribution with temperature tau; the loss is KL(teacher || student).
The published code takes the student side through a constant (no gradient, NaN loss); here
both sides are differentiable functions of their maps and only the teacher is detached.

Symmetrical Guiding Module (SGM): MSE between the symmetrised maps S + S^T of student and
teacher; it matches only the symmetric part of the two maps, which tolerates the student's
inconsistency with the teacher. S + S^T needs a square matrix: both maps are bilinearly
resized to a k x k square with k = min(H, W) of the teacher map (a no-op for the usual square
inputs); with that convention any batch size and any aspect ratio work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _match(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Resize the student map to the teacher's spatial size (they differ when input sizes do)."""
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    return student


def self_attention_map(x: torch.Tensor) -> torch.Tensor:
    """A(X) = softmax(X X^T / sqrt(W)) X for x of shape (B,1,H,W); returns (B,H,W)."""
    m = x[:, 0].float()
    scores = torch.matmul(m, m.transpose(1, 2)) / math.sqrt(m.shape[-1])
    return torch.matmul(torch.softmax(scores, dim=-1), m)


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float = 2.0) -> torch.Tensor:
    """KL(teacher || student) between temperature-tau distributions of the attention maps."""
    student = _match(student, teacher)
    a_s = self_attention_map(student).flatten(1)
    a_t = self_attention_map(teacher.detach()).flatten(1)
    log_p_s = F.log_softmax(a_s / tau, dim=1)
    log_p_t = F.log_softmax(a_t / tau, dim=1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


def _square(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.shape[-2:] != (k, k):
        x = F.interpolate(x, size=(k, k), mode="bilinear", align_corners=False)
    return x[:, 0].float()


def sgm_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between S_s + S_s^T and S_t + S_t^T on a k x k square, k = min(H, W) of the teacher."""
    k = min(teacher.shape[-2:])
    s, t = _square(student, k), _square(teacher.detach(), k)
    return F.mse_loss(s + s.transpose(1, 2), t + t.transpose(1, 2))


def kdas_terms(s_out: dict, t_out: dict, tau: float = 2.0) -> dict[str, torch.Tensor]:
    """The KDAS terms on both heads: tau^2 * (KL1 + KL2) and SGM1 + SGM2."""
    kl = attention_kl(s_out["p1"], t_out["p1"], tau) + attention_kl(s_out["p2"], t_out["p2"], tau)
    sgm = sgm_loss(s_out["p1"], t_out["p1"]) + sgm_loss(s_out["p2"], t_out["p2"])
    return {"attn_kl": tau * tau * kl, "sgm": sgm}
