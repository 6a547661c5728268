"""Source stage: decode a video file (PyAV) or grab a capture device (OpenCV V4L2).

- Files, window: paced to real time (the file's timestamps); a latest-frame-wins slot after the
  source drops (and counts) frames only if the model cannot keep up.
- Files, headless: as fast as possible into a blocking queue: never a dropped frame.
- Cameras: a 1-frame driver buffer and a latest-frame-wins slot, so latency never piles up.
  A failed or stalled grab shows "signal lost"; the stage reopens the device until it
  comes back, then resumes.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import av
import numpy as np

from ..errors import AppError, crash_report
from .channels import Closed
from .items import EndOfStream, Frame


def parse_source(spec: str) -> tuple[str, str | int]:
    """("camera", index-or-device-path) for `0`, `1`, `/dev/video0`; ("file", path) otherwise."""
    s = str(spec).strip()
    if re.fullmatch(r"\d{1,2}", s) and not os.path.exists(s):
        return "camera", int(s)
    if s.startswith("/dev/video"):
        return "camera", s
    return "file", s


def open_reader(spec: str, camera_factory: Callable | None = None):
    kind, target = parse_source(spec)
    if kind == "camera":
        return CameraReader(target, factory=camera_factory)
    return VideoFileReader(str(target))


class VideoFileReader:
    """Sequential RGB frames from anything FFmpeg reads. Errors are AppErrors naming the file."""

    live = False

    def __init__(self, path: str):
        self.path = path
        p = Path(path)
        if not p.exists():
            raise AppError(f"{path}: no such file; give a video file, a camera (0, /dev/video0) or nothing for the demo clip")
        if not p.is_file():
            raise AppError(f"{path}: not a file")
        try:
            self._container = av.open(str(p))
        except av.FFmpegError as exc:
            raise AppError(f"{path}: not a readable video: it may be corrupt, truncated or not a video at all ({_why(exc)})") from exc
        if not self._container.streams.video:
            self._container.close()
            raise AppError(f"{path}: the file has no video stream")
        stream = self._container.streams.video[0]
        if stream.codec_context is None:  # PyAV found no decoder for this stream
            self._container.close()
            raise AppError(f"{path}: unsupported video codec: this FFmpeg build has no decoder for it; "
                           "convert the file, e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`")
        stream.thread_type = "AUTO"  # frame + slice threads: decode stays ahead of inference
        self._stream = stream
        self.codec = stream.codec_context.name
        self.width = stream.codec_context.width
        self.height = stream.codec_context.height
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else 25.0
        self.declared_frames = int(stream.frames or 0)
        if stream.duration is not None and stream.time_base is not None:
            self.duration = float(stream.duration * stream.time_base)
        elif self._container.duration:
            self.duration = self._container.duration / 1_000_000
        else:
            self.duration = None
        self.frame_count = self.declared_frames or (round(self.duration * self.fps) if self.duration else None)
        self.description = f"{Path(path).name} ({self.width}x{self.height}, {self.fps:.3g} fps, {self.codec})"
        self._start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        self._frames = self._decode()
        self._decoded = 0
        self._seeked = False
        self._skip_until: float | None = None

    def _decode(self):
        for packet in self._container.demux(self._stream):
            for frame in packet.decode():
                yield frame

    def read(self) -> tuple[np.ndarray, float] | None:
        """(RGB frame, pts seconds from the start) or None at the end of the file."""
        item = self.read_decoded()
        if item is None or isinstance(item[0], np.ndarray):
            return item
        return self._rgb(item[0]), item[1]

    def read_decoded(self) -> tuple[object, float] | None:
        """Like `read`, but a plain 8-bit 4:2:0 frame (nearly every H.264/HEVC file) comes as
        the decoder's own av.VideoFrame, unconverted: the stages take from it only the sizes
        they need. Other formats come as RGB arrays."""
        while True:
            try:
                frame = next(self._frames)
            except StopIteration:
                self._check_complete()
                return None
            except av.FFmpegError as exc:
                done = f"the {self._decoded} frames before it were processed" if self._decoded else "no frame could be decoded"
                raise AppError(
                    f"{self.path}: corrupt or truncated video data after frame {self._decoded} ({_why(exc)}); {done}"
                ) from exc
            t = (float(frame.time) if frame.time is not None else self._decoded / self.fps) - self._start
            if self._skip_until is not None:
                if t < self._skip_until - 0.5 / self.fps:
                    continue  # decoding forward from the keyframe before the seek target
                self._skip_until = None
            self._decoded += 1
            return (frame if is_plain_i420(frame) else self._rgb(frame)), t

    def _rgb(self, frame) -> np.ndarray:
        try:
            return frame_to_rgb(frame)
        except av.FFmpegError as exc:
            raise AppError(f"{self.path}: cannot convert frame {self._decoded} to RGB ({_why(exc)})") from exc

    def _check_complete(self) -> None:
        # Some truncations end the demuxer quietly: compare with the frame count in the header.
        if not self._seeked and self.declared_frames and self._decoded < self.declared_frames - 1:
            raise AppError(
                f"{self.path}: truncated: only {self._decoded} of the {self.declared_frames} frames its header "
                "announces could be decoded" + ("; the frames before the cut were processed" if self._decoded else "")
            )

    def seek(self, seconds: float) -> None:
        seconds = max(0.0, float(seconds))
        if self.duration:
            seconds = min(seconds, max(0.0, self.duration - 1.0 / self.fps))
        target = int((seconds + self._start) / self._stream.time_base)
        try:
            self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        except av.FFmpegError as exc:
            raise AppError(f"{self.path}: cannot seek to {seconds:.2f} s ({_why(exc)})") from exc
        self._frames = self._decode()
        self._seeked = seconds > 0 or self._seeked
        if seconds == 0:  # back at the start: a full pass can be checked again (--loop)
            self._seeked = False
            self._decoded = 0
        self._skip_until = seconds

    def close(self) -> None:
        try:
            self._container.close()
        except Exception:
            pass


def is_plain_i420(frame) -> bool:
    """8-bit limited-range 4:2:0 with even sizes: what the fast paths (and OpenCV's SIMD
    converters) take as it is."""
    return (frame.format.name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0
            and frame.color_range != 2)


def frame_to_rgb(frame) -> np.ndarray:
    """RGB uint8 at full size. Plain 8-bit limited-range 4:2:0 (nearly every H.264 file) goes
    through OpenCV's SIMD converter: 1.8 ms instead of 5 ms at 1080p, same BT.601 maths as
    swscale (within rounding). Everything else: PyAV/swscale."""
    if is_plain_i420(frame):
        import cv2

        return cv2.cvtColor(frame.to_ndarray(), cv2.COLOR_YUV2RGB_I420)
    return frame.to_ndarray(format="rgb24")


def new_frame(image, index: int, pts: float | None, epoch: int = 0) -> Frame:
    """A pipeline Frame for what a reader gave: an RGB array, or a decoded yuv420p
    av.VideoFrame (kept unconverted; `Frame.image` converts it if anything asks)."""
    now = time.perf_counter()
    if isinstance(image, np.ndarray):
        return Frame(index=index, pts=pts, image=image, t_capture=now, epoch=epoch)
    return Frame(index=index, pts=pts, image=None, t_capture=now, epoch=epoch, decoded=image)


def _open_v4l2(device):
    import cv2

    # OpenCV's own "[ WARN:0@...]" lines would come before our message naming the camera: errors only.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    if sys.platform.startswith("linux"):
        return cv2.VideoCapture(device, cv2.CAP_V4L2)
    return cv2.VideoCapture(device)


class CameraReader:
    """Latest frames from a capture device. `read` returns None when the device fails
    (unplugged, stalled); `reopen` tries to get it back."""

    live = True

    def __init__(self, device: int | str, factory: Callable | None = None):
        self.device = device
        self.path = str(device)
        self._factory = factory or _open_v4l2
        self._cap = self._open()
        if self._cap is None:
            raise AppError(
                f"camera {device!r}: cannot open it; check it is plugged in, not used by another program, "
                "and that you may read it (e.g. membership of the 'video' group)"
            )
        import cv2

        fps = self._cap.get(cv2.CAP_PROP_FPS) or 0
        self.fps = float(fps) if 1 <= fps <= 240 else 30.0
        self.width = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        self.height = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
        self.frame_count = None
        self.duration = None
        self.description = f"camera {device}"

    def _open(self):
        import cv2

        cap = self._factory(self.device)
        if cap is None or not cap.isOpened():
            return None
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the driver keeps only the newest frame: no built-in lag
        cap.set(cv2.CAP_PROP_READ_TIMEOUT_MSEC, 2000)  # a stalled device errors out instead of hanging
        return cap

    def read(self) -> np.ndarray | None:
        import cv2

        if self._cap is None:
            return None
        try:
            ok, bgr = self._cap.read()
        except cv2.error:
            ok, bgr = False, None
        if not ok or bgr is None or bgr.size == 0:
            return None
        if bgr.ndim == 2:
            return cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def reopen(self) -> bool:
        self.close()
        self._cap = self._open()
        return self._cap is not None

    def seek(self, seconds: float) -> None:
        pass  # live: nothing to seek

    def close(self) -> None:
        if self._cap is not None:
            try:
                self._cap.release()
            except Exception:
                pass
            self._cap = None


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


class Epoch:
    """A counter shared by the source (which bumps it when it seeks or is replaced) and the
    last stage (which skips frames from an older epoch)."""

    def __init__(self):
        self.value = 0
        self._lock = threading.Lock()

    def bump(self) -> int:
        with self._lock:
            self.value += 1
            return self.value


class SourceStage(threading.Thread):
    """Feeds Frames from a reader into `out` (a channel). Controls (pause/resume/seek/stop) are
    thread-safe and take effect within one frame."""

    RETRY_S = (0.25, 0.5, 1.0, 2.0)  # reopen back-off while a camera is gone

    def __init__(self, reader, out, *, stats, events, epoch: Epoch, realtime: bool, loop: int = 1,
                 start_paused: bool = False, gate: threading.Event | None = None, max_frames: int | None = None):
        super().__init__(name="source", daemon=True)
        self.gate = gate  # frames start flowing once this is set (the model is loaded)
        self.reader = reader
        self.out = out
        self.stats = stats
        self.events = events
        self.epoch = epoch
        self.realtime = realtime
        self.loops_left = float("inf") if int(loop) == 0 else max(1, int(loop)) - 1  # 0: for ever
        self.max_frames = max_frames  # stop after this many frames (quick looks at long videos)
        self._cond = threading.Condition()
        self._paused = start_paused
        self._stopped = False
        self._seek_to: float | None = None
        self._step = False  # emit one frame although paused (after a seek)
        self.ended = False
        self.last_frame_time = time.perf_counter()
        self.signal_ok = True
        self._index = 0
        self._clock: tuple[float, float] | None = None  # (wall, pts) pair for real-time pacing

    # -- controls (any thread) -------------------------------------------------------------
    def pause(self) -> None:
        with self._cond:
            self._paused = True
            self._cond.notify_all()

    def resume(self) -> None:
        with self._cond:
            if self.ended and not self.reader.live:
                self._seek_to = 0.0  # play after the end: from the start
            self._paused = False
            self._clock = None
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def seek(self, seconds: float) -> None:
        with self._cond:
            self._seek_to = float(seconds)
            self._step = self._paused
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # -- thread ----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Closed:
            pass
        except AppError as exc:
            self._finish(str(exc))
        except Exception as exc:  # a bug, but never a silent freeze: report it like bad data
            self._finish(crash_report("video source", exc))
        finally:
            self.reader.close()

    def _finish(self, error: str | None) -> None:
        self.ended = True
        try:
            self.out.put(EndOfStream(epoch=self.epoch.value, error=error))
        except Closed:
            pass

    def _run(self) -> None:
        # A file waits for the model instead of dropping its first seconds; a camera too,
        # so "dropped" counts only frames the running pipeline could not take.
        while self.gate is not None and not self.gate.wait(0.1):
            if self._stopped:
                return
        while True:
            with self._cond:
                if self._stopped:
                    return
                seek_to, self._seek_to = self._seek_to, None
                step, self._step = self._step, False
                if seek_to is None and (self._paused or self.ended) and not self.reader.live:
                    self._cond.wait(0.2)
                    continue
            if seek_to is not None:
                self.reader.seek(seek_to)
                self.epoch.bump()
                self.ended = False
                self._clock = None
            if self.reader.live:
                if self._limit_reached():  # --max-frames: a camera ends there too (it has nothing to replay)
                    self._finish(None)
                    return
                image = self.reader.read()
                if image is None:
                    self._recover()
                    continue
                self.last_frame_time = time.perf_counter()
                if self._paused:
                    continue  # keep the driver buffer fresh; paused shows the last frame
                self._emit(image, None)
                continue
            item = self.reader.read_decoded() if not self._limit_reached() else None
            if item is None:
                if self.loops_left > 0 and not self._limit_reached():
                    self.loops_left -= 1
                    self.reader.seek(0.0)
                    self._clock = None
                    continue
                self._finish(None)
                if not self.realtime:
                    return  # headless: done
                continue  # window: wait for seek / play-from-start
            image, pts = item
            if self.realtime and not step:
                if not self._pace(pts):
                    continue  # a control arrived while waiting; this frame is stale
            self.last_frame_time = time.perf_counter()
            self._emit(image, pts)

    def _limit_reached(self) -> bool:
        return self.max_frames is not None and self._index >= self.max_frames

    def _pace(self, pts: float) -> bool:
        """Wait until `pts` is due on the wall clock. False if interrupted by a control."""
        now = time.perf_counter()
        if self._clock is None or now - (self._clock[0] + pts - self._clock[1]) > 0.5:
            self._clock = (now, pts)  # (re)start, or fell far behind: do not burst to catch up
        due = self._clock[0] + pts - self._clock[1]
        with self._cond:
            while not self._stopped and self._seek_to is None and not self._paused:
                left = due - time.perf_counter()
                if left <= 0:
                    return True
                self._cond.wait(left)
            return self._seek_to is None and not self._stopped and not self._paused

    def _emit(self, image, pts: float | None) -> None:
        frame = new_frame(image, self._index, pts, self.epoch.value)
        self._index += 1
        self.stats.frame_in()
        self.out.put(frame)

    def _recover(self) -> None:
        """Camera gone or stalled: say so, reopen with back-off until frames flow again."""
        self.signal_ok = False
        self.events.signal(False, f"{self.reader.description}: signal lost, retrying\u2026")
        attempt = 0
        while True:
            with self._cond:
                if self._stopped:
                    return
                self._cond.wait(self.RETRY_S[min(attempt, len(self.RETRY_S) - 1)])
                if self._stopped:
                    return
            attempt += 1
            if self.reader.reopen():
                image = self.reader.read()
                if image is not None:
                    self.signal_ok = True
                    self.last_frame_time = time.perf_counter()
                    self.events.signal(True, f"{self.reader.description}: signal back")
                    if not self._paused:
                        self._emit(image, None)
                    return
