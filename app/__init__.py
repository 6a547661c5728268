"""Real-time polyp segmentation viewer (PyQt6) and its headless twin.

Both run the same pipeline of single-purpose stages (app.pipeline): source -> preprocess ->
inference -> postprocess -> overlay -> display / recorder.

Research use only - not a medical device.
"""

from __future__ import annotations

from pathlib import Path

DISCLAIMER = "Research use only \u2014 not a medical device"

# The package is installed editable; the bundled demo assets live at the repo root.
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_WEIGHTS = ASSETS_DIR / "weights" / "polyppvt-lite0.safetensors"
DEMO_CLIP = ASSETS_DIR / "demo.mp4"
