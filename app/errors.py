"""The one exception type for problems the user can fix (bad file, missing weights, no display).

The CLI prints its message without a traceback and exits non-zero; the window shows it in a
dialog. The message names the thing and says what to do.
"""


class AppError(RuntimeError):
    pass
