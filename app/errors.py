"""The one exception type for problems the user can fix (bad file, missing weights, no display).

The CLI prints its message without a traceback and exits non-zero; the window shows it in a
dialog. The message names the thing and says what to do.
"""


from kdas_core.cli.conventions import EXIT_USAGE


def check_device(device: str | None) -> None:
    """AppError (exit 4, the one message every command gives) when --device names a GPU that is
    not here; before any model loads."""
    if device is None or device == "cpu":
        return
    from kdas_core.cli.conventions import EXIT_UNAVAILABLE, UnavailableError, require_device

    try:
        require_device(device)
    except UnavailableError as exc:
        raise AppError(str(exc), EXIT_UNAVAILABLE) from None


class AppError(RuntimeError):
    """`exit_code`: what `python -m app` exits with (kdas_core.cli.conventions): bad input (2) unless
    the raiser says otherwise (1 a runtime failure, 4 a backend or display not available here)."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def crash_report(stage: str, exc: BaseException) -> str:
    """What a pipeline stage reports when it fails on something that is not the user's input (a
    bug or a runtime surprise): the exception and its traceback, so it can be found and fixed."""
    import traceback

    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    return f"{stage} stage failed: {type(exc).__name__}: {exc}\n{trace}"
