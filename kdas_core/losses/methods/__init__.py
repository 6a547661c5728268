"""Every `--kd` method registers itself on import. One module per method."""

from . import kdas  # noqa: F401
