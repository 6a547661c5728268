"""Starting the window: display checks, QApplication, signals, exit codes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from kdas_core.cli.conventions import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_UNAVAILABLE

from ..errors import AppError

NO_DISPLAY_HELP = (
    "use headless mode instead:  python -m app SOURCE --headless --out OUT.mp4 [--stats STATS.json]\n"
    "  (or run the window on a virtual display: xvfb-run python -m app ...)"
)


def check_display() -> None:
    """AppError with a clear message (pointing at --headless) when no window can be shown.
    Qt itself would abort the process with a core dump, so we ask first."""
    platform = os.environ.get("QT_QPA_PLATFORM", "")
    if platform.split(":")[0] in ("offscreen", "minimal", "vnc", "eglfs", "linuxfb"):
        return  # explicitly asked for a platform that needs no desktop session
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise AppError("no display available (neither DISPLAY nor WAYLAND_DISPLAY is set); " + NO_DISPLAY_HELP, EXIT_UNAVAILABLE)
    if sys.platform.startswith("linux"):
        # Qt aborts when its platform plugin cannot connect or load: probe in a child process.
        probe = "import sys\nfrom PyQt6.QtWidgets import QApplication\nQApplication(sys.argv[:1])\n"
        try:
            r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            raise AppError("the display does not answer (Qt start-up timed out); " + NO_DISPLAY_HELP, EXIT_UNAVAILABLE) from None
        if r.returncode != 0:
            display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
            raise AppError(display_failure(r.stderr or f"exit status {r.returncode}", display), EXIT_UNAVAILABLE)


# What Qt's xcb platform plugin needs beyond a fresh Debian/Ubuntu desktop (Debian package names).
XCB_PACKAGES = ("libxcb-icccm4", "libxcb-cursor0", "libxkbcommon-x11-0", "libxcb-keysyms1", "libxcb-image0",
                "libxcb-render-util0", "libxcb-shape0", "libxcb-xinerama0", "libegl1")


def display_failure(qt_stderr: str, display: str | None) -> str:
    """The message for a window Qt could not open: what Qt said and, when its xcb plugin could not
    load (libraries a new desktop lacks), which ones and the command that installs them."""
    lines = [ln for ln in qt_stderr.splitlines() if ln.strip()]
    why = " / ".join(lines[-3:]) if lines else "no message from Qt"
    text = f"Qt cannot open a window on display {display!r}: {why}\n  "
    if 'platform plugin "xcb"' in qt_stderr:
        named = [p for p in XCB_PACKAGES if p in qt_stderr]  # Qt names some (e.g. libxcb-cursor0)
        packages = named + [p for p in XCB_PACKAGES if p not in named]
        text += (f"Qt's xcb plugin could not load: it needs {', '.join(named) or 'system libraries'} and friends; "
                 f"on Debian/Ubuntu install them with:\n    sudo apt install {' '.join(packages)}\n  ")
    return text + NO_DISPLAY_HELP


class _SignalBridge:
    """SIGINT/SIGTERM close the window (so the recording is finalised). Python runs signal
    handlers only between bytecodes, and Qt's event loop is C++: a wake-up socket makes the
    loop notice the signal at once."""

    def __init__(self, app, window):
        from PyQt6.QtCore import QSocketNotifier

        self.window = window
        self.received: int | None = None
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(self._w.fileno())
        self._old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        self._notifier = QSocketNotifier(self._r.fileno(), QSocketNotifier.Type.Read, app)
        self._notifier.activated.connect(self._drain)

    def _handler(self, signum, _frame):
        if self.received is None:
            self.received = signum
            self.window.close()

    def _drain(self, *_):
        try:
            while self._r.recv(64):
                pass
        except (BlockingIOError, OSError):
            pass

    def restore(self) -> None:
        signal.set_wakeup_fd(self._old_fd)
        for s, h in self._old.items():
            signal.signal(s, h)
        self._notifier.setEnabled(False)
        self._r.close()
        self._w.close()


def run_window(args, *, model_path: str, source: str | None, analysis=None, compare_path: str | None = None) -> int:
    from PyQt6.QtWidgets import QApplication

    from .main_window import MainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("KDAS polyp viewer")
    window = MainWindow(model_path, args.backend, threshold=args.threshold, opacity=args.opacity,
                        contour=args.contour, record_dir=args.record, stats_path=args.stats,
                        exit_at_end=args.exit_at_end, threads=args.threads, analysis=analysis,
                        compare_path=compare_path, frames_csv=args.frames_csv, loop=args.loop,
                        device=args.device)
    signals = _SignalBridge(app, window)
    window.show()
    opened = window.open_source(source) if source else False
    if opened and args.record:
        window.record_button.setChecked(True)
    try:
        app.exec()
    finally:
        window.shutdown()  # closeEvent normally did this already; idempotent
        signals.restore()
    if signals.received is not None:  # closed by Ctrl+C or SIGTERM: the codes --help promises
        return EXIT_INTERRUPTED if signals.received == signal.SIGINT else EXIT_TERMINATED
    return 1 if window.exit_at_end and window.errors else 0
