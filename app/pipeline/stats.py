"""Run statistics: what the status bar shows live and what `--stats` writes.

Every frame the source emits ends exactly once, in one of three counts: shown (painted in the
window, recorded headless), dropped (replaced in a latest-frame-wins slot; the reason says
which stage was busy) or stale (made obsolete by a seek before it could be shown). Frames still
in the pipeline when a run is stopped midway are `in_flight`, so that
frames_in = frames_out + dropped + stale + in_flight always holds.

Memory stays constant however long the run: whole-run percentiles come from a log-spaced
histogram (about 1 % resolution), live readouts from small ring buffers.
"""

from __future__ import annotations

import collections
import math
import threading
import time

import numpy as np


class Histogram:
    """Percentiles of positive values (milliseconds) in constant memory."""

    LO, HI, BINS = 0.01, 1e6, 1600  # 10 us .. 1000 s, ratio ~1.0116 per bin

    def __init__(self):
        self.counts = np.zeros(self.BINS + 2, dtype=np.int64)
        self._scale = self.BINS / math.log(self.HI / self.LO)
        self.n = 0

    def add(self, value: float) -> None:
        if value <= self.LO:
            i = 0
        elif value >= self.HI:
            i = self.BINS + 1
        else:
            i = 1 + int(math.log(value / self.LO) * self._scale)
        self.counts[min(i, self.BINS + 1)] += 1
        self.n += 1

    def percentile(self, q: float) -> float | None:
        if self.n == 0:
            return None
        rank = q / 100.0 * (self.n - 1)
        i = int(np.searchsorted(np.cumsum(self.counts), rank, side="right"))
        if i == 0:
            return self.LO
        if i > self.BINS:
            return self.HI
        # geometric centre of the bin
        return self.LO * math.exp((i - 0.5) / self._scale)


DROP_REASONS = {
    "preprocess_busy": "replaced before preprocessing took it (resize / colour conversion still busy)",
    "model_busy": "replaced in front of the model (inference still busy with an earlier frame)",
    "display_busy": "replaced before the window painted it (the GUI thread still busy)",
    "no_model": "no backend could run the model",
}


class RunStats:
    """Thread-safe counters for one pipeline run (one source)."""

    def __init__(self, window: int = 120, first_epoch: int = 0):
        self._lock = threading.Lock()
        self.frames_in = 0  # decoded / grabbed by the source
        self.frames_out = 0  # shown (window) or handed to the recorder (headless)
        self.dropped = 0  # replaced in a latest-frame-wins slot before being processed or shown
        self.drop_reasons: collections.Counter = collections.Counter()  # DROP_REASONS -> frames
        self.stale = 0  # obsolete after a seek before they could be shown
        self.first_epoch = first_epoch  # frames of an earlier epoch belong to an earlier source's run
        self.infer_hist = Histogram()
        self.infer_b_hist = Histogram()  # compare mode: model B
        self.analyzer = None  # analysis.Analyzer of this run (temporal, cue, agreement figures)
        self.latency_hist = Histogram()
        self._infer_recent: collections.deque = collections.deque(maxlen=window)
        self._infer_b_recent: collections.deque = collections.deque(maxlen=window)
        self._latency_recent: collections.deque = collections.deque(maxlen=window)
        self._out_times: collections.deque = collections.deque(maxlen=window)
        self.t_start: float | None = None  # first frame may enter the model (backend ready)
        self.t_end: float | None = None
        self.infer_total_ms = 0.0
        self.excluded_s = 0.0  # time the pipeline stood still for the interleaved model-only benchmark

    # -- producers -------------------------------------------------------------------------
    def frame_in(self) -> None:
        with self._lock:
            self.frames_in += 1

    def frame_dropped(self, reason: str) -> None:
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}; one of {sorted(DROP_REASONS)}")
        with self._lock:
            self.dropped += 1
            self.drop_reasons[reason] += 1

    def frame_stale(self) -> None:
        with self._lock:
            self.stale += 1

    def inference(self, ms: float) -> None:
        with self._lock:
            self.infer_hist.add(ms)
            self.infer_total_ms += ms
            self._infer_recent.append(ms)

    def inference_b(self, ms: float) -> None:
        with self._lock:
            self.infer_b_hist.add(ms)
            self._infer_b_recent.append(ms)

    def frame_out(self, t_capture: float, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        ms = (now - t_capture) * 1000.0
        with self._lock:
            self.frames_out += 1
            self.latency_hist.add(ms)
            self._latency_recent.append(ms)
            self._out_times.append(now)

    def start(self) -> None:
        with self._lock:
            if self.t_start is None:
                self.t_start = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        with self._lock:
            self.excluded_s += seconds

    def stop(self) -> None:
        with self._lock:
            self.t_end = time.perf_counter()

    # -- readers ---------------------------------------------------------------------------
    def live(self) -> dict:
        """Recent-window figures for the status bar."""
        with self._lock:
            times = list(self._out_times)
            infer = list(self._infer_recent)
            infer_b = list(self._infer_b_recent)
            lat = list(self._latency_recent)
            dropped, seen, stale = self.dropped, self.frames_in, self.stale
        now = time.perf_counter()
        recent = [t for t in times if now - t <= 2.0]
        fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) >= 2 and recent[-1] > recent[0] else 0.0
        return {
            "display_fps": fps,
            "inference_ms": float(np.median(infer)) if infer else None,
            "inference_b_ms": float(np.median(infer_b)) if infer_b else None,
            "latency_ms_p50": float(np.percentile(lat, 50)) if lat else None,
            "latency_ms_p95": float(np.percentile(lat, 95)) if lat else None,
            "dropped": dropped,
            "dropped_pct": 100.0 * dropped / seen if seen else 0.0,
            "stale": stale,
        }

    def summary(self) -> dict:
        """Whole-run figures (the --stats JSON)."""
        with self._lock:
            t0 = self.t_start
            t1 = self.t_end or time.perf_counter()
            total = (t1 - t0) if t0 is not None else 0.0
            wall = total - self.excluded_s
            out = {
                "frames_in": self.frames_in,
                "frames_out": self.frames_out,
                "dropped": self.dropped,
                "dropped_pct": round(100.0 * self.dropped / self.frames_in, 3) if self.frames_in else 0.0,
                "dropped_by": {reason: self.drop_reasons[reason] for reason in DROP_REASONS},
                "stale": self.stale,
                # frames still between the stages when the run stopped (0 when a file played to its end)
                "in_flight": self.frames_in - self.frames_out - self.dropped - self.stale,
                "wall_s": round(wall, 3),
                "wall_s_total": round(total, 3),  # including the interleaved model-only bursts
                "fps": round(self.frames_out / wall, 3) if wall > 0 else 0.0,
                # Share of the wall time the model was running: 100 % means decode, resize,
                # overlay and encode are fully hidden behind inference.
                "inference_busy_pct": round(100.0 * self.infer_total_ms / 1000.0 / wall, 1) if wall > 0 else None,
                "inference_ms_p50": _r(self.infer_hist.percentile(50)),
                "inference_ms_p95": _r(self.infer_hist.percentile(95)),
                "latency_ms_p50": _r(self.latency_hist.percentile(50)),
                "latency_ms_p95": _r(self.latency_hist.percentile(95)),
            }
            if self.infer_b_hist.n:
                out["compare"] = {"inference_ms_p50": _r(self.infer_b_hist.percentile(50)),
                                  "inference_ms_p95": _r(self.infer_b_hist.percentile(95)),
                                  "frames": self.infer_b_hist.n}
        if self.analyzer is not None:  # written by the postprocess thread only; read at the end
            analysis = self.analyzer.summary()
            agreement = analysis.pop("agreement", None)
            out.update(analysis)
            if agreement is not None:
                out.setdefault("compare", {})["agreement"] = agreement
        return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def describe_throughput(stats: dict) -> str:
    """The end-of-run figures in words. The pipeline's fps and the bare model's (bursts of
    predict() calls during the same run) are two measurements; when they disagree in a way that
    cannot hold on a quiet machine, say so rather than print a ratio that reads as a speed-up."""
    text = f"{stats['fps']:.1f} fps end to end"
    mo_fps, mo_ms, inf_ms = stats.get("model_only_fps"), stats.get("model_only_ms"), stats.get("inference_ms_p50")
    if mo_fps:
        text += f" (the model alone, timed in bursts during the run: {mo_fps:.1f} fps"
        if stats.get("inference_busy_pct"):
            text += f"; model busy {stats['inference_busy_pct']}% of the time"
        text += ")"
        busy = []
        if stats["fps"] > 1.1 * mo_fps:
            busy.append(f"the pipeline ran {stats['fps'] / mo_fps:.2f}x the model-alone rate, which a quiet "
                        "machine cannot do: the bursts were slowed by other load")
        if mo_ms and inf_ms and inf_ms > 2 * mo_ms:
            busy.append(f"inference took {inf_ms:.0f} ms per frame in the pipeline against {mo_ms:.0f} ms alone")
        if busy:
            text += "; the machine was too busy for these figures to mean much (" + "; ".join(busy) + ")"
    return text
