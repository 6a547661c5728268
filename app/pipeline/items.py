"""What travels between stages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Frame:
    """One video frame on its way through the pipeline; each stage fills in its own field."""

    index: int  # decode order in the source (keeps counting across --loop repeats)
    pts: float | None  # seconds on the source's timeline (None: live camera)
    image: np.ndarray  # RGB uint8 (H, W, 3) at source resolution
    t_capture: float  # time.perf_counter() when decoded/grabbed: start of end-to-end latency
    epoch: int = 0  # bumped on seek / source change so stale in-flight frames can be skipped
    model_input: np.ndarray | None = None  # RGB uint8 at the model's input size
    probs: np.ndarray | None = None  # float32 (h, w) at model size
    infer_ms: float = 0.0
    mask: np.ndarray | None = None  # uint8 {0, 255} (H, W) at frame resolution
    overlay: np.ndarray | None = None  # RGB uint8 (H, W, 3): what is shown and recorded
    refresh: bool = False  # a re-render of the last frame (settings changed while paused)
    probs_b: np.ndarray | None = None  # compare mode: the second model's probabilities (its size)
    infer_ms_b: float = 0.0
    mask_b: np.ndarray | None = None  # compare mode: the second model's mask at frame resolution
    analysis: object | None = None  # analysis.FrameAnalysis: area, box, cue, agreement


@dataclass(frozen=True)
class EndOfStream:
    """Sent down the pipeline after a source's last frame. `error` is set when the source
    stopped because of bad data; the frames before it still flow (and get recorded)."""

    epoch: int = 0
    error: str | None = None
