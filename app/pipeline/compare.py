"""Compare stage: the same frames through a second model (``--compare-weights OTHER``).

Sits between inference and postprocess, on its own thread, so model B runs on frame n while
model A already runs on frame n+1. Like the inference stage it builds its backend inside its
own thread (CUDA objects belong to it) and takes input size and threshold from the model's
metadata. Without a model (the default, or after the window switched it off) it passes frames
straight on. A model that cannot be loaded is a notice, not a fatal error: model A goes on.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import cv2
import numpy as np

from ..errors import AppError, crash_report
from .channels import Closed
from .inference import ModelInfo, _default_factory, open_backend, preset_of
from .items import Frame
from .preprocess import resize_for_model

CONTOUR_B_RGB = (255, 0, 255)  # magenta: model B's outline beside model A's green


class CompareStage(threading.Thread):
    def __init__(self, inbox, outbox, *, stats_ref: Callable, events, model_path: str | None = None,
                 backend: str = "auto", factory: Callable | None = None, device=None, threads: int | None = None):
        super().__init__(name="compare", daemon=True)
        self.inbox, self.outbox = inbox, outbox
        self.stats_ref = stats_ref
        self.events = events
        self.backend_name = backend
        self.factory = factory or _default_factory
        self.device, self.threads = device, threads
        self.info: ModelInfo | None = None
        self._backend = None
        self._lock = threading.Lock()
        self._wanted: tuple[str | None] | None = (model_path,) if model_path else None
        self._halt = threading.Event()
        self.loaded = threading.Event()  # set after each load attempt (tests, headless start-up)
        if not model_path:
            self.loaded.set()

    def set_model(self, path: str | None) -> None:
        """Load `path` (None: stop comparing) before the next frame. Any thread."""
        with self._lock:
            self._wanted = (path,)
            self.loaded.clear()

    def stop(self) -> None:
        self._halt.set()
        self.loaded.set()  # nobody may wait for a load that will not come

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                self._apply_wanted()
                item = self.inbox.get(timeout=0.1)
                if item is None:
                    continue
                if isinstance(item, Frame) and self._backend is not None and not (item.refresh and item.probs_b is not None):
                    self._predict(item)
                self.outbox.put(item)
        except Closed:
            pass
        except Exception as exc:  # a bug, not a user error: stop loudly
            self.events.fatal(crash_report("compare", exc))
        finally:
            self._close_backend()

    def _apply_wanted(self) -> None:
        with self._lock:
            wanted, self._wanted = self._wanted, None
        if wanted is None:
            return
        (path,) = wanted
        self._close_backend()
        self.info = None
        if path:
            try:
                b = open_backend(path, self.backend_name, factory=self.factory, device=self.device,
                                 threads=self.threads, notice=lambda text: self.events.notice(text, "fallback"))
                self._backend = b
                self.info = ModelInfo(b.name, str(getattr(b, "path", path)), tuple(b.input_size), float(b.threshold),
                                      list(getattr(b, "notes", []) or []), preset_of(b))
            except AppError as exc:
                self.events.notice(f"compare model not loaded: {exc}")
        self.loaded.set()
        self.events.compare_ready(self.info)

    def _predict(self, frame: Frame) -> None:
        size = self.info.input_size
        x = frame.model_input
        if x is None or x.shape[:2] != size:
            x = resize_for_model(frame.image, size)
        t0 = time.perf_counter()
        try:
            probs = self._backend.predict(x[None])[0]
        except Exception as exc:
            self.events.notice(f"compare model failed while running ({exc}); comparison stopped")
            self._close_backend()
            self.info = None
            self.events.compare_ready(None)
            return
        frame.infer_ms_b = (time.perf_counter() - t0) * 1000.0
        frame.probs_b = probs
        if not frame.refresh:
            self.stats_ref().inference_b(frame.infer_ms_b)

    def _close_backend(self) -> None:
        if self._backend is not None:
            try:
                self._backend.close()
            except Exception:
                pass
            self._backend = None


def draw_contour_b(image: np.ndarray, mask_b: np.ndarray, thickness: int, color=CONTOUR_B_RGB) -> np.ndarray:
    """In place: model B's outline, in its own colour over model A's overlay."""
    contours, _ = cv2.findContours(mask_b, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, color, thickness, lineType=cv2.LINE_8)
    return image
