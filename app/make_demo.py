"""Encode the bundled demo clip from the synthetic generator (no patient data).

    python -m app.make_demo --out assets/demo.mp4 [--frames 250] [--size 352] [--fps 25] [--seed 0]

Deterministic per seed. Synthetic frames are for trying the viewer, not for judging a model.
"""

from __future__ import annotations

import argparse
import os
import sys
from fractions import Fraction

import av

from kdas_core.cli.conventions import Parser, add_deprecated_alias
from kdas_core.io.atomic import staged


def write_clip(out: str, frames: int = 250, size: int = 352, fps: int = 25, seed: int = 0, crf: int = 22,
               masks_out: str | None = None) -> int:
    """Write `frames` synthetic frames as H.264 MP4 (atomically: temp file, then rename).
    Returns the file size in bytes."""
    from kdas_core.data.synthetic import render_clip

    masks = []
    with staged(out) as tmp:
        with av.open(tmp, "w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=Fraction(fps))
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            stream.options = {"preset": "slow", "crf": str(crf), "g": str(2 * fps)}  # keyframe every 2 s: quick seeks
            for rgb, mask in render_clip(frames, size, seed):
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    container.mux(packet)
                if masks_out:
                    masks.append(mask)
            for packet in stream.encode(None):
                container.mux(packet)
    if masks_out:
        import numpy as np

        with staged(masks_out, suffix=".npz") as tmp:
            np.savez_compressed(tmp, masks=np.stack(masks))
    return os.path.getsize(out)


def _main(argv: list[str] | None) -> int:
    p = Parser(exit_codes=(0, 1, 2), prog="python -m app.make_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="PATH", help="output .mp4 (e.g. assets/demo.mp4)")
    p.add_argument("--max-frames", dest="frames", type=int, default=250, metavar="N",
                   help="number of frames (default 250 = 10 s at 25 fps)")
    add_deprecated_alias(p, "--frames", "--max-frames", "frames", type=int)
    p.add_argument("--size", type=int, default=352, metavar="S", help="frame width and height in pixels (default 352)")
    p.add_argument("--fps", type=int, default=25, metavar="N", help="frame rate (default 25)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="scene and camera path seed (default 0)")
    p.add_argument("--crf", type=int, default=22, metavar="N", help="x264 quality, lower is better and bigger (default 22)")
    p.add_argument("--masks", metavar="NPZ", help="also save the ground-truth masks (uint8 N x H x W) here")
    args = p.parse_args(argv)
    if args.frames < 1 or args.size < 16 or args.size % 2 or args.fps < 1:
        p.error("--frames >= 1, --size even and >= 16, --fps >= 1")
    size = write_clip(args.out, args.frames, args.size, args.fps, args.seed, args.crf, args.masks)
    print(f"wrote {args.out}: {args.frames} frames {args.size}x{args.size} @ {args.fps} fps, {size / 1e6:.2f} MB")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command, under the exit-code rules every command shares (kdas_core.cli.conventions.run_cli)."""
    from kdas_core.cli.conventions import run_cli

    from .errors import AppError

    return run_cli(lambda: _main(argv), "app.make_demo", coded=(AppError,))


if __name__ == "__main__":
    sys.exit(main())
