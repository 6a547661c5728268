"""engines/: ONNX export parity, backend selection, errors, bench JSON, CLI exit codes.

Small random-init Lite0 checkpoint at 128x128: parity does not need trained weights, and two
ONNX exports (CLI + cache) keep the whole file well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from engines import BackendError, load_backend
from engines.cli_common import EXIT_UNAVAILABLE, EXIT_USAGE, EXIT_VERIFY, VerifyError, run
from engines.export import REVISION
from engines.verify import compare, synthetic_frames

SIZE = 128
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("kdas-cache"))
    old = os.environ.get("KDAS_CACHE_DIR")
    os.environ["KDAS_CACHE_DIR"] = root
    yield root
    if old is None:
        os.environ.pop("KDAS_CACHE_DIR", None)
    else:
        os.environ["KDAS_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory, cache_root):
    import torch

    from kdas_core.checkpoint import build_metadata, save_checkpoint
    from kdas_core.models import create_model

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "student.safetensors")
    save_checkpoint(path, create_model("polyppvt-lite0"), build_metadata("polyppvt-lite0", input_size=SIZE, threshold=0.45))
    return path


@pytest.fixture(scope="session")
def built(ckpt, tmp_path_factory):
    """`python -m engines.build --verify` run in-process: (exit code, onnx path)."""
    from engines.build import main

    out = str(tmp_path_factory.mktemp("deploy"))
    rc = run(main, ["--weights", ckpt, "--out", out, "--verify"])
    return rc, os.path.join(out, f"student-{SIZE}-fp32.onnx")


@pytest.fixture(scope="session")
def onnx_path(built):
    rc, path = built
    assert rc == 0 and os.path.isfile(path)
    return path


@pytest.fixture(scope="session")
def torch_ref(ckpt):
    return load_backend(ckpt, backend="torch", device="cpu")


# ---------------------------------------------------------------- export and parity


def test_build_cli_exports_and_verifies(built):
    rc, path = built
    assert rc == 0
    assert os.path.isfile(path)


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_pytorch(onnx_path, torch_ref, batch):
    ort_b = load_backend(onnx_path, backend="onnxruntime", device="cpu")
    frames = synthetic_frames(batch, SIZE, seed=batch)
    got, ref = ort_b.predict(frames), torch_ref.predict(frames)
    assert got.shape == (batch, SIZE, SIZE) and got.dtype == np.float32
    assert 0.0 <= got.min() and got.max() <= 1.0
    assert np.abs(got - ref).max() <= 1e-3
    # Frames are independent: frame 0 alone gives what it gave inside the batch.
    assert np.abs(ort_b.predict(frames[:1])[0] - got[0]).max() <= 1e-5


def test_onnx_graph_contract(onnx_path, ckpt):
    import onnx

    from kdas_core.checkpoint import file_sha256

    model = onnx.load(onnx_path)
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [SIZE, SIZE, 3]  # dynamic batch, NHWC
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    props = {p.key: p.value for p in model.metadata_props}
    assert props["kdas.input_size"] == str(SIZE)
    assert float(props["kdas.threshold"]) == pytest.approx(0.45)
    assert props["kdas.source_sha256"] == file_sha256(ckpt)


def test_backend_interface(onnx_path):
    b = load_backend(onnx_path)
    assert b.name == "onnxruntime"
    assert b.input_size == (SIZE, SIZE)
    assert b.threshold == pytest.approx(0.45)  # from the checkpoint, through the ONNX metadata
    assert isinstance(b.notes, list) and b.notes
    b.close()
    b.close()


def test_backend_usable_from_worker_thread(onnx_path):
    b = load_backend(onnx_path, backend="onnxruntime")
    result = {}
    worker = threading.Thread(target=lambda: result.update(p=b.predict(synthetic_frames(2, SIZE))))
    worker.start()
    worker.join()
    assert result["p"].shape == (2, SIZE, SIZE)


# ---------------------------------------------------------------- auto selection


def test_auto_on_checkpoint_reuses_cached_export(ckpt, cache_root, onnx_path):
    """The build CLI exported through the cache; load_backend(checkpoint) reuses that export."""
    b = load_backend(ckpt)
    assert b.name == "onnxruntime"
    assert b.notes[0].startswith("auto picked onnxruntime")
    assert any(n.startswith("tensorrt skipped") for n in b.notes)
    cached = b.path
    assert cached.startswith(os.path.join(cache_root, "onnx")) and cached.endswith(f"-{SIZE}-fp32-r{REVISION}.onnx")
    assert any("reused cached ONNX" in n for n in b.notes)
    assert open(cached, "rb").read() == open(onnx_path, "rb").read()


def test_stale_or_damaged_cache_entry_is_reexported(ckpt, cache_root, onnx_path, monkeypatch):
    from engines.backends import onnxruntime_backend

    b = load_backend(ckpt, backend="onnxruntime")
    with open(b.path, "wb") as f:
        f.write(b"damaged")
    exported = []
    monkeypatch.setattr(onnxruntime_backend, "export_onnx", lambda model, meta, path, **kw: exported.append(path) or shutil.copyfile(onnx_path, path))
    again = load_backend(ckpt, backend="onnxruntime")
    assert exported == [b.path] and again.path == b.path


def test_auto_order_falls_through_to_torch(ckpt, monkeypatch):
    from engines.backends import onnxruntime_backend, tensorrt_backend

    monkeypatch.setattr(tensorrt_backend, "why_unavailable", lambda device=None: "no GPU here (test)")

    def broken(*a, **k):
        raise BackendError("onnxruntime broken (test)")

    monkeypatch.setattr(onnxruntime_backend, "OnnxRuntimeBackend", broken)
    b = load_backend(ckpt)
    assert b.name == "torch"
    assert b.notes[0].startswith("auto picked torch")
    skipped = [n for n in b.notes if "skipped" in n]
    assert skipped[0].startswith("tensorrt skipped: no GPU here") and skipped[1].startswith("onnxruntime skipped: onnxruntime broken")


def test_auto_prefers_tensorrt_when_available_but_skips_without_engine(ckpt, monkeypatch):
    from engines.backends import tensorrt_backend

    monkeypatch.setattr(tensorrt_backend, "why_unavailable", lambda device=None: None)

    def no_engine(path, image_size=None, device=None):
        raise BackendError(f"{path}: no TensorRT engine built for this GPU (test)")

    monkeypatch.setattr(tensorrt_backend, "find_cached_engine", no_engine)
    b = load_backend(ckpt)
    assert b.name == "onnxruntime"
    assert any(n.startswith("tensorrt skipped:") and "no TensorRT engine" in n for n in b.notes)


def test_device_cpu_skips_tensorrt_with_reason(onnx_path):
    b = load_backend(onnx_path, device="cpu")
    assert "tensorrt skipped: device='cpu' was asked for" in b.notes


def test_torch_backend_from_onnx_uses_its_checkpoint(onnx_path, ckpt):
    b = load_backend(onnx_path, backend="torch", device="cpu")
    assert b.name == "torch" and b.path == ckpt


# ---------------------------------------------------------------- errors


def test_truncated_onnx_is_a_clear_error(onnx_path, tmp_path):
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(open(onnx_path, "rb").read()[:5000])
    with pytest.raises(BackendError, match="truncated.onnx"):
        load_backend(str(bad), backend="onnxruntime")
    with pytest.raises(BackendError, match="no backend could run"):
        load_backend(str(bad))


def test_garbage_and_foreign_onnx(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not an onnx file" * 50)
    with pytest.raises(BackendError, match="junk.onnx"):
        load_backend(str(junk), backend="onnxruntime")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(foreign))
    with pytest.raises(BackendError, match="without KDAS metadata"):
        load_backend(str(foreign), backend="onnxruntime")


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(BackendError, match="no such model file"):
        load_backend(str(tmp_path / "nope.onnx"))
    odd = tmp_path / "model.pt"
    odd.write_bytes(b"x")
    with pytest.raises(BackendError, match="unknown model file type"):
        load_backend(str(odd))
    with pytest.raises(BackendError, match="unknown backend"):
        load_backend(str(odd), backend="tflite")


def test_wrong_frames_name_expected_and_got(onnx_path):
    b = load_backend(onnx_path, backend="onnxruntime")
    with pytest.raises(ValueError, match=rf"\(N,{SIZE},{SIZE},3\).*\(1, 64, 64, 3\)"):
        b.predict(np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        b.predict(np.zeros((1, SIZE, SIZE, 3), np.float32))
    with pytest.raises(ValueError):
        b.predict(np.zeros((SIZE, SIZE, 3), np.uint8))


def test_onnx_at_other_size_is_refused(onnx_path):
    with pytest.raises(BackendError, match=f"exported for {SIZE}x{SIZE}"):
        load_backend(onnx_path, backend="onnxruntime", image_size=160)


def test_checkpoint_with_wrong_weights(tmp_path, ckpt):
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt)
    tensors.pop(next(iter(tensors)))
    from safetensors import safe_open

    with safe_open(ckpt, framework="pt") as f:
        meta = f.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(BackendError, match="do not fit preset"):
        load_backend(str(bad), backend="torch")


# ---------------------------------------------------------------- verify rules


def test_verify_rules():
    rng = np.random.default_rng(0)
    ref = rng.random((3, 32, 32)).astype(np.float32)
    assert compare(ref, ref + 5e-4, "fp32", 0.5).ok
    assert not compare(ref, ref + 5e-3, "fp32", 0.5).ok
    assert compare(ref, ref + 0.004, "fp16", 0.5).ok  # small shifts move few mask pixels
    black = ref.copy()
    black[1] = 0.0  # one all-black frame: the known FP16 TensorRT failure
    bad = compare(ref, black, "fp16", 0.5)
    assert not bad.ok and bad.empty_masks == 1
    assert not compare(ref, np.full_like(ref, np.nan), "fp32", 0.5).ok


# ---------------------------------------------------------------- TensorRT metadata (no GPU needed)


def test_engine_sidecar_round_trip_and_compatibility(tmp_path):
    from engines.trt_common import SIDECAR_FORMAT, compatibility_problem, engine_cache_key, read_sidecar, sidecar_path, write_json_atomic

    key = engine_cache_key("polyppvt-lite0-abc", "NVIDIA GeForce RTX 4090", "8.9", "10.8.0.43", "fp16", 352)
    assert key == "polyppvt-lite0-abc-nvidia-geforce-rtx-4090-sm89-trt10.8.0.43-fp16-352"
    engine = tmp_path / f"{key}.engine"
    engine.write_bytes(b"not really an engine")
    meta = {
        "format": SIDECAR_FORMAT, "input_size": 352, "threshold": 0.5, "precision": "fp16", "max_batch": 4,
        "gpu_name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "tensorrt_version": "10.8.0.43",
    }
    write_json_atomic(sidecar_path(str(engine)), meta)
    assert read_sidecar(str(engine)) == meta
    same = {"gpu_name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "tensorrt_version": "10.8.0.43"}
    assert compatibility_problem(meta, same) is None
    other = {"gpu_name": "NVIDIA A100", "compute_capability": "8.0", "tensorrt_version": "11.0.0"}
    problem = compatibility_problem(meta, other)
    assert "TensorRT 10.8.0.43 built it" in problem and "NVIDIA A100" in problem
    os.remove(sidecar_path(str(engine)))
    with pytest.raises(BackendError, match="no sidecar"):
        read_sidecar(str(engine))


def test_engine_for_other_gpu_falls_back(onnx_path, tmp_path, monkeypatch):
    """An engine built elsewhere: a clear message, then auto runs its source ONNX instead."""
    from engines.backends import tensorrt_backend
    from engines.trt_common import SIDECAR_FORMAT, sidecar_path, write_json_atomic

    engine = tmp_path / "student.engine"
    engine.write_bytes(b"serialized for another GPU")
    write_json_atomic(sidecar_path(str(engine)), {
        "format": SIDECAR_FORMAT, "input_size": SIZE, "threshold": 0.45, "precision": "fp16",
        "gpu_name": "NVIDIA A100", "compute_capability": "8.0", "tensorrt_version": "10.3.0", "onnx": onnx_path,
    })
    # This machine, as TensorRT would describe it (only the identity check runs; nothing is executed).
    monkeypatch.setattr(tensorrt_backend, "why_unavailable", lambda device=None: None)
    monkeypatch.setattr(tensorrt_backend, "current_target", lambda device=None: {
        "gpu_name": "NVIDIA L4", "compute_capability": "8.9", "tensorrt_version": "11.0.0"})
    with pytest.raises(BackendError, match="cannot run here: TensorRT 10.3.0 built it, this is TensorRT 11.0.0"):
        load_backend(str(engine), backend="tensorrt")
    b = load_backend(str(engine))
    assert b.name == "onnxruntime" and b.path == onnx_path
    assert any(n.startswith("tensorrt skipped:") and "rebuild" in n for n in b.notes)
    assert b.predict(synthetic_frames(1, SIZE)).shape == (1, SIZE, SIZE)


# ---------------------------------------------------------------- bench


def test_bench_json(onnx_path, tmp_path):
    from engines.bench import main

    out = tmp_path / "bench.json"
    assert run(main, ["--model", onnx_path, "--backend", "onnxruntime", "--runs", "3", "--warmup", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["backend"] == "onnxruntime"
    assert 0 < doc["latency_ms_p50"] <= doc["latency_ms_p95"]
    assert doc["throughput_fps"] > 0


def test_bench_compare_json(onnx_path, tmp_path):
    from engines.bench import main

    out = tmp_path / "compare.json"
    argv = ["--compare", "--model", onnx_path, "--backend", "onnxruntime,torch", "--device", "cpu", "--runs", "2", "--warmup", "0", "--batch", "2", "--json", str(out)]
    assert run(main, argv) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["backend"] for r in results] == ["onnxruntime", "torch"]
    assert results[0]["ratio_p50_to_first"] == 1.0
    assert all(r["batch"] == 2 and r["runs"] == 2 and r["latency_ms_p50"] > 0 for r in results)


# ---------------------------------------------------------------- CLI exit codes


def test_build_cli_user_errors(tmp_path, ckpt):
    from engines.build import main

    assert run(main, ["--weights", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path)]) == EXIT_USAGE
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(open(ckpt, "rb").read()[:200])
    assert run(main, ["--weights", str(trunc), "--out", str(tmp_path)]) == EXIT_USAGE
    from engines.backends.tensorrt_backend import why_unavailable

    if why_unavailable() is not None:  # fails fast, before exporting anything
        assert run(main, ["--weights", ckpt, "--out", str(tmp_path / "trt"), "--format", "tensorrt"]) == EXIT_UNAVAILABLE
        assert not os.path.exists(tmp_path / "trt")
        from engines.bench import main as bench_main

        assert run(bench_main, ["--model", ckpt, "--backend", "tensorrt"]) == EXIT_UNAVAILABLE


def test_verify_failure_exit_code():
    def failing(argv):
        raise VerifyError("disagrees")

    assert run(failing, []) == EXIT_VERIFY


def test_cli_subprocess_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run(
        [sys.executable, "-m", "engines.build", "--weights", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert proc.returncode == EXIT_USAGE
    assert "error:" in proc.stderr and "nope.safetensors" in proc.stderr and "Traceback" not in proc.stderr


def test_cache_dir_override(tmp_path, monkeypatch):
    from engines.cache import cache_dir

    monkeypatch.setenv("KDAS_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir("onnx") == str(tmp_path / "c" / "onnx") and os.path.isdir(tmp_path / "c" / "onnx")
    shutil.rmtree(tmp_path / "c")


def test_bench_argument_errors_exit_2(onnx_path):
    from engines.bench import main

    for argv in ([], ["--model", onnx_path, "--backend", "tflite"], ["--model", onnx_path, "--model", onnx_path], ["--model", onnx_path, "--runs", "0"]):
        with pytest.raises(SystemExit) as exc:
            run(main, argv)
        assert exc.value.code == 2, argv
