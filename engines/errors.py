"""The one exception type the viewer and the CLIs catch for model-file and backend problems."""


class BackendError(RuntimeError):
    """Something is wrong with a model file or a backend. The message names the file (when there
    is one) and says what to do; callers show it to the user as is."""


class BackendUnavailable(BackendError):
    """The backend cannot run on this machine (TensorRT without an NVIDIA GPU or without the
    package, a CUDA provider without CUDA). `auto` and the viewer move on to the next backend; a
    command asked for exactly this backend (`evaluate --backend`, `build --format`) exits 4."""


class ModelFileError(BackendError):
    """The model file itself is unusable (corrupt, truncated, foreign): no other backend can help,
    so `auto` stops at once and says so instead of listing per-backend skips."""
