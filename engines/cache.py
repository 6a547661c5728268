"""Where derived artefacts (ONNX exports of checkpoints, TensorRT engines) are cached, and the
key an engine is cached under.

`KDAS_CACHE_DIR` overrides the default `~/.cache/kdas`; each kind of artefact gets a subfolder.
"""

from __future__ import annotations

import os
import re
from typing import Any


def cache_dir(kind: str) -> str:
    root = os.environ.get("KDAS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kdas")
    path = os.path.join(root, kind)
    os.makedirs(path, exist_ok=True)
    return path


def engine_cache_key(model_id: str, target: dict[str, Any], precision: str, input_size: int, max_batch: int,
                     export_revision: int, onnx_sha256: str | None = None) -> str:
    """File stem of an engine: everything that makes an engine unusable (or different) elsewhere is
    in it: model (preset + checkpoint hash), export revision, the hash of the ONNX file it was
    built from (two exports of one checkpoint and revision can differ, e.g. under another torch
    or onnx version, and an engine is only the graph it was built from), GPU name, compute
    capability and SM count (engines tuned for one SM count differ from another's, as in
    HoloHub's engine cache), TensorRT version, precision, input size and the profile's max batch.
    `target` has gpu_name, compute_capability, sm_count and tensorrt_version (`current_target()`
    / a sidecar). `onnx_sha256` is None only for keys that name no single graph (the timing cache)."""
    gpu = re.sub(r"[^a-z0-9]+", "-", target["gpu_name"].lower()).strip("-")
    cc = target["compute_capability"].replace(".", "")
    onnx = f"-o{onnx_sha256[:12]}" if onnx_sha256 else ""
    return (f"{model_id}-r{int(export_revision)}{onnx}-{gpu}-sm{cc}x{int(target['sm_count'])}-trt{target['tensorrt_version']}"
            f"-{precision}-{int(input_size)}-b{int(max_batch)}")
