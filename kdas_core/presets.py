"""The named model presets, without importing torch or timm (so `--help` and argument errors of
every CLI answer at once). `kdas_core.models` re-exports everything here."""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preset:
    backbone: str
    role: str  # "teacher" or "student": only a hint for help texts
    description: str
    input_size: int = 352
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel: int = 32
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "polyppvt-b2": Preset("pvt_v2_b2", "teacher", "Polyp-PVT teacher, PVTv2-b2 backbone (paper: 25.1 M params)"),
    "polyppvt-b0": Preset("pvt_v2_b0", "student", "KDAS student, PVTv2-b0 backbone (paper: 3.65 M params)"),
    "polyppvt-lite0": Preset("efficientnet_lite0", "student", "student, EfficientNet-Lite0 backbone (offline ImageNet weights)"),
    "polyppvt-lite2": Preset("efficientnet_lite2", "teacher", "teacher, EfficientNet-Lite2 backbone (offline ImageNet weights)"),
}


def list_models() -> list[str]:
    return sorted(PRESETS)


def resolve(name: str) -> Preset:
    """A preset by name, or an ad-hoc one for 'polyppvt:<any timm backbone>'."""
    if name in PRESETS:
        return PRESETS[name]
    if name.startswith("polyppvt:"):
        return Preset(name.split(":", 1)[1], "custom", f"Polyp-PVT decoder on timm backbone {name.split(':', 1)[1]}")
    raise ValueError(f"unknown model {name!r}; choose one of {list_models()} or 'polyppvt:<timm backbone>'")
