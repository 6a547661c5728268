"""One home for each fact: the atomic writer, the image-size rule, the threshold default."""

from __future__ import annotations

import argparse
import os
import stat

import pytest

from kdas_core.io.atomic import staged, write_json


def test_staged_writes_whole_files_or_none(tmp_path):
    out = tmp_path / "sub" / "report.json"
    with pytest.raises(RuntimeError, match="disk gone"):
        with staged(out) as tmp:
            assert tmp.endswith(".json") and os.path.dirname(tmp) == str(out.parent)  # FFmpeg picks formats by it
            with open(tmp, "w") as f:
                f.write('{"half":')
            raise RuntimeError("disk gone")
    assert not out.exists() and os.listdir(out.parent) == []  # no half file, no temp left behind

    write_json(out, {"b": 1, "a": [1.5]})
    assert out.read_text() == '{\n  "b": 1,\n  "a": [\n    1.5\n  ]\n}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600
    write_json(out, {"b": 1, "a": 2}, sort_keys=True)  # replaces the old file in one step
    assert out.read_text().index('"a"') < out.read_text().index('"b"')


@pytest.mark.parametrize("text,ok", [("256", True), ("32", True), ("2048", True), ("352", True),
                                     ("250", False), ("0", False), ("-32", False), ("2080", False), ("x", False)])
def test_one_image_size_rule_for_every_flag(text, ok):
    from kdas_core.models.presets import image_size_arg

    if ok:
        assert image_size_arg(text) == int(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="multiple of 32|integer"):
            image_size_arg(text)


def test_every_image_size_flag_uses_the_rule(capsys):
    """train, evaluate, engines.build/bench/selfcheck refuse 250 with the same words, before any work."""
    from engines import bench, build, selfcheck
    from kdas_core import evaluate, train

    for main, extra in ((train.main, ["--data", "d", "--out", "o"]), (evaluate.main, ["--weights", "w", "--data", "d"]),
                        (build.main, ["--weights", "w.safetensors"]), (bench.main, ["--weights", "w.safetensors"]),
                        (selfcheck.main, [])):
        with pytest.raises(SystemExit) as exc:
            main(extra + ["--image-size", "250"])
        assert exc.value.code == 2
        assert "multiple of 32 (the encoder's stride) from 32 to 2048, got 250" in capsys.readouterr().err, main


def test_a_new_checkpoint_is_thresholded_at_the_documented_one_half(tmp_path):
    """The threshold README documents (0.5) is what a freshly trained checkpoint carries and what
    the backends and the viewer's masks then use: a probability of 0.5 is polyp, 0.49 is not."""
    import numpy as np

    from app.pipeline.postprocess import probs_to_mask
    from app.testing import make_checkpoint
    from engines import load_backend
    from kdas_core.io.checkpoint import read_metadata
    from kdas_core.training.config import defaults

    assert defaults()["threshold"] == 0.5
    ckpt = make_checkpoint(tmp_path / "m.safetensors", input_size=64)
    assert read_metadata(ckpt)["threshold"] == 0.5
    backend = load_backend(ckpt, backend="torch", device="cpu")
    try:
        assert backend.threshold == 0.5
        assert probs_to_mask(np.float32([[0.49, 0.5]]), (1, 2), backend.threshold).tolist() == [[0, 255]]
    finally:
        backend.close()
