"""Shared command-line behaviour: user errors become one clear line and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

from .checkpoint import CheckpointError
from .data.dataset import DatasetError

USER_ERRORS = (CheckpointError, DatasetError, FileNotFoundError, FileExistsError, ValueError, RuntimeError)


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
