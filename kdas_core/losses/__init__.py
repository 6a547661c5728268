"""Losses: the segmentation loss (`structure`), the distiller registry (`base`), one module per
`--kd` method (`methods/`) and their names and summaries (`catalog`, torch-free). Loaded on first
use, so that the catalog can be read without torch."""

_LAZY = {
    "Distiller": "kdas_core.losses.base", "available": "kdas_core.losses.base",
    "build_distillers": "kdas_core.losses.base", "parse_kd_spec": "kdas_core.losses.base",
    "register": "kdas_core.losses.base",
    "attention_kl": "kdas_core.losses.methods.kdas", "kdas_terms": "kdas_core.losses.methods.kdas",
    "self_attention_map": "kdas_core.losses.methods.kdas", "sgm_loss": "kdas_core.losses.methods.kdas",
    "structure_loss": "kdas_core.losses.structure",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdas_core.losses' has no attribute {name!r}")
