"""Shared fixtures. Real data lives in ../shared/data beside the checkout (absent in a user's clone)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

# Qt widget tests run offscreen so a plain `pytest` works without a display (the one real-window
# test starts its own Xvfb and sets DISPLAY for its subprocess).
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Two cores in CI: keep intra-op threads predictable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not present at {path} (only in the team's checkout with ../shared)")
    return path


def wait_until(predicate, timeout: float, what: str, poll: float = 0.01) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout` seconds. For threads
    and subprocesses (Qt tests use qtbot.waitUntil, which also processes events)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


def wait_for_file(folder: Path, pattern: str, proc, timeout: float = 90.0) -> Path:
    """The first `folder/pattern` file once it exists, while `proc` still runs (our recorders
    create their file with the first frame, so a recording has begun). Fails with the process's
    output if it ends first, or after `timeout` seconds."""

    def found() -> bool:
        if proc.poll() is not None:
            out = proc.communicate(timeout=10)
            pytest.fail(f"the process ended (exit {proc.returncode}) before {folder / pattern} appeared; output: {out}")
        return any(folder.glob(pattern))

    wait_until(found, timeout, f"{folder / pattern} to appear", poll=0.05)
    return sorted(folder.glob(pattern))[0]


def write_pair_folder(root: Path, n: int, size: int = 48, seed: int = 0) -> Path:
    """A tiny images/masks folder: bright discs on a dark textured background."""
    import cv2

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = (rng.random((size, size, 3)) * 60 + 40).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        cx, cy, r = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [int(rng.integers(size // 8, size // 4))]
        cv2.circle(mask, (cx, cy), r, 255, -1)
        img[mask > 0] = (200, 120, 110)
        cv2.imwrite(str(root / "images" / f"{i:03d}.jpg"), img)
        cv2.imwrite(str(root / "masks" / f"{i:03d}.png"), mask)
    return root


@pytest.fixture
def pair_folder(tmp_path: Path) -> Path:
    return write_pair_folder(tmp_path / "set", 6)


@contextlib.contextmanager
def kdas_cache(path: str):
    """KDAS_CACHE_DIR=path for the duration (for session/module fixtures, where monkeypatch is not available)."""
    old = os.environ.get("KDAS_CACHE_DIR")
    os.environ["KDAS_CACHE_DIR"] = path
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("KDAS_CACHE_DIR", None)
        else:
            os.environ["KDAS_CACHE_DIR"] = old


STUDENT = REPO / "assets" / "weights" / "polyppvt-lite0.safetensors"
STUDENT_TEST_SIZE = 64


@pytest.fixture(scope="session")
def student_onnx(tmp_path_factory) -> tuple[str, str, str]:
    """(checkpoint, fp32 ONNX at 64x64, cache dir): the bundled student exported once per session
    (a dynamo export is the slow part) for the tests that compare exports with the checkpoint."""
    from engines.build import main
    from engines.cli_common import run

    cache = str(tmp_path_factory.mktemp("student-cache"))
    out = str(tmp_path_factory.mktemp("student-onnx"))
    with kdas_cache(cache):
        rc = run(main, ["--weights", str(STUDENT), "--out", out, "--image-size", str(STUDENT_TEST_SIZE)])
    assert rc == 0
    return str(STUDENT), os.path.join(out, f"{STUDENT.stem}-{STUDENT_TEST_SIZE}-fp32.onnx"), cache
