"""TensorRT backend: a serialized engine built by `python -m engines.build --format tensorrt`.

Buffers and streams use cuda-python (`cuda.bindings.runtime`), not pycuda. Pinned host buffers,
device buffers and one stream, sized for the engine's largest profile batch (bigger batches run in
chunks). With CUDA graphs, each batch size gets its own execution context and graph: a graph
replays the shape-dependent state of the context it was captured on, so one context must never
serve graphs of several shapes.

Every CUDA/TensorRT object is created by the first `predict`, in the thread that calls it:
construct anywhere, then predict from one worker thread (a call from another thread rebuilds
those objects there, with a note, rather than sharing them across threads).
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Callable

import numpy as np

from ..cache import cache_dir
from ..errors import BackendError
from ..trt_common import (
    compatibility_problem,
    cuda_check,
    device_index,
    gpu_info,
    import_cudart,
    import_trt,
    read_sidecar,
    trt_logger,
)
from .. import trt_common
from ..source import ModelSource
from .base import Backend

__all__ = ["TensorRTBackend", "why_unavailable", "find_cached_engine", "read_sidecar", "current_target"]


def why_unavailable(device: str | None = None) -> str | None:
    """None when TensorRT, cuda-python and a GPU are all here; else the reason, in words."""
    try:
        import_trt()
        import_cudart()
        gpu_info(device_index(device))
    except BackendError as exc:
        return str(exc)
    return None


def unavailable_reason(device: str | None = None) -> str | None:
    """`why_unavailable` as a user is told it: on a machine without an NVIDIA GPU only that
    (installing TensorRT would not help), otherwise the reason with its install hint."""
    reason = why_unavailable(device)
    if reason and not trt_common.has_nvidia_gpu():
        return trt_common.NO_GPU_REASON
    return reason


def current_target(device: str | None = None) -> dict:
    """GPU name, compute capability, SM count, TensorRT version and export revision of this
    machine and code (what an engine must match)."""
    from ..export import REVISION

    trt = import_trt()
    return {**gpu_info(device_index(device)), "tensorrt_version": trt.__version__, "export_revision": REVISION}


def find_cached_engine(path: "str | ModelSource", image_size: int | None = None, device: str | None = None, notes: list[str] | None = None) -> str:
    """A prebuilt, verified engine for checkpoint/ONNX `path` on this GPU + TensorRT, found through
    the cache index that `engines.build` writes after a passing `--verify`. BackendError (with the
    build command) when there is none. A ModelSource's metadata and hash are reused, not re-read.

    An engine is the graph it was built from: for an ONNX source, that file; for a checkpoint,
    its cached export at the engine's size and precision (the one `engines.build` copies and the
    onnxruntime backend runs). An engine built from another export of the same checkpoint and
    export revision does not match."""
    src = ModelSource.of(path)
    meta = src.meta
    size = int(image_size or meta["input_size"])
    if src.kind == "onnx":
        sha = meta["source_sha256"]

        def onnx_sha(precision: str) -> str | None:
            return src.sha256
    else:
        from .onnxruntime_backend import find_cached_export

        sha = src.sha256

        def onnx_sha(precision: str) -> str | None:
            export = find_cached_export(src, size, precision)
            return export.sha256 if export is not None else None
    here = current_target(device)
    engine, skipped = pick_indexed_engine(cache_dir("tensorrt"), meta["preset"], sha, here, size, onnx_sha)
    if notes is not None:
        notes.extend(skipped)
    if engine:
        return engine
    raise BackendError(
        f"{src.path}: no TensorRT engine built for {here['gpu_name']} / TensorRT {here['tensorrt_version']} at {size}x{size}; "
        f"build one (takes minutes): python -m engines.build --weights {src.path} --out engines-out --format tensorrt --precision fp16 --verify"
        + (f" ({'; '.join(skipped)})" if skipped else "")
    )


def pick_indexed_engine(index_dir: str, preset: str, source_sha256: str, here: dict, size: int,
                        onnx_sha256: "str | Callable[[str], str | None] | None" = None) -> tuple[str | None, list[str]]:
    """(engine path or None, reasons entries were passed over) from the cache index: entries whose
    key matches this model, GPU (incl. SM count), TensorRT, export revision and size, whose engine
    file and sidecar still exist, and whose ONNX hash is `onnx_sha256` (a hash, or a function of
    the engine's precision giving the expected hash, None when no export is known; None: not
    checked). Verified engines first, then fp16 before fp32, then the largest max batch."""
    import json

    expected = onnx_sha256 if callable(onnx_sha256) or onnx_sha256 is None else (lambda precision: onnx_sha256)
    candidates, skipped = [], []
    for name in sorted(os.listdir(index_dir)) if os.path.isdir(index_dir) else []:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(index_dir, name), encoding="utf-8") as f:
                entry = json.load(f)
            if entry.get("source_sha256") != source_sha256 or entry.get("preset") != preset:
                continue  # another model's engine
            engine = entry["engine"]
            side = read_sidecar(engine)  # the engine's own sidecar is the authority, not the index copy
        except (OSError, ValueError, KeyError, BackendError) as exc:
            skipped.append(f"index entry {name} skipped: {exc}")
            continue
        if int(side["input_size"]) != size or int(side["sm_count"]) != int(here["sm_count"]) or compatibility_problem(side, here):
            continue  # built for another size, GPU, TensorRT or export revision
        if expected is not None:
            want = expected(side["precision"])
            if want is None:
                skipped.append(f"{engine} skipped: the {side['precision']} ONNX export it was built from is no longer in the "
                               "ONNX cache, so nothing shows the engine is this checkpoint's current graph; rebuild it")
                continue
            if side.get("onnx_sha256") != want:
                skipped.append(f"{engine} skipped: built from another ONNX file (hash differs)")
                continue
        candidates.append((not side.get("verified", False), side["precision"] != "fp16", -int(side["max_batch"]), engine))
    if not candidates:
        return None, skipped
    best = min(candidates)
    if best[0]:
        skipped.append(f"{best[3]}: no verified engine indexed; using an unverified one")
    return best[3], skipped


class TensorRTBackend(Backend):
    name = "tensorrt"
    why_auto = "a TensorRT engine built for this GPU is the fastest option"

    def __init__(self, path: "str | ModelSource", device: str | None = None, cuda_graph: bool | None = None, **_ignored):
        src = ModelSource.of(path, "engine")
        path = src.path
        if not os.path.isfile(path):
            raise BackendError(f"{path}: no such TensorRT engine file")
        meta = src.meta  # the sidecar
        super().__init__(path, meta["input_size"], meta["threshold"], meta)
        self.device = device_index(device)
        here = current_target(device)
        problem = compatibility_problem(meta, here)
        if problem:
            raise BackendError(
                f"{path}: this engine cannot run here: {problem}. Engines are tied to the GPU and TensorRT "
                f"version that built them; rebuild with `python -m engines.build --weights CKPT --out DIR --format tensorrt`"
            )
        if meta["gpu_name"] != here["gpu_name"] or int(meta["sm_count"]) != int(here["sm_count"]):
            self.notes.append(
                f"engine built on {meta['gpu_name']} ({meta['sm_count']} SMs), running on {here['gpu_name']} "
                f"({here['sm_count']} SMs): same architecture, but its tactics were tuned for the other GPU; rebuild for best speed"
            )
        if not meta.get("verified", False):
            self.notes.append("this engine was not verified against PyTorch (build it with --verify)")
        if cuda_graph is None:
            cuda_graph = os.environ.get("KDAS_TRT_CUDA_GRAPH", "0") == "1"
        self.use_cuda_graph = bool(cuda_graph)
        self.max_batch = int(meta["max_batch"])
        self._state: _TrtState | None = None
        self.notes.append(
            f"tensorrt {here['tensorrt_version']} on {here['gpu_name']}, {meta['precision']}, batch 1-{self.max_batch}"
            + (", CUDA graphs" if self.use_cuda_graph else "")
        )

    def _predict(self, frames: np.ndarray) -> np.ndarray:
        if self._state is not None and self._state.thread != threading.get_ident():
            # Another inference thread now: rebuild engine/stream/buffers there (costs a reload).
            self._state.release()
            self._state = None
            self.notes.append("tensorrt state re-created for a new inference thread; keep predict() on one thread to avoid this")
        if self._state is None:
            self._state = _TrtState.create(self.path, self.device, self.max_batch, self.use_cuda_graph)
        outs = [self._state.run(frames[i : i + self.max_batch]) for i in range(0, len(frames), self.max_batch)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def close(self) -> None:
        if self._state is not None:
            self._state.release()
            self._state = None


class _TrtState:
    """Engine, contexts, stream, buffers and graphs of one inference thread."""

    @classmethod
    def create(cls, path: str, device: int, max_batch: int, use_cuda_graph: bool) -> "_TrtState":
        state = cls.__new__(cls)
        try:
            state.__init__(path, device, max_batch, use_cuda_graph)
        except BaseException:
            state.release()  # free whatever was allocated before the failure
            raise
        return state

    def __init__(self, path: str, device: int, max_batch: int, use_cuda_graph: bool):
        trt = import_trt()
        # batch size -> (its own execution context, the graph captured on it)
        self.graphs: dict[int, tuple[object, object]] = {}
        self._device_ptrs: list[int] = []
        self._host_ptrs: list[int] = []
        self.stream = None
        self.cudart = cudart = import_cudart()
        self.thread = threading.get_ident()
        self.use_cuda_graph = use_cuda_graph
        cuda_check(cudart.cudaSetDevice(device), "cudaSetDevice")
        self.logger = trt_logger()  # the process's one TensorRT logger
        mark = self.logger.recorder.mark()
        self.runtime = trt.Runtime(self.logger)
        with open(path, "rb") as f:
            blob = f.read()
        self.engine = self.runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            said = self.logger.recorder.since(mark) or "no message from TensorRT"
            raise BackendError(f"{path}: TensorRT could not deserialize this engine ({said}); rebuild it for this GPU/TensorRT")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{path}: TensorRT could not create an execution context ({self.logger.recorder.since(mark)})")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError(f"{path}: expected 1 input and 1 output tensor, engine has {inputs} -> {outputs}")
        self.in_name, self.out_name = inputs[0], outputs[0]
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.in_name)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.out_name)))
        in_shape = tuple(self.engine.get_tensor_shape(self.in_name))  # (-1, S, S, 3)
        self.frame_shape = tuple(int(d) for d in in_shape[1:])
        self.out_frame_shape = tuple(int(d) for d in self.engine.get_tensor_shape(self.out_name))[1:]
        self.max_batch = max_batch
        self.stream = cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.h_in, self.d_in = self._alloc(self.in_dtype, (max_batch, *self.frame_shape))
        self.h_out, self.d_out = self._alloc(self.out_dtype, (max_batch, *self.out_frame_shape))
        self._bind(self.context)

    def _bind(self, context) -> None:
        # Fixed addresses: valid for every batch size (buffers are sized for max_batch).
        for name, ptr in ((self.in_name, self.d_in), (self.out_name, self.d_out)):
            if context.set_tensor_address(name, ptr) is False:  # C++ returns bool; be explicit about False only
                raise BackendError(f"TensorRT refused the buffer address of {name!r}")

    def _alloc(self, dtype: np.dtype, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        host_ptr = cuda_check(self.cudart.cudaMallocHost(nbytes), "cudaMallocHost")
        self._host_ptrs.append(host_ptr)
        dev_ptr = cuda_check(self.cudart.cudaMalloc(nbytes), "cudaMalloc")
        self._device_ptrs.append(dev_ptr)
        raw = (ctypes.c_byte * nbytes).from_address(host_ptr)
        host = np.frombuffer(raw, dtype=dtype).reshape(shape)  # a numpy view of pinned memory
        return host, dev_ptr

    def run(self, frames: np.ndarray) -> np.ndarray:
        cudart, n = self.cudart, len(frames)
        kind = cudart.cudaMemcpyKind
        self.h_in[:n] = frames
        in_bytes = n * self.h_in[0].nbytes
        out_bytes = n * self.h_out[0].nbytes
        cuda_check(cudart.cudaMemcpyAsync(self.d_in, self.h_in.ctypes.data, in_bytes, kind.cudaMemcpyHostToDevice, self.stream), "copy frames to GPU")
        if self.use_cuda_graph:
            self._launch_graph(n)
        else:
            self._enqueue(self.context, n)
        cuda_check(cudart.cudaMemcpyAsync(self.h_out.ctypes.data, self.d_out, out_bytes, kind.cudaMemcpyDeviceToHost, self.stream), "copy probabilities from GPU")
        cuda_check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return np.array(self.h_out[:n], dtype=np.float32)  # copy out of the reused pinned buffer

    def _enqueue(self, context, n: int) -> None:
        if not context.set_input_shape(self.in_name, (n, *self.frame_shape)):
            raise BackendError(f"TensorRT refused batch {n} (engine profile is 1-{self.max_batch})")
        self._execute(context)

    def _execute(self, context) -> None:
        mark = self.logger.recorder.mark()
        if not context.execute_async_v3(int(self.stream)):
            raise BackendError(f"TensorRT execute_async_v3 failed: {self.logger.recorder.since(mark) or 'no message from TensorRT'}")

    def _launch_graph(self, n: int) -> None:
        entry = self.graphs.get(n)
        if entry is None:
            entry = self.graphs[n] = self._capture(n)
        cuda_check(self.cudart.cudaGraphLaunch(entry[1], self.stream), "cudaGraphLaunch")

    def _capture(self, n: int) -> tuple[object, object]:
        """A new execution context fixed at batch `n`, and a CUDA graph of its enqueue."""
        cudart = self.cudart
        context = self.engine.create_execution_context()
        if context is None:
            raise BackendError(f"TensorRT could not create an execution context for batch {n} (GPU memory?)")
        self._bind(context)
        # One plain run first: TensorRT does shape-dependent setup that must not be captured.
        self._enqueue(context, n)
        cuda_check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        cuda_check(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        graph, failure = None, None
        try:
            self._execute(context)
        except BaseException as exc:
            failure = exc
        finally:
            # End the capture on every path, or the stream stays in capture mode for good.
            err, graph = cudart.cudaStreamEndCapture(self.stream)
        if failure is not None:
            if not _null(graph):
                cudart.cudaGraphDestroy(graph)
            raise BackendError(f"CUDA graph capture at batch {n} failed: {failure}") from failure
        if err != cudart.cudaError_t.cudaSuccess or _null(graph):
            cuda_check((err,), f"cudaStreamEndCapture (batch {n})")
            raise BackendError(f"CUDA graph capture at batch {n} returned no graph (capture invalidated)")
        try:
            graph_exec = cuda_check(cudart.cudaGraphInstantiate(graph, 0), f"cudaGraphInstantiate (batch {n})")
        finally:
            cudart.cudaGraphDestroy(graph)
        return context, graph_exec

    def release(self) -> None:
        cudart = getattr(self, "cudart", None)
        if cudart is None:
            return
        for _context, graph_exec in getattr(self, "graphs", {}).values():
            cudart.cudaGraphExecDestroy(graph_exec)
        self.graphs.clear()
        self.context = None
        self.engine = None
        for ptr in self._device_ptrs:
            cudart.cudaFree(ptr)
        for ptr in self._host_ptrs:
            cudart.cudaFreeHost(ptr)
        self._device_ptrs, self._host_ptrs = [], []
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None


def _null(handle) -> bool:
    """A cuda-python handle (cudaGraph_t, ...) that is absent or NULL (they are always truthy)."""
    return handle is None or int(handle) == 0
