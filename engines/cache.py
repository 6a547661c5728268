"""Where derived artefacts (ONNX exports of checkpoints, TensorRT engines) are cached.

`KDAS_CACHE_DIR` overrides the default `~/.cache/kdas`; each kind of artefact gets a subfolder.
"""

from __future__ import annotations

import os


def cache_dir(kind: str) -> str:
    root = os.environ.get("KDAS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kdas")
    path = os.path.join(root, kind)
    os.makedirs(path, exist_ok=True)
    return path
