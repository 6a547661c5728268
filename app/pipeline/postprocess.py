"""Postprocess stage: model probabilities -> binary mask at frame resolution."""

from __future__ import annotations

import cv2
import numpy as np


def probs_to_mask(probs: np.ndarray, frame_hw: tuple[int, int], threshold: float) -> np.ndarray:
    """uint8 mask {0, 255} at `frame_hw`: bilinear upsampling of the probabilities, then the
    threshold (smoother edges than thresholding first). Works in 8 bits: the resize of a
    1080p map costs a fraction of the float32 one, and 1/255 is finer than any useful threshold."""
    h, w = frame_hw
    p8 = np.clip(probs * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if p8.shape != (h, w):
        p8 = cv2.resize(p8, (w, h), interpolation=cv2.INTER_LINEAR)
    level = int(round(float(threshold) * 255.0))
    if level <= 0:
        return np.full((h, w), 255, np.uint8)
    # mask = p >= threshold  <=>  p8 > level - 1
    _, mask = cv2.threshold(p8, level - 1, 255, cv2.THRESH_BINARY)
    return mask
