"""`kdas`: Symmetrical Guiding Module + attention supervision on P1 and P2 (Le et al., 2023)."""

from __future__ import annotations

from ..base import Distiller, register
from ..kdas import kdas_terms
from .common import mean_over_teachers, scaled


@register
class KDAS(Distiller):
    name = "kdas"
    summary = "KDAS: SGM (symmetric map MSE) + attention-supervision KL on P1/P2; (1-a)*seg + a*KD, a=0.3, tau=2"

    def __init__(self, student, teachers, weight: float = 1.0, alpha: float = 0.3, tau: float = 2.0):
        super().__init__(student, teachers, weight)
        self.alpha, self.tau = alpha, tau
        self.seg_weight = 1.0 - alpha

    def forward(self, s_out, t_outs, batch):
        terms = mean_over_teachers(t_outs, lambda _, t_out: kdas_terms(s_out, t_out, self.tau))
        return scaled(self.name, terms, self.alpha * self.weight)
