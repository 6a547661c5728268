"""TensorRT backend: a serialized engine built by `python -m engines.build --format tensorrt`.

Buffers and streams use cuda-python (`cuda.bindings.runtime`), not pycuda. Pinned host buffers,
device buffers, one stream and (optionally) one CUDA graph per batch size, all sized for the
engine's largest profile batch; bigger batches run in chunks.

Every CUDA/TensorRT object is created by the first `predict`, in the thread that calls it:
construct anywhere, then predict from one worker thread (a call from another thread rebuilds
those objects there, with a note, rather than sharing them across threads).
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from ..cache import cache_dir
from ..errors import BackendError
from ..trt_common import (
    compatibility_problem,
    cuda_check,
    device_index,
    engine_cache_key,
    gpu_info,
    import_cudart,
    import_trt,
    read_sidecar,
)
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


def current_target(device: str | None = None) -> dict:
    """GPU name, compute capability and TensorRT version of this machine (what an engine must match)."""
    trt = import_trt()
    return {**gpu_info(device_index(device)), "tensorrt_version": trt.__version__}


def find_cached_engine(path: str, image_size: int | None = None, device: str | None = None) -> str:
    """A prebuilt engine for checkpoint/ONNX `path` on this GPU + TensorRT, found through the cache
    index that `engines.build` writes. BackendError (with the build command) when there is none."""
    from kdas_core.checkpoint import file_sha256, read_metadata

    from ..export import read_onnx_metadata

    if path.lower().endswith(".onnx"):
        meta = read_onnx_metadata(path)
        sha = meta["source_sha256"]
    else:
        meta = read_metadata(path)
        sha = file_sha256(path)
    size = int(image_size or meta["input_size"])
    here = current_target(device)
    index = cache_dir("tensorrt")
    for precision in ("fp16", "fp32"):  # fp16 first: faster, and verified by the build
        key = engine_cache_key(f"{meta['preset']}-{sha[:12]}", here["gpu_name"], here["compute_capability"], here["tensorrt_version"], precision, size)
        pointer = os.path.join(index, key + ".json")
        if os.path.isfile(pointer):
            import json

            with open(pointer, encoding="utf-8") as f:
                engine = json.load(f).get("engine", "")
            if os.path.isfile(engine):
                return engine
    raise BackendError(
        f"{path}: no TensorRT engine built for {here['gpu_name']} / TensorRT {here['tensorrt_version']} at {size}x{size}; "
        f"build one (takes minutes): python -m engines.build --weights {path} --out engines-out --format tensorrt --precision fp16 --verify"
    )


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, path: str, device: str | None = None, cuda_graph: bool | None = None, **_ignored):
        if not os.path.isfile(path):
            raise BackendError(f"{path}: no such TensorRT engine file")
        meta = read_sidecar(path)
        super().__init__(path, meta["input_size"], meta["threshold"], meta)
        self.device = device_index(device)
        here = current_target(device)
        problem = compatibility_problem(meta, here)
        if problem:
            raise BackendError(
                f"{path}: this engine cannot run here: {problem}. Engines are tied to the GPU and TensorRT "
                f"version that built them; rebuild with `python -m engines.build --weights CKPT --out DIR --format tensorrt`"
            )
        if meta["gpu_name"] != here["gpu_name"]:
            self.notes.append(f"engine built on {meta['gpu_name']}, running on {here['gpu_name']} (same architecture)")
        if cuda_graph is None:
            cuda_graph = os.environ.get("KDAS_TRT_CUDA_GRAPH", "0") == "1"
        self.use_cuda_graph = bool(cuda_graph)
        self.max_batch = int(meta.get("max_batch", 4))
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
    """Engine, context, stream, buffers and graphs of one inference thread."""

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
        self.graphs: dict[int, object] = {}
        self._device_ptrs: list[int] = []
        self._host_ptrs: list[int] = []
        self.stream = None
        self.cudart = cudart = import_cudart()
        self.thread = threading.get_ident()
        self.use_cuda_graph = use_cuda_graph
        cuda_check(cudart.cudaSetDevice(device), "cudaSetDevice")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with open(path, "rb") as f:
            blob = f.read()
        self.engine = self.runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise BackendError(f"{path}: TensorRT could not deserialize this engine (see the TensorRT log above); rebuild it for this GPU/TensorRT")
        self.context = self.engine.create_execution_context()
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
        # Fixed addresses: set once, valid for every batch size (buffers are sized for max_batch).
        self.context.set_tensor_address(self.in_name, self.d_in)
        self.context.set_tensor_address(self.out_name, self.d_out)

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
        self._execute(n)
        cuda_check(cudart.cudaMemcpyAsync(self.h_out.ctypes.data, self.d_out, out_bytes, kind.cudaMemcpyDeviceToHost, self.stream), "copy probabilities from GPU")
        cuda_check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return np.array(self.h_out[:n], dtype=np.float32)  # copy out of the reused pinned buffer

    def _execute(self, n: int) -> None:
        cudart = self.cudart
        if not self.context.set_input_shape(self.in_name, (n, *self.frame_shape)):
            raise BackendError(f"TensorRT refused batch {n} (engine profile is 1-{self.max_batch})")
        if not self.use_cuda_graph:
            if not self.context.execute_async_v3(int(self.stream)):
                raise BackendError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
            return
        graph_exec = self.graphs.get(n)
        if graph_exec is None:
            # One plain run first: TensorRT does shape-dependent setup that must not be captured.
            if not self.context.execute_async_v3(int(self.stream)):
                raise BackendError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
            mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            cuda_check(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
            self.context.execute_async_v3(int(self.stream))
            graph = cuda_check(cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
            graph_exec = cuda_check(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            cuda_check(cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")
            self.graphs[n] = graph_exec
        cuda_check(cudart.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")

    def release(self) -> None:
        cudart = getattr(self, "cudart", None)
        if cudart is None:
            return
        for graph_exec in getattr(self, "graphs", {}).values():
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
