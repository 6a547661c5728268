"""Headless mode end to end: the CLI contract, every frame in the output, stats, bad inputs,
missing weights, no display, SIGTERM, and the real endoscopy clip when it is there."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from app.headless import run_headless
from app.testing import garbage, make_checkpoint, make_clip, truncate

from .conftest import shared_data, wait_for_file

REPO = Path(__file__).resolve().parents[1]
STATS_KEYS = {"frames_in", "frames_out", "dropped", "fps", "inference_ms_p50", "latency_ms_p50", "latency_ms_p95",
              "backend", "model_only_fps"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("headless")
    return {
        "clip": make_clip(d / "clip.mp4", frames=30, size=160),
        "long": make_clip(d / "long.mp4", frames=150, size=160, seed=1),
        "ckpt": make_checkpoint(d / "tiny.safetensors", input_size=128),
    }


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The torch backend sets the process-wide thread count; give other tests theirs back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def app_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "app", *args]


def run_app(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(app_cmd(*args), cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def decoded_frames(path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def test_headless_cli_writes_every_frame_and_stats(assets, tmp_path):
    out, stats_path = tmp_path / "out.mp4", tmp_path / "stats.json"
    r = run_app(assets["clip"], "--headless", "--out", str(out), "--stats", str(stats_path),
                "--weights", assets["ckpt"], "--backend", "torch", "--threads", "1")
    assert r.returncode == 0, r.stderr
    stats = json.loads(stats_path.read_text())
    assert STATS_KEYS <= set(stats)
    assert stats["frames_in"] == stats["frames_out"] == 30
    assert stats["dropped"] == 0
    assert stats["backend"] == "torch" and stats["input_size"] == [128, 128]
    assert stats["fps"] > 0 and stats["model_only_fps"] > 0 and stats["inference_ms_p50"] > 0
    assert stats["latency_ms_p95"] >= stats["latency_ms_p50"] > 0
    assert 0 < stats["inference_busy_pct"] <= 100.5
    assert decoded_frames(out) == 30
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.width, s.height) == ("h264", 160, 160)
    assert "Traceback" not in r.stderr


def test_headless_overlay_changes_the_frames_and_threshold_controls_it(assets, tmp_path):
    """The output is the overlaid video: threshold 0 tints everything green, 1 nothing."""
    def mean_rgb(threshold):
        out = tmp_path / f"t{threshold}.mp4"
        res = run_headless(assets["clip"], str(out), model_path=assets["ckpt"], backend="torch", threads=1,
                           threshold=threshold, opacity=0.5, max_frames=5, progress=False, log=lambda s: None)
        assert res.exit_code == 0 and res.stats["frames_out"] == 5
        with av.open(str(out)) as c:
            frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
        return frame.reshape(-1, 3).mean(0)

    everything, nothing = mean_rgb(0.0), mean_rgb(1.0)
    assert everything[1] - nothing[1] > 40  # green channel
    assert nothing[0] - everything[0] > 20  # red channel (mucosa) damped by the tint


def test_truncated_input_fails_and_keeps_a_playable_partial_output(assets, tmp_path):
    bad = truncate(assets["long"], str(tmp_path / "cut.mp4"), 0.5)
    out, stats_path = tmp_path / "out.mp4", tmp_path / "stats.json"
    logs = []
    res = run_headless(bad, str(out), model_path=assets["ckpt"], backend="torch", threads=1,
                       stats_path=str(stats_path), progress=False, log=logs.append)
    assert res.exit_code == 1
    assert any("truncated" in line or "corrupt" in line for line in logs), logs
    stats = json.loads(stats_path.read_text())
    assert stats["complete"] is False and stats["error"]
    assert 0 < stats["frames_recorded"] < 150
    assert decoded_frames(out) == stats["frames_recorded"]  # finalised: every frame before the cut plays


@pytest.mark.parametrize("case", ["corrupt", "missing"])
def test_unreadable_input_clear_error_nonzero_no_traceback(assets, tmp_path, case):
    src = garbage(str(tmp_path / "bad.mp4")) if case == "corrupt" else str(tmp_path / "missing.mp4")
    out = tmp_path / "out.mp4"
    r = run_app(src, "--headless", "--out", str(out), "--weights", assets["ckpt"], timeout=60)
    assert r.returncode == 2  # bad input
    assert "Traceback" not in r.stderr
    assert src in r.stderr
    assert ("not a readable video" if case == "corrupt" else "no such file") in r.stderr
    assert not out.exists()  # nothing half-written


def test_missing_weights_clear_error(assets, tmp_path, monkeypatch, capsys):
    from app import cli

    code = cli.main([assets["clip"], "--headless", "--out", str(tmp_path / "o.mp4"), "--weights", str(tmp_path / "none.safetensors")])
    assert code == 2 and "none.safetensors: no such checkpoint file" in capsys.readouterr().err
    # No --weights and no bundled default: the message names the default and the way out.
    monkeypatch.setattr(cli, "DEFAULT_WEIGHTS", tmp_path / "assets" / "weights" / "polyppvt-lite0.safetensors")
    code = cli.main([assets["clip"], "--headless", "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and "polyppvt-lite0.safetensors are missing" in err and "--weights" in err


def test_a_run_folder_as_weights_plays_its_best_checkpoint(short_clip, assets, tmp_path, capsys):
    from app import cli

    run = tmp_path / "run"
    run.mkdir()
    code = cli.main([short_clip, "--headless", "--out", str(tmp_path / "o.mp4"), "--weights", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "a folder with no best.safetensors" in err and "run folder" in err
    shutil.copyfile(assets["ckpt"], run / "best.safetensors")
    stats = tmp_path / "s.json"
    code = cli.main([short_clip, "--headless", "--out", str(tmp_path / "o.mp4"), "--weights", str(run),
                     "--compare-weights", str(run), "--backend", "torch", "--threads", "1", "--json", str(stats)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "--weights " + str(run) + ": a run folder; using its best.safetensors" in err
    assert "--compare-weights " + str(run) + ": a run folder" in err
    s = json.loads(stats.read_text())
    assert s["model"] == str(run / "best.safetensors") and s["compare"]["model"] == str(run / "best.safetensors")


def test_a_checkpoint_that_is_not_one_fails_cleanly(assets, tmp_path, capsys):
    from app import cli

    fake = garbage(str(tmp_path / "fake.safetensors"))
    code = cli.main([assets["clip"], "--headless", "--out", str(tmp_path / "o.mp4"), "--weights", fake, "--backend", "torch"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    # The file is unusable whichever backend runs it: the reason leads, whole, with no backend list.
    assert f"\napp: error: {fake}: not a readable safetensors file" in "\n" + err and "\u2026" not in err
    assert "no backend could run" not in err


def test_a_corrupt_checkpoint_under_auto_leads_with_the_reason(assets, tmp_path, capsys):
    from app import cli

    fake = garbage(str(tmp_path / "fake.safetensors"))
    code = cli.main([assets["clip"], "--headless", "--out", str(tmp_path / "o.mp4"), "--weights", fake])
    err = capsys.readouterr().err
    assert code == 2 and f"\napp: error: {fake}: not a readable safetensors file" in "\n" + err
    assert "TensorRT" not in err and "\u2026" not in err and not (tmp_path / "o.mp4").exists()


def test_an_output_that_cannot_be_created_fails_before_the_model_loads(assets, tmp_path, capsys):
    from app import cli

    for out, why in ((tmp_path / "no-such-dir" / "o.mp4", "does not exist"), ("/proc/o.mp4", "cannot create files in /proc")):
        code = cli.main([assets["clip"], "--headless", "--out", str(out), "--weights", assets["ckpt"]])
        err = capsys.readouterr().err
        assert code == 2 and f"--out {out}" in err and why in err
        assert "source:" not in err and "frames before it" not in err  # stopped before the source and the model


def test_usage_errors_exit_2(assets):
    r = run_app(assets["clip"], "--headless", timeout=60)
    assert r.returncode == 2 and "--out" in r.stderr
    r = run_app(assets["clip"], "--threshold", "1.5", timeout=60)
    assert r.returncode == 2 and "--threshold" in r.stderr


def test_no_display_points_at_headless(assets):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    r = subprocess.run(app_cmd(assets["clip"], "--weights", assets["ckpt"]), cwd=REPO, capture_output=True, text=True,
                       env={**env, "PYTHONPATH": str(REPO)}, timeout=60)
    assert r.returncode == 4  # no display: not available here
    assert "no display" in r.stderr and "--headless" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finalises_the_recording(assets, tmp_path, sig):
    out = tmp_path / "out.mp4"
    proc = subprocess.Popen(app_cmd(assets["long"], "--headless", "--out", str(out), "--weights", assets["ckpt"],
                                    "--backend", "torch", "--threads", "1", "--loop", "20"),
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(out.parent, f".tmp-{out.name}", proc)  # still running, recording begun beside the final path
        assert not out.exists()  # the final name appears only when the recording is finalised
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    assert f"interrupted by {sig.name}" in err and "Traceback" not in err
    assert decoded_frames(out) > 0  # the MP4 index was written: it plays


@pytest.mark.realdata
def test_real_endoscopy_clip(assets, tmp_path):
    real_clip = shared_data("clips", "cvc-clinicdb.mp4")
    out, stats_path = tmp_path / "real.mp4", tmp_path / "real.json"
    res = run_headless(str(real_clip), str(out), model_path=assets["ckpt"], backend="torch", threads=1, max_frames=60,
                       stats_path=str(stats_path), progress=False, log=lambda s: None)
    assert res.exit_code == 0
    stats = json.loads(stats_path.read_text())
    assert stats["frames_in"] == stats["frames_out"] == 60 and stats["dropped"] == 0
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        assert (s.width, s.height) == (256, 256)
        assert sum(1 for _ in c.decode(s)) == 60


def test_no_backend_can_run_the_model_exits_4(assets, tmp_path):
    from engines import BackendError

    def nothing_runs(path, backend="auto", device=None, threads=None):
        raise BackendError(f"{backend} cannot run here (test)")

    res = run_headless(assets["clip"], str(tmp_path / "o.mp4"), model_path=assets["ckpt"], backend="onnxruntime",
                       backend_factory=nothing_runs, progress=False, log=lambda s: None)
    assert res.exit_code == 4 and "no backend could run the model" in res.stats["error"]
    assert not (tmp_path / "o.mp4").exists()


class _FailingBackend:
    """A tiny backend whose `fail_at`-th predict() call (the first is the warm-up) raises `exc`."""

    input_size, threshold, notes = (8, 8), 0.5, []

    def __init__(self, name, fail_at, exc):
        self.name, self.fail_at, self.exc, self.calls = name, fail_at, exc, 0

    def predict(self, frames):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise self.exc
        return np.zeros(frames.shape[:3], np.float32)

    def close(self):
        pass


def _headless_within(seconds: float, **kwargs):
    """run_headless in a thread: a hung pipeline fails the test instead of freezing it."""
    import threading

    done = []
    thread = threading.Thread(target=lambda: done.append(run_headless(**kwargs)), daemon=True)
    thread.start()
    thread.join(seconds)
    if not done:
        pytest.fail(f"headless did not finish within {seconds:g} s: the pipeline hangs")
    return done[0]


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("short") / "short.mp4", frames=6, size=64)


def test_an_unexpected_error_in_the_inference_thread_ends_the_run_with_its_traceback(short_clip, tmp_path):
    # warm-up + 6 frames pass; the model-only burst after the last frame fails
    res = _headless_within(60, source=short_clip, out=str(tmp_path / "o.mp4"), model_path="m.onnx",
                           backend="onnxruntime", progress=False, log=lambda s: None,
                           backend_factory=lambda path, backend, device=None, threads=None:
                           _FailingBackend(backend, 8, OSError("scratch file vanished (test)")))
    assert res.exit_code == 1 and res.stats["complete"] is False
    assert "scratch file vanished (test)" in res.stats["error"] and "Traceback" in res.stats["error"]


def test_a_programming_error_in_predict_does_not_fall_back_through_every_backend(short_clip, tmp_path):
    built = []

    def factory(path, backend, device=None, threads=None):
        built.append(backend)
        return _FailingBackend(backend, 2, ValueError("frames must have shape (N,8,8,3) (test)"))

    res = _headless_within(60, source=short_clip, out=str(tmp_path / "o.mp4"), model_path="m.onnx",
                           backend="onnxruntime", backend_factory=factory, progress=False, log=lambda s: None)
    assert built == ["onnxruntime"] and res.stats["notices"] == []  # a bug: no other backend would fix it
    assert res.exit_code == 1 and "ValueError" in res.stats["error"] and "Traceback" in res.stats["error"]


def _tiny_factory(path, backend, device=None, threads=None):
    return _FailingBackend(backend, 10 ** 9, RuntimeError("never"))


def test_stats_are_written_last_and_say_a_failed_frame_check_failed(short_clip, tmp_path, monkeypatch):
    from app.pipeline.stats import RunStats

    counted = RunStats.frame_in

    def twice(self):  # frames in and out disagree: the run's own check fails it
        counted(self)
        counted(self)

    monkeypatch.setattr(RunStats, "frame_in", twice)
    stats_path = tmp_path / "s.json"
    res = run_headless(short_clip, str(tmp_path / "o.mp4"), model_path="m.onnx", backend="onnxruntime",
                       backend_factory=_tiny_factory, stats_path=str(stats_path), progress=False, log=lambda s: None)
    written = json.loads(stats_path.read_text())
    assert res.exit_code == 1 and "12 frames in, 6 out" in written["error"]
    assert written["complete"] is False and written == res.stats


def test_signal_handlers_are_restored_when_the_run_raises(short_clip, tmp_path, monkeypatch):
    from app.pipeline.runner import Pipeline

    def broken_open(self, *a, **k):
        raise RuntimeError("open failed (test)")

    monkeypatch.setattr(Pipeline, "open", broken_open)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(RuntimeError, match="open failed"):
        run_headless(short_clip, str(tmp_path / "o.mp4"), model_path="m.onnx", backend="onnxruntime",
                     backend_factory=_tiny_factory, progress=False, log=lambda s: None)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_missing_xcb_library_is_named_with_the_install_command():
    from app.ui.app import display_failure

    qt_said = ("qt.qpa.plugin: From 6.5.0, xcb-cursor0 or libxcb-cursor0 is needed to load the Qt xcb platform plugin.\n"
               "qt.qpa.plugin: Could not load the Qt platform plugin \"xcb\" in \"\" even though it was found.\n"
               "This application failed to start because no Qt platform plugin could be initialized.")
    text = display_failure(qt_said, ":0")
    assert "libxcb-cursor0" in text and "sudo apt install" in text
    for package in ("libxcb-icccm4", "libxcb-cursor0", "libxkbcommon-x11-0"):
        assert package in text
    assert "--headless" in text


def test_an_output_that_is_an_input_is_refused_before_anything_is_written(short_clip, tmp_path, capsys):
    from app import cli

    link = tmp_path / "link.mp4"
    link.symlink_to(short_clip)
    size = os.path.getsize(short_clip)
    for flags in (["--out", short_clip], ["--out", str(link)], ["--out", str(tmp_path / "o.mp4"), "--stats", short_clip],
                  ["--out", str(tmp_path / "o.mp4"), "--frames-csv", str(link)]):
        code = cli.main([short_clip, "--headless", "--weights", "m.onnx", *flags])
        err = capsys.readouterr().err
        assert code == 2 and "is the input" in err and flags[-2] in err, (flags, err)
        assert os.path.getsize(short_clip) == size


def test_the_model_is_opened_once_per_start(assets, tmp_path, monkeypatch):
    """The command checks the model before anything starts and hands that opened file to the
    inference thread: its metadata is read once, not once per check and again per backend."""
    import kdas_core.io.checkpoint as checkpoint
    from app import cli

    reads = []
    real = checkpoint.read_metadata
    monkeypatch.setattr(checkpoint, "read_metadata", lambda path: reads.append(str(path)) or real(path))
    code = cli.main([assets["clip"], "--headless", "--out", str(tmp_path / "o.mp4"), "--weights", assets["ckpt"],
                     "--backend", "torch", "--threads", "1", "--max-frames", "3"])
    assert code == 0
    assert reads.count(str(assets["ckpt"])) == 1, reads
