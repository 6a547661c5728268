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


# BT.601 limited range, the constants of OpenCV's YUV420 -> RGB converter (x / 2**20), so this
# path and `frame_to_rgb` agree: R = 1.164 (Y - 16) + 1.596 (V - 128), and so on.
_CY, _CVR, _CVG, _CUG, _CUB = (c / 2 ** 20 for c in (1220542, 1673527, -852492, -409993, 2116026))
_YUV_TO_RGB = np.float32([
    [_CY, 0.0, _CVR, -16 * _CY - 128 * _CVR],
    [_CY, _CUG, _CVG, -16 * _CY - 128 * (_CUG + _CVG)],
    [_CY, _CUB, 0.0, -16 * _CY - 128 * _CUB],
])


def reduced_rgb(frame, factor: int) -> np.ndarray:
    """RGB of a yuv420p frame at 1/`factor` of its size (1, 2 or 4). Luma is box-filtered
    (factor x factor averages: the one pass over the full-resolution pixels), chroma by
    factor / 2 (at 2 it is used as it is), and the 4:4:4 result is converted with the BT.601
    maths of the full-size converter at a quarter of the pixels or fewer. Against converting
    at full size and then box-shrinking: mean difference about 0.1 grey levels."""
    from .source import frame_to_rgb

    if factor == 1:
        return frame_to_rgb(frame)
    y, u, v = i420_planes(frame)
    h, w = frame.height // factor, frame.width // factor
    y = cv2.resize(y, (w, h), interpolation=cv2.INTER_AREA)
    if factor > 2:
        u = cv2.resize(u, (w, h), interpolation=cv2.INTER_AREA)
        v = cv2.resize(v, (w, h), interpolation=cv2.INTER_AREA)
    return cv2.transform(cv2.merge([y, np.ascontiguousarray(u), np.ascontiguousarray(v)]), _YUV_TO_RGB)


def reduction_factor(frame_hw: tuple[int, int], need_hw: tuple[float, float]) -> int:
    """The largest of 1, 2, 4 that divides the frame into an even 4:2:0 picture still at least
    `need_hw`."""
    H, W = frame_hw
    for f in (4, 2):
        if H % (2 * f) == 0 and W % (2 * f) == 0 and H // f >= need_hw[0] and W // f >= need_hw[1]:
            return f
    return 1


def prepare(frame, model_hw: tuple[int, int], view_box: tuple[int, int] | None) -> None:
    """Fill `frame.model_input` and, when a display box (W, H) is given, `frame.view`.

    A decoded yuv420p frame is converted to RGB once, at the largest power-of-two reduction
    still at least 1.5 times the model size, so the model's input is shrunk with a proper
    filter and does not depend on the window's size (1080p for a 256 or 352 model: 960x540, a
    quarter of the pixels). The display-size frame comes from the same conversion when that
    is big enough for it (a 948x533 widget), else from its own (a full-screen window). Other
    frames (cameras, RGB formats) are shrunk from their RGB image."""
    H, W = frame.size
    view_hw = fit_size((H, W), view_box) if view_box else None
    if frame.decoded is None:
        base = frame.image
        frame.model_input = resize_for_model(base, model_hw)
        if view_hw is not None:
            frame.view = resize(base, view_hw)
        return
    f = reduction_factor((H, W), (1.5 * model_hw[0], 1.5 * model_hw[1]))
    base = reduced_rgb(frame.decoded, f)
    if f == 1:
        frame.image = base  # the full conversion was made anyway: keep it
    frame.model_input = resize_for_model(base, model_hw)
    if view_hw is not None:
        fv = reduction_factor((H, W), view_hw)
        frame.view = resize(base if fv >= f else reduced_rgb(frame.decoded, fv), view_hw)
