"""Joint image/mask augmentation with torchvision.transforms.v2 (image and mask see the same
geometry; only the image gets colour jitter)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2


def to_tensor(image: np.ndarray, mask: np.ndarray | None, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HWC uint8 image (+ HW mask) -> CHW uint8 image at size x size (+ 1xHxW float mask)."""
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    img = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    img = img[0].round().clamp(0, 255).to(torch.uint8)
    if mask is None:
        return img, None
    m = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)[0]
    return img, (m > 0.5).float()


class TrainAugment:
    """Flips, rotation, random resized crop, colour jitter. Every op really runs (p > 0)."""

    def __init__(self, size: int):
        self.geometric = v2.Compose([
            v2.RandomHorizontalFlip(0.5),
            v2.RandomVerticalFlip(0.5),
            v2.RandomApply([v2.RandomRotation(degrees=90)], p=0.5),
            v2.RandomApply([v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True)], p=0.5),
        ])
        self.colour = v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2, 0.02)], p=0.5)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None,
                 targets_fill: float = 0.0):
        """(image, mask) or, with teacher `targets` (C,H,W float maps), (image, mask, targets): the
        targets get the very same geometry (one call draws the parameters once for all inputs),
        resampled bilinearly; regions a rotation brings in are `targets_fill`."""
        if targets is None:
            img_tv, mask_tv = self.geometric(tv_tensors.Image(image), tv_tensors.Mask(mask))
        else:
            # Rotation fills with 0: shift the maps so that 0 stands for targets_fill.
            img_tv, mask_tv, t_tv = self.geometric(tv_tensors.Image(image), tv_tensors.Mask(mask),
                                                   tv_tensors.Image(targets - targets_fill))
        img = self.colour(img_tv)
        out = (img.as_subclass(torch.Tensor), (mask_tv.as_subclass(torch.Tensor) > 0.5).float())
        return out if targets is None else out + (t_tv.as_subclass(torch.Tensor) + targets_fill,)
