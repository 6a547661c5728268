"""python -m engines.selfcheck: one command that checks the whole deploy path on this machine.

Run it first on a GPU machine: it needs nothing but the base install (no PyAV, PyQt6, TensorRT
or onnxruntime-gpu), runs every check whose packages and hardware are there, and writes every
figure into --json. With TensorRT it builds the checkpoint in fp32 and fp16 at the checkpoint's
own size (shared timing cache) through `engines.build --verify`, checks that `load_backend(auto)`
then finds those engines, TensorRT at batches 1, 2 and 4 against PyTorch fp32, CUDA graphs against
the plain path at alternating batch sizes, building in one thread while predicting in another,
the rejection of foreign and truncated engines, and that a failed verify leaves nothing in the
engine cache. With PyTorch on CUDA: fp16 and CUDA graphs against CPU fp32, p50/p95 latency at
batch 1 and 4 of every GPU path, the app's headless pipeline on a 1080p clip made on the spot
(needs PyAV: fps, latency, dropped frames), and the training speed of the student and the
teacher (`kdas_core.bench_train --device cuda`, AMP). On a CPU-only machine it runs the CPU parts
and lists every GPU check as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import numpy as np

from kdas_core.io.atomic import write_json
from kdas_core.cli.conventions import Parser, name_some
from kdas_core.models.presets import DEFAULT_THRESHOLD, image_size_arg

from .cli_common import EXIT_OK, EXIT_VERIFY, run
from .errors import BackendError
from .trt_common import NO_GPU_REASON, has_nvidia_gpu

# (name, needs a GPU, what it checks): the full list, in the order it runs.
CHECKS: list[tuple[str, bool, str]] = [
    ("versions", False, "driver, CUDA runtime, TensorRT, cuda-bindings, ONNX Runtime providers, torch, PyAV, PyQt6"),
    ("ort_install", False, "onnxruntime and onnxruntime-gpu are not installed side by side"),
    ("export_fp32", False, "fp32 ONNX export: no UINT8 tensor but the graph input (TensorRT rule)"),
    ("export_fp16", False, "fp16 ONNX export: no UINT8 tensor but the graph input (TensorRT rule)"),
    ("verify_frames", False, "frames where the PyTorch reference finds a polyp: --verify-frames, the demo clip, or "
                             "(without PyAV) the demo clip's frames rendered by its generator"),
    ("ort_cpu_parity", False, "ONNX Runtime CPU (fp32 graph) vs PyTorch fp32, batches 1, 2, 4: max diff <= 1e-3"),
    ("ort_cpu_fp16", False, "ONNX Runtime CPU running the fp16 graph vs PyTorch fp32: the fp16 verify rule"),
    ("trt_build_fp32", True, "engines.build --format tensorrt --precision fp32 --verify"),
    ("trt_build_fp16", True, "engines.build --format tensorrt --precision fp16 --verify (shared timing cache)"),
    ("trt_auto_finds", True, "load_backend(checkpoint, 'auto'), as the app calls it, picks an engine just built"),
    ("trt_parity_fp32", True, "TensorRT fp32 engine vs PyTorch fp32, batches 1, 2, 4: max diff <= 1e-3"),
    ("trt_parity_fp16", True, "TensorRT fp16 engine vs PyTorch fp32, batches 1, 2, 4: the fp16 verify rule"),
    ("trt_cuda_graph", True, "CUDA graphs vs the plain path at alternating batch sizes"),
    ("trt_threads", True, "an engine builds in one thread while another thread predicts"),
    ("trt_reject_version", True, "an engine whose sidecar names another TensorRT version is refused"),
    ("trt_reject_truncated", True, "a truncated engine is refused, with TensorRT's words"),
    ("trt_failed_verify", True, "an engine that fails verify stays out of the engine cache index"),
    ("ort_cuda", True, "ONNX Runtime's CUDA provider is really the one running"),
    ("torch_fp16", True, "PyTorch fp16 on CUDA vs CPU fp32, batches 1, 2, 4: the fp16 verify rule"),
    ("torch_cuda_graph", True, "PyTorch fp16 on CUDA with CUDA graphs vs CPU fp32, batches 1, 2, 4: the fp16 verify rule"),
    ("latency", True, "p50/p95 latency at batch 1 and 4: torch fp16 plain and CUDA graph, TensorRT plain and CUDA graph, "
                      "ONNX Runtime CUDA (interleaved)"),
    ("app_pipeline", True, "the app's headless pipeline (python -m app CLIP --headless) on a 1080p clip made here, "
                           "through the best backend that passed: fps, latency, dropped frames"),
    ("train_speed_student", True, "python -m kdas_core.bench_train --device cuda (AMP) with the checkpoint's preset and size"),
    ("train_speed_teacher", True, "python -m kdas_core.bench_train --device cuda (AMP) with the bundled teacher's preset and size"),
]
CHECK_NAMES = [c[0] for c in CHECKS]
BATCHES = (1, 2, 4)
LATENCY_BATCHES = (1, 4)
CLIP_SIZE = (1920, 1080)  # the app-pipeline clip: a 1080p endoscopy tower's output
CLIP_FRAMES, CLIP_FPS = 150, 25
TRAIN_STEPS, TRAIN_WARMUP, TRAIN_TIMEOUT_S = 20, 5, 150
APP_TIMEOUT_S = 300  # the headless app on the 1080p clip
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_TRAIN_DATA = os.path.join(REPO, "..", "shared", "data", "polyp-352")

DESCRIPTION = __doc__.split("\n", 2)[2].strip() + """

Each check prints one line: pass, fail or skipped (with the reason, naming what is missing).
--json writes one entry per check: {"name", "status", "reason", "seconds", "details"}; the
figures (parity, latency, pipeline fps, training speed) are in "details". Engines go to --out
(default: a folder in the KDAS cache), verified ones into the engine cache index as
`engines.build` does. On a GPU machine it takes a few minutes (TensorRT builds: several more
the first time; ONNX exports are cached for the next run).
"""

EPILOG = """\
examples:
  python -m engines.selfcheck --json selfcheck.json   # first thing on a GPU machine
  python -m engines.selfcheck --json r.json --device cuda:1 --verify-frames ../shared/data/polyp-352/TestDataset/Kvasir/images
  python -m engines.selfcheck --threads 2             # CPU only: the CPU checks, on 2 threads

exit codes:
  0  every check that ran passed (skipped ones do not count)
  2  usage error: missing or unreadable checkpoint, unwritable --json, no --verify-frames or
     --train-data folder (a missing GPU or package is never an error: those checks are skipped)
  3  at least one check failed (see its reason)
"""


class CheckFailed(Exception):
    """A check ran and found a problem; `details` go into the report."""

    def __init__(self, reason: str, details: dict | None = None):
        super().__init__(reason)
        self.details = details or {}


class Skip(Exception):
    """A check cannot run here; the message says why."""


def exit_code(results: list[dict]) -> int:
    return EXIT_VERIFY if any(r["status"] == "fail" for r in results) else EXIT_OK


class SelfCheck:
    def __init__(self, weights: str, size: int | None, device: str, out_dir: str, runs: int, log: Callable[[str], None], *,
                 threads: int | None = None, verify_dir: str | None = None, teacher: str | None = None,
                 train_data: str | None = None, clip_size: tuple[int, int] = CLIP_SIZE, clip_frames: int = CLIP_FRAMES,
                 train_steps: int = TRAIN_STEPS, train_warmup: int = TRAIN_WARMUP):
        from kdas_core.io.checkpoint import read_metadata

        self.weights, self.device, self.out_dir, self.runs, self.log = weights, device, out_dir, runs, log
        self.checkpoint_size = int(read_metadata(weights)["input_size"])
        self.size = int(size or self.checkpoint_size)  # the checkpoint's own: the size the app's `auto` looks engines up at
        self.threads, self.verify_dir, self.teacher, self.train_data = threads, verify_dir, teacher, train_data
        self.clip_size, self.clip_frames, self.train_steps, self.train_warmup = clip_size, clip_frames, train_steps, train_warmup
        self.results: list[dict] = []
        self.onnx: dict[str, str] = {}
        self.engines: dict[str, str] = {}
        self.side_engine: str | None = None
        self.frames: np.ndarray | None = None
        self.ref_probs: np.ndarray | None = None
        self.threshold = DEFAULT_THRESHOLD  # until the reference model says its own
        self._trt_reason: str | None | bool = False  # False: not asked yet
        self._cuda_reason: str | None | bool = False

    # ---------------------------------------------------------------- plumbing

    def run(self) -> list[dict]:
        for name, gpu, _what in CHECKS:
            self._one(name, getattr(self, f"check_{name}"), gpu)
        return self.results

    def _one(self, name: str, fn: Callable[[], tuple[str, dict]], gpu: bool) -> None:
        t0 = time.perf_counter()
        status, reason, details = "pass", "", {}
        try:
            if gpu:
                self._need_gpu_stack(name)
            reason, details = fn()
        except Skip as exc:
            status, reason = "skipped", str(exc)
        except CheckFailed as exc:
            status, reason, details = "fail", str(exc), exc.details
        except Exception as exc:  # a check that crashes is a failed check, with what it said
            status, reason = "fail", f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        seconds = round(time.perf_counter() - t0, 2)
        self.results.append({"name": name, "status": status, "reason": reason, "seconds": seconds, "details": _jsonable(details)})
        shown = reason if status != "skipped" else _short(reason, 160)  # the JSON has the whole reason
        self.log(f"[{status:>7}] {name} ({seconds:.1f} s){': ' + shown if shown else ''}")

    def trt_reason(self) -> str | None:
        """None when TensorRT can run here; else why not. Without an NVIDIA GPU that is all there is
        to say: installing TensorRT would not help."""
        if self._trt_reason is False:
            from .backends.tensorrt_backend import why_unavailable

            reason = why_unavailable(self.device)
            self._trt_reason = NO_GPU_REASON if reason and not has_nvidia_gpu() else reason
        return self._trt_reason

    def cuda_reason(self) -> str | None:
        """None when PyTorch sees a CUDA GPU; else why not, naming what is missing."""
        if self._cuda_reason is False:
            import torch

            if torch.cuda.is_available():
                self._cuda_reason = None
            elif not has_nvidia_gpu():
                self._cuda_reason = "no NVIDIA GPU on this machine (this check needs one)"
            else:
                build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
                self._cuda_reason = (f"this PyTorch ({torch.__version__}, {build}) sees no CUDA GPU; install a CUDA "
                                     "build of torch matching the driver (README, Installing for a GPU)")
        return self._cuda_reason

    def _need_gpu_stack(self, name: str) -> None:
        if name.startswith("trt_") and self.trt_reason():
            reason = self.trt_reason()
            raise Skip(f"needs an NVIDIA GPU: {reason}" if reason == NO_GPU_REASON else f"needs TensorRT and cuda-bindings: {reason}")
        if name.startswith(("torch_", "app_", "train_")) and self.cuda_reason():
            raise Skip(f"needs PyTorch on a CUDA GPU: {self.cuda_reason()}")

    def _need(self, what: str, value):
        if value is None:
            raise Skip(f"needs {what}, which did not pass")
        return value

    def _result(self, name: str) -> dict | None:
        return next((r for r in self.results if r["name"] == name), None)

    def _batches(self, backend, batch: int) -> np.ndarray:
        frames = self._need("verify_frames", self.frames)
        return np.concatenate([backend.predict(frames[i : i + batch]) for i in range(0, len(frames), batch)])

    # ---------------------------------------------------------------- CPU checks

    def check_versions(self) -> tuple[str, dict]:
        import onnxruntime as ort
        import torch

        from .backends.onnxruntime_backend import available_providers
        from .trt_common import dist_version, cuda_versions, import_cudart, import_trt

        v: dict[str, Any] = {
            "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "torch_sees_gpu": torch.cuda.is_available(), "onnx": dist_version("onnx"), "onnxruntime": ort.__version__,
            "onnxruntime_dists": {d: dist_version(d) for d in ("onnxruntime", "onnxruntime-gpu") if dist_version(d)},
            "ort_providers": available_providers(),
        }
        try:
            v["tensorrt"] = import_trt().__version__
        except BackendError as exc:
            v["tensorrt"] = f"absent ({_short(exc)})"
        try:
            import_cudart()
            cv = cuda_versions()
            v.update(cuda_driver=cv["driver_text"], cuda_runtime=cv["runtime_text"], cuda_bindings=cv["cuda_bindings"])
        except BackendError as exc:
            v["cuda_bindings"] = f"absent ({_short(exc)})"
        if torch.cuda.is_available():
            v["torch_gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        for key, module in (("pyav", "av"), ("pyqt6", "PyQt6")):
            why = _missing(module)
            v[key] = f"absent ({why})" if why else (dist_version(module) or "?")
        v["threads"] = self.threads or torch.get_num_threads()
        text = ", ".join(f"{k} {v[k]}" for k in ("torch", "onnxruntime", "tensorrt", "cuda_bindings", "pyav") if k in v)
        return text, v

    def check_ort_install(self) -> tuple[str, dict]:
        from .backends.onnxruntime_backend import ort_install_problem

        problem = ort_install_problem()
        if problem:
            raise CheckFailed(problem)
        return "", {}

    def _export(self, precision: str) -> tuple[str, dict]:
        import onnx

        from .backends.onnxruntime_backend import cached_onnx_for_checkpoint
        from .export import uint8_tensors

        notes: list[str] = []
        path = cached_onnx_for_checkpoint(self.weights, self.size, notes, precision=precision)
        proto = onnx.load(path)
        inner = uint8_tensors(proto, include_inputs=False)
        details = {"onnx": path, "nodes": len(proto.graph.node), "first_op": proto.graph.node[0].op_type, "uint8_tensors": uint8_tensors(proto)}
        if inner:
            raise CheckFailed(f"UINT8 tensors inside the graph (TensorRT refuses them): {name_some(inner, 5)}", details)
        if details["uint8_tensors"] != [proto.graph.input[0].name]:
            raise CheckFailed(f"the graph input should be the one UINT8 tensor, got {details['uint8_tensors']}", details)
        self.onnx[precision] = path
        return notes[-1], details

    def check_export_fp32(self) -> tuple[str, dict]:
        return self._export("fp32")

    def check_export_fp16(self) -> tuple[str, dict]:
        return self._export("fp16")

    def check_verify_frames(self) -> tuple[str, dict]:
        from . import load_backend
        from .verify import has_foreground, verification_frames

        ref = load_backend(self.weights, backend="torch", device="cpu", image_size=self.size, threads=self.threads)
        try:
            frames, probs, what = verification_frames(ref, self.size, self.verify_dir)
        finally:
            ref.close()
        self.threshold = ref.threshold
        fg = has_foreground(probs, ref.threshold)
        if not fg.any():
            raise CheckFailed(f"{what}: the fp16 Dice check would be vacuous", {"frames": len(frames)})
        self.frames, self.ref_probs = frames, probs
        return what, {"frames": len(frames), "foreground_fraction": [round(float(x), 4) for x in (probs >= ref.threshold).mean(axis=(1, 2))]}

    def _parity(self, backend, precision: str) -> tuple[str, dict]:
        from .verify import compare

        ref = self._need("verify_frames", self.ref_probs)
        per_batch, problems = {}, []
        for batch in BATCHES:
            result = compare(ref, self._batches(backend, batch), precision, self.threshold)
            per_batch[str(batch)] = result.to_dict()
            if not result.ok:
                problems.append(f"batch {batch}: {'; '.join(result.problems)}")
        worst = max(r["max_abs_diff"] for r in per_batch.values())
        dice = min(r["dice"] for r in per_batch.values())
        text = f"max prob diff {worst:.2e}, min Dice {dice:.4f} over batches {', '.join(map(str, BATCHES))}"
        if problems:
            raise CheckFailed(f"{text}: {' | '.join(problems)}", per_batch)
        return text, per_batch

    def check_ort_cpu_parity(self) -> tuple[str, dict]:
        from .backends.onnxruntime_backend import OnnxRuntimeBackend

        with OnnxRuntimeBackend(self._need("export_fp32", self.onnx.get("fp32")), device="cpu", threads=self.threads) as b:
            return self._parity(b, "fp32")

    def check_ort_cpu_fp16(self) -> tuple[str, dict]:
        from .backends.onnxruntime_backend import OnnxRuntimeBackend

        with OnnxRuntimeBackend(self._need("export_fp16", self.onnx.get("fp16")), device="cpu", threads=self.threads) as b:
            return self._parity(b, "fp16")

    # ---------------------------------------------------------------- TensorRT checks

    def _build(self, precision: str) -> tuple[str, dict]:
        from . import build
        from .trt_build import timing_cache_path
        from .backends.tensorrt_backend import current_target

        self._need("verify_frames", self.frames)
        timing = timing_cache_path(current_target(self.device))
        warm = os.path.isfile(timing)
        argv = ["--weights", self.weights, "--out", self.out_dir, "--format", "tensorrt", "--precision", precision,
                "--image-size", str(self.size), "--device", self.device, "--verify"]
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rc = run(build.main, argv)
        engine = stdout.getvalue().strip().splitlines()[-1] if stdout.getvalue().strip() else ""
        if rc != 0 or not engine.endswith(".engine"):
            raise CheckFailed(f"python -m engines.build {' '.join(argv)} exited {rc} (its messages are above)")
        from .trt_common import read_sidecar

        side = read_sidecar(engine)
        if not side.get("verified"):
            raise CheckFailed(f"{engine}: built and verified, but its sidecar does not say verified")
        self.engines[precision] = engine
        details = {"engine": engine, "build_seconds": side["build_seconds"], "timing_cache_warm": warm, "verification": side.get("verification")}
        return f"{os.path.basename(engine)} in {side['build_seconds']} s (timing cache {'warm' if warm else 'cold'})", details

    def check_trt_build_fp32(self) -> tuple[str, dict]:
        return self._build("fp32")

    def check_trt_build_fp16(self) -> tuple[str, dict]:
        return self._build("fp16")

    def check_trt_auto_finds(self) -> tuple[str, dict]:
        from . import load_backend

        built = {os.path.abspath(self.engines[p]): p for p in ("fp16", "fp32") if p in self.engines}
        if not built:
            raise Skip("needs trt_build_fp16 or trt_build_fp32, which did not pass")
        # The app opens a checkpoint with image_size None: the checkpoint's own size. At another
        # --image-size only an explicit lookup at that size can find the engines.
        image_size = None if self.size == self.checkpoint_size else self.size
        try:
            b = load_backend(self.weights, backend="auto", device=self.device, image_size=image_size)
        except BackendError as exc:
            raise CheckFailed(f"load_backend(auto) opened no backend, so not an engine built here: {exc}") from exc
        try:
            name, path, notes = b.name, os.path.abspath(b.path), list(b.notes)
        finally:
            b.close()
        details = {"picked": name, "path": path, "notes": notes, "built": sorted(built), "image_size": self.size,
                   "checkpoint_size": self.checkpoint_size, "app_default_lookup": image_size is None}
        if name != "tensorrt" or path not in built:
            raise CheckFailed(f"load_backend(auto) picked {name} ({path}), not an engine built here; its notes: {' | '.join(notes)}", details)
        text = f"auto picked the {built[path]} engine {os.path.basename(path)}"
        if image_size is not None:
            text += (f" when asked at {self.size}; the app looks at the checkpoint's {self.checkpoint_size} and would not find it "
                     "(run without --image-size to check the app's own lookup)")
        return text, details

    def _engine(self, precision: str) -> str:
        return self._need(f"trt_build_{precision}", self.engines.get(precision))

    def check_trt_parity_fp32(self) -> tuple[str, dict]:
        from .backends.tensorrt_backend import TensorRTBackend

        with TensorRTBackend(self._engine("fp32"), device=self.device) as b:
            return self._parity(b, "fp32")

    def check_trt_parity_fp16(self) -> tuple[str, dict]:
        from .backends.tensorrt_backend import TensorRTBackend

        with TensorRTBackend(self._engine("fp16"), device=self.device) as b:
            return self._parity(b, "fp16")

    def check_trt_cuda_graph(self) -> tuple[str, dict]:
        from .backends.tensorrt_backend import TensorRTBackend

        engine = self._engine("fp32")
        frames = self._need("verify_frames", self.frames)
        order = [1, 2, 4, 1, 4, 2, 1, 2]  # alternating: each replay must use its own shape's graph
        picks = [np.resize(frames, (b, *frames.shape[1:])) for b in order]
        with TensorRTBackend(engine, device=self.device, cuda_graph=False) as plain, TensorRTBackend(engine, device=self.device, cuda_graph=True) as graphed:
            diffs = [float(np.abs(graphed.predict(x) - plain.predict(x)).max()) for x in picks]
        worst = max(diffs)
        details = {"batch_order": order, "max_abs_diff": diffs}
        if worst > 1e-5:
            raise CheckFailed(f"CUDA graph output differs from the plain path by up to {worst:.2e}", details)
        return f"batches {order}: max diff {worst:.1e}", details

    def check_trt_threads(self) -> tuple[str, dict]:
        from .backends.tensorrt_backend import TensorRTBackend
        from .trt_build import build_engine

        onnx_path = self._need("export_fp32", self.onnx.get("fp32"))
        engine16 = self._engine("fp16")
        frames = self._need("verify_frames", self.frames)[:1]
        out = os.path.join(self.out_dir, "threads")
        built: dict[str, Any] = {}

        def builder():
            try:
                built["engine"] = build_engine(onnx_path, out, max_batch=1, device=self.device, checkpoint=self.weights, log=lambda m: None)
            except BaseException as exc:  # reported below
                built["error"] = exc

        backend = TensorRTBackend(engine16, device=self.device)  # constructed here, used in the worker
        baseline: dict[str, Any] = {}
        predictions = {"n": 0, "max_diff": 0.0}

        def predictor():
            try:
                baseline["p"] = backend.predict(frames)
                while t_build.is_alive():
                    p = backend.predict(frames)
                    predictions["n"] += 1
                    predictions["max_diff"] = max(predictions["max_diff"], float(np.abs(p - baseline["p"]).max()))
            except BaseException as exc:
                predictions["error"] = exc

        t_build = threading.Thread(target=builder, name="selfcheck-build")
        t_pred = threading.Thread(target=predictor, name="selfcheck-predict")
        t_build.start()
        t_pred.start()
        t_build.join()
        t_pred.join()
        backend.close()
        details = {"predictions_during_build": predictions["n"], "max_diff": predictions["max_diff"]}
        if "error" in built or "error" in predictions:
            raise CheckFailed(f"build: {built.get('error', 'ok')}; predict: {predictions.get('error', 'ok')}", details)
        if predictions["max_diff"] > 1e-6:
            raise CheckFailed(f"predictions changed while building (max diff {predictions['max_diff']:.2e})", details)
        self.side_engine = built["engine"]
        details["engine"] = built["engine"]
        return f"built {os.path.basename(built['engine'])} while {predictions['n']} predictions ran in another thread", details

    def _copy_engine(self, engine: str, tag: str) -> str:
        from .trt_common import sidecar_path

        folder = tempfile.mkdtemp(prefix=f"selfcheck-{tag}-", dir=self.out_dir)
        dst = os.path.join(folder, os.path.basename(engine))
        shutil.copyfile(engine, dst)
        shutil.copyfile(sidecar_path(engine), sidecar_path(dst))
        return dst

    def _expect_refusal(self, tag: str, spoil: Callable[[str], None], expected: str, accepted: str) -> tuple[str, dict]:
        """Copy the fp32 engine, `spoil` the copy, load and run it: pass when TensorRTBackend
        refuses it with a BackendError containing `expected`."""
        from .backends.tensorrt_backend import TensorRTBackend

        copy = self._copy_engine(self._engine("fp32"), tag)
        try:
            spoil(copy)
            try:
                with TensorRTBackend(copy, device=self.device) as b:
                    b.predict(self.frames[:1])
            except BackendError as exc:
                if expected in str(exc):
                    return "refused: " + _short(exc, 200), {"message": str(exc)}
                raise CheckFailed(f"refused, but not with {expected!r}: {exc}")
            raise CheckFailed(accepted)
        finally:
            shutil.rmtree(os.path.dirname(copy), ignore_errors=True)

    def check_trt_reject_version(self) -> tuple[str, dict]:
        from .trt_common import read_sidecar, sidecar_path, write_json_atomic

        def other_version(copy: str) -> None:
            write_json_atomic(sidecar_path(copy), {**read_sidecar(copy), "tensorrt_version": "0.0.0"})

        return self._expect_refusal("version", other_version, "TensorRT 0.0.0 built it", "an engine whose sidecar names TensorRT 0.0.0 was accepted")

    def check_trt_reject_truncated(self) -> tuple[str, dict]:
        def truncate(copy: str) -> None:
            with open(copy, "r+b") as f:
                f.truncate(os.path.getsize(copy) // 2)

        return self._expect_refusal("truncated", truncate, "could not deserialize", "a truncated engine ran")

    def check_trt_failed_verify(self) -> tuple[str, dict]:
        import torch

        from kdas_core.io.checkpoint import read_metadata, save_checkpoint
        from kdas_core.models import create_model

        from . import build
        from .cache import cache_dir
        from .trt_common import read_sidecar

        engine = self._need("trt_threads", self.side_engine)
        meta = read_metadata(self.weights)
        other = os.path.join(self.out_dir, "other-weights.safetensors")
        torch.manual_seed(1234)
        save_checkpoint(other, create_model(meta["preset"], pretrained=None), meta)  # same preset, other weights
        args = argparse.Namespace(weights=other, verify_frames=None, device=self.device, precision="fp32")
        result = build._verify(args, engine, self.size)  # the very code `engines.build --verify` runs
        build._publish(engine, result)
        indexed = []
        index = cache_dir("tensorrt")
        for name in os.listdir(index):
            if name.endswith(".json"):
                with open(os.path.join(index, name), encoding="utf-8") as f:
                    if json.load(f).get("engine") == os.path.abspath(engine):
                        indexed.append(name)
        side = read_sidecar(engine)
        details = {"verify": result.to_dict(), "indexed_as": indexed, "sidecar_verified": side.get("verified")}
        if result.ok:
            raise CheckFailed("verify passed against other weights: it cannot tell models apart", details)
        if indexed or side.get("verified"):
            raise CheckFailed(f"a failed engine is in the cache index ({indexed}) or marked verified", details)
        return "verify failed as it should; no index entry, sidecar verified=false", details

    # ---------------------------------------------------------------- other GPU paths

    def _ort_cuda_backend(self):
        from .backends.onnxruntime_backend import OnnxRuntimeBackend, available_providers

        if "CUDAExecutionProvider" not in available_providers():
            if not has_nvidia_gpu():
                raise Skip("no NVIDIA GPU on this machine (ONNX Runtime's CUDA provider needs one)")
            raise Skip(f"onnxruntime has no CUDAExecutionProvider (providers {available_providers()}): onnxruntime-gpu is "
                       "not installed; install the [gpu] extra (README, Installing for a GPU)")
        # ORT's own TensorRT provider off: it would build an engine first (minutes).
        return OnnxRuntimeBackend(self._need("export_fp32", self.onnx.get("fp32")), device=self.device, ort_tensorrt=False)

    def check_ort_cuda(self) -> tuple[str, dict]:
        b = self._ort_cuda_backend()
        try:
            got = self._batches(b, 4)  # raises BackendError when ORT silently fell back to CPU
            active = b.active_providers or []
        finally:
            b.close()
        diff = float(np.abs(got - self.ref_probs).max())
        details = {"active_providers": active, "max_abs_diff_vs_torch_fp32": diff}
        if not active or active[0] != "CUDAExecutionProvider":
            raise CheckFailed(f"the session runs on {active}", details)
        return f"active providers {active}; max prob diff vs torch fp32 {diff:.2e} (TF32 may apply)", details

    def _torch_cuda(self, cuda_graph: bool = False):
        from .backends.torch_backend import TorchBackend

        if self.cuda_reason():
            raise Skip(self.cuda_reason())
        return TorchBackend(self.weights, device=self.device, image_size=self.size, cuda_graph=cuda_graph)

    def check_torch_fp16(self) -> tuple[str, dict]:
        b = self._torch_cuda()
        try:
            return self._parity(b, "fp16")
        finally:
            b.close()

    def check_torch_cuda_graph(self) -> tuple[str, dict]:
        b = self._torch_cuda(cuda_graph=True)
        try:
            text, details = self._parity(b, "fp16")
            return text + " (CUDA graphs, one per batch size)", details
        finally:
            b.close()

    def check_latency(self) -> tuple[str, dict]:
        from .backends.tensorrt_backend import TensorRTBackend
        from .bench import Candidate, _measure

        makers = {
            "torch fp16": lambda: self._torch_cuda(),
            "torch fp16 + CUDA graph": lambda: self._torch_cuda(cuda_graph=True),
            "tensorrt fp16": lambda: TensorRTBackend(self._engine("fp16"), device=self.device, cuda_graph=False),
            "tensorrt fp16 + CUDA graph": lambda: TensorRTBackend(self._engine("fp16"), device=self.device, cuda_graph=True),
            "onnxruntime CUDA fp32": self._ort_cuda_backend,
        }
        backends, missing = {}, {}
        for label, make in makers.items():
            try:
                if label.startswith("tensorrt") and self.trt_reason():
                    raise Skip(self.trt_reason())
                backends[label] = make()
            except Skip as exc:
                missing[label] = str(exc)
        if not backends:
            raise Skip("no GPU path available: " + "; ".join(f"{k}: {v}" for k, v in missing.items()))
        figures: dict[str, dict[str, dict]] = {}
        try:
            for batch in LATENCY_BATCHES:
                candidates = [Candidate(label, self.weights, b) for label, b in backends.items()]
                _measure(candidates, argparse.Namespace(batch=batch, warmup=10, runs=self.runs), self.log)
                for c in candidates:
                    r = c.result(batch)
                    figures.setdefault(c.label, {})[str(batch)] = {k: r[k] for k in ("latency_ms_p50", "latency_ms_p95", "latency_ms_mean", "throughput_fps")}
        finally:
            for b in backends.values():
                b.close()
        text = "; ".join(f"{label} " + ", ".join(f"b{bt} {f['latency_ms_p50']:.2f}/{f['latency_ms_p95']:.2f}" for bt, f in per.items())
                         for label, per in figures.items())
        text += f" ms p50/p95 at {self.size}x{self.size}, interleaved"
        return text, {"latency": figures, "not_measured": missing, "runs": self.runs, "image_size": self.size, "batches": list(LATENCY_BATCHES)}

    # ---------------------------------------------------------------- the app on the GPU

    def best_backend(self) -> tuple[str, str]:
        """(backend name for the app's --backend, why): the fastest path that passed its checks here."""
        passed = {r["name"] for r in self.results if r["status"] == "pass"}
        if "trt_auto_finds" in passed:
            return "auto", "auto finds the verified TensorRT engine built here"
        if "ort_cuda" in passed:
            return "onnxruntime", "ONNX Runtime's CUDA provider passed; no TensorRT engine"
        if not self.cuda_reason():
            return "torch", "PyTorch fp16 on CUDA; no TensorRT engine and no ONNX Runtime CUDA provider"
        return "auto", "no GPU path: what auto picks on this machine"

    def check_app_pipeline(self) -> tuple[str, dict]:
        missing = _missing("av")
        if missing:
            raise Skip(f"needs PyAV (pip install av) to write the clip and to decode and encode video in the pipeline: {missing}")
        backend, why = self.best_backend()
        folder = tempfile.mkdtemp(prefix="selfcheck-app-", dir=self.out_dir)
        try:
            width, height = self.clip_size
            clip = os.path.join(folder, f"clip-{width}x{height}.mp4")
            t0 = time.perf_counter()
            make_clip(clip, self.clip_frames, width, height, CLIP_FPS)
            clip_seconds = round(time.perf_counter() - t0, 2)
            # The app is the layer above: it runs as the user would run it, as a command, and
            # reports through its --stats JSON (engines never imports app).
            stats_path = os.path.join(folder, "stats.json")
            cmd = [sys.executable, "-m", "app", clip, "--headless", "--out", os.path.join(folder, "out.mp4"),
                   "--weights", self.weights, "--backend", backend, "--stats", stats_path, "--no-progress"]
            if self.threads:
                cmd += ["--threads", str(self.threads)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=APP_TIMEOUT_S, cwd=REPO)
            except subprocess.TimeoutExpired as exc:
                raise CheckFailed(f"python -m app CLIP --headless took over {APP_TIMEOUT_S} s") from exc
            lines = (proc.stdout + proc.stderr).strip().splitlines()
            st = {}
            if os.path.isfile(stats_path):
                with open(stats_path) as f:
                    st = json.load(f)
            result = argparse.Namespace(exit_code=proc.returncode, stats=st)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        st = result.stats
        keys = ("backend", "input_size", "frames_in", "frames_out", "frames_recorded", "dropped", "dropped_pct", "fps", "wall_s",
                "inference_busy_pct", "inference_ms_p50", "inference_ms_p95", "latency_ms_p50", "latency_ms_p95",
                "model_only_fps", "fps_vs_model_only", "backend_notes", "notices", "error")
        details = {"clip": {"width": width, "height": height, "frames": self.clip_frames, "fps": CLIP_FPS, "made_in_s": clip_seconds},
                   "backend_asked": backend, "why": why, "exit_code": result.exit_code, **{k: st.get(k) for k in keys},
                   "realtime_margin": round(st["fps"] / CLIP_FPS, 2) if st.get("fps") else None, "log_tail": lines[-5:]}
        if result.exit_code != 0:
            raise CheckFailed(f"python -m app CLIP --headless --backend {backend} exited {result.exit_code}: "
                              f"{st.get('error') or (lines[-1] if lines else 'no output')}", details)
        text = (f"{width}x{height}, {st['frames_out']} frames through {st['backend']}: {st['fps']:.1f} fps "
                f"({details['realtime_margin']}x the clip's {CLIP_FPS} fps), latency p50/p95 {st['latency_ms_p50']}/{st['latency_ms_p95']} ms, "
                f"inference p50 {st['inference_ms_p50']} ms, dropped {st['dropped']} (a file is never dropped from: "
                "fps above the clip's rate means a live source would not drop either)")
        return text, details

    # ---------------------------------------------------------------- training speed

    def _train_data(self) -> tuple[str, str]:
        """(PraNet root, what it is): --train-data, the real data beside the repository, or a small
        synthetic set written here (step time does not depend on what the pixels show)."""
        if self.train_data:
            return self.train_data, self.train_data
        if os.path.isdir(os.path.join(REAL_TRAIN_DATA, "TrainDataset")):
            return os.path.abspath(REAL_TRAIN_DATA), "the real training data (polyp-352)"
        root = os.path.join(self.out_dir, "synthetic-train")
        if not os.path.isdir(os.path.join(root, "TrainDataset", "images")):
            from kdas_core.data.synthetic import write_dataset

            write_dataset(root, n_train=96, n_test=0, size=352)
        return root, "96 synthetic images (no real data here; --train-data DIR for it)"

    def _train_speed(self, weights: str) -> tuple[str, dict]:
        from kdas_core.io.checkpoint import read_metadata

        if not os.path.isfile(weights):
            raise Skip(f"{weights}: no such checkpoint (--teacher CKPT)")
        meta = read_metadata(weights)
        data, what = self._train_data()
        out = os.path.join(self.out_dir, f"bench-train-{meta['preset']}.json")
        argv = bench_train_argv(meta["preset"], data, self.device, int(meta["input_size"]), out,
                                steps=self.train_steps, warmup=self.train_warmup, threads=self.threads)
        cmd = [sys.executable, "-m", "kdas_core.bench_train", *argv]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S, cwd=REPO)
        except subprocess.TimeoutExpired as exc:
            raise CheckFailed(f"{' '.join(cmd[1:])} took over {TRAIN_TIMEOUT_S} s") from exc
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise CheckFailed(f"python {' '.join(cmd[1:])} exited {proc.returncode}: {tail}", {"command": cmd})
        with open(out, encoding="utf-8") as f:
            r = json.load(f)
        epoch_s = float(r["epoch_seconds_estimate"])
        per_day = {"epochs": round(86400.0 / epoch_s, 1) if epoch_s else None, "images": round(86400.0 * float(r["images_per_s"]))}
        details = {"command": ["python", *cmd[1:]], "data": what, "bench_train": r, "per_gpu_day": per_day}
        text = (f"{meta['preset']} at {r['image_size']}px, batch {r['batch_size']}, AMP: {r['images_per_s']:.1f} images/s, "
                f"~{epoch_s / 60:.2f} min/epoch of {r['n_train']} images, ~{per_day['epochs']} epochs per GPU day ({what})")
        return text, details

    def check_train_speed_student(self) -> tuple[str, dict]:
        return self._train_speed(self.weights)

    def check_train_speed_teacher(self) -> tuple[str, dict]:
        from kdas_core.io.assets import DEFAULT_TEACHER

        return self._train_speed(self.teacher or str(DEFAULT_TEACHER))


def bench_train_argv(preset: str, data: str, device: str, image_size: int, json_out: str, *, steps: int = TRAIN_STEPS,
                     warmup: int = TRAIN_WARMUP, threads: int | None = None, batch_size: int | None = None) -> list[str]:
    """The `python -m kdas_core.bench_train` command line of a training-speed check: the training
    step `kdas_core.train` would run (default step settings, AMP on), without pretrained weights to
    load (speed does not depend on them) and without the near-duplicate grouping of the split."""
    argv = ["--model", preset, "--data", data, "--device", device, "--amp", "--image-size", str(image_size),
            "--pretrained", "none", "--groups", "none", "--steps", str(steps), "--warmup", str(warmup),
            "--no-progress", "--json", json_out]
    if threads:
        argv += ["--threads", str(threads)]
    if batch_size:
        argv += ["--batch-size", str(batch_size)]
    return argv


def make_clip(path: str, frames: int, width: int, height: int, fps: int = CLIP_FPS) -> None:
    """An H.264 clip of `frames` synthetic endoscopy frames at width x height: the round view in
    the middle, black on both sides, as an endoscopy tower's 1080p output looks. Needs PyAV."""
    from fractions import Fraction

    import av
    import cv2

    from kdas_core.data.synthetic import render_clip

    side = min(width, height) // 2 * 2
    x0, y0 = (width - side) // 2, (height - side) // 2
    canvas = np.zeros((height, width, 3), np.uint8)
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23"}
        for rgb, _mask in render_clip(frames, min(side, 352), seed=0):
            canvas[y0 : y0 + side, x0 : x0 + side] = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_LINEAR)
            for packet in stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _missing(module: str) -> str | None:
    """None when `module` imports; else why not, naming it."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{module} is not installed ({exc})"
    return None


def _short(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from kdas_core.io.assets import DEFAULT_TEACHER, DEFAULT_WEIGHTS
    from kdas_core.cli.conventions import device_arg, positive_int

    p = Parser(exit_codes=(0, 1, 2, 3, 130), prog="python -m engines.selfcheck", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="OUT", help="write the report (one entry per check, every figure in its details) as JSON to OUT")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), metavar="CKPT", help=f"checkpoint to check (default: the shipped student, {os.path.basename(str(DEFAULT_WEIGHTS))})")
    p.add_argument("--teacher", default=None, metavar="CKPT",
                   help=f"checkpoint whose preset the teacher's training-speed check trains (default: the bundled {os.path.basename(str(DEFAULT_TEACHER))})")
    p.add_argument("--image-size", type=image_size_arg, default=None, metavar="S",
                   help="input size of every check (default: the checkpoint's own input size, the one the app's `auto` "
                   "looks engines up at; the networks are fully convolutional, so any multiple of 32 works)")
    p.add_argument("--device", type=device_arg, default="cuda:0", metavar="DEV", help="CUDA device for the GPU checks (default cuda:0)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for ONNX Runtime and PyTorch on the CPU (the exports, the reference, the CPU parity "
                   "checks), the app's pipeline and bench_train (default: the libraries' own choice, all cores)")
    p.add_argument("--verify-frames", metavar="DIR", help="images to verify on (default: the demo clip's frames where the checkpoint "
                   "finds a polyp; without PyAV, the same frames rendered by the clip's generator)")
    p.add_argument("--train-data", metavar="DIR", help="PraNet root for the training-speed checks (default: ../shared/data/polyp-352 "
                   "beside the repository when present, else a small synthetic set written to --out)")
    p.add_argument("--out", metavar="DIR", help="where the engines go (default: <KDAS cache>/selfcheck)")
    p.add_argument("--runs", type=int, default=100, metavar="N", help="timed calls per path and batch size for the latency check (default 100)")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    return args


def machine_line(device: str, threads: int | None, gpu_checks: int) -> tuple[str, str | None]:
    """(where the checks run, in words; the GPU's name or None). Names a GPU only when there is one."""
    import torch

    cpu = f"{threads or torch.get_num_threads()} CPU threads"
    if torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else 0
        name = torch.cuda.get_device_name(index) if index < torch.cuda.device_count() else None
        if name:
            return f"on {device} ({name}), {cpu}", name
    if has_nvidia_gpu():
        return f"on {cpu}; an NVIDIA driver is here but this PyTorch sees no CUDA GPU (the GPU checks say what is missing)", None
    return f"on {cpu} (no NVIDIA GPU here: the {gpu_checks} GPU checks are skipped)", None


def main(argv: list[str] | None = None) -> int:
    from .cache import cache_dir

    args = parse_args(argv)
    if not os.path.isfile(args.weights):
        raise FileNotFoundError(f"{args.weights}: no such checkpoint file")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise FileNotFoundError(f"--json {args.json}: its folder does not exist")
    if args.verify_frames and not os.path.isdir(args.verify_frames):
        raise FileNotFoundError(f"--verify-frames {args.verify_frames}: no such folder of images")
    if args.train_data and not os.path.isdir(args.train_data):
        raise FileNotFoundError(f"--train-data {args.train_data}: no such folder (a PraNet root with TrainDataset/)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out_dir = args.out or cache_dir("selfcheck")
    os.makedirs(out_dir, exist_ok=True)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    where, gpu_name = machine_line(args.device, args.threads, sum(gpu for _n, gpu, _w in CHECKS))
    say(f"selfcheck of {args.weights} {where} ({len(CHECKS)} checks)")
    t0 = time.perf_counter()
    checker = SelfCheck(args.weights, args.image_size, args.device, out_dir, args.runs, say, threads=args.threads,
                        verify_dir=args.verify_frames, teacher=args.teacher, train_data=args.train_data)
    results = checker.run()
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "skipped")}
    seconds = round(time.perf_counter() - t0, 1)
    say(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skipped']} skipped in {seconds} s")
    if args.json:
        doc = {
            "checks": results, "summary": {**counts, "seconds": seconds},
            "weights": os.path.abspath(args.weights), "image_size": checker.size, "checkpoint_size": checker.checkpoint_size,
            "device": args.device if gpu_name else "cpu", "gpu": gpu_name, "threads": args.threads,
            "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(args.json, doc)
        say(f"wrote {args.json}")
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(run(main))
