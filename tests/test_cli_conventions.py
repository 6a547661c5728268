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


def _raiser(exc):
    def fn(*_):
        raise exc
    return fn


def test_one_exit_code_table_for_kdas_core_engines_and_app():
    from app.errors import AppError
    from engines.cli_common import run as engines_run
    from kdas_core.cli.training import run_cli
    from kdas_core.cli.conventions import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_UNAVAILABLE, EXIT_USAGE,
                                          UnavailableError)

    cases = [(FileNotFoundError("x: no such file"), EXIT_USAGE), (UnavailableError("no GPU"), EXIT_UNAVAILABLE),
             (KeyboardInterrupt(), EXIT_INTERRUPTED)]
    for exc, code in cases:
        assert run_cli(_raiser(exc), "t") == code, exc
        assert engines_run(_raiser(exc), []) == code, exc
    assert AppError("bad file").exit_code == EXIT_USAGE and AppError("x", EXIT_FAILURE).exit_code == EXIT_FAILURE


def test_only_our_own_input_errors_are_user_errors(capsys):
    """A bare ValueError/RuntimeError from inside torch or numpy is a bug: traceback, exit 1, said so;
    our named input errors are one line and exit 2."""
    from engines.cli_common import VerifyError, run as engines_run
    from engines.errors import BackendError
    from kdas_core.io.checkpoint import CheckpointError
    from kdas_core.cli.conventions import EXIT_FAILURE, EXIT_USAGE, EXIT_VERIFY, RunFailure, UsageError, run_cli
    from kdas_core.data.dataset import DatasetError

    for exc in (UsageError("--epochs must be > 0"), CheckpointError("x.safetensors: not a checkpoint"),
                DatasetError("d: no images")):
        assert run_cli(_raiser(exc), "t") == EXIT_USAGE, exc
        err = capsys.readouterr().err
        assert err == f"t: error: {exc}\n", err  # one line, no traceback
    assert run_cli(_raiser(RunFailure("loss became nan")), "t") == EXIT_FAILURE
    assert "Traceback" not in capsys.readouterr().err
    for bug in (ValueError("operands could not be broadcast"), RuntimeError("shape '[2, 3]' is invalid"),
                KeyError("conv1.weight")):
        assert run_cli(_raiser(bug), "t") == EXIT_FAILURE, bug
        err = capsys.readouterr().err
        assert "Traceback" in err and "internal error" in err and "not a problem with your input" in err, err
    assert engines_run(_raiser(VerifyError("max diff 0.3")), []) == EXIT_VERIFY
    assert engines_run(_raiser(BackendError("m.onnx: unknown model file type")), []) == EXIT_USAGE
    assert "test_cli_conventions: error: m.onnx" in capsys.readouterr().err  # the command's name, then the message
    assert engines_run(_raiser(IndexError("list index out of range")), []) == EXIT_FAILURE
    assert "Traceback" in capsys.readouterr().err


def test_deprecated_alias_stores_into_the_new_flag_and_warns(capsys):
    import argparse

    from kdas_core.cli.conventions import add_deprecated_alias

    p = argparse.ArgumentParser(prog="prog")
    p.add_argument("--image-size", dest="size", type=int, default=1)
    add_deprecated_alias(p, "--size", "--image-size", "size", type=int)
    assert p.parse_args(["--size", "64"]).size == 64
    assert capsys.readouterr().err.strip() == ("prog: warning: --size is deprecated and goes in the next release; "
                                               "use --image-size")
    assert p.parse_args(["--image-size", "32"]).size == 32 and capsys.readouterr().err == ""
    assert "--size" not in p.format_help()  # hidden: --help teaches the new spelling only


def test_a_cut_list_says_how_many_more(tmp_path):
    from kdas_core.cli.conventions import name_some
    from kdas_core.data.dataset import DatasetError, find_pairs

    assert name_some(["a", "b"], 5) == "a, b"
    assert name_some([f"{i}.jpg" for i in range(12)], 8) == "0.jpg, 1.jpg, 2.jpg, 3.jpg, 4.jpg, 5.jpg, 6.jpg, 7.jpg and 4 more"
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(12):
        (tmp_path / "images" / f"{100 + i}.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"12 image\(s\) without a mask .*107\.jpg and 4 more"):
        find_pairs(tmp_path)


def test_app_engine_is_an_old_spelling_of_weights(capsys):
    from app.cli import build_parser

    args = build_parser().parse_args(["clip.mp4", "--engine", "student.onnx"])
    assert args.weights == "student.onnx"
    assert "--engine is deprecated" in capsys.readouterr().err
    assert "--engine" not in build_parser().format_help().split("examples")[0].split("options:")[1]


@pytest.mark.parametrize("module", ["kdas_core.profile", "kdas_core.data.synthetic", "kdas_core.ablate",
                                    "kdas_core.bench_train", "kdas_core.teacher_targets", "kdas_core.evaluate",
                                    "kdas_core.time_to_accuracy"])
def test_other_kdas_core_help_does_not_import_torch(module):
    heavy, code, out = probe(module, "--help")
    assert code == 0 and "usage:" in out and "torch" not in heavy.split(","), f"{module} --help imported {heavy}"
