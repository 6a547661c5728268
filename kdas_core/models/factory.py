"""One factory of named models, timm-style: `create_model("polyppvt-lite0", pretrained="offline")`."""

from __future__ import annotations

from kdas_core.models.presets import IMAGENET_MEAN, IMAGENET_STD, PRESETS, Preset, list_models, resolve  # noqa: F401 (re-exported)
from kdas_core.models.polyp_pvt import PolypPVT


def create_model(name: str, pretrained: str | None = None) -> PolypPVT:
    """Build a named model. `pretrained`: None, 'timm', 'offline', 'auto' or a path (see Encoder)."""
    preset = resolve(name)
    model = PolypPVT(preset.backbone, channel=preset.channel)
    model.pretrained_source = model.encoder.load_pretrained(pretrained)
    return model
