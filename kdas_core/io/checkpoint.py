"""Checkpoints: safetensors weights + JSON metadata. Loading never unpickles.

The metadata is the single place for the facts every consumer needs (model preset, backbone,
input size, normalisation, threshold); engines and the viewer read them from here (or from the
exported model), never from constants of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kdas_core import __version__
from kdas_core.models import create_model, resolve
from kdas_core.io.atomic import staged
from kdas_core.cli.conventions import UsageError
from kdas_core.models.presets import DEFAULT_THRESHOLD

FORMAT = "kdas-checkpoint/1"
METADATA_KEY = "kdas"
REQUIRED = ("preset", "backbone", "input_size", "mean", "std", "threshold")


class CheckpointError(UsageError, RuntimeError):
    """A file that is not a usable KDAS checkpoint; the message names the file and the fix."""


def build_metadata(model_name: str, **extra: Any) -> dict[str, Any]:
    """Metadata for a model of preset `model_name`; `extra` overrides or adds fields
    (input_size, threshold, data, val_metrics, epoch, ...)."""
    preset = resolve(model_name)
    meta = {
        "format": FORMAT,
        "preset": model_name,
        "backbone": preset.backbone,
        "channel": preset.channel,
        "input_size": preset.input_size,
        "mean": list(preset.mean),
        "std": list(preset.std),
        "threshold": DEFAULT_THRESHOLD,
        "code_version": __version__,
    }
    meta.update(extra)
    return meta


def _atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """A crash never leaves half a checkpoint (kdas_core.io.atomic)."""
    with staged(path, suffix=".safetensors") as tmp:
        save_file(tensors, tmp, metadata=metadata)


def save_checkpoint(path: str, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_save(state, path, {METADATA_KEY: json.dumps(meta, sort_keys=True)})


def save_tensors(path: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Generic tensors + JSON metadata (optimizer state, RNG state for --resume)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_save(tensors, path, {METADATA_KEY: json.dumps(meta, sort_keys=True)})


def _read_json_metadata(path: str) -> dict[str, Any]:
    """The JSON metadata of any KDAS safetensors file, with a clear error for missing/corrupt/foreign files."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); KDAS checkpoints are written by "
            "kdas_core.train / kdas_core.distill"
        ) from exc
    if raw is None:
        raise CheckpointError(f"{path}: safetensors file without KDAS metadata; was it written by kdas_core?")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: KDAS metadata is not valid JSON ({exc})") from exc


def _require_model_fields(path: str, meta: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {missing}")
    return meta


def read_metadata(path: str) -> dict[str, Any]:
    """A model checkpoint's metadata (preset, input size, normalisation, threshold, ...)."""
    return _require_model_fields(path, _read_json_metadata(path))


def read_tensors(path: str, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All tensors and the JSON metadata of a KDAS safetensors file (a checkpoint or a train state)."""
    meta = _read_json_metadata(path)
    tensors = {}
    with safe_open(path, framework="pt", device=device) as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, meta


def load_checkpoint(path: str, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode on `device`, metadata). Raises CheckpointError on any mismatch."""
    state, meta = read_tensors(path)
    _require_model_fields(path, meta)
    name = meta["preset"]
    try:
        model = create_model(name, pretrained=None)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"{path}: weights do not fit preset {name!r} (missing {len(missing)}, unexpected {len(unexpected)}, "
            f"wrong shape {len(wrong_shape)}, e.g. {(missing + unexpected + wrong_shape)[:3]}); "
            "the file's metadata names another model than its weights"
        )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
