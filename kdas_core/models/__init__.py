"""Models: the named presets (`presets`, torch-free), the encoder / decoder / head parts and the
factory that builds a preset. The presets load at once; everything that needs torch and timm
loads on first use, so `--help` of every command answers without importing them."""

from kdas_core.models.presets import IMAGENET_MEAN, IMAGENET_STD, PRESETS, Preset, list_models, resolve

_LAZY = {"create_model": "kdas_core.models.factory", "PolypPVT": "kdas_core.models.polyp_pvt"}

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PRESETS", "Preset", "PolypPVT", "create_model", "list_models", "resolve"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdas_core.models' has no attribute {name!r}")
