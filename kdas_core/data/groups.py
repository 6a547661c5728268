"""Groups of training images that must fall on the same side of the validation split.

Most polyp data is video-derived (CVC-ClinicDB, CVC-ColonDB, ETIS): consecutive frames of one
sequence are near-identical. If one sits in validation and its neighbour in training, validation
scores are optimistic and checkpoint selection with them. So the split assigns *groups*, never
single frames, to a side:

- ``auto`` (default): two images are linked when they are near-duplicates — the cosine similarity
  of their 32x32 colour thumbnails, after subtracting the data set's mean thumbnail (which removes
  the vignette and colour cast all endoscopy frames share), is at least ``DUPLICATE``; and two
  images whose stems are consecutive frame numbers (n, n+1 or n+2) are linked when they show the
  same scene (similarity at least ``SEQUENCE``), which follows a video sequence through camera
  motion and stops at its cuts. Groups are the connected components of these links.
- ``none``: each image is its own group (a plain hashed split by file stem).
- a CSV path: rows ``stem,group`` (a header row is allowed); images it does not list form a group
  each. Use it when you know the sequences (patient, video) of your data.

Thresholds were chosen on Kvasir-SEG + CVC-ClinicDB: at 0.9 random pairs of Kvasir images
(different patients) are linked in well under 0.1 % of cases, and the ClinicDB frames form
~56 groups for its 29 sequences (a sequence with a large camera move splits in two). The
thumbnails are cached under ``KDAS_CACHE_DIR`` (default ~/.cache/kdas) by file path, size
and modification time, so the cost (a few seconds per thousand images) is paid once.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import cv2
import numpy as np

from kdas_core.io.atomic import staged
from kdas_core.cli.conventions import UsageError
from kdas_core.data.dataset import IMAGE_EXTS, DatasetError  # dataset imports this module only inside a function

DUPLICATE = 0.90
SEQUENCE = 0.50
THUMB = 32
MAX_FRAME_GAP = 2


class GroupsError(UsageError):
    """A groups CSV that cannot be used; the message names the file and the row."""


def _cache_dir() -> Path:
    return Path(os.environ.get("KDAS_CACHE_DIR", Path.home() / ".cache" / "kdas")) / "thumbs"


def _thumbnail(path: str) -> np.ndarray:
    # Reduced decoding reads a JPEG at 1/4 size directly (other formats are decoded in full).
    img = cv2.imread(path, cv2.IMREAD_REDUCED_COLOR_4)
    if img is None:
        img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"{path}: unreadable or corrupt image")
    return cv2.resize(img, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()


def thumbnails(paths: list[str]) -> np.ndarray:
    """(N, 3*THUMB*THUMB) float32 thumbnails, cached per file."""
    key = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        key.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = _cache_dir() / f"{key.hexdigest()}-{THUMB}.npy"
    if cache.is_file():
        try:
            arr = np.load(cache, allow_pickle=False)
            if arr.shape == (len(paths), 3 * THUMB * THUMB):
                return arr
        except (OSError, ValueError):
            pass  # a damaged cache file is recomputed
    arr = np.stack([_thumbnail(p) for p in paths]) if paths else np.zeros((0, 3 * THUMB * THUMB), np.float32)
    try:
        with staged(cache, suffix=".npy") as tmp:
            np.save(tmp, arr, allow_pickle=False)
    except OSError:
        pass  # a read-only cache only costs the recomputation
    return arr


def similarity(paths: list[str]) -> np.ndarray:
    """Cosine similarity of mean-subtracted thumbnails, (N, N)."""
    t = thumbnails(paths)
    t = t - t.mean(axis=0, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True) + 1e-6
    return t @ t.T


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def near_duplicate_groups(paths: list[str], duplicate: float = DUPLICATE, sequence: float = SEQUENCE) -> list[int]:
    """A group id per image (see the module docstring)."""
    n = len(paths)
    uf = _UnionFind(n)
    if n < 2:
        return list(range(n))
    sim = similarity(paths)
    ii, jj = np.nonzero(np.triu(sim >= duplicate, k=1))
    for a, b in zip(ii.tolist(), jj.tolist()):
        uf.union(a, b)
    numbered = sorted((int(Path(p).stem), i) for i, p in enumerate(paths) if Path(p).stem.isdigit())
    for (na, a), (nb, b) in zip(numbered, numbered[1:]):
        if nb - na <= MAX_FRAME_GAP and sim[a, b] >= sequence:
            uf.union(a, b)
    return _relabel([uf.find(i) for i in range(n)])


def csv_groups(paths: list[str], csv_path: str) -> list[int]:
    if not os.path.isfile(csv_path):
        raise GroupsError(f"--groups {csv_path}: no such file (give 'auto', 'none' or a CSV of stem,group)")
    table: dict[str, str] = {}
    with open(csv_path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise GroupsError(f"{csv_path}:{line_no}: expected 'stem,group', got {','.join(row)!r}")
            stem, group = row[0].strip(), row[1].strip()
            if line_no == 1 and stem.lower() == "stem":
                continue  # header
            stem = Path(stem).stem if Path(stem).suffix.lower() in IMAGE_EXTS else stem
            if stem in table and table[stem] != group:
                raise GroupsError(f"{csv_path}:{line_no}: {stem!r} is in group {table[stem]!r} already, not {group!r}")
            table[stem] = group
    stems = [Path(p).stem for p in paths]
    if table and not set(table) & set(stems):
        raise GroupsError(f"{csv_path}: none of its {len(table)} stems names a training image (e.g. {next(iter(table))!r})")
    return _relabel([f"csv:{table[s]}" if s in table else f"alone:{s}" for s in stems])


def _relabel(keys: list) -> list[int]:
    ids: dict = {}
    return [ids.setdefault(k, len(ids)) for k in keys]


def assign_groups(paths: list[str], spec: str) -> list[int]:
    """Group ids for `paths` by `spec`: 'auto', 'none' or a CSV path."""
    if spec == "none":
        return list(range(len(paths)))
    if spec == "auto":
        return near_duplicate_groups(paths)
    return csv_groups(paths, spec)
