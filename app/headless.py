"""Headless mode: the viewer's pipeline without a window, writing every frame to an MP4.

    python -m app SOURCE --headless --out OUT.mp4 [--stats STATS.json]

Never drops a frame (blocking queues between stages; cameras excepted: a live device cannot
wait, so it keeps its latest-frame-wins slot and drops are counted). The recording is
finalised on every exit path: end of file, bad data, Ctrl+C, SIGTERM. Exit status: 0 done,
1 failure (the message says what and what to do), 130 / 143 interrupted by SIGINT / SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass, field

from kdas_core.io.atomic import write_json

from .errors import AppError
from .pipeline.analysis import AnalysisSettings
from .pipeline.frames_csv import FramesCsv
from .pipeline.inference import ModelInfo
from .pipeline.items import EndOfStream, Frame, NoticeKind
from .pipeline.overlay import OverlaySettings
from .pipeline.recorder import Recorder
from .pipeline.runner import Pipeline, PipelineEvents
from .pipeline.source import open_reader
from .pipeline.stats import describe_throughput


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Events(PipelineEvents):
    def __init__(self, log):
        self.log = log
        self.done = threading.Event()
        self.error: str | None = None
        self.notices: list[str] = []
        self.info: ModelInfo | None = None

    def model_ready(self, info: ModelInfo) -> None:
        self.info = info
        self.log(f"model: {info.label}")
        for note in info.notes:
            self.log(f"  {note}")

    def notice(self, text: str, kind: NoticeKind = "info") -> None:
        self.notices.append(text)  # every kind is a line in the log and in --stats "notices"
        self.log(f"notice: {text}")

    def signal(self, ok: bool, text: str) -> None:
        self.notice(text)

    def fatal(self, text: str) -> None:
        self.error = self.error or text
        self.done.set()

    def end_of_stream(self, eos: EndOfStream) -> None:
        if eos.error:
            self.error = self.error or eos.error
        self.done.set()


@dataclass
class HeadlessResult:
    exit_code: int
    stats: dict = field(default_factory=dict)


def run_headless(source: str, out: str, *, model_path: str, backend: str = "auto", stats_path: str | None = None,
                 threshold: float | None = None, opacity: float = 0.4, contour: bool = True, loop: int = 1,
                 progress: bool | None = None, backend_factory=None, log=None, on_frame=None,
                 threads: int | None = None, max_frames: int | None = None,
                 analysis: AnalysisSettings | None = None, compare_path: str | None = None,
                 frames_csv: str | None = None, device: str | None = None) -> HeadlessResult:
    """Run the pipeline over `source` into `out`. `on_frame(frame)` (soak benchmark) is called
    after each recorded frame, in the overlay thread. `analysis`: temporal filter and cue settings;
    `compare_path`: a second model run on the same frames; `frames_csv`: one row per frame."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if not str(out).lower().endswith(".mp4"):
        raise AppError(f"--out {out}: the recording is an MP4; give a path ending in .mp4")
    reader = open_reader(source)
    rows = FramesCsv(frames_csv) if frames_csv else None  # before the run: a bad path fails at once
    events = _Events(log)
    settings = OverlaySettings(threshold=threshold, opacity=opacity, contour=contour)
    pipeline = Pipeline(model_path, backend, settings=settings, events=events, realtime=reader.live, device=device,
                        backend_factory=backend_factory, threads=threads, measure_model_only=True,
                        analysis=analysis, compare_path=compare_path)
    if rows is not None:
        pipeline.outcome_listeners.append(rows)  # one row per frame, when the pipeline counts it
    recorder: list[Recorder] = []  # created by the first frame: its size is the frame's
    total = reader.frame_count * max(1, loop) if reader.frame_count else None
    if max_frames:
        total = min(total, max_frames) if total else max_frames
    bar = _progress(total, progress)

    first_capture: list[float] = []

    def sink(frame: Frame) -> None:
        if frame.refresh:
            return
        if not recorder:
            h, w = frame.size
            recorder.append(Recorder(out, reader.fps, w, h))
            first_capture.append(frame.t_capture)
            if bar is not None:
                bar.reset(total=total)  # the rate should not include loading the model
        # Files: every frame at the file's own rate. Cameras: wall-clock timestamps, so the
        # recording plays at real speed whatever rate the device really delivered.
        t = frame.t_capture - first_capture[0] if reader.live else None
        recorder[0].write(frame.full_output(), t)  # overlay drawn into the decoded 4:2:0 picture
        pipeline.account(frame, "shown")
        if bar is not None:
            bar.update(1)
        if on_frame is not None:
            on_frame(frame)

    pipeline.sinks.append(sink)
    pipeline.sink_idle.append(lambda: not recorder or recorder[0].idle)
    interrupted: Interrupted | None = None
    previous = _install_signal_handlers()
    try:
        log(f"source: {reader.description}")
        pipeline.start()
        pipeline.open(reader, loop=loop, max_frames=max_frames)
        while not events.done.wait(0.2):  # short waits: the main thread must stay free for signals
            pass
    except Interrupted as exc:
        interrupted = exc
    finally:
        record_error = None
        try:
            pipeline.close()
            if rows is not None:
                rows.close()
            if bar is not None:
                bar.close()
            for r in recorder:
                try:
                    r.close()
                except AppError as exc:
                    record_error = str(exc)
            pipeline.stats.stop()
        finally:  # after the MP4 is finalised (a second Ctrl+C must not cut that short), on every path
            _restore_signal_handlers(previous)

    stats = pipeline.stats.summary()
    info = events.info
    model_only = pipeline.inference.model_only or {}
    stats.update({
        "backend": info.backend if info else None,
        "model": info.path if info else str(model_path),
        "input_size": list(info.input_size) if info else None,
        "threshold": settings.threshold if settings.threshold is not None else (info.threshold if info else None),
        "source": str(source),
        "out": str(out),
        "frames_recorded": recorder[0].frames_written if recorder else 0,
        **model_only,
    })
    if "compare" in stats or compare_path:
        stats["compare"] = {**pipeline.compare_summary(), **stats.get("compare", {})}
    if rows is not None:
        stats["frames_csv"] = {"path": rows.path, "rows": rows.rows}
    if model_only.get("model_only_fps"):
        stats["fps_vs_model_only"] = round(stats["fps"] / model_only["model_only_fps"], 3)
    error = events.error or record_error
    if interrupted is not None:
        error = f"interrupted by {interrupted.args[0]}"
    if error is None and stats["frames_in"] != stats["frames_out"]:
        error = f"internal error: {stats['frames_in']} frames in, {stats['frames_out']} out"
    stats.update({"notices": events.notices, "backend_notes": info.notes if info else [], "error": error,
                  "complete": error is None})
    if stats_path:  # last: the file tells how the run ended
        write_json(stats_path, stats)
    if error:
        written = stats["frames_recorded"] and record_error is None and os.path.isfile(out)
        where = f"; the {stats['frames_recorded']} frames before it are in {out}" if written else ""
        log(f"app: error: {error}{where}")
        code = 128 + interrupted.signum if interrupted is not None else (pipeline.inference.failed_exit_code or 1)
        return HeadlessResult(code, stats)
    log(f"wrote {out}: {stats['frames_out']} frames, {describe_throughput(stats)}, "
        f"inference p50 {stats['inference_ms_p50']} ms, latency p50/p95 {stats['latency_ms_p50']}/{stats['latency_ms_p95']} ms")
    return HeadlessResult(0, stats)


def _progress(total, enabled):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    import shutil

    from tqdm import tqdm

    # Where the terminal reports no size (0x0), tqdm draws nothing; shutil falls back to 100x20.
    cols, rows = shutil.get_terminal_size((100, 20))
    return tqdm(total=total, unit="frame", ncols=min(120, cols), nrows=rows, file=sys.stderr)


def _install_signal_handlers():
    """SIGTERM and SIGINT raise Interrupted in the main thread, so `finally` finalises the MP4."""
    if threading.current_thread() is not threading.main_thread():
        return None

    fired = []

    def handler(signum, _frame):
        if fired:  # already stopping: a second Ctrl+C must not cut the MP4 finalisation short
            print("finalising the recording, please wait…", file=sys.stderr, flush=True)
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_signal_handlers(previous) -> None:
    if previous:
        for sig, h in previous.items():
            signal.signal(sig, h)
