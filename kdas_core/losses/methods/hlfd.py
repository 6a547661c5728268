"""`hlfd`: Hierarchical Layer-selective Feedback Distillation (Gorade, Mittal, Jha & Bagci,
"Rethinking Intermediate Layers Design in Knowledge Distillation for Kidney and Liver Tumor
Segmentation", ISBI 2024, arXiv:2311.16700).

Two levels, each half "combined" and half "individual" as in the authors' code:

feature level (attention maps, p = 4, squared L2 distance of the normalised maps):
- combined: the student's earliest stage (features.0) learns from the teacher's middle stages
  (features.1 + features.2, resized to the smaller and concatenated), compared on the student's
  fine grid;
- individual: the student's intermediate stages (features.1, features.2) learn from the
  teacher's deepest stage (features.3).
Attention maps average the channels away, so this level needs no projection.

pixel level (tau = 4 KL):
- combined: the student's deepest decoder map (CFM) learns from the teacher's decoder maps
  (CIM, CFM, SAM resized to stride 8 and concatenated) through a per-pixel softmax over
  channels. The published code projects the teacher's concatenation with a fresh random 1x1
  conv at every step; here a persistent, trained 1x1 adapter projects the *student* map into
  the teacher's concatenated space instead (a trainable projection on the teacher side could
  learn to flatten its own target);
- individual: the student's other decoder maps (CIM, SAM) learn the teacher's final output
  (P1 + P2) through persistent 1x1 auxiliary heads and the two-class per-pixel KL.

L = L_seg + 0.1 * pixel + 0.9 * feature (alpha = 0.1, beta = 0.9 in the paper).
"""

from __future__ import annotations

import torch.nn as nn

from kdas_core.losses.base import Distiller, register
from kdas_core.losses.methods.common import (attention_distance, binary_kd, concat_resized, fused_logits, map_channels,
                     mean_over_teachers, pair, scaled, softmax_kl)

FEEDBACK_MAPS = ("cim", "sam")  # student decoder maps that learn the teacher's final output
TEACHER_DECODER = ("cim", "cfm", "sam")


@register
class HLFD(Distiller):
    name = "hlfd"
    summary = ('HLFD: stage 1 <- combined middle stages, stages 2-3 <- deepest (attention p=4); decoder maps <- '
               'combined decoder maps / output (KL tau=4)')

    def __init__(self, student, teachers, weight: float = 1.0, p: float = 4.0, tau: float = 4.0,
                 pixel_weight: float = 0.1, feature_weight: float = 0.9):
        super().__init__(student, teachers, weight)
        self.p, self.tau = p, tau
        self.pixel_weight, self.feature_weight = pixel_weight, feature_weight
        s_ch = map_channels(student)
        self.combined = nn.ModuleList(
            nn.Conv2d(s_ch["cfm"], sum(map_channels(t)[n] for n in TEACHER_DECODER), 1) for t in teachers)
        self.aux_heads = nn.ModuleDict({n: nn.Conv2d(s_ch[n], 1, 1) for n in FEEDBACK_MAPS})

    def feature_terms(self, s_out, t_out):
        s_f, t_f = s_out["features"], t_out["features"]
        combined = attention_distance(s_f[0], concat_resized([t_f[1].detach(), t_f[2].detach()]), self.p, "sum", grid="student")
        individual = sum(attention_distance(s, t_f[3], self.p, "sum") for s in (s_f[1], s_f[2]))
        return 0.5 * combined + 0.5 * individual

    def pixel_terms(self, i, s_out, t_out):
        t_cat = concat_resized([t_out[n].detach() for n in TEACHER_DECODER])
        s, t = pair(self.combined[i](s_out["cfm"].float()), t_cat)
        combined = softmax_kl(s, t, self.tau, "channel")
        t_final = fused_logits(t_out)
        individual = sum(binary_kd(self.aux_heads[n](s_out[n].float()), t_final, self.tau) for n in FEEDBACK_MAPS)
        return 0.5 * combined + 0.5 * individual

    def forward(self, s_out, t_outs, batch):
        def one(i, t_out):
            return {"pixel": self.pixel_weight * self.pixel_terms(i, s_out, t_out),
                    "feature": self.feature_weight * self.feature_terms(s_out, t_out)}

        return scaled(self.name, mean_over_teachers(t_outs, one), self.weight)
