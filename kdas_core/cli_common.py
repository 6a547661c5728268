"""Shared command-line behaviour: user errors become one clear line and exit code 2 (the table of
exit codes: kdas_core.cli_conventions)."""

from __future__ import annotations

import sys
import argparse
from typing import Callable

from .cli_conventions import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, EXIT_UNAVAILABLE, UnavailableError

# Bad input (exit 2). CheckpointError and DatasetError are checked lazily (their modules import torch:
# --help and argument errors must answer without it); DatasetError is a ValueError.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError)


def _is_checkpoint_error(exc: BaseException) -> bool:
    module = sys.modules.get("kdas_core.checkpoint")
    return module is not None and isinstance(exc, module.CheckpointError)


def run_cli(fn: Callable[[], int | None], prog: str) -> int:
    """Exit codes of kdas_core.cli_conventions: 2 bad input, 4 device not available, 1 a failure
    while running (one `error:` line; a traceback only for a bug), 130 interrupted."""
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; checkpoints written so far are complete (use --resume to continue)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UnavailableError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except FloatingPointError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except USER_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:  # the checkpoint is bad input; anything else failed while running
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if _is_checkpoint_error(exc) else EXIT_FAILURE


def run_training_cli(args: argparse.Namespace, prog: str, check: Callable[[], object] | None = None) -> int:
    """`train` and `distill`: validate cheaply first, run the loop, report the chosen checkpoint (rank 0)."""

    def go() -> None:
        from .training.config import config_from_args
        from .training.trainer import run_training

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
