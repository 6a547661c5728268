"""Temporal filter, flicker figures, polyp cue, per-frame CSV and compare mode."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from app import DEFAULT_WEIGHTS, DEMO_CLIP
from app.errors import AppError
from app.headless import run_headless
from app.pipeline.analysis import Analyzer, AnalysisSettings
from app.pipeline.cue import Cue, CueSpec, draw_cue_border
from app.pipeline.frames_csv import COLUMNS, FramesCsv
from app.pipeline.items import Frame
from app.pipeline.temporal import FlickerMeter, SmoothSpec, TemporalFilter
from app.testing import make_checkpoint, make_clip

from .conftest import shared_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("analysis")
    return {
        "clip": make_clip(d / "clip.mp4", frames=24, size=160),
        "long": make_clip(d / "long.mp4", frames=150, size=160, seed=1),
        "ckpt": make_checkpoint(d / "tiny.safetensors", input_size=128),
        "ckpt96": make_checkpoint(d / "tiny96.safetensors", input_size=96),
    }


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# -- the filter -------------------------------------------------------------------------------

def test_smooth_spec_parses_defaults_keys_and_rejects_nonsense():
    assert SmoothSpec.parse(None) == SmoothSpec.parse("default") == SmoothSpec()
    s = SmoothSpec.parse("hyst=0.2,hold=0,ema=0.5")
    assert (s.hyst, s.hold, s.ema, s.cut) == (0.2, 0, 0.5, SmoothSpec().cut)
    for bad, word in [("speed=3", "key=value"), ("hyst=abc", "not a number"), ("ema=0", "ema"), ("hyst=0.9", "hyst")]:
        with pytest.raises(ValueError, match=word):
            SmoothSpec.parse(bad)


def blob(on: bool, size=64, r=12, value=0.9) -> np.ndarray:
    p = np.full((size, size), 0.02, np.float32)
    if on:
        yy, xx = np.mgrid[:size, :size]
        p[(yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= r * r] = value
    return p


def test_hold_bridges_a_short_dropout_but_not_a_long_one_nor_a_cut():
    f = TemporalFilter(SmoothSpec(hyst=0.0, hold=2), min_area_frac=0.001)
    shown = [(f.apply(blob(on), 0.5, cut=False) >= 0.5).any() for on in [1, 1, 0, 0, 0, 1]]
    assert shown == [True, True, True, True, False, True]  # two frames held, the third lets go
    f.apply(blob(True), 0.5, cut=False)
    assert not (f.apply(blob(False), 0.5, cut=True) >= 0.5).any()  # a new scene: nothing carried over


def test_hysteresis_keeps_a_mask_that_dips_just_below_the_threshold():
    f = TemporalFilter(SmoothSpec(hyst=0.1, hold=0), min_area_frac=0.001)
    f.apply(blob(True, value=0.9), 0.5, cut=False)
    dip = blob(True, value=0.45)  # below 0.5, above 0.5 - 0.1
    assert (f.apply(dip, 0.5, cut=False) >= 0.5).sum() == (dip >= 0.45).sum()
    raw = TemporalFilter(SmoothSpec(hyst=0.0, hold=0), min_area_frac=0.001)
    raw.apply(blob(True), 0.5, cut=False)
    assert not (raw.apply(dip, 0.5, cut=False) >= 0.5).any()


def test_ema_averages_the_raw_probabilities():
    f = TemporalFilter(SmoothSpec(hyst=0.2, hold=0, ema=0.5), min_area_frac=0.001)
    f.apply(blob(True, value=1.0), 0.5, cut=False)
    out = f.apply(blob(True, value=0.2), 0.5, cut=False)
    assert out.max() == pytest.approx(0.6 + 0.2)  # average 0.6, plus the hysteresis bump where the mask was
    out = f.apply(blob(True, value=0.2), 0.5, cut=False)
    assert out.max() == pytest.approx(0.4 + 0.2)  # the bump of the last frame did not enter the average


def test_flicker_meter_counts_toggles_and_consecutive_dice_within_sequences():
    m = FlickerMeter()
    a, b = blob(True) >= 0.5, np.zeros((64, 64), bool)
    for mask, cut in [(a, True), (a, False), (b, False), (a, False), (a, True)]:
        m.update(mask.astype(np.uint8) * 255, bool(mask.any()), cut)
    s = m.summary()
    assert s["mask_toggles"] == 2 and s["cuts"] == 2
    assert s["consecutive_pairs"] == 3  # the pair across the second cut is not compared
    assert s["consecutive_dice_mean"] == pytest.approx((1 + 0 + 0) / 3, abs=1e-4)


# -- the cue ----------------------------------------------------------------------------------

def test_cue_hysteresis_on_after_n_off_after_m_and_episode_counts():
    cue = Cue(CueSpec(on_after=3, off_after=3))
    pattern = [1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1]
    states = [cue.update(bool(p), 1.0 if p else 0.0) for p in pattern]
    assert states[:3] == [False, False, True]  # on at the third frame
    assert all(states[3:12])  # one- and two-frame gaps do not blink it
    assert states[12] is False  # off after the third empty frame
    assert states[-1] is True
    s = cue.summary()
    assert s["episodes"] == 2 and s["episodes_without_hysteresis"] == 4
    assert s["frames_with_polyp"] == sum(pattern)


def test_cue_border_frames_the_image_and_leaves_the_inside():
    img = np.zeros((120, 160, 3), np.uint8)
    draw_cue_border(img)
    assert tuple(img[0, 80]) == tuple(img[60, 0]) == tuple(img[119, 159]) == (255, 176, 0)
    assert not img[10:110, 10:150].any()


def test_analyzer_refresh_frames_do_not_advance_counts():
    an = Analyzer(AnalysisSettings(smooth=SmoothSpec()))
    img = np.zeros((64, 64, 3), np.uint8)
    for i in range(4):
        f = Frame(index=i, pts=None, image=img, t_capture=0.0, probs=blob(True), refresh=i == 3)
        p = an.filter(f, 0.5)
        f.mask = ((p >= 0.5) * 255).astype(np.uint8)
        a = an.observe(f)
    assert an.cue.frames == 3 and a.cue_on and a.bbox is not None and a.area_pct > 5


# -- per-frame CSV ----------------------------------------------------------------------------

def test_frames_csv_rows_and_bad_path(tmp_path):
    path = tmp_path / "f.csv"
    rows = FramesCsv(str(path))
    img = np.zeros((8, 8, 3), np.uint8)
    rows(Frame(index=0, pts=0.0, image=img, t_capture=time.perf_counter(), infer_ms=3.0), "shown")
    rows(Frame(index=1, pts=0.04, image=img, t_capture=0.0), "dropped", "model_busy")
    rows(Frame(index=2, pts=0.08, image=img, t_capture=0.0), "stale")
    rows(Frame(index=3, pts=0.12, image=img, t_capture=0.0, refresh=True), "shown")  # not a row
    assert len(path.read_text().splitlines()) == 4  # flushed before close
    rows.close()
    data = list(csv.DictReader(path.open()))
    assert [r["dropped"] for r in data] == ["0", "1", "0"] and data[0]["inference_ms"] == "3.0"
    assert [(r["outcome"], r["drop_reason"]) for r in data] == [("shown", ""), ("dropped", "model_busy"), ("stale", "")]
    assert data[2]["inference_ms"] == ""  # a stale frame has no results
    (tmp_path / "file").write_text("")
    with pytest.raises(AppError, match="--frames-csv"):
        FramesCsv(str(tmp_path / "file" / "f.csv"))


# -- headless end to end ----------------------------------------------------------------------

def test_headless_smooth_cue_and_csv_fields(assets, tmp_path):
    csv_path = tmp_path / "frames.csv"
    res = run_headless(assets["clip"], str(tmp_path / "o.mp4"), model_path=assets["ckpt"], backend="torch", threads=1,
                       threshold=0.0, progress=False, log=lambda s: None, frames_csv=str(csv_path),
                       analysis=AnalysisSettings(smooth=SmoothSpec(), cue=CueSpec(on_after=2, off_after=2)))
    assert res.exit_code == 0
    s = res.stats
    assert s["temporal"]["smooth"] == SmoothSpec().describe()
    assert s["temporal"]["mask_toggles"] == 0  # threshold 0: the mask is the whole frame, always
    assert s["cue"]["frames_with_polyp"] == 24 and s["cue"]["episodes"] == 1 and s["cue"]["frames_cue_on"] == 23
    assert s["cue"]["mask_area_pct_mean"] == pytest.approx(100.0)
    assert s["frames_csv"]["rows"] == 24
    data = list(csv.DictReader(csv_path.open()))
    assert list(data[0]) == list(COLUMNS) and [int(r["index"]) for r in data] == list(range(24))
    assert data[0]["cue_on"] == "0" and data[1]["cue_on"] == "1"
    assert (data[5]["bbox_w"], data[5]["bbox_h"]) == ("160", "160") and float(data[5]["latency_ms"]) > 0


def test_compare_mode_on_the_demo_clip(assets, tmp_path):
    """Two models of different input sizes on the same frames: each has its latency, the
    agreement is in the stats and in the CSV, and model B's magenta outline is in the video."""
    if not (DEMO_CLIP.is_file() and DEFAULT_WEIGHTS.is_file()):
        pytest.skip("bundled demo clip / weights missing")
    out, csv_path = tmp_path / "cmp.mp4", tmp_path / "cmp.csv"
    frames = []
    res = run_headless(str(DEMO_CLIP), str(out), model_path=str(DEFAULT_WEIGHTS), backend="torch", threads=1,
                       max_frames=12, progress=False, log=lambda s: None, compare_path=assets["ckpt96"],
                       frames_csv=str(csv_path), on_frame=frames.append)
    assert res.exit_code == 0, res.stats.get("error")
    c = res.stats["compare"]
    assert c["model"].endswith("tiny96.safetensors") and c["backend"] == "torch" and c["input_size"] == [96, 96]
    assert c["frames"] == 12 and c["inference_ms_p50"] > 0
    assert 0.0 <= c["agreement"]["dice_mean"] <= 1.0 and c["agreement"]["frames"] == 12
    assert all(f.probs_b is not None and f.probs_b.shape == (96, 96) and f.mask_b is not None for f in frames)
    rows = list(csv.DictReader(csv_path.open()))
    assert all(r["inference_b_ms"] and r["agreement_dice"] for r in rows)
    assert c["agreement"]["dice_mean"] == pytest.approx(np.mean([float(r["agreement_dice"]) for r in rows]), abs=1e-3)
    # where B has a mask and A does not, B's outline is magenta
    f = next((f for f in frames if f.mask_b.any()), None)
    assert f is not None, "model B masked nothing in 12 frames: the outline check below cannot run"
    ys, xs = np.nonzero(f.mask_b)
    px = f.overlay[ys, xs]
    assert ((px[:, 0] == 255) & (px[:, 1] == 0) & (px[:, 2] == 255)).any()


def test_cli_flag_errors(assets, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "app", assets["clip"], "--headless", "--out", str(tmp_path / "o.mp4"),
                        "--smooth", "hold=x"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--smooth" in r.stderr and "hold" in r.stderr
    from app import cli

    code = cli.main([assets["clip"], "--headless", "--out", str(tmp_path / "o.mp4"), "--weights", assets["ckpt"],
                     "--compare-weights", str(tmp_path / "nope.onnx")])
    assert code == 2 and not (tmp_path / "o.mp4").exists()  # bad input: the same code as engines.build


def test_frames_csv_is_complete_after_sigint(assets, tmp_path):
    out, csv_path, stats = tmp_path / "o.mp4", tmp_path / "f.csv", tmp_path / "s.json"
    proc = subprocess.Popen([sys.executable, "-m", "app", assets["long"], "--headless", "--out", str(out),
                             "--weights", assets["ckpt"], "--backend", "torch", "--threads", "1", "--loop", "20",
                             "--frames-csv", str(csv_path), "--stats", str(stats)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None and (
                not csv_path.exists() or len(csv_path.read_text().splitlines()) < 6):
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    text = csv_path.read_text()
    assert text.endswith("\n")
    rows = list(csv.DictReader(text.splitlines()))
    s = json.loads(stats.read_text())
    assert len(rows) == s["frames_out"] == s["frames_csv"]["rows"] > 0
    assert all(len(r) == len(COLUMNS) and r["latency_ms"] for r in rows)
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))


# -- the real clip ----------------------------------------------------------------------------

@pytest.mark.realdata
def test_real_clip_filter_cuts_toggles_and_cue_episodes_are_threshold_stable(tmp_path):
    from app.eval_clip import evaluate

    clip = shared_data("clips", "cvc-clinicdb.mp4")
    gt = shared_data("polyp")
    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip("bundled weights missing")
    # 300 frames: enough that the shipped student's few one-frame dropouts occur at every threshold
    res = evaluate(str(clip), str(gt), str(DEFAULT_WEIGHTS), backend="torch", threads=1, max_frames=300,
                   thresholds=[0.45, 0.5, 0.55])
    rows = {(r["filter"], r["threshold"]): r for r in res["rows"]}
    spec = SmoothSpec().describe()
    for t in (0.45, 0.5, 0.55):
        off, on = rows[("off", t)], rows[(spec, t)]
        # the student does flicker on these frames...
        assert off["mask_toggles"] >= 2, f"the student no longer flickers at {t} on these frames: nothing to filter"
        assert on["mask_toggles"] <= off["mask_toggles"] / 2  # ...and the filter halves it at least
        assert on["dice_mean"] >= off["dice_mean"] - 0.005  # without costing Dice vs the ground truth
    # cue episodes with hysteresis do not move with the threshold; without hysteresis they would count flicker
    assert len({rows[(f, t)]["cue_episodes"] for f in ("off", spec) for t in (0.45, 0.5, 0.55)}) == 1
    assert rows[("off", 0.5)]["episodes_without_hysteresis"] > rows[("off", 0.5)]["cue_episodes"]


def test_eval_clip_pairs_frames_with_numeric_masks_and_says_when_they_do_not(assets, tmp_path):
    import cv2

    from app.eval_clip import evaluate, main

    masks = tmp_path / "masks"
    masks.mkdir()
    for stem in (3, 10, 7):  # numeric order, not text order: 3, 7, 10
        cv2.imwrite(str(masks / f"{stem}.png"), np.full((160, 160), 255 if stem == 7 else 0, np.uint8))
    res = evaluate(assets["clip"], str(masks), assets["ckpt"], backend="torch", threads=1, max_frames=3,
                   thresholds=[0.0])  # threshold 0: the prediction is the whole frame
    dice = {r["filter"]: r["dice_mean"] for r in res["rows"]}
    assert res["frames"] == 3 and dice["off"] == pytest.approx(1 / 3, abs=1e-3)  # only 7.png (frame 1) is full
    with pytest.raises(AppError, match="more frames than --gt"):
        evaluate(assets["clip"], str(masks), assets["ckpt"], backend="torch", threads=1)
    assert main([assets["clip"], "--gt", str(tmp_path / "none"), "--weights", assets["ckpt"]]) == 2
