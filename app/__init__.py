"""Real-time polyp segmentation viewer (PyQt6) and its headless twin.

Both run the same pipeline of single-purpose stages (app.pipeline): source -> preprocess ->
inference -> postprocess -> overlay -> display / recorder.

Research use only - not a medical device.
"""

from __future__ import annotations

from kdas_core.io.assets import ASSETS_DIR, DEFAULT_WEIGHTS, DEMO_CLIP  # noqa: F401 (the app's defaults)

DISCLAIMER = "Research use only \u2014 not a medical device"
