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
