"""Metrics: known values, empty-mask conventions, the toolbox mean-over-256-thresholds variant, and
Sm / Em / wFm / MAE against values worked by hand on tiny maps and against an independent oracle
written out here from the definitions (the MATLAB toolbox's S-measure, E-measure and WFb.m, pixel
by pixel). kdas_core.evaluation.metrics computes those four with pysodmetrics, so pysodmetrics on the other
side would compare the library with itself."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt
from scipy.signal import convolve2d

from kdas_core.evaluation.metrics import (
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


def _oracle_sm(pred, gt, alpha=0.5):
    """S-measure (Fan et al., ICCV 2017) as the toolbox's StructureMeasure.m: alpha * object +
    (1 - alpha) * region, the region split at the foreground centroid (rounded, +1 as MATLAB)."""
    eps = np.finfo(np.float64).eps
    y = gt.mean()
    if y == 0:
        return 1 - pred.mean()
    if y == 1:
        return pred.mean()

    def s_object(x):
        std = x.std(ddof=1) if x.size > 1 else 0.0
        return 2 * x.mean() / (x.mean() ** 2 + 1 + std + eps)

    obj = y * s_object(pred[gt]) + (1 - y) * s_object(1 - pred[~gt])

    def ssim(x, g):
        n = x.size
        mx, my = x.mean(), g.mean()
        sx, sy = ((x - mx) ** 2).sum() / (n - 1 + eps), ((g - my) ** 2).sum() / (n - 1 + eps)
        sxy = ((x - mx) * (g - my)).sum() / (n - 1 + eps)
        a, b = 4 * mx * my * sxy, (mx ** 2 + my ** 2) * (sx + sy)
        return a / (b + eps) if a != 0 else (1.0 if b == 0 else 0.0)

    h, w = gt.shape
    ys, xs = np.nonzero(gt)
    cy, cx = int(np.round(ys.mean())) + 1, int(np.round(xs.mean())) + 1
    region = sum(ssim(pred[r0:r1, c0:c1], gt[r0:r1, c0:c1].astype(np.float64)) * (r1 - r0) * (c1 - c0) / (h * w)
                 for r0, r1 in ((0, cy), (cy, h)) for c0, c1 in ((0, cx), (cx, w)) if r1 > r0 and c1 > c0)
    return max(0.0, alpha * obj + (1 - alpha) * region)


def _oracle_em(pred, gt):
    """Mean E-measure (Fan et al., IJCAI 2018) over the 256 thresholds t/255, t = 0..255, of the
    map binarised as pred >= t/255: the enhanced-alignment matrix pixel by pixel, summed over
    N - 1 (the toolbox's Emeasure.m)."""
    eps = np.finfo(np.float64).eps
    g = gt.astype(np.float64)
    scores = []
    for t in range(256):
        fm = (pred * 255 >= t).astype(np.float64)
        if g.sum() == 0:
            enhanced = 1 - fm
        elif g.sum() == g.size:
            enhanced = fm
        else:
            a, b = fm - fm.mean(), g - g.mean()
            enhanced = (2 * a * b / (a * a + b * b + eps) + 1) ** 2 / 4
        scores.append(enhanced.sum() / (g.size - 1 + eps))
    return float(np.mean(scores))


def _oracle_wfm(pred, gt, beta=1.0):
    """Weighted F-measure (Margolin et al., CVPR 2014) line by line from its WFb.m."""
    eps = np.finfo(np.float64).eps
    if not gt.any():
        return 0.0
    dst, idx = distance_transform_edt(~gt, return_indices=True)  # [Dst, IDXT] = bwdist(GT)
    e = np.abs(pred - gt)
    et = e.copy()
    et[~gt] = e[idx[0][~gt], idx[1][~gt]]  # Et(~GT) = Et(IDXT(~GT))
    yy, xx = np.mgrid[-3:4, -3:4]
    k = np.exp(-(xx * xx + yy * yy) / (2 * 5.0 ** 2))  # fspecial('gaussian', 7, 5)
    ea = convolve2d(et, k / k.sum(), mode="same", boundary="fill")  # imfilter: zero padding
    min_e_ea = np.where(gt & (ea < e), ea, e)
    b = np.where(gt, 1.0, 2 - np.exp(np.log(0.5) / 5 * dst))
    ew = min_e_ea * b
    tpw, fpw = gt.sum() - ew[gt].sum(), ew[~gt].sum()
    r, p = 1 - ew[gt].mean(), tpw / (eps + tpw + fpw)
    return (1 + beta ** 2) * r * p / (eps + r + beta ** 2 * p)


def _oracle(prob, mask):
    """Sm, Em, wFm, MAE of a float map in [0, 1] by the oracle above."""
    gt = mask.astype(bool)
    return {"Sm": _oracle_sm(prob, gt), "Em": _oracle_em(prob, gt), "wFm": _oracle_wfm(prob, gt),
            "MAE": float(np.abs(prob - gt).mean())}


def _toolbox_input(u8):
    """What the toolbox scores for an 8-bit map: im2double, then mapminmax unless constant."""
    p = u8 / 255.0
    return (p - p.min()) / (p.max() - p.min()) if p.max() > p.min() else p


# One-row maps put the foreground centroid on the last row, so two of Sm's four regions are empty
# and Sm is NaN (the toolbox's StructureMeasure.m does the same); only Em, wFm, MAE are read there.
@pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:invalid value encountered")
def test_structure_measures_match_values_worked_by_hand():
    # Sm, 2x2, GT = [[1, 0], [0, 0]], pred = [[0.5, 0], [0, 0]]:
    #   object: fg 0.25 * 2*0.5/(0.25 + 1 + 0) = 0.2; bg 0.75 * 2*1/(1 + 1 + 0) = 0.75 -> 0.95
    #   region: centroid (0, 0) -> split after row 1, column 1: four single pixels, SSIM 1 each -> 1
    #   Sm = 0.5 * 0.95 + 0.5 * 1 = 0.975
    sm = image_metrics(np.array([[0.5, 0], [0, 0]]), np.array([[1, 0], [0, 0]], np.uint8))
    assert sm["Sm"] == pytest.approx(0.975, abs=1e-12)
    # Em, 1x4, GT = [1, 0, 0, 0], pred = [1, 0.5, 0, 0], over N - 1 = 3:
    #   t = 0: FM all 1, phi_FM = 0, every pixel (0 + 1)^2/4 -> 1/3
    #   t = 1..127 (0.5 * 255 = 127.5): FM = [1, 1, 0, 0], phi_FM = +-0.5, phi_GT = [.75, -.25, -.25, -.25]
    #     xi = [.75/.8125, -.8, .8, .8] -> (1 + xi)^2/4 = [0.924556, 0.01, 0.81, 0.81] -> 2.554556/3 = 0.851519
    #   t = 128..255: FM = GT, xi = 1 -> 4/3
    #   Em = (1/3 + 127 * 0.8515187 + 128 * 4/3) / 256 = 1.0904019;  MAE = 0.5 / 4 = 0.125
    em = image_metrics(np.array([[1, 0.5, 0, 0]]), np.array([[1, 0, 0, 0]], np.uint8))
    assert em["Em"] == pytest.approx(1.0904018738, abs=1e-9) and em["MAE"] == 0.125
    # wFm, 1x5, GT = [1, 0, 0, 0, 0], pred = [1, 0, 0, 0.5, 0]: no error on GT, so R = 1 and the
    #   Gaussian-smoothed term does not enter; the false positive 0.5 sits 3 pixels from GT:
    #   B = 2 - 0.5^(3/5) = 1.340246, FPw = 0.5 * B = 0.670123, TPw = 1, P = 1/1.670123 = 0.598758,
    #   wFm = 2 R P / (R + P) = 0.749029
    wfm = image_metrics(np.array([[1, 0, 0, 0.5, 0]]), np.array([[1, 0, 0, 0, 0]], np.uint8))
    assert wfm["wFm"] == pytest.approx(0.7490291583, abs=1e-9)
    # the oracle used below gives the same numbers
    assert _oracle_sm(np.array([[0.5, 0], [0, 0]]), np.array([[1, 0], [0, 0]], bool)) == pytest.approx(0.975, abs=1e-12)
    assert _oracle_em(np.array([[1, 0.5, 0, 0]]), np.array([[1, 0, 0, 0]], bool)) == pytest.approx(1.0904018738, abs=1e-9)
    assert _oracle_wfm(np.array([[1, 0, 0, 0.5, 0]]), np.array([[1, 0, 0, 0, 0]], bool)) == pytest.approx(0.7490291583,
                                                                                                          abs=1e-9)


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
def test_agrees_with_the_oracle_on_uint8_maps(seed):
    rng = np.random.default_rng(seed)
    mask = _blob_mask(cx=50 + 10 * seed, rx=20 + 5 * seed)
    u8 = _realish_prob(mask, rng, shift=(seed * 3, 2 - seed))
    ours = image_metrics(u8 / 255.0, mask)
    ref = _oracle(_toolbox_input(u8), mask)
    for key in ("Sm", "Em", "wFm", "MAE"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-9), key


def test_minmax_mode_reproduces_toolbox_normalisation():
    """A map that does not span [0, 1]: raw scores differ, --minmax scores equal the toolbox's."""
    rng = np.random.default_rng(5)
    mask = _blob_mask()
    u8 = np.clip(_realish_prob(mask, rng).astype(np.int32) // 2 + 40, 0, 255).astype(np.uint8)  # 40..167
    assert (u8.min(), u8.max()) == (40, 167)
    ref = _oracle((u8 - 40) / 127.0, mask)  # mapminmax by hand: (x - 40) / (167 - 40)
    stretched = image_metrics(u8 / 255.0, mask, minmax=True)
    raw = image_metrics(u8 / 255.0, mask)
    for key in ("Sm", "Em", "wFm", "MAE"):
        assert stretched[key] == pytest.approx(ref[key], abs=1e-9), key
    assert abs(raw["MAE"] - ref["MAE"]) > 0.01


def test_accumulator_summary_is_the_mean_of_the_oracle_over_images():
    rng = np.random.default_rng(1)
    acc = SegMetrics(threshold=0.5)
    refs = []
    shapes = [(90, 120), (64, 48), (100, 100)]
    for i, (h, w) in enumerate(shapes):
        mask = _blob_mask(h, w, w // 2, h // 2, w // 4, h // 5)
        u8 = _realish_prob(mask, rng)
        row = acc.update(u8 / 255.0, mask, name=f"img{i}")
        assert row["name"] == f"img{i}" and (row["height"], row["width"]) == (h, w)
        refs.append(_oracle(u8 / 255.0, mask))
    s = acc.summary()
    assert set(s) == SUMMARY and s["n"] == 3 and len(acc.rows) == 3
    for key in ("Sm", "Em", "wFm", "MAE"):
        assert s[key] == pytest.approx(np.mean([r[key] for r in refs]), abs=1e-9), key
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
    ref = _oracle(_toolbox_input(u8), mask)
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
