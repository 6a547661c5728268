"""Distil a student from one or more trained teachers.

Examples:
  python -m kdas_core.distill --teacher runs/teacher/best.safetensors --model polyppvt-lite0 \\
      --data ../shared/data/polyp --out runs/lite0-kdas                      # KDAS (default)
  python -m kdas_core.distill --teacher T.safetensors --model polyppvt-b0 --kd kdas,cwd:0.5 ...
  python -m kdas_core.distill --teacher T1 --teacher T2 --teacher T3 --kd mtkd ...  # multi-teacher
  python -m kdas_core.distill --teacher-targets runs/targets-lite2 --model polyppvt-lite0 \\
      --data ../shared/data/polyp-352 --image-size 256 --out runs/student   # cached targets: the bundled recipe

The student's own loss is the structure loss on P1 and P2; each --kd method adds its terms
(KDAS: (1-a)*L_seg + a*w*[tau^2*(KL1+KL2) + SGM], a=0.3, tau=2, w=0.5 as chosen on validation;
--kd kdas:1 gives the paper's weights). --teacher-targets DIR (kdas_core.teacher_targets) replaces
the teacher's forward pass for the output-level methods.
"""

from __future__ import annotations

import argparse
import sys

from kdas_core.cli.conventions import Parser
from kdas_core.cli.training import run_training_cli
from kdas_core.training.config import add_training_args


def _methods_epilog() -> str:
    from kdas_core.losses.catalog import kd_methods  # torch-free: --help answers at once

    lines = ["--kd methods (combine with commas, weight with a colon: --kd kdas,cwd:0.5):"]
    lines += [f"  {name:<10} {summary}" for name, summary in kd_methods().items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(exit_codes=(0, 1, 2, 4, 130), prog="python -m kdas_core.distill", description=__doc__,
                                epilog=_methods_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, kd="kdas")
    return p


def check_teachers(cfg) -> None:
    """A distillation needs its teachers (flags or --config); an unknown --kd method fails before
    any model or data is loaded."""
    from kdas_core.cli.conventions import UsageError
    from kdas_core.losses import parse_kd_spec  # torch: only once the arguments are known to be good

    if not cfg.teachers and not cfg.teacher_targets:
        raise UsageError("give --teacher PATH (repeatable) or --teacher-targets DIR (or a --config that has them)")
    parse_kd_spec(cfg.kd)


def main(argv: list[str] | None = None) -> int:
    return run_training_cli(build_parser().parse_args(argv), "kdas_core.distill", check=check_teachers)


if __name__ == "__main__":
    sys.exit(main())
