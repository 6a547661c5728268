"""Command line of the viewer and its headless twin (`python -m app --help`)."""

from __future__ import annotations

import argparse
import os

from engines import BACKENDS, CHOICES
from kdas_core.cli.conventions import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE,
                                      DEVICE_HELP, add_deprecated_alias, device_arg, exit_codes_help, nonnegative_int, run_cli,
                                      positive_int)

from . import DEFAULT_WEIGHTS, DEMO_CLIP, DISCLAIMER
from .errors import AppError, check_device
from .pipeline.analysis import AnalysisSettings
from .pipeline.cue import CueSpec
from .pipeline.temporal import SmoothSpec
from kdas_core.cli.conventions import Parser

DESCRIPTION = f"""\
Real-time polyp segmentation on endoscopy video: the model's mask is drawn over the video
as a tinted fill with a contour. {DISCLAIMER}.

Window (default): play a file, a camera or the bundled demo clip, tune threshold and
opacity live, record the overlaid video, save snapshots. Headless (--headless): the same
pipeline, every input frame written to --out, throughput and latency to --stats.
Both: an amber frame border while a polyp is segmented (with hysteresis), an optional
temporal filter against flicker (--smooth), a second model side by side (--compare-weights),
and one CSV row per frame (--frames-csv)."""

EPILOG = f"""\
SOURCE
  a video file      anything FFmpeg reads (mp4, mkv, avi, ...)
  a camera          0, 1, ... or /dev/video0 (V4L2, 1-frame buffer: lowest latency)
  nothing           the demo clip {DEMO_CLIP.name} with the bundled default student

model
  --weights PATH    a .safetensors checkpoint (kdas_core.train / distill), an exported .onnx
                    or a TensorRT .engine (python -m engines.build)
  (none)            {DEFAULT_WEIGHTS.relative_to(DEFAULT_WEIGHTS.parents[2])}
  Input size, normalisation and the default threshold come from the model's own metadata.
  --backend auto tries {" -> ".join(BACKENDS)}; if the chosen one fails, the next
  one takes over and the window says so.

examples
  python -m app                                  demo clip in the window
  python -m app colonoscopy.mp4 --record out/    record from the start into out/
  python -m app /dev/video0 --backend tensorrt --weights student.engine
  python -m app clip.mp4 --headless --out clip-overlay.mp4 --stats stats.json
  python -m app clip.mp4 --headless --out o.mp4 --smooth --frames-csv frames.csv
  python -m app clip.mp4 --compare-weights teacher.safetensors   green = model, magenta = OTHER
  python -m app.eval_clip CLIP --gt ../shared/data/polyp --smooth   flicker and Dice vs ground truth
  python -m app.soak --frames 10000              memory soak benchmark (headless)

window keys
  Space play/pause   Left/Right seek 5 s   Up/Down threshold   [ ] opacity   C contour
  R record           S snapshot            Ctrl+O open file    Ctrl+K camera   F1 keys
  T smoothing        P polyp cue border    B compare model

{exit_codes_help(EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED)}"""


def _number_in(name: str, lo: float, hi: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number in [{lo:g}, {hi:g}], got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{name} must be in [{lo:g}, {hi:g}], got {value}")
        return value

    return parse


def _unit_interval(name: str):
    return _number_in(name, 0.0, 1.0)


def _smooth_spec(text: str) -> SmoothSpec:
    try:
        return SmoothSpec.parse(text)
    except ValueError as exc:
        hint = "; a bare --smooth takes the next word as SPEC: put SOURCE before it" if "=" not in text else ""
        raise argparse.ArgumentTypeError(f"{exc}{hint}") from None


def add_cue_arguments(group) -> None:
    """--cue-on / --cue-off / --min-area (the viewer and app.eval_clip)."""
    group.add_argument("--cue-on", type=positive_int, default=CueSpec.on_after, metavar="N",
                       help=f"polyp cue: on after N frames in a row with a polyp (default {CueSpec.on_after})")
    group.add_argument("--cue-off", type=positive_int, default=CueSpec.off_after, metavar="M",
                       help=f"polyp cue: off after M frames in a row without one (default {CueSpec.off_after})")
    group.add_argument("--min-area", type=_number_in("--min-area", 0.0, 100.0), default=CueSpec.min_area_pct,
                       metavar="PCT", help="a frame has a polyp when the mask covers at least PCT %% of it "
                                           f"(default {CueSpec.min_area_pct:g})")


def cue_spec(args) -> CueSpec:
    return CueSpec(on_after=args.cue_on, off_after=args.cue_off, min_area_pct=args.min_area)


def analysis_settings(args) -> AnalysisSettings:
    """The temporal filter and cue from the flags (the window's switches start from these)."""
    smooth = args.smooth
    return AnalysisSettings(smooth=smooth, smooth_spec=smooth or SmoothSpec(), cue_border=args.cue,
                            cue=cue_spec(args))


def add_weights_argument(p, default: str) -> None:
    """--weights PATH, any model file (as in engines.bench); --engine PATH is its old spelling."""
    p.add_argument("--weights", metavar="PATH",
                   help=f"the model: a .safetensors checkpoint, an .onnx export, a TensorRT .engine/.plan "
                        f"(python -m engines.build) or a training run folder (its best.safetensors); default: {default}")
    add_deprecated_alias(p, "--engine", "--weights", "weights")


def resolve_compare(args) -> str | None:
    path = args.compare_weights and _from_run(args.compare_weights, "--compare-weights")
    if path and not os.path.isfile(path):
        raise AppError(f"--compare-weights {path}: no such file; give a .safetensors checkpoint, an .onnx or an .engine")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = Parser(exit_codes=(0, 1, 2, 4, 130), 
        prog="python -m app",
        usage=f"\n  python -m app [SOURCE] [--weights PATH] [--backend {'|'.join(CHOICES)}]\n"
              "                [--threshold T] [--opacity A] [--record DIR] [--smooth [SPEC]] [--compare-weights OTHER]\n"
              "  python -m app SOURCE --headless --out OUT.mp4 [--json STATS.json] [--frames-csv PATH]",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", metavar="SOURCE", help="video file, camera (0, /dev/video0), or nothing for the demo clip")
    add_weights_argument(p, "the bundled student")
    p.add_argument("--backend", choices=CHOICES, default="auto", help="inference backend (default: auto = fastest that works)")
    p.add_argument("--device", type=device_arg, metavar="DEV",
                   help=f"{DEVICE_HELP} (default: a CUDA GPU when one is visible, else cpu)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads for the onnxruntime/torch backends (default: the runtime's own choice); on a busy or small "
                        "machine fewer threads than cores leaves room for decode/overlay/encode")
    p.add_argument("--threshold", type=_unit_interval("--threshold"), metavar="T",
                   help="mask threshold on the probability, 0..1 (default: the model's own, from its metadata)")
    p.add_argument("--opacity", type=_unit_interval("--opacity"), default=0.4, metavar="A",
                   help="opacity of the mask's tinted fill, 0..1 (default: 0.4)")
    p.add_argument("--no-contour", dest="contour", action="store_false", help="do not draw the mask's outline")
    a = p.add_argument_group("analysis (window and headless)")
    a.add_argument("--smooth", nargs="?", const="default", default=None, metavar="SPEC", type=_smooth_spec,
                   help="temporal filter against flicker; bare --smooth: the default filter "
                        f"({SmoothSpec().describe()}); SPEC: {SmoothSpec.HELP}")
    add_cue_arguments(a)
    a.add_argument("--no-cue", dest="cue", action="store_false", help="do not draw the polyp cue border (still counted)")
    a.add_argument("--compare-weights", metavar="OTHER",
                   help="a second model (.safetensors/.onnx/.engine) on the same frames: its outline in magenta, "
                        "its latency and the Dice agreement of the two masks in the readout and --stats")
    a.add_argument("--frames-csv", metavar="PATH",
                   help="one row per frame (index, time, mask area, box, polyp present, cue, latencies, dropped), "
                        "written as it goes: complete up to the last frame after Ctrl+C")
    p.add_argument("--record", metavar="DIR",
                   help="window: start recording at once; recordings and snapshots go to DIR (default DIR for the R key: ./recordings)")
    h = p.add_argument_group("headless")
    h.add_argument("--headless", action="store_true", help="no window: write the overlaid video to --out")
    h.add_argument("--out", metavar="OUT.mp4", help="headless: the overlaid video (H.264 MP4), every input frame")
    h.add_argument("--json", "--stats", dest="stats", metavar="PATH",
                   help="throughput and latency figures as JSON (headless; in the window: written on exit); "
                        "--stats is the same flag")
    p.add_argument("--loop", type=nonnegative_int, default=None, metavar="N",
                   help="play a file N times; 0: for ever, window only (default: for ever for the bundled demo in the "
                        "window, else once)")
    h.add_argument("--max-frames", type=positive_int, metavar="N", help="headless: stop after N frames")
    h.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="headless progress bar (default: on when stderr is a terminal)")
    w = p.add_argument_group("window benchmarks")
    w.add_argument("--exit-at-end", action="store_true", help="window: close when the file ends (with --stats: measure the window)")
    return p


def check_output(path: str, flag: str) -> None:
    """AppError now, before the model loads, when `path` cannot be created: its folder is missing
    or not writable (a real probe file, so /proc or a read-only mount are caught too)."""
    from kdas_core.io.atomic import unwritable

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise AppError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    problem = unwritable(path, flag)
    if problem:
        raise AppError(problem)


def check_not_an_input(path: str, flag: str, inputs) -> None:
    """AppError when the output `path` is one of the `inputs` ((path, what) pairs), through links
    too: writing it would destroy what is being read."""
    from kdas_core.io.atomic import same_file

    for other, what in inputs:
        if other and same_file(path, other):
            raise AppError(f"{flag} {path} is the input ({what}, {other}): writing it would destroy it; "
                           "give another output path")


def check_model(path: str):
    """The model file opened once for this start (an engines.ModelSource: its metadata read here,
    handed to the inference thread, which builds its backend from it without reading it again);
    AppError (bad input) now, before any backend loads, when the file cannot be a KDAS model."""
    from engines import BackendError, ModelSource

    src = ModelSource.of(path)
    try:
        src.check()
    except BackendError as exc:
        raise AppError(str(exc)) from exc
    return src


def _from_run(path: str, flag: str) -> str:
    """A train/distill run folder's best.safetensors (said on stderr), else `path` itself."""
    from kdas_core.cli.conventions import UsageError, weights_from_run

    try:
        return weights_from_run(path, flag)
    except UsageError as exc:
        raise AppError(str(exc)) from exc


def resolve_model(args):
    if args.weights:
        args.weights = _from_run(args.weights, "--weights")
        if not os.path.isfile(args.weights):
            what = "checkpoint" if args.weights.lower().endswith(".safetensors") else "model"
            raise AppError(f"--weights {args.weights}: no such {what} file"
                           + ("" if what == "checkpoint" else "; build one with `python -m engines.build`"))
        return check_model(args.weights)
    if not DEFAULT_WEIGHTS.is_file():
        raise AppError(
            f"the default weights {DEFAULT_WEIGHTS} are missing; pass --weights PATH (a .safetensors checkpoint, "
            "an .onnx or a TensorRT .engine)"
        )
    return check_model(str(DEFAULT_WEIGHTS))


def resolve_source(args) -> str:
    if args.source:
        return args.source
    if not DEMO_CLIP.is_file():
        raise AppError(f"no SOURCE given and the demo clip {DEMO_CLIP} is missing; give a video file or camera, "
                       "or regenerate it with `python -m app.make_demo --out assets/demo.mp4`")
    return str(DEMO_CLIP)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.headless and not args.out:
        parser.error("--headless needs --out OUT.mp4 (where the overlaid video goes)")
    if args.out and not args.headless:
        parser.error("--out is for --headless; in the window use the record button (R) or --record DIR")
    if args.max_frames and not args.headless:
        parser.error("--max-frames is for --headless")
    if args.loop == 0 and args.headless:
        parser.error("--loop 0 (for ever) is for the window; give --headless a number of plays")
    if args.loop is None:
        args.loop = 0 if (args.source is None and not args.headless and not args.exit_at_end) else 1  # the demo keeps its first impression alive
    def go() -> int:
        inputs = [(args.source or str(DEMO_CLIP), "the video"), (args.weights or str(DEFAULT_WEIGHTS), "the model"),
                  (args.compare_weights, "the compare model")]
        check_device(args.device)
        for path, flag in ((args.out, "--out"), (args.stats, "--stats"), (args.frames_csv, "--frames-csv")):
            if path:
                check_not_an_input(path, flag, inputs)
                check_output(path, flag)
        if args.headless:
            from .headless import run_headless

            result = run_headless(resolve_source(args), args.out, model_path=resolve_model(args), backend=args.backend,
                                  stats_path=args.stats, threshold=args.threshold, opacity=args.opacity,
                                  contour=args.contour, loop=args.loop, progress=args.progress, threads=args.threads,
                                  max_frames=args.max_frames, analysis=analysis_settings(args),
                                  compare_path=resolve_compare(args), frames_csv=args.frames_csv, device=args.device)
            return result.exit_code
        from .ui.app import check_display, run_window

        check_display()
        return run_window(args, model_path=resolve_model(args), source=resolve_source(args),
                          analysis=analysis_settings(args), compare_path=resolve_compare(args))

    return run_cli(go, "app", coded=(AppError,))

