"""`grd`: graph relation distillation (Liu, Zhang, Xiong, Huang, Hu, Sun & Wu, "Graph Relation
Distillation for Efficient Biomedical Instance Segmentation", 2024, arXiv:2401.06370).

Embeddings: the SAM map (stride 8, the last decoder features before the P2 head), L2-normalised
per pixel; the student's goes through a persistent 1x1 adapter per teacher when widths differ.

- AGD (affinity graph): for offsets o in {1, 3, 5, 9, 27}, vertically and horizontally, the
  affinity of pixel p is cos(e_p, e_{p+o}); MSE between student and teacher affinities, averaged
  over the offsets that fit in the map. Weight 10.
- IGD (instance graph): nodes = mean embedding of each ground-truth instance (8-connected
  components of the mask; the background is a node too, so a single polyp still has an edge),
  edges = cosine between nodes. Node loss: squared L2 between matched student/teacher nodes;
  edge loss: MSE between edge matrices. Weights 0.1 and 0.1.
- cross-image IGD: a FIFO memory bank of teacher nodes from earlier batches (capacity 32); each
  step samples up to 12 of them, and the edges from this batch's nodes to the sampled ones must
  match (student node vs bank and teacher node vs bank, MSE; weight 0.1). The bank is a cache,
  not a learned state: it is not saved (persistent=False) and refills after a resume.

Instance masks come from the batch mask (at the student's input size) and are area-pooled to
each embedding's own grid, so student and teacher may run at different sizes.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from kdas_core.losses.base import Distiller, register
from kdas_core.losses.methods.common import cosine_matrix, map_channels, mean_over_teachers, per_teacher_adapters, resize_to, scaled

OFFSETS = (1, 3, 5, 9, 27)
EMBEDDING = "sam"


def affinities(e: torch.Tensor, offset: int, axis: int) -> torch.Tensor:
    """cos(e_p, e_{p+offset}) along `axis` (2 = vertical, 3 = horizontal) for normalised e."""
    n = e.shape[axis]
    return (e.narrow(axis, 0, n - offset) * e.narrow(axis, offset, n - offset)).sum(dim=1)


def affinity_loss(s: torch.Tensor, t: torch.Tensor, offsets=OFFSETS) -> torch.Tensor:
    losses = [F.mse_loss(affinities(s, o, ax), affinities(t, o, ax))
              for o in offsets for ax in (2, 3) if o < t.shape[ax]]
    return torch.stack(losses).mean() if losses else s.sum() * 0.0


def instance_masks(mask: torch.Tensor, max_instances: int = 16) -> list[torch.Tensor]:
    """Per image, (N_i, H, W) float masks: background first, then the connected components of the
    foreground, largest first (at most `max_instances`)."""
    out = []
    for m in (mask[:, 0] > 0.5).cpu().numpy().astype(np.uint8):
        n, labels = cv2.connectedComponents(m, connectivity=8)
        ids = sorted(range(1, n), key=lambda i: -(labels == i).sum())[:max_instances]
        planes = [labels == 0] + [labels == i for i in ids]
        out.append(torch.from_numpy(np.stack(planes)).to(mask.device, torch.float32))
    return out


def instance_nodes(e: torch.Tensor, masks: list[torch.Tensor], min_area: float = 0.5) -> list[torch.Tensor]:
    """Mean embedding per instance, masks area-pooled to e's grid. An instance smaller than
    `min_area` embedding cells is dropped, the same way for student and teacher (the masks are
    pooled to each grid, so a speck can survive on one and not the other: keep the pair only when
    it survives on both, see `matched_nodes`)."""
    nodes = []
    for emb, m in zip(e, masks):
        w = F.adaptive_avg_pool2d(m[:, None], emb.shape[-2:])[:, 0]  # (N, h, w) coverage
        area = w.sum(dim=(1, 2))
        nodes.append((torch.einsum("nhw,chw->nc", w, emb) / area.clamp_min(1e-6)[:, None], area >= min_area))
    return nodes


def matched_nodes(s: torch.Tensor, t: torch.Tensor, masks) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs = []
    for (ns, ks), (nt, kt) in zip(instance_nodes(s, masks), instance_nodes(t, masks)):
        keep = ks & kt
        pairs.append((ns[keep], nt[keep]))
    return pairs


@register
class GRD(Distiller):
    name = "grd"
    summary = ('graph relation KD: SAM affinities at offsets 1/3/5/9/27 (x10) + instance graph of mask '
               'components (nodes, edges x0.1) + 32-node cross-image bank')

    def __init__(self, student, teachers, weight: float = 1.0, affinity_weight: float = 10.0,
                 node_weight: float = 0.1, edge_weight: float = 0.1, bank_size: int = 32, bank_sample: int = 12):
        super().__init__(student, teachers, weight)
        self.affinity_weight, self.node_weight, self.edge_weight = affinity_weight, node_weight, edge_weight
        self.bank_sample = bank_sample
        self.adapters = per_teacher_adapters(student, teachers, EMBEDDING)
        dims = [map_channels(t)[EMBEDDING] for t in teachers]
        for k, c in enumerate(dims):  # one bank per teacher (teachers may differ in width)
            self.register_buffer(f"bank{k}", torch.zeros(bank_size, c), persistent=False)
            self.register_buffer(f"bank{k}_count", torch.zeros((), dtype=torch.long), persistent=False)

    @torch.no_grad()
    def _push(self, k: int, nodes: torch.Tensor) -> None:
        bank, count = getattr(self, f"bank{k}"), getattr(self, f"bank{k}_count")
        for node in nodes[-bank.shape[0]:]:
            bank[count % bank.shape[0]] = node
            count += 1

    def _bank_sample(self, k: int) -> torch.Tensor | None:
        bank, count = getattr(self, f"bank{k}"), int(getattr(self, f"bank{k}_count"))
        filled = min(count, bank.shape[0])
        if filled == 0:
            return None
        idx = torch.randperm(filled, device=bank.device)[: self.bank_sample]
        return bank[idx]

    def forward(self, s_out, t_outs, batch):
        masks = instance_masks(batch["mask"])
        student_emb = s_out[EMBEDDING].float()

        def one(k, t_out):
            t = F.normalize(t_out[EMBEDDING].detach().float(), dim=1)
            s = F.normalize(resize_to(self.adapters[k](student_emb), t.shape), dim=1)
            nodes = matched_nodes(s, t, masks)
            node = torch.stack([(ns - nt).pow(2).sum(1).mean() for ns, nt in nodes]).mean()
            edge = torch.stack([F.mse_loss(cosine_matrix(ns), cosine_matrix(nt)) for ns, nt in nodes]).mean()
            bank = self._bank_sample(k)
            cross = s.sum() * 0.0
            if bank is not None:
                ns_all = torch.cat([p[0] for p in nodes])
                nt_all = torch.cat([p[1] for p in nodes])
                cross = F.mse_loss(cosine_matrix(ns_all, bank), cosine_matrix(nt_all, bank))
            if self.training:
                self._push(k, torch.cat([p[1] for p in nodes]).detach())
            return {"affinity": self.affinity_weight * affinity_loss(s, t),
                    "node": self.node_weight * node,
                    "edge": self.edge_weight * (edge + cross)}

        return scaled(self.name, mean_over_teachers(t_outs, one), self.weight)
