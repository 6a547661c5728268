"""Synthetic endoscopy-like data: CLI layout, determinism, masks that mark visible polyps, the clip."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from kdas_core.data import read_image, resolve_layout
from kdas_core.data.synthetic import frame_rng, main, render_clip, render_frame


def _tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_writes_pranet_layout(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["--out", str(out), "--train", "5", "--test", "3", "--image-size", "64", "--seed", "1"]) == 0
    layout = resolve_layout(out)  # the project's own reader accepts it
    assert layout.kind == "pranet"
    assert len(layout.train) == 5
    assert list(layout.tests) == ["Synthetic"] and len(layout.tests["Synthetic"]) == 3
    image_path, mask_path = layout.train[0]
    assert image_path.endswith(".jpg") and mask_path.endswith(".png")
    assert read_image(image_path).shape == (64, 64, 3)
    raw_mask = cv2.imread(mask_path, cv2.IMREAD_UNCHANGED)
    assert raw_mask.shape == (64, 64) and set(np.unique(raw_mask)) <= {0, 255}
    assert "5 train + 3 test" in capsys.readouterr().out


def test_cli_is_deterministic_per_seed_and_prefix_stable(tmp_path):
    args = ["--train", "4", "--test", "2", "--image-size", "48"]
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert main(["--out", str(tmp_path / name), "--seed", seed, *args]) == 0
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a if k.endswith(".jpg"))
    # frame i does not depend on how many frames were asked for
    assert main(["--out", str(tmp_path / "short"), "--seed", "7", "--train", "2", "--test", "0", "--image-size", "48"]) == 0
    short = _tree_bytes(tmp_path / "short")
    assert short and all(short[k] == a[k] for k in short)
    assert not (tmp_path / "short" / "TestDataset").exists()


def test_cli_rejects_tiny_size_and_teaches_in_help(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "x"), "--size", "8"]) == 2  # the old spelling still works (with a notice)
    err = capsys.readouterr().err
    assert "--image-size must be at least 32" in err and "--size is deprecated" in err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "TestDataset/Synthetic" in text and "deterministic" in text and "render_clip" in text


def test_render_frame_masks_are_nontrivial_and_mark_visible_polyps():
    frames = [render_frame(frame_rng(0, 1, i), 64) for i in range(24)]
    for rgb, mask in frames:
        assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
        assert mask.shape == (64, 64) and mask.dtype == np.uint8 and mask.max() <= 1
    fractions = np.array([m.mean() for _, m in frames])
    positives = fractions > 0
    assert 0.5 <= positives.mean() < 1.0  # mostly polyps, some empty frames
    assert np.all(fractions[positives] < 0.6)
    # The mask must follow a visible outline (a mask over nothing would teach nothing): the image
    # gradient on the mask boundary, relative to the frame's mean gradient, must be high and beat
    # the same mask shifted elsewhere in the frame.
    def boundary_edge(rgb, mask):
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
        magnitude = np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
        boundary = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        return magnitude[boundary].mean() / (magnitude.mean() + 1e-6)

    true_edges, shifted_edges = [], []
    for rgb, mask in frames:
        if mask.sum() >= 20:
            true_edges.append(boundary_edge(rgb, mask))
            shifted_edges.append(boundary_edge(rgb, np.roll(mask, (17, 23), axis=(0, 1))))
    true_edges, shifted_edges = np.array(true_edges), np.array(shifted_edges)
    assert len(true_edges) >= 8
    assert np.median(true_edges) > 1.5
    assert (true_edges > shifted_edges).mean() >= 0.8


def test_render_frame_is_deterministic_for_a_generator_state():
    a = render_frame(np.random.default_rng(3), 48)
    b = render_frame(np.random.default_rng(3), 48)
    c = render_frame(np.random.default_rng(4), 48)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_render_clip_moves_smoothly_and_polyps_come_and_go():
    clip = list(render_clip(240, 48, seed=0))
    assert len(clip) == 240
    frames = np.stack([f for f, _ in clip]).astype(np.int16)
    masks = np.stack([m for _, m in clip])
    assert frames.shape == (240, 48, 48, 3) and masks.max() == 1
    step = np.abs(np.diff(frames, axis=0)).mean()
    far = np.abs(frames[:-60] - frames[60:]).mean()
    assert step < 0.5 * far  # consecutive frames are close; frames 60 apart are not
    with_polyp = masks.reshape(240, -1).any(1)
    assert 0 < with_polyp.sum() < 240  # polyps enter and leave the view
    # a polyp moves by a few pixels a frame, it does not jump
    both = with_polyp[:-1] & with_polyp[1:]
    inter = (masks[:-1] & masks[1:]).reshape(239, -1).sum(1)
    union = (masks[:-1] | masks[1:]).reshape(239, -1).sum(1)
    assert np.median(inter[both] / union[both]) > 0.7
    again = next(iter(render_clip(1, 48, seed=0)))
    assert np.array_equal(again[0], clip[0][0])  # deterministic per seed
