"""What the TensorRT builder and the TensorRT backend share: guarded imports, CUDA error checks,
GPU identity, engine cache keys and the JSON sidecar.

TensorRT and cuda-python are optional (extra `[trt]`); nothing here imports them at module
import time, so the rest of `engines` works without them.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

from .errors import BackendError

SIDECAR_FORMAT = "kdas-trt/1"
INSTALL_HINT = (
    "install the [trt] extra from NVIDIA's index: "
    "pip install --extra-index-url https://pypi.nvidia.com 'kdas[trt]'"
)


def import_trt():
    """The `tensorrt` module, or BackendError saying why not. Registry packages named
    `tensorrt` without the runtime (stubs) are refused here, never half-used."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a wheel whose native libraries fail to load
        raise BackendError(f"TensorRT is not available ({type(exc).__name__}: {exc}); {INSTALL_HINT}") from exc
    if not all(hasattr(trt, a) for a in ("Builder", "Runtime", "OnnxParser", "__version__")):
        raise BackendError(f"the installed 'tensorrt' package ({getattr(trt, '__file__', '?')}) has no TensorRT runtime; {INSTALL_HINT}")
    return trt


def import_cudart():
    """cuda-python's runtime bindings (new `cuda.bindings.runtime`, old `cuda.cudart`)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as exc:
            raise BackendError(f"cuda-python is not installed ({exc}); {INSTALL_HINT}") from exc
    return cudart


def cuda_check(result: Any, what: str):
    """Unwrap a cuda-python `(err, *values)` tuple; BackendError with CUDA's own words on failure."""
    cudart = import_cudart()
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if err != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(err)
        detail = text.decode() if isinstance(text, bytes) else str(text)
        raise BackendError(f"CUDA error in {what}: {getattr(err, 'name', err)} ({detail})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def gpu_info(device: int = 0) -> dict[str, Any]:
    """Name and compute capability of CUDA device `device` (BackendError when there is none)."""
    cudart = import_cudart()
    count = cuda_check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount (is an NVIDIA driver installed?)")
    if not count:
        raise BackendError("no NVIDIA GPU visible to CUDA")
    if device >= count:
        raise BackendError(f"CUDA device {device} asked for, but only {count} visible")
    prop = cuda_check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return {"gpu_name": name.strip(), "compute_capability": f"{prop.major}.{prop.minor}"}


def device_index(device: str | None) -> int:
    if device in (None, "cuda"):
        return 0
    m = re.fullmatch(r"cuda:(\d+)", device)
    if not m:
        raise BackendError(f"TensorRT needs a CUDA device ('cuda' or 'cuda:N'), not {device!r}")
    return int(m.group(1))


def engine_cache_key(model_id: str, gpu_name: str, compute_capability: str, trt_version: str, precision: str, input_size: int) -> str:
    """File stem of an engine: everything that makes an engine unusable elsewhere is in it."""
    gpu = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    cc = compute_capability.replace(".", "")
    return f"{model_id}-{gpu}-sm{cc}-trt{trt_version}-{precision}-{int(input_size)}"


def sidecar_path(engine_path: str) -> str:
    return os.path.splitext(engine_path)[0] + ".json"


def read_sidecar(engine_path: str) -> dict[str, Any]:
    side = sidecar_path(engine_path)
    if not os.path.isfile(side):
        raise BackendError(
            f"{engine_path}: no sidecar {os.path.basename(side)} beside it, so its input size, threshold and "
            "build target are unknown; build engines with `python -m engines.build --format tensorrt`"
        )
    try:
        with open(side, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise BackendError(f"{side}: unreadable engine sidecar ({exc}); rebuild the engine") from exc
    if meta.get("format") != SIDECAR_FORMAT:
        raise BackendError(f"{side}: not a KDAS engine sidecar (format {meta.get('format')!r})")
    for key in ("input_size", "threshold", "precision", "gpu_name", "compute_capability", "tensorrt_version"):
        if key not in meta:
            raise BackendError(f"{side}: engine sidecar lacks {key!r}; rebuild the engine")
    return meta


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def compatibility_problem(meta: dict[str, Any], here: dict[str, Any]) -> str | None:
    """Why an engine built for `meta` cannot run `here` (None when it can). TensorRT engines are
    specific to the GPU architecture and the exact TensorRT version that built them."""
    problems = []
    if meta["tensorrt_version"] != here["tensorrt_version"]:
        problems.append(f"TensorRT {meta['tensorrt_version']} built it, this is TensorRT {here['tensorrt_version']}")
    if meta["compute_capability"] != here["compute_capability"]:
        problems.append(
            f"built for {meta['gpu_name']} (sm {meta['compute_capability']}), this GPU is "
            f"{here['gpu_name']} (sm {here['compute_capability']})"
        )
    return "; ".join(problems) or None
