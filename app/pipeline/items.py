"""What travels between stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np


@dataclass
class Frame:
    """One video frame on its way through the pipeline; each stage fills in its own field.

    HD frames are never converted whole unless something asks: a file's frame arrives as the
    decoder's own 4:2:0 picture (`decoded`), the model gets a model-size RGB, the window a
    display-size one (`view`), and headless mode draws the overlay straight into a copy of the
    4:2:0 picture for the encoder (`full_output`). `image`, `mask` and `overlay` (full
    resolution, RGB) still work everywhere: read them and they are made on first use, which at
    1080p costs a few milliseconds each, so the hot path does not."""

    index: int  # decode order in the source (keeps counting across --loop repeats)
    pts: float | None  # seconds on the source's timeline (None: live camera)
    image: np.ndarray | None  # RGB uint8 (H, W, 3) at source resolution (made from `decoded` on first read)
    t_capture: float  # time.perf_counter() when decoded/grabbed: start of end-to-end latency
    epoch: int = 0  # bumped on seek / source change so stale in-flight frames can be skipped
    model_input: np.ndarray | None = None  # RGB uint8 at the model's input size
    probs: np.ndarray | None = None  # float32 (h, w) at model size
    infer_ms: float = 0.0
    mask: np.ndarray | None = None  # uint8 {0, 255} (H, W) at frame resolution (made from mask_roi on first read)
    overlay: np.ndarray | None = None  # RGB uint8 (H, W, 3) at frame resolution (made on first read)
    refresh: bool = False  # a re-render of the last frame (settings changed while paused)
    probs_b: np.ndarray | None = None  # compare mode: the second model's probabilities (its size)
    infer_ms_b: float = 0.0
    mask_b: np.ndarray | None = None  # compare mode: the second model's mask at frame resolution
    analysis: object | None = None  # analysis.FrameAnalysis: area, box, cue, agreement
    probs_raw: np.ndarray | None = None  # the model's probabilities before the temporal filter
    decoded: Any = None  # the decoder's yuv420p av.VideoFrame (files), or None (cameras, other formats)
    view: np.ndarray | None = None  # RGB uint8 at display size (window only)
    view_mask: np.ndarray | None = None  # uint8 {0, 255} at display size
    view_overlay: np.ndarray | None = None  # RGB uint8 at display size: what the window shows
    mask_roi: Any = None  # MaskROI: the frame-resolution mask inside its bounding box (made on first read)
    threshold: float | None = None  # what postprocess thresholded with
    style: Any = None  # (opacity, contour, colour) the overlay stage drew with

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) at source resolution, without converting anything."""
        if self.decoded is not None:
            return self.decoded.height, self.decoded.width
        return self.image.shape[:2]

    def full_output(self):
        """The overlaid frame at source resolution, as the recorder takes it: a yuv420p
        av.VideoFrame (drawn into a copy of the decoded picture: no RGB at all) or, for RGB
        sources, the RGB overlay. Made once, on first call."""
        cached = self.__dict__.get("_full_output")
        if cached is None:
            from .overlay import draw_overlay_i420

            if self.decoded is not None and self.__dict__.get("_overlay") is None:
                opacity, contour, color = self.style
                cached = draw_overlay_i420(self.decoded, self.mask_roi, opacity, contour, color)
            else:
                cached = self.overlay
            self.__dict__["_full_output"] = cached
        return cached


class _Lazy:
    """A Frame field made on first read by `make(frame)` when nothing has set it."""

    def __init__(self, name: str, make):
        self.key, self.make = "_" + name, make

    def __get__(self, obj, owner=None):
        if obj is None:
            return None  # the dataclass default
        value = obj.__dict__.get(self.key)
        if value is None:
            value = self.make(obj)
            if value is not None:
                obj.__dict__[self.key] = value
        return value

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.key] = value


def _make_image(frame: Frame):
    if frame.decoded is None:
        return None
    from .source import frame_to_rgb

    return frame_to_rgb(frame.decoded)


def _make_mask_roi(frame: Frame):
    if frame.probs is None or frame.threshold is None:
        return None
    from .postprocess import probs_to_mask_roi

    return probs_to_mask_roi(frame.probs, frame.size, frame.threshold)


def _make_mask(frame: Frame):
    return None if frame.mask_roi is None else frame.mask_roi.full()


def _make_overlay(frame: Frame):
    if frame.style is None or frame.mask_roi is None and frame.__dict__.get("_mask") is None:
        return None
    from .overlay import draw_overlay
    from .source import frame_to_rgb

    out = frame.__dict__.get("_full_output")
    if out is not None and not isinstance(out, np.ndarray):
        return frame_to_rgb(out)  # what the recorder got, as RGB
    opacity, contour, color = frame.style
    return draw_overlay(frame.image, frame.mask, opacity, contour, color)


Frame.image = _Lazy("image", _make_image)
Frame.mask_roi = _Lazy("mask_roi", _make_mask_roi)
Frame.mask = _Lazy("mask", _make_mask)
Frame.overlay = _Lazy("overlay", _make_overlay)


@dataclass(frozen=True)
class EndOfStream:
    """Sent down the pipeline after a source's last frame. `error` is set when the source
    stopped because of bad data; the frames before it still flow (and get recorded)."""

    epoch: int = 0
    error: str | None = None


NoticeKind = Literal["fallback", "recording", "info"]


@dataclass(frozen=True)
class Notice:
    """Something the user should see that does not stop the pipeline. `kind` says what it is about,
    so a consumer switches on it instead of reading the words: "fallback" (the model's backend
    failed and another one took over, or will run on the CPU), "recording" (writing the recording
    failed and it stopped), "info" (anything else: the compare model, a lost camera, ...)."""

    kind: NoticeKind
    text: str
