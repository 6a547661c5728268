"""Preprocess stage: resize the frame to the model's input size (taken from the backend)."""

from __future__ import annotations

import cv2
import numpy as np


def resize_for_model(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """RGB uint8 at `size_hw`. Area filter when shrinking (no aliasing), bilinear when growing.
    Normalisation is the backend's job: it reads mean/std from the model's own metadata."""
    h, w = size_hw
    if image.shape[:2] == (h, w):
        return np.ascontiguousarray(image)
    shrink = image.shape[0] > h or image.shape[1] > w
    if image.shape[0] > 2 * h and image.shape[1] > 2 * w:
        # Big shrink (1080p -> 352): bilinear to twice the size, then area. 1.5 ms instead
        # of 11.5 ms for area alone, mean difference 0.2 grey levels.
        image = cv2.resize(image, (2 * w, 2 * h), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
