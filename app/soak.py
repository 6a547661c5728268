"""Soak benchmark: a long headless run, watching resident memory.

    python -m app.soak [--frames 10000] [--source CLIP] [--weights CKPT] [--backend B] [--json OUT.json]

Loops a clip through the full headless pipeline (decode, resize, inference, mask, overlay,
H.264 encode to a temp MP4) for --frames frames and samples the process's resident memory.
Growth is measured from a baseline taken after --warmup frames (allocator pools, codec and
backend caches settle) to the end; the target is < 50 MB for 10 000 frames. A benchmark,
not a test: it takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

from engines import CHOICES
from kdas_core.cli.conventions import DEVICE_HELP, Parser, add_deprecated_alias, device_arg, positive_int
from kdas_core.io.atomic import write_json

from . import DEFAULT_WEIGHTS, DEMO_CLIP
from .errors import AppError, check_device
from .testing import rss_mb

REAL_CLIP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "clips", "cvc-clinicdb.mp4")


def _main(argv: list[str] | None) -> int:
    p = Parser(exit_codes=(0, 1, 2, 4, 130), prog="python -m app.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", metavar="SOURCE",
                   help="clip to loop (default: ../shared/data/clips/cvc-clinicdb.mp4 if present, else the demo clip)")
    p.add_argument("--max-frames", dest="frames", type=positive_int, default=10000, metavar="N",
                   help="frames to push through (default 10000)")
    add_deprecated_alias(p, "--frames", "--max-frames", "frames", type=positive_int)
    add_deprecated_alias(p, "--source", "SOURCE", "source")
    p.add_argument("--warmup", type=int, default=500, metavar="N", help="frames before the memory baseline (default 500)")
    p.add_argument("--weights", metavar="PATH", help="checkpoint/engine (default: the bundled student; a random-init one if it is missing)")
    p.add_argument("--backend", default="auto", choices=CHOICES)
    p.add_argument("--device", type=device_arg, metavar="DEV", help=f"{DEVICE_HELP} (default: a CUDA GPU when one is visible, else cpu)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for the backend")
    p.add_argument("--sample-every", type=int, default=250, metavar="N", help="RSS sample period in frames (default 250)")
    p.add_argument("--json", metavar="PATH", help="write the result (and the RSS samples) here")
    args = p.parse_args(argv)

    from .headless import run_headless
    from .pipeline.source import VideoFileReader

    source = args.source or (REAL_CLIP if os.path.isfile(REAL_CLIP) else str(DEMO_CLIP))
    with tempfile.TemporaryDirectory(prefix="kdas-soak-") as tmp:
        weights = args.weights or (str(DEFAULT_WEIGHTS) if DEFAULT_WEIGHTS.is_file() else None)
        if weights is None:
            from .testing import make_checkpoint

            weights = make_checkpoint(os.path.join(tmp, "random-lite0.safetensors"), input_size=352)
            print("note: default weights missing; using a random-init polyppvt-lite0 (352) - memory behaves the same",
                  file=sys.stderr)
        try:
            check_device(args.device)
            clip_frames = VideoFileReader(source).frame_count or 1
        except AppError as exc:
            print(f"app.soak: error: {exc}", file=sys.stderr)
            return exc.exit_code
        loops = math.ceil(args.frames / clip_frames)
        samples: list[tuple[int, float, float]] = []  # (frame, seconds, RSS MB)
        t0 = time.perf_counter()
        start_rss = rss_mb()

        def on_frame(frame) -> None:
            n = frame.index + 1
            if n == 1 or n % args.sample_every == 0 or n == args.warmup:
                samples.append((n, round(time.perf_counter() - t0, 2), round(rss_mb(), 1)))
                if n % (4 * args.sample_every) == 0:
                    print(f"frame {n}: RSS {samples[-1][2]} MB, {samples[-1][1]:.0f} s", file=sys.stderr, flush=True)

        result = run_headless(source, os.path.join(tmp, "soak.mp4"), model_path=weights, backend=args.backend,
                              loop=loops, max_frames=args.frames, threads=args.threads, on_frame=on_frame, device=args.device,
                              progress=False)
        samples.append((result.stats.get("frames_out", 0), round(time.perf_counter() - t0, 2), round(rss_mb(), 1)))
    base = next((s for s in samples if s[0] >= args.warmup), samples[0])
    growth = samples[-1][2] - base[2]
    report = {
        "frames": result.stats.get("frames_out"),
        "source": source,
        "backend": result.stats.get("backend"),
        "fps": result.stats.get("fps"),
        "rss_start_mb": round(start_rss, 1),
        "rss_baseline_mb": base[2],
        "rss_baseline_frame": base[0],
        "rss_end_mb": samples[-1][2],
        "rss_peak_mb": max(s[2] for s in samples),
        "rss_growth_mb": round(growth, 1),
        "target_growth_mb": 50,
        "pass": growth < 50 and result.exit_code == 0,
        "exit_code": result.exit_code,
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    if args.json:
        write_json(args.json, report)
    return 0 if report["pass"] else 1


def main(argv: list[str] | None = None) -> int:
    """The command, under the exit-code rules every command shares (kdas_core.cli.conventions.run_cli)."""
    from kdas_core.cli.conventions import run_cli

    from .errors import AppError

    return run_cli(lambda: _main(argv), "app.soak", coded=(AppError,))


if __name__ == "__main__":
    sys.exit(main())
