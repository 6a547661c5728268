from .factory import IMAGENET_MEAN, IMAGENET_STD, PRESETS, Preset, create_model, list_models, resolve
from .polyp_pvt import PolypPVT

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PRESETS", "Preset", "PolypPVT", "create_model", "list_models", "resolve"]
