import json

import pytest
import torch
from safetensors.torch import save_file

from kdas_core.io.checkpoint import CheckpointError, build_metadata, load_checkpoint, read_metadata, save_checkpoint
from kdas_core.models import create_model


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    model = create_model("polyppvt-lite0").eval()
    path = tmp_path / "m.safetensors"
    save_checkpoint(str(path), model, build_metadata("polyppvt-lite0", input_size=128, threshold=0.4, val_metrics={"mDice": 0.5}))
    loaded, meta = load_checkpoint(str(path))
    assert meta["input_size"] == 128 and meta["threshold"] == 0.4 and meta["preset"] == "polyppvt-lite0"
    assert meta["val_metrics"]["mDice"] == 0.5
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.predict_logits(x), loaded.predict_logits(x))


def test_missing_corrupt_foreign_and_mismatched_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        read_metadata(str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable"):
        read_metadata(str(bad))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="without KDAS metadata"):
        read_metadata(str(foreign))
    # b0 weights labelled as lite0: refused, not half-loaded
    wrong = tmp_path / "wrong.safetensors"
    save_checkpoint(str(wrong), create_model("polyppvt-b0"), build_metadata("polyppvt-b0"))
    from safetensors import safe_open

    with safe_open(str(wrong), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(wrong), metadata={"kdas": json.dumps(build_metadata("polyppvt-lite0"))})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(str(wrong))


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(str(path), create_model("polyppvt-lite0"), build_metadata("polyppvt-lite0"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(str(path))
