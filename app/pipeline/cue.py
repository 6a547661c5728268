"""Polyp-present cue: a coloured frame border while a polyp is segmented, with hysteresis.

A frame "has a polyp" when its mask covers at least `min_area_pct` % of the frame. The cue goes
on after `on_after` such frames in a row and off after `off_after` frames in a row without one,
so a mask that flickers for a frame neither blinks the cue nor starts a new episode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CUE_RGB = (255, 176, 0)  # amber: unlike the green mask and unlike mucosa


@dataclass(frozen=True)
class CueSpec:
    on_after: int = 3
    off_after: int = 5
    min_area_pct: float = 0.1

    @property
    def min_area_frac(self) -> float:
        return self.min_area_pct / 100.0


class Cue:
    """Hysteresis state machine plus the run's counts."""

    def __init__(self, spec: CueSpec):
        self.spec = spec
        self.on = False
        self._run = 0  # consecutive frames that disagree with the current state
        self.frames = 0
        self.frames_with_polyp = 0
        self.frames_cue_on = 0
        self.episodes = 0
        self.raw_episodes = 0  # what a cue without hysteresis would count
        self._prev_present = False
        self._area_sum = 0.0

    def update(self, present: bool, area_pct: float) -> bool:
        self.frames += 1
        self._area_sum += area_pct
        if present:
            self.frames_with_polyp += 1
            if not self._prev_present:
                self.raw_episodes += 1
        self._prev_present = present
        if present != self.on:
            self._run += 1
            if self._run >= (self.spec.on_after if present else self.spec.off_after):
                self.on, self._run = present, 0
                if present:
                    self.episodes += 1
        else:
            self._run = 0
        if self.on:
            self.frames_cue_on += 1
        return self.on

    def summary(self) -> dict:
        s = self.spec
        return {
            "frames": self.frames,
            "frames_with_polyp": self.frames_with_polyp,
            "frames_cue_on": self.frames_cue_on,
            "episodes": self.episodes,
            "episodes_without_hysteresis": self.raw_episodes,
            "mask_area_pct_mean": round(self._area_sum / self.frames, 3) if self.frames else None,
            "on_after": s.on_after, "off_after": s.off_after, "min_area_pct": s.min_area_pct,
        }


def border_thickness(height: int, width: int) -> int:
    return max(3, round(min(height, width) / 48))


def draw_cue_border(image: np.ndarray, color: tuple[int, int, int] = CUE_RGB) -> np.ndarray:
    """In place: a solid border round the frame (the video content inside stays untouched)."""
    h, w = image.shape[:2]
    t = min(border_thickness(h, w), h // 2, w // 2)
    image[:t] = color
    image[h - t:] = color
    image[:, :t] = color
    image[:, w - t:] = color
    return image
