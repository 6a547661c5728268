"""Overlay stage: tinted fill (with opacity) and contour of the mask over the frame."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import cv2
import numpy as np

MASK_RGB = (0, 255, 0)  # pure green: absent from endoscopy footage, so the mask stands out


@dataclass
class OverlaySettings:
    """Live-tunable settings, read by the postprocess/overlay threads for every frame.
    `threshold` None means "the model's own threshold" (filled in when the backend is ready)."""

    threshold: float | None = None
    opacity: float = 0.4
    contour: bool = True
    color: tuple[int, int, int] = MASK_RGB
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def update(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                if not hasattr(self, k) or k.startswith("_"):
                    raise AttributeError(k)
                setattr(self, k, v)


def contour_thickness(height: int, width: int) -> int:
    return max(1, round(min(height, width) / 200))


def draw_overlay(image: np.ndarray, mask: np.ndarray, opacity: float, contour: bool,
                 color: tuple[int, int, int] = MASK_RGB) -> np.ndarray:
    """New RGB image: `image` with `color` blended at `opacity` where mask > 0, plus the
    mask's outline. Work is limited to the mask's bounding box (polyps are small)."""
    out = image.copy()
    x, y, w, h = cv2.boundingRect(mask)
    if w == 0 or h == 0:
        return out
    if opacity > 0:
        roi = out[y:y + h, x:x + w]
        tint = np.empty_like(roi)
        tint[:] = color
        blended = cv2.addWeighted(roi, 1.0 - float(opacity), tint, float(opacity), 0.0)
        cv2.copyTo(blended, mask[y:y + h, x:x + w], roi)
    if contour:
        contours, _ = cv2.findContours(mask[y:y + h, x:x + w], cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x, y))
        cv2.drawContours(out, contours, -1, color, contour_thickness(*image.shape[:2]), lineType=cv2.LINE_8)
    return out
