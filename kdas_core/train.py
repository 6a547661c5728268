"""Train a model on masks alone (teachers, or students without KD).

Examples:
  python -m kdas_core.train --model polyppvt-lite2 --data ../shared/data/polyp --out runs/teacher-lite2
  python -m kdas_core.train --model polyppvt-b2 --pretrained timm --data DATA --out runs/teacher-b2 --device cuda
  python -m kdas_core.train --model polyppvt-lite0 --data DATA --out runs/lite0 --epochs 20 --image-size 256
  python -m kdas_core.train ... --out runs/lite0 --resume          # continue exactly where it stopped
  torchrun --nproc_per_node 4 -m kdas_core.train ...               # several GPUs (DDP)

Writes RUN/best.safetensors (best validation mDice), RUN/last.safetensors, RUN/config.json,
RUN/log.csv and TensorBoard logs in RUN/tb.
"""

from __future__ import annotations

import argparse
import sys

from kdas_core.cli.training import run_training_cli
from kdas_core.training.config import add_training_args
from kdas_core.cli.conventions import Parser


def build_parser() -> argparse.ArgumentParser:
    p = Parser(exit_codes=(0, 1, 2, 4, 130), prog="python -m kdas_core.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p)
    return p


def masks_only(cfg):
    """train never distils: a --config from a distill run replays as its no-KD twin (everything
    else as recorded), said on stderr."""
    if cfg.kd in (None, "", "none") and not cfg.teachers and not cfg.teacher_targets:
        return cfg
    import dataclasses

    print(f"kdas_core.train: the --config is a distillation run's (kd={cfg.kd}); train learns from masks alone, so its "
          "KD settings (kd, teachers, teacher targets) are left out: this is its no-KD twin. To replay the "
          "distillation itself: python -m kdas_core.distill --config ...", file=sys.stderr)
    return dataclasses.replace(cfg, kd="none", teachers=[], teacher_targets=None)


def main(argv: list[str] | None = None) -> int:
    return run_training_cli(build_parser().parse_args(argv), "kdas_core.train", check=masks_only)


if __name__ == "__main__":
    sys.exit(main())
