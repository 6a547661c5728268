"""The named model presets and the model facts that hold for every preset, without importing torch
or timm (so `--help` and argument errors of every CLI answer at once). `kdas_core.models`
re-exports everything here.

A trained model's own facts (input size, mean/std, threshold) travel in its checkpoint and ONNX
metadata; the values here are only the defaults that a new checkpoint is written with.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from kdas_core.cli.conventions import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_THRESHOLD = 0.5  # probability >= threshold is "polyp", unless the checkpoint says otherwise
TTA_MODES = ("none", "flip")  # test-time augmentation: evaluate --tta, teacher_targets --tta

# The input-size rule: the encoder downsamples by 32, so sizes are multiples of 32; beyond 2048
# nothing fits in memory on the machines we target.
STRIDE = 32
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 2048


@dataclass(frozen=True)
class Preset:
    backbone: str
    description: str
    input_size: int = 352
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel: int = 32


PRESETS: dict[str, Preset] = {
    "polyppvt-b2": Preset("pvt_v2_b2", "Polyp-PVT teacher, PVTv2-b2 backbone (paper: 25.1 M params)"),
    "polyppvt-b0": Preset("pvt_v2_b0", "KDAS student, PVTv2-b0 backbone (paper: 3.65 M params)"),
    "polyppvt-lite0": Preset("efficientnet_lite0", "student, EfficientNet-Lite0 backbone (offline ImageNet weights)"),
    "polyppvt-lite2": Preset("efficientnet_lite2", "teacher, EfficientNet-Lite2 backbone (offline ImageNet weights)"),
}


def list_models() -> list[str]:
    return sorted(PRESETS)


def resolve(name: str) -> Preset:
    """A preset by name, or an ad-hoc one for 'polyppvt:<any timm backbone>'."""
    if name in PRESETS:
        return PRESETS[name]
    if name.startswith("polyppvt:"):
        return Preset(name.split(":", 1)[1], f"Polyp-PVT decoder on timm backbone {name.split(':', 1)[1]}")
    raise UsageError(f"unknown model {name!r}; choose one of {list_models()} or 'polyppvt:<timm backbone>'")


def image_size_problem(size: int) -> str | None:
    """Why `size` cannot be a model input size, or None when it can (the one image-size rule)."""
    if size % STRIDE or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        return (f"must be a multiple of {STRIDE} (the encoder's stride) from {MIN_IMAGE_SIZE} to "
                f"{MAX_IMAGE_SIZE}, got {size}")
    return None


def scaled_size(size: int, rate: float) -> int:
    """`size` scaled by `rate` and rounded to the encoder's stride (at least one stride): the side
    of Polyp-PVT's multi-scale training batches and of multi-scale teacher targets."""
    return max(STRIDE, int(round(size * rate / STRIDE) * STRIDE))


def image_size_arg(text: str) -> int:
    """argparse `type=` for --image-size: an integer that obeys image_size_problem()."""
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    problem = image_size_problem(size)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return size
