"""TensorRT backend (work in progress in this commit: reports itself unavailable)."""

from __future__ import annotations

from ..errors import BackendError


def why_unavailable() -> str | None:
    return "TensorRT backend not implemented yet"


def read_sidecar(path: str) -> dict:
    raise BackendError(f"{path}: TensorRT engines are not supported yet")


def find_cached_engine(path: str, image_size: int | None = None) -> str:
    raise BackendError("TensorRT backend not implemented yet")


class TensorRTBackend:
    def __init__(self, *a, **k):
        raise BackendError("TensorRT backend not implemented yet")
