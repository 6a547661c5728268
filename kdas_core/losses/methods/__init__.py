"""Every `--kd` method registers itself on import. One module per method; shared helpers in common."""

from kdas_core.losses.methods import at, cwd, grd, hlfd, kd, kdas, mtkd, skd  # noqa: F401
