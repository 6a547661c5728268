"""engines.selfcheck: its CPU run, its skip list and its exit-code rule, the checks that need
PyAV, TensorRT or CUDA exercised on CPU with those made missing or their GPU parts stood in for.

Shares the small random-init checkpoint and the export cache of tests/test_engines.py (the same
session fixtures), so the ONNX exports it checks are made once per test session.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from engines.cli_common import EXIT_OK, EXIT_USAGE, EXIT_VERIFY, run
from engines.selfcheck import CHECK_NAMES, CHECKS, SelfCheck, Skip, exit_code, main

from .test_engines import SIZE, TARGET_4090, _fake_engine, _sidecar, cache_root, ckpt  # noqa: F401  (session fixtures)

GPU_CHECKS = [name for name, gpu, _ in CHECKS if gpu]
CPU_CHECKS = [name for name, gpu, _ in CHECKS if not gpu]


@pytest.fixture(scope="module")
def report(ckpt, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("selfcheck")
    path = out / "report.json"
    rc = run(main, ["--weights", ckpt, "--out", str(out / "engines"), "--json", str(path), "--runs", "3", "--threads", "1"])
    return rc, json.loads(path.read_text())


def _checker(ckpt, tmp_path, **kw):  # noqa: F811
    return SelfCheck(ckpt, None, kw.pop("device", "cuda:0"), str(tmp_path), 3, lambda msg: None, threads=1, **kw)


def _no_nvidia_gpu() -> bool:
    from engines.trt_common import has_nvidia_gpu

    return not has_nvidia_gpu()


def test_every_check_reported_once_with_status_and_reason(report):
    _rc, doc = report
    checks = doc["checks"]
    assert [c["name"] for c in checks] == CHECK_NAMES
    for c in checks:
        assert c["status"] in ("pass", "fail", "skipped")
        assert isinstance(c["reason"], str) and isinstance(c["seconds"], float)
        if c["status"] != "pass":
            assert c["reason"], c
    assert doc["summary"]["pass"] + doc["summary"]["fail"] + doc["summary"]["skipped"] == len(CHECK_NAMES)


def test_cpu_checks_run_and_pass(report):
    rc, doc = report
    by = {c["name"]: c for c in doc["checks"]}
    assert {n: by[n]["status"] for n in CPU_CHECKS} == {n: "pass" for n in CPU_CHECKS}, [by[n] for n in CPU_CHECKS]
    assert by["export_fp32"]["details"]["uint8_tensors"] == ["frames"] and by["export_fp32"]["details"]["first_op"] == "Cast"
    assert by["export_fp16"]["details"]["uint8_tensors"] == ["frames"]
    assert by["ort_cpu_parity"]["details"]["4"]["max_abs_diff"] <= 1e-3
    assert by["verify_frames"]["details"]["frames"] >= 1
    assert rc == exit_code(doc["checks"])


def test_built_at_the_checkpoints_own_size_by_default(report, ckpt, tmp_path):  # noqa: F811
    _rc, doc = report
    assert doc["image_size"] == doc["checkpoint_size"] == SIZE  # the size the app's auto looks engines up at
    assert _checker(ckpt, tmp_path).size == SIZE
    assert SelfCheck(ckpt, 2 * SIZE, "cuda:0", str(tmp_path), 3, print).size == 2 * SIZE  # --image-size overrides


@pytest.mark.skipif(not _no_nvidia_gpu(), reason="an NVIDIA GPU is here: the GPU checks ran (see the report)")
def test_without_nvidia_gpu_every_gpu_check_skips_saying_so(report):
    rc, doc = report
    by = {c["name"]: c for c in doc["checks"]}
    for name in GPU_CHECKS:
        assert by[name]["status"] == "skipped", by[name]
        assert "no NVIDIA GPU on this machine" in by[name]["reason"], by[name]
        assert "nvidia-smi" not in by[name]["reason"] and "pip install" not in by[name]["reason"], by[name]
    for name in (n for n in GPU_CHECKS if n.startswith("trt_")):
        assert by[name]["reason"] == "needs an NVIDIA GPU: no NVIDIA GPU on this machine (TensorRT needs one)"
    assert doc["device"] == "cpu" and doc["gpu"] is None
    assert rc == EXIT_OK  # skipped checks do not fail the run


def test_header_names_a_gpu_only_when_there_is_one(monkeypatch):
    import torch

    from engines import selfcheck

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(selfcheck, "has_nvidia_gpu", lambda: False)
    line, gpu = selfcheck.machine_line("cuda:0", 2, 15)
    assert gpu is None and "cuda:0" not in line and line == "on 2 CPU threads (no NVIDIA GPU here: the 15 GPU checks are skipped)"
    monkeypatch.setattr(selfcheck, "has_nvidia_gpu", lambda: True)  # a driver, but a CPU-only torch
    line, gpu = selfcheck.machine_line("cuda:0", 2, 15)
    assert gpu is None and "cuda:0" not in line and "sees no CUDA GPU" in line


def test_with_a_gpu_but_no_tensorrt_the_skip_names_the_package(ckpt, tmp_path, monkeypatch):  # noqa: F811
    from engines import selfcheck
    from engines.backends import tensorrt_backend

    monkeypatch.setattr(selfcheck, "has_nvidia_gpu", lambda: True)
    monkeypatch.setattr(tensorrt_backend, "why_unavailable", lambda device=None: (
        "TensorRT is not available (ModuleNotFoundError: No module named 'tensorrt'); install the TensorRT extra ..."))
    with pytest.raises(Skip, match="needs TensorRT and cuda-bindings: .*No module named 'tensorrt'"):
        _checker(ckpt, tmp_path)._need_gpu_stack("trt_build_fp32")


def test_without_pyav_and_pyqt6_the_cpu_checks_run(ckpt, tmp_path, monkeypatch):  # noqa: F811
    """What a bare CUDA machine lacks, made unimportable: verify frames come from the demo clip's
    generator, the CPU checks still pass, and the pipeline check names PyAV as what it needs."""
    monkeypatch.setitem(sys.modules, "av", None)
    monkeypatch.setitem(sys.modules, "PyQt6", None)
    checker = _checker(ckpt, tmp_path, device="cpu")
    for name in ("versions", "export_fp32", "verify_frames", "ort_cpu_parity"):
        checker._one(name, getattr(checker, f"check_{name}"), False)
    by = {r["name"]: r for r in checker.results}
    assert [by[n]["status"] for n in by] == ["pass"] * 4, checker.results
    assert "rendered by its generator" in by["verify_frames"]["reason"] and "PyAV" in by["verify_frames"]["reason"]
    assert by["versions"]["details"]["pyav"].startswith("absent (av is not installed")
    assert by["versions"]["details"]["pyqt6"].startswith("absent (PyQt6 is not installed")
    with pytest.raises(Skip, match=r"needs PyAV \(pip install av\).*av is not installed"):
        checker.check_app_pipeline()


def test_app_pipeline_check_reports_fps_latency_and_drops(ckpt, tmp_path, monkeypatch):  # noqa: F811
    """The check itself, on CPU with a small clip (on a GPU machine: 1080p, the best GPU backend):
    `python -m app --headless` run as a command, its --stats JSON read back."""
    pytest.importorskip("av", reason="PyAV is not installed: the pipeline check needs it to make and decode the clip")
    checker = _checker(ckpt, tmp_path, device="cpu", clip_size=(160, 96), clip_frames=6)
    text, details = checker.check_app_pipeline()
    assert details["exit_code"] == 0 and details["frames_out"] == details["frames_in"] == 6 and details["dropped"] == 0
    assert details["fps"] > 0 and details["latency_ms_p50"] > 0 and details["backend"] == "onnxruntime"
    assert details["clip"] == {**details["clip"], "width": 160, "height": 96, "frames": 6}
    assert "160x96, 6 frames through onnxruntime" in text
    assert not [n for n in os.listdir(tmp_path) if n.startswith("selfcheck-app-")]  # the clip and recording are removed


def test_auto_finds_check_passes_only_for_an_engine_of_this_export(ckpt, tmp_path, monkeypatch):  # noqa: F811
    """load_backend(auto) with TensorRT stood in for (sidecars only; nothing is deserialised)."""
    from engines import ModelSource
    from engines.backends import tensorrt_backend
    from engines.backends.onnxruntime_backend import cached_onnx_export
    from engines.export import REVISION
    from engines.selfcheck import CheckFailed
    from engines.trt_common import write_json_atomic
    from kdas_core.io.checkpoint import file_sha256, read_metadata

    export = cached_onnx_export(ModelSource(ckpt), SIZE, precision="fp32")
    index = tmp_path / "index"
    monkeypatch.setattr(tensorrt_backend, "why_unavailable", lambda device=None: None)
    monkeypatch.setattr(tensorrt_backend, "current_target", lambda device=None: {**TARGET_4090, "export_revision": REVISION})
    monkeypatch.setattr(tensorrt_backend, "cache_dir", lambda kind: str(index))
    model = {"source_sha256": file_sha256(ckpt), "preset": read_metadata(ckpt)["preset"], "precision": "fp32", "verified": True}

    def indexed(name, onnx_sha):
        engine = _fake_engine(tmp_path / "engines", name, onnx_sha256=onnx_sha, **model)
        write_json_atomic(str(index / f"{name}.json"), {**_sidecar(onnx_sha256=onnx_sha, **model), "engine": engine})
        return engine

    checker = _checker(ckpt, tmp_path)
    checker.engines = {"fp32": indexed("other-export", "ee" * 32)}
    with pytest.raises(CheckFailed, match="not an engine built here"):  # auto went past TensorRT
        checker.check_trt_auto_finds()
    checker.engines = {"fp32": indexed("this-export", export.sha256)}
    text, details = checker.check_trt_auto_finds()
    assert details["picked"] == "tensorrt" and details["app_default_lookup"] and "this-export.engine" in text


def test_training_speed_command_is_bench_train_on_cuda_with_amp():
    from engines.selfcheck import bench_train_argv
    from kdas_core.bench_train import build_parser
    from kdas_core.training.config import config_from_args

    argv = bench_train_argv("polyppvt-lite0", "DATA", "cuda:0", 256, "out.json", threads=4)
    ns = build_parser().parse_args(argv)
    ns.out = "-"
    cfg = config_from_args(ns)
    assert (cfg.device, cfg.amp, cfg.image_size, cfg.model, cfg.threads) == ("cuda:0", True, 256, "polyppvt-lite0", 4)
    assert (ns.steps, ns.warmup, ns.json) == (20, 5, "out.json")


def test_torch_cuda_graphs_are_refused_on_cpu(ckpt):  # noqa: F811
    from engines import BackendError
    from engines.backends.torch_backend import TorchBackend

    with pytest.raises(BackendError, match="CUDA graphs need a CUDA device"):
        TorchBackend(ckpt, device="cpu", cuda_graph=True)


def test_exit_code_rule():
    ok = {"status": "pass"}
    skipped = {"status": "skipped"}
    assert exit_code([ok, skipped]) == EXIT_OK
    assert exit_code([ok, {"status": "fail"}, skipped]) == EXIT_VERIFY


def test_usage_errors(tmp_path, ckpt):  # noqa: F811
    assert run(main, ["--weights", str(tmp_path / "missing.safetensors")]) == EXIT_USAGE
    assert run(main, ["--weights", ckpt, "--json", str(tmp_path / "no" / "such" / "dir" / "r.json")]) == EXIT_USAGE
    assert run(main, ["--weights", ckpt, "--verify-frames", str(tmp_path / "nowhere")]) == EXIT_USAGE
    assert run(main, ["--weights", ckpt, "--train-data", str(tmp_path / "nowhere")]) == EXIT_USAGE
    for bad in (["--threads", "0"], ["--device", "gpu0"]):
        with pytest.raises(SystemExit) as exc:
            main(["--weights", ckpt, *bad])
        assert exc.value.code == EXIT_USAGE


def test_rendered_demo_frames_are_the_demo_clips_frames():
    """Without PyAV the clip's generator stands in for the clip: same seed, same length, same pictures."""
    av = pytest.importorskip("av", reason="PyAV is not installed: nothing to decode the clip with to compare")
    import numpy as np

    from engines.verify import DEMO_CLIP_FRAMES, DEMO_CLIP_SEED
    from kdas_core.io.assets import DEMO_CLIP
    from kdas_core.data.synthetic import render_clip

    with av.open(str(DEMO_CLIP)) as container:
        stream = container.streams.video[0]
        frames, width = stream.frames, stream.width
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert frames == DEMO_CLIP_FRAMES
    rendered, _mask = next(render_clip(1, width, DEMO_CLIP_SEED))
    assert np.abs(decoded.astype(np.int16) - rendered).mean() < 5  # H.264 at crf 22, nothing more
