"""python -m engines.bench: latency/throughput of a model on a backend, or several side by side."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

from . import CHOICES, load_backend
from kdas_core.io.atomic import write_json
from kdas_core.cli.conventions import DEVICE_HELP, Parser, add_deprecated_alias, device_arg, require_device
from kdas_core.models.presets import image_size_arg

from .cli_common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, UnavailableError, exit_codes_help, run

DESCRIPTION = """\
Benchmark KDAS models: warm-up, then timed predict() calls on synthetic uint8 frames, reporting
p50/p95 latency per call and throughput (frames/s). Timing covers the whole predict call the
viewer makes (host->device, inference, sigmoid, device->host), not just the network.

--compare runs several models and/or backends in one process, interleaved call by call (in
rotating order), so ratios between them hold even on a busy, noisy machine.
"""

EPILOG = f"""\
models: --weights PATH, a .safetensors checkpoint, an exported .onnx or a TensorRT .engine/.plan;
  --model NAME, a preset (e.g. polyppvt-b0): randomly initialised weights of that preset, for speed
  measurements only (latency does not depend on the weights). Both repeat; with --compare the
  first one given is the reference of every ratio.

examples:
  python -m engines.bench --weights best.safetensors --backend auto
  python -m engines.bench --weights deploy/best-352-fp32.onnx --backend onnxruntime --threads 2 --json bench.json
  python -m engines.bench --compare --backend onnxruntime --threads 2 --image-size 352 \\
      --model polyppvt-lite0 --model polyppvt-b0 --model polyppvt-b2
  python -m engines.bench --compare --weights best.safetensors --backend onnxruntime,torch

JSON (--json OUT): backend, latency_ms_p50, latency_ms_p95, throughput_fps (+ details); with
--compare: {{"results": [one such object per model/backend], ...}} and each result's
ratio_p50_to_first (its p50 / the first entry's p50).

{exit_codes_help(EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED)}
"""


class _ModelSpec(argparse.Action):
    """--weights PATH and --model NAME into one ordered list (presets as 'preset:NAME'). The old
    spellings --model PATH and --model preset:NAME still work for one release, with a notice."""

    def __call__(self, parser, namespace, value, option_string=None):
        from kdas_core.models.presets import PRESETS

        if option_string == "--model" and value not in PRESETS and not value.startswith("polyppvt:"):
            new = f"--model {value[len('preset:'):]}" if value.startswith("preset:") else f"--weights {value}"
            print(f"{parser.prog}: warning: --model {value} is deprecated and goes in the next release; use {new}",
                  file=sys.stderr)
        elif option_string == "--model":
            value = f"preset:{value}"
        namespace.model = (namespace.model or []) + [value]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(exit_codes=(0, 1, 2, 4, 130), 
        prog="python -m engines.bench", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--weights", action=_ModelSpec, dest="model", metavar="PATH",
                   help="model file: .safetensors, .onnx or .engine/.plan (repeat with --compare)")
    p.add_argument("--model", action=_ModelSpec, dest="model", metavar="NAME",
                   help="a preset name, randomly initialised (repeat with --compare)")
    p.add_argument("--backend", default="auto", metavar="NAME", help=f"one of {', '.join(CHOICES)}; with --compare a comma-separated list (default auto)")
    p.add_argument("--image-size", type=image_size_arg, metavar="S", help="square input side, a multiple of 32 (default: the model's; an .onnx/.engine must match)")
    p.add_argument("--batch-size", dest="batch", type=int, default=1, metavar="N", help="frames per predict call (default 1)")
    add_deprecated_alias(p, "--batch", "--batch-size", "batch", type=int)
    p.add_argument("--runs", type=int, default=50, metavar="N", help="timed calls per model/backend (default 50)")
    p.add_argument("--warmup", type=int, default=10, metavar="N", help="untimed calls first (default 10)")
    p.add_argument("--threads", metavar="N", help="CPU threads for onnxruntime/torch (default: the runtime's); with --compare a comma list, e.g. 1,2")
    p.add_argument("--graph-opt", default="all", metavar="LEVEL", help="onnxruntime graph optimisation: disable|basic|extended|all; with --compare a comma list (default all)")
    p.add_argument(
        "--spin", default=None, metavar="on|off",
        help="onnxruntime worker spin-waiting: on|off|default; with --compare a comma list. Default: off with "
        "--compare (spinning idle sessions steal the cores of the one being timed), the runtime's otherwise",
    )
    p.add_argument("--device", type=device_arg, default=None, metavar="DEV", help=f"{DEVICE_HELP} (default: best available)")
    p.add_argument("--compare", action="store_true", help="benchmark every model x backend x threads x graph-opt x spin, interleaved in one run")
    p.add_argument("--json", metavar="OUT", help="write results as JSON to OUT")
    args = p.parse_args(argv)
    if not args.model:
        p.error("give a model: --weights PATH (a file) or --model NAME (a preset)")
    args.backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    args.graph_opts = [g.strip() for g in args.graph_opt.split(",") if g.strip()]
    try:
        args.thread_list = [int(t) for t in args.threads.split(",")] if args.threads else [None]
    except ValueError:
        p.error(f"--threads takes integers, got {args.threads!r}")
    if any(t is not None and t < 1 for t in args.thread_list):
        p.error("--threads must be >= 1")
    spin_map = {"on": True, "off": False, "default": None}
    if args.spin is None:
        args.spin = "off" if args.compare else "default"
    spins = [x.strip() for x in args.spin.split(",") if x.strip()]
    if any(x not in spin_map for x in spins):
        p.error(f"--spin takes on, off or default, got {args.spin!r}")
    args.spins = [spin_map[x] for x in spins]
    bad = [b for b in args.backends if b not in CHOICES]
    if bad:
        p.error(f"unknown backend(s) {bad}; choose from {', '.join(CHOICES)}")
    bad = [g for g in args.graph_opts if g not in ("disable", "basic", "extended", "all")]
    if bad:
        p.error(f"unknown --graph-opt {bad}; choose from disable, basic, extended, all")
    lists = (args.model, args.backends, args.graph_opts, args.thread_list, args.spins)
    if not args.compare and any(len(x) > 1 for x in lists):
        p.error("several models/backends/threads/graph-opts/spins need --compare")
    for name, flag in (("batch", "--batch-size"), ("runs", "--runs")):
        if getattr(args, name) < 1:
            p.error(f"{flag} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def preset_checkpoint(spec: str) -> str:
    """`preset:NAME` -> a cached random-init checkpoint of that preset (speed tests only)."""
    import torch

    from kdas_core.io.checkpoint import build_metadata, save_checkpoint
    from kdas_core.models import create_model

    from .cache import cache_dir

    name = spec.split(":", 1)[1]
    path = os.path.join(cache_dir("bench"), f"{name.replace(':', '_')}-random.safetensors")
    if not os.path.isfile(path):
        try:
            torch.manual_seed(0)
            model = create_model(name, pretrained=None)
        except ValueError as exc:
            raise FileNotFoundError(f"--model {spec}: {exc}") from exc
        save_checkpoint(path, model, build_metadata(name, weights="random init (benchmark only)"))
    return path


class Candidate:
    def __init__(self, label: str, model: str, backend):
        self.label, self.model, self.backend = label, model, backend
        self.times: list[float] = []

    def result(self, batch: int) -> dict:
        t = np.asarray(self.times) * 1000.0
        return {
            "label": self.label,
            "model": self.model,
            "backend": self.backend.name,
            "threads": getattr(self.backend, "threads", None),
            "graph_opt": getattr(self.backend, "graph_opt", None),
            "spin": getattr(self.backend, "spin", None),
            "image_size": list(self.backend.input_size),
            "batch": batch,
            "runs": len(t),
            "latency_ms_p50": round(float(np.percentile(t, 50)), 3),
            "latency_ms_p95": round(float(np.percentile(t, 95)), 3),
            "latency_ms_mean": round(float(t.mean()), 3),
            "latency_ms_min": round(float(t.min()), 3),
            "throughput_fps": round(float(batch * len(t) * 1000.0 / t.sum()), 2),
            "notes": list(self.backend.notes),
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .backends.onnxruntime_backend import OnnxRuntimeBackend

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.device and args.device != "cpu":
        require_device(args.device)  # a GPU that is not here: exit 4, the message every command gives
    if "tensorrt" in args.backends:
        from .backends.tensorrt_backend import unavailable_reason

        reason = unavailable_reason(args.device)
        if reason:
            raise UnavailableError(f"--backend tensorrt: {reason}")
    candidates: list[Candidate] = []
    try:
        for spec in args.model:
            path = preset_checkpoint(spec) if spec.startswith("preset:") else spec
            label = spec.split(":", 1)[1] if spec.startswith("preset:") else os.path.basename(spec)
            for backend in args.backends:
                for threads in args.thread_list:
                    say(f"loading {label} on {backend} ...")
                    b = load_backend(path, backend=backend, device=args.device, image_size=args.image_size, threads=threads)
                    for v in _ort_variants(b, args, threads, OnnxRuntimeBackend):
                        candidates.append(Candidate(_label(label, v, args), spec, v))
        for note in {n for c in candidates for n in c.backend.notes}:
            say(f"  note: {note}")
        _measure(candidates, args, say)
    finally:
        for c in candidates:
            c.backend.close()

    results = [c.result(args.batch) for c in candidates]
    first = results[0]["latency_ms_p50"]
    for r in results:
        r["ratio_p50_to_first"] = round(r["latency_ms_p50"] / first, 3)
    _print_table(results, args)
    if args.json:
        env = {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "device": args.device,
            "warmup": args.warmup,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        doc = {"results": results, "environment": env} if args.compare else {**results[0], "environment": env}
        write_json(args.json, doc)
        say(f"wrote {args.json}")
    return EXIT_OK


def _ort_variants(b, args: argparse.Namespace, threads, ort_cls) -> list:
    """One ONNX Runtime session per graph-opt x spin setting asked for (the backend itself if none)."""
    if b.name != "onnxruntime" or (args.graph_opts == ["all"] and args.spins == [None]):
        return [b]
    kept = [n for n in b.notes if not n.startswith("onnxruntime providers")]
    variants = []
    for opt in args.graph_opts:
        for spin in args.spins:
            v = ort_cls(b.path, device=args.device, threads=threads, graph_opt=opt, spin=spin)
            v.notes[:0] = kept
            variants.append(v)
    b.close()
    return variants


def _label(model_label: str, b, args: argparse.Namespace) -> str:
    """'model [backend, <only the settings that vary in this run>]'."""
    parts = [b.name]
    if len(args.thread_list) > 1:
        parts.append(f"{getattr(b, 'threads', None) or 'default'} thr")
    if b.name == "onnxruntime" and len(args.graph_opts) > 1:
        parts.append(f"opt={b.graph_opt}")
    if b.name == "onnxruntime" and len(args.spins) > 1:
        parts.append("spin=" + {True: "on", False: "off", None: "default"}[b.spin])
    return f"{model_label} [{', '.join(parts)}]"


def _measure(candidates: list[Candidate], args: argparse.Namespace, say) -> None:
    from .verify import synthetic_frames

    sizes = {c.backend.input_size for c in candidates}
    frames = {s: synthetic_frames(args.batch, s[0], seed=1) for s in sizes}
    say(f"warm-up: {args.warmup} calls each ...")
    for c in candidates:
        for _ in range(args.warmup):
            c.backend.predict(frames[c.backend.input_size])
    say(f"timing: {args.runs} calls each, batch {args.batch}" + (", interleaved" if len(candidates) > 1 else "") + " ...")
    n = len(candidates)
    report_every = max(1, args.runs // 5)
    for r in range(args.runs):
        for k in range(n):  # rotate the order each round: no candidate always runs right after another
            c = candidates[(r + k) % n]
            x = frames[c.backend.input_size]
            t0 = time.perf_counter()
            c.backend.predict(x)
            c.times.append(time.perf_counter() - t0)
        if (r + 1) % report_every == 0 and r + 1 < args.runs:
            say(f"  {r + 1}/{args.runs}")


def _print_table(results: list[dict], args: argparse.Namespace) -> None:
    width = max(len(r["label"]) for r in results)
    print(f"{'model [backend]':<{width}}  {'input':>9}  {'p50 ms':>8}  {'p95 ms':>8}  {'frames/s':>9}  {'p50/first':>9}")
    for r in results:
        size = "x".join(map(str, r["image_size"]))
        print(
            f"{r['label']:<{width}}  {size:>9}  {r['latency_ms_p50']:>8.2f}  {r['latency_ms_p95']:>8.2f}  "
            f"{r['throughput_fps']:>9.1f}  {r['ratio_p50_to_first']:>8.2f}x"
        )
    print(
        f"(batch {args.batch}, {args.runs} runs after {args.warmup} warm-up, "
        f"threads {args.threads or 'default'}, onnxruntime spinning {args.spin})"
    )


if __name__ == "__main__":
    sys.exit(run(main))
