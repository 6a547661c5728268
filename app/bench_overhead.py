"""How fast can the pipeline go when the model costs nothing? (decode, resize, mask, overlay,
display or H.264 encode: everything but inference.)

    python -m app.bench_overhead [--size 1920x1080] [--frames 300] [--source FILE | --images DIR]
                                 [--stages 100] [--view 948x533] [--keep-clip MP4] [--json OUT]
    xvfb-run -a python -m app.bench_overhead --window --source FILE

1. Per-stage breakdown: ms per frame of decode, preprocess, postprocess, overlay and, headless,
   encode (H.264 at source size) or, window, display (hand-over + paint of the video widget at
   --view), each stage run one after the other in one thread with the pipeline's own code, so
   the next bottleneck is visible.
2. Ceiling: headless mode, all stages on their threads, with a zero-cost stand-in model (fixed
   blob mask, --model-size input). If this is well above the model's own throughput, the
   stages hide behind inference; on a GPU, a 1080p target of 120 fps needs it comfortably
   above 120 on that machine's CPU. Also the process's CPU time per frame (cpu_ms_per_frame),
   which a shared machine disturbs far less than wall time.
3. --window instead: the real viewer window plays the clip (paced, latest frame wins) with the
   stand-in model and reports dropped frames and latency of the stages alone.

The clip is synthetic at --size, or made at run time from the largest real images of --images
(e.g. Kvasir-SEG's HD frames in ../shared/data/polyp/TrainDataset: patient data, never commit
it), or --source. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from kdas_core.io.atomic import write_json
from kdas_core.cli.conventions import Parser, add_deprecated_alias, nonnegative_int, positive_int
from kdas_core.models.presets import DEFAULT_THRESHOLD, image_size_arg

from .errors import AppError


class StandInBackend:
    """Same face as an engines backend; predict() returns a precomputed blob instantly."""

    name = "stand-in"
    notes = ["zero-cost stand-in model: measures everything but inference"]

    def __init__(self, size: int = 352):
        self.input_size = (size, size)
        self.threshold = DEFAULT_THRESHOLD  # a stand-in has no metadata of its own
        yy, xx = np.mgrid[0:size, 0:size]
        self._probs = (((yy - size * 0.45) ** 2 + (xx - size * 0.55) ** 2) < (size * 0.18) ** 2).astype(np.float32)

    def predict(self, frames: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self._probs, frames.shape[:3]).copy()

    def close(self) -> None:
        pass


def _encode_clip(path: str, width: int, height: int, fps: int, frames) -> str:
    """H.264 MP4 of RGB frames (each resized to WxH if needed), as a camera's recorder would write it."""
    import av
    import cv2

    with av.open(path, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"preset": "veryfast", "crf": "20", "g": str(2 * fps)}
        for rgb in frames:
            if rgb.shape[:2] != (height, width):
                rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def make_sized_clip(path: str, width: int, height: int, frames: int, fps: int = 30) -> str:
    """Synthetic endoscopy clip (no patient data), upscaled to WxH."""
    from kdas_core.data.synthetic import render_clip

    base = min(512, max(width, height) // 2)
    return _encode_clip(path, width, height, fps, (rgb for rgb, _ in render_clip(frames, base, seed=0)))


def make_real_clip(path: str, images: str, width: int, height: int, frames: int, fps: int = 25,
                   hold_s: float = 1.0) -> str:
    """An HD clip of real endoscopy stills: the largest images of `images` (a folder of images,
    or a dataset folder with images/), each fitted into WxH at its aspect ratio (black bars, as
    an endoscope's HD output has) and shown for `hold_s` seconds under a slow zoom and pan, so
    every frame differs like real video. Written at run time, never committed (patient data)."""
    import cv2

    from kdas_core.data import IMAGE_EXTS
    from kdas_core.data.dataset import read_image

    folder = Path(images)
    if (folder / "images").is_dir():
        folder = folder / "images"
    if not folder.is_dir():
        raise AppError(f"--images {images}: not a folder of images (or a dataset folder with images/)")
    files = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTS]
    if not files:
        raise AppError(f"--images {images}: no images in {folder}")
    hold = max(1, round(hold_s * fps))
    n_images = min(len(files), -(-frames // hold))
    from PIL import Image  # header-only size probe (Pillow comes with torchvision)

    def area(p: Path) -> int:
        with Image.open(p) as im:
            return im.size[0] * im.size[1]

    chosen = sorted(files, key=lambda p: (-area(p), p.name))[:n_images]

    def render():
        img = None
        for i in range(frames):
            if i % hold == 0:
                img = read_image(str(chosen[(i // hold) % len(chosen)]))
            h, w = img.shape[:2]
            t = (i % hold) / max(1, hold - 1)
            scale = min(width / w, height / h) * (1.0 + 0.08 * t)  # zoom in by 8 % over the hold
            dx, dy = 0.02 * width * (t - 0.5), 0.015 * height * (0.5 - t)
            m = np.float32([[scale, 0, (width - w * scale) / 2 + dx], [0, scale, (height - h * scale) / 2 + dy]])
            yield cv2.warpAffine(img, m, (width, height), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))

    return _encode_clip(path, width, height, fps, render())


STAGES = ("decode", "preprocess", "postprocess", "overlay", "display", "encode")


def stage_breakdown(source: str, mode: str, frames: int, view: tuple[int, int] = (948, 533),
                    model_size: int = 352) -> dict:
    """ms per frame of each stage, run one after the other in this thread with the pipeline's
    own stage code. `mode` "headless" ends in the H.264 encoder at source size; "window" in
    the display sink and a paint of the video widget at `view` (W, H) pixels, offscreen, as the
    GUI thread would do it. Two figures per stage: wall time, and CPU time of the whole process
    (all threads) while the stage ran, which a shared machine disturbs much less. The decoder
    runs in slice-thread mode here so that its work happens inside its own call; x264 keeps its
    frame threads, so part of the encoder's CPU time can land in the next frame's stages."""

    from .pipeline.runner import Pipeline
    from .pipeline.source import VideoFileReader, new_frame

    reader = VideoFileReader(source)
    reader._stream.thread_type = "SLICE"
    pipeline = Pipeline("stand-in", settings=None, realtime=mode == "window",
                        backend_factory=lambda *a, **k: StandInBackend(model_size))
    if mode == "window":
        pipeline.view_box = view  # as the video widget reports it
    pipeline.inference.start()
    if pipeline.wait_ready(60) is None:
        raise AppError("the stand-in model did not start")
    last = STAGES[-1] if mode == "headless" else "display"
    names = [*STAGES[:4], last]
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    n = 0

    def lap(name, t):
        now = (time.perf_counter(), time.process_time())
        wall[name] += now[0] - t[0]
        cpu[name] += now[1] - t[1]
        return now

    with tempfile.TemporaryDirectory(prefix="kdas-stages-") as tmp:
        sink, finish = _stage_sink(mode, pipeline, reader, os.path.join(tmp, "out.mp4"), view)
        try:
            while n < frames:
                t = (time.perf_counter(), time.process_time())
                item = reader.read_decoded()
                if item is None:
                    break
                frame = new_frame(item[0], n, item[1])
                t = lap("decode", t)
                frame = pipeline._preprocess(frame)
                t = lap("preprocess", t)
                frame = pipeline.inference._infer(frame)  # the stand-in: ~0 ms, not a stage here
                t = (time.perf_counter(), time.process_time())
                frame = pipeline._postprocess(frame)
                t = lap("postprocess", t)
                frame = pipeline._overlay(frame)
                if mode == "headless":
                    frame.full_output()  # the overlay at source size, which the headless sink asks for
                t = lap("overlay", t)
                sink(frame)
                lap(last, t)
                n += 1
        finally:
            finish()
            reader.close()
            pipeline.close()
    per = max(1, n) / 1000.0
    out_wall = {k: round(v / per, 2) for k, v in wall.items()}
    out_cpu = {k: round(v / per, 2) for k, v in cpu.items()}
    total, total_cpu = sum(out_wall.values()), sum(out_cpu.values())
    return {"mode": mode, "frames": n, "size": f"{reader.width}x{reader.height}",
            "view": f"{view[0]}x{view[1]}" if mode == "window" else None,
            "stages_ms": out_wall, "stages_cpu_ms": out_cpu, "total_ms": round(total, 2),
            "total_cpu_ms": round(total_cpu, 2), "serial_fps": round(1000.0 / total, 1) if total else None}


def _stage_sink(mode, pipeline, reader, out_path, view):
    """(sink, finish) that time what happens after the overlay: encode (headless) or the
    display hand-over and the widget's paint (window)."""
    if mode == "headless":
        from .pipeline.recorder import Recorder

        rec: list = []

        def encode(frame):
            if not rec:
                h, w = frame.size
                rec.append(Recorder(out_path, reader.fps, w, h))
            rec[0].write(frame.full_output())  # as the headless sink does
            while not rec[0].idle:  # synchronous: the encode thread has taken and encoded it
                time.sleep(0.0002)

        return encode, lambda: rec and rec[0].close()

    from PyQt6.QtGui import QImage
    from PyQt6.QtWidgets import QApplication

    from .ui.bridge import DisplaySink
    from .ui.video_widget import VideoWidget

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # software raster, as under Xvfb
    app = QApplication.instance() or QApplication(["bench"])
    widget = VideoWidget()
    widget.resize(*view)
    target = QImage(view[0], view[1], QImage.Format.Format_RGB32)
    display = DisplaySink(pipeline.account)

    def show(frame):
        display(frame)
        image, _meta = display.take()
        widget.set_image(image)
        widget.render(target)  # paintEvent into an offscreen image
        app.processEvents()

    return show, widget.close


def window_run(source: str, model_size: int = 352) -> dict:
    """The real window (MainWindow, paced to the file's frame rate, latest frame wins) with the
    zero-cost stand-in model, until the file ends: its --stats summary (dropped_pct, latency).
    Uses the Qt platform in use (Xvfb: `xvfb-run -a python -m app.bench_overhead --window ...`);
    without a display, offscreen."""
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PyQt6.QtWidgets import QApplication

    from .ui.main_window import MainWindow

    app = QApplication.instance() or QApplication(["bench"])
    win = MainWindow("stand-in", "auto", exit_at_end=True, backend_factory=lambda *a, **k: StandInBackend(model_size))
    win.show()
    if not win.open_source(source):
        win.close()
        raise AppError(f"{source}: the window could not open it ({'; '.join(win.errors)})")
    app.exec()
    win.shutdown()  # idempotent; closing the window already did it
    return {**win.stats_summary(), **(win._final_stats or {}), "qt_platform": app.platformName()}


def _main(argv: list[str] | None) -> int:
    p = Parser(exit_codes=(0, 1, 2, 4, 130), prog="python -m app.bench_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1920x1080", metavar="WxH", help="WxH of the clip made for the run (default 1920x1080)")
    p.add_argument("source", nargs="?", metavar="SOURCE", help="use this video instead of making one")
    p.add_argument("--max-frames", dest="frames", type=positive_int, default=300, metavar="N",
                   help="frames in the clip made for the run (default 300)")
    add_deprecated_alias(p, "--frames", "--max-frames", "frames", type=positive_int)
    add_deprecated_alias(p, "--source", "SOURCE", "source")
    add_deprecated_alias(p, "--model-size", "--image-size", "model_size", type=image_size_arg)
    p.add_argument("--images", metavar="DIR",
                   help="make the clip from the largest real images in DIR (e.g. ../shared/data/polyp/TrainDataset) "
                        "instead of synthetic frames")
    p.add_argument("--keep-clip", metavar="MP4", help="also keep the clip made for the run here (never commit it)")
    p.add_argument("--stages", type=nonnegative_int, default=100, metavar="N",
                   help="per-stage breakdown over the first N frames, headless and window (default 100; 0: skip)")
    p.add_argument("--view", default="948x533", metavar="WxH", help="window mode: the video widget's size, WxH (default 948x533)")
    p.add_argument("--image-size", dest="model_size", type=image_size_arg, default=352, metavar="S",
                   help="the stand-in model's input size (default 352)")
    p.add_argument("--window", action="store_true",
                   help="instead: play the clip in the real window with the stand-in model and report dropped "
                        "frames and latency (needs a display, e.g. xvfb-run -a; offscreen without one)")
    p.add_argument("--json", metavar="PATH", help="write the stats here")
    args = p.parse_args(argv)
    from .headless import run_headless

    try:
        view = _size(args.view, "--view", even=False)
        size = _size(args.size, "--size")
    except ValueError as exc:
        p.error(str(exc))
    if args.source is not None and not os.path.isfile(args.source):
        print(f"app.bench_overhead: error: {args.source}: no such video file", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kdas-overhead-") as tmp:
        source = args.source
        if source is None:
            source = args.keep_clip or os.path.join(tmp, "clip.mp4")
            try:
                if args.images:
                    make_real_clip(source, args.images, *size, args.frames)
                else:
                    make_sized_clip(source, *size, args.frames)
            except AppError as exc:
                print(f"app.bench_overhead: error: {exc}", file=sys.stderr)
                return 2
        if args.window:
            try:
                stats = window_run(source, args.model_size)
            except AppError as exc:
                print(f"app.bench_overhead: error: {exc}", file=sys.stderr)
                return 1
            keys = ("frames_in", "frames_out", "dropped", "dropped_pct", "dropped_by", "stale", "fps", "latency_ms_p50", "latency_ms_p95",
                    "source_fps", "qt_platform")
            print(json.dumps({k: stats.get(k) for k in keys}, indent=2))
            if args.json:
                write_json(args.json, stats)
            return 0
        stages = {}
        if args.stages > 0:
            for mode in ("headless", "window"):
                try:
                    stages[mode] = stage_breakdown(source, mode, args.stages, view, args.model_size)
                except AppError as exc:
                    print(f"app.bench_overhead: error: {exc}", file=sys.stderr)
                    return 1
                s = stages[mode]
                for key, label in (("stages_ms", "wall"), ("stages_cpu_ms", "cpu ")):
                    total = s["total_ms"] if label == "wall" else s["total_cpu_ms"]
                    print(f"{mode:8s} {label} ms/frame: " + "  ".join(f"{k} {v:.2f}" for k, v in s[key].items())
                          + f"  = {total:.2f}", file=sys.stderr)
        cpu0 = time.process_time()
        try:
            res = run_headless(source, os.path.join(tmp, "out.mp4"), model_path="stand-in", progress=None,
                               backend_factory=lambda *a, **k: StandInBackend(args.model_size))
        except AppError as exc:
            print(f"app.bench_overhead: error: {exc}", file=sys.stderr)
            return 1
        cpu_s = time.process_time() - cpu0
    keys = ("frames_out", "fps", "latency_ms_p50", "latency_ms_p95", "wall_s")
    n_out = res.stats.get("frames_out") or 0
    cpu_ms = round(cpu_s / n_out * 1000.0, 2) if n_out else None
    summary = {"source": args.source or f"{'real' if args.images else 'synthetic'} {args.size}",
               **{k: res.stats.get(k) for k in keys},
               # CPU time of the whole headless run per frame (all threads): what a shared machine
               # disturbs least; cpu_bound_fps = the most that work allows on cpu_count idle cores
               # (an upper bound: it assumes the stages overlap perfectly)
               "cpu_ms_per_frame": cpu_ms, "cpu_count": os.cpu_count(),
               "cpu_bound_fps": round(1000.0 * (os.cpu_count() or 1) / cpu_ms, 1) if cpu_ms else None,
               "stages": stages}
    print(json.dumps(summary, indent=2))
    if args.json:
        write_json(args.json, {**res.stats, **{k: summary[k] for k in ("cpu_ms_per_frame", "cpu_count", "cpu_bound_fps")},
                               "stages": stages})
    return res.exit_code


def _size(text: str, flag: str, even: bool = True) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give WxH, e.g. 1920x1080") from None
    if w < 16 or h < 16 or (even and (w % 2 or h % 2)):
        raise ValueError(f"{flag} {text!r}: width and height must be {'even and ' if even else ''}at least 16")
    return w, h


def main(argv: list[str] | None = None) -> int:
    """The command, under the exit-code rules every command shares (kdas_core.cli.conventions.run_cli)."""
    from kdas_core.cli.conventions import run_cli

    from .errors import AppError

    return run_cli(lambda: _main(argv), "app.bench_overhead", coded=(AppError,))


if __name__ == "__main__":
    sys.exit(main())
