"""Inference engines for KDAS models: one interface over TensorRT, ONNX Runtime and PyTorch.

    from engines import load_backend, BackendError
    b = load_backend("student.safetensors")          # or .onnx, or a TensorRT .engine/.plan
    probs = b.predict(frames)                         # uint8 (N,H,W,3) RGB at b.input_size -> float32 (N,H,W)
    mask = probs >= b.threshold

Build artefacts with `python -m engines.build`, measure them with `python -m engines.bench`.
"""

from __future__ import annotations

import os

from .backends.base import Backend
from .errors import BackendError, ModelFileError
from .trt_common import NO_GPU_REASON, has_nvidia_gpu, is_sticky_cuda_error

BACKENDS = ("tensorrt", "onnxruntime", "torch")
CHOICES = ("auto",) + BACKENDS
ENGINE_SUFFIXES = (".engine", ".plan")

__all__ = ["Backend", "BackendError", "ModelFileError", "check_model_file", "BACKENDS", "CHOICES", "load_backend", "file_kind", "is_sticky_cuda_error"]


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


def load_backend(
    path: str,
    backend: str = "auto",
    device: str | None = None,
    *,
    image_size: int | None = None,
    threads: int | None = None,
) -> Backend:
    """Open `path` with `backend` ("auto", "tensorrt", "onnxruntime" or "torch").

    `auto` tries tensorrt (a prebuilt engine, TensorRT and a GPU needed) -> onnxruntime -> torch
    and records in `.notes` what it picked and why the others were skipped. `device`: None (best
    available), "cpu" or "cuda[:N]". `image_size` re-exports a checkpoint at another size (an
    .onnx/.engine has a fixed size and must match it). `threads`: CPU threads for onnxruntime/torch.

    Construction validates the file; thread- or GPU-bound objects are created by the first
    `predict`, in the thread that calls it (see Backend).
    """
    if backend not in CHOICES:
        raise BackendError(f"unknown backend {backend!r}; choose one of {CHOICES}")
    if not os.path.isfile(path):
        raise BackendError(f"{path}: no such model file")
    kind = file_kind(path)
    check_model_file(path, kind)
    opts = dict(device=device, image_size=image_size, threads=threads)
    if backend != "auto":
        local: list[str] = []
        b = _open(backend, path, kind, opts, local)
        b.notes[:0] = local
        return b

    skipped: list[str] = []
    for name in BACKENDS:
        if name == "tensorrt" and device == "cpu":
            skipped.append("tensorrt skipped: device='cpu' was asked for")
            continue
        local = []
        try:
            b = _open(name, path, kind, {**opts, "auto": True}, local)
        except BackendError as exc:
            skipped.append(f"{name} skipped: {exc}")
            continue
        b.notes[:0] = [f"auto picked {name}: {_WHY[name]}"] + skipped + local
        return b
    raise BackendError(f"{path}: no backend could run it:\n  " + "\n  ".join(skipped))


def check_model_file(path: str, kind: str | None = None) -> None:
    """ModelFileError when `path` cannot be a KDAS model whichever backend runs it (unreadable
    safetensors/ONNX, no KDAS metadata). Reads headers only; engines are checked by TensorRT."""
    kind = kind or file_kind(path)
    try:
        if kind == "checkpoint":
            from kdas_core.checkpoint import CheckpointError, read_metadata

            try:
                read_metadata(path)
            except CheckpointError as exc:
                raise ModelFileError(str(exc)) from exc
        elif kind == "onnx":
            from .export import read_onnx_metadata

            read_onnx_metadata(path)
    except ModelFileError:
        raise
    except BackendError as exc:
        raise ModelFileError(str(exc)) from exc


_WHY = {
    "tensorrt": "a TensorRT engine built for this GPU is the fastest option",
    "onnxruntime": "ONNX Runtime runs the fused, graph-optimised export; on CPU it beats PyTorch eager",
    "torch": "PyTorch runs the checkpoint directly (slowest, but needs no export)",
}


def _open(name: str, path: str, kind: str, opts: dict, notes: list[str]) -> Backend:
    """One backend for one file, following a file's recorded source when needed
    (ONNX -> its checkpoint for torch; engine -> its ONNX/checkpoint for the others)."""
    if name == "tensorrt":
        from .backends import tensorrt_backend as trt_b

        reason = trt_b.why_unavailable(opts["device"])
        if reason and opts.get("auto") and not has_nvidia_gpu():
            reason = NO_GPU_REASON  # nobody asked for TensorRT: no install hint on a machine that cannot use it
        if reason:
            raise BackendError(reason)
        engine = path if kind == "engine" else trt_b.find_cached_engine(path, opts["image_size"], opts["device"], notes)
        b = trt_b.TensorRTBackend(engine, device=opts["device"])
        if engine != path:
            notes.append(f"tensorrt runs the prebuilt engine {engine}")
        return b

    if kind == "engine":
        from .trt_common import read_sidecar

        side = read_sidecar(path)
        sources = [side.get("onnx"), side.get("checkpoint")] if name == "onnxruntime" else [side.get("checkpoint")]
        source = next((s for s in sources if s and os.path.isfile(s)), None)
        if source is None:
            raise BackendError(f"{path}: a TensorRT engine; {name} needs its source ONNX/checkpoint, which its sidecar does not point to any more")
        notes.append(f"{name} runs {source}, the source of engine {path}")
        path, kind = source, file_kind(source)

    if name == "onnxruntime":
        from .backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, device=opts["device"], image_size=opts["image_size"], threads=opts["threads"])

    from .backends.torch_backend import TorchBackend

    if kind == "onnx":
        path = _checkpoint_of_onnx(path)
        notes.append(f"torch runs {path}, the checkpoint this ONNX was exported from")
    return TorchBackend(path, device=opts["device"], image_size=opts["image_size"], threads=opts["threads"])


def _checkpoint_of_onnx(onnx_path: str) -> str:
    from kdas_core.checkpoint import file_sha256

    from .export import read_onnx_metadata

    meta = read_onnx_metadata(onnx_path)
    src = meta["source_path"]
    if not src or not os.path.isfile(src):
        raise BackendError(f"{onnx_path}: the torch backend needs the source checkpoint, and {src or 'it'} is not there")
    if meta["source_sha256"] and file_sha256(src) != meta["source_sha256"]:
        raise BackendError(f"{onnx_path}: its source checkpoint {src} has changed since export; export again")
    return src
