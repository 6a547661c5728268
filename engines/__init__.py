"""Inference engines for KDAS models: one interface over TensorRT, ONNX Runtime and PyTorch.

    from engines import load_backend, BackendError
    b = load_backend("student.safetensors")          # or .onnx, or a TensorRT .engine/.plan
    probs = b.predict(frames)                         # uint8 (N,H,W,3) RGB at b.input_size -> float32 (N,H,W)
    mask = probs >= b.threshold

Opening a model: `load_backend` resolves the file once into a `ModelSource` (kind, metadata,
hash, the checkpoint it came from, cached exports) and hands that to each backend it tries.
The backend order and what follows a failed backend live here only: `BACKENDS` and
`fallback_chain` (the app's fallback while running uses them too).

Build artefacts with `python -m engines.build`, measure them with `python -m engines.bench`.
"""

from __future__ import annotations

import os

from .backends.base import Backend
from .errors import BackendError, BackendUnavailable, ModelFileError
from .source import ENGINE_SUFFIXES, ModelSource, file_kind
from .trt_common import is_sticky_cuda_error

BACKENDS = ("tensorrt", "onnxruntime", "torch")  # fastest first: the order auto tries and falls back in
CHOICES = ("auto",) + BACKENDS
GPU_ONLY = ("tensorrt",)  # never tried when device="cpu"

__all__ = ["Backend", "BackendError", "BackendUnavailable", "ModelFileError", "ModelSource", "check_model_file", "BACKENDS", "CHOICES",
           "ENGINE_SUFFIXES", "GPU_ONLY", "fallback_chain", "load_backend", "file_kind", "is_sticky_cuda_error"]


def fallback_chain(after: str, device: str | None = None) -> list[str]:
    """The backends to try, in order, once `after` has failed ("auto": every backend, the order
    `auto` tries them in). `device="cpu"` leaves out the GPU-only ones. An unknown name: none."""
    if after == "auto":
        rest = BACKENDS
    elif after in BACKENDS:
        rest = BACKENDS[BACKENDS.index(after) + 1:]
    else:
        return []
    return [b for b in rest if not (device == "cpu" and b in GPU_ONLY)]


def open_for_scoring(path: str, backend: str, *, device: str | None, image_size: int | None,
                     threads: int | None) -> Backend:
    """`kdas_core.evaluate`'s way in (the `kdas_core.runtimes` entry point): `load_backend`, with a
    model-file or backend problem reported as the user error it is."""
    from kdas_core.cli.conventions import UnavailableError, UsageError

    try:
        return load_backend(path, backend=backend, device=device, image_size=image_size, threads=threads)
    except BackendUnavailable as exc:  # the file asked for cannot run here: hardware, not input
        raise UnavailableError(str(exc)) from exc
    except BackendError as exc:
        raise UsageError(str(exc)) from exc


def load_backend(
    path: str | ModelSource,
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
    if not os.path.isfile(str(path)):
        raise BackendError(f"{path}: no such model file")
    src = ModelSource.of(path)
    check_model_file(src)
    opts = dict(device=device, image_size=image_size, threads=threads)
    if backend != "auto":
        local: list[str] = []
        b = _open(backend, src, opts, local)
        b.notes[:0] = local
        return b

    chain = fallback_chain("auto", device)
    skipped = [f"{name} skipped: device='cpu' was asked for" for name in BACKENDS if name not in chain]
    for name in chain:
        local = []
        try:
            b = _open(name, src, {**opts, "auto": True}, local)
        except BackendError as exc:
            skipped.append(f"{name} skipped: {exc}")
            continue
        why = b.why_auto or f"the first of {', '.join(chain)} that could run it"
        b.notes[:0] = [f"auto picked {name}: {why}"] + skipped + local
        return b
    raise BackendError(f"{src.path}: no backend could run it:\n  " + "\n  ".join(skipped))


def check_model_file(path: str | ModelSource, kind: str | None = None) -> None:
    """ModelFileError when `path` cannot be a KDAS model whichever backend runs it (unreadable
    safetensors/ONNX, no KDAS metadata). Reads headers only; engines are checked by TensorRT."""
    ModelSource.of(path, kind).check()


def _open(name: str, src: ModelSource, opts: dict, notes: list[str]) -> Backend:
    """One backend for one model, following its recorded source when needed
    (ONNX -> its checkpoint for torch; engine -> its ONNX/checkpoint for the others)."""
    if name == "tensorrt":
        from .backends import tensorrt_backend as trt_b

        reason = trt_b.unavailable_reason(opts["device"])
        if reason:
            raise BackendUnavailable(reason)
        engine = src if src.kind == "engine" else trt_b.find_cached_engine(src, opts["image_size"], opts["device"], notes)
        b = trt_b.TensorRTBackend(engine, device=opts["device"])
        if engine is not src:
            notes.append(f"tensorrt runs the prebuilt engine {engine}")
        return b

    if src.kind == "engine":
        engine, src = src, src.engine_origin(name)
        notes.append(f"{name} runs {src.path}, the source of engine {engine.path}")

    if name == "onnxruntime":
        from .backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(src, device=opts["device"], image_size=opts["image_size"], threads=opts["threads"])

    from .backends.torch_backend import TorchBackend

    if src.kind == "onnx":
        src = src.checkpoint()
        notes.append(f"torch runs {src.path}, the checkpoint this ONNX was exported from")
    return TorchBackend(src, device=opts["device"], image_size=opts["image_size"], threads=opts["threads"])
