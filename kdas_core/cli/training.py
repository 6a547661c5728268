"""The training command lines' shared runner (`train`, `distill`); the exit-code rules of every
KDAS command are kdas_core.cli.conventions.run_cli."""

from __future__ import annotations

import argparse
from typing import Callable

from kdas_core.cli.conventions import run_cli

RESUME_HINT = "interrupted; checkpoints written so far are complete (use --resume to continue)"


def run_training_cli(args: argparse.Namespace, prog: str, check: Callable[[object], object] | None = None) -> int:
    """`train` and `distill`: resolve the configuration (flags over --config), `check(cfg)` it
    cheaply (it may return a changed configuration), run the loop, report the chosen checkpoint
    (rank 0)."""

    def go() -> None:
        from kdas_core.training.config import config_from_args
        from kdas_core.training.trainer import run_training

        cfg = config_from_args(args)
        if check is not None:
            cfg = check(cfg) or cfg  # a check may also hand back the configuration it settled on
        result = run_training(cfg)
        if not result["is_main"]:
            return
        if cfg.val_fraction > 0:
            chosen = (f"best validation mDice {result['best_val_mDice']:.4f} at epoch {result['best_epoch']} "
                      f"-> {result['best']}")
        else:  # all training images, no validation split: nothing chooses, the last epoch is the model
            chosen = f"no validation split (--val-fraction 0): the model is the last epoch -> {result['last']}"
        if not result["finished"]:
            print(f"[kdas] paused at epoch {result['epoch']}/{cfg.epochs} by --time-limit {cfg.time_limit:g}: everything "
                  f"is saved, run the same command with --resume to continue; {chosen.replace('best', 'best so far', 1)}")
        else:
            print(f"[kdas] done: {chosen}")

    return run_cli(go, prog, interrupted=RESUME_HINT)
