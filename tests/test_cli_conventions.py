"""Conventions every command line shares: fast --help, one exit-code table, deprecated spellings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO

PROBE = """
import runpy, sys
mod = sys.argv[1]
sys.argv = [mod] + sys.argv[2:]
try:
    runpy.run_module(mod, run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = sorted(m for m in ("torch", "timm", "cv2") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), "CODE=" + str(code), file=sys.stderr)
"""


def probe(module: str, *args: str) -> tuple[str, int, str]:
    r = subprocess.run([sys.executable, "-c", PROBE, module, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    heavy, code = last.split(" ")
    return heavy.removeprefix("HEAVY="), int(code.removeprefix("CODE=")), r.stdout + r.stderr


@pytest.mark.parametrize("module", ["kdas_core.train", "kdas_core.distill"])
def test_training_help_and_argument_errors_do_not_import_torch(module):
    heavy, code, out = probe(module, "--help")
    assert code == 0 and "--image-size" in out and "polyppvt-lite0" in out  # the preset list is still there
    assert heavy == "", f"{module} --help imported {heavy}"
    heavy, code, out = probe(module, "--epochs", "0")
    assert code == 2 and "--epochs" in out and heavy == ""
