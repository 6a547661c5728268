"""`engines.build`, `engines.bench` and `engines.selfcheck` run under kdas_core.cli.conventions.run_cli
(the one exit-code table and policy for every CLI); this module adds what is engines' own: the
VerifyError type (exit 3), BackendError as bad input, and the `engines` logger."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from kdas_core.cli.conventions import (  # noqa: F401 (re-exported: one table for every CLI)
    EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, EXIT_VERIFY, UnavailableError,
    exit_codes_help, run_cli,
)

# build can return every code; commands that never verify list theirs with exit_codes_help(...).
EXIT_CODES_HELP = exit_codes_help(EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_VERIFY, EXIT_UNAVAILABLE, EXIT_INTERRUPTED)


class VerifyError(RuntimeError):
    """--verify found a disagreement (exit code 3)."""


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """`main(argv)` under the one exit-code policy (kdas_core.cli.conventions.run_cli), with
    BackendError as bad input (2) and VerifyError as a disagreement (3)."""
    from .errors import BackendError, BackendUnavailable

    # Our own progress lines only: the exporter's libraries log chattily at INFO on the root logger.
    log = logging.getLogger("engines")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    spec = main.__globals__.get("__spec__")  # under `python -m engines.build`, __module__ is "__main__"
    prog = spec.name if spec is not None else main.__module__

    def body():
        try:
            return main(argv)
        except BackendUnavailable as exc:  # asked for a backend this machine cannot run: hardware, exit 4
            raise UnavailableError(str(exc)) from exc

    return run_cli(body, prog, user_errors=(BackendError,), codes={VerifyError: EXIT_VERIFY})
