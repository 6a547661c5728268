"""Viewer pipeline stages in isolation: channels, stats, mask/overlay, recorder, sources,
camera loss and recovery, backend fallback. Small and fast; no window."""

from __future__ import annotations

import threading
import time

import av
import numpy as np
import pytest

from app.errors import AppError
from app.pipeline.channels import BoundedQueue, Closed, LatestSlot
from app.pipeline.inference import open_backend
from app.pipeline.items import EndOfStream, Frame
from app.pipeline.overlay import MASK_RGB, draw_overlay
from app.pipeline.postprocess import probs_to_mask
from app.pipeline.recorder import Recorder
from app.pipeline.source import CameraReader, Epoch, SourceStage, VideoFileReader, parse_source
from app.pipeline.stats import Histogram, RunStats
from app.testing import garbage, make_clip, truncate

from .conftest import wait_until


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=30, size=160)


def _frame(i: int) -> Frame:
    return Frame(index=i, pts=i / 25, image=np.zeros((4, 4, 3), np.uint8), t_capture=time.perf_counter())


# ---------------------------------------------------------------- channels and stats

def test_latest_slot_keeps_newest_counts_drops_and_never_drops_end_of_stream():
    dropped = []
    slot = LatestSlot(on_drop=dropped.append)
    for i in range(5):
        slot.put(_frame(i))
    slot.put(EndOfStream())
    assert slot.get(0).index == 4  # the newest frame wins...
    assert [f.index for f in dropped] == [0, 1, 2, 3]  # ...and every replaced one is counted
    assert isinstance(slot.get(0), EndOfStream)  # control items survive
    assert slot.get(0) is None
    slot.close()
    with pytest.raises(Closed):
        slot.get(0)


def test_bounded_queue_blocks_instead_of_dropping():
    q = BoundedQueue(2)
    q.put(1)
    q.put(2)
    assert not q.offer(3)
    got = []

    def producer():
        q.put(3)  # blocks until the consumer makes room
        got.append("put")

    t = threading.Thread(target=producer)
    t.start()
    t.join(0.1)  # a put that did not block would return at once
    assert t.is_alive() and got == []
    assert q.get(1) == 1
    t.join(10)
    assert not t.is_alive() and got == ["put"]
    assert [q.get(0), q.get(0)] == [2, 3]


def test_histogram_percentiles_are_close_to_numpy():
    rng = np.random.default_rng(0)
    values = rng.lognormal(3.0, 0.5, 5000)
    h = Histogram()
    for v in values:
        h.add(float(v))
    for q in (50, 95):
        assert h.percentile(q) == pytest.approx(np.percentile(values, q), rel=0.03)


def test_run_stats_summary_keys_and_drop_percentage():
    s = RunStats()
    s.start()
    for _ in range(10):
        s.frame_in()
    s.frame_dropped("model_busy")
    s.frame_stale()
    s.inference(12.0)
    s.frame_out(time.perf_counter() - 0.05)
    out = s.summary()
    assert out["frames_in"] == 10 and out["frames_out"] == 1 and out["dropped"] == 1 and out["stale"] == 1
    assert out["dropped_by"]["model_busy"] == 1 and sum(out["dropped_by"].values()) == 1
    assert out["in_flight"] == 7  # 10 in, 3 ended: the rest were still on their way
    assert out["dropped_pct"] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="drop reason"):
        s.frame_dropped("tired")
    assert out["latency_ms_p50"] == pytest.approx(50, rel=0.2)
    assert out["inference_ms_p50"] == pytest.approx(12, rel=0.03)


# ---------------------------------------------------------------- mask and overlay

def test_mask_follows_threshold_at_frame_resolution():
    probs = np.zeros((32, 32), np.float32)
    probs[8:16, 8:16] = 0.6
    low = probs_to_mask(probs, (64, 80), 0.5)
    assert low.shape == (64, 80) and low.dtype == np.uint8
    assert set(np.unique(low)) == {0, 255}
    assert probs_to_mask(probs, (64, 80), 0.7).max() == 0  # above every probability: empty
    assert probs_to_mask(probs, (64, 80), 0.0).min() == 255  # zero threshold: everything


def test_overlay_tints_only_the_mask_and_opacity_controls_strength():
    image = np.full((60, 80, 3), 100, np.uint8)
    mask = np.zeros((60, 80), np.uint8)
    mask[10:30, 20:50] = 255
    faint = draw_overlay(image, mask, 0.2, contour=False)
    strong = draw_overlay(image, mask, 0.8, contour=False)
    assert (faint[~mask.astype(bool)] == 100).all() and (strong[~mask.astype(bool)] == 100).all()
    green = 1
    assert strong[20, 30, green] > faint[20, 30, green] > 100
    outlined = draw_overlay(image, mask, 0.0, contour=True)
    assert tuple(outlined[10, 30]) == MASK_RGB  # the outline is drawn in the mask colour
    assert tuple(outlined[20, 30]) == (100, 100, 100)  # opacity 0: no fill
    assert (draw_overlay(image, np.zeros_like(mask), 1.0, True) == image).all()


# ---------------------------------------------------------------- recorder

def test_recorder_odd_size_every_frame_decodes(tmp_path):
    path = tmp_path / "rec.mp4"
    r = Recorder(str(path), 25, 161, 121)
    for i in range(12):
        r.write(np.full((121, 161, 3), i * 20, np.uint8))
    r.close()
    r.close()  # idempotent
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 12
    assert frames[0].shape[:2] == (122, 162)  # padded to even, never cropped
    assert abs(int(frames[5][60, 80, 0]) - 100) <= 4
    with pytest.raises(AppError, match="closed"):
        r.write(np.zeros((121, 161, 3), np.uint8))


def test_recorder_names_the_folder_it_cannot_write(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AppError, match="cannot create the recording"):
        Recorder(str(blocker / "sub" / "rec.mp4"), 25, 16, 16)


# ---------------------------------------------------------------- sources

def test_parse_source():
    assert parse_source("0") == ("camera", 0)
    assert parse_source("/dev/video2") == ("camera", "/dev/video2")
    assert parse_source("clip.mp4") == ("file", "clip.mp4")


def test_file_reader_reads_every_frame_and_seeks(clip):
    r = VideoFileReader(clip)
    assert (r.width, r.height, r.fps, r.frame_count) == (160, 160, 25.0, 30)
    n = 0
    while (item := r.read()) is not None:
        img, pts = item
        assert img.shape == (160, 160, 3) and img.dtype == np.uint8
        assert pts == pytest.approx(n / 25, abs=1e-3)
        n += 1
    assert n == 30
    r.seek(0.8)
    _, pts = r.read()
    assert pts == pytest.approx(0.8, abs=0.021)
    r.close()


@pytest.mark.parametrize("kind", ["missing", "garbage", "directory"])
def test_file_reader_rejects_unreadable_input_with_a_clear_message(tmp_path, kind):
    target = {"missing": tmp_path / "nope.mp4", "garbage": garbage(str(tmp_path / "g.mp4")), "directory": tmp_path}[kind]
    with pytest.raises(AppError) as err:
        VideoFileReader(str(target))
    assert str(target) in str(err.value)


def test_file_reader_without_video_stream(tmp_path):
    path = str(tmp_path / "audio.wav")
    with av.open(path, "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
    with pytest.raises(AppError, match="no video stream"):
        VideoFileReader(path)


def test_unsupported_codec_is_named(tmp_path):
    """An AVI whose video FourCC no decoder knows (an MPEG-4 file with its tag overwritten)."""
    path = tmp_path / "m4.avi"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for i in range(5):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 40, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = path.read_bytes()
    assert b"FMP4" in data
    unknown = tmp_path / "unknown.avi"
    unknown.write_bytes(data.replace(b"FMP4", b"ZZZZ"))
    with pytest.raises(AppError, match="unsupported video codec"):
        VideoFileReader(str(unknown))


def test_truncated_file_raises_after_the_good_frames(clip, tmp_path):
    r = VideoFileReader(truncate(clip, str(tmp_path / "cut.mp4"), 0.6))
    good = 0
    with pytest.raises(AppError, match="truncated|corrupt"):
        while r.read() is not None:
            good += 1
    assert 0 < good < 30


# ---------------------------------------------------------------- camera loss and recovery

class FakeCapture:
    """cv2.VideoCapture look-alike driven by a shared 'plugged' flag."""

    def __init__(self, world):
        self.world = world
        self.opened = world["plugged"]

    def isOpened(self):
        return self.opened

    def set(self, *_):
        return True

    def get(self, _prop):
        return 0

    def read(self):
        time.sleep(0.005)
        if not (self.opened and self.world["plugged"]):
            return False, None
        self.world["reads"] += 1
        return True, np.full((48, 64, 3), 7, np.uint8)

    def release(self):
        self.opened = False


class Events:
    def __init__(self):
        self.signals = []

    def signal(self, ok, text):
        self.signals.append(ok)


def test_camera_unplugged_shows_signal_lost_retries_and_resumes():
    world = {"plugged": True, "reads": 0, "opens": 0}

    def factory(dev):
        world["opens"] += 1
        return FakeCapture(world)

    reader = CameraReader(0, factory=factory)
    out, events, stats = LatestSlot(), Events(), RunStats()
    stage = SourceStage(reader, out, stats=stats, events=events, epoch=Epoch(), realtime=True)
    stage.RETRY_S = (0.02,)
    stage.start()
    try:
        wait_until(lambda: stats.frames_in >= 5, 30, "5 frames from the camera")
        world["plugged"] = False
        wait_until(lambda: events.signals == [False], 30, "'signal lost'")
        assert not stage.signal_ok
        before, opens = stats.frames_in, world["opens"]
        wait_until(lambda: world["opens"] >= opens + 3, 30, "3 attempts to reopen the unplugged camera")
        assert stats.frames_in == before  # nothing while unplugged, and no crash
        world["plugged"] = True
        wait_until(lambda: events.signals == [False, True], 30, "'signal back'")
        assert stage.signal_ok
        wait_until(lambda: stats.frames_in >= before + 5, 30, "frames to flow again")
        assert out.get(1).image.shape == (48, 64, 3)
    finally:
        stage.stop()
        stage.join(2)
    assert not stage.is_alive()


def test_max_frames_stops_a_camera_too():
    world = {"plugged": True, "reads": 0, "opens": 0}
    reader = CameraReader(0, factory=lambda dev: FakeCapture(world))
    out, stats = BoundedQueue(64), RunStats()
    stage = SourceStage(reader, out, stats=stats, events=Events(), epoch=Epoch(), realtime=True, max_frames=5)
    stage.start()
    try:
        stage.join(10)
        assert not stage.is_alive(), "the camera source ran past --max-frames"
    finally:
        stage.stop()
        stage.join(2)
    items = out.drain()
    assert [f.index for f in items[:-1]] == [0, 1, 2, 3, 4] and isinstance(items[-1], EndOfStream)
    assert items[-1].error is None and stats.frames_in == 5


def test_camera_that_cannot_open_is_a_clear_error():
    with pytest.raises(AppError, match="camera 3"):
        CameraReader(3, factory=lambda dev: FakeCapture({"plugged": False, "reads": 0}))


# ---------------------------------------------------------------- backend fallback

class TinyBackend:
    def __init__(self, name, fail_predict=False):
        self.name, self.input_size, self.threshold, self.notes = name, (8, 8), 0.5, []
        self.fail_predict = fail_predict
        self.closed = False

    def predict(self, frames):
        if self.fail_predict:
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        return np.zeros(frames.shape[:3], np.float32)

    def close(self):
        self.closed = True


def test_fallback_goes_tensorrt_onnxruntime_torch_with_notices():
    from engines import BackendError

    built = {}

    def factory(path, backend, device=None, threads=None):
        if backend == "tensorrt":
            raise BackendError(f"{path}: engine was built for another GPU (sm_90), this is sm_86")
        built[backend] = TinyBackend(backend, fail_predict=backend == "onnxruntime")
        return built[backend]

    notices = []
    b = open_backend("m.engine", "tensorrt", factory=factory, notice=notices.append)
    assert b.name == "torch"
    assert built["onnxruntime"].closed  # loaded, failed on first use, released
    assert len(notices) == 2
    assert "tensorrt" in notices[0] and "another GPU" in notices[0] and "onnxruntime" in notices[0]
    assert "onnxruntime" in notices[1] and "torch" in notices[1]


def test_auto_that_loads_but_cannot_run_falls_back_after_what_it_picked():
    def factory(path, backend, device=None, threads=None):
        return TinyBackend("onnxruntime", fail_predict=True) if backend == "auto" else TinyBackend(backend)

    notices = []
    assert open_backend("m.onnx", "auto", factory=factory, notice=notices.append).name == "torch"
    assert notices and "falling back to torch" in notices[0]


def test_a_backend_failing_while_running_hands_over_with_a_fallback_notice():
    """Runtime fallback takes the same order as load time (engines.fallback_chain) and tells the
    window through a typed notice: kind "fallback", whatever the words."""
    from app.pipeline.inference import InferenceStage

    heard = []

    class Events:
        def notice(self, text, kind="info"):
            heard.append((kind, text))

        def model_ready(self, info):
            pass

    class FailsOnFrames(TinyBackend):
        def predict(self, frames):
            if frames.any():  # the zero warm-up passes, the first real frame fails
                raise RuntimeError("device lost (test)")
            return super().predict(frames)

    def factory(path, backend, device=None, threads=None):
        return FailsOnFrames(backend) if backend == "onnxruntime" else TinyBackend(backend)

    stage = InferenceStage("m.onnx", "onnxruntime", None, None, stats_ref=RunStats, events=Events(), factory=factory)
    stage._load("onnxruntime")
    image = np.full((8, 8, 3), 7, np.uint8)
    out = stage._infer(Frame(index=0, pts=0.0, image=image, t_capture=time.perf_counter(), model_input=image))
    assert out.probs.shape == (8, 8) and stage.info.backend == "torch"
    assert heard == [("fallback", "onnxruntime backend failed while running (device lost (test)); falling back")]


def test_no_backend_at_all_lists_every_failure():
    from engines import BackendError

    def factory(path, backend, device=None, threads=None):
        raise BackendError(f"{backend} is broken")

    with pytest.raises(AppError) as err:
        open_backend("m.safetensors", "tensorrt", factory=factory)
    for name in ("tensorrt", "onnxruntime", "torch"):
        assert f"{name} is broken" in str(err.value)


def test_model_label_names_the_preset_not_the_export_cache_hash():
    from app.pipeline.inference import ModelInfo, loading_message

    info = ModelInfo("onnxruntime", "/cache/onnx/d8a61c5915e7c511-256-fp32-r3.onnx", (256, 256), 0.5, [], "polyppvt-lite0")
    assert info.label == "polyppvt-lite0 \u00b7 256\u00b2 \u00b7 onnxruntime"
    assert ModelInfo("torch", "/x/other.safetensors", (192, 256), 0.5).label == "other.safetensors \u00b7 256x192 \u00b7 torch"
    assert "exports it to ONNX once" in loading_message("student.safetensors")  # says why the first start is slow
    assert loading_message("student.onnx") == "Loading model\u2026"


def test_an_app_error_in_a_stage_keeps_its_own_words():
    from app.pipeline.runner import _Worker

    errors = []
    inbox, outbox = BoundedQueue(2), BoundedQueue(2)

    def fn(item):
        raise AppError("/x/o.mp4: cannot create the recording (read-only)")

    stage = _Worker("overlay", fn, inbox, outbox, on_error=errors.append)
    stage.start()
    inbox.put(Frame(index=0, pts=0.0, image=np.zeros((4, 4, 3), np.uint8), t_capture=0.0))
    stage.join(5)
    assert errors == ["/x/o.mp4: cannot create the recording (read-only)"]


def test_throughput_words_flag_a_busy_machine_instead_of_a_false_speed_up():
    from app.pipeline.stats import describe_throughput

    quiet = describe_throughput({"fps": 15.0, "model_only_fps": 17.8, "model_only_ms": 56.0, "inference_ms_p50": 60.0})
    assert quiet == "15.0 fps end to end (the model alone, timed in bursts during the run: 17.8 fps)"
    busy = describe_throughput({"fps": 26.0, "model_only_fps": 17.8, "model_only_ms": 56.0, "inference_ms_p50": 150.0,
                                "inference_busy_pct": 99})
    assert "1.46x" in busy and "too busy for these figures to mean much" in busy and "150 ms per frame" in busy
    assert "\u00d7 model-only" not in busy and describe_throughput({"fps": 20.0}) == "20.0 fps end to end"


def test_recorder_writes_beside_its_path_and_moves_into_place_on_close(tmp_path):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"the old file")
    rec = Recorder(str(out), 25, 32, 32)
    for i in range(60):  # enough to get past the encoder's look-ahead: packets reach the file
        rec.write(np.full((32, 32, 3), i, np.uint8))
    wait_until(lambda: rec.idle, 30, "the encoder to catch up")
    assert (tmp_path / ".tmp-o.mp4").exists()  # the recording goes beside it...
    assert out.read_bytes() == b"the old file"  # ...and the final name is untouched while it runs
    rec.close()
    assert not (tmp_path / ".tmp-o.mp4").exists()
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 60
