"""The viewer window: video, transport and overlay controls, live readouts, recording."""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path

from PyQt6.QtCore import Qt, QTimer
from PyQt6.QtGui import QAction, QKeySequence
from PyQt6.QtWidgets import (
    QApplication,
    QCheckBox,
    QFileDialog,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from kdas_core.io.atomic import write_json
from kdas_core.models.presets import DEFAULT_THRESHOLD

from .. import DISCLAIMER
from ..errors import AppError
from ..pipeline.analysis import AnalysisSettings
from ..pipeline.frames_csv import FramesCsv
from ..pipeline.inference import ModelInfo, loading_message
from ..pipeline.items import EndOfStream, Notice
from ..pipeline.overlay import OverlaySettings
from ..pipeline.runner import Pipeline
from ..pipeline.source import open_reader
from .bridge import DisplaySink, QtEvents, RecordingSink
from .video_widget import VideoWidget

VIDEO_FILTER = "Videos (*.mp4 *.m4v *.mov *.mkv *.avi *.webm *.mpg *.mpeg *.ts *.wmv);;All files (*)"
SEEK_STEP_S = 5.0
STALL_S = 2.0  # a live source silent this long is shown as "signal lost" even before the driver says so

SHORTCUTS = [
    ("Space", "play / pause"),
    ("Left / Right", f"seek \u2212/+ {SEEK_STEP_S:g} s (files)"),
    ("Home", "back to the start"),
    ("Up / Down", "threshold +/\u2212 0.05"),
    ("] / [", "opacity +/\u2212 0.1"),
    ("C", "contour on/off"),
    ("T", "temporal smoothing on/off"),
    ("P", "polyp cue border on/off"),
    ("B", "compare with a second model / stop comparing"),
    ("R", "record on/off"),
    ("S", "snapshot (PNG)"),
    ("Ctrl+O", "open a video file"),
    ("Ctrl+K", "open a camera"),
    ("F11", "full screen"),
    ("F1", "this list"),
    ("Ctrl+Q", "quit"),
]


class MainWindow(QMainWindow):
    def __init__(self, model_path: str, backend: str = "auto", *, threshold: float | None = None,
                 opacity: float = 0.4, contour: bool = True, record_dir: str | None = None,
                 stats_path: str | None = None, exit_at_end: bool = False, backend_factory=None,
                 camera_factory=None, threads: int | None = None, analysis: AnalysisSettings | None = None,
                 compare_path: str | None = None, frames_csv: str | None = None, loop: int = 1,
                 device: str | None = None):
        super().__init__()
        self.loop = loop  # plays of a file: 1 once, 0 for ever (the bundled demo)
        self.model_path = model_path
        self.record_dir = Path(record_dir) if record_dir else Path("recordings")
        self.stats_path = stats_path
        self.exit_at_end = exit_at_end
        self.camera_factory = camera_factory
        self.reader = None
        self.source_spec: str | None = None
        self.info: ModelInfo | None = None
        self.ended = False
        self.signal_lost = False
        self.last_pts: float | None = None
        self.dialogs: list[QMessageBox] = []  # shown non-modally; kept so tests can inspect them
        self.errors: list[str] = []
        self._notices: list[Notice] = []  # every notice but the recording ones (those stop the recording)
        self._closing = False
        self._final_stats: dict | None = None
        self.last_recording: str | None = None
        self.cue_on = False
        self.compare_info: ModelInfo | None = None
        self.frames_csv = FramesCsv(frames_csv) if frames_csv else None

        self.settings = OverlaySettings(threshold=threshold, opacity=opacity, contour=contour)
        self.events = QtEvents()
        self.analysis = analysis or AnalysisSettings()
        self.pipeline = Pipeline(model_path, backend, settings=self.settings, events=self.events, realtime=True, device=device,
                                 backend_factory=backend_factory, threads=threads, analysis=self.analysis,
                                 compare_path=compare_path)
        self.display = DisplaySink(lambda *a: self.pipeline.account(*a))
        self.recording = RecordingSink(on_error=lambda text: self.events.notice(text, "recording"))
        if self.frames_csv is not None:  # one row per frame, when the pipeline counts it (painted or not)
            self.pipeline.outcome_listeners.append(self.frames_csv)
        self.pipeline.sinks += [self.recording, self.display]

        self._build_ui()
        self._build_actions()
        self.video.viewSizeChanged.connect(lambda w, h: setattr(self.pipeline, "view_box", (w, h)))  # display-size frames
        self.events.modelReady.connect(self._on_model_ready)
        self.events.noticed.connect(self._on_notice)
        self.events.signalChanged.connect(self._on_signal)
        self.events.failed.connect(self._on_error)
        self.events.ended.connect(self._on_end)
        self.events.compareReady.connect(self._on_compare_ready)
        self.display.frameReady.connect(self._on_frame)

        self._readout_timer = QTimer(self, interval=500, timeout=self._update_readout)
        self._readout_timer.start()
        self._seek_timer = QTimer(self, singleShot=True, interval=60, timeout=self._do_seek)
        self.video.set_message(loading_message(self.model_path))
        self.pipeline.start()

    # ------------------------------------------------------------------ UI construction
    def _build_ui(self) -> None:
        self.setWindowTitle(f"KDAS polyp viewer \u2014 {DISCLAIMER}")
        self.resize(960, 720)
        central = QWidget(self)
        layout = QVBoxLayout(central)
        layout.setContentsMargins(6, 6, 6, 6)

        self.disclaimer = QLabel(DISCLAIMER, central)
        self.disclaimer.setObjectName("disclaimer")
        self.disclaimer.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.disclaimer.setStyleSheet("QLabel#disclaimer { background: #7a1f1f; color: white; font-weight: bold; padding: 3px; }")
        layout.addWidget(self.disclaimer)

        self.video = VideoWidget(central)
        layout.addWidget(self.video, 1)

        seek_row = QHBoxLayout()
        self.seek_slider = QSlider(Qt.Orientation.Horizontal, central)
        self.seek_slider.setEnabled(False)
        self.seek_slider.setToolTip("Position (files only)")
        self.seek_slider.sliderMoved.connect(lambda _v: self._seek_timer.start())
        self.seek_slider.actionTriggered.connect(self._on_seek_action)
        self.position_label = QLabel("--:-- / --:--", central)
        seek_row.addWidget(self.seek_slider, 1)
        seek_row.addWidget(self.position_label)
        layout.addLayout(seek_row)

        row = QHBoxLayout()
        self.open_button = QPushButton("Open file\u2026", central)
        self.open_button.clicked.connect(self.open_file_dialog)
        self.camera_button = QPushButton("Camera\u2026", central)
        self.camera_button.clicked.connect(self.open_camera_dialog)
        self.play_button = QPushButton("Pause", central)
        self.play_button.setEnabled(False)
        self.play_button.clicked.connect(self.toggle_play)
        for w in (self.open_button, self.camera_button, self.play_button):
            row.addWidget(w)

        row.addSpacing(12)
        row.addWidget(QLabel("Threshold", central))
        self.threshold_slider = QSlider(Qt.Orientation.Horizontal, central)
        self.threshold_slider.setRange(0, 100)
        self.threshold_slider.setValue(round((self.settings.threshold if self.settings.threshold is not None else DEFAULT_THRESHOLD) * 100))
        self.threshold_slider.valueChanged.connect(self._on_threshold)
        self.threshold_label = QLabel(central)
        self.threshold_label.setMinimumWidth(34)
        row.addWidget(self.threshold_slider, 1)
        row.addWidget(self.threshold_label)

        row.addWidget(QLabel("Opacity", central))
        self.opacity_slider = QSlider(Qt.Orientation.Horizontal, central)
        self.opacity_slider.setRange(0, 100)
        self.opacity_slider.setValue(round(self.settings.opacity * 100))
        self.opacity_slider.valueChanged.connect(self._on_opacity)
        self.opacity_label = QLabel(central)
        self.opacity_label.setMinimumWidth(34)
        row.addWidget(self.opacity_slider, 1)
        row.addWidget(self.opacity_label)

        self.contour_box = QCheckBox("Contour", central)
        self.contour_box.setChecked(self.settings.contour)
        self.contour_box.toggled.connect(self._on_contour)
        row.addWidget(self.contour_box)

        row.addSpacing(12)
        self.record_button = QPushButton("\u25cf Record", central)
        self.record_button.setCheckable(True)
        self.record_button.toggled.connect(self._on_record_toggled)
        self.snapshot_button = QPushButton("Snapshot", central)
        self.snapshot_button.clicked.connect(self.snapshot)
        row.addWidget(self.record_button)
        row.addWidget(self.snapshot_button)
        layout.addLayout(row)

        # Analysis: temporal filter, polyp cue, second model.
        arow = QHBoxLayout()
        self.smooth_box = QCheckBox("Smooth", central)
        self.smooth_box.setChecked(self.analysis.smooth is not None)
        self.smooth_box.setToolTip(f"Temporal filter against flicker ({self.analysis.smooth_spec.describe()}); T")
        self.smooth_box.toggled.connect(self._on_smooth)
        self.cue_box = QCheckBox("Cue border", central)
        self.cue_box.setChecked(self.analysis.cue_border)
        cue = self.analysis.cue
        self.cue_box.setToolTip(f"Amber frame border while a polyp is segmented (on after {cue.on_after} frames, "
                                f"off after {cue.off_after}, mask \u2265 {cue.min_area_pct:g} % of the frame); P")
        self.cue_box.toggled.connect(self._on_cue_border)
        self.sound_box = QCheckBox("Sound", central)
        self.sound_box.setToolTip("A short beep when the polyp cue comes on")
        self.compare_button = QPushButton("Compare\u2026", central)
        self.compare_button.setCheckable(True)
        self.compare_button.setToolTip("Run a second model on the same frames: its outline in magenta; B")
        self.compare_button.clicked.connect(self._on_compare_clicked)
        self.cue_label = QLabel("no polyp", central)
        self.cue_label.setObjectName("cue")
        self.cue_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.cue_label.setMinimumWidth(150)
        for w in (self.smooth_box, self.cue_box, self.sound_box, self.compare_button):
            arow.addWidget(w)
        arow.addStretch(1)
        arow.addWidget(self.cue_label)
        layout.addLayout(arow)
        self._show_cue(False, None)

        # Live readouts get their own row: the status bar stays free for messages.
        info_row = QHBoxLayout()
        self.readout_label = QLabel("", central)
        self.readout_label.setObjectName("readout")
        self.model_label = QLabel("model: loading\u2026", central)
        self.model_label.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        info_row.addWidget(self.readout_label, 1)
        info_row.addWidget(self.model_label)
        layout.addLayout(info_row)
        self.setCentralWidget(central)
        self._update_slider_labels()
        self.statusBar()

    def _build_actions(self) -> None:
        def action(menu, text, keys, slot, checkable=False):
            a = QAction(text, self)
            a.setShortcuts([QKeySequence(k) for k in keys])
            a.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
            a.setCheckable(checkable)
            (a.toggled if checkable else a.triggered).connect(slot)
            menu.addAction(a)
            return a

        m = self.menuBar()
        f = m.addMenu("&File")
        action(f, "Open file\u2026", ["Ctrl+O"], self.open_file_dialog)
        action(f, "Open camera\u2026", ["Ctrl+K"], self.open_camera_dialog)
        f.addSeparator()
        self.record_action = action(f, "Record", ["R"], lambda: self.record_button.toggle())
        action(f, "Snapshot", ["S"], self.snapshot)
        f.addSeparator()
        action(f, "Quit", ["Ctrl+Q"], self.close)
        p = m.addMenu("&Playback")
        action(p, "Play / pause", ["Space"], self.toggle_play)
        action(p, f"Back {SEEK_STEP_S:g} s", ["Left"], lambda: self.seek_relative(-SEEK_STEP_S))
        action(p, f"Forward {SEEK_STEP_S:g} s", ["Right"], lambda: self.seek_relative(SEEK_STEP_S))
        action(p, "To the start", ["Home"], lambda: self.seek_to(0.0))
        o = m.addMenu("&Overlay")
        action(o, "Threshold up", ["Up"], lambda: self.threshold_slider.setValue(self.threshold_slider.value() + 5))
        action(o, "Threshold down", ["Down"], lambda: self.threshold_slider.setValue(self.threshold_slider.value() - 5))
        action(o, "Opacity up", ["]"], lambda: self.opacity_slider.setValue(self.opacity_slider.value() + 10))
        action(o, "Opacity down", ["["], lambda: self.opacity_slider.setValue(self.opacity_slider.value() - 10))
        action(o, "Contour on/off", ["C"], lambda: self.contour_box.toggle())
        o.addSeparator()
        action(o, "Temporal smoothing on/off", ["T"], lambda: self.smooth_box.toggle())
        action(o, "Polyp cue border on/off", ["P"], lambda: self.cue_box.toggle())
        action(o, "Compare with a second model\u2026", ["B"], lambda: self.compare_button.click())
        v = m.addMenu("&View")
        action(v, "Full screen", ["F11"], self._toggle_fullscreen)
        h = m.addMenu("&Help")
        action(h, "Keyboard shortcuts", ["F1"], self.show_shortcuts)
        action(h, "About", [], self._about)
        # Buttons must not steal Space/arrows from the window-wide shortcuts.
        for w in (self.open_button, self.camera_button, self.play_button, self.record_button, self.snapshot_button,
                  self.contour_box, self.threshold_slider, self.opacity_slider, self.seek_slider,
                  self.smooth_box, self.cue_box, self.sound_box, self.compare_button):
            w.setFocusPolicy(Qt.FocusPolicy.NoFocus)

    # ------------------------------------------------------------------ sources
    def open_source(self, spec: str) -> bool:
        """Open a file or camera; on failure a dialog says why and the current source stays."""
        try:
            reader = open_reader(spec, camera_factory=self.camera_factory)
        except AppError as exc:
            self.show_error("Cannot open source", str(exc))
            return False
        if self.recording.active:
            self.record_button.setChecked(False)  # a recording has one size: finish it first
        self.reader = reader
        self.source_spec = spec
        self._resume_after_end()
        self.signal_lost = False
        self.last_pts = None
        live = reader.live
        self.seek_slider.setEnabled(not live and bool(reader.duration))
        self.seek_slider.setRange(0, int((reader.duration or 0) * 1000))
        self.seek_slider.setValue(0)
        self.play_button.setEnabled(True)
        self.play_button.setText("Pause")
        self.pipeline.open(reader, loop=self.loop)
        self.video.set_message("" if self.info else loading_message(self.model_path))
        self.statusBar().showMessage(f"Playing {reader.description}", 5000)
        self.setWindowTitle(f"{reader.description} \u2014 KDAS polyp viewer \u2014 {DISCLAIMER}")
        return True

    def open_file_dialog(self) -> None:
        start = str(Path(self.source_spec).parent) if self.source_spec and os.path.exists(self.source_spec) else ""
        path, _ = QFileDialog.getOpenFileName(self, "Open video", start, VIDEO_FILTER)
        if path:
            self.open_source(path)

    def open_camera_dialog(self) -> None:
        text, ok = QInputDialog.getText(self, "Open camera", "Camera index or device (0, /dev/video0):", text="0")
        if ok and text.strip():
            self.open_source(text.strip())

    # ------------------------------------------------------------------ transport
    def toggle_play(self) -> None:
        src = self.pipeline.source
        if src is None:
            return
        if src.paused or self.ended:
            self._resume_after_end()
            src.resume()
            self.play_button.setText("Pause")
        else:
            src.pause()
            self.play_button.setText("Play")

    @property
    def paused(self) -> bool:
        src = self.pipeline.source
        return bool(src and src.paused)

    def seek_to(self, seconds: float) -> None:
        if self.reader is None or self.reader.live:
            return
        self._resume_after_end()
        self.pipeline.seek(max(0.0, seconds))

    def seek_relative(self, delta: float) -> None:
        if self.reader is None or self.reader.live:
            return
        now = self.last_pts if self.last_pts is not None else 0.0
        self.seek_to(now + delta)

    def _on_seek_action(self, action: int) -> None:
        if action != QSlider.SliderAction.SliderMove.value:  # clicks and page steps; drags go through sliderMoved
            self._seek_timer.start()

    def _do_seek(self) -> None:
        self.seek_to(self.seek_slider.sliderPosition() / 1000.0)

    # ------------------------------------------------------------------ overlay controls
    def _on_threshold(self, value: int) -> None:
        self.settings.update(threshold=value / 100.0)
        self._update_slider_labels()
        self._rerender()

    def _on_opacity(self, value: int) -> None:
        self.settings.update(opacity=value / 100.0)
        self._update_slider_labels()
        self._rerender()

    def _on_contour(self, on: bool) -> None:
        self.settings.update(contour=bool(on))
        self._rerender()

    def _on_smooth(self, on: bool) -> None:
        self.analysis.set_smooth(bool(on))
        state = f"on ({self.analysis.smooth_spec.describe()})" if on else "off"
        self.statusBar().showMessage(f"Temporal smoothing {state}", 4000)

    def _on_cue_border(self, on: bool) -> None:
        self.analysis.set_cue_border(bool(on))
        self._rerender()

    def _on_compare_clicked(self, checked: bool) -> None:
        if not checked:
            self.set_compare(None)
            return
        path, _ = QFileDialog.getOpenFileName(self, "Compare with a second model", "",
                                              "Models (*.safetensors *.onnx *.engine *.plan);;All files (*)")
        if not path:
            self.compare_button.setChecked(False)
            return
        self.set_compare(path)

    def set_compare(self, path: str | None) -> None:
        """Compare with the model at `path` from the next frame on (None: stop comparing)."""
        self.compare_button.setChecked(bool(path))
        self.compare_button.setText("Stop compare" if path else "Compare\u2026")
        if path:
            self.statusBar().showMessage(f"Loading {os.path.basename(path)} to compare\u2026", 5000)
        self.pipeline.compare.set_model(path)

    def _on_compare_ready(self, info: ModelInfo | None) -> None:
        self.compare_info = info
        self.compare_button.setChecked(info is not None)
        self.compare_button.setText("Stop compare" if info is not None else "Compare\u2026")
        if info is not None:
            self.statusBar().showMessage(f"Comparing with {info.label} (magenta outline)", 6000)
        self._update_model_label()
        self._rerender()

    def _show_cue(self, on: bool, area_pct: float | None) -> None:
        if self.ended and on:
            return  # the clip is over: a last frame still in flight does not light the cue again
        if on and not self.cue_on and self.sound_box.isChecked():
            QApplication.beep()
        self.cue_on = on
        area = f" \u00b7 {area_pct:.1f} %" if area_pct else ""
        self.cue_label.setText(("\u25cf POLYP" if on else "no polyp") + area)
        self.cue_label.setStyleSheet("QLabel#cue { background: #ffb000; color: black; font-weight: bold; padding: 2px; }"
                                     if on else "QLabel#cue { color: #777; padding: 2px; }")

    def _rerender(self) -> None:
        # While playing the next frame shows the change; paused or at the end, redraw now.
        if self.paused or self.ended:
            self.pipeline.refresh()

    def _update_slider_labels(self) -> None:
        self.threshold_label.setText(f"{self.threshold_slider.value() / 100:.2f}")
        self.opacity_label.setText(f"{self.opacity_slider.value() / 100:.2f}")

    # ------------------------------------------------------------------ recording / snapshots
    def _on_record_toggled(self, on: bool) -> None:
        if on:
            if self.reader is None:
                self.record_button.setChecked(False)
                self.statusBar().showMessage("Nothing to record: open a file or camera first", 5000)
                return
            path = self.record_dir / f"kdas-{datetime.now():%Y%m%d-%H%M%S}.mp4"
            try:
                self.record_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                self.record_button.setChecked(False)
                self.show_error("Cannot record", f"{self.record_dir}: {exc}")
                return
            self.recording.start(str(path), self.reader.fps)
            self.record_button.setText("\u25a0 Stop")
            self.record_button.setStyleSheet("QPushButton { color: #d00; font-weight: bold; }")
            self.statusBar().showMessage(f"Recording to {path}")
        else:
            self.record_button.setText("\u25cf Record")
            self.record_button.setStyleSheet("")
            try:
                path, frames = self.recording.stop()
            except AppError as exc:
                self.show_error("Recording failed", str(exc))
                return
            if path:
                self.statusBar().showMessage(f"Saved {frames} frames to {path}", 8000)
                self.last_recording = path

    def snapshot(self) -> str | None:
        image = self.display.full_image() or self.video.image()  # source resolution, not the screen's
        if image is None or image.isNull():
            self.statusBar().showMessage("Nothing to save yet", 4000)
            return None
        try:
            self.record_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.show_error("Cannot save snapshot", f"{self.record_dir}: {exc}")
            return None
        path = self.record_dir / f"kdas-{datetime.now():%Y%m%d-%H%M%S-%f}.png"
        if not image.save(str(path), "PNG"):
            self.show_error("Cannot save snapshot", f"{path}: could not write the PNG")
            return None
        self.statusBar().showMessage(f"Snapshot saved to {path}", 6000)
        return str(path)

    # ------------------------------------------------------------------ pipeline events (GUI thread)
    def _on_frame(self) -> None:
        item = self.display.take()
        if item is None:
            return
        image, meta = item
        if meta.epoch != self.pipeline.epoch.value:
            self.pipeline.account(meta, "stale")  # arrived after a seek/source change: not painted
            return
        self.video.set_image(image)
        if meta.analysis is not None:
            self._show_cue(meta.analysis.cue_on, meta.analysis.area_pct)
        if not meta.refresh:
            self.pipeline.account(meta, "shown")
            if meta.pts is not None:
                self.last_pts = meta.pts
                if not self.seek_slider.isSliderDown() and not self._seek_timer.isActive():
                    self.seek_slider.blockSignals(True)
                    self.seek_slider.setValue(int(meta.pts * 1000))
                    self.seek_slider.blockSignals(False)
            if self.signal_lost:
                self._set_signal(True)
        self._update_position()

    def _on_model_ready(self, info: ModelInfo) -> None:
        self.info = info
        self._update_model_label()
        if self.settings.threshold is None:  # no --threshold: the slider starts at the model's own
            self.threshold_slider.blockSignals(True)
            self.threshold_slider.setValue(round(info.threshold * 100))
            self.threshold_slider.blockSignals(False)
            self._update_slider_labels()
        if self.video.message() == loading_message(self.model_path):  # the window's own placeholder, not an event
            self.video.set_message("" if self.reader else "Open a video file (Ctrl+O) or a camera (Ctrl+K)")

    def _on_notice(self, notice: Notice) -> None:
        if notice.kind == "recording":  # the recording stopped: say so, and the button follows
            self.record_button.setChecked(False)  # no signal when it is unchecked already
            self.show_error("Recording failed", notice.text)
            return
        self._notices.append(notice)
        self.statusBar().showMessage(notice.text, 15000)
        self._update_model_label()

    @property
    def notices(self) -> list[str]:
        return [n.text for n in self._notices]

    @property
    def fallbacks(self) -> list[str]:
        """The "fallback" notices: the model runs on another backend than asked."""
        return [n.text for n in self._notices if n.kind == "fallback"]

    def _update_model_label(self) -> None:
        fallbacks = self.fallbacks
        text = f"model: {self.info.label}" if self.info else "model: loading\u2026"
        if self.compare_info is not None:
            text += f"  vs  {self.compare_info.label}"
        if fallbacks:  # stays visible after the status message times out
            text += "  \u26a0 fallback"
            self.model_label.setStyleSheet("color: #b35c00; font-weight: bold;")
        self.model_label.setText(text)
        notes = ([self.info.path, *self.info.notes] if self.info else []) + fallbacks
        self.model_label.setToolTip("\n".join(notes))

    def _on_signal(self, ok: bool, text: str) -> None:
        self._set_signal(ok, text)

    def _set_signal(self, ok: bool, text: str = "") -> None:
        self.signal_lost = not ok
        self.video.set_message("" if ok else "Signal lost \u2014 retrying\u2026")
        if text:
            self.statusBar().showMessage(text, 0 if not ok else 5000)

    def _on_error(self, text: str) -> None:
        if self.info is None and self.pipeline.inference.failed:
            self.video.set_message("No model could be loaded \u2014 see the error")
            self.model_label.setText("model: none")
        self.show_error("Error", text)

    def _resume_after_end(self) -> None:
        self.ended = False
        self.analysis.set_cue_border(self.cue_box.isChecked())

    def _on_end(self, eos: EndOfStream) -> None:
        self.ended = True
        self.play_button.setText("Play")
        # The clip is over: the last frame stays, but no polyp cue (border and badge) and no live readout.
        self.analysis.set_cue_border(False)
        self._rerender()
        self._show_cue(False, None)
        self.readout_label.setText("clip ended \u2014 Play starts it again")
        if eos.error:
            self.show_error("Video error", eos.error)
        else:
            self.statusBar().showMessage("End of file \u2014 Play starts again from the beginning", 8000)
        if self.exit_at_end:
            QTimer.singleShot(300, self.close)  # let the last frames paint

    def show_error(self, title: str, text: str) -> None:
        """Status bar + a non-modal dialog: the video keeps running, nothing freezes."""
        self.errors.append(text)
        self.statusBar().showMessage(f"{title}: {text.splitlines()[0]}", 15000)
        if self.exit_at_end:  # benchmark runs have nobody to click a dialog away
            print(f"error: {text}", flush=True)
            return
        box = QMessageBox(QMessageBox.Icon.Critical, title, text, QMessageBox.StandardButton.Ok, self)
        box.setModal(False)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, False)
        box.show()
        self.dialogs = [d for d in self.dialogs if d.isVisible()][-4:] + [box]

    # ------------------------------------------------------------------ readouts
    def _update_readout(self) -> None:
        if self.ended:
            return  # "clip ended" stays until Play
        self.readout_label.setText(self._readout_text())

    def _readout_text(self) -> str:
        live = self.pipeline.stats.live()
        src = self.pipeline.source
        if src is not None and self.reader is not None and self.reader.live and not src.paused:
            stalled = time.perf_counter() - src.last_frame_time > STALL_S
            if stalled and not self.signal_lost:
                self._set_signal(False, f"{self.reader.description}: no frames for {STALL_S:g} s")
        parts = [f"{live['display_fps']:.1f} fps"]
        parts.append(f"inference {live['inference_ms']:.1f} ms" if live["inference_ms"] is not None else "inference \u2013")
        if live["latency_ms_p50"] is not None:
            parts.append(f"latency p50 {live['latency_ms_p50']:.0f} / p95 {live['latency_ms_p95']:.0f} ms")
        parts.append(f"dropped {live['dropped']} ({live['dropped_pct']:.1f}%)")
        if self.compare_info is not None and live["inference_b_ms"] is not None:
            agree = self.pipeline.analyzer.recent_agreement()
            parts.append(f"B {live['inference_b_ms']:.1f} ms" + (f" \u00b7 agree {agree:.2f}" if agree is not None else ""))
        if self.recording.active:
            parts.append("\u25cf REC")
        return "  \u00b7  ".join(parts)

    def _update_position(self) -> None:
        if self.reader is None or self.reader.live or self.last_pts is None:
            self.position_label.setText("live" if self.reader is not None and self.reader.live else "--:-- / --:--")
            return
        self.position_label.setText(f"{_clock(self.last_pts)} / {_clock(self.reader.duration or 0)}")

    def stats_summary(self) -> dict:
        stats = self.pipeline.stats.summary()
        stats.update({
            "mode": "window",
            "backend": self.info.backend if self.info else None,
            "model": self.info.path if self.info else str(self.model_path),
            "input_size": list(self.info.input_size) if self.info else None,
            "source": self.source_spec,
            "source_fps": self.reader.fps if self.reader else None,
            "notices": self.notices,
        })
        if "compare" in stats:
            stats["compare"] = {**self.pipeline.compare_summary(), **stats["compare"]}
        if self.frames_csv is not None:
            stats["frames_csv"] = {"path": self.frames_csv.path, "rows": self.frames_csv.rows}
        return stats

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Finalise the recording and stop the pipeline. Idempotent; every exit path calls it."""
        if self._closing:
            return
        self._closing = True
        self._readout_timer.stop()
        try:
            path, frames = self.recording.stop()
            if path:
                print(f"recording saved: {path} ({frames} frames)", flush=True)
        except AppError as exc:
            print(f"error: {exc}", flush=True)
        self.pipeline.stats.stop()
        self._final_stats = self.stats_summary()
        self.pipeline.close()
        if self.frames_csv is not None:
            self.frames_csv.close()
        if self.stats_path:
            write_json(self.stats_path, self._final_stats)

    def closeEvent(self, event) -> None:
        self.shutdown()
        for box in self.dialogs:
            box.close()
        super().closeEvent(event)

    def _toggle_fullscreen(self) -> None:
        self.showNormal() if self.isFullScreen() else self.showFullScreen()

    def show_shortcuts(self) -> None:
        text = "\n".join(f"{k:<14}{v}" for k, v in SHORTCUTS)
        box = QMessageBox(QMessageBox.Icon.Information, "Keyboard shortcuts", text, QMessageBox.StandardButton.Ok, self)
        box.setStyleSheet("QLabel { font-family: monospace; }")
        box.setModal(False)
        box.show()
        self.dialogs.append(box)

    def _about(self) -> None:
        QMessageBox.about(self, "About", f"KDAS polyp viewer\n\n{DISCLAIMER}.\nModel: {self.info.label if self.info else '-'}")


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60:02d}:{seconds % 60:02d}"
