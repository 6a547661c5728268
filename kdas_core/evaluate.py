"""Evaluate a model on polyp test sets: `python -m kdas_core.evaluate --weights MODEL --data DIR`.

This module is the command line only, and imports nothing heavy, so `--help` and argument errors
answer at once; the work is in `kdas_core.evaluation.scoring` (`evaluate_pairs`, `evaluate_backend`, ...),
whose names are also reachable from here for existing callers.
"""

from __future__ import annotations

import argparse
import sys

from kdas_core.cli.conventions import DEVICE_HELP, Parser, add_progress_flag, default_workers, device_arg, run_cli
from kdas_core.models.presets import TTA_MODES, image_size_arg


def build_parser() -> argparse.ArgumentParser:
    p = Parser(exit_codes=(0, 1, 2, 4, 130), 
        prog="python -m kdas_core.evaluate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Evaluate a KDAS model on polyp test sets, with the protocol of PraNet/Polyp-PVT:\n"
            "each image is resized to the model's input size, sigmoid(P1+P2) is resized back to the\n"
            "mask's original size, and the metrics are computed there, per image, then averaged.\n\n"
            "--data takes either a PraNet root (every TestDataset/<name>/{images,masks} is one test\n"
            "set, reported separately) or one folder with images/ and masks/ (one set, named after\n"
            "the folder). Images and masks are matched by file stem.\n\n"
            "--weights takes a checkpoint (.safetensors, run in PyTorch) or an exported model (.onnx\n"
            "from engines.build, fp32 or int8; a TensorRT .engine), run through the engines backend\n"
            "interface with the same frames and the same scoring, so exports are compared fairly.\n"
            "Input size, mean/std and threshold come from the model's metadata.\n\n"
            "metrics (per image, then the mean over images):\n"
            "  mDice, mIoU      Dice / IoU of  prob >= threshold\n"
            "  mDice_mean256,   the papers' 'meanDic'/'meanIoU': Dice / IoU averaged over 256\n"
            "  mIoU_mean256     thresholds 0, 1/255, ..., 1 (PraNet MATLAB toolbox)\n"
            "  Sm, Em, wFm, MAE S-alpha, mean E-phi, weighted F-beta, mean absolute error (pysodmetrics)\n"
            "  An image with an empty mask and an empty prediction has Dice = IoU = 1; wFm is 0 on\n"
            "  empty masks (pysodmetrics' rule)."
        ),
        epilog=(
            "outputs (nothing is written to disk without --json, --csv or --save-overlays):\n"
            "  a table on stdout;\n"
            "  --json OUT: {\"<test set>\": {\"mDice\", \"mIoU\", \"Sm\", \"Em\", \"wFm\", \"MAE\", \"n\",\n"
            "              \"mDice_mean256\", \"mIoU_mean256\"}, ...};\n"
            "  per-image CSV: --csv PATH, or by default OUT with the suffix _per_image.csv beside the JSON;\n"
            "  --save-overlays DIR: DIR/<test set>/sheet_000.png, ... (input | contours | probability,\n"
            "              6 images per sheet) and worst_dice.png (the 6 lowest-Dice images).\n\n"
            "examples:\n"
            "  python -m kdas_core.evaluate --weights runs/student/best.safetensors \\\n"
            "      --data ../shared/data/polyp --json results/student.json\n"
            "  python -m kdas_core.evaluate --weights best.safetensors --data my_frames/ --save-overlays /tmp/ov\n"
            "  python -m kdas_core.evaluate --weights deploy/best-256-int8.onnx --data ../shared/data/polyp \\\n"
            "      --threads 2 --json results/int8.json\n"
            "  python -m kdas_core.evaluate --weights runs/teacher/best.safetensors --data ../shared/data/polyp-352 \\\n"
            "      --split val --minmax        # the validation split, in the papers' metric"
        ),
    )
    p.add_argument("--weights", required=True, metavar="MODEL",
                   help="checkpoint (.safetensors) from kdas_core.train/distill, its run folder (best.safetensors is "
                        "used), or an export (.onnx, .engine) from engines.build")
    p.add_argument("--backend", metavar="NAME",
                   help="run through this backend of the engines package: auto or one of its backends, listed in "
                        "`python -m engines.bench --help` (default: PyTorch in-process for a checkpoint, onnxruntime "
                        "for .onnx, tensorrt for an engine: the file itself is scored, never a fallback)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for the onnxruntime/torch backend (default: the runtime's)")
    p.add_argument("--workers", type=int, default=default_workers(), metavar="N",
                   help="processes computing the full-resolution metrics (default: the usable cores, at most 8; "
                        "same numbers with any N)")
    p.add_argument("--data", required=True, metavar="DIR", help="PraNet root (TestDataset/<name>/...) or a folder with images/ and masks/")
    p.add_argument("--json", metavar="OUT", help="write the summary JSON here")
    p.add_argument("--csv", metavar="PATH", help="per-image CSV (default: beside --json as <json stem>_per_image.csv)")
    p.add_argument("--device", type=device_arg, metavar="DEV", help=f"{DEVICE_HELP} (default: a CUDA GPU when one is visible, else cpu)")
    p.add_argument("--save-overlays", metavar="DIR", help="write picture sheets for people to look at (see below)")
    p.add_argument("--threshold", type=float, metavar="T", help="binarisation threshold for mDice/mIoU (default: from the checkpoint, usually 0.5)")
    p.add_argument("--image-size", type=image_size_arg, metavar="S", help="model input size in pixels, a multiple of 32 (default: from the checkpoint)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="images per forward pass (default: %(default)s)")
    p.add_argument("--tta", choices=TTA_MODES, default="none",
                   help="test-time augmentation for a checkpoint: 'flip' averages the logits with those of the "
                        "mirrored image (twice the cost; what teacher_targets --tta flip gives a student) "
                        "(default: %(default)s)")
    p.add_argument("--minmax", action="store_true",
                   help="min-max normalise each probability map before scoring, as the MATLAB toolbox and "
                        "Polyp-PVT's Test.py do (for comparison with papers; default: score raw probabilities)")
    split = p.add_argument_group(
        "which images",
        "by default the test sets of --data; --split val scores instead the validation images that "
        "train/distill/ablate hold out of --data's training images (the same split for every seed), "
        "the place to choose checkpoints, weights and settings (test sets never choose anything)")
    split.add_argument("--split", choices=("test", "val"), default="test",
                       help="test: every test set of --data; val: its validation split, as one set named "
                            "'validation' (default: %(default)s)")
    split.add_argument("--val-fraction", type=float, default=_train_default("val_fraction"), metavar="F",
                       help="with --split val: as the training run's --val-fraction (default: %(default)s)")
    split.add_argument("--groups", default=_train_default("groups"), metavar="auto|none|CSV",
                       help="with --split val: as the training run's --groups (default: %(default)s)")
    add_progress_flag(p)
    return p


def _train_default(name: str):
    """A training default (one home: kdas_core.training.config), so that --split val holds out
    exactly what a training run with default flags held out."""
    from kdas_core.training.config import defaults

    return defaults()[name]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> int:
        from kdas_core.cli.conventions import weights_from_run
        from kdas_core.io.atomic import check_output_path

        args.weights = weights_from_run(args.weights)  # a run folder: its best.safetensors
        for path, flag in ((args.json, "--json"), (args.csv, "--csv")):
            if path:  # before the model loads and the images are scored
                check_output_path(path, flag, inputs=(args.weights,))
        from kdas_core.evaluation.scoring import run

        return run(args)

    return run_cli(go, "kdas_core.evaluate")


def __getattr__(name: str):
    """`kdas_core.evaluate.evaluate_pairs` and friends, loaded on first use (they need torch).
    Dunder lookups are answered at once: the import system asks `from kdas_core.evaluate import
    main` (what the `kdas-evaluate` console script does) for `__path__`, which must not load torch."""
    if name.startswith("__"):
        raise AttributeError(name)
    from kdas_core.evaluation import scoring

    try:
        return getattr(scoring, name)
    except AttributeError:
        raise AttributeError(f"module 'kdas_core.evaluate' has no attribute {name!r}") from None


if __name__ == "__main__":
    sys.exit(main())
