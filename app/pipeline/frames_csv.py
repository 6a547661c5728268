"""Per-frame results for offline analysis (``--frames-csv PATH``): one row per frame.

Written incrementally, one flushed line per frame, so the file is complete up to the last frame
after Ctrl+C / SIGTERM (like the recording) and can be followed while the run goes on.
Every frame the source emitted gets exactly one row, written when its way ends (the same moment
the run's stats count it): `outcome` is shown (painted in the window, recorded headless), dropped
(`drop_reason` names the busy stage; `dropped` = 1; no results) or stale (made obsolete by a seek;
no results). Rows are in the order frames finished, so sort by `index` for decode order.
"""

from __future__ import annotations

import csv
import os
import threading
import time

from ..errors import AppError
from .items import Frame

COLUMNS = ("index", "pts_s", "mask_area_pct", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "polyp_present", "cue_on",
           "inference_ms", "latency_ms", "dropped", "inference_b_ms", "agreement_dice", "outcome", "drop_reason")


class FramesCsv:
    def __init__(self, path: str):
        self.path = str(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
            self._file = open(self.path, "w", newline="", encoding="utf-8")
        except OSError as exc:
            raise AppError(f"--frames-csv {self.path}: cannot create the file ({exc.strerror or exc}); "
                           "check the folder exists and is writable") from exc
        self._writer = csv.writer(self._file)
        self._lock = threading.Lock()
        self.rows = 0  # data rows written
        self._row(COLUMNS, count=0)

    def _row(self, values, count: int = 1) -> None:
        with self._lock:
            if self._file.closed:
                return
            self._writer.writerow(values)
            self._file.flush()
            self.rows += count

    def __call__(self, frame: Frame, outcome: str, reason: str | None = None, now: float | None = None) -> None:
        """One row for a frame whose way ended (a Pipeline outcome listener)."""
        if frame.refresh:
            return
        if outcome != "shown":
            self._row((frame.index, _f(frame.pts, 4), "", "", "", "", "", "", "", "", "",
                       int(outcome == "dropped"), "", "", outcome, reason or ""))
            return
        now = time.perf_counter() if now is None else now
        a = frame.analysis
        box = a.bbox if a is not None and a.bbox else ("", "", "", "")
        self._row((
            frame.index, _f(frame.pts, 4),
            _f(a.area_pct, 4) if a else "", *box,
            int(a.present) if a else "", int(a.cue_on) if a else "",
            _f(frame.infer_ms, 3), _f((now - frame.t_capture) * 1000.0, 3), 0,
            _f(frame.infer_ms_b, 3) if frame.probs_b is not None else "",
            _f(a.agreement, 4) if a is not None and a.agreement is not None else "",
            "shown", "",
        ))

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()


def _f(value, digits: int):
    return "" if value is None else round(float(value), digits)
