"""Inference stage: the only thread that touches the backend.

The backend (and with it every CUDA context, TensorRT execution context or ORT session) is
constructed *inside* this thread, and a warm-up prediction runs here before the first frame,
so lazily created GPU objects belong to this thread too.

Fallback: if the asked-for backend cannot be built or cannot run (engine built for another
GPU, missing CUDA, broken export), at load time or while running, the next one in the order
`engines.fallback_chain` gives (tensorrt -> onnxruntime -> torch, the one order `auto` uses
too) is tried through `open_backend`, and a "fallback" notice says so. After a sticky CUDA error
(illegal address, launch failure, ...) CUDA is unusable in this process, so the fallback runs on
the CPU. Input size and threshold come only from the backend (model metadata).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from kdas_core.cli.conventions import EXIT_FAILURE, EXIT_UNAVAILABLE

from ..errors import AppError, crash_report
from .channels import Closed
from .items import EndOfStream, Frame
from .preprocess import resize_for_model


@dataclass
class ModelInfo:
    backend: str
    path: str
    input_size: tuple[int, int]  # (H, W)
    threshold: float
    notes: list[str] = field(default_factory=list)
    preset: str | None = None  # from the model's metadata; the file name when it has none

    @property
    def label(self) -> str:
        """e.g. 'polyppvt-lite0 \u00b7 256\u00b2 \u00b7 onnxruntime' (the export cache's hash names nothing)."""
        h, w = self.input_size
        size = f"{w}\u00b2" if w == h else f"{w}x{h}"
        return f"{self.preset or _short(self.path)} \u00b7 {size} \u00b7 {self.backend}"


def loading_message(model_path: str) -> str:
    """What the window shows until the model runs: a checkpoint's first start exports it to ONNX."""
    if str(model_path).lower().endswith(".safetensors"):
        return ("Loading model\u2026\nThe first start with a checkpoint exports it to ONNX once "
                "(up to a minute on a CPU); later starts reuse that export.")
    return "Loading model\u2026"


def preset_of(backend) -> str | None:
    return (getattr(backend, "meta", None) or {}).get("preset")


def _short(path: str) -> str:
    import os

    return os.path.basename(path)


def _default_factory(path, backend="auto", device=None, threads=None):
    from engines import load_backend

    return load_backend(path, backend=backend, device=device, threads=threads)


def _fallback_chain(after: str, device=None) -> list[str]:
    from engines import fallback_chain

    return fallback_chain(after, device)


def open_backend(path: str, requested: str, *, factory: Callable = _default_factory, device=None, threads=None,
                 notice: Callable[[str], None] = lambda s: None, skip: tuple[str, ...] = ()):
    """A backend that has run one warm-up prediction: `requested` first, then the backends
    after it in engines' fallback order (for "auto", engines already tries them all while
    loading; we only go on if the one it picked loads but cannot run). `notice` hears each
    fallback; `skip`: backends not to try. Raises AppError listing every failure."""
    chain = [requested] + (_fallback_chain(requested, device) if requested != "auto" else [])
    tried: set[str] = set(skip)
    errors: list[str] = []
    while chain:
        name = chain.pop(0)
        if name in tried:
            continue
        backend = None
        try:
            backend = factory(path, backend=name, device=device, threads=threads)
            # A backend can load and still fail on first use (lazy CUDA objects): run it once.
            h, w = backend.input_size
            backend.predict(np.zeros((1, h, w, 3), np.uint8))
            return backend
        except Exception as exc:  # BackendError, or whatever a broken runtime raises
            if _is_bug(exc):
                if backend is not None:
                    try:
                        backend.close()
                    except Exception:
                        pass
                raise
            if _is_file_error(exc):  # the file itself is unusable: no fallback can help, say why first
                raise AppError(str(exc)) from exc
            actual = getattr(backend, "name", None) or name
            if backend is not None:
                try:
                    backend.close()
                except Exception:
                    pass
            tried.update({name, actual})
            errors.append(f"{actual}: {_whole(exc)}")
            if device != "cpu" and _sticky(exc):  # this process's CUDA context is gone: CPU only from here
                device = "cpu"
                notice("CUDA failed with an unrecoverable error; the fallback runs on the CPU")
            if name != "auto" or backend is not None:  # an "auto" that loaded nothing has tried them all
                chain = _fallback_chain(actual, device)
            chain = [b for b in chain if b not in tried]
            if chain:
                notice(f"{actual} backend failed ({_oneline(exc)}); falling back to {chain[0]}")
    if len(errors) == 1 and errors[0].startswith(f"auto: {path}: "):  # engines already listed each backend
        raise AppError(errors[0][len("auto: "):], EXIT_UNAVAILABLE)
    raise AppError(f"{path}: no backend could run the model:\n  " + "\n  ".join(errors), EXIT_UNAVAILABLE)


# A frame of the wrong shape or dtype, a missing attribute: a bug on our side of predict(), which
# no other backend would fix. Everything else a backend raises (BackendError, the runtimes' own
# error types, CUDA and memory errors) is the backend failing: the next one is tried.
_BUGS = (ValueError, TypeError, AttributeError, IndexError, KeyError, NameError, AssertionError)


def _is_bug(exc: BaseException) -> bool:
    return isinstance(exc, _BUGS)


def _is_file_error(exc: BaseException) -> bool:
    from engines import ModelFileError

    return isinstance(exc, ModelFileError)


def _whole(exc: BaseException) -> str:
    """The full message, continuation lines indented under the backend's name (never cut)."""
    return "\n    ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def _sticky(exc: BaseException) -> bool:
    from engines import is_sticky_cuda_error

    return is_sticky_cuda_error(exc)


def _oneline(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


class InferenceStage(threading.Thread):
    """inbox (Frames with model_input) -> outbox (Frames with probs)."""

    def __init__(self, model_path: str, requested: str, inbox, outbox, *, stats_ref: Callable, events,
                 factory: Callable | None = None, device=None, threads: int | None = None,
                 measure_model_only: bool = False, downstream_idle: Callable[[], bool] = lambda: True):
        super().__init__(name="inference", daemon=True)
        self.model_path = model_path
        self.requested = requested
        self.inbox = inbox
        self.outbox = outbox
        self.stats_ref = stats_ref  # () -> current RunStats (the window swaps it per source)
        self.events = events
        self.factory = factory or _default_factory
        self.device = device
        self.threads = threads
        self.measure_model_only = measure_model_only
        self.info: ModelInfo | None = None
        self.ready = threading.Event()  # set when a backend runs, or when all failed
        self.failed: str | None = None
        self.model_only: dict | None = None
        self.downstream_idle = downstream_idle
        self._mo_n, self._mo_s, self._since_burst = 0, 0.0, 0
        self._recent_inputs: list[np.ndarray] = []  # a few real inputs for the model-only benchmark
        self._backend = None
        self._halt = threading.Event()
        self.failed_exit_code: int | None = None

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            self._load(self.requested, skip=())
        except AppError as exc:
            self.failed = str(exc)
            self.failed_exit_code = exc.exit_code  # e.g. 4: no backend could run the model here
            self.ready.set()
            self.events.fatal(str(exc))
            return
        except Exception as exc:
            self.failed = crash_report("inference", exc)
            self.ready.set()  # the stages waiting for a model must not wait for ever
            self.events.fatal(self.failed)
            return
        try:
            while not self._halt.is_set():
                item = self.inbox.get(timeout=0.1)
                if item is None:
                    continue
                if isinstance(item, EndOfStream):
                    if self.measure_model_only and item.error is None:
                        if self._mo_n < self.MO_MIN:
                            self._model_only_burst(self.MO_MIN - self._mo_n)
                        self.model_only = self.model_only_result()
                    self.outbox.put(item)
                    continue
                self.outbox.put(self._infer(item))
                if self.measure_model_only and not item.refresh:
                    self._since_burst += 1
                    if self._since_burst >= self.MO_EVERY:
                        self._model_only_burst(self.MO_BURST)
        except Closed:
            pass
        except AppError as exc:
            self.events.fatal(str(exc))
        except Exception as exc:  # a bug or a surprise (e.g. in the model-only burst): never a silent, hung pipeline
            self.events.fatal(crash_report("inference", exc))
        finally:
            if self._backend is not None:
                try:
                    self._backend.close()
                except Exception:
                    pass

    def _load(self, requested: str, skip: tuple[str, ...] = ()) -> None:
        self._backend = open_backend(self.model_path, requested, factory=self.factory, device=self.device,
                                     threads=self.threads, notice=self._fell_back, skip=skip)
        b = self._backend
        self.info = ModelInfo(b.name, str(getattr(b, "path", self.model_path)), tuple(b.input_size),
                              float(b.threshold), list(getattr(b, "notes", []) or []), preset_of(b))
        self.ready.set()
        self.events.model_ready(self.info)

    def _fell_back(self, text: str) -> None:
        self.events.notice(text, "fallback")

    def _infer(self, frame: Frame) -> Frame:
        x = frame.model_input
        if x is None or x.shape[:2] != self.info.input_size:  # a fallback changed the model size
            x = resize_for_model(frame.image, self.info.input_size)
        t0 = time.perf_counter()
        try:
            probs = self._backend.predict(x[None])[0]
        except Exception as exc:
            if _is_bug(exc):
                raise
            # Runtime failure (device lost, driver error): next backend, same frame.
            failed = self._backend.name
            self._fell_back(f"{failed} backend failed while running ({_oneline(exc)}); falling back")
            try:
                self._backend.close()
            except Exception:
                pass
            if _sticky(exc):  # e.g. an illegal address: every CUDA call in this process fails from now on
                self.device = "cpu"
            nxt = _fallback_chain(failed, self.device)  # the same order and mechanism as at load time
            if not nxt:
                raise AppError(f"{self.model_path}: the {failed} backend failed while running: {_oneline(exc)}",
                               EXIT_FAILURE) from exc
            self._load(nxt[0], skip=(failed,))
            return self._infer(frame)
        ms = (time.perf_counter() - t0) * 1000.0
        frame.probs = probs
        frame.infer_ms = ms
        if not frame.refresh:
            self.stats_ref().inference(ms)
        if len(self._recent_inputs) < 8:
            self._recent_inputs.append(x)
        else:  # keep the inputs recent (and varied) without allocating
            self._recent_inputs[frame.index % 8] = x
        return frame

    # Model-only throughput, measured inside the run: every MO_EVERY frames, MO_BURST bare
    # predict() calls on recent real inputs, once the stages after this one are idle. Their time
    # is taken out of the pipeline's wall clock, so both figures see the same machine load -
    # the ratio holds on a shared, noisy machine where a before/after measurement would not.
    MO_EVERY, MO_BURST, MO_MIN = 80, 8, 24

    def _model_only_burst(self, k: int) -> None:
        deadline = time.perf_counter() + 1.0
        while not self.downstream_idle() and time.perf_counter() < deadline:
            time.sleep(0.0005)
        inputs = self._recent_inputs or [np.zeros((*self.info.input_size, 3), np.uint8)]
        t0 = time.perf_counter()
        for i in range(k):
            self._backend.predict(inputs[(self._mo_n + i) % len(inputs)][None])
        dt = time.perf_counter() - t0
        self._mo_n += k
        self._mo_s += dt
        self._since_burst = 0
        self.stats_ref().exclude(dt)

    def model_only_result(self) -> dict:
        n, s = self._mo_n, self._mo_s
        return {"model_only_fps": round(n / s, 3) if s > 0 else 0.0, "model_only_frames": n,
                "model_only_ms": round(s / n * 1000.0, 3) if n else None,
                "model_only_method": f"interleaved: {self.MO_BURST} bare predict() calls every {self.MO_EVERY} frames "
                                     f"(at least {self.MO_MIN}), excluded from the pipeline's wall time"}
