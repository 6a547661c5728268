"""engines.selfcheck: its CPU run, its skip list and its exit-code rule.

Shares the small random-init checkpoint and the export cache of tests/test_engines.py (the same
session fixtures), so the ONNX exports it checks are made once per test session.
"""

from __future__ import annotations

import json

import pytest

from engines.cli_common import EXIT_OK, EXIT_USAGE, EXIT_VERIFY, run
from engines.selfcheck import CHECK_NAMES, CHECKS, exit_code, main

from .test_engines import SIZE, cache_root, ckpt  # noqa: F401  (session fixtures)

GPU_CHECKS = [name for name, gpu, _ in CHECKS if gpu]
CPU_CHECKS = [name for name, gpu, _ in CHECKS if not gpu]


@pytest.fixture(scope="module")
def report(ckpt, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("selfcheck")
    path = out / "report.json"
    rc = run(main, ["--weights", ckpt, "--image-size", str(SIZE), "--out", str(out / "engines"), "--json", str(path), "--runs", "3"])
    return rc, json.loads(path.read_text())


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


def test_gpu_checks_skipped_here_with_reasons(report):
    from engines.backends.tensorrt_backend import why_unavailable

    reason = why_unavailable("cuda:0")
    if reason is None:
        pytest.skip("TensorRT and a GPU are here: the GPU checks ran (see the report)")
    rc, doc = report
    by = {c["name"]: c for c in doc["checks"]}
    for name in GPU_CHECKS:
        assert by[name]["status"] == "skipped", by[name]
    for name in (n for n in GPU_CHECKS if n.startswith("trt_")):
        assert reason in by[name]["reason"]
    assert "CUDAExecutionProvider" in by["ort_cuda"]["reason"] or "CUDA" in by["ort_cuda"]["reason"]
    assert rc == EXIT_OK  # skipped checks do not fail the run


def test_exit_code_rule():
    ok = {"status": "pass"}
    skipped = {"status": "skipped"}
    assert exit_code([ok, skipped]) == EXIT_OK
    assert exit_code([ok, {"status": "fail"}, skipped]) == EXIT_VERIFY


def test_usage_errors(tmp_path, ckpt):  # noqa: F811
    assert run(main, ["--weights", str(tmp_path / "missing.safetensors")]) == EXIT_USAGE
    assert run(main, ["--weights", ckpt, "--json", str(tmp_path / "no" / "such" / "dir" / "r.json")]) == EXIT_USAGE
