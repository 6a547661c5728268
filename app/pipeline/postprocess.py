"""Postprocess stage: model probabilities -> binary mask at frame (or display) resolution."""

from __future__ import annotations

import math
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


def _tile_span(lo: int, hi: int, src_len: int, out_len: int) -> tuple[int, int, int, int]:
    """Source span [c0, c1) covering [lo, hi) and its exact image [x0, x1) in the output:
    cut at whole tiles of the scaling (src_len / out_len = s / g in lowest terms), where a
    crop resized on its own samples exactly where the whole map resized does."""
    k = math.gcd(src_len, out_len)
    s, g = src_len // k, out_len // k
    c0 = max(0, lo // s * s)
    c1 = min(src_len, -(-hi // s) * s)
    return c0, c1, c0 // s * g, c1 // s * g


def probs_to_mask_roi(probs: np.ndarray, frame_hw: tuple[int, int], threshold: float) -> MaskROI:
    """The mask `probs_to_mask` gives, computed only where it can be non-zero.

    A bilinear sample is >= the threshold only if one of its source pixels is, so only the
    model-size box of pixels >= threshold, grown by one pixel, is resized: a crop cut at whole
    tiles of the scaling, which cv2.resize maps exactly as it maps the whole map. Outside, every
    source pixel is below the threshold, and so is every sample."""
    H, W = frame_hw
    p8 = _to_p8(probs)
    ph, pw = p8.shape
    level = int(round(float(threshold) * 255.0))
    if level <= 0 or (ph, pw) == (H, W):
        return MaskROI(frame_hw, 0, 0, probs_to_mask(probs, frame_hw, threshold))
    bx, by, bw, bh = cv2.boundingRect((p8 >= level).view(np.uint8))
    if bw == 0 or bh == 0:
        return MaskROI(frame_hw, 0, 0, np.zeros((0, 0), np.uint8))
    cx0, cx1, x0, x1 = _tile_span(bx - 1, bx + bw + 1, pw, W)
    cy0, cy1, y0, y1 = _tile_span(by - 1, by + bh + 1, ph, H)
    roi = cv2.resize(p8[cy0:cy1, cx0:cx1], (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    return MaskROI(frame_hw, x0, y0, _threshold(roi, threshold))
