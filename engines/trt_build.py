"""Build a TensorRT engine from an exported KDAS ONNX graph (TensorRT 10 and 11).

Precision comes from the graph, not from builder flags: the network is strongly typed (required
in TensorRT 11, which removed BuilderFlag.FP16/INT8), so an FP16 engine is built from an FP16
ONNX export (`engines.export`, precision="fp16") and an FP32 engine from an FP32 one.

One optimisation profile covers batch 1..max_batch; a timing cache per GPU/TensorRT version makes
rebuilds fast; a progress line is printed while the builder works (builds take minutes). The
engine file is named by its cache key and gets a JSON sidecar with everything a loader checks.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from .cache import cache_dir
from .errors import BackendError
from .export import read_onnx_metadata
from .trt_common import (
    SIDECAR_FORMAT,
    cuda_check,
    device_index,
    engine_cache_key,
    gpu_info,
    import_cudart,
    import_trt,
    sidecar_path,
    write_json_atomic,
)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_engine(
    onnx_path: str,
    out_dir: str,
    *,
    max_batch: int = 4,
    opt_batch: int = 1,
    workspace_mib: int | None = None,
    device: str | None = None,
    checkpoint: str | None = None,
    log: Callable[[str], None] = _stderr,
) -> str:
    """Build, write `<out_dir>/<cache key>.engine` + `.json` sidecar, index it in the cache; returns
    the engine path. BackendError for anything TensorRT refuses."""
    from kdas_core.checkpoint import file_sha256

    trt = import_trt()
    cudart = import_cudart()
    meta = read_onnx_metadata(onnx_path)
    size, precision = meta["input_size"], meta["precision"]
    dev = device_index(device)
    cuda_check(cudart.cudaSetDevice(dev), "cudaSetDevice")
    here = {**gpu_info(dev), "tensorrt_version": trt.__version__}
    if not 1 <= opt_batch <= max_batch:
        raise BackendError(f"optimisation batch {opt_batch} must lie in 1..{max_batch}")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.path.abspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"{onnx_path}: TensorRT's ONNX parser refused the graph: {errors}")

    config = builder.create_builder_config()
    if workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None and precision == "fp32":
        config.clear_flag(tf32)  # keep FP32 engines within the 1e-3 parity bound

    inp = network.get_input(0)
    profile = builder.create_optimization_profile()
    frame = (size, size, 3)
    profile.set_shape(inp.name, (1, *frame), (opt_batch, *frame), (max_batch, *frame))
    config.add_optimization_profile(profile)

    timing_path = os.path.join(
        cache_dir("tensorrt"), engine_cache_key("timing", here["gpu_name"], here["compute_capability"], here["tensorrt_version"], "all", 0) + ".cache"
    )
    timing_blob = open(timing_path, "rb").read() if os.path.isfile(timing_path) else b""
    timing_cache = config.create_timing_cache(timing_blob)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)

    monitor = _progress_monitor(trt, log)
    if monitor is not None:
        config.progress_monitor = monitor
    log(
        f"building TensorRT {here['tensorrt_version']} engine for {here['gpu_name']} (sm {here['compute_capability']}): "
        f"{meta['preset']} {size}x{size} {precision}, batch 1-{max_batch}"
        + (" (timing cache warm)" if timing_blob else " (cold timing cache: this takes minutes)")
    )
    t0 = time.perf_counter()
    with _ticker(log, t0):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    seconds = time.perf_counter() - t0
    _write_bytes(timing_path, bytes(config.get_timing_cache().serialize()))

    source_sha = meta["source_sha256"] or file_sha256(onnx_path)
    key = engine_cache_key(f"{meta['preset']}-{source_sha[:12]}", here["gpu_name"], here["compute_capability"], here["tensorrt_version"], precision, size)
    engine_path = os.path.join(out_dir, key + ".engine")
    _write_bytes(engine_path, bytes(serialized))
    sidecar: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "cache_key": key,
        **here,
        "precision": precision,
        "input_size": size,
        "threshold": meta["threshold"],
        "mean": meta["mean"],
        "std": meta["std"],
        "preset": meta["preset"],
        "min_batch": 1,
        "opt_batch": opt_batch,
        "max_batch": max_batch,
        "onnx": os.path.abspath(onnx_path),
        "onnx_sha256": file_sha256(onnx_path),
        "checkpoint": os.path.abspath(checkpoint or meta["source_path"]),
        "source_sha256": source_sha,
        "build_seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(sidecar_path(engine_path), sidecar)
    # Index entry: lets load_backend(checkpoint) find this engine on this GPU/TensorRT.
    write_json_atomic(os.path.join(cache_dir("tensorrt"), key + ".json"), {**sidecar, "engine": os.path.abspath(engine_path)})
    log(f"built {engine_path} in {seconds:.0f} s")
    return engine_path


def _network_flags(trt) -> int:
    """Strongly typed network: opt-in on TensorRT 10, always on (flag accepted or gone) on 11."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _progress_monitor(trt, log: Callable[[str], None]):
    """TensorRT's IProgressMonitor, reporting top-level phases (None where the API is absent)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):
        def __init__(self):
            base.__init__(self)
            self._depth: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            depth = 0 if parent_phase is None else self._depth.get(parent_phase, 0) + 1
            self._depth[phase_name] = depth
            if depth == 0:
                log(f"  phase: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            self._depth.pop(phase_name, None)

    return _Monitor()


class _ticker:
    """A line every 15 s while the builder runs, so a multi-minute build never looks hung."""

    def __init__(self, log: Callable[[str], None], t0: float, every: float = 15.0):
        self.log, self.t0, self.every = log, t0, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.log(f"  still building ... {time.perf_counter() - self.t0:.0f} s")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
