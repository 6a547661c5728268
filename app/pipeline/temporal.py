"""Temporal stability: how much the mask flickers over a run, and an optional filter against it.

Per-frame predictions flicker: a polyp's mask shrinks, splits or vanishes for a frame. Two parts:

- `CutDetector`: a scene cut (a new sequence, a seek, a new source) is a frame too unlike the
  previous one (mean absolute difference of 16x16 thumbnails, grey levels 0..255). Consecutive
  masks across a cut are not compared, and the filter forgets its past there.
- `TemporalFilter` (``--smooth [SPEC]``): works on the model's probabilities at model size, so
  thresholding stays in one place (postprocess) and the cost does not grow with the video size:
    * ``hyst=H``  pixel hysteresis: a pixel that was in the mask stays in down to threshold - H;
    * ``hold=K``  a mask that vanishes (area below the cue's minimum) is held for up to K frames;
    * ``ema=A``   exponential moving average of probabilities, A = weight of the newest frame
                  (1 = off; it lags behind a moving polyp, so it is off by default);
    * ``cut=C``   the cut level of the detector (reset there).
- `FlickerMeter`: the figures for the stats (`temporal.*`): appear/disappear toggles and Dice
  between consecutive masks within a sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import cv2
import numpy as np

from kdas_core.evaluation.metrics import dice_from_counts

THUMB = 16


@dataclass(frozen=True)
class SmoothSpec:
    hyst: float = 0.1
    hold: int = 2
    ema: float = 1.0
    cut: float = 30.0

    HELP = ("comma-separated key=value: hyst=H (pixel hysteresis on the probability, 0..0.5, default 0.1), "
            "hold=K (hold a vanished mask up to K frames, default 2), ema=A (moving average, weight of the newest "
            "frame 0..1, default 1 = off), cut=C (scene-cut level, mean grey difference, default 30)")

    @classmethod
    def parse(cls, text: str | None) -> "SmoothSpec":
        """`None`, '' or 'default' -> the defaults; otherwise 'key=value,...'. ValueError names the bad part."""
        if text is None or text.strip() in ("", "default", "on"):
            return cls()
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict = {}
        for part in text.split(","):
            key, sep, raw = part.strip().partition("=")
            if not sep or key not in kinds:
                raise ValueError(f"--smooth: {part.strip()!r} is not key=value with key one of {', '.join(kinds)}")
            try:
                values[key] = int(raw) if key == "hold" else float(raw)
            except ValueError:
                raise ValueError(f"--smooth: {key}={raw!r} is not a number") from None
        spec = cls(**values)
        if not 0.0 <= spec.hyst <= 0.5:
            raise ValueError(f"--smooth: hyst must be in [0, 0.5], got {spec.hyst}")
        if not 0 <= spec.hold <= 100:
            raise ValueError(f"--smooth: hold must be 0..100 frames, got {spec.hold}")
        if not 0.0 < spec.ema <= 1.0:
            raise ValueError(f"--smooth: ema must be in (0, 1], got {spec.ema}")
        if not spec.cut > 0:
            raise ValueError(f"--smooth: cut must be > 0, got {spec.cut}")
        return spec

    def describe(self) -> str:
        return f"hyst={self.hyst:g},hold={self.hold},ema={self.ema:g},cut={self.cut:g}"


class CutDetector:
    """`is_cut(image)`: True for the first frame and for a frame far from the previous one."""

    def __init__(self, level: float = SmoothSpec.cut):
        self.level = float(level)
        self._prev: np.ndarray | None = None
        self.last_difference: float | None = None

    def reset(self) -> None:
        self._prev = None

    def is_cut(self, image: np.ndarray) -> bool:
        thumb = cv2.resize(image, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32)
        prev, self._prev = self._prev, thumb
        if prev is None:
            self.last_difference = None
            return True
        self.last_difference = float(cv2.norm(thumb, prev, cv2.NORM_L1)) / thumb.size
        return self.last_difference >= self.level


class TemporalFilter:
    """probabilities (model size) -> filtered probabilities, thresholded later as usual."""

    def __init__(self, spec: SmoothSpec, min_area_frac: float):
        self.spec = spec
        self.min_area_frac = float(min_area_frac)
        self._avg: np.ndarray | None = None  # moving average of the model's own probabilities
        self._out: np.ndarray | None = None  # what was thresholded last (hysteresis, hold)
        self._held = 0

    def reset(self) -> None:
        self._avg, self._out, self._held = None, None, 0

    def apply(self, probs: np.ndarray, threshold: float, cut: bool) -> np.ndarray:
        s = self.spec
        if cut or self._out is None or self._out.shape != probs.shape:
            self._avg, self._out, self._held = probs, probs, 0
            return probs
        # The average takes the raw probabilities only: the hysteresis bump must not feed back into it.
        avg = probs if s.ema >= 1.0 else cv2.addWeighted(probs, s.ema, self._avg, 1.0 - s.ema, 0.0)
        self._avg = avg
        was_on = self._out >= threshold
        q = avg
        if s.hyst > 0:  # >= threshold - H where the mask was: the same as raising those pixels by H
            q = np.where(was_on, np.minimum(avg + s.hyst, 1.0), avg).astype(np.float32, copy=False)
        min_px = max(1.0, self.min_area_frac * q.size)
        if np.count_nonzero(q >= threshold) < min_px:
            if self._held < s.hold and np.count_nonzero(was_on) >= min_px:
                self._held += 1
                q = self._out  # the mask vanished for a frame: keep the last one a little longer
        else:
            self._held = 0
        self._out = q
        return q


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two {0, 255} or bool masks of one size; 1.0 when both are empty."""
    a, b = _u8(a), _u8(b)
    return dice_from_counts(cv2.countNonZero(cv2.bitwise_and(a, b)), cv2.countNonZero(a), cv2.countNonZero(b))


def _u8(m: np.ndarray) -> np.ndarray:
    return m.view(np.uint8) if m.dtype == bool else m


class FlickerMeter:
    """Run figures: toggles (frames where 'a polyp is segmented' flips), Dice of consecutive masks
    within a sequence (pairs where both are empty are left out: they are trivially stable)."""

    def __init__(self):
        self.toggles = 0
        self.cuts = 0
        self.frames = 0
        self._dice_sum = 0.0
        self._pairs = 0
        self._prev_present: bool | None = None
        self._prev_mask: np.ndarray | None = None

    def update(self, mask: np.ndarray, present: bool, cut: bool) -> None:
        self.frames += 1
        if self._prev_present is not None and present != self._prev_present:
            self.toggles += 1
        if cut:
            self.cuts += 1
        elif self._prev_mask is not None and self._prev_mask.shape == mask.shape and (present or self._prev_present):
            self._dice_sum += dice(mask, self._prev_mask)
            self._pairs += 1
        self._prev_present, self._prev_mask = present, mask

    def summary(self) -> dict:
        return {
            "mask_toggles": self.toggles,
            "consecutive_dice_mean": round(self._dice_sum / self._pairs, 4) if self._pairs else None,
            "consecutive_pairs": self._pairs,
            "cuts": self.cuts,
        }
