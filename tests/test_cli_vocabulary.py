"""The same mistake gets the same answer from every command."""

from __future__ import annotations

import pytest
import torch

from kdas_core import evaluate
from kdas_core.cli.conventions import EXIT_UNAVAILABLE, EXIT_USAGE


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_evaluate_without_a_gpu_says_so_with_the_hardware_exit_code(capsys):
    code = evaluate.main(["--weights", "assets/weights/polyppvt-lite0.safetensors", "--data", "none", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == EXIT_UNAVAILABLE and "no CUDA GPU is visible" in err


def test_device_takes_cpu_cuda_and_cuda_n_only(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--weights", "w", "--data", "d", "--device", "gpu"])
    assert e.value.code == EXIT_USAGE and "cpu, cuda or cuda:N" in capsys.readouterr().err


# every `python -m` entry point of the project
ENTRY_POINTS = [
    "kdas_core.train", "kdas_core.distill", "kdas_core.evaluate", "kdas_core.ablate", "kdas_core.teacher_targets",
    "kdas_core.bench_train", "kdas_core.time_to_accuracy", "kdas_core.profile", "kdas_core.data.synthetic",
    "engines.build", "engines.bench", "engines.selfcheck",
    "app", "app.eval_clip", "app.soak", "app.bench_overhead", "app.make_demo",
]


def _help(module: str) -> str:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "QT_QPA_PLATFORM": "offscreen", "COLUMNS": "100"})
    assert out.returncode == 0, f"{module} --help: exit {out.returncode}\n{out.stderr[-2000:]}"
    return out.stdout


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_help_ends_with_its_exit_codes_and_says_each_default_once(module):
    import re

    text = _help(module)
    tail = text.rstrip().rsplit("\n\n", 1)[-1]
    assert tail.startswith("exit status"), f"{module} --help does not end with its exit codes:\n{tail}"
    assert re.search(r"^\s+0\s+success", tail, re.M), tail
    # one option's help in argparse's layout: a line starting with '-' and its indented continuation
    for block in re.split(r"\n(?=  -)", text):
        assert block.count("(default") <= 1, f"{module}: a default said twice:\n{block}"
        assert "(default: None)" not in block, f"{module}: an empty default shown:\n{block}"


def _parsers():
    import importlib

    for name in ENTRY_POINTS:
        mod = importlib.import_module(name if name != "app" else "app.cli")
        if hasattr(mod, "build_parser"):
            yield name, mod.build_parser()


def test_every_shown_default_is_accepted_when_typed_back():
    """A user who copies a default from --help back onto the command line gets what --help said."""
    import argparse
    import re

    checked = 0
    for name, parser in _parsers():
        fmt = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.help in (None, argparse.SUPPRESS):
                continue
            shown = re.search(r"\(default:? ([^)]*)\)", fmt._expand_help(action))
            if not shown:
                continue
            value = shown.group(1).strip().strip("'\"")
            if " " in value and not re.fullmatch(r"[\d.,: -]+", value):
                continue  # prose ("PyTorch's choice", "the usable cores"), not a value to type
            for a in parser._actions:  # only this flag is under test
                a.required = False
            try:
                parser.parse_args([action.option_strings[-1], *value.split()])
            except SystemExit:
                pytest.fail(f"{name}: {action.option_strings[-1]} shows its default as {value!r}, which it then rejects")
            checked += 1
    assert checked > 20


def test_tensorrt_asked_for_on_a_machine_without_nvidia_gpu_is_exit_4_saying_it_needs_one(capsys, monkeypatch, pair_folder):
    """evaluate --backend tensorrt and build --format tensorrt: the file asked for cannot run here
    (exit 4), and the advice is that TensorRT needs an NVIDIA GPU, not how to install it."""
    from engines import build
    from engines.cli_common import run
    from engines.backends import tensorrt_backend
    from engines.trt_common import NO_GPU_REASON

    monkeypatch.setattr("engines.trt_common.has_nvidia_gpu", lambda: False)
    monkeypatch.setattr(tensorrt_backend, "why_unavailable", lambda device=None: "install the TensorRT extra (test)")
    w = "assets/weights/polyppvt-lite0.safetensors"
    assert evaluate.main(["--weights", w, "--data", str(pair_folder), "--backend", "tensorrt"]) == EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert NO_GPU_REASON in err and "install" not in err
    assert run(build.main, ["--weights", w, "--out", "unused", "--format", "tensorrt"]) == EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert NO_GPU_REASON in err and "install" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_every_command_that_runs_a_model_takes_device_and_answers_a_missing_gpu_alike(capsys, tmp_path):
    from app import cli, eval_clip, soak
    from engines import bench
    from engines.cli_common import run as run_engines_cli
    from kdas_core.io.assets import DEMO_CLIP

    runs = {
        "app": lambda: cli.main([str(DEMO_CLIP), "--headless", "--out", str(tmp_path / "o.mp4"), "--device", "cuda"]),
        "app.eval_clip": lambda: eval_clip.main([str(DEMO_CLIP), "--gt", str(tmp_path), "--device", "cuda"]),
        "app.soak": lambda: soak.main(["--device", "cuda", "--max-frames", "10"]),
        "engines.bench": lambda: run_engines_cli(bench.main, ["--device", "cuda", "--model", "polyppvt-lite0"]),
        "kdas_core.evaluate": lambda: evaluate.main(["--weights", "assets/weights/polyppvt-lite0.safetensors", "--data", "d",
                                                     "--device", "cuda"]),
    }
    for name, run in runs.items():
        assert run() == EXIT_UNAVAILABLE, name
        err = capsys.readouterr().err
        assert f"{name}: error: --device cuda: no CUDA GPU is visible" in err, (name, err)
    assert not (tmp_path / "o.mp4").exists()
