"""PyTorch backend: runs the checkpoint directly. CPU or CUDA (fp16 + channels_last on CUDA)."""

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

    def __init__(self, path: "str | ModelSource", device: str | None = None, image_size: int | None = None, threads: int | None = None):
        path = ModelSource.of(path, "checkpoint").path
        model, meta = load_torch_checkpoint(path)  # the weights and their metadata, in one read
        super().__init__(path, image_size or meta["input_size"], meta["threshold"], meta)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"{path}: torch backend asked for {device!r} but this PyTorch sees no CUDA GPU; use device='cpu'")
        self.device = torch.device(device)
        self.half = self.device.type == "cuda"
        self.threads = threads
        self._cpu_model = model
        self._net: FramesToProbs | None = None
        precision = "fp16 + channels_last" if self.half else "fp32"
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
        x = torch.from_numpy(frames).to(self.device, non_blocking=True)
        with torch.inference_mode():
            probs = self._net(x)
        return probs.float().cpu().numpy()

    def close(self) -> None:
        self._net = None
        self._cpu_model = None
