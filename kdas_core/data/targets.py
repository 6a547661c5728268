"""The cached teacher-targets file (`OUT/targets.safetensors`): its key, writing it, reading it
back for a training run (refused by name when stale), and upsampling the stored S/8 maps. Made by
`python -m kdas_core.teacher_targets`; read by the training loader and `distill --teacher-targets`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from kdas_core.cli.conventions import UsageError

FORMAT = "kdas-teacher-targets/1"
FILE = "targets.safetensors"
STRIDE = 8  # the decoder's P1/P2 logits are predicted at 1/8 of the input size
ROTATION_FILL_LOGIT = -10.0  # what a teacher says about the black corners a rotation brings in


class TeacherTargetsError(UsageError):
    """Targets that cannot be used for this run; the message says which key differs."""


def data_digest(pairs: list[tuple[str, str]]) -> str:
    """SHA-1 over the training images' stems and bytes (independent of paths and timestamps)."""
    h = hashlib.sha1()
    for image, _ in sorted(pairs, key=lambda p: Path(p[0]).stem):
        h.update(Path(image).stem.encode() + b"\0")
        with open(image, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def save(out_dir: str, targets, meta: dict) -> str:
    from kdas_core.io.checkpoint import save_tensors

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, FILE)
    save_tensors(path, {"targets": targets}, meta)
    return path


def read(path: str, flag: str = "--teacher-targets"):
    """(tensors, metadata) of a targets file (or the folder holding one), checked to be one;
    `flag` names the option it came from in the messages."""
    from kdas_core.io.checkpoint import CheckpointError, read_tensors

    file = os.path.join(path, FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise TeacherTargetsError(f"{flag} {path}: no {FILE} (make it with python -m kdas_core.teacher_targets)")
    try:
        tensors, meta = read_tensors(file)
    except CheckpointError as exc:
        raise TeacherTargetsError(f"{flag} {path}: {exc}") from None
    if meta.get("format") != FORMAT or "targets" not in tensors:
        raise TeacherTargetsError(f"{flag} {path}: not a teacher-targets file (format {meta.get('format')!r})")
    return tensors, meta


def load(path: str, pairs: list[tuple[str, str]], size: int, teacher_sha256: list[str] | None = None,
         select: list[tuple[str, str]] | None = None, flag: str = "--teacher-targets"):
    """(targets as float16 (N, 2, S/8, S/8), metadata); refuses stale ones. `pairs`: all the
    training images the file was made for (the key is checked on them); the rows returned are
    aligned with `select` (a part of `pairs`, e.g. the training side of the split), or `pairs`."""
    return rows(*read(path, flag), path, pairs, size, teacher_sha256, select, flag)


def rows(tensors: dict, meta: dict, path: str, pairs: list[tuple[str, str]], size: int,
         teacher_sha256: list[str] | None = None, select: list[tuple[str, str]] | None = None,
         flag: str = "--teacher-targets"):
    """`load` on a file already `read`: its key checked, its rows aligned with `select`."""
    key = meta["key"]
    if key["image_size"] != size:
        raise TeacherTargetsError(f"{flag} {path}: made at {key['image_size']} px, this run trains at {size} px; "
                                  f"make targets with --image-size {size}")
    if teacher_sha256 is not None and sorted(teacher_sha256) != key["teachers"]:
        raise TeacherTargetsError(f"{flag} {path}: made from other teacher checkpoints than the --teacher "
                                  f"given ({', '.join(t['path'] for t in meta['teachers'])})")
    digest = data_digest(pairs)
    if digest != key["data_sha1"]:
        raise TeacherTargetsError(f"{flag} {path}: made for other training images (made from "
                                  f"{meta.get('data_root')}); use that --data, or make them again for this one")
    index = {s: i for i, s in enumerate(meta["stems"])}
    order = [index[Path(p[0]).stem] for p in (pairs if select is None else select)]
    return tensors["targets"][order], meta


def upsample(stored, size: int):
    """Stored (…, 2, S/8, S/8) float16 -> float32 (…, 2, S, S), as the teacher upsamples P1/P2."""
    import torch.nn.functional as F

    x = stored.float()
    squeeze = x.dim() == 3
    if squeeze:
        x = x[None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x[0] if squeeze else x
