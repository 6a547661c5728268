"""Per-frame analysis in the postprocess stage: temporal filter, polyp cue, flicker and agreement.

`AnalysisSettings` are the live switches (the window toggles them; headless takes them from the
flags). One `Analyzer` per run (a new source starts afresh); it sees the frames in order, in
one thread, so its state needs no lock. Its `summary()` is the `temporal`, `cue` and `compare`
parts of the stats JSON; `FrameAnalysis` is what one frame's CSV row and the window's readout show.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

import cv2
import numpy as np

from .cue import Cue, CueSpec
from .temporal import CutDetector, FlickerMeter, SmoothSpec, TemporalFilter, dice


@dataclass
class AnalysisSettings:
    smooth: SmoothSpec | None = None  # None: off
    smooth_spec: SmoothSpec = field(default_factory=SmoothSpec)  # what the window's switch turns on
    cue: CueSpec = field(default_factory=CueSpec)
    cue_border: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def set_smooth(self, on: bool) -> None:
        with self._lock:
            self.smooth = self.smooth_spec if on else None

    def set_cue_border(self, on: bool) -> None:
        with self._lock:
            self.cue_border = bool(on)


@dataclass
class FrameAnalysis:
    area_pct: float  # mask area, % of the frame
    bbox: tuple[int, int, int, int] | None  # x, y, w, h in frame pixels; None without a mask
    present: bool  # area >= the cue's minimum
    cue_on: bool
    cut: bool
    smoothed: bool
    agreement: float | None = None  # Dice between the two models' masks (compare mode)


class Analyzer:
    def __init__(self, settings: AnalysisSettings):
        self.settings = settings
        self.cuts = CutDetector(settings.smooth_spec.cut)
        self.flicker = FlickerMeter()
        self.cue = Cue(settings.cue)
        self._filter: TemporalFilter | None = None
        self._epoch: int | None = None
        self._cut = False
        self._last_q: np.ndarray | None = None
        self._last: FrameAnalysis | None = None
        self._agree_sum = 0.0
        self._agree_n = 0
        self._agree_inter = 0
        self._agree_total = 0
        self._agree_recent: collections.deque = collections.deque(maxlen=50)  # the window's readout

    # -- before the threshold ----------------------------------------------------------------
    def filter(self, frame, threshold: float) -> np.ndarray:
        """The probabilities to threshold: the frame's own, or the temporal filter's output."""
        spec = self.settings.smooth
        if frame.refresh:  # a re-render of the last frame: show it again, advance nothing
            return self._last_q if spec is not None and self._last_q is not None else frame.probs
        image = frame.model_input if frame.model_input is not None else frame.image
        self._cut = self.cuts.is_cut(image) or frame.epoch != self._epoch
        self._epoch = frame.epoch
        if spec is None:
            self._filter = None
            self._last_q = None
            return frame.probs
        if self._filter is None or self._filter.spec != spec:
            self._filter = TemporalFilter(spec, self.settings.cue.min_area_frac)
            self.cuts.level = spec.cut
        self._last_q = self._filter.apply(frame.probs, threshold, self._cut)
        return self._last_q

    # -- after the threshold -----------------------------------------------------------------
    def observe(self, frame) -> FrameAnalysis:
        mask = frame.mask
        h, w = mask.shape[:2]
        area = cv2.countNonZero(mask)
        area_pct = 100.0 * area / (h * w)
        bbox = tuple(int(v) for v in cv2.boundingRect(mask)) if area else None
        present = area_pct >= self.settings.cue.min_area_pct and area > 0
        agreement = None
        if frame.mask_b is not None:
            agreement = dice(mask, frame.mask_b)
        if frame.refresh and self._last is not None:
            return FrameAnalysis(area_pct, bbox, present, self._last.cue_on, False, self._last.smoothed, agreement)
        cue_on = self.cue.update(present, area_pct)
        self.flicker.update(mask, present, self._cut)
        if agreement is not None:
            self._agree_sum += agreement
            self._agree_n += 1
            self._agree_recent.append(agreement)
            nb = cv2.countNonZero(frame.mask_b)
            self._agree_inter += cv2.countNonZero(cv2.bitwise_and(mask, frame.mask_b))
            self._agree_total += area + nb
        self._last = FrameAnalysis(area_pct, bbox, present, cue_on, self._cut, self.settings.smooth is not None,
                                   agreement)
        return self._last

    def recent_agreement(self) -> float | None:
        """Mean Dice of the two models over the last frames (any thread: a snapshot of a deque)."""
        recent = list(self._agree_recent)
        return sum(recent) / len(recent) if recent else None

    def summary(self) -> dict:
        smooth = self.settings.smooth
        out = {
            "temporal": {**self.flicker.summary(), "smooth": smooth.describe() if smooth else None},
            "cue": self.cue.summary(),
        }
        if self._agree_n:
            out["agreement"] = {
                "dice_mean": round(self._agree_sum / self._agree_n, 4),
                "dice_pooled": round(2.0 * self._agree_inter / self._agree_total, 4) if self._agree_total else 1.0,
                "frames": self._agree_n,
            }
        return out
