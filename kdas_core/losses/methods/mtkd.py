"""`mtkd`: adaptive multi-teacher distillation from limit-trained teachers (Ben Loussaief et al.,
"Knowledge Distillation for Adaptive MRI Prostate Segmentation Based on Limit-Trained
Multi-Teacher Models", 2023, arXiv:2303.09494).

The --kd weight (mtkd:W) scales the distillation terms (KL, features) only.

Recipe: K teachers, each trained on one of K disjoint parts of the training data
(`python -m kdas_core.train --subset k/K`), distilled together into one student with
- Dice + Lovasz-hinge on the ground-truth mask, on both heads. These *replace* the structure
  loss: `seg_weight = 0`, so the trainer's own supervised term vanishes (and, combined with other
  methods in one --kd list, the smallest seg_weight wins: the structure loss stays off);
- KL (two-class, per pixel, tau = 4) from the student's prediction (P1 + P2, the map inference
  uses) to the teachers' weighted soft prediction sum_k w_k * sigmoid((P1_k + P2_k) / tau);
- feature matching: MSE between the student's deepest encoder stage, through a persistent 1x1
  adapter per teacher, and each teacher's deepest stage, weighted by the same w_k. Both sides are
  first standardised per channel over positions (as in PKD, Cao et al., NeurIPS 2022): raw
  activation scales differ by orders of magnitude between backbones (EfficientNet's BN+ReLU6
  stage 4 vs PVT's LayerNorm outputs) and raw MSE would swamp the other terms; standardised, the
  MSE is 2 * (1 - Pearson correlation) per channel, in [0, 4].

Teacher weighting rule (per image, recomputed every step; `weighting="dice"`, the default):
    w_k(b) = softmax_k( Dice(teacher k's thresholded prediction, mask_b) / T_w ),  T_w = 0.1.
A teacher that segments this image well dominates its soft target; a teacher trained on a part
of the data that does not cover this kind of image fades out. Unlike a pure confidence rule it
cannot be fooled by a confidently wrong teacher, and it only uses the training mask, which the
supervised terms use anyway. `weighting="confidence"` instead weights per pixel by certainty
|2 sigmoid(z_k) - 1| (no mask needed); `weighting="mean"` is the plain average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdas_core.losses.base import Distiller, register
from kdas_core.losses.methods.common import binary_kl, fused_logits, pair, per_teacher_adapters, resize_to, scaled, standardise
from kdas_core.cli.conventions import UsageError


def dice_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss per image, averaged over the batch."""
    prob = torch.sigmoid(resize_to(logits.float(), mask.shape))
    inter = (prob * mask).sum(dim=(1, 2, 3))
    total = prob.sum(dim=(1, 2, 3)) + mask.sum(dim=(1, 2, 3))
    return (1 - (2 * inter + 1) / (total + 1)).mean()


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Jaccard extension w.r.t. the sorted errors (Berman et al., Alg. 1)."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_hinge(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary Lovasz hinge (Berman, Rannen Triki & Blaschko, CVPR 2018), per image, averaged."""
    logits = resize_to(logits.float(), mask.shape)
    losses = []
    for z, g in zip(logits.flatten(1), mask.flatten(1)):
        errors = 1 - z * (2 * g - 1)
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(F.relu(errors_sorted), _lovasz_grad(g[order])))
    return torch.stack(losses).mean()


@torch.no_grad()
def teacher_weights(t_logits: list[torch.Tensor], mask: torch.Tensor, rule: str, temperature: float) -> torch.Tensor:
    """(K, B, 1, H, W) weights summing to 1 over teachers (broadcastable; per image for 'dice')."""
    k = len(t_logits)
    if rule == "mean" or k == 1:
        return torch.full((k, t_logits[0].shape[0], 1, 1, 1), 1.0 / k, device=mask.device)
    if rule == "confidence":
        conf = torch.stack([(2 * torch.sigmoid(z) - 1).abs() for z in t_logits])
        return (conf + 1e-6) / (conf + 1e-6).sum(0, keepdim=True)
    scores = []
    for z in t_logits:
        pred = (resize_to(z, mask.shape) > 0).float()
        inter = (pred * mask).sum(dim=(1, 2, 3))
        scores.append((2 * inter + 1) / (pred.sum(dim=(1, 2, 3)) + mask.sum(dim=(1, 2, 3)) + 1))
    return torch.softmax(torch.stack(scores) / temperature, dim=0)[..., None, None, None]


@register
class MTKD(Distiller):
    name = "mtkd"
    summary = ('multi-teacher KD (repeat --teacher, train --subset k/K): Dice+Lovasz replace seg loss, KL to '
               'Dice-weighted ensemble (tau=4), standardised feature MSE')

    seg_weight = 0.0  # Dice + Lovasz below are the supervised loss

    def __init__(self, student, teachers, weight: float = 1.0, tau: float = 4.0, kl_weight: float = 1.0,
                 feature_weight: float = 1.0, weighting: str = "dice", weight_temperature: float = 0.1):
        super().__init__(student, teachers, weight)
        if weighting not in ("dice", "confidence", "mean"):
            raise UsageError(f"mtkd weighting must be dice, confidence or mean, got {weighting!r}")
        self.tau, self.kl_weight, self.feature_weight = tau, kl_weight, feature_weight
        self.weighting, self.weight_temperature = weighting, weight_temperature
        self.adapters = per_teacher_adapters(student, teachers, "features.3")

    def forward(self, s_out, t_outs, batch):
        mask = batch["mask"].float()
        heads = (s_out["p1"], s_out["p2"])
        t_logits = [fused_logits(t).detach().float() for t in t_outs]
        ref = t_logits[0].shape  # teachers run on the same input, so share one size
        t_logits = [resize_to(z, ref) for z in t_logits]
        w = teacher_weights(t_logits, mask, self.weighting, self.weight_temperature)
        # Per-image weights (K,B,1,1,1) broadcast over pixels; per-pixel ones are already on `ref`.
        t_prob = sum(w[k] * torch.sigmoid(z / self.tau) for k, z in enumerate(t_logits))
        kl = binary_kl(resize_to(fused_logits(s_out).float(), ref), t_prob, self.tau)

        feat = 0.0
        s_deep = s_out["features"][3].float()
        for k, t_out in enumerate(t_outs):
            s, t = pair(self.adapters[k](s_deep), t_out["features"][3])
            s, t = standardise(s), standardise(t)
            w_img = w[k].mean(dim=(1, 2, 3))  # per-image weight (for 'confidence': mean certainty share)
            feat = feat + (w_img * (s - t).pow(2).mean(dim=(1, 2, 3))).mean()
        supervised = {"dice": sum(dice_loss(h, mask) for h in heads), "lovasz": sum(lovasz_hinge(h, mask) for h in heads)}
        distill = {"kl": self.kl_weight * kl, "feature": self.feature_weight * feat}
        # The --kd weight (mtkd:W) scales the distillation terms only; the supervised ones stand in
        # for the structure loss and keep weight 1.
        return {**scaled(self.name, supervised, 1.0), **scaled(self.name, distill, self.weight)}
