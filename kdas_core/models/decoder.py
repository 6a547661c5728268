"""Polyp-PVT decoder: CIM on stage 1, CFM over stages 2-4, SAM joining both (Dong et al., 2021).

Differences from the published code, all shape-only:
- upsampling goes to the next stage's exact size instead of a fixed x2, so inputs whose side
  is not a multiple of 32 still work;
- the channel-attention width follows the backbone (the paper hard-codes 64 for PVTv2-b2).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdas_core.models.blocks import BasicConv2d, ChannelAttention, SpatialAttention


def _up_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=True)


class CIM(nn.Module):
    """Camouflage identification module: channel then spatial attention on the stage-1 features."""

    def __init__(self, channels: int):
        super().__init__()
        self.ca = ChannelAttention(channels)
        self.sa = SpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ca(x) * x
        return self.sa(x) * x


class CFM(nn.Module):
    """Cascaded fusion module: deep (x4) to shallow (x2) with multiplicative gating."""

    def __init__(self, channel: int):
        super().__init__()
        c = channel
        self.conv_upsample1 = BasicConv2d(c, c, 3, padding=1)
        self.conv_upsample2 = BasicConv2d(c, c, 3, padding=1)
        self.conv_upsample3 = BasicConv2d(c, c, 3, padding=1)
        self.conv_upsample4 = BasicConv2d(c, c, 3, padding=1)
        self.conv_upsample5 = BasicConv2d(2 * c, 2 * c, 3, padding=1)
        self.conv_concat2 = BasicConv2d(2 * c, 2 * c, 3, padding=1)
        self.conv_concat3 = BasicConv2d(3 * c, 3 * c, 3, padding=1)
        self.conv4 = BasicConv2d(3 * c, c, 3, padding=1)

    def forward(self, x4: torch.Tensor, x3: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x4_up3 = _up_to(x4, x3)
        x3_1 = self.conv_upsample1(x4_up3) * x3
        x2_1 = self.conv_upsample2(_up_to(x4_up3, x2)) * self.conv_upsample3(_up_to(x3, x2)) * x2
        x3_2 = self.conv_concat2(torch.cat([x3_1, self.conv_upsample4(x4_up3)], dim=1))
        x2_2 = self.conv_concat3(torch.cat([x2_1, self.conv_upsample5(_up_to(x3_2, x2))], dim=1))
        return self.conv4(x2_2)


class GCN(nn.Module):
    """Graph convolution over the SAM's anchor nodes."""

    def __init__(self, num_state: int, num_node: int):
        super().__init__()
        self.conv1 = nn.Conv1d(num_node, num_node, kernel_size=1)
        self.conv2 = nn.Conv1d(num_state, num_state, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x.permute(0, 2, 1)).permute(0, 2, 1)
        return torch.relu(self.conv2(h - x))


class SAM(nn.Module):
    """Similarity aggregation module: non-local reasoning over 4x4 pooled anchors of the CFM map,
    gated by the (downsampled) CIM features."""

    def __init__(self, num_in: int = 32, plane_mid: int = 16, mids: int = 4):
        super().__init__()
        self.num_s = plane_mid
        self.mids = mids
        self.conv_state = nn.Conv2d(num_in, plane_mid, kernel_size=1)
        self.conv_proj = nn.Conv2d(num_in, plane_mid, kernel_size=1)
        self.gcn = GCN(num_state=plane_mid, num_node=mids * mids)
        self.conv_extend = nn.Conv2d(plane_mid, num_in, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        edge = F.interpolate(edge, size=(h, w), mode="nearest")
        # As published: softmax over the CIM channels, keep channel 1 as the foreground gate.
        edge = torch.softmax(edge, dim=1)[:, 1:2]
        x_state = self.conv_state(x).reshape(n, self.num_s, -1)
        x_proj = self.conv_proj(x)
        anchors = F.adaptive_avg_pool2d(x_proj * edge, self.mids + 2)[:, :, 1:-1, 1:-1]
        anchors = anchors.reshape(n, self.num_s, -1)
        affinity = torch.softmax(torch.matmul(anchors.permute(0, 2, 1), x_proj.reshape(n, self.num_s, -1)), dim=1)
        node_state = self.gcn(torch.matmul(x_state, affinity.permute(0, 2, 1)))
        x_state = torch.matmul(node_state, affinity).reshape(n, self.num_s, h, w)
        return x + self.conv_extend(x_state)


class PolypPVTDecoder(nn.Module):
    """CIM + CFM + SAM with the two 1-channel heads (P1 from CFM, P2 from SAM)."""

    def __init__(self, encoder_channels: list[int], channel: int = 32):
        super().__init__()
        c1, c2, c3, c4 = encoder_channels
        self.cim = CIM(c1)
        self.translayer2_0 = BasicConv2d(c1, channel, 1)
        self.translayer2_1 = BasicConv2d(c2, channel, 1)
        self.translayer3_1 = BasicConv2d(c3, channel, 1)
        self.translayer4_1 = BasicConv2d(c4, channel, 1)
        self.cfm = CFM(channel)
        self.sam = SAM(num_in=channel)
        self.out_cfm = nn.Conv2d(channel, 1, 1)
        self.out_sam = nn.Conv2d(channel, 1, 1)

    def forward(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x1, x2, x3, x4 = feats
        cim = self.cim(x1)
        cfm = self.cfm(self.translayer4_1(x4), self.translayer3_1(x3), self.translayer2_1(x2))
        t2 = F.interpolate(self.translayer2_0(cim), size=cfm.shape[-2:], mode="bilinear", align_corners=True)
        sam = self.sam(cfm, t2)
        return {"cim": cim, "cfm": cfm, "sam": sam, "p1_low": self.out_cfm(cfm), "p2_low": self.out_sam(sam)}
