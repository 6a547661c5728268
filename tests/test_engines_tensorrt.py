"""TensorRT path end to end: build (fp32 and fp16) with --verify, then run through load_backend.

Needs TensorRT (extra [trt]), cuda-python and an NVIDIA GPU; skipped with the reason otherwise.
Nothing here is simulated: on a machine without TensorRT these tests do not run.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from engines.backends.tensorrt_backend import why_unavailable

REASON = why_unavailable()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=f"TensorRT path needs TensorRT + cuda-python + a GPU: {REASON}")]

SIZE = 128


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import torch

    from kdas_core.checkpoint import build_metadata, save_checkpoint
    from kdas_core.models import create_model

    os.environ["KDAS_CACHE_DIR"] = str(tmp_path_factory.mktemp("kdas-cache"))
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "student.safetensors")
    save_checkpoint(path, create_model("polyppvt-lite0"), build_metadata("polyppvt-lite0", input_size=SIZE))
    return path


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_verify_and_run(ckpt, tmp_path, precision):
    from engines import load_backend
    from engines.build import main
    from engines.cli_common import run
    from engines.verify import compare, synthetic_frames

    assert run(main, ["--weights", ckpt, "--out", str(tmp_path), "--format", "tensorrt", "--precision", precision, "--verify"]) == 0
    (engine,) = [p for p in os.listdir(tmp_path) if p.endswith(".engine")]
    engine = str(tmp_path / engine)
    side = json.load(open(os.path.splitext(engine)[0] + ".json"))
    assert side["precision"] == precision and side["input_size"] == SIZE and side["max_batch"] == 4
    assert side["tensorrt_version"] in os.path.basename(engine) and f"-{precision}-{SIZE}" in engine

    b = load_backend(engine)
    assert b.name == "tensorrt" and b.input_size == (SIZE, SIZE)
    ref = load_backend(ckpt, backend="torch", device="cpu")
    frames = synthetic_frames(6, SIZE)  # 6 > max batch 4: runs in chunks
    got = b.predict(frames)
    assert got.shape == (6, SIZE, SIZE) and got.dtype == np.float32
    assert compare(ref.predict(frames), got, precision, ref.threshold).ok
    b.close()

    # The checkpoint now finds its engine through the cache index.
    auto = load_backend(ckpt)
    assert auto.name == "tensorrt", auto.notes
    auto.close()


def test_cuda_graph_matches_plain(ckpt, tmp_path):
    from engines import load_backend
    from engines.backends.tensorrt_backend import TensorRTBackend
    from engines.build import main
    from engines.cli_common import run
    from engines.verify import synthetic_frames

    assert run(main, ["--weights", ckpt, "--out", str(tmp_path), "--format", "tensorrt"]) == 0
    (engine,) = [str(tmp_path / p) for p in os.listdir(tmp_path) if p.endswith(".engine")]
    frames = synthetic_frames(2, SIZE)
    plain = load_backend(engine, backend="tensorrt").predict(frames)
    graphed = TensorRTBackend(engine, cuda_graph=True)
    assert np.abs(graphed.predict(frames) - plain).max() < 1e-5
    assert np.abs(graphed.predict(frames) - plain).max() < 1e-5  # second call replays the graph
    graphed.close()
