"""What the repository bundles so that everything works out of the box: the default student, the
teacher it was distilled from, and the demo clip. Every layer (kdas_core, engines, app) takes
these paths from here; nothing here imports anything heavy.

The package is installed editable; the bundled files live at the repository root, `assets/`.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"  # kdas_core/io/assets.py -> the repository root
DEFAULT_WEIGHTS = ASSETS_DIR / "weights" / "polyppvt-lite0.safetensors"
DEFAULT_TEACHER = ASSETS_DIR / "weights" / "polyppvt-lite2-teacher.safetensors"
DEMO_CLIP = ASSETS_DIR / "demo.mp4"
