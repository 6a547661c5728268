"""Postprocess stage: model probabilities -> binary mask at frame (or display) resolution."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def _to_p8(probs: np.ndarray) -> np.ndarray:
    return np.clip(probs * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _threshold(p8: np.ndarray, threshold: float) -> np.ndarray:
    level = int(round(float(threshold) * 255.0))
    if level <= 0:
        return np.full(p8.shape, 255, np.uint8)
    # mask = p >= threshold  <=>  p8 > level - 1
    _, mask = cv2.threshold(p8, level - 1, 255, cv2.THRESH_BINARY)
    return mask


def probs_to_mask(probs: np.ndarray, frame_hw: tuple[int, int], threshold: float) -> np.ndarray:
    """uint8 mask {0, 255} at `frame_hw`: bilinear upsampling of the probabilities, then the
    threshold (smoother edges than thresholding first). Works in 8 bits: the resize of a
    1080p map costs a fraction of the float32 one, and 1/255 is finer than any useful threshold."""
    h, w = frame_hw
    p8 = _to_p8(probs)
    if p8.shape != (h, w):
        p8 = cv2.resize(p8, (w, h), interpolation=cv2.INTER_LINEAR)
    return _threshold(p8, threshold)


@dataclass
class MaskROI:
    """A frame-resolution mask kept as its bounding box: `mask` (h, w) placed at (x, y) in a
    frame of `frame_hw`; everything outside is 0. Polyps are small: at 1080p this is a
    fraction of the full mask's cost."""

    frame_hw: tuple[int, int]
    x: int
    y: int
    mask: np.ndarray  # uint8 {0, 255}, possibly (0, 0)

    def full(self) -> np.ndarray:
        out = np.zeros(self.frame_hw, np.uint8)
        h, w = self.mask.shape
        out[self.y:self.y + h, self.x:self.x + w] = self.mask
        return out


def probs_to_mask_roi(probs: np.ndarray, frame_hw: tuple[int, int], threshold: float) -> MaskROI:
    """The mask `probs_to_mask` gives, computed only where it can be non-zero.

    A bilinear sample is >= the threshold only if one of its four source pixels is, so the
    output box is the model-size box of pixels >= threshold grown by one source pixel and
    mapped through the same half-pixel-centred scaling cv2.resize uses; inside it the same
    interpolation (warpAffine, 1/32-pixel weights instead of resize's 1/2048) gives the same
    mask but for boundary pixels whose value sits on the threshold."""
    H, W = frame_hw
    p8 = _to_p8(probs)
    ph, pw = p8.shape
    level = int(round(float(threshold) * 255.0))
    if level <= 0 or (ph, pw) == (H, W):
        return MaskROI(frame_hw, 0, 0, probs_to_mask(probs, frame_hw, threshold))
    bx, by, bw, bh = cv2.boundingRect((p8 >= level).view(np.uint8))
    if bw == 0 or bh == 0:
        return MaskROI(frame_hw, 0, 0, np.zeros((0, 0), np.uint8))
    sx, sy = pw / W, ph / H  # source pixels per output pixel
    # output pixel u samples source (u + 0.5) * s - 0.5; keep those within [b0 - 1, b1 + 1]
    x0 = max(0, int(np.floor((bx - 1 + 0.5) / sx - 0.5)))
    x1 = min(W, int(np.ceil((bx + bw + 0.5) / sx - 0.5)) + 1)
    y0 = max(0, int(np.floor((by - 1 + 0.5) / sy - 0.5)))
    y1 = min(H, int(np.ceil((by + bh + 0.5) / sy - 0.5)) + 1)
    m = np.float32([[sx, 0, (x0 + 0.5) * sx - 0.5], [0, sy, (y0 + 0.5) * sy - 0.5]])
    roi = cv2.warpAffine(p8, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REPLICATE)
    return MaskROI(frame_hw, x0, y0, _threshold(roi, threshold))
