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
from pathlib import Path

import numpy as np
import pytest

import engines
from engines import BackendError, load_backend
from engines.cli_common import EXIT_UNAVAILABLE, EXIT_USAGE, EXIT_VERIFY, VerifyError, run
from engines.export import REVISION
from engines.verify import compare, synthetic_frames

SIZE = 128
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    # A fixed folder under the session's base temp: test_selfcheck imports these fixtures, which
    # makes pytest run them once per module; both must then share one cache and one checkpoint.
    root = str(tmp_path_factory.getbasetemp() / "kdas-cache")
    os.makedirs(root, exist_ok=True)
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

    from kdas_core.io.checkpoint import build_metadata, save_checkpoint
    from kdas_core.models import create_model

    path = str(tmp_path_factory.getbasetemp() / "ckpt" / "student.safetensors")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.manual_seed(0)
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

    from kdas_core.io.checkpoint import file_sha256

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


def test_opening_a_checkpoint_reads_its_metadata_and_hashes_it_once(ckpt, onnx_path, tmp_path, monkeypatch):
    """auto -> tensorrt (looks up a cached engine: needs metadata and hash) -> onnxruntime (the
    cached export: needs them again): one ModelSource, so each is done once for the checkpoint."""
    import kdas_core.io.checkpoint as checkpoint
    from engines.backends import tensorrt_backend

    calls = {"read_metadata": [], "file_sha256": []}
    for name in calls:
        real = getattr(checkpoint, name)
        monkeypatch.setattr(checkpoint, name, lambda path, _real=real, _name=name: calls[_name].append(path) or _real(path))
    monkeypatch.setattr(tensorrt_backend, "why_unavailable", lambda device=None: None)  # TensorRT "present": it looks
    monkeypatch.setattr(tensorrt_backend, "current_target", lambda device=None: {  # for an engine in an empty index
        "gpu_name": "Test GPU", "sm_count": 1, "compute_capability": "9.0", "tensorrt_version": "0", "export_revision": REVISION})
    monkeypatch.setattr(tensorrt_backend, "cache_dir", lambda kind: str(tmp_path))
    b = load_backend(ckpt)
    assert b.name == "onnxruntime"
    assert any(n.startswith("tensorrt skipped:") and "no TensorRT engine" in n for n in b.notes)  # it did look
    assert calls == {"read_metadata": [ckpt], "file_sha256": [ckpt]}


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
    monkeypatch.setattr("engines.trt_common.has_nvidia_gpu", lambda: True)  # a GPU is there: its reason is shown as is

    def broken(*a, **k):
        raise BackendError("onnxruntime broken (test)")

    monkeypatch.setattr(onnxruntime_backend, "OnnxRuntimeBackend", broken)
    b = load_backend(ckpt)
    assert b.name == "torch"
    assert b.notes[0].startswith("auto picked torch")
    skipped = [n for n in b.notes if "skipped" in n]
    assert skipped[0].startswith("tensorrt skipped: no GPU here") and skipped[1].startswith("onnxruntime skipped: onnxruntime broken")


def test_a_new_backend_needs_only_its_name_in_backends_and_its_branch(ckpt, monkeypatch):
    """As docs/ARCHITECTURE.md says: a backend class, its name in engines.BACKENDS and a branch in
    engines._open; `auto` then tries it in that order and says why it picked it."""
    from engines.backends.base import Backend

    class Mine(Backend):
        name = "mine"

    def _open(name, src, opts, notes):
        if name == "mine":
            return Mine(src.path, 64, 0.5)
        raise BackendError(f"{name} off (test)")

    monkeypatch.setattr(engines, "BACKENDS", ("mine", *engines.BACKENDS))
    monkeypatch.setattr(engines, "_open", _open)
    b = load_backend(ckpt, device="cpu")
    assert b.name == "mine" and b.notes[0].startswith("auto picked mine: the first of mine")


def test_auto_prefers_tensorrt_when_available_but_skips_without_engine(ckpt, monkeypatch):
    from engines.backends import tensorrt_backend

    monkeypatch.setattr(tensorrt_backend, "why_unavailable", lambda device=None: None)

    def no_engine(path, image_size=None, device=None, notes=None):
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
    with pytest.raises(engines.ModelFileError, match=r"truncated.onnx: not a readable ONNX file"):
        load_backend(str(bad))  # auto: the file's own problem, not a list of backends


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


def test_corrupt_checkpoint_under_auto_names_the_file_problem_not_the_backends(tmp_path):
    from engines import ModelFileError

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ModelFileError) as info:
        load_backend(str(bad))
    text = str(info.value)
    assert text.startswith(f"{bad}: not a readable safetensors file") and "skipped" not in text and "TensorRT" not in text


def test_auto_without_nvidia_gpu_skips_tensorrt_without_install_hint(onnx_path, monkeypatch):
    monkeypatch.setattr("engines.trt_common.has_nvidia_gpu", lambda: False)
    b = load_backend(onnx_path)
    assert "tensorrt skipped: no NVIDIA GPU on this machine (TensorRT needs one)" in b.notes
    assert not any("pip install" in n for n in b.notes)


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
    # fp16 also bounds the probabilities: a uniform drift keeps most masks but is not fp16 rounding.
    drift = compare(ref, np.clip(ref + 0.02, 0, 1), "fp16", 0.5)
    assert not drift.ok and any("mean prob diff" in p for p in drift.problems)
    spike = ref.copy()
    spike[:, :1, :16] = np.clip(spike[:, :1, :16] + 0.3, 0, 1)  # 1.6 % of the pixels far off
    assert any("99th-percentile" in p for p in compare(ref, spike, "fp16", 0.5).problems)
    few = ref.copy()
    few[0, 0, :3] = 1.0 - few[0, 0, :3]  # three pixels: the max moves, the bounds do not
    assert compare(ref, few, "fp16", 0.5).ok
    # A reference without foreground makes the Dice vacuous: fp16 verify refuses to pass on it.
    empty = np.zeros_like(ref)
    assert not compare(empty, empty, "fp16", 0.5).ok and compare(empty, empty, "fp32", 0.5).ok


def test_verify_frames_default_to_demo_frames_with_foreground(torch_ref):
    from engines.verify import has_foreground, verification_frames

    frames, probs, what = verification_frames(torch_ref, SIZE, limit=4)
    assert frames.shape == (4, SIZE, SIZE, 3) and frames.dtype == np.uint8 and "demo-clip" in what
    assert has_foreground(probs, torch_ref.threshold).all()
    assert np.abs(torch_ref.predict(frames) - probs).max() < 1e-6


# ---------------------------------------------------------------- TensorRT metadata (no GPU needed)


TARGET_4090 = {"gpu_name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "sm_count": 128, "tensorrt_version": "10.8.0.43"}


def _sidecar(**over):
    from engines.trt_common import SIDECAR_FORMAT

    meta = {
        "format": SIDECAR_FORMAT, "input_size": SIZE, "threshold": 0.45, "precision": "fp16", "max_batch": 4,
        "export_revision": REVISION, "preset": "polyppvt-lite0", "source_sha256": "ab" * 32, "verified": False, **TARGET_4090,
    }
    meta.update(over)
    return meta


def test_engine_sidecar_round_trip_and_compatibility(tmp_path):
    from engines.trt_common import compatibility_problem, engine_cache_key, read_sidecar, sidecar_path, write_json_atomic

    key = engine_cache_key("polyppvt-lite0-abc", TARGET_4090, "fp16", 352, 4, 3)
    assert key == "polyppvt-lite0-abc-r3-nvidia-geforce-rtx-4090-sm89x128-trt10.8.0.43-fp16-352-b4"
    engine = tmp_path / f"{key}.engine"
    engine.write_bytes(b"not really an engine")
    meta = _sidecar(input_size=352)
    write_json_atomic(sidecar_path(str(engine)), meta)
    assert read_sidecar(str(engine)) == meta
    assert compatibility_problem(meta, {**TARGET_4090, "export_revision": REVISION}) is None
    other = {"gpu_name": "NVIDIA A100", "compute_capability": "8.0", "sm_count": 108, "tensorrt_version": "11.0.0", "export_revision": REVISION + 1}
    problem = compatibility_problem(meta, other)
    assert "TensorRT 10.8.0.43 built it" in problem and "NVIDIA A100" in problem and f"export revision {REVISION}" in problem
    # An engine indexed before this format (no SM count, revision, max batch, verified) is refused, with what to do.
    write_json_atomic(sidecar_path(str(engine)), {**meta, "format": "kdas-trt/1"})
    with pytest.raises(BackendError, match="rebuild the engine"):
        read_sidecar(str(engine))
    os.remove(sidecar_path(str(engine)))
    with pytest.raises(BackendError, match="no sidecar"):
        read_sidecar(str(engine))


def test_cache_key_separates_sm_count_revision_and_max_batch():
    from engines.trt_common import engine_cache_key

    base = engine_cache_key("m", TARGET_4090, "fp16", 352, 4, 3)
    others = [
        engine_cache_key("m", {**TARGET_4090, "sm_count": 76}, "fp16", 352, 4, 3),  # same sm_89 chip, fewer SMs (RTX 4070 Ti)
        engine_cache_key("m", TARGET_4090, "fp16", 352, 4, 4),  # another export revision
        engine_cache_key("m", TARGET_4090, "fp16", 352, 8, 3),  # another max batch
        engine_cache_key("m", TARGET_4090, "fp16", 352, 4, 3, "12" * 32),  # built from one ONNX file
        engine_cache_key("m", TARGET_4090, "fp16", 352, 4, 3, "34" * 32),  # another export of the same revision
    ]
    assert len({base, *others}) == 6
    assert "-r3-o121212121212-" in others[3]


def _fake_engine(folder, name: str, **side) -> str:
    """An engine *file* with a sidecar: only the metadata is exercised; nothing here runs TensorRT."""
    from engines.trt_common import sidecar_path, write_json_atomic

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), name + ".engine")
    with open(path, "wb") as f:
        f.write(b"placeholder: never deserialised in these tests")
    write_json_atomic(sidecar_path(path), _sidecar(cache_key=name, **side))
    return path


def test_indexed_engines_verified_first_then_fp16(tmp_path):
    from engines.backends.tensorrt_backend import pick_indexed_engine
    from engines.trt_common import write_json_atomic

    index = tmp_path / "index"
    here = {**TARGET_4090, "export_revision": REVISION}
    sha = "ab" * 32

    def indexed(name, **side):
        engine = _fake_engine(tmp_path / "engines", name, **side)
        write_json_atomic(str(index / f"{name}.json"), {**_sidecar(**side), "engine": engine})
        return engine

    unverified16 = indexed("e16", precision="fp16", verified=False)
    verified32 = indexed("e32", precision="fp32", verified=True)
    indexed("other-sm", precision="fp16", verified=True, sm_count=76)  # another GPU of the same architecture
    indexed("old-rev", precision="fp16", verified=True, export_revision=REVISION - 1)
    indexed("other-size", precision="fp16", verified=True, input_size=SIZE * 2)
    assert pick_indexed_engine(str(index), "polyppvt-lite0", sha, here, SIZE)[0] == verified32
    verified16 = indexed("v16", precision="fp16", verified=True)
    assert pick_indexed_engine(str(index), "polyppvt-lite0", sha, here, SIZE)[0] == verified16
    assert pick_indexed_engine(str(index), "polyppvt-lite0", "cd" * 32, here, SIZE)[0] is None  # other weights
    # An ONNX source whose hash differs from what the engine was built from.
    engine, skipped = pick_indexed_engine(str(index), "polyppvt-lite0", sha, here, SIZE, onnx_sha256="ef" * 32)
    assert engine is None and any("another ONNX" in s for s in skipped)
    # The engine's own sidecar is the authority: an index copy saying "verified" does not make it so.
    for name in ("e32", "v16"):
        os.remove(index / f"{name}.json")
    engine, skipped = pick_indexed_engine(str(index), "polyppvt-lite0", sha, here, SIZE)
    assert engine == unverified16 and any("no verified engine" in s for s in skipped)


def test_engine_from_another_export_of_the_same_revision_does_not_match(ckpt, onnx_path, tmp_path, monkeypatch):
    """Loading from a checkpoint: an indexed engine counts only when its sidecar's ONNX hash is
    that of the checkpoint's cached export (what engines.build built from and onnxruntime runs)."""
    from engines.backends import tensorrt_backend
    from engines.backends.onnxruntime_backend import find_cached_export
    from engines.backends.tensorrt_backend import find_cached_engine, pick_indexed_engine
    from engines.trt_common import write_json_atomic
    from kdas_core.io.checkpoint import file_sha256, read_metadata

    export = find_cached_export(engines.ModelSource(ckpt), SIZE, "fp32")
    assert export is not None and file_sha256(export.path) == file_sha256(onnx_path)  # build copies the cached export
    index = tmp_path / "index"
    monkeypatch.setattr(tensorrt_backend, "cache_dir", lambda kind: str(index))
    monkeypatch.setattr(tensorrt_backend, "current_target", lambda device=None: {**TARGET_4090, "export_revision": REVISION})
    model = {"source_sha256": file_sha256(ckpt), "preset": read_metadata(ckpt)["preset"], "precision": "fp32", "verified": True}

    def indexed(name, onnx_sha):
        engine = _fake_engine(tmp_path / "engines", name, onnx_sha256=onnx_sha, **model)
        write_json_atomic(str(index / f"{name}.json"), {**_sidecar(onnx_sha256=onnx_sha, **model), "engine": engine})
        return engine

    other = indexed("other-export", "ee" * 32)  # same checkpoint, revision, size, GPU and TensorRT
    with pytest.raises(BackendError, match="another ONNX file"):
        find_cached_engine(ckpt)
    same = indexed("this-export", export.sha256)
    notes: list[str] = []
    assert find_cached_engine(ckpt, notes=notes) == same
    assert any(n.startswith(other) and "another ONNX file" in n for n in notes)
    # No cached export at the engine's precision: nothing ties the engine to this checkpoint's graph.
    engine, skipped = pick_indexed_engine(str(index), model["preset"], model["source_sha256"], {**TARGET_4090, "export_revision": REVISION},
                                          SIZE, lambda precision: None)
    assert engine is None and any("no longer in the ONNX cache" in s for s in skipped)


@pytest.fixture
def fake_trt_build(monkeypatch, tmp_path):
    """engines.build --format tensorrt with the TensorRT builder and verify replaced: checks only
    the order in which build.py writes sidecar and cache index (no TensorRT here)."""
    from engines import build, trt_build
    from engines.backends import tensorrt_backend
    from engines.verify import Agreement

    monkeypatch.setattr(tensorrt_backend, "why_unavailable", lambda device=None: None)
    outcome = {"ok": True}

    def fake_build_engine(onnx_path, out_dir, **kw):
        return _fake_engine(out_dir, "student-key")

    def fake_verify(args, artefact, size):
        ok = outcome["ok"]
        return Agreement(ok, args.precision, 0.0 if ok else 0.5, 1.0 if ok else 0.2, 0, 3, [] if ok else ["max prob diff 5.00e-01 > 1e-03"])

    monkeypatch.setattr(trt_build, "build_engine", fake_build_engine)
    monkeypatch.setattr(build, "_verify", fake_verify)
    return outcome


def test_engine_indexed_only_after_a_passing_verify(ckpt, cache_root, tmp_path, fake_trt_build):
    from engines.build import main
    from engines.trt_build import index_path
    from engines.trt_common import read_sidecar

    entry = index_path("student-key")
    argv = ["--weights", ckpt, "--format", "tensorrt"]
    fake_trt_build["ok"] = False
    assert run(main, argv + ["--out", str(tmp_path / "a"), "--verify"]) == EXIT_VERIFY
    engine = str(tmp_path / "a" / "student-key.engine")
    side = read_sidecar(engine)
    assert side["verified"] is False and side["verification"]["problems"] and not os.path.exists(entry)

    assert run(main, argv + ["--out", str(tmp_path / "b")]) == 0  # no --verify: built, not indexed
    assert not os.path.exists(entry) and read_sidecar(str(tmp_path / "b" / "student-key.engine"))["verified"] is False

    fake_trt_build["ok"] = True
    assert run(main, argv + ["--out", str(tmp_path / "c"), "--verify"]) == 0
    good = str(tmp_path / "c" / "student-key.engine")
    assert read_sidecar(good)["verified"] is True
    with open(entry, encoding="utf-8") as f:
        assert json.load(f)["engine"] == os.path.abspath(good)

    # A later failing verify of an engine elsewhere leaves the verified one indexed.
    fake_trt_build["ok"] = False
    assert run(main, argv + ["--out", str(tmp_path / "d"), "--verify"]) == EXIT_VERIFY
    with open(entry, encoding="utf-8") as f:
        assert json.load(f)["engine"] == os.path.abspath(good)
    os.remove(entry)


def test_engine_for_other_gpu_falls_back(onnx_path, tmp_path, monkeypatch):
    """An engine built elsewhere: a clear message, then auto runs its source ONNX instead."""
    from engines.backends import tensorrt_backend
    from engines.trt_common import sidecar_path, write_json_atomic

    engine = tmp_path / "student.engine"
    engine.write_bytes(b"serialized for another GPU")
    write_json_atomic(sidecar_path(str(engine)), _sidecar(
        gpu_name="NVIDIA A100", compute_capability="8.0", sm_count=108, tensorrt_version="10.3.0", onnx=onnx_path))
    # This machine, as TensorRT would describe it (only the identity check runs; nothing is executed).
    monkeypatch.setattr(tensorrt_backend, "why_unavailable", lambda device=None: None)
    monkeypatch.setattr(tensorrt_backend, "current_target", lambda device=None: {
        "gpu_name": "NVIDIA L4", "compute_capability": "8.9", "sm_count": 58, "tensorrt_version": "11.0.0", "export_revision": REVISION})
    with pytest.raises(BackendError, match="cannot run here: TensorRT 10.3.0 built it, this is TensorRT 11.0.0"):
        load_backend(str(engine), backend="tensorrt")
    b = load_backend(str(engine))
    assert b.name == "onnxruntime" and b.path == onnx_path
    assert any(n.startswith("tensorrt skipped:") and "rebuild" in n for n in b.notes)
    assert b.predict(synthetic_frames(1, SIZE)).shape == (1, SIZE, SIZE)


# ---------------------------------------------------------------- ONNX graph dtypes (TensorRT's UINT8 rule)


@pytest.fixture(scope="session")
def onnx_fp16(ckpt, onnx_path):
    from engines.backends.onnxruntime_backend import cached_onnx_for_checkpoint

    return cached_onnx_for_checkpoint(ckpt, SIZE, precision="fp16")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_no_uint8_tensor_inside_exported_graph(request, precision):
    """TensorRT takes UINT8 only as a network input/output: after shape inference, the graph
    input must be the only UINT8 tensor, with the Cast right after it (then the Transpose)."""
    import onnx

    from engines.export import read_onnx_metadata, uint8_tensors

    path = request.getfixturevalue("onnx_path" if precision == "fp32" else "onnx_fp16")
    proto = onnx.load(path)
    assert uint8_tensors(proto) == ["frames"]
    assert uint8_tensors(proto, include_inputs=False) == []
    consumers = [n.op_type for n in proto.graph.node if "frames" in n.input]
    assert consumers == ["Cast"]
    meta = read_onnx_metadata(path)
    assert meta["precision"] == precision and meta["export_revision"] == REVISION
    assert path.endswith(f"-{precision}-r{REVISION}.onnx") or path.endswith(f"-{precision}.onnx")


def test_uint8_check_sees_a_transpose_before_the_cast():
    """The revision-2 graph shape (Transpose on uint8, then Cast) is what the check must catch."""
    from onnx import TensorProto, helper

    from engines.export import uint8_tensors

    graph = helper.make_graph(
        [helper.make_node("Transpose", ["frames"], ["nchw"], perm=[0, 3, 1, 2]), helper.make_node("Cast", ["nchw"], ["x"], to=TensorProto.FLOAT)],
        "old", [helper.make_tensor_value_info("frames", TensorProto.UINT8, ["N", 8, 8, 3])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert uint8_tensors(model, include_inputs=False) == ["nchw"]


# ---------------------------------------------------------------- install: extras, driver/runtime versions


def test_trt_extras_pin_one_cuda_major_each():
    import tomllib

    from packaging.requirements import Requirement

    from engines.trt_common import TRT_EXTRAS, recommended_extra

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    for major, name in TRT_EXTRAS.items():
        reqs = {r.name: r for r in map(Requirement, extras[name])}
        assert set(reqs) == {f"tensorrt-cu{major}", "cuda-bindings"}, name  # never the bare `tensorrt` metapackage
        bindings = reqs["cuda-bindings"].specifier
        assert bindings.contains(f"{major}.9.0") and not bindings.contains(f"{major + 1}.0.0") and not bindings.contains(f"{major - 1}.9.0")
    trt12 = Requirement(next(r for r in extras["trt-cu12"] if r.startswith("tensorrt"))).specifier
    assert trt12.contains("10.16.1.11") and not trt12.contains("11.0.0")  # TensorRT 10: unpinned it resolves to 11
    # The default PyPI torch (a CUDA 13 build) requires cuda-bindings>=13.0.3,<14: [trt-cu13] allows exactly those.
    assert Requirement(next(r for r in extras["trt-cu13"] if r.startswith("cuda-bindings"))).specifier.contains("13.0.3")
    assert extras["trt"] == ["kdas[trt-cu12]"]
    assert not any(Requirement(r).name == "tensorrt" for reqs in extras.values() for r in reqs)
    assert recommended_extra(12040) == "trt-cu12" and recommended_extra(12090) == "trt-cu12"
    assert recommended_extra(13000) == "trt-cu13" and recommended_extra(14010) == "trt-cu13"
    assert recommended_extra(11080) is None


def test_driver_mismatch_names_versions_and_extra():
    from engines.trt_common import driver_mismatch_hint

    text = driver_mismatch_hint({"driver": 12040, "runtime": 13000, "driver_text": "12.4", "runtime_text": "13.0", "cuda_bindings": "13.0.1"})
    assert "CUDA driver 12.4" in text and "CUDA runtime 13.0" in text and "cuda-bindings 13.0.1" in text and "[trt-cu12]" in text
    assert "no NVIDIA driver" in driver_mismatch_hint({"driver": 0, "runtime": 12090, "driver_text": "none", "runtime_text": "12.9", "cuda_bindings": "12.9.0"})


def test_real_cuda_bindings_without_driver_reports_versions():
    """Runs the real cuda-bindings where it is installed and no NVIDIA driver is (this CI)."""
    from engines.trt_common import cuda_versions, gpu_info, import_cudart

    try:
        import_cudart()
    except BackendError as exc:
        pytest.skip(f"cuda-bindings not installed: {exc}")
    versions = cuda_versions()
    if versions["driver"]:
        pytest.skip(f"an NVIDIA driver is installed (CUDA {versions['driver_text']}); this test is for machines without one")
    with pytest.raises(BackendError) as err:
        gpu_info(0)
    msg = str(err.value)
    assert "cudaGetDeviceCount" in msg and f"CUDA runtime {versions['runtime_text']}" in msg and "CUDA driver none" in msg


# ---------------------------------------------------------------- ONNX Runtime providers


def test_ort_provider_options_device_and_fp16(tmp_path):
    from engines.backends.onnxruntime_backend import gpu_provider_options

    have = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    (trt, trt_opts), (cuda, cuda_opts), cpu = gpu_provider_options(have, "cuda:1", True, str(tmp_path))
    assert (trt, cuda, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert trt_opts["device_id"] == 1 and trt_opts["trt_fp16_enable"] is True and trt_opts["trt_engine_cache_enable"] is True
    assert cuda_opts == {"device_id": 1}
    assert [p[0] if isinstance(p, tuple) else p for p in gpu_provider_options(have, "cuda", False, str(tmp_path), use_trt=False)] == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert gpu_provider_options(["CPUExecutionProvider"], None, False, str(tmp_path)) == []
    with pytest.raises(BackendError, match="cuda:N"):
        gpu_provider_options(have, "gpu1", False, str(tmp_path))


def test_ort_silent_cpu_fallback_is_said(onnx_path):
    """A real CPU session stands in for ORT having dropped the CUDA provider it was given."""
    from engines.backends.onnxruntime_backend import OnnxRuntimeBackend

    b = OnnxRuntimeBackend(onnx_path, device="cpu")
    b.providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    b.device = None  # auto: a note, and it runs on
    b._check_active(b._session)
    assert b.active_providers == ["CPUExecutionProvider"]
    assert any("asked for ['CUDAExecutionProvider'] but runs on ['CPUExecutionProvider']" in n for n in b.notes)
    b.device = "cuda:0"  # asked for a GPU: an error
    with pytest.raises(BackendError, match="runs on \\['CPUExecutionProvider'\\]"):
        b._check_active(b._session)


def test_ort_cpu_and_gpu_wheels_together_are_named(monkeypatch):
    from importlib import metadata

    from engines.backends import onnxruntime_backend

    monkeypatch.setattr(metadata, "version", lambda name: {"onnxruntime": "1.22.0", "onnxruntime-gpu": "1.22.0"}[name])
    problem = onnxruntime_backend.ort_install_problem()
    assert "onnxruntime 1.22.0 and onnxruntime-gpu 1.22.0" in problem and "pip uninstall -y onnxruntime onnxruntime-gpu" in problem

    def only_cpu(name):
        if name == "onnxruntime-gpu":
            raise metadata.PackageNotFoundError(name)
        return "1.22.0"

    monkeypatch.setattr(metadata, "version", only_cpu)
    assert onnxruntime_backend.ort_install_problem() is None


# ---------------------------------------------------------------- sticky CUDA errors: fall back to CPU


@pytest.mark.parametrize("message, sticky", [
    ("CUDA error: an illegal memory access was encountered", True),  # torch
    ("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 700: an illegal memory access was encountered", True),
    ("CUDA error in cudaStreamSynchronize: cudaErrorLaunchFailure (unspecified launch failure)", True),
    ("CUDA error: device-side assert triggered", True),
    ("CUDA error: no kernel image is available for execution on the device", False),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("engine was built for another GPU", False),
])
def test_sticky_cuda_errors_are_recognised(message, sticky):
    from engines import is_sticky_cuda_error

    assert is_sticky_cuda_error(RuntimeError(message)) is sticky
    try:
        try:
            raise RuntimeError(message)
        except RuntimeError as inner:
            raise BackendError("tensorrt backend failed") from inner
    except BackendError as outer:
        assert is_sticky_cuda_error(outer) is sticky  # found through the cause chain


class _Tiny:
    def __init__(self, name, fail_at=None):
        self.name, self.input_size, self.threshold, self.notes, self.calls = name, (8, 8), 0.5, [], 0
        self.fail_at = fail_at

    def predict(self, frames):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return np.zeros(frames.shape[:3], np.float32)

    def close(self):
        pass


def test_open_backend_after_sticky_error_falls_back_on_cpu():
    from app.pipeline.inference import open_backend

    calls = []

    def factory(path, backend, device=None, threads=None):
        calls.append((backend, device))
        return _Tiny(backend, fail_at=1 if backend == "tensorrt" else None)

    notices = []
    b = open_backend("m.engine", "tensorrt", factory=factory, device="cuda:0", notice=notices.append)
    assert b.name == "onnxruntime" and calls == [("tensorrt", "cuda:0"), ("onnxruntime", "cpu")]
    assert any("runs on the CPU" in n for n in notices)


def test_inference_stage_runtime_sticky_error_reloads_on_cpu():
    import time as _time

    from app.pipeline.inference import InferenceStage
    from app.pipeline.items import Frame

    calls, notices = [], []

    class Events:
        def notice(self, text, kind="info"):
            notices.append(text)

        def model_ready(self, info):
            pass

        def fatal(self, text):
            notices.append(text)

    class Stats:
        def inference(self, ms):
            pass

    def factory(path, backend, device=None, threads=None):
        calls.append((backend, device))
        return _Tiny(backend, fail_at=2 if backend == "tensorrt" else None)  # warm-up passes, first frame fails

    stage = InferenceStage("m.engine", "tensorrt", None, None, stats_ref=Stats, events=Events(), factory=factory, device="cuda:0")
    stage._load("tensorrt", ())
    frame = Frame(index=0, pts=0.0, image=np.zeros((8, 8, 3), np.uint8), t_capture=_time.perf_counter(), model_input=np.zeros((8, 8, 3), np.uint8))
    out = stage._infer(frame)
    assert out.probs.shape == (8, 8)
    assert calls == [("tensorrt", "cuda:0"), ("onnxruntime", "cpu")] and stage.info.backend == "onnxruntime"


# ---------------------------------------------------------------- one TensorRT logger


def test_one_tensorrt_logger_per_process():
    """Only trt_common.trt_logger() makes a TensorRT logger; builder and runtime both use it."""
    import ast

    makers = []
    for root, _dirs, files in os.walk(os.path.join(REPO, "engines")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                tree = ast.parse(open(path, encoding="utf-8").read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("Logger", "ILogger"):
                        makers.append(os.path.relpath(path, REPO))
                    if isinstance(node, ast.ClassDef) and any(isinstance(b, ast.Attribute) and b.attr == "ILogger" for b in node.bases):
                        makers.append(os.path.relpath(path, REPO) + ":" + node.name)
    assert makers == ["engines/trt_common.py:_Logger"]
    for module in ("trt_build", "backends/tensorrt_backend"):
        assert "trt_logger()" in open(os.path.join(REPO, "engines", module + ".py"), encoding="utf-8").read()


def test_log_recorder_returns_what_was_said_since_a_mark():
    from engines.trt_common import LogRecorder

    rec = LogRecorder(keep=3)
    rec.add("WARNING", "old")
    mark = rec.mark()
    rec.add("INFO", "chatter")
    rec.add("ERROR", "Serialization assertion failed")
    assert rec.since(mark) == "Serialization assertion failed"
    for i in range(5):
        rec.add("ERROR", f"e{i}")
    assert rec.since(mark) == "e2 | e3 | e4"  # only what the ring buffer kept


# ---------------------------------------------------------------- bench


def test_bench_json(onnx_path, tmp_path):
    from engines.bench import main

    out = tmp_path / "bench.json"
    assert run(main, ["--weights", onnx_path, "--backend", "onnxruntime", "--runs", "3", "--warmup", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["backend"] == "onnxruntime"
    assert 0 < doc["latency_ms_p50"] <= doc["latency_ms_p95"]
    assert doc["throughput_fps"] > 0


def test_bench_compare_json(onnx_path, tmp_path):
    from engines.bench import main

    out = tmp_path / "compare.json"
    argv = ["--compare", "--weights", onnx_path, "--backend", "onnxruntime,torch", "--device", "cpu", "--runs", "2", "--warmup", "0", "--batch-size", "2", "--json", str(out)]
    assert run(main, argv) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["backend"] for r in results] == ["onnxruntime", "torch"]
    assert results[0]["ratio_p50_to_first"] == 1.0
    assert all(r["batch"] == 2 and r["runs"] == 2 and r["latency_ms_p50"] > 0 for r in results)


def test_bench_compare_runs_each_model_at_its_own_size_and_says_so(ckpt, capsys):
    """Without --image-size each model runs at its own input size (a 256 student against a 352
    preset is the comparison a deployment decision needs): the table names every row's size."""
    from engines.bench import main

    import kdas_core.io.checkpoint as kc

    size = int(kc.read_metadata(ckpt)["input_size"])
    argv = ["--compare", "--weights", ckpt, "--model", "polyppvt-lite0", "--backend", "torch", "--device", "cpu",
            "--runs", "1", "--warmup", "0"]
    assert run(main, argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "[torch]" in line]
    assert len(rows) == 2 and f"{size}x{size}" in rows[0] and "352x352" in rows[1]


def test_bench_old_spellings_still_work_and_warn(onnx_path, capsys):
    from engines.bench import parse_args

    args = parse_args(["--compare", "--model", onnx_path, "--model", "preset:polyppvt-lite0", "--model", "polyppvt-b0", "--batch", "2"])
    assert args.model == [onnx_path, "preset:polyppvt-lite0", "preset:polyppvt-b0"] and args.batch == 2
    err = capsys.readouterr().err
    assert f"--model {onnx_path} is deprecated" in err and f"use --weights {onnx_path}" in err
    assert "use --model polyppvt-lite0" in err and "--batch is deprecated" in err and "use --batch-size" in err
    assert "--model polyppvt-b0 is deprecated" not in err  # the new spelling says nothing


def test_bench_help_lists_only_exit_codes_it_can_return():
    from engines.bench import EPILOG

    codes = [line.split()[0] for line in EPILOG.split("exit status")[1].splitlines()[1:] if line.strip()]
    assert codes == ["0", "1", "2", "4", "130"]


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

        assert run(bench_main, ["--weights", ckpt, "--backend", "tensorrt"]) == EXIT_UNAVAILABLE


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

    for argv in ([], ["--weights", onnx_path, "--backend", "tflite"], ["--weights", onnx_path, "--weights", onnx_path], ["--weights", onnx_path, "--runs", "0"]):
        with pytest.raises(SystemExit) as exc:
            run(main, argv)
        assert exc.value.code == 2, argv


@pytest.mark.parametrize("case", ["the checkpoint", "a file name", "under a file", "a data folder", "unwritable"])
def test_build_checks_its_output_folder_against_its_inputs_before_exporting(tmp_path, capsys, case):
    from engines.build import main
    from engines.cli_common import EXIT_USAGE, run

    from .conftest import STUDENT

    ckpt = tmp_path / "ck.safetensors"
    shutil.copyfile(STUDENT, ckpt)
    frames = tmp_path / "frames"
    frames.mkdir()
    out, expect = {
        "the checkpoint": (ckpt, "is an input of this command"),
        "a file name": (tmp_path / "model.onnx", "--out is a folder"),
        "under a file": (ckpt / "deploy", "is a file, so no folder can be made"),
        "a data folder": (frames, "is an input of this command"),
        "unwritable": (Path("/proc/kdas-out"), "cannot create files in /proc"),
    }[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc = run(main, ["--weights", str(ckpt), "--out", str(out), "--verify", "--verify-frames", str(frames)])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and expect in err and f"--out {out}" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing exported, nothing made
    assert ckpt.read_bytes() == Path(STUDENT).read_bytes()


def test_build_says_what_it_takes_for_an_onnx_file_and_takes_a_run_folders_best(tmp_path, capsys):
    import shutil

    from engines.build import main
    from engines.cli_common import EXIT_USAGE, run

    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not used")
    rc = run(main, ["--weights", str(onnx_file), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and "takes a .safetensors checkpoint" in err and "already an export" in err
    assert "safetensors file" not in err.replace(".safetensors checkpoint", "")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rc = run(main, ["--weights", str(run_dir), "--out", str(tmp_path / "out")])
    assert rc == EXIT_USAGE and "no best.safetensors" in capsys.readouterr().err
    from .conftest import STUDENT

    shutil.copyfile(STUDENT, run_dir / "best.safetensors")
    from engines import build

    picked = build.resolve_weights(str(run_dir))
    assert picked == str(run_dir / "best.safetensors") and "best.safetensors" in capsys.readouterr().err
