"""Preprocess stage: the model-size frame (size taken from the backend) and, in the window, the
display-size frame, each made with as few passes over the full-resolution pixels as possible."""

from __future__ import annotations

import cv2
import numpy as np


def resize(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """`image` (RGB or one plane, uint8) at `size_hw`, by the cheapest filter that does not
    alias: bilinear when growing or shrinking by less than 2x; OpenCV's fast box filter for a
    whole-number shrink; for a bigger shrink, bilinear to twice the size and then the box
    (1080p -> 352: 1.5 ms instead of 11.5 ms for OpenCV's general area filter, mean difference
    0.2 grey levels). The general area filter is never used: at a ratio like 960 -> 948 it
    costs 15 ms."""
    h, w = size_hw
    ih, iw = image.shape[:2]
    if (ih, iw) == (h, w):
        return np.ascontiguousarray(image)
    if ih % h == 0 and iw % w == 0:
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    if ih > 2 * h or iw > 2 * w:
        image = cv2.resize(image, (2 * w, 2 * h), interpolation=cv2.INTER_LINEAR)
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def resize_for_model(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """RGB uint8 at the model's input size `size_hw` (see `resize`). Normalisation is the
    backend's job: it reads mean/std from the model's own metadata."""
    return resize(image, size_hw)


def fit_size(frame_hw: tuple[int, int], box_wh: tuple[int, int] | None) -> tuple[int, int]:
    """(H, W) of the frame fitted inside a box of (W, H) pixels, aspect kept, never enlarged
    (the widget scales small videos up itself). No box: the frame's own size."""
    H, W = frame_hw
    if not box_wh or box_wh[0] <= 0 or box_wh[1] <= 0:
        return H, W
    scale = min(box_wh[0] / W, box_wh[1] / H, 1.0)
    return max(1, round(H * scale)), max(1, round(W * scale))


def i420_planes(frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, U, V of a yuv420p av.VideoFrame as numpy views of its own buffers (no copy)."""
    out = []
    for i, plane in enumerate(frame.planes):
        h, w = (frame.height, frame.width) if i == 0 else (frame.height // 2, frame.width // 2)
        out.append(np.frombuffer(plane, np.uint8).reshape(h, plane.line_size)[:, :w])
    return out[0], out[1], out[2]


def reduced_rgb(frame, factor: int) -> np.ndarray:
    """RGB of a yuv420p frame at 1/`factor` of its size (factor 2 or 4): each plane is
    box-filtered first (2x2 or 4x4 averages, one read of the full-resolution luma), then
    converted with the same BT.601 maths as the full-size path, at a quarter of the pixels or
    fewer. Against converting at full size and then shrinking: mean difference about 0.3 grey
    levels (chroma is averaged before instead of after the conversion)."""
    from .source import frame_to_rgb

    if factor == 1:
        return frame_to_rgb(frame)
    y, u, v = i420_planes(frame)
    h, w = frame.height // factor, frame.width // factor
    i420 = np.empty((h * 3 // 2, w), np.uint8)
    i420[:h] = cv2.resize(y, (w, h), interpolation=cv2.INTER_AREA)
    chroma = i420[h:].reshape(2, h // 2, w // 2)  # U then V, each a quarter of the luma
    chroma[0] = cv2.resize(u, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    chroma[1] = cv2.resize(v, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420)


def reduction_factor(frame_hw: tuple[int, int], *needs_hw: tuple[int, int]) -> int:
    """The largest of 1, 2, 4 that divides the frame into an even 4:2:0 picture still at least
    as big as every size in `needs_hw` (the model input, the display)."""
    H, W = frame_hw
    for f in (4, 2):
        if H % (2 * f) == 0 and W % (2 * f) == 0 and all(H // f >= h and W // f >= w for h, w in needs_hw):
            return f
    return 1


def prepare(frame, model_hw: tuple[int, int], view_box: tuple[int, int] | None) -> None:
    """Fill `frame.model_input` and, when a display box (W, H) is given, `frame.view`.

    A decoded yuv420p frame is converted to RGB once, at the smallest power-of-two reduction
    that is still at least the model size and the display size (1080p in a 948x533 widget:
    960x540, a quarter of the pixels); both outputs are shrunk from that. Other frames
    (cameras, RGB formats) are shrunk from their RGB image."""
    H, W = frame.size
    view_hw = fit_size((H, W), view_box) if view_box else None
    needs = [model_hw] + ([view_hw] if view_hw else [])
    if frame.decoded is not None:
        f = reduction_factor((H, W), *needs)
        base = reduced_rgb(frame.decoded, f) if f > 1 else frame.image
    else:
        base = frame.image
    frame.model_input = resize_for_model(base, model_hw)
    if view_hw is not None:
        frame.view = resize(base, view_hw)
