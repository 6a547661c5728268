"""Small synthetic inputs for the app's tests and benchmarks (no patient data)."""

from __future__ import annotations

import os


def make_clip(path: str, frames: int = 30, size: int = 160, fps: int = 25, seed: int = 0) -> str:
    """A short H.264 MP4 from the synthetic endoscopy generator (moov first, so a truncated
    copy still opens and fails while decoding, like a cut-off download)."""
    from .make_demo import write_clip

    write_clip(str(path), frames=frames, size=size, fps=fps, seed=seed)
    return str(path)


def make_checkpoint(path: str, input_size: int = 128, preset: str = "polyppvt-lite0", seed: int = 0) -> str:
    """A random-init checkpoint with real metadata: exercises every code path, segments nothing.
    The same `seed` gives the same weights whatever ran before (the global RNG is left as it was)."""
    import torch

    from kdas_core.io.checkpoint import build_metadata, save_checkpoint
    from kdas_core.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(preset)
    save_checkpoint(str(path), model, build_metadata(preset, input_size=input_size))
    return str(path)


def truncate(src: str, dst: str, fraction: float = 0.5) -> str:
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return str(dst)


def garbage(path: str, size: int = 20000, seed: int = 0) -> str:
    import numpy as np

    with open(path, "wb") as f:
        f.write(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return str(path)


def rss_mb() -> float:
    """Resident memory of this process in MB (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0
