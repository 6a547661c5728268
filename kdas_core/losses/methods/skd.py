"""`skd`: structured knowledge distillation, pair-wise part (Liu, Chen, Liu, Qu, Luo & Wang,
"Structured Knowledge Distillation for Semantic Segmentation", CVPR 2019).

Feature maps are average-pooled to a grid of nodes (at most 16 x 16, so the similarity matrix
stays small and student and teacher land on the same grid whatever their sizes); the pair-wise
similarity a_ij is the cosine between nodes i and j; the loss is the mean squared difference of
the student's and teacher's similarity matrices. Cosines have no channel axis: no adapter.
Maps: the deepest encoder stage and the final decoder map (SAM), i.e. the last backbone and the
last pre-head features.
"""

from __future__ import annotations

import torch.nn.functional as F

from kdas_core.losses.base import Distiller, register
from kdas_core.losses.methods.common import cosine_matrix, get_map, mean_over_teachers, scaled

MAPS = ("features.3", "sam")


def pairwise_similarity(x, grid):
    nodes = F.adaptive_avg_pool2d(x.float(), grid).flatten(2).transpose(1, 2)  # (B, N, C)
    return cosine_matrix(nodes)


@register
class SKD(Distiller):
    name = "skd"
    summary = ('structured KD, pair-wise: MSE of cosine-similarity matrices of pooled nodes (<=16x16), last '
               'stage and SAM')

    def __init__(self, student, teachers, weight: float = 1.0, max_grid: int = 16):
        super().__init__(student, teachers, weight)
        self.max_grid = max_grid

    def forward(self, s_out, t_outs, batch):
        def one(_, t_out):
            loss = 0.0
            for n in MAPS:
                t = get_map(t_out, n).detach()
                grid = (min(self.max_grid, t.shape[-2]), min(self.max_grid, t.shape[-1]))
                loss = loss + F.mse_loss(pairwise_similarity(get_map(s_out, n), grid), pairwise_similarity(t, grid))
            return {"pairwise": loss}

        return scaled(self.name, mean_over_teachers(t_outs, one), self.weight)
