"""A model file resolved once: what it is, its metadata, its hash and where it came from.

    src = ModelSource("student.safetensors")   # or an .onnx export, or a TensorRT .engine/.plan
    src.kind          'checkpoint' | 'onnx' | 'engine' (from the file name)
    src.meta          the file's own metadata, read on first use and kept: checkpoint metadata,
                      an export's kdas.* metadata_props, or an engine's sidecar
    src.sha256        the file's SHA-256, computed on first use and kept
    src.checkpoint()  the checkpoint an ONNX export / engine was made from (checked against the
                      hash recorded at export), as a ModelSource
    src.exports       ONNX exports of this checkpoint already found or made, by (size, precision)

`engines.load_backend` makes one and hands it to every backend it tries, so opening a model reads
each header once and hashes each file at most once, however many backends `auto` tries.
Imports nothing heavy (no torch, onnx or TensorRT until a header is read).
"""

from __future__ import annotations

import os
from typing import Any

from .errors import BackendError, ModelFileError

ENGINE_SUFFIXES = (".engine", ".plan")


def file_kind(path: str) -> str:
    """'checkpoint' | 'onnx' | 'engine' from the file name; BackendError for anything else."""
    low = path.lower()
    if low.endswith(".safetensors"):
        return "checkpoint"
    if low.endswith(".onnx"):
        return "onnx"
    if low.endswith(ENGINE_SUFFIXES):
        return "engine"
    raise BackendError(
        f"{path}: unknown model file type; expected a .safetensors checkpoint, an .onnx export "
        "or a TensorRT .engine/.plan (see `python -m engines.build --help`)"
    )


class ModelSource:
    """One model file and the facts about it, each read at most once (see the module doc)."""

    def __init__(self, path: str, kind: str | None = None, *, meta: dict[str, Any] | None = None,
                 sha256: str | None = None):
        self.path = os.fspath(path)
        self.kind = kind or file_kind(self.path)
        self._meta = meta
        self._sha256 = sha256
        self._checkpoint: ModelSource | None = None
        self.exports: dict[tuple[int, str], ModelSource] = {}

    @classmethod
    def of(cls, source: "str | os.PathLike | ModelSource", kind: str | None = None) -> "ModelSource":
        """`source` itself when it is a ModelSource already, else a new one for the path (of
        `kind` when given: a backend handed a bare path knows what it takes)."""
        return source if isinstance(source, ModelSource) else cls(source, kind)

    def __str__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"<ModelSource {self.kind} {self.path}>"

    @property
    def meta(self) -> dict[str, Any]:
        """The metadata, read on first use. ModelFileError when a checkpoint or ONNX file cannot
        be a KDAS model (no backend can help); an engine's sidecar problems are BackendErrors."""
        if self._meta is None:
            self._meta = self._read_meta()
        return self._meta

    def _read_meta(self) -> dict[str, Any]:
        if self.kind == "checkpoint":
            from kdas_core.io import checkpoint
            try:
                return checkpoint.read_metadata(self.path)
            except checkpoint.CheckpointError as exc:
                raise ModelFileError(str(exc)) from exc
        if self.kind == "onnx":
            from .export import read_onnx_metadata

            try:
                return read_onnx_metadata(self.path)
            except ModelFileError:
                raise
            except BackendError as exc:
                raise ModelFileError(str(exc)) from exc
        from .trt_common import read_sidecar

        return read_sidecar(self.path)

    @property
    def sha256(self) -> str:
        """The file's SHA-256 (hex), computed on first use."""
        if self._sha256 is None:
            from kdas_core.io import checkpoint
            self._sha256 = checkpoint.file_sha256(self.path)
        return self._sha256

    def checkpoint(self) -> "ModelSource":
        """The checkpoint this model runs from: itself, or the one an ONNX export was made from
        (BackendError when it is gone or changed since export). For an engine see `engine_origin`."""
        if self.kind == "checkpoint":
            return self
        if self._checkpoint is None:
            if self.kind != "onnx":
                raise BackendError(f"{self.path}: a TensorRT engine; use engine_origin() for the file it was built from")
            src, sha = self.meta["source_path"], self.meta["source_sha256"]
            if not src or not os.path.isfile(src):
                raise BackendError(f"{self.path}: the torch backend needs the source checkpoint, and {src or 'it'} is not there")
            origin = ModelSource(src, "checkpoint")
            if sha and origin.sha256 != sha:
                raise BackendError(f"{self.path}: its source checkpoint {src} has changed since export; export again")
            self._checkpoint = origin
        return self._checkpoint

    def engine_origin(self, backend: str) -> "ModelSource":
        """What a non-TensorRT `backend` runs for this engine: the ONNX (onnxruntime only) or the
        checkpoint its sidecar names, whichever still exists."""
        side = self.meta
        keys = ("onnx", "checkpoint") if backend == "onnxruntime" else ("checkpoint",)
        for key in keys:
            path = side.get(key)
            if path and os.path.isfile(path):
                return ModelSource(path)
        raise BackendError(f"{self.path}: a TensorRT engine; {backend} needs its source ONNX/checkpoint, which its sidecar does not point to any more")

    def check(self) -> None:
        """ModelFileError when this file cannot be a KDAS model whichever backend runs it (reads
        headers only; an engine is checked by TensorRT when it loads)."""
        if self.kind in ("checkpoint", "onnx"):
            self.meta  # noqa: B018 - reading it is the check
