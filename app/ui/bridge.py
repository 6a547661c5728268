"""Hand-over from pipeline threads to the GUI thread."""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np
from PyQt6.QtCore import QObject, pyqtSignal
from PyQt6.QtGui import QImage

from ..pipeline.items import EndOfStream, Frame, Notice, NoticeKind
from ..pipeline.runner import PipelineEvents


def to_qimage(rgb: np.ndarray) -> QImage:
    """A QImage that owns a copy of the pixels (the numpy buffer may be reused or freed)."""
    rgb = np.ascontiguousarray(rgb)
    h, w = rgb.shape[:2]
    return QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()


class QtEvents(QObject, PipelineEvents):
    """PipelineEvents as Qt signals: emitted from worker threads, delivered in the GUI thread."""

    modelReady = pyqtSignal(object)
    noticed = pyqtSignal(object)  # items.Notice
    signalChanged = pyqtSignal(bool, str)
    failed = pyqtSignal(str)
    ended = pyqtSignal(object)
    compareReady = pyqtSignal(object)

    def model_ready(self, info) -> None:
        self.modelReady.emit(info)

    def notice(self, text: str, kind: NoticeKind = "info") -> None:
        self.noticed.emit(Notice(kind, text))

    def signal(self, ok: bool, text: str) -> None:
        self.signalChanged.emit(ok, text)

    def fatal(self, text: str) -> None:
        self.failed.emit(text)

    def end_of_stream(self, eos: EndOfStream) -> None:
        self.ended.emit(eos)

    def compare_ready(self, info) -> None:
        self.compareReady.emit(info)


class DisplaySink(QObject):
    """Pipeline sink for the screen. Latest frame wins: if the GUI has not painted the previous
    frame yet, it is replaced (and counted as dropped, reason display_busy), so a busy GUI never
    builds up latency or memory. The QImage is made here, in the overlay thread; the GUI thread
    only paints it, and counts it shown there. `account` is Pipeline.account."""

    frameReady = pyqtSignal()

    def __init__(self, account: Callable):
        super().__init__()
        self._account = account
        self._lock = threading.Lock()
        self._pending: tuple[QImage, Frame] | None = None
        self._last: Frame | None = None

    def __call__(self, frame: Frame) -> None:
        image = to_qimage(frame.view_overlay if frame.view_overlay is not None else frame.overlay)
        meta = Frame(index=frame.index, pts=frame.pts, image=_EMPTY, t_capture=frame.t_capture,
                     epoch=frame.epoch, infer_ms=frame.infer_ms, refresh=frame.refresh,
                     infer_ms_b=frame.infer_ms_b, probs_b=frame.probs_b, analysis=frame.analysis)
        with self._lock:
            replaced = self._pending
            self._pending = (image, meta)
            self._last = frame
        if replaced is None:
            self.frameReady.emit()
        else:
            self._account(replaced[1], "dropped", "display_busy")  # a replaced re-render counts nowhere

    def full_image(self) -> QImage | None:
        """The last frame handed to the screen, overlaid at source resolution (for snapshots:
        the screen shows it at display size)."""
        with self._lock:
            frame = self._last
        return None if frame is None else to_qimage(frame.overlay)

    def take(self) -> tuple[QImage, Frame] | None:
        with self._lock:
            item, self._pending = self._pending, None
        return item


_EMPTY = np.zeros((0, 0, 3), np.uint8)


class RecordingSink:
    """Pipeline sink that records the overlaid stream while recording is on. Thread-safe:
    started/stopped from the GUI thread, written from the overlay thread. Every frame that
    reaches it while on is in the file (the recorder blocks rather than drop)."""

    def __init__(self, on_error: Callable[[str], None]):
        self._lock = threading.Lock()
        self._recorder = None
        self._pending: tuple[str, float] | None = None
        self._on_error = on_error
        self._t = 0.0
        self._last_capture: float | None = None
        self._fps = 25.0
        self.path: str | None = None

    @property
    def active(self) -> bool:
        return self._pending is not None or self._recorder is not None

    def start(self, path: str, fps: float) -> None:
        with self._lock:
            self._pending = (path, fps)
            self.path = path

    def __call__(self, frame: Frame) -> None:
        if frame.refresh:
            return
        from ..errors import AppError
        from ..pipeline.recorder import Recorder

        with self._lock:
            try:
                if self._pending is not None and self._recorder is None:
                    path, fps = self._pending
                    h, w = frame.size
                    self._recorder = Recorder(path, fps, w, h)
                    self._pending = None
                    self._fps = fps or 25.0
                    self._t, self._last_capture = 0.0, None
                if self._recorder is None:
                    return
                # Timestamps follow the wall clock (drops leave gaps, as seen live); a pause
                # is squeezed to one frame interval instead of a frozen stretch.
                if self._last_capture is not None:
                    dt = frame.t_capture - self._last_capture
                    self._t += dt if 0 < dt <= 0.5 else 1.0 / self._fps
                self._last_capture = frame.t_capture
                self._recorder.write(frame.full_output(), self._t)  # source size, whatever is shown
            except AppError as exc:
                failed, self._recorder, self._pending = self._recorder, None, None
                if failed is not None:
                    try:
                        failed.close()
                    except AppError:
                        pass
                self._on_error(str(exc))

    def stop(self) -> tuple[str | None, int]:
        """Finalise the file (flush the encoder, write the MP4 index); (path, frames)."""
        with self._lock:
            rec, self._recorder, self._pending = self._recorder, None, None
        if rec is None:
            return None, 0
        rec.close()
        return rec.path, rec.frames_written
