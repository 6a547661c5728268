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
from engines.trt_common import NO_GPU_REASON, has_nvidia_gpu

REASON = why_unavailable()
if REASON is not None and not has_nvidia_gpu():
    REASON = NO_GPU_REASON  # the install hint is for machines that could use it
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=f"TensorRT path needs TensorRT + cuda-python + a GPU: {REASON}")]

SIZE = 128


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import torch

    from kdas_core.io.checkpoint import build_metadata, save_checkpoint
    from kdas_core.models import create_model

    os.environ["KDAS_CACHE_DIR"] = str(tmp_path_factory.mktemp("kdas-cache"))
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "student.safetensors")
    # threshold 0.45: this random-init model then has foreground on the demo frames (fp16 verify needs it)
    save_checkpoint(path, create_model("polyppvt-lite0"), build_metadata("polyppvt-lite0", input_size=SIZE, threshold=0.45))
    return path


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_verify_and_run(ckpt, tmp_path, precision):
    from engines import load_backend
    from engines.build import main
    from engines.cli_common import run
    from engines.verify import compare, verification_frames

    assert run(main, ["--weights", ckpt, "--out", str(tmp_path), "--format", "tensorrt", "--precision", precision, "--verify"]) == 0
    (engine,) = [p for p in os.listdir(tmp_path) if p.endswith(".engine")]
    engine = str(tmp_path / engine)
    side = json.load(open(os.path.splitext(engine)[0] + ".json"))
    assert side["precision"] == precision and side["input_size"] == SIZE and side["max_batch"] == 4
    assert side["tensorrt_version"] in os.path.basename(engine) and f"-{precision}-{SIZE}-b4" in engine
    assert side["verified"] is True and side["verification"]["ok"] and side["sm_count"] > 0

    b = load_backend(engine)
    assert b.name == "tensorrt" and b.input_size == (SIZE, SIZE)
    ref = load_backend(ckpt, backend="torch", device="cpu")
    frames, ref_probs, _ = verification_frames(ref, SIZE, limit=6)  # 6 > max batch 4: runs in chunks
    got = b.predict(frames)
    assert got.shape == (len(frames), SIZE, SIZE) and got.dtype == np.float32
    assert compare(ref_probs, got, precision, ref.threshold).ok
    b.close()

    # The checkpoint now finds its engine through the cache index.
    auto = load_backend(ckpt)
    assert auto.name == "tensorrt", auto.notes
    auto.close()


def test_cuda_graph_matches_plain_at_alternating_batches(ckpt, tmp_path):
    from engines import load_backend
    from engines.backends.tensorrt_backend import TensorRTBackend
    from engines.build import main
    from engines.cli_common import run
    from engines.verify import synthetic_frames

    assert run(main, ["--weights", ckpt, "--out", str(tmp_path), "--format", "tensorrt", "--max-batch", "3"]) == 0
    (engine,) = [str(tmp_path / p) for p in os.listdir(tmp_path) if p.endswith(".engine")]
    assert json.load(open(os.path.splitext(engine)[0] + ".json"))["verified"] is False  # built without --verify
    plain = load_backend(engine, backend="tensorrt")
    graphed = TensorRTBackend(engine, cuda_graph=True)
    for n in (1, 3, 2, 1, 3, 2):  # each batch size replays its own context's graph
        frames = synthetic_frames(n, SIZE, seed=n)
        assert np.abs(graphed.predict(frames) - plain.predict(frames)).max() < 1e-5, n
    graphed.close()
    plain.close()


def test_truncated_engine_error_quotes_tensorrt(ckpt, tmp_path):
    import shutil

    from engines import BackendError
    from engines.backends.tensorrt_backend import TensorRTBackend
    from engines.build import main
    from engines.cli_common import run
    from engines.verify import synthetic_frames

    assert run(main, ["--weights", ckpt, "--out", str(tmp_path), "--format", "tensorrt", "--max-batch", "1"]) == 0
    (engine,) = [str(tmp_path / p) for p in os.listdir(tmp_path) if p.endswith(".engine")]
    bad = str(tmp_path / "bad" / os.path.basename(engine))
    os.makedirs(os.path.dirname(bad))
    shutil.copyfile(os.path.splitext(engine)[0] + ".json", os.path.splitext(bad)[0] + ".json")
    with open(engine, "rb") as src, open(bad, "wb") as dst:
        dst.write(src.read()[:1000])
    with pytest.raises(BackendError, match="could not deserialize this engine \\(.+\\)"):
        TensorRTBackend(bad).predict(synthetic_frames(1, SIZE))
