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


def color_yuv(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """(Y, U, V) of an RGB colour, by the same BT.601 limited-range conversion the recorder
    applies to RGB frames (so both paths tint alike)."""
    rgb = np.empty((2, 2, 3), np.uint8)
    rgb[:] = color
    yuv = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).ravel()
    return int(yuv[0]), int(yuv[4]), int(yuv[5])


def _tint(plane: np.ndarray, value: int, fill: np.ndarray | None, outline: np.ndarray | None, opacity: float) -> None:
    """In place, as `draw_overlay` does on RGB: `value` blended at `opacity` where `fill`,
    then `value` itself where `outline`."""
    const = np.full_like(plane, value)
    if fill is not None:
        cv2.copyTo(cv2.addWeighted(plane, 1.0 - float(opacity), const, float(opacity), 0.0), fill, plane)
    if outline is not None:
        cv2.copyTo(const, outline, plane)


def draw_overlay_i420(frame, roi, opacity: float, contour: bool, color: tuple[int, int, int] = MASK_RGB):
    """A yuv420p av.VideoFrame: the decoded `frame` with the overlay of `roi` (a MaskROI at
    the frame's size) drawn into its planes, ready for the encoder: one copy of the 4:2:0
    picture and work in the mask's box only, where the RGB path converts the whole frame to RGB,
    copies it, and converts it back. Luma is blended per pixel and chroma per 2x2 block with the
    weight of the block's top-left pixel, which is what converting the RGB overlay to 4:2:0
    does; the contour is as thick as on the RGB overlay of the same frame."""
    import av

    from .preprocess import i420_planes

    x, y, w, h = cv2.boundingRect(roi.mask) if roi.mask.size else (0, 0, 0, 0)
    if w == 0 or h == 0 or (opacity <= 0 and not contour):
        return frame  # nothing to draw: the decoded frame itself (encoders only read it)
    out = av.VideoFrame(frame.width, frame.height, "yuv420p")
    src, dst = i420_planes(frame), i420_planes(out)
    for s, d in zip(src, dst):
        d[:] = s
    # The box, in frame coordinates, grown to even corners (chroma blocks) and by the contour's
    # reach outside the mask.
    t = contour_thickness(frame.height, frame.width)
    grow = t if contour else 0
    x0, y0 = max(0, roi.x + x - grow) & ~1, max(0, roi.y + y - grow) & ~1
    x1 = min(frame.width, roi.x + x + w + grow + 1) & ~1
    y1 = min(frame.height, roi.y + y + h + grow + 1) & ~1
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    mh, mw = roi.mask.shape
    # paste the part of the ROI mask inside the box
    sx0, sy0 = max(x0, roi.x), max(y0, roi.y)
    sx1, sy1 = min(x1, roi.x + mw), min(y1, roi.y + mh)
    mask[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = roi.mask[sy0 - roi.y:sy1 - roi.y, sx0 - roi.x:sx1 - roi.x]
    fill = mask if opacity > 0 else None
    outline = None
    if contour:
        outline = np.zeros_like(mask)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(outline, contours, -1, 255, t, lineType=cv2.LINE_8)
    cy, cu, cv = color_yuv(color)
    _tint(dst[0][y0:y1, x0:x1], cy, fill, outline, opacity)
    # chroma: each 2x2 block takes its top-left pixel's weight, as RGB -> 4:2:0 does
    fill2 = None if fill is None else np.ascontiguousarray(fill[::2, ::2])
    outline2 = None if outline is None else np.ascontiguousarray(outline[::2, ::2])
    _tint(dst[1][y0 // 2:y1 // 2, x0 // 2:x1 // 2], cu, fill2, outline2, opacity)
    _tint(dst[2][y0 // 2:y1 // 2, x0 // 2:x1 // 2], cv, fill2, outline2, opacity)
    return out
