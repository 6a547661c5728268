"""Per-image segmentation metrics for polyp masks, and an accumulator over a test set.

Inputs, for every function here:
  prob  float HxW in [0, 1]: the model's probability map ALREADY resized to the mask's
        original size (the protocol of PraNet / Polyp-PVT: metrics live at the original size).
  mask  uint8 / bool HxW in {0, 1}: the ground truth.

Metrics and where their definitions come from
---------------------------------------------
Dice, IoU        at one threshold (`prob >= threshold`, the same rule as the engines and the
                 viewer; the threshold comes from checkpoint metadata, 0.5 by default).
Dice/IoU mean256 the "meanDic"/"meanIoU" reported by PraNet, Polyp-PVT, KDAS and most polyp
                 papers, from the PraNet MATLAB eval toolbox (main.m / Fmeasure_calu.m): Dice at
                 each of 256 thresholds 1:-1/255:0 (= k/255, k = 0..255, rule `prob >= t`),
                 averaged over thresholds, then over images.
Sm  (S-alpha)    Fan et al., ICCV 2017, alpha = 0.5.          } computed by pysodmetrics
Em  (E-phi mean) Fan et al., IJCAI 2018, mean over 256 thresh. } (py_sod_metrics), the Python
wFm (F-w-beta)   Margolin et al., CVPR 2014, beta = 1.         } reference implementation of
MAE              Perazzi et al., CVPR 2012.                    } the MATLAB toolbox.

Empty-mask conventions (frames without a polyp; none in the standard Kvasir/ClinicDB test sets)
  Dice, IoU (and each threshold of the mean256 variants): 1 when prediction and mask are both
      empty, 0 when exactly one is empty. The MATLAB toolbox scores 0 whenever there is no true
      positive, so it differs from ours only for an empty mask with an empty prediction.
  Sm  = 1 - mean(prob);  Em: pysodmetrics' rule (fraction of pixels predicted background);
  wFm = 0 always (pysodmetrics' rule: no foreground to recall), so wFm averages over a set
      with empty masks are pessimistic; MAE is unaffected.

Map normalisation: the toolbox min-max normalises every map to [0, 1] before scoring (Polyp-PVT's
Test.py also does so before saving PNGs). By default we score the probabilities as they are,
because a deployed model thresholds calibrated probabilities; `minmax=True` reproduces the
toolbox (and pysodmetrics fed with uint8 PNGs) for comparison with papers. On frames with a
polyp and a confident model the two agree closely; on an empty frame min-max stretches noise
into a full-frame "detection".

Speed: on a 1920x1080 mask one image takes about 1.4 s on one core, 60 % of it in wFm (a
distance transform and a 7x7 convolution, by scipy), the rest in Em, Sm and the 256-threshold
curves. `SegMetrics(workers=N)` scores images in N processes (one image per task, the same code,
so the numbers are identical to workers=1), which is what makes large HD test sets bearable.
"""

from __future__ import annotations

import math
import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Callable

import numpy as np
from py_sod_metrics import MAE, Emeasure, Smeasure, WeightedFmeasure

from kdas_core.models.presets import DEFAULT_THRESHOLD

# k/255 computed as a division (not k * (1/255)) so a map read from an 8-bit PNG (values k/255)
# meets its own threshold exactly, as in MATLAB.
THRESHOLDS_256 = np.arange(256, dtype=np.float64) / 255.0

SUMMARY_KEYS = ("mDice", "mIoU", "mDice_mean256", "mIoU_mean256", "Sm", "Em", "wFm", "MAE")
# per-image column -> summary key
_ROW_TO_SUMMARY = {"Dice": "mDice", "IoU": "mIoU", "Dice_mean256": "mDice_mean256", "IoU_mean256": "mIoU_mean256",
                   "Sm": "Sm", "Em": "Em", "wFm": "wFm", "MAE": "MAE"}


def _check(prob: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prob = np.asarray(prob)
    mask = np.asarray(mask)
    if prob.ndim != 2 or prob.shape != mask.shape:
        raise ValueError(f"prob {prob.shape} and mask {mask.shape} must be 2-D and the same size "
                         "(resize the probability map to the mask's original size first)")
    prob = prob.astype(np.float64, copy=False)
    if prob.size and (np.isnan(prob).any() or prob.min() < 0 or prob.max() > 1):
        raise ValueError("prob must be probabilities in [0, 1] (apply sigmoid to logits), without NaN")
    if mask.dtype != bool:
        if mask.size and mask.max() > 1:
            raise ValueError("mask must be binary {0, 1} (kdas_core.data.read_mask gives that), got max "
                             f"{mask.max()}")
        mask = mask.astype(bool)
    return prob, mask


def minmax_normalise(prob: np.ndarray) -> np.ndarray:
    """The toolbox's mapminmax: stretch to [0, 1]; a constant map is left as is (as pysodmetrics)."""
    lo, hi = float(prob.min()), float(prob.max())
    return (prob - lo) / (hi - lo) if hi > lo else prob


def _dice_iou(tp, n_pred, n_gt):
    """Dice and IoU from counts (scalars or arrays); both empty -> 1."""
    tp, n_pred, n_gt = (np.asarray(v, dtype=np.float64) for v in (tp, n_pred, n_gt))
    union = n_pred + n_gt - tp
    both_empty = (n_pred + n_gt) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(both_empty, 1.0, 2 * tp / np.maximum(n_pred + n_gt, 1))
        iou = np.where(both_empty, 1.0, tp / np.maximum(union, 1))
    return dice, iou


def dice_from_counts(overlap: int, n_a: int, n_b: int) -> float:
    """Dice of two masks from their pixel counts (overlap, each mask's area); both empty -> 1.
    The one Dice formula of the project: callers that count pixels their own fast way (the
    viewer's flicker meter, export verification) pass the counts here."""
    return float(_dice_iou(overlap, n_a, n_b)[0])


def dice_iou_at(prob: np.ndarray, mask: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> tuple[float, float]:
    """Dice and IoU of `prob >= threshold` against `mask` (both empty -> 1, 1)."""
    return _dice_iou_at(*_check(prob, mask), threshold)


def _dice_iou_at(prob, mask, threshold):
    pred = prob >= threshold
    dice, iou = _dice_iou(np.count_nonzero(pred & mask), np.count_nonzero(pred), np.count_nonzero(mask))
    return float(dice), float(iou)


def dice_iou_curves(prob: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dice and IoU at each of THRESHOLDS_256 (arrays of 256), in one pass over the pixels.

    For each pixel, the number of thresholds it reaches (`prob >= t`) is counted once; the
    positives at threshold k are then the pixels that reach more than k thresholds."""
    return _dice_iou_curves(*_check(prob, mask))


def _dice_iou_curves(prob, mask):
    reached = np.searchsorted(THRESHOLDS_256, prob.ravel(), side="right")  # 1..256
    flat_mask = mask.ravel()
    hist_all = np.bincount(reached, minlength=257)
    hist_fg = np.bincount(reached[flat_mask], minlength=257)
    # positives at threshold k = #pixels with reached > k = reverse cumulative sum from k+1
    n_pred = np.cumsum(hist_all[::-1])[::-1][1:]
    tp = np.cumsum(hist_fg[::-1])[::-1][1:]
    return _dice_iou(tp, n_pred, np.count_nonzero(mask))


def structure_measures(prob: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Sm, Em (mean over thresholds), wFm and MAE by pysodmetrics, on a float map in [0, 1]."""
    return _structure_measures(*_check(prob, mask))


def _structure_measures(prob, mask):
    sm, em, wfm, mae = Smeasure(), Emeasure(), WeightedFmeasure(), MAE()
    for m in (sm, em, wfm, mae):
        # normalize=False: score the map as given (no min-max stretch; see module docstring)
        m.step(prob, mask, normalize=False)
    return {"Sm": float(sm.sms[-1]), "Em": float(np.mean(em.changeable_ems[-1])),
            "wFm": float(wfm.weighted_fms[-1]), "MAE": float(mae.maes[-1])}


def image_metrics(prob: np.ndarray, mask: np.ndarray, threshold: float = DEFAULT_THRESHOLD, minmax: bool = False) -> dict[str, float]:
    """All per-image metrics: Dice, IoU, Dice_mean256, IoU_mean256, Sm, Em, wFm, MAE."""
    prob, mask = _check(prob, mask)
    if minmax:
        prob = minmax_normalise(prob)
    return _image_metrics(prob, mask, threshold)


def _image_metrics(prob, mask, threshold):
    dice, iou = _dice_iou_at(prob, mask, threshold)
    dice_curve, iou_curve = _dice_iou_curves(prob, mask)
    out = {"Dice": dice, "IoU": iou,
           "Dice_mean256": float(dice_curve.mean()), "IoU_mean256": float(iou_curve.mean())}
    out.update(_structure_measures(prob, mask))
    return out


def score_image(prob: np.ndarray, mask: np.ndarray, name: str, threshold: float, minmax: bool) -> dict:
    """One per-image row: name, size, pixel counts and every metric (what SegMetrics keeps)."""
    prob, mask = _check(prob, mask)
    scored = minmax_normalise(prob) if minmax else prob
    metrics = _image_metrics(scored, mask, threshold)
    return {"name": name, "height": mask.shape[0], "width": mask.shape[1],
            "gt_pixels": int(np.count_nonzero(mask)),
            "pred_pixels": int(np.count_nonzero(scored >= threshold)), **metrics}




class SegMetrics:
    """Accumulates per-image metrics over a test set.

    >>> acc = SegMetrics(threshold=meta["threshold"])
    >>> acc.update(prob, mask, name="cju0qkwl35piu0993l0dewei2")   # per-image dict
    >>> acc.summary()   # {"mDice", "mIoU", "mDice_mean256", "mIoU_mean256", "Sm", "Em", "wFm", "MAE", "n"}

    Every summary value is the plain mean over images of the per-image value (as the toolbox);
    `rows` keeps one dict per image (name, size, pixel counts and the metrics) for CSVs.

    Several cores: `SegMetrics(..., workers=N)` and `submit(prob, mask, name, on_row)` instead of
    `update`: images are scored in N worker processes, `on_row(row)` is called in submission order
    as results come back, and at most 2N images wait at a time (bounded memory on HD frames).
    `close()` (or `with SegMetrics(...) as acc:`) waits for the rest and stops the workers;
    `summary()` and `rows` count only finished images.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, minmax: bool = False, workers: int = 1):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.threshold = float(threshold)
        self.minmax = minmax
        self.workers = int(workers)
        self.rows: list[dict] = []
        self._pool: ProcessPoolExecutor | None = None
        self._pending: deque[tuple[Future, Callable[[dict], None] | None]] = deque()
        self._submitted = 0

    def _name(self, name: str) -> str:
        return name or f"image_{self._submitted:05d}"

    def update(self, prob: np.ndarray, mask: np.ndarray, name: str = "") -> dict:
        """Score one image now (in this process) and return its row."""
        self.wait()  # keep rows in submission order
        row = score_image(prob, mask, self._name(name), self.threshold, self.minmax)
        self._submitted += 1
        self.rows.append(row)
        return row

    def submit(self, prob: np.ndarray, mask: np.ndarray, name: str = "", on_row: Callable[[dict], None] | None = None) -> None:
        """Score one image in a worker process (in this one when workers == 1)."""
        if self.workers == 1:
            row = self.update(prob, mask, name)
            if on_row is not None:
                on_row(row)
            return
        _check(prob, mask)  # bad input fails here, at the caller, not later in a worker
        if self._pool is None:
            # fork: workers start in milliseconds and need nothing but numpy/scipy (no torch, no
            # threads of the parent are used in them); spawn where fork does not exist.
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx)
        future = self._pool.submit(score_image, prob, mask, self._name(name), self.threshold, self.minmax)
        self._submitted += 1
        self._pending.append((future, on_row))
        while len(self._pending) > 2 * self.workers:
            self._collect_one()

    def _collect_one(self) -> None:
        future, on_row = self._pending.popleft()
        row = future.result()
        self.rows.append(row)
        if on_row is not None:
            on_row(row)

    def wait(self) -> None:
        """Block until every submitted image is scored."""
        while self._pending:
            self._collect_one()

    def close(self) -> None:
        """Wait for submitted images, then stop the worker processes. Safe to call twice."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
                self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            self._pending.clear()  # an error upstream: do not wait for work nobody will read
        self.close()

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self) -> dict:
        """Means over images; NaN for every metric when nothing was scored (n = 0)."""
        out = {}
        for col, key in _ROW_TO_SUMMARY.items():
            out[key] = float(np.mean([r[col] for r in self.rows])) if self.rows else math.nan
        out["n"] = len(self.rows)
        return out
