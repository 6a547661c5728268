"""Agreement checks between a built artefact and the PyTorch checkpoint it came from.

fp32: max |prob difference| <= 1e-3.
fp16: mask Dice agreement >= 0.99 at the model threshold, no all-empty mask where the reference
has foreground (all-black FP16 masks are a known TensorRT failure), and the probabilities
themselves close: mean |diff| <= 5e-3 and 99th-percentile |diff| <= 0.05. (The shipped student's
fp16 graph on ONNX Runtime CPU, 352², 8 demo frames: mean 8.8e-4, p99 0.023, max 0.087; the max
is a handful of boundary pixels, so it is reported, not bounded.)
int8: mask Dice agreement >= 0.85 on real frames, and no all-empty mask where the reference has
foreground. A guard against broken graphs (int16 saturation gave 0.68 on the 64x64 test model,
a sound one 0.88; the bundled student at 256 on real frames: 0.96); INT8 accuracy itself is
measured with kdas_core.evaluate on the test sets. Its prob differences are only reported: int8
moves probabilities near the threshold.
For both, the reference must have foreground on some frame, or the Dice says nothing: by default
the frames come from the bundled demo clip, keeping those where the reference segments a polyp
(`verification_frames`; without PyAV the clip's generator renders the same frames).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import numpy as np

from kdas_core.data import IMAGE_EXTS
from kdas_core.evaluation.metrics import dice_from_counts

FP32_MAX_DIFF = 1e-3
FP16_MIN_DICE = 0.99
FP16_MEAN_DIFF = 5e-3  # mean |prob diff|: a uniform drift Dice alone would not see
FP16_P99_DIFF = 0.05  # 99th percentile of |prob diff|: fp16 rounding moves a few boundary pixels, not many
MIN_FOREGROUND = 0.002  # a frame "has foreground" when >= 0.2 % of its reference mask is set
INT8_MIN_DICE = 0.85  # a gross-failure guard (saturated or mis-calibrated graphs); accuracy: kdas_core.evaluate
IMAGE_SUFFIXES = tuple(sorted(IMAGE_EXTS))  # kdas_core.data: what counts as an image, everywhere


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
    mean_abs_diff: float = float("nan")
    p99_abs_diff: float = float("nan")

    def summary(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        text = (
            f"verify {verdict} ({self.precision}, {self.frames} frames): max prob diff {self.max_abs_diff:.2e}, "
            f"mean {self.mean_abs_diff:.2e}, p99 {self.p99_abs_diff:.2e}, mask Dice {self.dice:.4f}, empty masks where reference has foreground: {self.empty_masks}"
        )
        return text + "".join(f"\n  - {p}" for p in self.problems) + "".join(f"\n  note: {n}" for n in self.notes)

    def to_dict(self) -> dict:
        """The figures, for an engine sidecar or a JSON report."""
        return {
            "ok": self.ok, "precision": self.precision, "frames": self.frames, "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff, "p99_abs_diff": self.p99_abs_diff, "dice": self.dice, "empty_masks": self.empty_masks, "problems": list(self.problems),
        }


def compare(reference: np.ndarray, candidate: np.ndarray, precision: str, threshold: float) -> Agreement:
    """Judge `candidate` probabilities (N,H,W) against `reference` ones."""
    if reference.shape != candidate.shape:
        return Agreement(False, precision, float("inf"), 0.0, 0, len(reference), [f"shape {candidate.shape} != reference {reference.shape}"])
    problems = []
    if not np.isfinite(candidate).all():
        problems.append("non-finite probabilities (NaN/Inf) in the output")
    abs_diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    diff, mean_diff = float(np.max(abs_diff)), float(np.mean(abs_diff))
    p99 = float(np.percentile(abs_diff, 99)) if np.isfinite(diff) else float("inf")
    if not np.isfinite(diff):
        diff = mean_diff = float("inf")
    ref_mask, cand_mask = reference >= threshold, candidate >= threshold
    dice = dice_from_counts(int(np.logical_and(ref_mask, cand_mask).sum()), int(ref_mask.sum()), int(cand_mask.sum()))
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
        if precision == "fp16" and mean_diff > FP16_MEAN_DIFF:
            problems.append(f"mean prob diff {mean_diff:.2e} > {FP16_MEAN_DIFF:.0e}")
        if precision == "fp16" and p99 > FP16_P99_DIFF:
            problems.append(f"99th-percentile prob diff {p99:.2e} > {FP16_P99_DIFF}")
        if not ref_mask.any():
            problems.append("the reference masks are empty on every frame, so the Dice check would be vacuous; "
                            "verify on frames with polyps (--verify-frames DIR)")
    notes = []
    if precision == "fp32" and not ref_mask.any():
        notes.append("the reference masks are empty on these frames, so the mask figures say little; use --verify-frames with real images")
    return Agreement(not problems, precision, diff, dice, empty, len(reference), problems, notes, mean_diff, p99)


def has_foreground(probs: np.ndarray, threshold: float, min_fraction: float = MIN_FOREGROUND) -> np.ndarray:
    """Per frame of (N,H,W) probabilities: does the mask cover at least `min_fraction` of it?"""
    return (probs >= threshold).reshape(len(probs), -1).mean(axis=1) >= min_fraction


def demo_frames(size: int, count: int = 24) -> np.ndarray:
    """`count` frames spread evenly over the bundled demo clip (synthetic polyps), RGB, resized to
    size x size as the viewer does. FileNotFoundError when the clip is missing."""
    import av
    import cv2

    from kdas_core.io.assets import DEMO_CLIP

    if not DEMO_CLIP.is_file():
        raise FileNotFoundError(f"{DEMO_CLIP}: the demo clip is missing; pass --verify-frames DIR, or regenerate it with `python -m app.make_demo`")
    with av.open(str(DEMO_CLIP)) as container:
        total = container.streams.video[0].frames  # 0 when the container does not say
        if total <= 0:
            total = sum(1 for _ in container.decode(video=0))
            container.seek(0)
        picks = set(np.linspace(0, total - 1, min(count, total)).round().astype(int).tolist()) if total else set()
        decoded = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0)) if i in picks]
    if not decoded:
        raise FileNotFoundError(f"{DEMO_CLIP}: no video frames")
    return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_LINEAR) for f in decoded])


# The demo clip is `python -m app.make_demo`'s default: 250 frames of kdas_core.data.synthetic's
# render_clip, seed 0. Without PyAV to decode it, the same generator renders its frames instead.
DEMO_CLIP_FRAMES, DEMO_CLIP_SEED = 250, 0


def rendered_demo_frames(size: int, count: int = 24) -> np.ndarray:
    """The demo clip's frames without a video decoder: `count` frames spread evenly over the
    clip's length, rendered by the generator that made the clip, directly at size x size (the
    same scenes and camera path as the decoded clip, without its H.264 compression)."""
    from kdas_core.data.synthetic import render_clip

    picks = set(np.linspace(0, DEMO_CLIP_FRAMES - 1, min(count, DEMO_CLIP_FRAMES)).round().astype(int).tolist())
    return np.stack([rgb for i, (rgb, _mask) in enumerate(render_clip(max(picks) + 1, size, DEMO_CLIP_SEED)) if i in picks])


def pyav_missing() -> str | None:
    """None when PyAV imports; else why not, naming the package."""
    try:
        import av  # noqa: F401
    except ImportError as exc:
        return f"PyAV (the `av` package) is not installed ({exc})"
    return None


def verification_frames(reference, size: int, folder: str | None = None, limit: int = 8) -> tuple[np.ndarray, np.ndarray, str]:
    """(frames, reference probabilities, description) to verify on: images from `folder`, or the
    demo clip's frames on which `reference` (a Backend) finds foreground, up to `limit` (decoded
    with PyAV, or rendered by the clip's generator where PyAV is not installed). When no demo
    frame has foreground, all candidates are returned (compare() then says so)."""
    if folder:
        frames = load_frames(folder, size, limit)
        return frames, reference.predict(frames), f"{len(frames)} images from {folder}"
    missing = pyav_missing()
    if missing:
        frames, where = rendered_demo_frames(size, count=3 * limit), f"demo-clip frames rendered by its generator ({missing})"
    else:
        frames, where = demo_frames(size, count=3 * limit), "demo-clip frames"
    probs = np.concatenate([reference.predict(frames[i : i + 4]) for i in range(0, len(frames), 4)])
    keep = np.flatnonzero(has_foreground(probs, reference.threshold))[:limit]
    if len(keep) == 0:
        return frames[:limit], probs[:limit], f"{min(limit, len(frames))} {where}; the reference finds no foreground on any"
    return frames[keep], probs[keep], f"{len(keep)} {where} where the reference has foreground"


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
