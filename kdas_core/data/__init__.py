from .dataset import (
    DatasetError,
    DatasetLayout,
    EvalDataset,
    TrainDataset,
    find_pairs,
    read_image,
    read_mask,
    Split,
    resolve_layout,
    split_by_groups,
    split_train_val,
    subset_pairs,
)

__all__ = [
    "DatasetError", "DatasetLayout", "EvalDataset", "TrainDataset", "find_pairs", "read_image",
    "read_mask", "resolve_layout", "Split", "split_by_groups", "split_train_val", "subset_pairs",
]
