"""H.264 MP4 recorder of the overlaid stream (PyAV), with its own encode thread.

`write` only queues the frame (blocking when the queue is full: a recording never loses a
frame, a slow disk slows the pipeline instead); the encode thread does colour conversion,
x264 and muxing. `close` flushes the encoder, writes the MP4 index and moves the file (written beside it as
`.tmp-NAME`) to its final path, so the file plays.
Every exit path of the viewer and headless mode calls `close` (window close, end of file,
errors, Ctrl+C, SIGTERM); only a hard kill (SIGKILL, power loss) can leave an unplayable file.
"""

from __future__ import annotations

import os
import threading
from fractions import Fraction

import av
import cv2
import numpy as np
from av.video.frame import PictureType

from ..errors import AppError
from .channels import BoundedQueue, Closed

TIME_BASE = Fraction(1, 90000)  # MPEG clock: exact for 24, 25, 30, 29.97, 50, 60 fps
_STOP = object()


def encoder_options(width: int, height: int) -> dict:
    # Encoding must hide behind inference. Measured at 256x256 on one CPU core: veryfast
    # 2.2 ms/frame, superfast 1.2 ms (+18 % size), ultrafast 0.6 ms (+33 %). From 720p up,
    # ultrafast, so a GPU pipeline at >= 120 fps is not encoder-bound.
    preset = "ultrafast" if width * height >= 1280 * 720 else "superfast"
    return {"preset": preset, "crf": "20"}


class Recorder:
    def __init__(self, path: str, fps: float, width: int, height: int, queue_size: int | None = None):
        self.path = str(path)
        self.fps = float(fps) if fps and fps > 0 else 25.0
        self.width, self.height = int(width), int(height)
        # yuv420p needs even sizes: pad (never crop) by one replicated row/column.
        self._pad = (self.height % 2, self.width % 2)
        directory = os.path.dirname(os.path.abspath(self.path))
        # Written beside the final path and moved into place by close(): until then the final
        # name still holds whatever it held (a file being read, an older recording).
        self.partial_path = os.path.join(directory, f".tmp-{os.path.basename(self.path)}")
        try:
            os.makedirs(directory, exist_ok=True)
            self._container = av.open(self.partial_path, "w", format="mp4")
        except (OSError, av.FFmpegError) as exc:
            raise AppError(f"{self.path}: cannot create the recording ({exc}); check the folder exists and is writable") from exc
        stream = self._container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
        stream.width = self.width + self._pad[1]
        stream.height = self.height + self._pad[0]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = TIME_BASE
        stream.options = encoder_options(self.width, self.height)
        self._stream = stream
        # Enough slack to ride out encoder hiccups, bounded in bytes (~96 MB at most).
        if queue_size is None:
            queue_size = max(4, min(32, (96 << 20) // max(1, self.width * self.height * 3)))
        self._queue = BoundedQueue(queue_size)
        self._error: BaseException | None = None
        self._last_pts = -1
        self.frames_written = 0
        self._busy = False
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._encode_loop, name="recorder", daemon=True)
        self._thread.start()

    def write(self, image, t: float | None = None) -> None:
        """Queue one frame: an RGB array, or a yuv420p av.VideoFrame of the recording's size
        (encoded as it is: no colour conversion). `t`: its time in seconds from the
        recording's start (None: the nominal frame rate). Raises AppError if the encoder
        failed (e.g. disk full)."""
        if self._error is not None:
            raise AppError(f"{self.path}: recording failed: {self._error}")
        if self._closed:
            raise AppError(f"{self.path}: recording already closed")
        hw = image.shape[:2] if isinstance(image, np.ndarray) else (image.height, image.width)
        if hw != (self.height, self.width):
            raise AppError(f"{self.path}: frame size changed from {self.width}x{self.height} to {hw[1]}x{hw[0]}")
        try:
            self._queue.put((image, t))
        except Closed:
            raise AppError(f"{self.path}: recording already closed") from None

    def _encode_loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except Closed:
                return
            if item is None:
                continue
            if item is _STOP:
                return
            if self._error is not None:
                continue  # keep draining so writers never block on a dead encoder
            self._busy = True
            try:
                self._encode(*item)
            except Exception as exc:  # disk full, encoder failure: reported on next write/close
                self._error = exc
            finally:
                self._busy = False

    def _encode(self, image, t: float | None) -> None:
        if not isinstance(image, np.ndarray) and (self._pad != (0, 0) or image.format.name != "yuv420p"):
            image = image.to_ndarray(format="rgb24")
        if isinstance(image, np.ndarray):
            if self._pad != (0, 0):
                image = np.pad(image, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
            # OpenCV's SIMD RGB->I420 (BT.601, limited range: what swscale does too) costs 1 ms
            # at 1080p where PyAV's reformat takes ~28 ms.
            yuv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2YUV_I420)
            frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        else:
            frame = image
            frame.pict_type = PictureType.NONE  # a decoder's I/P/B tag would force x264's frame types
        if t is None:
            pts = round(self.frames_written / self.fps / TIME_BASE)
        else:
            pts = round(t / TIME_BASE)
        pts = max(pts, self._last_pts + 1)  # strictly increasing, whatever the clock did
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = TIME_BASE
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        """Encode what is queued, flush x264, write the MP4 index. Idempotent; raises AppError
        if anything failed (the file is still finalised as far as possible)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._queue.put(_STOP)
        except Closed:
            pass
        self._thread.join()
        try:
            if self._error is None:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
        except Exception as exc:
            self._error = self._error or exc
        finally:
            try:
                self._container.close()
            except Exception as exc:
                self._error = self._error or exc
            try:  # what was encoded is a playable file, failure or not (as far as the encoder got)
                os.replace(self.partial_path, self.path)
            except OSError as exc:
                self._error = self._error or exc
        if self._error is not None:
            raise AppError(f"{self.path}: recording failed: {self._error}")

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being encoded right now."""
        return len(self._queue) == 0 and not self._busy

    @property
    def closed(self) -> bool:
        return self._closed
