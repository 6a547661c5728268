"""Data folders, PraNet roots, splits and datasets. The names below load `dataset` (and torch) on
first use, so `python -m kdas_core.data.synthetic --help` answers without importing torch."""

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})  # what counts as an image file, everywhere

__all__ = [
    "DatasetError", "DatasetLayout", "EvalDataset", "TrainDataset", "find_pairs", "read_image",
    "read_mask", "resolve_layout", "Split", "split_by_groups", "split_train_val", "subset_pairs",
]


def __getattr__(name: str):
    if name in __all__:
        from kdas_core.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
