"""How fast can the pipeline go when the model costs nothing? (decode, resize, mask, overlay,
H.264 encode: everything but inference.)

    python -m app.bench_overhead [--size 1920x1080] [--frames 300] [--source FILE]

Runs headless mode with a zero-cost stand-in model (fixed blob mask, 352x352 input) over a
synthetic clip of the given size (or --source). If this ceiling is well above the model's own
throughput, the stages hide behind inference; on a GPU, a 1080p target of 120 fps needs this
figure comfortably above 120 on that machine's CPU. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from fractions import Fraction

import numpy as np


class StandInBackend:
    """Same face as an engines backend; predict() returns a precomputed blob instantly."""

    name = "stand-in"
    notes = ["zero-cost stand-in model: measures everything but inference"]

    def __init__(self, size: int = 352):
        self.input_size = (size, size)
        self.threshold = 0.5
        yy, xx = np.mgrid[0:size, 0:size]
        self._probs = (((yy - size * 0.45) ** 2 + (xx - size * 0.55) ** 2) < (size * 0.18) ** 2).astype(np.float32)

    def predict(self, frames: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self._probs, frames.shape[:3]).copy()

    def close(self) -> None:
        pass


def make_sized_clip(path: str, width: int, height: int, frames: int, fps: int = 30) -> str:
    import av
    import cv2

    from kdas_core.data.synthetic import render_clip

    base = min(512, max(width, height) // 2)
    with av.open(path, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"preset": "veryfast", "crf": "20"}
        for rgb, _ in render_clip(frames, base, seed=0):
            big = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)
            for p in s.encode(av.VideoFrame.from_ndarray(big, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.bench_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1920x1080", help="WxH of the synthetic clip (default 1920x1080)")
    p.add_argument("--frames", type=int, default=300, help="frames in the synthetic clip (default 300)")
    p.add_argument("--source", help="use this video instead of a synthetic one")
    p.add_argument("--json", help="write the stats here")
    args = p.parse_args(argv)
    from .headless import run_headless

    with tempfile.TemporaryDirectory(prefix="kdas-overhead-") as tmp:
        source = args.source
        if source is None:
            w, h = (int(v) for v in args.size.lower().split("x"))
            source = make_sized_clip(os.path.join(tmp, "clip.mp4"), w, h, args.frames)
        res = run_headless(source, os.path.join(tmp, "out.mp4"), model_path="stand-in", progress=None,
                           backend_factory=lambda *a, **k: StandInBackend())
    keys = ("frames_out", "fps", "latency_ms_p50", "latency_ms_p95", "wall_s")
    print(json.dumps({"source": args.source or f"synthetic {args.size}", **{k: res.stats.get(k) for k in keys},
                      "cpu_count": os.cpu_count()}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res.stats, f, indent=2)
    return res.exit_code


if __name__ == "__main__":
    sys.exit(main())
