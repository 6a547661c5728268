"""Shared command-line behaviour: user errors become one clear line and exit code 2."""

from __future__ import annotations

import sys
import argparse
from typing import Callable

# Imported lazily (they pull in torch): `--help` and argument errors must answer without it.
USER_ERRORS = (FileNotFoundError, FileExistsError, ValueError, RuntimeError)  # CheckpointError, DatasetError are RuntimeErrors


def run_cli(fn: Callable[[], int | None], prog: str) -> int:
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; checkpoints written so far are complete (use --resume to continue)", file=sys.stderr)
        return 130
    except FloatingPointError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except USER_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def run_training_cli(args: argparse.Namespace, prog: str, check: Callable[[], object] | None = None) -> int:
    """`train` and `distill`: validate cheaply first, run the loop, report the chosen checkpoint (rank 0)."""

    def go() -> None:
        from .engine.config import config_from_args
        from .engine.trainer import run_training

        cfg = config_from_args(args)
        if check is not None:
            check()
        result = run_training(cfg)
        if result["is_main"] and not result["finished"]:
            print(f"[kdas] paused at epoch {result['epoch']}/{cfg.epochs} by --time-limit {cfg.time_limit:g}: everything "
                  f"is saved, run the same command with --resume to continue; best validation mDice so far "
                  f"{result['best_val_mDice']:.4f} at epoch {result['best_epoch']} -> {result['best']}")
        elif result["is_main"]:
            print(f"[kdas] done: best validation mDice {result['best_val_mDice']:.4f} at epoch {result['best_epoch']} "
                  f"-> {result['best']}")

    return run_cli(go, prog)
