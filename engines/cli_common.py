"""Error handling shared by `engines.build`, `engines.bench` and `engines.selfcheck` (exit codes:
kdas_core.cli_conventions, the one table for every CLI).

User errors (missing/corrupt files, wrong weights, impossible options) print one `error:` line
and exit non-zero; only genuine bugs show a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

from kdas_core.cli_conventions import (  # noqa: F401 (re-exported: one table for every CLI)
    EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, EXIT_VERIFY, UnavailableError,
    exit_codes_help,
)

EXIT_BUG = EXIT_FAILURE
# build can return every code; commands that never verify list theirs with exit_codes_help(...).
EXIT_CODES_HELP = exit_codes_help(EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_VERIFY, EXIT_UNAVAILABLE, EXIT_INTERRUPTED)


class VerifyError(RuntimeError):
    """--verify found a disagreement (exit code 3)."""


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    from .errors import BackendError

    # Our own progress lines only: the exporter's libraries log chattily at INFO on the root logger.
    log = logging.getLogger("engines")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        return main(argv)
    except VerifyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_VERIFY
    except UnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (BackendError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if _is_checkpoint_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise


def _is_checkpoint_error(exc: BaseException) -> bool:
    """kdas_core.checkpoint.CheckpointError, without importing kdas_core (and torch) up front."""
    module = sys.modules.get("kdas_core.checkpoint")
    return module is not None and isinstance(exc, module.CheckpointError)
