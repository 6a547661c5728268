"""Time to accuracy: how long a candidate recipe takes to reach the validation mDice a baseline
run has after a given number of wall minutes, from the two runs' log.csv.

Example (both runs lite0 at 256 on the same data and split, one after the other on an idle machine):
  python -m kdas_core.time_to_accuracy --baseline runs/tta-v1 --candidate runs/tta-fast --at 60 \\
      --json results/time_to_accuracy.json --png results/time_to_accuracy.png

The time axis is `wall_min` of log.csv: wall-clock minutes since the run started (model set-up,
image cache, training and validation included; added up over --resume). "Has after T minutes"
is the best validation mDice among the epochs finished by then, as best.safetensors would hold.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from kdas_core.cli.training import run_cli
from kdas_core.cli.conventions import Parser, UsageError
from kdas_core.io.atomic import staged, write_json


def read_curve(run: str) -> list[tuple[float, float]]:
    path = os.path.join(run, "log.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run}: no log.csv (is it a run folder of kdas_core.train?)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    pts = [(float(r["wall_min"]), float(r["val_mDice"])) for r in rows if r.get("wall_min") and r.get("val_mDice")]
    if not pts:
        raise UsageError(f"{path}: no rows with wall_min and val_mDice (written by an older version, or no validation)")
    return pts


def best_by(curve: list[tuple[float, float]], minutes: float) -> float | None:
    vals = [v for t, v in curve if t <= minutes]
    return max(vals) if vals else None


def first_reaching(curve: list[tuple[float, float]], value: float) -> float | None:
    for t, v in curve:
        if v >= value:
            return t
    return None


def compare(baseline: list[tuple[float, float]], candidate: list[tuple[float, float]], at: float) -> dict:
    target = best_by(baseline, at)
    if target is None:
        raise UsageError(f"the baseline finished no validated epoch within {at:g} minutes")
    reached = first_reaching(candidate, target)
    return {"at_min": at, "baseline_val_mDice_at": target, "candidate_min_to_reach": reached,
            "speedup": None if reached is None else round(at / reached, 2),
            "target_met": reached is not None and reached <= at / 2,
            "baseline_curve": baseline, "candidate_curve": candidate,
            "baseline_covers_at": max(t for t, _ in baseline) >= at}


def plot(result: dict, labels: tuple[str, str], path: str, w: int = 900, h: int = 540) -> None:
    """A plain line plot with OpenCV (no plotting library needed)."""
    import cv2
    import numpy as np

    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 70, 20, 40, 60
    curves = [result["baseline_curve"], result["candidate_curve"]]
    t_max = max(max(t for t, _ in c) for c in curves + [[(result["at_min"], 0)]]) * 1.05
    vals = [v for c in curves for _, v in c]
    v_lo, v_hi = max(0.0, min(vals) - 0.02), min(1.0, max(vals) + 0.02)

    def xy(t, v):
        return (int(left + t / t_max * (w - left - right)), int(h - bottom - (v - v_lo) / (v_hi - v_lo) * (h - top - bottom)))

    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.rectangle(img, xy(0, v_lo), xy(t_max, v_hi), (0, 0, 0), 1)
    for i in range(6):
        v = v_lo + (v_hi - v_lo) * i / 5
        cv2.putText(img, f"{v:.2f}", (8, xy(0, v)[1] + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        t = t_max * i / 5
        cv2.putText(img, f"{t:.0f}", (xy(t, v_lo)[0] - 8, h - bottom + 18), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "wall minutes", (w // 2 - 50, h - 15), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "validation mDice", (8, 25), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    target = result["baseline_val_mDice_at"]
    cv2.line(img, xy(0, target), xy(t_max, target), (160, 160, 160), 1, cv2.LINE_AA)
    cv2.line(img, xy(result["at_min"], v_lo), xy(result["at_min"], v_hi), (160, 160, 160), 1, cv2.LINE_AA)
    colours = [(200, 90, 30), (30, 120, 230)]
    for c, colour, label, k in zip(curves, colours, labels, range(2)):
        pts = [xy(t, v) for t, v in c]
        for a, b in zip(pts, pts[1:]):
            cv2.line(img, a, b, colour, 2, cv2.LINE_AA)
        for p in pts:
            cv2.circle(img, p, 3, colour, -1, cv2.LINE_AA)
        cv2.putText(img, label, (left + 15, top + 20 + 20 * k), font, 0.5, colour, 1, cv2.LINE_AA)
    reached = result["candidate_min_to_reach"]
    note = (f"baseline at {result['at_min']:g} min: {target:.3f}; candidate reaches it at "
            + (f"{reached:.1f} min ({result['speedup']}x)" if reached is not None else "- (never)"))
    cv2.putText(img, note, (left + 15, h - bottom - 12), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    with staged(path) as tmp:
        if not cv2.imwrite(tmp, img):
            raise UsageError(f"{path}: could not write the plot (is it a .png path?)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(exit_codes=(0, 1, 2), prog="python -m kdas_core.time_to_accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, metavar="RUN", help="run folder of the reference recipe")
    p.add_argument("--candidate", required=True, metavar="RUN", help="run folder of the recipe under test")
    p.add_argument("--at", type=float, default=60.0, metavar="MIN", help="baseline budget in minutes (default: 60)")
    p.add_argument("--json", metavar="PATH", help="write the comparison and both curves")
    p.add_argument("--png", metavar="PATH", help="write a plot of both curves")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> None:
        base, cand = read_curve(args.baseline), read_curve(args.candidate)
        result = compare(base, cand, args.at)
        labels = []
        for key, run in (("baseline", args.baseline), ("candidate", args.candidate)):
            cfg_path = os.path.join(run, "config.json")
            cfg = {}
            if os.path.isfile(cfg_path):
                with open(cfg_path) as f:
                    cfg = json.load(f)
            result[f"{key}_run"] = {"path": run, "recipe": cfg.get("recipe"), "config": cfg}
            labels.append(f"{key}: {os.path.basename(os.path.normpath(run))} (recipe {cfg.get('recipe', '?')})")
        reached = result["candidate_min_to_reach"]
        print(f"baseline best validation mDice within {args.at:g} min: {result['baseline_val_mDice_at']:.4f}"
              + ("" if result["baseline_covers_at"] else " (its log ends before that: the run was shorter)"))
        print("candidate reaches it " + (f"after {reached:.1f} min ({result['speedup']}x)" if reached is not None else "never")
              + f"; target (<= {args.at / 2:g} min): {'met' if result['target_met'] else 'missed'}")
        if args.json:
            write_json(args.json, result)
        if args.png:
            plot(result, tuple(labels), args.png)

    return run_cli(go, "kdas_core.time_to_accuracy")


if __name__ == "__main__":
    sys.exit(main())
