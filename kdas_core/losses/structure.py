"""Structure loss of PraNet / Polyp-PVT: boundary-weighted BCE + boundary-weighted IoU.

w = 1 + 5 * |avgpool31(G) - G| emphasises pixels near the mask boundary. Both terms use w;
the published code passes `reduce='none'` (a deprecated argument that means "reduce"), so its
BCE silently becomes an unweighted mean. Here the BCE really is per-pixel and weighted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def boundary_weights(mask: torch.Tensor) -> torch.Tensor:
    """1 + 5 * |avgpool31(G) - G| (zero padding counted, as avg_pool2d's default). The 31x31 box
    mean is computed as a 31x1 then a 1x31 mean: the same sum divided by 961, about 10x faster on
    CPU than the 2-D pool, which cost a third of a training step there."""
    with torch.no_grad():
        box = F.avg_pool2d(F.avg_pool2d(mask, (31, 1), stride=1, padding=(15, 0)), (1, 31), stride=1, padding=(0, 15))
        return 1 + 5 * torch.abs(box - mask)


def structure_loss(logits: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """logits, mask: (B,1,H,W); mask in {0,1}. Logits are resized to the mask if they differ.
    `weights`: boundary_weights(mask), when the caller scores several maps against one mask."""
    if logits.shape[-2:] != mask.shape[-2:]:
        logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    logits = logits.float()
    w = boundary_weights(mask) if weights is None else weights
    bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    wbce = (w * bce).sum(dim=(2, 3)) / w.sum(dim=(2, 3))
    prob = torch.sigmoid(logits)
    inter = (prob * mask * w).sum(dim=(2, 3))
    union = ((prob + mask) * w).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()
