"""python -m engines.selfcheck: one command that checks the whole deploy path on this machine.

On an NVIDIA machine with the TensorRT extra it prints the versions, builds the shipped student
in fp32 and fp16 (shared timing cache) through `engines.build --verify`, checks batches 1, 2 and
4 against PyTorch fp32, CUDA graphs against the plain path at alternating batch sizes, building
in one thread while predicting in another, the rejection of foreign and truncated engines, that
a failed verify leaves nothing in the engine cache, that ONNX Runtime's CUDA provider is really
active, torch fp16 against fp32, and p50 latency of each GPU path. Without a GPU it runs the CPU
parts and lists every GPU check as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import numpy as np

from kdas_core.io.atomic import write_json
from kdas_core.cli.conventions import name_some
from kdas_core.models.presets import DEFAULT_THRESHOLD, image_size_arg

from .cli_common import EXIT_OK, EXIT_VERIFY, run
from .errors import BackendError

# (name, needs a GPU, what it checks): the full list, in the order it runs.
CHECKS: list[tuple[str, bool, str]] = [
    ("versions", False, "driver, CUDA runtime, TensorRT, cuda-bindings, ONNX Runtime providers, torch"),
    ("ort_install", False, "onnxruntime and onnxruntime-gpu are not installed side by side"),
    ("export_fp32", False, "fp32 ONNX export: no UINT8 tensor but the graph input (TensorRT rule)"),
    ("export_fp16", False, "fp16 ONNX export: no UINT8 tensor but the graph input (TensorRT rule)"),
    ("verify_frames", False, "the demo clip has frames where the PyTorch reference finds a polyp"),
    ("ort_cpu_parity", False, "ONNX Runtime CPU (fp32 graph) vs PyTorch fp32, batches 1, 2, 4: max diff <= 1e-3"),
    ("ort_cpu_fp16", False, "ONNX Runtime CPU running the fp16 graph vs PyTorch fp32: the fp16 verify rule"),
    ("trt_build_fp32", True, "engines.build --format tensorrt --precision fp32 --verify"),
    ("trt_build_fp16", True, "engines.build --format tensorrt --precision fp16 --verify (shared timing cache)"),
    ("trt_parity_fp32", True, "TensorRT fp32 engine vs PyTorch fp32, batches 1, 2, 4: max diff <= 1e-3"),
    ("trt_parity_fp16", True, "TensorRT fp16 engine vs PyTorch fp32, batches 1, 2, 4: the fp16 verify rule"),
    ("trt_cuda_graph", True, "CUDA graphs vs the plain path at alternating batch sizes"),
    ("trt_threads", True, "an engine builds in one thread while another thread predicts"),
    ("trt_reject_version", True, "an engine whose sidecar names another TensorRT version is refused"),
    ("trt_reject_truncated", True, "a truncated engine is refused, with TensorRT's words"),
    ("trt_failed_verify", True, "an engine that fails verify stays out of the engine cache index"),
    ("ort_cuda", True, "ONNX Runtime's CUDA provider is really the one running"),
    ("torch_fp16", True, "PyTorch fp16 on CUDA vs fp32: the fp16 verify rule"),
    ("latency", True, "p50 latency, batch 1: TensorRT plain and CUDA graph, ONNX Runtime CUDA, torch fp16"),
]
CHECK_NAMES = [c[0] for c in CHECKS]
BATCHES = (1, 2, 4)
DEFAULT_SIZE = 352

DESCRIPTION = __doc__.split("\n", 2)[2].strip() + """

Each check prints one line: pass, fail or skipped (with the reason). --json writes one entry per
check: {"name", "status", "reason", "seconds", "details"}. Engines go to --out (default: a
folder in the KDAS cache), verified ones into the engine cache index as `engines.build` does.
"""

EPILOG = """\
examples:
  python -m engines.selfcheck                      # the shipped student, GPU 0
  python -m engines.selfcheck --json selfcheck.json --device cuda:1

exit codes:
  0  every check that ran passed (skipped ones do not count)
  2  usage error: missing or unreadable checkpoint, unwritable --json
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
    def __init__(self, weights: str, size: int | None, device: str, out_dir: str, runs: int, log: Callable[[str], None]):
        from kdas_core.io.checkpoint import read_metadata

        self.weights, self.device, self.out_dir, self.runs, self.log = weights, device, out_dir, runs, log
        self.size = int(size or read_metadata(weights)["input_size"])
        self.results: list[dict] = []
        self.onnx: dict[str, str] = {}
        self.engines: dict[str, str] = {}
        self.side_engine: str | None = None
        self.frames: np.ndarray | None = None
        self.ref_probs: np.ndarray | None = None
        self.threshold = DEFAULT_THRESHOLD  # until the reference model says its own
        self._trt_reason: str | None | bool = False  # False: not asked yet

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
                self._need_trt_or_other(name)
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
        if self._trt_reason is False:
            from .backends.tensorrt_backend import why_unavailable

            self._trt_reason = why_unavailable(self.device)
        return self._trt_reason

    def _need_trt_or_other(self, name: str) -> None:
        if name.startswith("trt_") and self.trt_reason():
            raise Skip(f"needs TensorRT, cuda-bindings and an NVIDIA GPU: {self.trt_reason()}")

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
        text = ", ".join(f"{k} {v[k]}" for k in ("torch", "onnxruntime", "tensorrt", "cuda_bindings") if k in v)
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

        ref = load_backend(self.weights, backend="torch", device="cpu", image_size=self.size)
        try:
            frames, probs, what = verification_frames(ref, self.size)
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

        with OnnxRuntimeBackend(self._need("export_fp32", self.onnx.get("fp32")), device="cpu") as b:
            return self._parity(b, "fp32")

    def check_ort_cpu_fp16(self) -> tuple[str, dict]:
        from .backends.onnxruntime_backend import OnnxRuntimeBackend

        with OnnxRuntimeBackend(self._need("export_fp16", self.onnx.get("fp16")), device="cpu") as b:
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
            raise Skip(f"onnxruntime has no CUDAExecutionProvider (providers {available_providers()}); install the [gpu] extra")
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

    def _torch_cuda(self):
        import torch

        from .backends.torch_backend import TorchBackend

        if not torch.cuda.is_available():
            raise Skip(f"this PyTorch ({torch.__version__}, CUDA {torch.version.cuda}) sees no CUDA GPU")
        return TorchBackend(self.weights, device=self.device, image_size=self.size)

    def check_torch_fp16(self) -> tuple[str, dict]:
        b = self._torch_cuda()
        try:
            return self._parity(b, "fp16")
        finally:
            b.close()

    def check_latency(self) -> tuple[str, dict]:
        from .backends.tensorrt_backend import TensorRTBackend
        from .bench import Candidate, _measure

        candidates, missing = [], {}
        makers = {
            "tensorrt fp16": lambda: TensorRTBackend(self._engine("fp16"), device=self.device, cuda_graph=False),
            "tensorrt fp16 + CUDA graph": lambda: TensorRTBackend(self._engine("fp16"), device=self.device, cuda_graph=True),
            "onnxruntime CUDA fp32": self._ort_cuda_backend,
            "torch fp16": self._torch_cuda,
        }
        for label, make in makers.items():
            try:
                if label.startswith("tensorrt") and self.trt_reason():
                    raise Skip(self.trt_reason())
                candidates.append(Candidate(label, self.weights, make()))
            except Skip as exc:
                missing[label] = str(exc)
        if not candidates:
            raise Skip("no GPU path available: " + "; ".join(f"{k}: {v}" for k, v in missing.items()))
        try:
            _measure(candidates, argparse.Namespace(batch=1, warmup=10, runs=self.runs), self.log)
        finally:
            for c in candidates:
                c.backend.close()
        p50 = {c.label: c.result(1)["latency_ms_p50"] for c in candidates}
        text = ", ".join(f"{k} {v:.2f} ms" for k, v in p50.items()) + f" (p50, batch 1, {self.size}x{self.size}, interleaved)"
        return text, {"p50_ms": p50, "not_measured": missing, "runs": self.runs, "image_size": self.size}


def _short(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from kdas_core.io.assets import DEFAULT_WEIGHTS

    p = argparse.ArgumentParser(prog="python -m engines.selfcheck", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="OUT", help="write the report (one entry per check) as JSON to OUT")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), metavar="CKPT", help=f"checkpoint to check (default: the shipped student, {os.path.basename(str(DEFAULT_WEIGHTS))})")
    p.add_argument("--image-size", type=image_size_arg, default=DEFAULT_SIZE, metavar="S",
                   help=f"input size of every check (default {DEFAULT_SIZE}, the size RESULTS.md reports latency at; "
                   "the networks are fully convolutional, so any multiple of 32 works)")
    p.add_argument("--device", default="cuda:0", metavar="DEV", help="CUDA device for the GPU checks (default cuda:0)")
    p.add_argument("--out", metavar="DIR", help="where the engines go (default: <KDAS cache>/selfcheck)")
    p.add_argument("--runs", type=int, default=100, metavar="N", help="timed calls per path for the latency check (default 100)")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from .cache import cache_dir

    args = parse_args(argv)
    if not os.path.isfile(args.weights):
        raise FileNotFoundError(f"{args.weights}: no such checkpoint file")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise FileNotFoundError(f"--json {args.json}: its folder does not exist")
    out_dir = args.out or cache_dir("selfcheck")
    os.makedirs(out_dir, exist_ok=True)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    say(f"selfcheck of {args.weights} on {args.device} ({len(CHECKS)} checks; GPU ones are skipped without a GPU)")
    t0 = time.perf_counter()
    checker = SelfCheck(args.weights, args.image_size, args.device, out_dir, args.runs, say)
    results = checker.run()
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "skipped")}
    seconds = round(time.perf_counter() - t0, 1)
    say(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skipped']} skipped in {seconds} s")
    if args.json:
        doc = {
            "checks": results, "summary": {**counts, "seconds": seconds},
            "weights": os.path.abspath(args.weights), "image_size": checker.size, "device": args.device,
            "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(args.json, doc)
        say(f"wrote {args.json}")
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(run(main))
