"""Build a TensorRT engine from an exported KDAS ONNX graph (TensorRT 10 and 11).

Precision comes from the graph, not from builder flags: the network is strongly typed (required
in TensorRT 11, which removed BuilderFlag.FP16/INT8), so an FP16 engine is built from an FP16
ONNX export (`engines.export`, precision="fp16") and an FP32 engine from an FP32 one.

One optimisation profile covers batch 1..max_batch; a timing cache per GPU/TensorRT version makes
rebuilds fast; a progress line is printed while the builder works (builds take minutes). The
engine file is named by its cache key and gets a JSON sidecar with everything a loader checks.

A new engine is *not* indexed in the cache: `publish_engine` does that after `--verify` passed
(and records `verified` in the sidecar), so `load_backend(checkpoint)` only ever picks up
engines that agreed with PyTorch.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

from kdas_core.io.atomic import write_bytes

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
    read_sidecar,
    sidecar_path,
    trt_logger,
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
    """Build, write `<out_dir>/<cache key>.engine` + `.json` sidecar (`verified: false`); returns
    the engine path. Not indexed in the cache until `publish_engine` (after a passing verify).
    BackendError for anything TensorRT refuses, with what TensorRT logged."""
    from kdas_core.io.checkpoint import file_sha256

    trt = import_trt()
    cudart = import_cudart()
    meta = read_onnx_metadata(onnx_path)
    size, precision = meta["input_size"], meta["precision"]
    dev = device_index(device)
    cuda_check(cudart.cudaSetDevice(dev), "cudaSetDevice")
    here = {**gpu_info(dev), "tensorrt_version": trt.__version__}
    if not 1 <= opt_batch <= max_batch:
        raise BackendError(f"optimisation batch {opt_batch} must lie in 1..{max_batch}")

    logger = trt_logger()
    mark = logger.recorder.mark()
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.path.abspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"{onnx_path}: TensorRT's ONNX parser refused the graph: {errors or logger.recorder.since(mark)}")

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

    timing_path = timing_cache_path(here)
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
        raise BackendError(f"{onnx_path}: TensorRT failed to build an engine: {logger.recorder.since(mark) or 'no message from TensorRT'}")
    seconds = time.perf_counter() - t0
    write_bytes(timing_path, bytes(config.get_timing_cache().serialize()))

    source_sha, onnx_sha = meta["source_sha256"] or file_sha256(onnx_path), file_sha256(onnx_path)
    key = engine_cache_key(model_id(meta["preset"], source_sha), here, precision, size, max_batch, meta["export_revision"], onnx_sha)
    engine_path = os.path.join(out_dir, key + ".engine")
    write_bytes(engine_path, bytes(serialized))
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
        "export_revision": meta["export_revision"],
        "onnx": os.path.abspath(onnx_path),
        "onnx_sha256": onnx_sha,
        "checkpoint": os.path.abspath(checkpoint or meta["source_path"]),
        "source_sha256": source_sha,
        "build_seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "verified": False,
    }
    # An index entry pointing at the file this build overwrites is stale until the new one is verified.
    unpublish(key, only_if_engine=engine_path)
    write_json_atomic(sidecar_path(engine_path), sidecar)
    log(f"built {engine_path} in {seconds:.0f} s")
    return engine_path


def model_id(preset: str, source_sha256: str) -> str:
    """The model part of an engine's cache key: preset and the checkpoint's hash."""
    return f"{preset}-{source_sha256[:12]}"


def index_path(key: str) -> str:
    """Where the cache index entry of engine `key` lives (`<cache>/tensorrt/<key>.json`)."""
    return os.path.join(cache_dir("tensorrt"), key + ".json")


def timing_cache_path(target: dict[str, Any]) -> str:
    """One timing cache per GPU model / SM count / TensorRT version, shared by every build there."""
    return os.path.join(cache_dir("tensorrt"), engine_cache_key("timing", target, "all", 0, 0, 0) + ".cache")


def publish_engine(engine_path: str, verification: dict[str, Any]) -> str:
    """After a passing verify: mark the sidecar `verified` (with the verify figures) and add the
    engine to the cache index, so `load_backend(checkpoint)` finds it. Returns the index path."""
    meta = read_sidecar(engine_path)
    meta = {**meta, "verified": True, "verification": verification}
    write_json_atomic(sidecar_path(engine_path), meta)
    entry = index_path(meta["cache_key"])
    write_json_atomic(entry, {**meta, "engine": os.path.abspath(engine_path)})
    return entry


def record_failed_verify(engine_path: str, verification: dict[str, Any]) -> None:
    """After a failed verify: the sidecar says so, and the cache index has no entry pointing at it."""
    meta = read_sidecar(engine_path)
    write_json_atomic(sidecar_path(engine_path), {**meta, "verified": False, "verification": verification})
    unpublish(meta["cache_key"], only_if_engine=engine_path)  # a verified engine elsewhere stays indexed


def unpublish(key: str, only_if_engine: str | None = None) -> None:
    """Remove the cache index entry `key` (only when it points at `only_if_engine`, if given)."""
    import json

    entry = index_path(key)
    if not os.path.exists(entry):
        return
    if only_if_engine is not None:
        try:
            with open(entry, encoding="utf-8") as f:
                target = json.load(f).get("engine", "")
        except (OSError, ValueError):
            target = only_if_engine  # unreadable: remove it
        if os.path.abspath(target) != os.path.abspath(only_if_engine):
            return
    os.remove(entry)


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


