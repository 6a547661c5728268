"""python -m engines.build: export a KDAS checkpoint to ONNX, optionally build a TensorRT engine,
optionally verify the result against the PyTorch checkpoint."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from kdas_core.io.atomic import staged
from kdas_core.models.presets import image_size_arg

from . import ENGINE_SUFFIXES
from .cli_common import EXIT_CODES_HELP, EXIT_OK, UnavailableError, VerifyError, run
from kdas_core.cli.conventions import Parser, device_arg, positive_int

DESCRIPTION = """\
Export a KDAS checkpoint (.safetensors) for deployment.

ONNX (always written): the graph takes uint8 RGB frames, NHWC (N,S,S,3), already resized to
the model size, with a dynamic batch N; it normalises inside and outputs float32 probabilities
(N,S,S) = sigmoid(P1 + P2). Input size, threshold, mean/std and the checkpoint's SHA-256 are
embedded as ONNX metadata (kdas.*), so apps hold no pre/post-processing constants.

TensorRT (--format tensorrt, extra [trt-cu12] or [trt-cu13] matching the driver, NVIDIA GPU):
builds an engine from that ONNX with a strongly typed network (FP16 comes from an FP16 ONNX:
works on TensorRT 10 and 11), batch 1-4, a timing cache, and names the engine by model, export
revision, the ONNX file's hash, GPU, compute capability, SM count, TensorRT version, precision,
input size and max batch, with a JSON sidecar. Builds take minutes; progress is printed. The engine enters the
cache index (where load_backend(checkpoint) finds it) only after --verify passed.

INT8 (--precision int8 --calibration DIR, ONNX only): static QDQ quantisation of the fp32 export
with ONNX Runtime's tooling (engines/quantize.py): per-channel int8 weights, uint8 activations
calibrated on --calibration-images real frames from DIR; same uint8 input and float32 output.
"""

EPILOG = f"""\
examples:
  python -m engines.build --weights runs/student/best.safetensors --out deploy/ --verify
  python -m engines.build --weights best.safetensors --out deploy/ --format tensorrt --precision fp16 --verify
  python -m engines.build --weights best.safetensors --out deploy/ --image-size 256
  python -m engines.build --weights best.safetensors --out deploy/ --precision int8 \
      --calibration DATA/TrainDataset --verify

--verify runs the artefact and the PyTorch checkpoint on the same frames (--verify-frames DIR,
or by default the bundled demo clip's frames on which the checkpoint finds a polyp) and fails
unless: fp32 max prob diff <= 1e-3; fp16 mask Dice >= 0.99, no all-empty masks where the
reference has foreground, mean prob diff <= 5e-3 and 99th-percentile prob diff <= 0.05; int8
mask Dice >= 0.85 and no all-empty masks (int8 verifies on real frames: --verify-frames, else
up to 8 images of --calibration that calibration did not use; the output names them). A
TensorRT engine that fails (or is built without --verify) stays out of the cache index; its
sidecar says "verified": false.

{EXIT_CODES_HELP}
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(exit_codes=(0, 1, 2, 3, 4, 130), 
        prog="python -m engines.build", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--weights", required=True, metavar="CKPT", help="KDAS checkpoint (.safetensors from kdas_core.train/distill)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    p.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx", help="artefact to build (default: onnx; tensorrt also writes the ONNX it builds from)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="fp32 (default), fp16 (network in half precision; for TensorRT/GPU) or int8 (static QDQ, for CPUs; needs --calibration)")
    p.add_argument("--calibration", metavar="DIR", help="int8: folder of real frames (or with images/, e.g. DATA/TrainDataset) to calibrate on")
    p.add_argument("--calibration-images", type=int, default=300, metavar="N", help="int8: images used from --calibration, spread over the folder (default 300)")
    p.add_argument("--image-size", type=image_size_arg, metavar="S", help="square input side, a multiple of 32 (default: the checkpoint's input_size)")
    p.add_argument("--verify", action="store_true", help="compare the artefact with the PyTorch checkpoint and fail on disagreement")
    p.add_argument("--verify-frames", metavar="DIR", help="images to verify on (default: demo-clip frames where the checkpoint finds a polyp)")
    p.add_argument("--max-batch", type=int, default=4, metavar="N", help="TensorRT profile: largest batch (default 4)")
    p.add_argument("--device", type=device_arg, default=None, metavar="DEV", help="CUDA device for TensorRT, e.g. cuda:1 (default cuda:0)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads of PyTorch and ONNX Runtime for the export, the INT8 calibration and --verify "
                        "(default: the libraries' own choice)")
    args = p.parse_args(argv)
    if args.precision == "int8" and (args.format != "onnx" or not args.calibration):
        p.error("--precision int8 builds an ONNX model (--format onnx) and needs --calibration DIR (real frames)")
    if args.calibration and args.precision != "int8":
        p.error("--calibration is for --precision int8")
    if args.calibration_images < 1:
        p.error("--calibration-images must be >= 1")
    if args.max_batch < 1:
        p.error("--max-batch must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.weights = resolve_weights(args.weights)
    from kdas_core.io.atomic import check_output_dir

    check_output_dir(args.out, "--out", inputs=(args.weights, args.calibration, args.verify_frames),
                     file_suffixes=(".onnx", ".safetensors", *ENGINE_SUFFIXES))  # before any export
    if args.threads:  # the export and the INT8 calibration run in this process: torch and ORT alike
        os.environ["KDAS_ORT_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)  # before importing torch: a typo fails fast
    from kdas_core.io.checkpoint import read_metadata

    from .backends.onnxruntime_backend import cached_onnx_for_checkpoint

    meta = read_metadata(args.weights)  # CheckpointError -> exit 2 with the file named
    size = int(args.image_size or meta["input_size"])

    if args.format == "tensorrt":
        # Fail before a long export when TensorRT cannot run here at all.
        from .backends.tensorrt_backend import unavailable_reason

        reason = unavailable_reason(args.device)
        if reason:
            raise UnavailableError(f"--format tensorrt: {reason}")

    if args.precision == "int8":
        from .quantize import calibration_images, verify_images

        calibration_images(args.calibration, args.calibration_images)  # a wrong folder fails before the export
        if args.verify and not args.verify_frames:
            verify_images(args.calibration, calibration_count=args.calibration_images)  # so does nothing left to verify on
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.weights))[0]
    onnx_path = os.path.join(args.out, f"{stem}-{size}-{args.precision}.onnx")
    notes: list[str] = []
    if args.precision == "int8":
        from .quantize import quantize_int8

        quantize_int8(cached_onnx_for_checkpoint(args.weights, size, notes), onnx_path, args.calibration,
                      count=args.calibration_images, log=_say)
    else:
        # The same exports load_backend(checkpoint) uses: made once in the cache, copied here.
        cached = cached_onnx_for_checkpoint(args.weights, size, notes, precision=args.precision)
        _copy(cached, onnx_path)
        _say(f"{notes[-1]}; copied to {onnx_path}")
    artefact = onnx_path
    if args.format == "tensorrt":
        from .trt_build import build_engine

        artefact = build_engine(onnx_path, args.out, max_batch=args.max_batch, device=args.device, checkpoint=args.weights, log=_say)

    result = _verify(args, artefact, size) if args.verify else None
    if artefact.endswith(ENGINE_SUFFIXES):
        _publish(artefact, result)
    if result is not None and not result.ok:
        raise VerifyError(f"{artefact} disagrees with {args.weights}; see above")
    print(artefact)  # stdout: the artefact path only, for scripts
    return EXIT_OK


def resolve_weights(path: str) -> str:
    """The checkpoint --weights names: the file itself, or a train/distill run folder's
    best.safetensors (said on stderr). An export (.onnx, an engine) is refused with what to do."""
    from kdas_core.cli.conventions import UsageError, weights_from_run

    if os.path.isdir(path):
        return weights_from_run(path)
    if path.lower().endswith((".onnx", *ENGINE_SUFFIXES)):
        raise UsageError(f"--weights {path}: engines.build takes a .safetensors checkpoint (from kdas_core.train / "
                         "distill); this file is already an export: run it as it is (python -m app --weights, "
                         "engines.bench, kdas_core.evaluate), or build from the checkpoint it was exported from")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    return path


def _verify(args: argparse.Namespace, artefact: str, size: int):
    """The verify result (engines.verify.Agreement) of `artefact` against the checkpoint."""
    from . import load_backend
    from .verify import compare, verification_frames

    reference = load_backend(args.weights, backend="torch", device="cpu", image_size=size, threads=args.threads)
    try:
        if args.precision == "int8" and not args.verify_frames:
            from kdas_core.cli.conventions import name_some

            from .quantize import verify_frames, verify_images  # INT8 is judged on real frames it was not calibrated on

            paths = verify_images(args.calibration, calibration_count=args.calibration_images)
            frames = verify_frames(paths, size)
            ref_probs = reference.predict(frames)
            what = (f"{len(frames)} images of {args.calibration} that calibration did not use "
                    f"({name_some((os.path.basename(p) for p in paths), 4)})")
        else:
            frames, ref_probs, what = verification_frames(reference, size, args.verify_frames)
    finally:
        reference.close()
    if artefact.endswith(".onnx"):
        candidate = load_backend(artefact, backend="onnxruntime", device="cpu", threads=args.threads)
    else:
        candidate = load_backend(artefact, backend="tensorrt", device=args.device)
    _say(f"verifying {candidate.name} against torch (cpu, fp32) on {what} ...")
    try:
        result = compare(ref_probs, candidate.predict(frames), args.precision, reference.threshold)
    finally:
        candidate.close()
    _say(result.summary())
    return result


def _publish(engine: str, result) -> None:
    """Only a verified engine enters the cache index; the sidecar records the outcome either way."""
    from .trt_build import publish_engine, record_failed_verify

    if result is None:
        _say(f"{engine} is not in the engine cache (built without --verify): load it by its path, or rebuild with --verify")
    elif result.ok:
        _say(f"verified; indexed in the engine cache as {os.path.basename(publish_engine(engine, result.to_dict()))}")
    else:
        record_failed_verify(engine, result.to_dict())
        _say(f"{engine} failed verification: kept for inspection with \"verified\": false, not in the engine cache")


def _copy(src: str, dst: str) -> None:
    with staged(dst) as tmp:
        shutil.copyfile(src, tmp)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(run(main))
