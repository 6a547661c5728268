"""The PyQt6 viewer: offscreen widget tests (pytest-qt) and one real window under Xvfb."""

from __future__ import annotations

import collections
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

pytest.importorskip("pytestqt")
from PyQt6.QtCore import Qt  # noqa: E402
from PyQt6.QtWidgets import QFileDialog  # noqa: E402

from app import DISCLAIMER  # noqa: E402
from app.testing import make_checkpoint, make_clip, truncate  # noqa: E402
from app.ui.main_window import MainWindow  # noqa: E402

from .conftest import wait_for_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WAIT_MS = 60_000  # generous: CI machines are shared; tests finish as soon as the condition holds


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("window")
    return {
        "clip": make_clip(d / "clip.mp4", frames=30, size=160),
        "long": make_clip(d / "long.mp4", frames=150, size=160, seed=1),
        "ckpt": make_checkpoint(d / "tiny.safetensors", input_size=128),
        "dir": d,
    }


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def window(qtbot, assets, tmp_path):
    def make(**kw):
        w = MainWindow(assets["ckpt"], "torch", threads=1, record_dir=str(tmp_path / "rec"), **kw)
        qtbot.addWidget(w)  # closed (recording finalised, threads stopped) at teardown
        w.show()
        return w

    return make


def image_array(win) -> np.ndarray:
    img = win.video.image()
    assert img is not None
    ptr = img.constBits()
    ptr.setsize(img.sizeInBytes())
    arr = np.frombuffer(ptr, np.uint8).reshape(img.height(), img.bytesPerLine())[:, : img.width() * 3]
    return arr.reshape(img.height(), img.width(), 3).copy()


def wait_frames(qtbot, win, n: int) -> None:
    qtbot.waitUntil(lambda: win.pipeline.stats.frames_out >= n, timeout=WAIT_MS)


def wait_settled(qtbot, win) -> None:
    """After a pause: every frame the source emitted has been shown or counted as dropped or
    stale, on two polls in a row (a frame already past the source's pacing when pause came is
    counted too)."""
    s, seen = win.pipeline.stats, []

    def settled() -> bool:
        seen.append((s.frames_in, s.frames_out + s.dropped + s.stale))
        return len(seen) >= 2 and seen[-1] == seen[-2] and seen[-1][0] == seen[-1][1]

    qtbot.waitUntil(settled, timeout=WAIT_MS)


def test_window_plays_and_shows_disclaimer_model_and_readouts(qtbot, window, assets):
    win = window()
    assert DISCLAIMER in win.windowTitle() and win.disclaimer.text() == DISCLAIMER
    assert win.open_source(assets["clip"])
    qtbot.waitUntil(lambda: win.ended, timeout=WAIT_MS)
    assert "torch" in win.model_label.text() and "polyppvt-lite0 \u00b7 128\u00b2" in win.model_label.text()  # preset, not a file hash
    stats = win.pipeline.stats.summary()
    assert stats["frames_in"] == 30 and stats["frames_out"] + stats["dropped"] == 30
    text = win._readout_text()
    for part in ("fps", "inference", "latency p50", "p95", "dropped"):
        assert part in text
    assert image_array(win).shape == (160, 160, 3)
    # at the end of the file: the readout says so and the polyp cue is off, until Play
    win._update_readout()
    assert "clip ended" in win.readout_label.text() and win.cue_label.text() == "no polyp"
    assert win.analysis.cue_border is False
    win.toggle_play()
    assert not win.ended and win.analysis.cue_border == win.cue_box.isChecked()


def _busy_gui(win, seconds: float) -> None:
    """Keep the GUI thread from painting while frames keep arriving at the display."""
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        time.sleep(0.01)


def test_every_frame_ends_once_shown_dropped_or_stale_in_stats_and_csv(qtbot, window, assets, tmp_path):
    csv_path = tmp_path / "frames.csv"
    win = window(frames_csv=str(csv_path))
    win.open_source(assets["long"])  # 150 frames at 25 fps
    wait_frames(qtbot, win, 3)
    _busy_gui(win, 0.5)  # frames wait at the display and replace one another: display_busy
    epoch = win.pipeline.epoch.value
    win.seek_to(3.0)  # the frame waiting at the display is now stale
    while win.pipeline.epoch.value == epoch:  # the source has taken the seek (GUI still not painting)
        time.sleep(0.005)
    qtbot.waitUntil(lambda: win.ended, timeout=WAIT_MS)
    wait_settled(qtbot, win)
    s = win.pipeline.stats.summary()
    assert s["frames_in"] == s["frames_out"] + s["dropped"] + s["stale"] and s["in_flight"] == 0
    assert s["dropped_by"]["display_busy"] >= 1 and s["stale"] >= 1
    assert s["dropped"] == sum(s["dropped_by"].values())
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == s["frames_in"]  # one row per frame, whatever became of it
    outcomes = collections.Counter(r["outcome"] for r in rows)
    assert outcomes == {"shown": s["frames_out"], "dropped": s["dropped"], "stale": s["stale"]}
    reasons = collections.Counter(r["drop_reason"] for r in rows if r["outcome"] == "dropped")
    assert reasons == {k: v for k, v in s["dropped_by"].items() if v}
    assert sum(int(r["dropped"]) for r in rows) == s["dropped"]


def test_a_new_source_starts_its_count_without_the_old_sources_frames(qtbot, window, assets):
    win = window()
    win.open_source(assets["long"])
    wait_frames(qtbot, win, 3)
    _busy_gui(win, 0.3)  # an old-source frame waits at the display when the new source opens
    win.open_source(assets["clip"])  # 30 frames
    qtbot.waitUntil(lambda: win.ended, timeout=WAIT_MS)
    wait_settled(qtbot, win)
    s = win.pipeline.stats.summary()
    assert s["frames_in"] == 30 == s["frames_out"] + s["dropped"] + s["stale"]


def test_sliders_and_keys_change_the_overlay_while_paused(qtbot, window, assets):
    win = window()
    win.open_source(assets["long"])
    wait_frames(qtbot, win, 3)
    qtbot.keyClick(win, Qt.Key.Key_Space)  # pause
    assert win.paused and win.play_button.text() == "Play"
    wait_settled(qtbot, win)  # in-flight frames have landed

    def shown_after(action):
        before = image_array(win)
        action()
        qtbot.waitUntil(lambda: not np.array_equal(image_array(win), before), timeout=WAIT_MS)
        return image_array(win).reshape(-1, 3).astype(float).mean(0)

    win.opacity_slider.setValue(60)
    everything = shown_after(lambda: win.threshold_slider.setValue(0))  # threshold 0: the whole frame is mask
    nothing = shown_after(lambda: win.threshold_slider.setValue(100))  # threshold 1: no mask
    assert everything[1] - nothing[1] > 40  # green tint
    win.threshold_slider.setValue(0)
    qtbot.waitUntil(lambda: image_array(win).reshape(-1, 3).mean(0)[1] > nothing[1] + 40, timeout=WAIT_MS)
    faint = shown_after(lambda: win.opacity_slider.setValue(10))
    assert everything[1] - faint[1] > 20  # less opacity, less green
    qtbot.keyClick(win, Qt.Key.Key_Up)  # keyboard: threshold +0.05
    assert win.threshold_slider.value() == 5 and win.settings.threshold == pytest.approx(0.05)
    qtbot.keyClick(win, Qt.Key.Key_C)  # keyboard: contour off
    assert win.settings.contour is False
    assert win.pipeline.stats.summary()["frames_in"] < 150  # it really was paused


def test_backend_failure_falls_back_with_a_visible_notice(qtbot, assets, tmp_path):
    from engines import BackendError, load_backend

    def factory(path, backend, device=None, threads=None):
        if backend in ("tensorrt", "onnxruntime"):
            raise BackendError(f"{path}: {backend} engine was built for another GPU")
        return load_backend(path, backend=backend, device=device, threads=threads)

    win = MainWindow(assets["ckpt"], "tensorrt", threads=1, backend_factory=factory)
    qtbot.addWidget(win)
    win.show()
    win.open_source(assets["clip"])
    wait_frames(qtbot, win, 2)  # it runs...
    assert "torch" in win.model_label.text() and "fallback" in win.model_label.text()  # ...on the one that worked
    assert any("tensorrt backend failed" in n and "falling back" in n for n in win.notices)
    assert any("onnxruntime backend failed" in n for n in win.notices)
    assert "backend failed" in win.statusBar().currentMessage()  # shown, not just logged


def test_seek_while_paused_shows_the_new_position(qtbot, window, assets):
    win = window()
    win.open_source(assets["long"])  # 150 frames = 6 s
    wait_frames(qtbot, win, 2)
    win.toggle_play()  # pause
    qtbot.keyClick(win, Qt.Key.Key_Right)  # +5 s: one frame is decoded and shown although paused
    qtbot.waitUntil(lambda: win.last_pts is not None and win.last_pts >= 4.9, timeout=WAIT_MS)
    assert win.paused
    qtbot.keyClick(win, Qt.Key.Key_Home)
    qtbot.waitUntil(lambda: win.last_pts is not None and win.last_pts < 0.1, timeout=WAIT_MS)
    assert win.seek_slider.value() < 100


def test_open_file_dialog_path_and_bad_file_dialog(qtbot, window, assets, tmp_path, monkeypatch):
    win = window()
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (assets["clip"], "")))
    qtbot.mouseClick(win.open_button, Qt.MouseButton.LeftButton)
    assert win.source_spec == assets["clip"]
    wait_frames(qtbot, win, 3)
    assert win.seek_slider.isEnabled()

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 5000)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(bad), "")))
    win.open_file_dialog()
    assert win.dialogs and win.dialogs[-1].isVisible()  # a dialog, not a freeze
    assert str(bad) in win.dialogs[-1].text()
    assert win.source_spec == assets["clip"]  # the good source stays


def test_truncated_file_in_the_window_shows_a_dialog(qtbot, window, assets, tmp_path):
    win = window()
    win.open_source(truncate(assets["long"], str(tmp_path / "cut.mp4"), 0.5))
    qtbot.waitUntil(lambda: win.ended, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: bool(win.dialogs), timeout=5000)
    assert "truncated" in win.dialogs[-1].text() or "corrupt" in win.dialogs[-1].text()
    assert win.pipeline.stats.frames_out > 0


def test_record_start_stop_makes_a_playable_file(qtbot, window, assets, tmp_path):
    win = window()
    win.open_source(assets["long"])
    wait_frames(qtbot, win, 2)
    qtbot.keyClick(win, Qt.Key.Key_R)  # start
    assert win.record_button.isChecked() and win.recording.active
    start = win.pipeline.stats.frames_out
    qtbot.waitUntil(lambda: win.pipeline.stats.frames_out >= start + 10, timeout=WAIT_MS)
    qtbot.mouseClick(win.record_button, Qt.MouseButton.LeftButton)  # stop
    assert not win.recording.active and win.last_recording
    with av.open(win.last_recording) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        assert (s.width, s.height) == (160, 160)
    assert n >= 10
    snap = win.snapshot()
    assert snap and Path(snap).suffix == ".png" and Path(snap).stat().st_size > 0


def test_a_recording_failure_stops_the_record_button_whatever_its_words(qtbot, window, assets, monkeypatch):
    """The window switches on the notice's kind ("recording"), not on its text: this message
    says nothing about recording, and a fallback notice must not stop it."""
    from app.errors import AppError
    from app.pipeline import recorder

    class DiskFull:
        def __init__(self, *a, **k):
            raise AppError("no space left on device (test)")

    monkeypatch.setattr(recorder, "Recorder", DiskFull)
    win = window()
    win.open_source(assets["long"])
    wait_frames(qtbot, win, 2)
    win.events.notice("torch backend failed (test); falling back", "fallback")
    qtbot.waitUntil(lambda: "fallback" in win.model_label.text(), timeout=WAIT_MS)
    win.events.notice("a note that says falling back but is not one (test)")
    qtbot.waitUntil(lambda: len(win.notices) == 2, timeout=WAIT_MS)
    assert win.fallbacks == ["torch backend failed (test); falling back"]
    win.record_button.setChecked(True)
    qtbot.waitUntil(lambda: not win.record_button.isChecked(), timeout=WAIT_MS)
    assert not win.recording.active and win.errors == ["no space left on device (test)"]
    assert len(win.notices) == 2  # a recording problem is an error shown, not a notice


def test_closing_the_window_finalises_the_recording(qtbot, assets, tmp_path):
    win = MainWindow(assets["ckpt"], "torch", threads=1, record_dir=str(tmp_path / "rec"))
    win.show()
    win.open_source(assets["long"])
    wait_frames(qtbot, win, 2)
    win.record_button.setChecked(True)
    qtbot.waitUntil(lambda: win.recording._recorder is not None and win.recording._recorder.frames_written >= 5,
                    timeout=WAIT_MS)
    win.close()
    files = list((tmp_path / "rec").glob("*.mp4"))
    assert len(files) == 1
    with av.open(str(files[0])) as c:
        assert sum(1 for _ in c.decode(video=0)) >= 5


class _Cam:
    def __init__(self, world):
        self.world, self.opened = world, world["plugged"]

    def isOpened(self):
        return self.opened

    def set(self, *_):
        return True

    def get(self, _):
        return 0

    def read(self):
        time.sleep(0.02)
        if self.opened and self.world["plugged"]:
            return True, np.full((96, 128, 3), 90, np.uint8)
        return False, None

    def release(self):
        self.opened = False


def test_camera_signal_lost_is_shown_and_clears_when_it_returns(qtbot, window):
    world = {"plugged": True}
    win = window(camera_factory=lambda dev: _Cam(world))
    assert win.open_source("0")
    assert not win.seek_slider.isEnabled()
    wait_frames(qtbot, win, 3)
    world["plugged"] = False
    qtbot.waitUntil(lambda: "Signal lost" in win.video.message(), timeout=WAIT_MS)
    world["plugged"] = True
    qtbot.waitUntil(lambda: win.video.message() == "", timeout=WAIT_MS)
    n = win.pipeline.stats.frames_out
    qtbot.waitUntil(lambda: win.pipeline.stats.frames_out > n + 3, timeout=WAIT_MS)


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    return env


def test_sigterm_closes_the_window_and_finalises_the_recording(assets, tmp_path):
    rec = tmp_path / "rec"
    proc = subprocess.Popen([sys.executable, "-m", "app", assets["long"], "--weights", assets["ckpt"], "--backend", "torch",
                             "--threads", "1", "--record", str(rec)],
                            cwd=REPO, env=_env(QT_QPA_PLATFORM="offscreen"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        path = wait_for_file(rec, ".tmp-*.mp4", proc)  # created with the first recorded frame, beside its final name
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out  # terminated, as --help says
    assert "recording saved" in out
    final = path.with_name(path.name.removeprefix(".tmp-"))
    assert not path.exists() and final.exists()  # moved into place when finalised
    with av.open(str(final)) as c:
        assert sum(1 for _ in c.decode(video=0)) > 0


def _start_xvfb():
    """(process, display) for a fresh Xvfb, or None."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        return None
    r, w = os.pipe()
    proc = subprocess.Popen([xvfb, "-displayfd", str(w), "-screen", "0", "1280x900x24", "-nolisten", "tcp"],
                            pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    with os.fdopen(r) as f:
        number = f.readline().strip()
    if not number:
        proc.kill()
        return None
    return proc, f":{number}"


GRAB = r"""
import sys, time
from PyQt6.QtGui import QGuiApplication
app = QGuiApplication(sys.argv[:1])
deadline = time.time() + float(sys.argv[2])
while True:
    img = app.primaryScreen().grabWindow(0)  # the X server's root window: what a user would see
    img.save(sys.argv[1], "PNG")
    im = img.toImage().convertToFormat(img.toImage().Format.Format_RGB888)
    ptr = im.constBits(); ptr.setsize(im.sizeInBytes())
    import numpy as np
    a = np.frombuffer(ptr, np.uint8).reshape(im.height(), im.bytesPerLine())[:, :im.width() * 3].reshape(im.height(), im.width(), 3)
    r, g = a[..., 0].astype(int), a[..., 1].astype(int)
    if ((g > 140) & (g > r + 60)).mean() > 0.05 or time.time() > deadline:
        break
    time.sleep(0.5)
"""


def test_real_window_under_xvfb_shows_the_mask(assets, tmp_path):
    started = _start_xvfb()
    if started is None:
        pytest.skip("Xvfb is not installed (apt-get install xvfb; CI installs it)")
    xvfb, display = started
    env = _env(DISPLAY=display)
    env.pop("QT_QPA_PLATFORM", None)  # the real xcb platform, not offscreen
    env.pop("WAYLAND_DISPLAY", None)
    shot = REPO / "out" / "test-screenshots" / "xvfb-window.png"  # kept for people to look at (git-ignored)
    shot.parent.mkdir(parents=True, exist_ok=True)
    app = subprocess.Popen([sys.executable, "-m", "app", assets["long"], "--weights", assets["ckpt"], "--backend", "torch",
                            "--threads", "1", "--threshold", "0", "--opacity", "0.6",
                            "--no-cue"],  # threshold 0 puts the contour on the frame edge, where the cue border goes
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        grab = subprocess.run([sys.executable, "-c", GRAB, str(shot), "90"], env=env, capture_output=True, text=True,
                              timeout=150)
        assert grab.returncode == 0, grab.stderr
        assert app.poll() is None, app.communicate()[0]
        app.send_signal(signal.SIGTERM)
        out, _ = app.communicate(timeout=60)
        assert app.returncode == 143, out
    finally:
        for p in (app, xvfb):
            if p.poll() is None:
                p.kill()
                p.wait()
    import cv2

    bgr = cv2.imread(str(shot))
    assert bgr is not None, f"no screenshot at {shot}"
    rgb = bgr[..., ::-1].astype(int)
    r, g = rgb[..., 0], rgb[..., 1]
    tinted = (g > 140) & (g > r + 60)  # mask colour (green) blended over reddish mucosa
    assert tinted.mean() > 0.05, f"mask colour covers only {tinted.mean():.1%} of the screen; see {shot}"
    assert ((rgb[..., 0] < 60) & (rgb[..., 1] > 200) & (rgb[..., 2] < 60)).any()  # the pure-green contour


def test_analysis_controls_smooth_cue_and_compare(qtbot, window, assets, tmp_path, monkeypatch):
    """In the window: the smoothing and cue switches reach the pipeline (also by key),
    the cue label lights with the border, and Compare runs a second model chosen in a dialog."""
    from app.pipeline.analysis import AnalysisSettings
    from app.pipeline.cue import CUE_RGB

    csv_path = tmp_path / "frames.csv"
    win = window(threshold=0.0, analysis=AnalysisSettings(), frames_csv=str(csv_path))  # threshold 0: always a "polyp"
    assert not win.smooth_box.isChecked() and win.analysis.smooth is None
    win.open_source(assets["long"])
    wait_frames(qtbot, win, 1)
    qtbot.keyClick(win, Qt.Key.Key_T)
    assert win.smooth_box.isChecked() and win.analysis.smooth is not None
    qtbot.waitUntil(lambda: win.cue_on, timeout=WAIT_MS)
    assert "POLYP" in win.cue_label.text() and "100.0 %" in win.cue_label.text()
    qtbot.waitUntil(lambda: tuple(image_array(win)[0, 80]) == CUE_RGB, timeout=WAIT_MS)  # the border, shown
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (assets["ckpt"], "")))
    qtbot.keyClick(win, Qt.Key.Key_B)
    qtbot.waitUntil(lambda: win.compare_info is not None, timeout=WAIT_MS)
    assert win.compare_button.isChecked() and "vs" in win.model_label.text()
    qtbot.waitUntil(lambda: win.pipeline.stats.live()["inference_b_ms"] is not None, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: win.pipeline.analyzer.recent_agreement() is not None, timeout=WAIT_MS)
    win._update_readout()
    assert "B " in win.readout_label.text() and "agree 1.00" in win.readout_label.text()  # same model, threshold 0
    qtbot.keyClick(win, Qt.Key.Key_P)  # cue border off: the label stays, the border goes
    assert win.analysis.cue_border is False
    qtbot.keyClick(win, Qt.Key.Key_Space)
    wait_settled(qtbot, win)
    win.pipeline.refresh()
    qtbot.waitUntil(lambda: tuple(image_array(win)[0, 80]) != CUE_RGB, timeout=WAIT_MS)
    stats = win.stats_summary()
    assert stats["temporal"]["smooth"] and stats["cue"]["episodes"] == 1
    assert stats["compare"]["model"] == assets["ckpt"] and stats["compare"]["agreement"]["dice_mean"] == 1.0
    qtbot.mouseClick(win.compare_button, Qt.MouseButton.LeftButton)  # stop comparing
    qtbot.waitUntil(lambda: win.compare_info is None, timeout=WAIT_MS)
    win.close()
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("index,") and len(rows) > 2
