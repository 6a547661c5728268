"""`cwd`: channel-wise distillation (Shu, Liu, Gao, Yan & Shen, "Channel-wise Knowledge
Distillation for Dense Prediction", ICCV 2021).

Each channel of a map is turned into a distribution over its spatial positions with
softmax(x / tau), tau = 4; the loss is tau^2 * KL(teacher || student) averaged over channels.
Applied to
- the logits: the stride-8 head outputs P1 and P2; a binary head has one channel, so it is
  used as two channels (z, -z): where the polyp is and where the background is;
- the features right before the heads (CFM and SAM maps), through a learnable 1x1 adapter
  per teacher when the student's width differs (Identity otherwise).
"""

from __future__ import annotations

import torch

from kdas_core.losses.base import Distiller, register
from kdas_core.losses.methods.common import mean_over_teachers, pair, per_teacher_adapters, scaled, softmax_kl

FEATURES = ("cfm", "sam")
LOGITS = ("p1_low", "p2_low")


@register
class CWD(Distiller):
    name = "cwd"
    summary = ('channel-wise KD: KL of per-channel spatial softmax (tau=4) on P1/P2 logits and CFM/SAM features '
               '(1x1 adapters)')

    def __init__(self, student, teachers, weight: float = 1.0, tau: float = 4.0, feature_weight: float = 1.0):
        super().__init__(student, teachers, weight)
        self.tau, self.feature_weight = tau, feature_weight
        self.adapters = torch.nn.ModuleDict({n: per_teacher_adapters(student, teachers, n) for n in FEATURES})

    def forward(self, s_out, t_outs, batch):
        def one(i, t_out):
            logit = 0.0
            for n in LOGITS:
                s, t = pair(s_out[n], t_out[n])
                logit = logit + softmax_kl(torch.cat([s, -s], 1), torch.cat([t, -t], 1), self.tau, "spatial")
            feat = 0.0
            for n in FEATURES:
                s, t = pair(self.adapters[n][i](s_out[n].float()), t_out[n])
                feat = feat + softmax_kl(s, t, self.tau, "spatial")
            return {"logits": logit, "features": self.feature_weight * feat}

        return scaled(self.name, mean_over_teachers(t_outs, one), self.weight)
