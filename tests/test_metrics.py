"""Metrics: known values, empty-mask conventions, the toolbox mean-over-256-thresholds variant, and
agreement with pysodmetrics (the reference) fed with 8-bit maps as the MATLAB toolbox is."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from py_sod_metrics import MAE, Emeasure, Smeasure, WeightedFmeasure

from kdas_core.metrics import (
    THRESHOLDS_256,
    SegMetrics,
    dice_iou_at,
    dice_iou_curves,
    image_metrics,
)

from .conftest import shared_data

SUMMARY = {"mDice", "mIoU", "mDice_mean256", "mIoU_mean256", "Sm", "Em", "wFm", "MAE", "n"}


def _blob_mask(h=90, w=120, cx=60, cy=40, rx=25, ry=18):
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (cx, cy), (rx, ry), 15, 0, 360, 1, -1)
    return mask


def _realish_prob(mask, rng, shift=(4, -3), noise=0.15):
    """A plausible network output: the mask shifted, blurred, with noise, as 8-bit levels."""
    shifted = np.roll(mask.astype(np.float32), shift, axis=(0, 1))
    soft = cv2.GaussianBlur(shifted, (0, 0), 3)
    prob = np.clip(soft * 0.9 + rng.normal(0, noise, mask.shape) * 0.3 + 0.05, 0, 1)
    u8 = np.round(prob * 255).astype(np.uint8)
    u8.flat[0], u8.flat[-1] = 0, 255  # spans 0..255: min-max normalisation is the identity
    return u8


def _toolbox_mean_dice(prob, mask):
    """Direct port of the PraNet MATLAB loop (main.m + Fmeasure_calu.m), for non-empty masks."""
    dices, ious = [], []
    gt = mask.astype(bool)
    for t in THRESHOLDS_256[::-1]:  # 1:-1/255:0
        label = prob >= t
        tp = np.count_nonzero(label & gt)
        if tp == 0:
            dices.append(0.0)
            ious.append(0.0)
            continue
        n_pred, n_obj = np.count_nonzero(label), np.count_nonzero(gt)
        dices.append(2 * tp / (n_obj + n_pred))
        ious.append(tp / (n_obj - tp + n_pred))
    return np.mean(dices), np.mean(ious)


def _pysod(u8_pred, mask):
    """pysodmetrics on uint8 0-255 maps (its normalize=True path, as the toolbox reads PNGs)."""
    gt = mask.astype(np.uint8) * 255
    sm, em, wfm, mae = Smeasure(), Emeasure(), WeightedFmeasure(), MAE()
    for m in (sm, em, wfm, mae):
        m.step(u8_pred, gt)
    return {"Sm": sm.get_results()["sm"], "Em": em.get_results()["em"]["curve"].mean(),
            "wFm": wfm.get_results()["wfm"], "MAE": mae.get_results()["mae"]}


def test_perfect_prediction():
    mask = _blob_mask()
    m = image_metrics(mask.astype(np.float64), mask)
    assert m["Dice"] == 1.0 and m["IoU"] == 1.0 and m["MAE"] == 0.0
    assert m["Sm"] == pytest.approx(1.0, abs=1e-9) and m["wFm"] == pytest.approx(1.0, abs=1e-9)
    # threshold 0 marks every pixel, so even a perfect map is a little below 1 on the 256 variants
    fg = mask.mean()
    assert m["Dice_mean256"] == pytest.approx((255 + 2 * fg / (1 + fg)) / 256)
    assert m["IoU_mean256"] == pytest.approx((255 + fg) / 256)
    assert m["Em"] > 0.99


def test_disjoint_prediction():
    mask = _blob_mask()
    m = image_metrics(1.0 - mask.astype(np.float64), mask)
    assert m["Dice"] == 0.0 and m["IoU"] == 0.0 and m["MAE"] == 1.0 and m["Sm"] == 0.0 and m["wFm"] == 0.0


def test_known_overlap_values_and_threshold_rule():
    mask = np.zeros((20, 20), np.uint8)
    mask[0:10, 0:10] = 1
    prob = np.zeros((20, 20))
    prob[0:10, 5:15] = 0.5  # exactly at the threshold counts as foreground (prob >= t)
    dice, iou = dice_iou_at(prob, mask, 0.5)
    assert dice == pytest.approx(0.5) and iou == pytest.approx(1 / 3)
    assert dice_iou_at(prob, mask, 0.51) == (0.0, 0.0)


def test_empty_mask_conventions():
    empty = np.zeros((32, 32), np.uint8)
    m = image_metrics(np.zeros((32, 32)), empty)
    assert m["Dice"] == 1.0 and m["IoU"] == 1.0 and m["MAE"] == 0.0 and m["Sm"] == 1.0
    assert m["wFm"] == 0.0  # pysodmetrics' rule: nothing to recall
    assert m["Dice_mean256"] == pytest.approx(255 / 256)  # only threshold 0 marks pixels
    false_alarm = np.zeros((32, 32))
    false_alarm[:4, :4] = 0.9
    assert dice_iou_at(false_alarm, empty) == (0.0, 0.0)
    missed = image_metrics(np.zeros((32, 32)), _blob_mask(32, 32, 16, 16, 6, 5))
    assert missed["Dice"] == 0.0 and missed["IoU"] == 0.0


def test_mean256_matches_matlab_toolbox_loop():
    rng = np.random.default_rng(0)
    mask = _blob_mask()
    for prob in (_realish_prob(mask, rng) / 255.0,          # 8-bit levels hit thresholds exactly
                 rng.random(mask.shape),                    # continuous
                 np.clip(cv2.GaussianBlur(mask.astype(np.float64), (0, 0), 5) * 1.3, 0, 1)):
        dice_curve, iou_curve = dice_iou_curves(prob, mask)
        assert dice_curve.shape == (256,)
        ref_dice, ref_iou = _toolbox_mean_dice(prob, mask)
        assert dice_curve.mean() == pytest.approx(ref_dice, abs=1e-12)
        assert iou_curve.mean() == pytest.approx(ref_iou, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_pysodmetrics_on_uint8_maps(seed):
    rng = np.random.default_rng(seed)
    mask = _blob_mask(cx=50 + 10 * seed, rx=20 + 5 * seed)
    u8 = _realish_prob(mask, rng, shift=(seed * 3, 2 - seed))
    ours = image_metrics(u8 / 255.0, mask)
    ref = _pysod(u8, mask)
    for key in ("Sm", "Em", "wFm", "MAE"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-9), key


def test_minmax_mode_reproduces_toolbox_normalisation():
    """A map that does not span [0, 1]: raw scores differ, --minmax scores equal pysodmetrics."""
    rng = np.random.default_rng(5)
    mask = _blob_mask()
    u8 = np.clip(_realish_prob(mask, rng).astype(np.int32) // 2 + 40, 0, 255).astype(np.uint8)  # 40..167
    ref = _pysod(u8, mask)
    stretched = image_metrics(u8 / 255.0, mask, minmax=True)
    raw = image_metrics(u8 / 255.0, mask)
    for key in ("Sm", "Em", "wFm", "MAE"):
        assert stretched[key] == pytest.approx(ref[key], abs=1e-9), key
    assert abs(raw["MAE"] - ref["MAE"]) > 0.01


def test_accumulator_summary_matches_pysodmetrics_over_images():
    rng = np.random.default_rng(1)
    acc = SegMetrics(threshold=0.5)
    sm, em, wfm, mae = Smeasure(), Emeasure(), WeightedFmeasure(), MAE()
    shapes = [(90, 120), (64, 48), (100, 100)]
    for i, (h, w) in enumerate(shapes):
        mask = _blob_mask(h, w, w // 2, h // 2, w // 4, h // 5)
        u8 = _realish_prob(mask, rng)
        row = acc.update(u8 / 255.0, mask, name=f"img{i}")
        assert row["name"] == f"img{i}" and (row["height"], row["width"]) == (h, w)
        for m in (sm, em, wfm, mae):
            m.step(u8, mask * 255)
    s = acc.summary()
    assert set(s) == SUMMARY and s["n"] == 3 and len(acc.rows) == 3
    assert s["Sm"] == pytest.approx(sm.get_results()["sm"], abs=1e-9)
    assert s["Em"] == pytest.approx(em.get_results()["em"]["curve"].mean(), abs=1e-9)
    assert s["wFm"] == pytest.approx(wfm.get_results()["wfm"], abs=1e-9)
    assert s["MAE"] == pytest.approx(mae.get_results()["mae"], abs=1e-9)
    assert s["mDice"] == pytest.approx(np.mean([r["Dice"] for r in acc.rows]))


def test_empty_accumulator_and_bad_inputs():
    s = SegMetrics().summary()
    assert s["n"] == 0 and np.isnan(s["mDice"])
    mask = _blob_mask()
    with pytest.raises(ValueError, match="same size"):
        image_metrics(np.zeros((10, 10)), mask)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_metrics(mask * 3.0, mask)
    with pytest.raises(ValueError, match="binary"):
        image_metrics(np.zeros(mask.shape), mask * 255)
    with pytest.raises(ValueError, match="threshold"):
        SegMetrics(threshold=1.5)


def test_realish_case_on_a_real_kvasir_mask():
    """A real polyp outline (irregular, large image) against an eroded, blurred prediction."""
    from kdas_core.data import read_mask

    folder = shared_data("polyp", "TestDataset", "Kvasir")
    smallest = min((folder / "images").glob("*.jpg"), key=lambda p: p.stat().st_size)  # keeps the test fast
    mask = read_mask(str(folder / "masks" / f"{smallest.stem}.png"))
    assert mask.shape[0] != mask.shape[1]  # a non-square original size
    eroded = cv2.erode(mask, np.ones((15, 15), np.uint8))
    u8 = np.round(cv2.GaussianBlur(eroded.astype(np.float32), (0, 0), 4) * 255).astype(np.uint8)
    u8.flat[0], u8.flat[-1] = 0, 255
    ours = image_metrics(u8 / 255.0, mask)
    ref = _pysod(u8, mask)
    for key in ("Sm", "Em", "wFm", "MAE"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-9), key
    assert 0.7 < ours["Dice"] < 1.0  # an eroded mask: good but not perfect
    assert ours["Dice_mean256"] == pytest.approx(_toolbox_mean_dice(u8 / 255.0, mask)[0], abs=1e-12)


def _hd_case(seed, h=540, w=960):
    """A deterministic large frame: a disc mask and a shifted, soft, noisy prediction (float32)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cx, cy, r = w * (0.3 + 0.4 * rng.random()), h * (0.3 + 0.4 * rng.random()), h * (0.15 + 0.1 * rng.random())
    mask = (np.hypot(xx - cx, yy - cy) < r).astype(np.uint8)
    prob = 1 / (1 + np.exp(6 * (np.hypot(xx - cx - 0.1 * r, yy - cy) / r - 1)))
    return np.clip(prob + rng.normal(0, 0.02, prob.shape), 0, 1).astype(np.float32), mask


# The values the single-process SegMetrics gave on these frames before metric workers existed
# (commit cd5ad70); parallel scoring must reproduce them.
HD_SUMMARY_BEFORE_WORKERS = {
    "mDice": 0.9361324207393127, "mIoU": 0.8799332552719333, "mDice_mean256": 0.7563660643524963,
    "mIoU_mean256": 0.6421615420530065, "Sm": 0.922820523731064, "Em": 0.8521575363220236,
    "wFm": 0.6429672726650634, "MAE": 0.03930957599688506,
}
HD_WFM_BEFORE_WORKERS = [0.6159536122232963, 0.6267742945026334, 0.6646252840538731, 0.6645158998804506]


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_reproduce_the_single_process_numbers(workers):
    seen = []
    with SegMetrics(threshold=0.5, workers=workers) as acc:
        for s in range(4):
            acc.submit(*_hd_case(s), name=f"hd{s}", on_row=lambda row: seen.append(row["name"]))
    assert seen == [f"hd{s}" for s in range(4)]  # callbacks in submission order
    assert [r["name"] for r in acc.rows] == seen and acc.rows[0]["gt_pixels"] == 21746
    summary = acc.summary()
    assert summary["n"] == 4
    for key, value in HD_SUMMARY_BEFORE_WORKERS.items():
        assert summary[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert [r["wFm"] for r in acc.rows] == pytest.approx(HD_WFM_BEFORE_WORKERS, rel=1e-12)


def test_workers_report_bad_input_at_submit():
    mask = _blob_mask()
    acc = SegMetrics(workers=2)
    with pytest.raises(ValueError, match="same size"):
        acc.submit(np.zeros((10, 10)), mask)
    acc.close()
    acc.close()  # twice is fine
    with pytest.raises(ValueError, match="workers"):
        SegMetrics(workers=0)
