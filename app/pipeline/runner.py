"""The pipeline: stage threads wired by channels. The window and headless mode both use it.

    source --ch--> preprocess --ch--> inference --q--> compare --q--> postprocess --q--> overlay --> sinks
    (thread)       (thread)           (thread)         (thread)       (thread)           (thread)

`compare` runs a second model (--compare-weights) or passes frames on; `postprocess` applies the
temporal filter and the analysis (cue, flicker, agreement: analysis.Analyzer) around the threshold;
`overlay` adds model B's outline and the cue border.

Each stage runs on its own thread so decode, resize, overlay and encode overlap with
inference: throughput approaches the model's own. In real-time mode (the window, cameras)
the two channels in front of the model are latest-frame-wins slots: the model always gets the
newest frame and drops are counted; headless uses blocking queues and never drops.

Every frame's end is counted once, by `Pipeline.account`: shown, dropped (with the busy stage as
the reason) or stale (a seek made it obsolete). Stats and the frames CSV both hear it there, so
they cannot disagree.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable

import cv2

from ..errors import AppError, crash_report
from .analysis import Analyzer, AnalysisSettings
from .channels import BoundedQueue, Closed, LatestSlot
from .compare import CompareStage, draw_contour_b
from .cue import draw_cue_border
from .inference import InferenceStage, ModelInfo
from .items import EndOfStream, Frame, NoticeKind
from .overlay import OverlaySettings, contour_thickness, draw_overlay
from .postprocess import probs_to_mask, probs_to_mask_roi
from .preprocess import prepare
from .source import Epoch, SourceStage
from .stats import RunStats


class PipelineEvents:
    """Callbacks from the stage threads (never the GUI thread): keep them short and thread-safe.
    The window turns them into Qt signals; headless mode prints / records them."""

    def model_ready(self, info: ModelInfo) -> None: ...

    def notice(self, text: str, kind: NoticeKind = "info") -> None: ...  # what the user should see; `kind`: items.Notice

    def signal(self, ok: bool, text: str) -> None: ...  # live source lost / back

    def fatal(self, text: str) -> None: ...  # the pipeline cannot go on (no backend, stage crashed)

    def end_of_stream(self, eos: EndOfStream) -> None: ...

    def compare_ready(self, info: ModelInfo | None) -> None: ...  # compare model loaded (None: none / failed)


class _Worker(threading.Thread):
    """Loop: take from inbox, apply `fn` to Frames, pass on. EndOfStream passes straight through."""

    def __init__(self, name: str, fn: Callable[[Frame], Frame | None], inbox, outbox, on_error: Callable[[str], None]):
        super().__init__(name=name, daemon=True)
        self.fn, self.inbox, self.outbox, self.on_error = fn, inbox, outbox, on_error
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                item = self.inbox.get(timeout=0.1)
                if item is None:
                    continue
                if isinstance(item, Frame):
                    item = self.fn(item)
                    if item is None:
                        continue
                self.outbox.put(item)
        except Closed:
            pass
        except AppError as exc:  # a user-facing problem (e.g. the recording cannot be written): its own words
            self.on_error(str(exc))
        except Exception as exc:  # a bug in a stage: stop loudly, never freeze silently
            self.on_error(crash_report(self.name, exc))


class _Deliver:
    """The overlay stage's outbox: hands results to the sinks (in the overlay thread)."""

    def __init__(self, pipeline: "Pipeline"):
        self.p = pipeline

    def put(self, item) -> None:
        self.p._deliver(item)


class Pipeline:
    def __init__(self, model_path: str, backend: str = "auto", *, settings: OverlaySettings | None = None,
                 events: PipelineEvents | None = None, realtime: bool = True, device=None, threads: int | None = None,
                 backend_factory: Callable | None = None, measure_model_only: bool = False,
                 analysis: AnalysisSettings | None = None, compare_path: str | None = None):
        self.settings = settings or OverlaySettings()
        self.analysis_settings = analysis or AnalysisSettings()
        self.events = events or PipelineEvents()
        self.realtime = realtime
        self.stats = RunStats()
        self.analyzer = self.stats.analyzer = Analyzer(self.analysis_settings)
        self.epoch = Epoch()
        # (frame, outcome, reason, now) for every frame's end: see account() (any thread)
        self.outcome_listeners: list[Callable[[Frame, str, str | None, float], None]] = []
        self.sinks: list[Callable[[Frame], None]] = []  # called in the overlay thread, in order
        self.sink_idle: list[Callable[[], bool]] = []  # e.g. "the recorder has encoded its backlog"
        self.source: SourceStage | None = None
        self._last_inferred: Frame | None = None
        self._closed = False
        self.view_box: tuple[int, int] | None = None  # (W, H) of the window's video area; None: no display

        if realtime:  # latest frame wins in front of the model; short queues after it
            self.q_source = LatestSlot(on_drop=lambda f: self._dropped(f, "preprocess_busy"))
            self.q_model = LatestSlot(on_drop=lambda f: self._dropped(f, "model_busy"))
            depth = 2
        else:  # never drop; queues deep enough to absorb jitter of each stage
            self.q_source = BoundedQueue(3)
            self.q_model = BoundedQueue(2)
            depth = 2
        self.q_probs = BoundedQueue(depth)
        self.q_compared = BoundedQueue(depth)
        self.q_mask = BoundedQueue(depth)

        self.inference = InferenceStage(model_path, backend, self.q_model, self.q_probs, stats_ref=lambda: self.stats,
                                        events=self.events, factory=backend_factory, device=device, threads=threads,
                                        measure_model_only=measure_model_only,
                                        downstream_idle=self._downstream_idle)
        # Model B (compare mode): always in the chain, a pass-through until it has a model.
        self.compare = CompareStage(self.q_probs, self.q_compared, stats_ref=lambda: self.stats, events=self.events,
                                    model_path=compare_path, backend=backend, factory=backend_factory, device=device,
                                    threads=threads)
        self.workers = [
            _Worker("preprocess", self._preprocess, self.q_source, self.q_model, self._fail),
            _Worker("postprocess", self._postprocess, self.q_compared, self.q_mask, self._fail),
            _Worker("overlay", self._overlay, self.q_mask, _Deliver(self), self._fail),
        ]

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "Pipeline":
        self.inference.start()
        self.compare.start()
        for w in self.workers:
            w.start()
        return self

    @property
    def model(self) -> ModelInfo | None:
        return self.inference.info

    def wait_ready(self, timeout: float | None = None) -> ModelInfo | None:
        self.inference.ready.wait(timeout)
        return self.inference.info

    def open(self, reader, *, loop: int = 1, start_paused: bool = False, max_frames: int | None = None) -> SourceStage:
        """Start decoding `reader` (replacing any current source). Frames of the old source
        still in flight are skipped; stats start afresh."""
        self._stop_source()
        self.epoch.bump()
        self.stats = RunStats(first_epoch=self.epoch.value)  # the old source's frames in flight count nowhere
        self.analyzer = self.stats.analyzer = Analyzer(self.analysis_settings)
        self._last_inferred = None
        self.source = SourceStage(reader, self.q_source, stats=self.stats, events=self.events, epoch=self.epoch,
                                  realtime=self.realtime, loop=loop,
                                  start_paused=start_paused, gate=self.inference.ready,
                                  max_frames=max_frames)
        self.source.start()
        return self.source

    def compare_summary(self) -> dict:
        """Model B's identity for the stats JSON (its latency and agreement come from RunStats)."""
        info = self.compare.info
        return {"model": info.path if info else None, "backend": info.backend if info else None,
                "input_size": list(info.input_size) if info else None,
                "threshold": (self.settings.threshold if self.settings.threshold is not None else info.threshold)
                if info else None}

    def _stop_source(self) -> None:
        if self.source is not None:
            self.source.stop()
            self.source.join(timeout=5)
            self.source = None

    def close(self) -> None:
        """Stop every thread (frames in flight are abandoned; sinks own their files)."""
        if self._closed:
            return
        self._closed = True
        if self.source is not None:
            self.source.stop()
        self.inference.stop()
        self.compare.stop()
        for w in self.workers:
            w.stop()
        for ch in (self.q_source, self.q_model, self.q_probs, self.q_compared, self.q_mask):
            ch.close()
        for t in [self.source, self.inference, self.compare, *self.workers]:
            if t is not None and t.is_alive():
                t.join(timeout=5)
        self.stats.stop()

    # -- controls (GUI thread) -------------------------------------------------------------
    def pause(self) -> None:
        if self.source:
            self.source.pause()

    def resume(self) -> None:
        if self.source:
            self.source.resume()

    def seek(self, seconds: float) -> None:
        if self.source:
            self.source.seek(seconds)

    def refresh(self) -> bool:
        """Re-render the last frame with the current settings (sliders moved while paused).
        Goes through postprocess + overlay only; not recorded, not counted."""
        last = self._last_inferred
        if last is None:
            return False
        again = dataclasses.replace(last, refresh=True, mask=None, overlay=None, epoch=self.epoch.value)
        return self.q_probs.offer(again)

    # -- stages ----------------------------------------------------------------------------
    def _preprocess(self, frame: Frame) -> Frame | None:
        self.inference.ready.wait()
        self.compare.loaded.wait()  # compare mode: every frame goes through both models
        info = self.inference.info
        if info is None:
            self.account(frame, "dropped", "no_model")  # nothing can run; the fatal event has been sent
            return None
        if frame.epoch != self.epoch.value:  # a seek came since it was decoded: not worth the model's time
            self.account(frame, "stale")
            return None
        self.stats.start()  # throughput is timed from the first frame the model can take
        prepare(frame, info.input_size, self.view_box)  # model-size and display-size frames
        return frame

    def _postprocess(self, frame: Frame) -> Frame:
        if not frame.refresh:
            self._last_inferred = frame
        threshold = self.settings.threshold
        if threshold is None:
            threshold = self.inference.info.threshold
        analyzer = self.analyzer
        stale = frame.epoch != self.epoch.value  # from before a seek / source change: dropped at delivery
        if frame.probs_raw is None:
            frame.probs_raw = frame.probs  # the model's own output; a refresh re-filters from it
        frame.probs = frame.probs_raw
        probs = frame.probs if stale else analyzer.filter(frame, threshold)
        frame.probs = probs  # what is thresholded, shown and recorded (the lazy masks read it)
        frame.threshold = threshold
        if frame.view is not None:  # the window: display size (frame resolution when a recording asks)
            frame.view_mask = probs_to_mask(probs, frame.view.shape[:2], threshold)
            frame.mask_roi = None  # made from probs and threshold if asked (a refresh copies the old one)
        else:  # frame resolution, only inside the mask's box (frame.mask makes the whole on demand)
            frame.mask_roi = probs_to_mask_roi(probs, frame.size, threshold)
        info_b = self.compare.info
        if frame.probs_b is not None and info_b is not None:
            threshold_b = self.settings.threshold if self.settings.threshold is not None else info_b.threshold
            frame.mask_b = probs_to_mask(frame.probs_b, frame.size, threshold_b)
        else:
            frame.mask_b = None
        frame.analysis = None if stale else analyzer.observe(frame)
        return frame

    def _overlay(self, frame: Frame) -> Frame:
        s = self.settings
        frame.style = (s.opacity, s.contour, s.color)
        cue = frame.analysis is not None and frame.analysis.cue_on and self.analysis_settings.cue_border
        canvas = None
        if frame.view is not None:  # the window draws at display size; a recording asks for full_output()
            frame.view_overlay = canvas = draw_overlay(frame.view, frame.view_mask, *frame.style)
        elif frame.mask_b is not None or cue:
            # More than the mask to draw: the RGB overlay at frame resolution (full_output() then
            # records it instead of drawing into the decoded picture).
            frame.overlay = canvas = draw_overlay(frame.image, frame.mask, *frame.style)
        if canvas is not None and frame.mask_b is not None:
            h, w = canvas.shape[:2]
            mask_b = frame.mask_b if frame.mask_b.shape[:2] == (h, w) else cv2.resize(
                frame.mask_b, (w, h), interpolation=cv2.INTER_NEAREST)
            draw_contour_b(canvas, mask_b, contour_thickness(h, w))
        if canvas is not None and cue:
            draw_cue_border(canvas)
        return frame

    def _deliver(self, item) -> None:
        if getattr(item, "epoch", None) != self.epoch.value:  # from before a seek / source change
            if isinstance(item, Frame):
                self.account(item, "stale")
            return
        if isinstance(item, EndOfStream):
            self.events.end_of_stream(item)
            return
        for sink in self.sinks:
            sink(item)

    def _downstream_idle(self) -> bool:
        queues = (self.q_probs, self.q_compared, self.q_mask)
        return all(len(q) == 0 for q in queues) and all(f() for f in self.sink_idle)

    def _dropped(self, item, reason: str) -> None:
        if isinstance(item, Frame):
            self.account(item, "dropped", reason)

    def account(self, frame: Frame, outcome: str, reason: str | None = None, now: float | None = None) -> str | None:
        """Count the end of `frame`'s way, exactly once per frame: `outcome` is "shown" (painted,
        or recorded headless), "dropped" (`reason`: a stats.DROP_REASONS key) or "stale". A frame
        from before the latest seek is stale whatever the caller saw; one from an earlier source
        counts nowhere (that run's figures were closed when the source changed). Re-renders
        (refresh) are not frames. Returns the outcome counted, or None."""
        if frame.refresh:
            return None
        stats = self.stats
        if frame.epoch < stats.first_epoch:
            return None
        if frame.epoch != self.epoch.value:
            outcome, reason = "stale", None
        now = time.perf_counter() if now is None else now
        if outcome == "shown":
            stats.frame_out(frame.t_capture, now)
        elif outcome == "dropped":
            stats.frame_dropped(reason)
        elif outcome == "stale":
            stats.frame_stale()
        else:
            raise ValueError(f"unknown frame outcome {outcome!r}")
        for listener in self.outcome_listeners:
            listener(frame, outcome, reason, now)
        return outcome

    def _fail(self, text: str) -> None:
        self.events.fatal(text)
