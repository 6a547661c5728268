"""Whole files or none: every file a KDAS command writes for a user (checkpoints, exports, engines,
JSON/CSV reports, videos) is written beside its destination and renamed into place, so a crash,
Ctrl+C or a full disk never leaves half a file under the final name. Torch-free.

    with staged("out.onnx") as tmp:      # write anything to the path `tmp`
        torch.onnx.export(..., tmp)
    write_json("stats.json", data)        # or the one-call forms for bytes, text and JSON
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def staged(path: str | os.PathLike, suffix: str | None = None) -> Iterator[str]:
    """Yield a temporary path in `path`'s folder (created if needed); on a normal exit rename it
    to `path` (atomic on POSIX and Windows), on an exception remove it and re-raise.

    The temporary name keeps `path`'s extension unless `suffix` says otherwise (writers such as
    FFmpeg pick the format from it) and starts with '.tmp-' so a listing shows what it is. The
    file gets ordinary permissions (0666 minus the umask), not mkstemp's 0600."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1] if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with staged(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with staged(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, data: Any, indent: int = 2, sort_keys: bool = False) -> None:
    """`data` as indented JSON with a trailing newline."""
    write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether the paths `a` and `b` name the same file, through symbolic and hard links (an
    output about to be written is checked against the inputs it would destroy)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): then only the resolved names can agree
        return os.path.realpath(a) == os.path.realpath(b)


def unwritable(path: str | os.PathLike, flag: str, folder: str | os.PathLike | None = None) -> str | None:
    """Why `path` cannot be created, as a message naming `flag` and `path`, or None. A real probe
    file is made and removed in `folder` (default: the folder of `path`, which must exist), so /proc
    or a read-only mount are caught."""
    folder = os.path.dirname(os.path.abspath(path)) if folder is None else os.fspath(folder)
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".kdas-probe-")
    except OSError as exc:
        return f"{flag} {path}: cannot create files in {folder} ({exc.strerror or exc}); choose a writable folder"
    os.close(fd)
    os.remove(probe)
    return None


def check_output_path(path: str | os.PathLike, flag: str, inputs: tuple = ()) -> None:
    """Before the work starts: UsageError (exit 2) naming `flag` when `path` cannot be created
    (its folder is missing or not writable; a real probe file, so /proc or a read-only mount are
    caught) or is one of `inputs` (writing it would destroy what is read)."""
    from kdas_core.cli.conventions import UsageError

    for other in inputs:
        if other and same_file(path, other):
            raise UsageError(f"{flag} {path} is an input of this command ({other}); give another output path")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return  # created by the writer (staged makes the folders)
    problem = unwritable(path, flag)
    if problem:
        raise UsageError(problem)


def check_output_dir(path: str | os.PathLike, flag: str, inputs: tuple = (), file_suffixes: tuple = ()) -> None:
    """Before the work starts, for an output *folder*: UsageError naming `flag` when `path` is a
    file (an input, or any file), is one of the `inputs` (folders of data included: outputs never
    land among what is read), looks like a file name (`file_suffixes`, for users who expect to
    name the output file), or cannot be created (its nearest existing folder is not writable)."""
    from kdas_core.cli.conventions import UsageError

    path = os.fspath(path)
    for other in inputs:
        if other and same_file(path, other):
            raise UsageError(f"{flag} {path} is an input of this command ({other}); give another output folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file; {flag} is the folder the output is written into")
    if not os.path.exists(path) and path.lower().endswith(tuple(s.lower() for s in file_suffixes)):
        raise UsageError(f"{flag} {path}: {flag} is a folder (the file name is made for you); give a folder, "
                         f"e.g. {flag} {os.path.dirname(path) or '.'}")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the folders are made later: probe the deepest one that exists
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {path}: {existing} is a file, so no folder can be made under it")
    problem = unwritable(path, flag, folder=existing)
    if problem:
        raise UsageError(problem)
