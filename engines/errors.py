"""The one exception type the viewer and the CLIs catch for model-file and backend problems."""


class BackendError(RuntimeError):
    """Something is wrong with a model file or a backend. The message names the file (when there
    is one) and says what to do; callers show it to the user as is."""
