"""ONNX Runtime backend. CPU always; CUDA / TensorRT execution providers when onnxruntime-gpu
is installed. Accepts an exported .onnx or a .safetensors checkpoint (exported once into the
cache, then reused)."""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from ..cache import cache_dir
from ..errors import BackendError
from ..export import INPUT_NAME, REVISION, export_onnx, read_onnx_metadata
from .base import Backend

log = logging.getLogger("engines")

GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")


def cached_onnx_for_checkpoint(ckpt: str, image_size: int | None = None, notes: list[str] | None = None) -> str:
    """ONNX export of a checkpoint in the cache (`<cache>/onnx/<sha256[:16]>-<size>-fp32-r<rev>.onnx`),
    exporting it on first use. The checkpoint's hash is in the name, so new weights never reuse
    a stale export."""
    from kdas_core.checkpoint import CheckpointError, file_sha256, read_metadata

    from .torch_backend import load_torch_checkpoint

    try:
        meta = read_metadata(ckpt)
    except CheckpointError as exc:
        raise BackendError(str(exc)) from exc
    size = int(image_size or meta["input_size"])
    sha = file_sha256(ckpt)
    path = os.path.join(cache_dir("onnx"), f"{sha[:16]}-{size}-fp32-r{REVISION}.onnx")
    notes = notes if notes is not None else []
    if os.path.isfile(path):
        try:
            if read_onnx_metadata(path)["source_sha256"] == sha:
                notes.append(f"reused cached ONNX export {path}")
                return path
        except BackendError:
            pass  # damaged cache entry: export again over it
    model, meta = load_torch_checkpoint(ckpt)
    t0 = time.perf_counter()
    log.info(f"exporting {ckpt} to ONNX once (cached in {os.path.dirname(path)}) ...")
    export_onnx(model, meta, path, image_size=size, source_sha256=sha, source_path=os.path.abspath(ckpt), log=log.info)
    notes.append(f"exported {ckpt} to ONNX cache {path} ({time.perf_counter() - t0:.1f} s, once per checkpoint and size)")
    return path


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        path: str,
        device: str | None = None,
        image_size: int | None = None,
        threads: int | None = None,
        graph_opt: str = "all",
        spin: bool | None = None,
    ):
        notes: list[str] = []
        source = path
        if path.endswith(".safetensors"):
            path = cached_onnx_for_checkpoint(path, image_size, notes)
        meta = read_onnx_metadata(path)
        if image_size and int(image_size) != meta["input_size"]:
            raise BackendError(
                f"{path}: exported for {meta['input_size']}x{meta['input_size']} frames, not {image_size}; "
                f"export again with `python -m engines.build --weights CKPT --out DIR --image-size {image_size}`"
            )
        super().__init__(path, meta["input_size"], meta["threshold"], meta)
        self.notes.extend(notes)
        self.source = source
        if graph_opt not in GRAPH_OPT_LEVELS:
            raise ValueError(f"graph_opt must be one of {GRAPH_OPT_LEVELS}, got {graph_opt!r}")
        env_threads = os.environ.get("KDAS_ORT_THREADS")
        self.threads = threads or (int(env_threads) if env_threads else None)
        self.graph_opt = graph_opt
        # Busy-waiting worker threads: ORT's default (on) is fastest on an idle machine; off is
        # better when other work competes for the cores (a GUI, a video decoder, other jobs).
        env_spin = os.environ.get("KDAS_ORT_SPIN")
        self.spin = spin if spin is not None else (env_spin != "0" if env_spin else None)
        self.providers = self._choose_providers(device)
        self._session = None
        self._input_name = INPUT_NAME
        if self.providers == ["CPUExecutionProvider"]:
            # CPU sessions are thread-agnostic: create now, so a bad file fails at load time.
            self._session = self._create_session()
        spin_text = "default" if self.spin is None else ("on" if self.spin else "off")
        self.notes.append(f"onnxruntime providers {self.providers}, threads {self.threads or 'default'}, graph opt {graph_opt}, spinning {spin_text}")

    def _choose_providers(self, device: str | None) -> list:
        have = available_providers()
        if device == "cpu" or device is None and not any(p in have for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")):
            return ["CPUExecutionProvider"]
        chosen: list = []
        if "TensorrtExecutionProvider" in have:
            # Engine + timing caches so the (minutes-long) TensorRT build happens once.
            trt_cache = cache_dir("ort-tensorrt")
            chosen.append(("TensorrtExecutionProvider", {
                "trt_engine_cache_enable": True, "trt_engine_cache_path": trt_cache,
                "trt_timing_cache_enable": True, "trt_timing_cache_path": trt_cache,
            }))
        if "CUDAExecutionProvider" in have:
            chosen.append("CUDAExecutionProvider")
        if not chosen:
            raise BackendError(
                f"{self.path}: device {device!r} asked for a GPU but onnxruntime has only {have}; "
                "install onnxruntime-gpu (extra [gpu]) or use device='cpu'"
            )
        return chosen + ["CPUExecutionProvider"]

    def _create_session(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.graph_opt]
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
            opts.inter_op_num_threads = 1
        if self.spin is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        opts.log_severity_level = 3  # warnings about unused initialisers etc. are noise for users
        try:
            session = ort.InferenceSession(self.path, opts, providers=self.providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise BackendError(
                f"{self.path}: onnxruntime cannot load this graph ({type(exc).__name__}: {exc}); "
                "export it again with `python -m engines.build`"
            ) from exc
        self._input_name = session.get_inputs()[0].name
        return session

    def _predict(self, frames: np.ndarray) -> np.ndarray:
        if self._session is None:
            self._session = self._create_session()
        (probs,) = self._session.run(None, {self._input_name: frames})
        return np.asarray(probs, dtype=np.float32)

    def close(self) -> None:
        self._session = None
