"""HD fast paths against today's full-resolution RGB path (frame_to_rgb -> resize_for_model ->
probs_to_mask at frame size -> draw_overlay -> RGB->I420 in the recorder).

Tolerances (stated here, measured on Kvasir-SEG HD frames when ../shared is there, otherwise on
synthetic 1280x720 frames):
- model input: mean |difference| <= 1 grey level, 99th percentile <= 8 (the fast path filters
  better: it is closer to an exact area shrink than today's is);
- the student's mask on those inputs: as close to today's as today's is to itself with +-1
  grey level of noise on its input (mean IoU over the frames, within 0.01), and >= 0.9;
- frame-resolution mask from the same probabilities: the same mask (the crop is resized on
  the same sampling grid); floating-point ties may flip a few pixels, so <= 0.1 % of the
  mask's pixels may differ, all on its boundary (within 1 pixel of today's outline);
- headless overlay (drawn into the 4:2:0 picture) against today's RGB overlay: identical
  beyond the overlay's reach, mean <= 1 grey level, >= 99 % of pixels within 3 levels; larger
  differences only on the outline (chroma is per 2x2 block there) or at saturated pixels
  (today blends the clipped RGB, the fast path blends before clipping). Today's recorder
  also pays a lossy RGB -> 4:2:0 round trip that the fast path does not;
- window overlay (display size) against today's full-size overlay shrunk to display size:
  away from the outline mean <= 1 grey level, >= 99 % of pixels within 8 levels (the picture
  is shrunk 2x2-box then bilinear, not by an exact area filter: fine texture differs); the outline
  is drawn at display size, crisp, where today's was a shrunk 5-pixel line.
"""

from __future__ import annotations

import av
import cv2
import numpy as np
import pytest

from app.bench_overhead import StandInBackend, make_real_clip, make_sized_clip, stage_breakdown
from app.errors import AppError
from app.pipeline.items import Frame
from app.pipeline.overlay import draw_overlay, draw_overlay_i420
from app.pipeline.postprocess import probs_to_mask, probs_to_mask_roi
from app.pipeline.preprocess import fit_size, prepare, reduced_rgb, reduction_factor, resize, resize_for_model
from app.pipeline.recorder import Recorder
from app.pipeline.source import VideoFileReader, frame_to_rgb, new_frame

from .conftest import SHARED_DATA, write_pair_folder


def _decoded(path, every: int = 1, limit: int = 6) -> list:
    with av.open(str(path)) as c:
        out = []
        for i, f in enumerate(c.decode(video=0)):
            if i % every == 0:
                out.append(f)
            if len(out) >= limit:
                break
    return out


@pytest.fixture(scope="module")
def hd_frames(tmp_path_factory):
    """Real HD endoscopy frames (Kvasir-SEG's largest images, fitted into 1920x1080) when the
    team's data is there; synthetic 1280x720 frames otherwise."""
    d = tmp_path_factory.mktemp("hd")
    train = SHARED_DATA / "polyp" / "TrainDataset"
    if train.exists():
        path = make_real_clip(str(d / "hd.mp4"), str(train), 1920, 1080, frames=6, fps=25, hold_s=0.04)
    else:
        path = make_sized_clip(str(d / "hd.mp4"), 1280, 720, frames=6, fps=25)
    return _decoded(path)


def _blob_probs(size: int = 352, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = cv2.resize(rng.standard_normal((10, 10)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    return 1.0 / (1.0 + np.exp(-(3.0 * g - 2.0)))


def _on_boundary(diff: np.ndarray, ref_mask: np.ndarray) -> bool:
    k = np.ones((3, 3), np.uint8)
    band = cv2.dilate(ref_mask, k) != cv2.erode(ref_mask, k)
    return bool(band[diff].all())


# ---------------------------------------------------------------- sizes and reductions

def test_fit_size_keeps_aspect_and_never_enlarges():
    assert fit_size((1080, 1920), (948, 600)) == (533, 948)
    assert fit_size((1080, 1920), (3840, 2160)) == (1080, 1920)
    assert fit_size((160, 160), (948, 600)) == (160, 160)
    assert fit_size((1080, 1920), None) == (1080, 1920)


def test_reduction_factor_stays_above_what_is_needed():
    assert reduction_factor((1080, 1920), (384, 384)) == 2  # 1.5 x a 256 model
    assert reduction_factor((1080, 1920), (528, 528)) == 2  # 1.5 x a 352 model
    assert reduction_factor((1080, 1920), (533, 948)) == 2  # a 948x533 widget
    assert reduction_factor((2160, 3840), (533, 948)) == 4
    assert reduction_factor((1080, 1920), (1080, 1920)) == 1  # full-screen window: full size
    assert reduction_factor((1082, 1920), (384, 384)) == 1  # 541 rows: not an even 4:2:0 picture


def test_model_input_does_not_depend_on_the_window_size(hd_frames):
    f = hd_frames[0]
    alone = _fast_frame(f, (256, 256)).model_input
    for box in ((948, 533), (1920, 1080), (400, 300)):
        frame = _fast_frame(f, (256, 256), box)
        assert np.array_equal(frame.model_input, alone)
        assert frame.view.shape[:2] == fit_size((f.height, f.width), box)


def test_resize_takes_fast_filters_and_matches_area_shrink(hd_frames):
    rgb = frame_to_rgb(hd_frames[0])
    h, w = rgb.shape[:2]
    half = resize(rgb, (h // 2, w // 2))
    assert np.array_equal(half, cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA))
    small = resize(rgb, (252, 448))
    exact = cv2.resize(rgb, (448, 252), interpolation=cv2.INTER_AREA)
    assert small.shape == (252, 448, 3) and np.abs(small.astype(int) - exact).mean() < 1.0


def test_reduced_rgb_is_the_full_conversion_shrunk(hd_frames):
    for f in hd_frames[:3]:
        for factor in (2, 4):
            fast = reduced_rgb(f, factor)
            ref = cv2.resize(frame_to_rgb(f), (f.width // factor, f.height // factor), interpolation=cv2.INTER_AREA)
            assert fast.shape == ref.shape
            d = np.abs(fast.astype(int) - ref.astype(int))
            assert d.mean() < 0.5 and np.percentile(d, 99.9) <= 8, (factor, d.mean())


# ---------------------------------------------------------------- model input and masks

def _today_model_input(decoded, size_hw):
    return resize_for_model(frame_to_rgb(decoded), size_hw)


def _fast_frame(decoded, size_hw, view_box=None) -> Frame:
    frame = new_frame(decoded, 0, 0.0)
    prepare(frame, size_hw, view_box)
    return frame


@pytest.mark.parametrize("size", [256, 352])
def test_model_input_within_a_grey_level_of_today(hd_frames, size):
    for f in hd_frames:
        fast = _fast_frame(f, (size, size), (948, 533)).model_input
        today = _today_model_input(f, (size, size))
        assert fast.shape == today.shape == (size, size, 3) and fast.dtype == np.uint8
        d = np.abs(fast.astype(int) - today.astype(int))
        assert d.mean() <= 1.0 and np.percentile(d, 99) <= 8, (d.mean(), np.percentile(d, 99))


def test_student_masks_match_todays_within_its_own_noise_sensitivity(hd_frames):
    """The bundled student on today's and the fast model input. The student is sensitive: +-1
    grey level of noise on today's input moves its mask by a few % IoU on these frames, so the
    fast path must stay within that (see the module docstring)."""
    from app import DEFAULT_WEIGHTS
    from engines import load_backend

    if not DEFAULT_WEIGHTS.exists():
        pytest.skip(f"no bundled student at {DEFAULT_WEIGHTS}")
    b = load_backend(str(DEFAULT_WEIGHTS), backend="torch", threads=1)
    rng = np.random.default_rng(0)

    def iou(a, c):
        return ((a > 0) & (c > 0)).sum() / max(1, ((a > 0) | (c > 0)).sum())

    fast_iou, noise_iou = [], []
    for f in hd_frames:
        today = _today_model_input(f, b.input_size)
        noisy = np.clip(today.astype(int) + rng.integers(-1, 2, today.shape), 0, 255).astype(np.uint8)
        fast = _fast_frame(f, b.input_size).model_input
        p_today, p_noisy, p_fast = (b.predict(x[None])[0] for x in (today, noisy, fast))
        m_today, m_noisy, m_fast = (probs_to_mask(p, (f.height, f.width), b.threshold) for p in (p_today, p_noisy, p_fast))
        fast_iou.append(iou(m_today, m_fast))
        noise_iou.append(iou(m_today, m_noisy))
    assert np.mean(fast_iou) >= 0.9
    assert np.mean(fast_iou) >= np.mean(noise_iou) - 0.01, (fast_iou, noise_iou)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("frame_hw", [(1080, 1920), (720, 1280), (1072, 1920), (1081, 1919)])
def test_mask_roi_is_todays_mask_but_for_boundary_pixels(threshold, frame_hw):
    for seed in range(3):
        probs = _blob_probs(352, seed)
        today = probs_to_mask(probs, frame_hw, threshold)
        roi = probs_to_mask_roi(probs, frame_hw, threshold)
        full = roi.full()
        assert full.shape == frame_hw and set(np.unique(full)) <= {0, 255}
        diff = full != today
        assert diff.sum() <= max(4, 0.001 * (today > 0).sum()), diff.sum()
        assert _on_boundary(diff, today)
        assert roi.mask.size <= today.size  # never more than the frame, usually a box


def test_mask_roi_edge_cases():
    empty = probs_to_mask_roi(np.zeros((64, 64), np.float32), (720, 1280), 0.5)
    assert empty.mask.size == 0 and not empty.full().any()
    everything = probs_to_mask_roi(np.zeros((64, 64), np.float32), (720, 1280), 0.0)
    assert everything.full().min() == 255
    same_size = probs_to_mask_roi(_blob_probs(64), (64, 64), 0.5)
    assert np.array_equal(same_size.full(), probs_to_mask(_blob_probs(64), (64, 64), 0.5))


# ---------------------------------------------------------------- overlays

@pytest.mark.parametrize("opacity,contour", [(0.4, True), (0.8, False), (0.0, True)])
def test_i420_overlay_matches_todays_rgb_overlay(hd_frames, opacity, contour):
    k3 = np.ones((3, 3), np.uint8)
    for i, f in enumerate(hd_frames[:3]):
        probs = _blob_probs(352, i)
        out = draw_overlay_i420(f, probs_to_mask_roi(probs, (f.height, f.width), 0.5), opacity, contour)
        assert isinstance(out, av.VideoFrame) and out.format.name == "yuv420p" and (out.width, out.height) == (f.width, f.height)
        fast = frame_to_rgb(out)
        rgb = frame_to_rgb(f)
        ref_mask = probs_to_mask(probs, rgb.shape[:2], 0.5)
        today = draw_overlay(rgb, ref_mask, opacity, contour)
        d = np.abs(fast.astype(int) - today.astype(int)).max(axis=2)
        assert d.mean() <= 1.0 and (d <= 3).mean() >= 0.99, (d.mean(), (d <= 3).mean())
        t = max(1, round(min(f.height, f.width) / 200))
        reach = np.ones((2 * t + 3, 2 * t + 3), np.uint8)
        assert d[cv2.dilate(ref_mask, reach) == 0].max() == 0  # beyond the overlay: the decoded picture itself
        outline = cv2.dilate(ref_mask, reach) != cv2.erode(ref_mask, reach)
        clipped = cv2.dilate(((rgb == 0) | (rgb == 255)).any(axis=2).astype(np.uint8), k3) > 0
        assert (outline | clipped)[d > 3].all()  # larger differences: outline, or saturated pixels
    # the decoded picture itself is never drawn on (the decoder may still reference it)
    before = frame_to_rgb(hd_frames[0])
    draw_overlay_i420(hd_frames[0], probs_to_mask_roi(_blob_probs(352), (hd_frames[0].height, hd_frames[0].width), 0.5), 1.0, True)
    assert np.array_equal(frame_to_rgb(hd_frames[0]), before)


def test_i420_overlay_without_mask_is_the_decoded_frame(hd_frames):
    f = hd_frames[0]
    nothing = probs_to_mask_roi(np.zeros((352, 352), np.float32), (f.height, f.width), 0.5)
    assert draw_overlay_i420(f, nothing, 0.4, True) is f


def test_window_overlay_at_display_size_matches_todays_shrunk(hd_frames):
    for i, f in enumerate(hd_frames[:3]):
        probs = _blob_probs(352, i)
        frame = _fast_frame(f, (352, 352), (948, 533))
        vh, vw = frame.view.shape[:2]
        assert (vh, vw) == fit_size((f.height, f.width), (948, 533))
        fast = draw_overlay(frame.view, probs_to_mask(probs, (vh, vw), 0.5), 0.4, True)
        rgb = frame_to_rgb(f)
        today = cv2.resize(draw_overlay(rgb, probs_to_mask(probs, rgb.shape[:2], 0.5), 0.4, True), (vw, vh),
                           interpolation=cv2.INTER_AREA)
        d = np.abs(fast.astype(int) - today.astype(int)).max(axis=2)
        view_mask = probs_to_mask(probs, (vh, vw), 0.5)
        band = np.ones((9, 9), np.uint8)
        outline = cv2.dilate(view_mask, band) != cv2.erode(view_mask, band)
        assert d[~outline].mean() <= 1.0 and (d[~outline] <= 8).mean() >= 0.99, (d[~outline].mean(),)
        # the outline itself is drawn at display size: crisp, in the mask colour, where today's was shrunk
        assert (fast[outline] == (0, 255, 0)).all(axis=1).mean() > 0.25


# ---------------------------------------------------------------- frames, recorder, source

def test_frame_full_resolution_fields_are_made_on_demand(hd_frames):
    f = hd_frames[1]
    probs = _blob_probs(352)
    frame = new_frame(f, 3, 0.12)
    assert frame.decoded is f and frame.size == (f.height, f.width)
    assert np.array_equal(frame.image, frame_to_rgb(f))  # converted when read
    frame.probs, frame.threshold, frame.style = probs, 0.5, (0.4, True, (0, 255, 0))
    assert np.array_equal(frame.mask, probs_to_mask_roi(probs, frame.size, 0.5).full())
    out = frame.full_output()
    assert isinstance(out, av.VideoFrame) and frame.full_output() is out  # made once
    assert frame.overlay.shape == (f.height, f.width, 3)
    assert np.array_equal(frame.overlay, frame_to_rgb(out))  # the RGB overlay is what is recorded
    rgb = Frame(index=0, pts=None, image=np.full((48, 64, 3), 90, np.uint8), t_capture=0.0)  # a camera frame
    rgb.probs, rgb.threshold, rgb.style = probs, 0.5, (0.4, True, (0, 255, 0))
    assert rgb.size == (48, 64) and isinstance(rgb.full_output(), np.ndarray) and rgb.mask.shape == (48, 64)


def test_recorder_encodes_decoded_frames_as_they_are(hd_frames, tmp_path):
    path = tmp_path / "rec.mp4"
    f0 = hd_frames[0]
    r = Recorder(str(path), 25, f0.width, f0.height)
    for f in hd_frames:  # decoder output, tagged I/P/B: the recorder must not force those types
        r.write(f)
    r.write(frame_to_rgb(hd_frames[-1]))  # RGB frames still work in the same recording
    with pytest.raises(AppError, match="size changed"):
        r.write(av.VideoFrame(64, 64, "yuv420p"))
    r.close()
    got = _decoded(path, limit=100)
    assert len(got) == len(hd_frames) + 1
    for a, b in zip(got, hd_frames):
        assert np.abs(frame_to_rgb(a).astype(int) - frame_to_rgb(b).astype(int)).mean() < 3


def test_file_reader_hands_plain_420_frames_over_unconverted(tmp_path):
    clip = make_sized_clip(str(tmp_path / "c.mp4"), 320, 180, frames=5, fps=25)
    r = VideoFileReader(clip)
    item, pts = r.read_decoded()
    assert isinstance(item, av.VideoFrame) and item.format.name == "yuv420p" and pts == pytest.approx(0.0)
    rgb, _ = r.read()  # read() still gives RGB
    assert isinstance(rgb, np.ndarray) and rgb.shape == (180, 320, 3)
    r.close()


# ---------------------------------------------------------------- end to end

def test_headless_hd_output_matches_todays_overlay(tmp_path):
    """Headless on a small HD-shaped clip with the stand-in model: every frame comes out, and
    each is today's overlay of the decoded input (up to x264's own loss)."""
    from app.headless import run_headless

    clip = make_sized_clip(str(tmp_path / "in.mp4"), 640, 360, frames=12, fps=25)
    out = tmp_path / "out.mp4"
    backend = StandInBackend(352)
    from app.pipeline.analysis import AnalysisSettings
    from app.pipeline.cue import draw_cue_border

    for border in (False, True):  # the polyp cue's border: off = today's overlay; on = drawn on top
        res = run_headless(clip, str(out), model_path="stand-in", progress=False, log=lambda s: None,
                           backend_factory=lambda *a, **k: backend, analysis=AnalysisSettings(cue_border=border))
        assert res.exit_code == 0 and res.stats["frames_out"] == 12
        got = _decoded(out, limit=100)
        assert len(got) == 12 and (got[0].width, got[0].height) == (640, 360)
        cue_on = [False] * 2 + [True] * 10  # the stand-in always segments: the cue is on from the 3rd frame (on after 3)
        for a, b, on in zip(got, _decoded(clip, limit=100), cue_on):
            rgb = frame_to_rgb(b)
            want = draw_overlay(rgb, probs_to_mask(backend._probs, rgb.shape[:2], 0.5), 0.4, True)
            if border and on:
                draw_cue_border(want)
            assert np.abs(frame_to_rgb(a).astype(int) - want.astype(int)).mean() < 3


def test_stage_breakdown_reports_every_stage(tmp_path):
    clip = make_sized_clip(str(tmp_path / "c.mp4"), 320, 180, frames=6, fps=25)
    head = stage_breakdown(clip, "headless", 4)
    win = stage_breakdown(clip, "window", 4, view=(200, 120))
    assert head["frames"] == win["frames"] == 4
    assert list(head["stages_ms"]) == ["decode", "preprocess", "postprocess", "overlay", "encode"]
    assert list(win["stages_ms"]) == ["decode", "preprocess", "postprocess", "overlay", "display"]
    for s in (head, win):
        assert all(v >= 0 for v in s["stages_ms"].values()) and s["total_ms"] > 0
        assert set(s["stages_cpu_ms"]) == set(s["stages_ms"])
    assert win["view"] == "200x120"


def test_real_clip_maker_fits_images_and_names_bad_folders(tmp_path):
    data = write_pair_folder(tmp_path / "set", 3, size=48)
    clip = make_real_clip(str(tmp_path / "c.mp4"), str(data), 320, 180, frames=6, fps=25, hold_s=0.08)
    got = _decoded(clip, limit=100)
    assert len(got) == 6 and (got[0].width, got[0].height) == (320, 180)
    bars = frame_to_rgb(got[0])[:, :60]  # square images in a 16:9 frame: black bars at the sides
    assert bars.mean() < 20
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AppError, match="no images"):
        make_real_clip(str(tmp_path / "x.mp4"), str(empty), 320, 180, frames=2)
    with pytest.raises(AppError, match="not a folder"):
        make_real_clip(str(tmp_path / "x.mp4"), str(tmp_path / "missing"), 320, 180, frames=2)


# ---------------------------------------------------------------- window

def test_video_widget_reports_its_size_and_paints_display_frames_1to1(qtbot):
    pytest.importorskip("pytestqt")
    from PyQt6.QtGui import QImage

    from app.ui.video_widget import VideoWidget

    w = VideoWidget()
    qtbot.addWidget(w)
    sizes = []
    w.viewSizeChanged.connect(lambda a, b: sizes.append((a, b)))
    w.resize(640, 400)
    w.show()
    qtbot.waitUntil(lambda: bool(sizes) and sizes[-1] == w.view_size() == (640, 400), timeout=10_000)
    w.set_image(QImage(640, 360, QImage.Format.Format_RGB888))  # made for this widget: drawn 1:1
    r = w.image_rect()
    assert (r.width(), r.height(), r.x(), r.y()) == (640, 360, 0, 20)
    w.set_image(QImage(639, 359, QImage.Format.Format_RGB888))  # within a pixel: still 1:1, whole pixels
    r = w.image_rect()
    assert (r.width(), r.height()) == (639, 359) and r.x() == int(r.x()) and r.y() == int(r.y())
    w.set_image(QImage(1920, 1080, QImage.Format.Format_RGB888))  # anything else: aspect-fit scaling
    assert (w.image_rect().width(), w.image_rect().height()) == (640, 360)
    w.set_image(QImage(160, 160, QImage.Format.Format_RGB888))
    assert w.image_rect().height() == 400


def test_window_shows_display_size_frames_and_snapshots_at_source_size(qtbot, tmp_path):
    pytest.importorskip("pytestqt")
    from app.ui.main_window import MainWindow

    clip = make_sized_clip(str(tmp_path / "hd.mp4"), 1280, 720, frames=40, fps=25)
    win = MainWindow("stand-in", "auto", record_dir=str(tmp_path / "rec"),
                     backend_factory=lambda *a, **k: StandInBackend(128))
    qtbot.addWidget(win)
    win.show()
    assert win.open_source(clip)
    qtbot.waitUntil(lambda: win.pipeline.stats.frames_out >= 3 and win.pipeline.view_box is not None, timeout=60_000)
    want = fit_size((720, 1280), win.video.view_size())
    qtbot.waitUntil(lambda: (win.video.image().height(), win.video.image().width()) == want, timeout=60_000)
    assert want[1] < 1280  # the default window is smaller than the video: frames come shrunk
    snap = win.snapshot()
    assert snap and cv2.imread(snap).shape == (720, 1280, 3)
