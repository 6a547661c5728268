"""Datasets: image/mask folders matched by file stem, or a PraNet root.

PraNet layout:  ROOT/TrainDataset/{images,masks}, ROOT/TestDataset/<name>/{images,masks}.
Plain layout:   DIR/{images,masks}: training data for `train`/`distill` (which then have no test
                set, and say so), or the one set `evaluate` scores when you point it there.

Every problem is an error that names the files; nothing is skipped silently.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from kdas_core.cli.conventions import UsageError, name_some
from kdas_core.data import IMAGE_EXTS
from kdas_core.data.transforms import TrainAugment, to_tensor

Pair = tuple[str, str]


class DatasetError(UsageError):
    """Bad or inconsistent data; the message names the offending files."""


def _list_images(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            if p.stem in files:
                raise DatasetError(f"{folder}: two files share the stem {p.stem!r}: {files[p.stem].name}, {p.name}")
            files[p.stem] = p
    return files


def find_pairs(folder: str | os.PathLike) -> list[Pair]:
    """(image, mask) paths of DIR/images and DIR/masks, matched by stem."""
    folder = Path(folder)
    img_dir, mask_dir = folder / "images", folder / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DatasetError(f"{folder}: expected sub-folders images/ and masks/; {d} is missing")
    images, masks = _list_images(img_dir), _list_images(mask_dir)
    if not images:
        raise DatasetError(f"{img_dir}: no images ({', '.join(sorted(IMAGE_EXTS))})")
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    problems = []
    if no_mask:
        problems.append(f"{len(no_mask)} image(s) without a mask in {mask_dir}: " + name_some(images[s].name for s in no_mask))
    if no_image:
        problems.append(f"{len(no_image)} mask(s) without an image in {img_dir}: " + name_some(masks[s].name for s in no_image))
    if problems:
        raise DatasetError("; ".join(problems))
    return [(str(images[s]), str(masks[s])) for s in sorted(images)]


@dataclass
class DatasetLayout:
    """`tests` holds only held-out test sets (TestDataset/<name>/): a plain folder has none, since
    its pairs are the training data. `evaluation_sets()` is what `evaluate DIR` scores."""

    root: str
    train: list[Pair]
    tests: dict[str, list[Pair]] = field(default_factory=dict)
    kind: str = "pranet"

    def evaluation_sets(self) -> dict[str, list[Pair]]:
        if self.kind == "plain":
            return {Path(self.root).name: self.train}
        return self.tests

    def describe_tests(self) -> str:
        if self.tests:
            return "test sets " + ", ".join(f"{n} ({len(p)})" for n, p in self.tests.items())
        if self.kind == "plain":
            return "no test set (a plain images/+masks/ folder is training data; test with a PraNet root)"
        return "no test set (no TestDataset/<name>/ folders)"


def resolve_layout(root: str | os.PathLike) -> DatasetLayout:
    """A PraNet root (TrainDataset/, TestDataset/<name>/) or a plain images/masks folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such data folder")
    if (root / "TrainDataset").is_dir() or (root / "TestDataset").is_dir():
        train = find_pairs(root / "TrainDataset") if (root / "TrainDataset").is_dir() else []
        tests = {}
        test_root = root / "TestDataset"
        if test_root.is_dir():
            for sub in sorted(p for p in test_root.iterdir() if p.is_dir()):
                tests[sub.name] = find_pairs(sub)
        return DatasetLayout(str(root), train, tests, "pranet")
    if (root / "images").is_dir():
        return DatasetLayout(str(root), find_pairs(root), {}, "plain")
    raise DatasetError(f"{root}: neither a PraNet root (TrainDataset/, TestDataset/) nor a folder with images/ and masks/")


def _stem_key(salt: str, stem: str) -> str:
    """The hash that orders images (and groups, by their smallest stem): independent of file order and machine."""
    return hashlib.sha1(f"{salt}:{stem}".encode()).hexdigest()


def _hashed_order(pairs: list[Pair], salt: str) -> list[Pair]:
    """Pairs in an order fixed by hashing (salt, file stem)."""
    return sorted(pairs, key=lambda p: _stem_key(salt, Path(p[0]).stem))


@dataclass
class Split:
    train: list[Pair]
    val: list[Pair]
    n_groups: int
    groups: str  # the --groups spec that made it

    def describe(self) -> str:
        how = {"auto": "near-duplicate groups", "none": "one image per group"}.get(self.groups, f"groups from {self.groups}")
        return f"{len(self.train)} train / {len(self.val)} val images, split by {self.n_groups} {how}"


def split_by_groups(pairs: list[Pair], val_fraction: float, groups: str = "auto", salt: str = "0") -> Split:
    """Deterministic split that keeps each group (see `kdas_core.data.groups`) on one side.

    Groups are ordered by hashing (salt, the group's smallest stem) and taken into validation
    until it holds round(N * val_fraction) images; a group that would overshoot that by more
    than 10 % is passed over. With groups='none' every image is its own group, which is the
    plain hashed-stem split of earlier versions (same validation images)."""
    from kdas_core.data.groups import assign_groups

    if not 0 <= val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    ids = assign_groups([p[0] for p in pairs], groups)
    members: dict[int, list[Pair]] = {}
    for pair, g in zip(pairs, ids):
        members.setdefault(g, []).append(pair)
    n_groups = len(members)
    if val_fraction == 0:
        return Split(sorted(pairs), [], n_groups, groups)
    n_val = max(1, round(len(pairs) * val_fraction))
    if n_val >= len(pairs) or n_groups < 2:
        raise DatasetError(f"only {len(pairs)} training pairs in {n_groups} group(s): too few to hold out a validation split")
    def key(g: int) -> str:
        return _stem_key(salt, min(Path(p[0]).stem for p in members[g]))

    val: list[Pair] = []
    slack = max(1, n_val // 10)
    for g in sorted(members, key=key):
        if len(val) >= n_val:
            break
        if len(val) + len(members[g]) <= n_val + slack:
            val += members[g]
    val_set = set(val)
    return Split(sorted(p for p in pairs if p not in val_set), sorted(val), n_groups, groups)


def split_train_val(pairs: list[Pair], val_fraction: float, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """The hashed-stem split (each image its own group): stable across machines, file order, runs."""
    s = split_by_groups(pairs, val_fraction, "none", salt=str(seed))
    return s.train, s.val


def read_image(path: str) -> np.ndarray:
    """RGB uint8 HxWx3."""
    data = cv2.imread(path, cv2.IMREAD_COLOR)
    if data is None:
        raise DatasetError(f"{path}: unreadable or corrupt image")
    return cv2.cvtColor(data, cv2.COLOR_BGR2RGB)


def read_mask(path: str) -> np.ndarray:
    """Binary uint8 HxW in {0, 1}; thresholded at 127 because upstream masks are often JPEG."""
    data = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if data is None:
        raise DatasetError(f"{path}: unreadable or corrupt mask")
    return (data > 127).astype(np.uint8)


def read_pair(image_path: str, mask_path: str) -> tuple[np.ndarray, np.ndarray]:
    image, mask = read_image(image_path), read_mask(mask_path)
    if image.shape[:2] != mask.shape:
        raise DatasetError(
            f"size mismatch: {image_path} is {image.shape[1]}x{image.shape[0]} but {mask_path} is {mask.shape[1]}x{mask.shape[0]}"
        )
    return image, mask


class TrainDataset(Dataset):
    """Augmented training samples at a fixed size (multi-scale happens per batch in the trainer).

    cache=True decodes and resizes every pair once, into memory (uint8 image, bool mask: about
    4*S*S bytes a pair), so epochs after the first pay neither JPEG decoding nor the resize;
    samples are bit-identical to the uncached ones."""

    def __init__(self, pairs: list[Pair], size: int, mean, std, augment: bool = True, cache: bool = False,
                 progress: bool = False, targets: torch.Tensor | None = None):
        """`targets`: cached teacher maps aligned with `pairs` (N, 2, S/8, S/8), see kdas_core.data.targets."""
        if not pairs:
            raise DatasetError("empty training set")
        self.pairs, self.size, self.mean, self.std = pairs, size, mean, std
        self.targets = targets
        self.augment = TrainAugment(size) if augment else None
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if cache:
            self._cache = [self._load(i) for i in _maybe_progress(range(len(pairs)), progress, "cache images")]

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = read_pair(*self.pairs[i])
        image_t, mask_t = to_tensor(image, mask, self.size)
        return image_t, mask_t.bool()

    def __getitem__(self, i: int) -> dict:
        image_t, mask_b = self._cache[i] if self._cache is not None else self._load(i)
        mask_t = mask_b.float()
        sample = {}
        if self.targets is not None:
            from kdas_core.data.targets import ROTATION_FILL_LOGIT, upsample

            t = upsample(self.targets[i], self.size)
            if self.augment is not None:
                image_t, mask_t, t = self.augment(image_t, mask_t, t, targets_fill=ROTATION_FILL_LOGIT)
            sample["targets"] = t
        elif self.augment is not None:
            image_t, mask_t = self.augment(image_t, mask_t)
        return {"image": _normalise(image_t, self.mean, self.std), "mask": mask_t, "name": Path(self.pairs[i][0]).stem,
                **sample}


class EvalDataset(Dataset):
    """Image resized to the model size; mask kept at its original size (metrics are computed there)."""

    def __init__(self, pairs: list[Pair], size: int, mean, std):
        if not pairs:
            raise DatasetError("empty evaluation set")
        self.pairs, self.size, self.mean, self.std = pairs, size, mean, std

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        image, mask = read_pair(*self.pairs[i])
        image_t, _ = to_tensor(image, None, self.size)
        return {"image": _normalise(image_t, self.mean, self.std), "mask": torch.from_numpy(mask),
                "name": Path(self.pairs[i][0]).stem, "raw": torch.from_numpy(image)}


def _maybe_progress(it, enabled: bool, desc: str):
    from kdas_core.cli.conventions import bars_wanted

    if not bars_wanted(enabled):
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="img", leave=False, dynamic_ncols=True)


def _normalise(image: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 CHW -> float CHW normalised with the checkpoint's mean/std."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (image.float() / 255.0 - m) / s


def eval_collate(batch: list[dict]) -> dict:
    """Masks differ in size between images: keep them as a list."""
    return {"image": torch.stack([b["image"] for b in batch]), "mask": [b["mask"] for b in batch],
            "name": [b["name"] for b in batch], "raw": [b["raw"] for b in batch]}


def subset_pairs(pairs: list[Pair], spec: str) -> list[Pair]:
    """'k/K': the k-th (1-based) of K disjoint, near-equal parts, assigned by hashed stem so the
    parts stay the same whatever the file order (multi-teacher KD trains one teacher per part)."""
    try:
        k, total = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UsageError(f"--subset expects k/K such as 2/4, got {spec!r}") from None
    if not 1 <= k <= total:
        raise UsageError(f"--subset {spec}: k must be between 1 and K")
    keyed = _hashed_order(pairs, "subset")
    part = sorted(keyed[k - 1::total])
    if not part:
        raise DatasetError(f"--subset {spec}: part {k} of {total} is empty ({len(pairs)} training pairs)")
    return part
