import cv2
import numpy as np
import pytest

from kdas_core.data import DatasetError, TrainDataset, find_pairs, resolve_layout, split_train_val, subset_pairs
from kdas_core.data.transforms import TrainAugment, to_tensor

from .conftest import shared_data, write_pair_folder

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_pairs_by_stem_and_plain_layout(pair_folder):
    pairs = find_pairs(pair_folder)
    assert len(pairs) == 6
    layout = resolve_layout(pair_folder)
    # A plain folder is training data: no test set, but `evaluate DIR` scores it as one set.
    assert layout.kind == "plain" and layout.tests == {} and list(layout.evaluation_sets()) == ["set"]


def test_image_without_mask_is_named(pair_folder):
    (pair_folder / "masks" / "002.png").unlink()
    with pytest.raises(DatasetError, match="002.jpg"):
        find_pairs(pair_folder)


def test_mask_without_image_is_named(pair_folder):
    cv2.imwrite(str(pair_folder / "masks" / "extra.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match="extra.png"):
        find_pairs(pair_folder)


def test_empty_folder_and_missing_masks_dir(tmp_path):
    (tmp_path / "e" / "images").mkdir(parents=True)
    (tmp_path / "e" / "masks").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        find_pairs(tmp_path / "e")
    (tmp_path / "f" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="masks"):
        find_pairs(tmp_path / "f")


def test_unreadable_and_size_mismatch_are_named(pair_folder):
    (pair_folder / "images" / "001.jpg").write_bytes(b"not a jpeg")
    cv2.imwrite(str(pair_folder / "masks" / "003.png"), np.zeros((10, 12), np.uint8))
    ds = TrainDataset(find_pairs(pair_folder), 32, MEAN, STD)
    with pytest.raises(DatasetError, match="001.jpg"):
        ds[1]
    with pytest.raises(DatasetError, match="size mismatch.*003"):
        ds[3]


def test_jpeg_like_masks_are_binarised(pair_folder):
    m = cv2.imread(str(pair_folder / "masks" / "000.png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(pair_folder / "masks" / "000.png"), np.clip(m.astype(int) + 30, 0, 200).astype(np.uint8))
    sample = TrainDataset(find_pairs(pair_folder), 32, MEAN, STD, augment=False)[0]
    assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0}


def test_split_is_deterministic_disjoint_and_order_free(tmp_path):
    pairs = find_pairs(write_pair_folder(tmp_path / "s", 40))
    a_train, a_val = split_train_val(pairs, 0.1)
    b_train, b_val = split_train_val(list(reversed(pairs)), 0.1)
    assert a_val == b_val and len(a_val) == 4
    assert not set(a_train) & set(a_val)
    parts = [subset_pairs(a_train, f"{k}/3") for k in (1, 2, 3)]
    assert sum(map(len, parts)) == len(a_train)
    assert not set(parts[0]) & set(parts[1])
    with pytest.raises(ValueError):
        subset_pairs(a_train, "4/3")


def test_augmentation_really_changes_samples_and_keeps_alignment(pair_folder):
    img, mask = cv2.imread(str(pair_folder / "images" / "000.jpg"))[..., ::-1], (cv2.imread(str(pair_folder / "masks" / "000.png"), 0) > 127)
    image_t, mask_t = to_tensor(img, mask.astype(np.uint8), 48)
    aug = TrainAugment(48)
    outs = [aug(image_t, mask_t) for _ in range(12)]
    assert any(not (o[1] == mask_t).all() for o in outs), "geometry never changed"
    for im, m in outs:  # the bright disc stays under the mask
        red = im[0].float()
        if m.sum() > 20 and (1 - m).sum() > 20:
            assert red[m[0] > 0].mean() > red[m[0] == 0].mean()


def test_real_pranet_layout_counts():
    root = shared_data("polyp")
    layout = resolve_layout(root)
    assert len(layout.train) == 1447
    assert {k: len(v) for k, v in layout.tests.items()} == {"CVC-ClinicDB": 62, "Kvasir": 100}
