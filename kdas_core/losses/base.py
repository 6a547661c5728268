"""The distiller interface and the `--kd` registry.

A distiller is an nn.Module (so its adapters are persistent, trained, checkpointed in the run's
train state and moved to the device with it). Given the student's outputs, the teachers' outputs
and the batch, it returns named loss terms; the trainer adds them up. `seg_weight` scales the
student's own supervised loss: KDAS trains on (1-alpha) * L_seg + alpha * KD.

`--kd kdas,cwd:0.5` builds each method with its own weight (a bare name takes the method's
`default_weight`); the supervised loss is weighted by the smallest `seg_weight` among them (one
method that down-weights it is respected).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kdas_core.losses.catalog import NONE_SUMMARY
from kdas_core.cli.conventions import UsageError


class Distiller(nn.Module):
    """Base class. Subclasses set `name`, a one-line `summary` (both plain string literals: the
    torch-free `catalog` reads them from the source) and their hyperparameters, and implement `forward`."""

    name: str = "base"
    summary: str = ""
    seg_weight: float = 1.0
    # The weight `--kd NAME` (no ':W') gives the method's terms; `--kd NAME:W` overrides it.
    default_weight: float = 1.0
    # The teacher outputs the method reads, when it reads nothing else (no features): then cached
    # teacher targets (`kdas_core.teacher_targets`) can replace the live teacher. None: needs it live.
    teacher_outputs: tuple[str, ...] | None = None

    def __init__(self, student: nn.Module, teachers: list[nn.Module], weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def forward(self, s_out: dict, t_outs: list[dict], batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError


_REGISTRY: dict[str, type[Distiller]] = {}


def register(cls: type[Distiller]) -> type[Distiller]:
    if not cls.summary or cls.name in _REGISTRY:
        raise TypeError(f"distiller {cls.__name__}: needs its own `name` and a one-line `summary` (got {cls.name!r})")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> dict[str, str]:
    """name -> one-line summary, for --help."""
    _import_all()
    return {"none": NONE_SUMMARY, **{k: v.summary for k, v in sorted(_REGISTRY.items())}}


def parse_kd_spec(spec: str) -> list[tuple[str, float]]:
    """'kd,cwd:0.5' -> [('kd', 1.0), ('cwd', 0.5)]: a bare name takes the method's default_weight."""
    _import_all()
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, w = item.partition(":")
        if name == "none":
            continue
        if name not in _REGISTRY:
            raise UsageError(f"unknown --kd method {name!r}; choose from {', '.join(available())}")
        try:
            weight = float(w) if w else _REGISTRY[name].default_weight
        except ValueError:
            raise UsageError(f"--kd {item!r}: weight must be a number, e.g. {name}:0.5") from None
        out.append((name, weight))
    return out


def build_distillers(spec: str, student: nn.Module, teachers: list[nn.Module]) -> nn.ModuleList:
    return nn.ModuleList(_REGISTRY[n](student, teachers, weight=w) for n, w in parse_kd_spec(spec))


def _import_all() -> None:
    # Importing the package registers every method module.
    from kdas_core.losses import methods  # noqa: F401
