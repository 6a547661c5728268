"""Polyp-PVT-style segmenter: encoder + CIM/CFM/SAM decoder + two 1-channel heads."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdas_core.models.decoder import PolypPVTDecoder
from kdas_core.models.encoder import Encoder


class PolypPVT(nn.Module):
    """forward(x) returns a dict:

    - ``p1``, ``p2``: logits (B,1,H,W) at input resolution (CFM head, SAM head);
    - ``p1_low``, ``p2_low``: the same at stride 8, before upsampling;
    - ``features``: the 4 encoder stages (strides 4..32);
    - ``cim``, ``cfm``, ``sam``: the decoder's intermediate maps (for feature distillers).

    Inference uses sigmoid(p1 + p2), see :meth:`predict_logits`.
    """

    def __init__(self, backbone: str, channel: int = 32):
        super().__init__()
        self.encoder = Encoder(backbone)
        self.decoder = PolypPVTDecoder(self.encoder.channels, channel)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        feats = self.encoder(x)
        out: dict = self.decoder(feats)
        size = x.shape[-2:]
        out["p1"] = F.interpolate(out["p1_low"], size=size, mode="bilinear", align_corners=False)
        out["p2"] = F.interpolate(out["p2_low"], size=size, mode="bilinear", align_corners=False)
        out["features"] = feats
        return out

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Fused logits P1 + P2, the map every evaluation and export uses."""
        out = self.forward(x)
        return out["p1"] + out["p2"]
