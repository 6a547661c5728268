"""The common face of every backend: what the viewer codes against."""

from __future__ import annotations

import threading

import numpy as np


class Backend:
    """`predict(frames)` takes uint8 RGB frames (N,H,W,3) already resized to `input_size` and returns
    float32 probabilities (N,H,W) in [0,1] (sigmoid(P1+P2)).

    Attributes: `name` ("tensorrt" | "onnxruntime" | "torch"), `input_size` (H, W), `threshold`
    (from the checkpoint / exported metadata), `notes` (what happened while choosing and loading:
    fallbacks, skipped backends), `path` (the file it runs), `why_auto` (one line: what it is good
    for, said when `auto` picks it).

    Threading: construction reads and validates files (an ONNX Runtime CPU session, which is
    thread-agnostic, is created right away so a bad file fails at load time). Anything bound to
    a thread or a CUDA context (TensorRT engine/stream/buffers, torch CUDA weights, ORT GPU
    sessions) is created lazily by the first `predict`, in the thread that makes it, so a
    backend may be built in the GUI thread and used from one worker thread. `predict` holds a
    lock: concurrent calls from several threads are serialised, not interleaved.
    """

    name = "base"
    # Why `auto` would pick this backend when the ones before it in engines.BACKENDS could not run.
    why_auto = ""

    def __init__(self, path: str, input_size: int, threshold: float, meta: dict | None = None):
        self.path = path
        self.input_size: tuple[int, int] = (int(input_size), int(input_size))
        self.threshold = float(threshold)
        self.meta = dict(meta or {})
        self.notes: list[str] = []
        self._lock = threading.Lock()

    def check_frames(self, frames: np.ndarray) -> np.ndarray:
        """ValueError naming expected vs got for anything but uint8 (N,H,W,3) at input_size."""
        h, w = self.input_size
        if not isinstance(frames, np.ndarray):
            raise ValueError(f"frames must be a numpy array of shape (N,{h},{w},3) uint8, got {type(frames).__name__}")
        if frames.ndim != 4 or frames.shape[1:] != (h, w, 3):
            raise ValueError(f"frames must have shape (N,{h},{w},3) (uint8 RGB, resized to the model size); got {frames.shape}")
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 RGB (N,{h},{w},3); got dtype {frames.dtype}")
        if frames.shape[0] < 1:
            raise ValueError("frames must hold at least one frame (N >= 1); got N = 0")
        return np.ascontiguousarray(frames)

    def predict(self, frames: np.ndarray) -> np.ndarray:
        frames = self.check_frames(frames)
        with self._lock:  # sessions/contexts are not guaranteed re-entrant across threads
            return self._predict(frames)

    def _predict(self, frames: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release sessions/buffers. Safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.path} input={self.input_size}>"
