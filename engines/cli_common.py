"""Exit codes and error handling shared by `engines.build` and `engines.bench`.

User errors (missing/corrupt files, wrong weights, impossible options) print one `error:` line
and exit non-zero; only genuine bugs show a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2  # bad arguments, missing/corrupt/foreign model file
EXIT_VERIFY = 3  # --verify found a disagreement
EXIT_UNAVAILABLE = 4  # the asked-for backend (TensorRT, a GPU) is not available here

EXIT_CODES_HELP = """exit codes:
  0  success
  1  unexpected internal error (a bug: please report the traceback)
  2  usage error: missing, corrupt or foreign model file, bad option
  3  --verify failed: the built artefact disagrees with the PyTorch checkpoint
  4  the requested backend is not available here (e.g. TensorRT or a GPU missing)"""


class UnavailableError(RuntimeError):
    """The requested backend cannot run on this machine (exit code 4)."""


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
        return 130
    except Exception as exc:
        if _is_checkpoint_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise


def _is_checkpoint_error(exc: BaseException) -> bool:
    """kdas_core.checkpoint.CheckpointError, without importing kdas_core (and torch) up front."""
    module = sys.modules.get("kdas_core.checkpoint")
    return module is not None and isinstance(exc, module.CheckpointError)
