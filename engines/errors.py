"""The one exception type the viewer and the CLIs catch for model-file and backend problems."""


class BackendError(RuntimeError):
    """Something is wrong with a model file or a backend. The message names the file (when there
    is one) and says what to do; callers show it to the user as is."""


class ModelFileError(BackendError):
    """The model file itself is unusable (corrupt, truncated, foreign): no other backend can help,
    so `auto` stops at once and says so instead of listing per-backend skips."""
