"""`at`: attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention",
ICLR 2017).

Per encoder stage, the attention map is the channel mean of |F|^p (p = 2), flattened and
L2-normalised; the loss is the MSE between student and teacher maps, times beta/2 with
beta = 1000 as in the authors' code (the normalised maps are tiny per position). Attention maps
have no channel axis, so no adapter is needed; the student map is resized to the teacher's grid.
"""

from __future__ import annotations

from kdas_core.losses.base import Distiller, register
from kdas_core.losses.methods.common import attention_distance, mean_over_teachers, scaled


@register
class AT(Distiller):
    name = "at"
    summary = 'attention transfer: MSE of L2-normalised channel-mean |F|^2 maps, 4 encoder stages (beta=1000)'

    def __init__(self, student, teachers, weight: float = 1.0, p: float = 2.0, beta: float = 1000.0):
        super().__init__(student, teachers, weight)
        self.p, self.beta = p, beta

    def forward(self, s_out, t_outs, batch):
        def one(_, t_out):
            pairs = zip(s_out["features"], t_out["features"])
            return {"attention": sum(attention_distance(s, t, self.p, "mean") for s, t in pairs)}

        return scaled(self.name, mean_over_teachers(t_outs, one), self.weight * self.beta / 2)
