"""PyTorch backend: runs the checkpoint directly. CPU or CUDA (fp16 + channels_last on CUDA; with
`cuda_graph=True` each batch size is captured once as a CUDA graph and replayed: one launch per
call instead of one per kernel, which is what small batches are bound by)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import BackendError
from ..export import FramesToProbs
from ..source import ModelSource
from .base import Backend


def load_torch_checkpoint(path: str):
    """(model, meta) with any checkpoint problem turned into a BackendError."""
    from kdas_core.io.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path, "cpu")
    except CheckpointError as exc:
        raise BackendError(f"{exc} (expected a KDAS .safetensors checkpoint from kdas_core.train/distill)") from exc


class TorchBackend(Backend):
    name = "torch"
    why_auto = "PyTorch runs the checkpoint directly (slowest, but needs no export)"

    def __init__(self, path: "str | ModelSource", device: str | None = None, image_size: int | None = None, threads: int | None = None,
                 cuda_graph: bool = False):
        path = ModelSource.of(path, "checkpoint").path
        model, meta = load_torch_checkpoint(path)  # the weights and their metadata, in one read
        super().__init__(path, image_size or meta["input_size"], meta["threshold"], meta)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"{path}: torch backend asked for {device!r} but this PyTorch sees no CUDA GPU; use device='cpu'")
        self.device = torch.device(device)
        self.half = self.device.type == "cuda"
        if cuda_graph and not self.half:
            raise BackendError(f"{path}: CUDA graphs need a CUDA device, not {device!r}")
        self.threads = threads
        self.cuda_graph = bool(cuda_graph)
        self._graphs: dict[int, tuple] = {}  # batch size -> (graph, static input, static output)
        self._cpu_model = model
        self._net: FramesToProbs | None = None
        precision = "fp16 + channels_last" + (" + CUDA graphs" if self.cuda_graph else "") if self.half else "fp32"
        self.notes.append(f"torch on {self.device} ({precision})")

    def _build(self) -> FramesToProbs:
        # Built in the inference thread on first use (CUDA context belongs to that thread's work).
        net = FramesToProbs(self._cpu_model, self.meta["mean"], self.meta["std"], "fp16" if self.half else "fp32")
        net = net.to(self.device)
        if self.half:
            net = net.to(memory_format=torch.channels_last)
        self._cpu_model = None
        return net.eval()

    def _predict(self, frames: np.ndarray) -> np.ndarray:
        if self._net is None:
            self._net = self._build()
        if self.threads and self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        if self.cuda_graph:
            graph, static_in, static_out = self._graph(len(frames))
            static_in.copy_(torch.from_numpy(frames))
            graph.replay()
            return static_out.float().cpu().numpy()
        x = torch.from_numpy(frames).to(self.device, non_blocking=True)
        with torch.inference_mode():
            probs = self._net(x)
        return probs.float().cpu().numpy()

    def _graph(self, n: int) -> tuple:
        """The CUDA graph of batch size `n`, captured on first use (after warm-up runs on a side
        stream, as capture requires) with its own static input and output tensors."""
        if n not in self._graphs:
            h, w = self.input_size
            static_in = torch.zeros((n, h, w, 3), dtype=torch.uint8, device=self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(3):
                    self._net(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph):
                static_out = self._net(static_in)
            self._graphs[n] = (graph, static_in, static_out)
        return self._graphs[n]

    def close(self) -> None:
        self._graphs = {}
        self._net = None
        self._cpu_model = None
