"""What the TensorRT builder and the TensorRT backend share: guarded imports, CUDA error checks,
GPU identity, engine cache keys and the JSON sidecar.

TensorRT and cuda-bindings are optional (extras `[trt-cu12]` / `[trt-cu13]`, pick by driver);
nothing here imports them at module import time, so the rest of `engines` works without them.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import threading
from typing import Any

from kdas_core.io.atomic import write_json

from .cache import engine_cache_key  # noqa: F401 (re-exported: builder and tests name it here)
from .errors import BackendError

SIDECAR_FORMAT = "kdas-trt/2"  # 2: SM count, export revision, max batch in the key; `verified`
# The CUDA major of the runtime must not exceed what the driver supports: a CUDA 13 runtime
# (tensorrt-cu13, cuda-bindings 13) needs a CUDA 13 driver (580+); a CUDA 12 driver (525+) takes the cu12 builds.
TRT_EXTRAS = {12: "trt-cu12", 13: "trt-cu13"}
INSTALL_HINT = (
    "install the TensorRT extra matching your driver's CUDA version (`nvidia-smi` shows it): "
    "pip install -e '.[trt-cu12]' for a CUDA 12 driver, '.[trt-cu13]' for CUDA 13"
)


NO_GPU_REASON = "no NVIDIA GPU on this machine (TensorRT needs one)"


def has_nvidia_gpu() -> bool:
    """Whether an NVIDIA driver is present (Linux /proc entry, or nvidia-smi on the PATH), without
    importing CUDA: the TensorRT install hint is only worth saying to users who have such a GPU."""
    import shutil

    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def recommended_extra(driver_version: int) -> str | None:
    """The extra whose CUDA runtime this driver can run (`cudaDriverGetVersion` number, e.g.
    12040 for CUDA 12.4); the newest one it supports; None when the driver is older than CUDA 12."""
    major = int(driver_version) // 1000
    fitting = [m for m in TRT_EXTRAS if m <= major]
    return TRT_EXTRAS[max(fitting)] if fitting else None


def format_cuda_version(version: int) -> str:
    """12040 -> '12.4' (CUDA's encoding: 1000*major + 10*minor); 0 -> 'none'."""
    return f"{version // 1000}.{(version % 1000) // 10}" if version else "none"


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


class CudaError(BackendError):
    """A failed CUDA runtime call; `sticky` when the CUDA context of this process is now unusable."""

    def __init__(self, message: str, code_name: str = ""):
        super().__init__(message)
        self.code_name = code_name
        self.sticky = is_sticky_cuda_error(self)


# Errors after which every CUDA call of this process fails (the context is corrupt): only a new
# process gets the GPU back. Names as cudaError_t spells them, plus the words CUDA, PyTorch and
# ONNX Runtime put in their messages for them.
STICKY_CUDA_PATTERNS = (
    "cudaErrorIllegalAddress", "illegal memory access", "CUDA_ERROR_ILLEGAL_ADDRESS",
    "cudaErrorLaunchFailure", "unspecified launch failure", "CUDA_ERROR_LAUNCH_FAILED",
    "cudaErrorHardwareStackError", "hardware stack error",
    "cudaErrorIllegalInstruction", "illegal instruction",
    "cudaErrorMisalignedAddress", "misaligned address",
    "cudaErrorInvalidAddressSpace", "cudaErrorInvalidPc", "invalid program counter",
    "cudaErrorLaunchTimeout", "the launch timed out",
    "cudaErrorECCUncorrectable", "uncorrectable ECC error",
    "cudaErrorAssert", "device-side assert",
)


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """True when `exc` (from our CUDA calls, TensorRT, torch or onnxruntime, or anything it was
    raised from) reports an error that leaves this process's CUDA context unusable."""
    seen = 0
    while exc is not None and seen < 8:
        if getattr(exc, "sticky", False):
            return True
        text = f"{getattr(exc, 'code_name', '')} {exc}".lower()
        if any(p.lower() in text for p in STICKY_CUDA_PATTERNS):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def cuda_check(result: Any, what: str):
    """Unwrap a cuda-python `(err, *values)` tuple; CudaError with CUDA's own words on failure."""
    cudart = import_cudart()
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if err != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(err)
        detail = text.decode() if isinstance(text, bytes) else str(text)
        name = getattr(err, "name", str(err))
        raise CudaError(f"CUDA error in {what}: {name} ({detail})", name)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def cuda_versions() -> dict[str, Any]:
    """Driver and runtime CUDA versions as numbers (12040 = 12.4) and text, plus the
    cuda-bindings version; the driver number is 0 when no NVIDIA driver is installed."""
    cudart = import_cudart()
    err, driver = cudart.cudaDriverGetVersion()
    driver = int(driver) if err == cudart.cudaError_t.cudaSuccess else 0
    err, runtime = cudart.cudaRuntimeGetVersion()
    runtime = int(runtime) if err == cudart.cudaError_t.cudaSuccess else 0
    return {
        "driver": driver, "runtime": runtime,
        "driver_text": format_cuda_version(driver), "runtime_text": format_cuda_version(runtime),
        "cuda_bindings": dist_version("cuda-bindings") or dist_version("cuda-python") or "?",
    }


def driver_mismatch_hint(versions: dict[str, Any]) -> str:
    """Words for a driver/runtime mismatch: which versions, and which extra to install instead."""
    driver, runtime = versions["driver"], versions["runtime"]
    where = (f"CUDA driver {versions['driver_text']}, CUDA runtime {versions['runtime_text']} "
             f"(cuda-bindings {versions['cuda_bindings']})")
    if not driver:
        return f"{where}: no NVIDIA driver found; install one (CUDA 12 or newer)"
    if runtime and runtime // 1000 > driver // 1000:
        extra = recommended_extra(driver)
        fix = f"install the [{extra}] extra instead" if extra else "update the NVIDIA driver (CUDA 12 or newer)"
        return f"{where}: this runtime needs a CUDA {runtime // 1000} driver; {fix}, or update the driver"
    return where


def dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def gpu_info(device: int = 0) -> dict[str, Any]:
    """Name, compute capability and SM count of CUDA device `device` (BackendError when there is
    none, naming the driver and runtime versions)."""
    cudart = import_cudart()
    try:
        count = cuda_check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except CudaError as exc:
        raise BackendError(f"{exc}; {driver_mismatch_hint(cuda_versions())}") from exc
    if not count:
        raise BackendError(f"no NVIDIA GPU visible to CUDA ({driver_mismatch_hint(cuda_versions())})")
    if device >= count:
        raise BackendError(f"CUDA device {device} asked for, but only {count} visible")
    prop = cuda_check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return {"gpu_name": name.strip(), "compute_capability": f"{prop.major}.{prop.minor}", "sm_count": int(prop.multiProcessorCount)}


class LogRecorder:
    """Thread-safe ring buffer of (severity, message) lines, so errors can quote what TensorRT said."""

    def __init__(self, keep: int = 200):
        self._lines: collections.deque = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        self._count = 0

    def add(self, severity: str, msg: str) -> None:
        with self._lock:
            self._lines.append((severity, str(msg).strip()))
            self._count += 1

    def mark(self) -> int:
        """A position; `since(mark)` returns what was logged after it."""
        with self._lock:
            return self._count

    def since(self, mark: int, severities: tuple[str, ...] = ("INTERNAL_ERROR", "ERROR", "WARNING")) -> str:
        with self._lock:
            new = list(self._lines)[max(0, len(self._lines) - (self._count - mark)):]
        return " | ".join(m for sev, m in new if sev in severities)


_LOGGER = None
_LOGGER_LOCK = threading.Lock()


def trt_logger():
    """The process's one TensorRT logger (TensorRT expects a single logger for every builder and
    runtime): prints warnings and errors to stderr as TensorRT's own logger does, and keeps them in
    `.recorder` for error messages."""
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            trt = import_trt()

            class _Logger(trt.ILogger):
                def __init__(self):
                    trt.ILogger.__init__(self)
                    self.recorder = LogRecorder()
                    self.print_at = int(trt.ILogger.Severity.WARNING)  # INTERNAL_ERROR 0 ... VERBOSE 4
                    self.keep_at = int(trt.ILogger.Severity.INFO)

                def log(self, severity, msg):
                    level = int(severity)
                    if level > self.keep_at:
                        return  # VERBOSE: thousands of lines per build
                    name = getattr(severity, "name", str(severity))
                    self.recorder.add(name, msg)
                    if level <= self.print_at:
                        print(f"[TensorRT] {name}: {msg}", file=sys.stderr, flush=True)

            _LOGGER = _Logger()
        return _LOGGER


def device_index(device: str | None) -> int:
    if device in (None, "cuda"):
        return 0
    m = re.fullmatch(r"cuda:(\d+)", device)
    if not m:
        raise BackendError(f"TensorRT needs a CUDA device ('cuda' or 'cuda:N'), not {device!r}")
    return int(m.group(1))


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
        raise BackendError(
            f"{side}: not a current KDAS engine sidecar (format {meta.get('format')!r}, expected {SIDECAR_FORMAT!r}); "
            "rebuild the engine with `python -m engines.build --format tensorrt`"
        )
    for key in ("input_size", "threshold", "precision", "gpu_name", "compute_capability", "sm_count", "tensorrt_version", "max_batch", "export_revision"):
        if key not in meta:
            raise BackendError(f"{side}: engine sidecar lacks {key!r}; rebuild the engine")
    return meta


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    """Sidecars and index entries: sorted keys, so two builds of one engine give one file."""
    write_json(path, data, sort_keys=True)


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
    if "export_revision" in here and int(meta["export_revision"]) != int(here["export_revision"]):
        problems.append(f"built from export revision {meta['export_revision']}, this code exports revision {here['export_revision']}")
    return "; ".join(problems) or None
