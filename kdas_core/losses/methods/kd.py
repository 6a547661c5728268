"""`kd`: pixel-wise Hinton distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a
Neural Network", NIPS Deep Learning Workshop 2015), applied per pixel as in segmentation KD.

Each pixel of a binary logit map is a two-class problem: p = sigmoid(z / tau), and the loss is
tau^2 * KL(p_T || p_S) averaged over pixels. Applied to both heads (P1 and P2) against the
teacher's same head, at input resolution.
"""

from __future__ import annotations

from kdas_core.losses.base import Distiller, register
from kdas_core.losses.methods.common import binary_kd, mean_over_teachers, scaled


@register
class KD(Distiller):
    name = "kd"
    summary = 'Hinton KD per pixel: tau^2 * two-class KL(sigmoid(zT/tau) || sigmoid(zS/tau)) on P1 and P2, tau=4'
    teacher_outputs = ("p1", "p2")

    def __init__(self, student, teachers, weight: float = 1.0, tau: float = 4.0):
        super().__init__(student, teachers, weight)
        self.tau = tau

    def forward(self, s_out, t_outs, batch):
        def one(_, t_out):
            return {"kl": binary_kd(s_out["p1"], t_out["p1"], self.tau) + binary_kd(s_out["p2"], t_out["p2"], self.tau)}

        return scaled(self.name, mean_over_teachers(t_outs, one), self.weight)
