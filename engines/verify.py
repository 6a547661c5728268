"""Agreement checks between a built artefact and the PyTorch checkpoint it came from.

fp32: max |prob difference| <= 1e-3.
fp16: mask Dice agreement >= 0.99 at the model threshold, and no all-empty mask where the
reference has foreground (all-black FP16 masks are a known TensorRT failure).
int8: mask Dice agreement >= 0.85 on real frames, and no all-empty mask where the reference has
foreground. A guard against broken graphs (int16 saturation gave 0.68 on the 64x64 test model,
a sound one 0.88; the bundled student at 256 on real frames: 0.96); INT8 accuracy itself is
measured with kdas_core.evaluate on the test sets. The max prob diff is only reported: int8
moves probabilities near the threshold.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import numpy as np

FP32_MAX_DIFF = 1e-3
FP16_MIN_DICE = 0.99
INT8_MIN_DICE = 0.85  # a gross-failure guard (saturated or mis-calibrated graphs); accuracy: kdas_core.evaluate
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class Agreement:
    ok: bool
    precision: str
    max_abs_diff: float
    dice: float
    empty_masks: int
    frames: int
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        text = (
            f"verify {verdict} ({self.precision}, {self.frames} frames): max prob diff {self.max_abs_diff:.2e}, "
            f"mask Dice {self.dice:.4f}, empty masks where reference has foreground: {self.empty_masks}"
        )
        return text + "".join(f"\n  - {p}" for p in self.problems) + "".join(f"\n  note: {n}" for n in self.notes)


def compare(reference: np.ndarray, candidate: np.ndarray, precision: str, threshold: float) -> Agreement:
    """Judge `candidate` probabilities (N,H,W) against `reference` ones."""
    if reference.shape != candidate.shape:
        return Agreement(False, precision, float("inf"), 0.0, 0, len(reference), [f"shape {candidate.shape} != reference {reference.shape}"])
    problems = []
    if not np.isfinite(candidate).all():
        problems.append("non-finite probabilities (NaN/Inf) in the output")
    diff = float(np.max(np.abs(reference.astype(np.float64) - candidate.astype(np.float64))))
    if not np.isfinite(diff):
        diff = float("inf")
    ref_mask, cand_mask = reference >= threshold, candidate >= threshold
    inter = np.logical_and(ref_mask, cand_mask).sum()
    total = ref_mask.sum() + cand_mask.sum()
    dice = 1.0 if total == 0 else float(2.0 * inter / total)
    empty = int(sum(1 for r, c in zip(ref_mask, cand_mask) if r.any() and not c.any()))
    if precision == "fp32":
        if diff > FP32_MAX_DIFF:
            problems.append(f"max prob diff {diff:.2e} > {FP32_MAX_DIFF:.0e}")
    else:
        min_dice = INT8_MIN_DICE if precision == "int8" else FP16_MIN_DICE
        if dice < min_dice:
            problems.append(f"mask Dice {dice:.4f} < {min_dice}")
        if empty:
            problems.append(f"{empty} all-empty mask(s) where the FP32 reference has foreground (known {precision.upper()} failure)")
    notes = []
    if not ref_mask.any():
        notes.append("the reference masks are empty on these frames, so the mask check says little; use --verify-frames with real images")
    return Agreement(not problems, precision, diff, dice, empty, len(reference), problems, notes)


def synthetic_frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Deterministic colonoscopy-like frames: reddish mucosa with soft shading and a few bright
    elliptical blobs, uint8 (n,size,size,3) RGB. Not data, just varied realistic-range input."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    frames = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        shade = 0.55 + 0.45 * np.cos(3.0 * (xx - rng.random())) * np.cos(2.5 * (yy - rng.random()))
        img = np.stack([170 * shade + 40, 80 * shade + 20, 70 * shade + 15], axis=-1)
        for _ in range(rng.integers(1, 4)):
            cx, cy = rng.random(2)
            rx, ry = 0.08 + 0.2 * rng.random(2)
            blob = np.exp(-(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2) * 2.0)[..., None]
            img = img * (1 - 0.6 * blob) + 0.6 * blob * np.array([230, 150, 130])
        img += rng.normal(0, 6, img.shape)
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def load_frames(folder: str, size: int, limit: int = 8) -> np.ndarray:
    """Up to `limit` images from `folder`, RGB, resized to size x size (as the viewer does)."""
    import cv2

    paths = sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.lower().endswith(IMAGE_SUFFIXES))[:limit]
    if not paths:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) to verify on")
    out = []
    for p in paths:
        bgr = cv2.imread(p, cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"{p}: not a readable image")
        out.append(cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (size, size), interpolation=cv2.INTER_LINEAR))
    return np.stack(out)
