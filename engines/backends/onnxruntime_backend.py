"""ONNX Runtime backend. CPU always; CUDA / TensorRT execution providers when onnxruntime-gpu
is installed. Accepts an exported .onnx or a .safetensors checkpoint (exported once into the
cache, then reused).

ONNX Runtime quietly runs on CPU when a GPU provider fails to load (missing CUDA/cuDNN
libraries, or `onnxruntime` and `onnxruntime-gpu` installed side by side, which share one
package folder and lose the CUDA provider). The session's *active* providers are therefore
checked after creation: a GPU that was asked for and is not used is an error naming the cause;
with device=None it is a note."""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from ..cache import cache_dir
from ..errors import BackendError
from ..export import INPUT_NAME, REVISION, export_onnx, read_onnx_metadata
from ..source import ModelSource
from .base import Backend

log = logging.getLogger("engines")

GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")


def cached_onnx_for_checkpoint(ckpt: "str | ModelSource", image_size: int | None = None, notes: list[str] | None = None, precision: str = "fp32") -> str:
    """ONNX export of a checkpoint in the cache (`<cache>/onnx/<sha256[:16]>-<size>-<precision>-r<rev>.onnx`),
    exporting it on first use. The checkpoint's hash and the export revision are in the name, so
    new weights or a changed exporter never reuse a stale export."""
    return cached_onnx_export(ModelSource.of(ckpt, "checkpoint"), image_size, notes, precision).path


def cached_onnx_export(src: ModelSource, image_size: int | None = None, notes: list[str] | None = None, precision: str = "fp32") -> ModelSource:
    """cached_onnx_for_checkpoint for a resolved checkpoint: its metadata and hash are reused, and
    the export (with its metadata) is remembered in `src.exports`, so asking again costs nothing."""
    from .torch_backend import load_torch_checkpoint

    size = int(image_size or src.meta["input_size"])
    notes = notes if notes is not None else []
    known = src.exports.get((size, precision))
    if known is None:
        known = find_cached_export(src, size, precision)
        if known is not None:
            notes.append(f"reused cached ONNX export {known.path}")
    if known is not None and os.path.isfile(known.path):
        return known
    sha = src.sha256
    path = _export_cache_path(sha, size, precision)
    model, meta = load_torch_checkpoint(src.path)
    t0 = time.perf_counter()
    log.info(f"exporting {src.path} to ONNX once (cached in {os.path.dirname(path)}) ...")
    export_onnx(model, meta, path, image_size=size, precision=precision, source_sha256=sha, source_path=os.path.abspath(src.path), log=log.info)
    notes.append(f"exported {src.path} to ONNX cache {path} ({time.perf_counter() - t0:.1f} s, once per checkpoint and size)")
    known = src.exports[(size, precision)] = ModelSource(path, "onnx")
    return known


def _export_cache_path(sha256: str, size: int, precision: str) -> str:
    return os.path.join(cache_dir("onnx"), f"{sha256[:16]}-{size}-{precision}-r{REVISION}.onnx")


def find_cached_export(src: ModelSource, size: int, precision: str = "fp32") -> ModelSource | None:
    """The valid cached export of checkpoint `src` at `size` and `precision` when there is one,
    without exporting (None when absent or damaged: cached_onnx_export then exports over it)."""
    known = src.exports.get((int(size), precision))
    if known is not None and os.path.isfile(known.path):
        return known
    sha = src.sha256
    path = _export_cache_path(sha, int(size), precision)
    if not os.path.isfile(path):
        return None
    try:
        cached = read_onnx_metadata(path)
    except BackendError:
        return None
    if cached["source_sha256"] != sha or cached["export_revision"] != REVISION or cached["precision"] != precision:
        return None
    known = src.exports[(int(size), precision)] = ModelSource(path, "onnx", meta=cached)
    return known


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def ort_install_problem() -> str | None:
    """Why this onnxruntime install cannot use a GPU reliably (None when it looks fine): the CPU
    and GPU wheels both installed (they overwrite each other's files and the CUDA provider is lost)."""
    from importlib import metadata

    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            installed.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    if len(installed) == 2:
        return (f"both {installed[0]} and {installed[1]} are installed; they share the onnxruntime package folder "
                "and the CUDA provider is lost. Fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    return None


def provider_names(providers: list) -> list[str]:
    """Provider names of an ORT providers list whose entries are names or (name, options)."""
    return [p[0] if isinstance(p, tuple) else p for p in providers]


def cuda_device_id(device: str | None) -> int:
    """'cuda' / None -> 0, 'cuda:N' -> N (ORT's `device_id` provider option)."""
    if device in (None, "cuda"):
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise BackendError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {device!r}")


def gpu_provider_options(have: list[str], device: str | None, trt_fp16: bool, cache: str, use_trt: bool = True) -> list:
    """ONNX Runtime providers (with options) for a GPU session on `device`, CPU last; ORT's
    TensorRT provider first when available and `use_trt`."""
    dev = cuda_device_id(device)
    chosen: list = []
    if use_trt and "TensorrtExecutionProvider" in have:
        # Engine + timing caches so the (minutes-long) TensorRT build happens once per graph/GPU.
        chosen.append(("TensorrtExecutionProvider", {
            "device_id": dev, "trt_fp16_enable": bool(trt_fp16),
            "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
        }))
    if "CUDAExecutionProvider" in have:
        chosen.append(("CUDAExecutionProvider", {"device_id": dev}))
    return chosen + ["CPUExecutionProvider"] if chosen else []


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    why_auto = "ONNX Runtime runs the fused, graph-optimised export; on CPU it beats PyTorch eager"

    def __init__(
        self,
        path: "str | ModelSource",
        device: str | None = None,
        image_size: int | None = None,
        threads: int | None = None,
        graph_opt: str = "all",
        spin: bool | None = None,
        trt_fp16: bool | None = None,
        ort_tensorrt: bool | None = None,
    ):
        notes: list[str] = []
        src = ModelSource.of(path, "checkpoint" if str(path).endswith(".safetensors") else "onnx")
        source = src.path
        if src.kind == "checkpoint":
            src = cached_onnx_export(src, image_size, notes)
        path, meta = src.path, src.meta
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
        # FP16 in ORT's TensorRT provider (for an fp32 graph): asked for, or KDAS_ORT_TRT_FP16=1.
        self.trt_fp16 = trt_fp16 if trt_fp16 is not None else os.environ.get("KDAS_ORT_TRT_FP16") == "1"
        # ORT's own TensorRT provider (before CUDA) unless turned off, or KDAS_ORT_TRT=0.
        self.ort_tensorrt = ort_tensorrt if ort_tensorrt is not None else os.environ.get("KDAS_ORT_TRT", "1") != "0"
        self.device = device
        self.active_providers: list[str] | None = None  # what the session really runs (after creation)
        self.providers = self._choose_providers(device)
        self._session = None
        self._input_name = INPUT_NAME
        if self.providers == ["CPUExecutionProvider"]:
            # CPU sessions are thread-agnostic: create now, so a bad file fails at load time.
            self._session = self._create_session()
        spin_text = "default" if self.spin is None else ("on" if self.spin else "off")
        names = provider_names(self.providers)
        self.notes.append(f"onnxruntime providers {names}{' (TensorRT fp16)' if self.trt_fp16 and 'TensorrtExecutionProvider' in names else ''}, threads {self.threads or 'default'}, graph opt {graph_opt}, spinning {spin_text}")

    def _choose_providers(self, device: str | None) -> list:
        have = available_providers()
        if device == "cpu" or device is None and not any(p in have for p in GPU_PROVIDERS):
            return ["CPUExecutionProvider"]
        chosen = gpu_provider_options(have, device, self.trt_fp16, cache_dir("ort-tensorrt"), self.ort_tensorrt)
        if not chosen:
            problem = ort_install_problem()
            raise BackendError(
                f"{self.path}: device {device!r} asked for a GPU but onnxruntime has only {have}; "
                + (problem if problem else "install onnxruntime-gpu (extra [gpu], see the README) or use device='cpu'")
            )
        if chosen[0][0] == "TensorrtExecutionProvider":
            self.notes.append(
                "onnxruntime's TensorRT provider builds an engine on the first run (minutes); "
                f"it is cached in {cache_dir('ort-tensorrt')} for the next runs"
            )
        return chosen

    def _check_active(self, session) -> None:
        """ORT falls back to CPU without a word when a GPU provider fails to load: say what runs."""
        active = list(session.get_providers())
        self.active_providers = active
        asked_gpu = [p for p in provider_names(self.providers) if p in GPU_PROVIDERS]
        if not asked_gpu or any(p in active for p in GPU_PROVIDERS):
            return
        problem = ort_install_problem() or "the CUDA/cuDNN libraries onnxruntime-gpu needs did not load (see ONNX Runtime's log)"
        text = f"onnxruntime was asked for {asked_gpu} but runs on {active}: {problem}"
        if self.device is not None:  # a GPU was explicitly asked for
            raise BackendError(f"{self.path}: {text}")
        self.notes.append(text)
        log.warning(text)

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
        self._check_active(session)
        return session

    def _predict(self, frames: np.ndarray) -> np.ndarray:
        if self._session is None:
            self._session = self._create_session()
        (probs,) = self._session.run(None, {self._input_name: frames})
        return np.asarray(probs, dtype=np.float32)

    def close(self) -> None:
        self._session = None
