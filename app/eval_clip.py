"""Flicker and per-frame Dice of a model on an annotated clip, with and without the temporal filter.

    python -m app.eval_clip ../shared/data/clips/cvc-clinicdb.mp4 --gt ../shared/data/polyp \\
        [--weights PATH] [--smooth [SPEC] ...] [--thresholds 0.45,0.5,0.55] [--json OUT]

The model runs once per frame; every filter setting (off, and each --smooth) and every threshold
then goes through the viewer's own analysis code (`app.pipeline.analysis.Analyzer`: cut
detection, temporal filter, mask at frame resolution, flicker meter, cue hysteresis) on the same
probabilities, so the rows differ only in what they say they differ in. Reported per row:
per-frame Dice against the ground truth, `mask_toggles`, Dice of consecutive masks, cue episodes
with and without hysteresis, and the time per frame of the whole analysis and of the filter step
(a micro-benchmark: `added_ms_p50` / `added_ms_mean` are the median / mean of the per-frame
differences between the filter step and the same step without a filter, i.e. cut detection
only, measured interleaved frame by frame in one process).

Ground truth: clip frame i is the mask with the i-th smallest numeric stem found under --gt
(a masks folder, or a PraNet root: TrainDataset/masks and TestDataset/*/masks), which is how
../shared/data/clips/cvc-clinicdb.mp4 was made from CVC-ClinicDB. Bad input (a clip, mask or model
that cannot be used) and usage errors exit 2 with a message that says which; the exit codes close
this help.
"""

from __future__ import annotations

import argparse
import dataclasses
import csv
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from .errors import AppError, check_device
from .pipeline.analysis import Analyzer, AnalysisSettings
from .pipeline.cue import CueSpec
from .pipeline.items import Frame
from .pipeline.postprocess import probs_to_mask
from .pipeline.preprocess import resize_for_model
from .pipeline.temporal import SmoothSpec, dice

MASK_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def gt_masks(root: str) -> list[Path]:
    """Mask files with numeric stems under `root`, in numeric order."""
    base = Path(root)
    if not base.is_dir():
        raise AppError(f"--gt {root}: no such folder; give a masks folder or a PraNet root (TrainDataset/, TestDataset/)")
    folders = [base, base / "masks", base / "TrainDataset" / "masks", *sorted(base.glob("TestDataset/*/masks"))]
    found: dict[int, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.suffix.lower() in MASK_EXT and p.stem.isdigit():
                if int(p.stem) in found:
                    raise AppError(f"--gt {root}: two masks for frame stem {p.stem}: {found[int(p.stem)]} and {p}")
                found[int(p.stem)] = p
    if not found:
        raise AppError(f"--gt {root}: no masks with numeric file names (1.png, 2.png, ...) in it, its masks/ "
                       "or TrainDataset/masks and TestDataset/*/masks")
    return [found[k] for k in sorted(found)]


def read_mask(path: Path, hw: tuple[int, int]) -> np.ndarray:
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise AppError(f"{path}: not a readable image")
    if m.shape != hw:
        m = cv2.resize(m, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
    return np.where(m > 127, 255, 0).astype(np.uint8)


class _Row:
    """One (filter, threshold) setting: its own Analyzer, fed the shared probabilities."""

    def __init__(self, name: str, spec: SmoothSpec | None, threshold: float, cue: CueSpec):
        self.name, self.threshold = name, threshold
        self.analyzer = Analyzer(AnalysisSettings(smooth=spec, smooth_spec=spec or SmoothSpec(), cue=cue))
        self.dice: list[float] = []
        self.ms: list[float] = []  # the whole analysis of a frame
        self.filter_ms: list[float] = []  # cut detection + temporal filter only

    def step(self, frame: Frame, gt: np.ndarray) -> None:
        frame = Frame(index=frame.index, pts=frame.pts, image=frame.image, t_capture=0.0,
                      model_input=frame.model_input, probs=frame.probs)
        t0 = time.perf_counter()
        probs = self.analyzer.filter(frame, self.threshold)
        self.filter_ms.append((time.perf_counter() - t0) * 1000.0)
        frame.mask = probs_to_mask(probs, frame.image.shape[:2], self.threshold)
        self.analyzer.observe(frame)
        self.ms.append((time.perf_counter() - t0) * 1000.0)
        self.dice.append(dice(frame.mask, gt))

    def result(self) -> dict:
        s = self.analyzer.summary()
        ms, fms = np.asarray(self.ms), np.asarray(self.filter_ms)
        return {"filter": self.name, "threshold": self.threshold, "frames": len(self.dice),
                "dice_mean": round(float(np.mean(self.dice)), 4), **s["temporal"],
                "cue_episodes": s["cue"]["episodes"], "episodes_without_hysteresis": s["cue"]["episodes_without_hysteresis"],
                "frames_with_polyp": s["cue"]["frames_with_polyp"],
                "analysis_ms_mean": round(float(ms.mean()), 4), "analysis_ms_p95": round(float(np.percentile(ms, 95)), 4),
                "filter_ms_mean": round(float(fms.mean()), 4), "filter_ms_p95": round(float(np.percentile(fms, 95)), 4)}


def evaluate(clip: str, gt_root: str, model_path: str, *, backend: str = "auto", threads: int | None = None,
             specs: list[SmoothSpec] | None = None, thresholds: list[float] | None = None, cue: CueSpec | None = None,
             per_frame: str | None = None, max_frames: int | None = None, log=lambda s: None,
             device: str | None = None) -> dict:
    from .pipeline.inference import open_backend
    from .pipeline.source import VideoFileReader

    reader = VideoFileReader(clip)
    masks = gt_masks(gt_root)
    specs = specs or [SmoothSpec()]
    model = open_backend(model_path, backend, threads=threads, notice=log, device=device)
    thresholds = thresholds or [float(model.threshold)]
    cue = cue or CueSpec()
    rows = [_Row(name, spec, t, cue) for t in thresholds
            for name, spec in [("off", None)] + [(s.describe(), s) for s in specs]]
    per_frame_rows: list[list] = []
    infer_ms: list[float] = []
    i = 0
    try:
        while (max_frames is None or i < max_frames) and (item := reader.read()) is not None:
            image, pts = item
            if i >= len(masks):
                raise AppError(f"{clip} has more frames than --gt {gt_root} has numeric masks ({len(masks)})")
            gt = read_mask(masks[i], image.shape[:2])
            x = resize_for_model(image, tuple(model.input_size))
            t0 = time.perf_counter()
            probs = model.predict(x[None])[0]
            infer_ms.append((time.perf_counter() - t0) * 1000.0)
            frame = Frame(index=i, pts=pts, image=image, t_capture=0.0, model_input=x, probs=probs)
            for row in rows:
                row.step(frame, gt)
            if per_frame:
                per_frame_rows.append([i, masks[i].stem, *(round(r.dice[-1], 4) for r in rows)])
            i += 1
            if i % 100 == 0:
                log(f"{i} frames")
    finally:
        reader.close()
        model.close()
    if i != len(masks) and i != max_frames:
        raise AppError(f"{clip} has {i} frames but --gt {gt_root} has {len(masks)} numeric masks: "
                       "they must pair one to one (frame i = i-th smallest stem)")
    results = [r.result() for r in rows]
    for row, r in zip(rows, results):  # the filter's cost over the unfiltered row at the same threshold (interleaved)
        base_row = next(b for b in rows if b.threshold == row.threshold and b.name == "off")
        base = results[rows.index(base_row)]
        r["added_ms_mean"] = round(r["filter_ms_mean"] - base["filter_ms_mean"], 4)
        # median of the paired per-frame differences: robust to a busy machine's preemptions
        r["added_ms_p50"] = round(float(np.median(np.subtract(row.filter_ms, base_row.filter_ms))), 4)
        r["toggles_change_pct"] = round(100.0 * (r["mask_toggles"] - base["mask_toggles"]) / base["mask_toggles"], 1) \
            if base["mask_toggles"] else None
        r["dice_change_pp"] = round(100.0 * (r["dice_mean"] - base["dice_mean"]), 2)
    if per_frame:
        with open(per_frame, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "stem", *(f"dice[{r.name}@{r.threshold:g}]" for r in rows)])
            w.writerows(per_frame_rows)
    return {"clip": str(clip), "gt": str(gt_root), "model": str(model_path), "backend": model.name, "frames": i,
            "inference_ms_p50": round(float(np.median(infer_ms)), 3), "cue": dataclasses.asdict(cue),
            "rows": results}


def _table(res: dict) -> str:
    head = f"{'filter':<34} {'thr':>5} {'Dice':>7} {'toggles':>8} {'cons.Dice':>9} {'episodes':>8} {'raw ep.':>7} {'+ms p50':>8}"
    lines = [head]
    for r in res["rows"]:
        lines.append(f"{r['filter']:<34} {r['threshold']:>5.2f} {r['dice_mean']:>7.4f} {r['mask_toggles']:>8d} "
                     f"{r['consecutive_dice_mean'] or 0:>9.4f} {r['cue_episodes']:>8d} {r['episodes_without_hysteresis']:>7d} "
                     f"{r['added_ms_p50']:>8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from engines import CHOICES
    from kdas_core.io.atomic import write_json
    from kdas_core.cli.conventions import DEVICE_HELP, Parser, device_arg, positive_int, run_cli

    from . import DEFAULT_WEIGHTS
    from .cli import _smooth_spec, add_cue_arguments, add_weights_argument, cue_spec, resolve_model

    p = Parser(exit_codes=(0, 1, 2, 4, 130), prog="python -m app.eval_clip", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("clip", metavar="CLIP", help="annotated video file")
    p.add_argument("--gt", required=True, metavar="ROOT", help="masks folder or PraNet root with numeric-stem masks")
    add_weights_argument(p, DEFAULT_WEIGHTS.name)
    p.add_argument("--backend", default="auto", choices=CHOICES)
    p.add_argument("--device", type=device_arg, metavar="DEV", help=f"{DEVICE_HELP} (default: a CUDA GPU when one is visible, else cpu)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads of the backend")
    p.add_argument("--smooth", action="append", nargs="?", const="default", type=_smooth_spec, metavar="SPEC",
                   help="a filter setting to compare with no filter (repeatable; default: the default filter)")
    p.add_argument("--thresholds", metavar="T,T,...", help="thresholds to evaluate (default: the model's own)")
    add_cue_arguments(p)
    p.add_argument("--max-frames", type=positive_int, metavar="N", help="only the first N frames (quick checks)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--per-frame", metavar="CSV", help="per-frame Dice of every row")
    args = p.parse_args(argv)
    thresholds = None
    if args.thresholds:
        try:
            thresholds = [float(t) for t in args.thresholds.split(",")]
        except ValueError:
            p.error(f"--thresholds: expected numbers separated by commas, got {args.thresholds!r}")
        if not all(0.0 < t < 1.0 for t in thresholds):
            p.error(f"--thresholds: each must be in (0, 1), got {args.thresholds}")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    def go() -> int:
        check_device(args.device)
        res = evaluate(args.clip, args.gt, resolve_model(args), backend=args.backend, threads=args.threads,
                       specs=args.smooth, thresholds=thresholds, cue=cue_spec(args),
                       per_frame=args.per_frame, max_frames=args.max_frames, log=log, device=args.device)
        print(_table(res))
        if args.json:
            write_json(args.json, res)
        return 0

    return run_cli(go, "app.eval_clip", coded=(AppError,))


if __name__ == "__main__":
    sys.exit(main())
