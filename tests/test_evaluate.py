"""Evaluation: evaluate_pairs (the trainer's validation) and the `python -m kdas_core.evaluate` CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from kdas_core.io.checkpoint import build_metadata, save_checkpoint
from kdas_core.data import find_pairs, resolve_layout
from kdas_core.data.synthetic import write_dataset
from kdas_core.evaluate import evaluate_pairs, main
from kdas_core.models import create_model

from .conftest import shared_data

JSON_KEYS = {"mDice", "mIoU", "Sm", "Em", "wFm", "MAE", "n", "mDice_mean256", "mIoU_mean256"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "lite0-64.safetensors"
    torch.manual_seed(0)
    save_checkpoint(str(path), create_model("polyppvt-lite0"), build_metadata("polyppvt-lite0", input_size=64))
    return path


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synth"), n_train=2, n_test=7, size=72, seed=3)


def _run(capsys, *argv):
    code = main([*map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_end_to_end_on_synthetic_pranet_root(tmp_path, capsys, checkpoint, synth_root):
    out_json = tmp_path / "res" / "student.json"
    code, out, err = _run(capsys, "--weights", checkpoint, "--data", synth_root, "--json", out_json,
                          "--save-overlays", tmp_path / "ov", "--device", "cpu")
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert list(result) == ["Synthetic"]
    summary = result["Synthetic"]
    assert set(summary) == JSON_KEYS and summary["n"] == 7
    assert all(0.0 <= summary[k] <= 1.0 for k in JSON_KEYS - {"n"})
    assert "Synthetic" in out and "mDice" in out  # the table
    assert "input 64x64" in err and "threshold 0.5" in err  # settings came from the metadata

    with open(tmp_path / "res" / "student_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and {r["set"] for r in rows} == {"Synthetic"}
    assert [r["name"] for r in rows] == [f"test_{i:05d}" for i in range(7)]
    assert all((r["height"], r["width"]) == ("72", "72") for r in rows)
    assert np.mean([float(r["Dice"]) for r in rows]) == pytest.approx(summary["mDice"], abs=1e-5)

    sheets = sorted(p.name for p in (tmp_path / "ov" / "Synthetic").iterdir())
    assert sheets == ["sheet_000.png", "sheet_001.png", "worst_dice.png"]  # 6 + 1 tiles
    first = cv2.imread(str(tmp_path / "ov" / "Synthetic" / "sheet_000.png"))
    assert first is not None and first.shape[1] == 3 * 224 and first.shape[0] > 6 * 224


def test_cli_plain_folder_varied_sizes_and_overrides(tmp_path, capsys, checkpoint, synth_root):
    """A plain images/masks folder is one set named after it; sizes differ per image."""
    plain = tmp_path / "frames"
    (plain / "images").mkdir(parents=True)
    (plain / "masks").mkdir()
    sizes = [(50, 90), (81, 47), (72, 72)]  # (h, w): non-square, odd sizes
    for (img_path, mask_path), (h, w) in zip(resolve_layout(synth_root).tests["Synthetic"], sizes):
        name = img_path.rsplit("/", 1)[-1]
        cv2.imwrite(str(plain / "images" / name), cv2.resize(cv2.imread(img_path), (w, h)))
        mask = cv2.resize(cv2.imread(mask_path, cv2.IMREAD_GRAYSCALE), (w, h), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(plain / "masks" / name.replace(".jpg", ".png")), mask)
    per_image = tmp_path / "rows.csv"
    code, out, err = _run(capsys, "--weights", checkpoint, "--data", plain, "--json", tmp_path / "r.json",
                          "--csv", per_image, "--threshold", "0.3", "--image-size", "32")
    assert code == 0, err
    assert list(json.loads((tmp_path / "r.json").read_text())) == ["frames"]
    assert "input 32x32" in err and "threshold 0.3" in err
    with open(per_image) as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["height"]), int(r["width"])) for r in rows] == sizes
    assert not (tmp_path / "r_per_image.csv").exists()  # --csv wins over the default


@pytest.mark.parametrize("problem", ["missing_weights", "corrupt_weights", "no_masks", "missing_data", "no_test_sets"])
def test_cli_user_errors_exit_2_with_a_clear_message(tmp_path, capsys, checkpoint, synth_root, problem):
    weights, data = checkpoint, synth_root
    if problem == "missing_weights":
        weights, expect = tmp_path / "nope.safetensors", ["nope.safetensors", "no such checkpoint"]
    elif problem == "corrupt_weights":
        weights = tmp_path / "bad.safetensors"
        weights.write_bytes(b"\x00garbage" * 40)
        expect = ["bad.safetensors", "not a readable safetensors"]
    elif problem == "no_masks":
        data = tmp_path / "only_images"
        shutil.copytree(synth_root / "TestDataset" / "Synthetic" / "images", data / "images")
        expect = ["masks", "missing"]
    elif problem == "missing_data":
        data, expect = tmp_path / "typo", ["typo", "no such data folder"]
    else:
        data = tmp_path / "train_only"
        shutil.copytree(synth_root / "TrainDataset", data / "TrainDataset")
        expect = ["no test sets", "TestDataset"]
    code, out, err = _run(capsys, "--weights", weights, "--data", data, "--json", tmp_path / "r.json")
    assert code == 2
    assert err.startswith("kdas_core.evaluate: error: ") and "Traceback" not in err
    for text in expect:
        assert text in err
    assert not (tmp_path / "r.json").exists()


def test_cli_bad_options(tmp_path, capsys, checkpoint, synth_root):
    with pytest.raises(SystemExit) as exc:  # the one image-size rule, checked while parsing (kdas_core.models.presets)
        main(["--weights", str(checkpoint), "--data", str(synth_root), "--image-size", "70"])
    assert exc.value.code == 2 and "--image-size: must be a multiple of 32" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "TestDataset/<name>" in text and "mean256" in text and "exit status" in text


class _DiscFinder(torch.nn.Module):
    """Stand-in model that 'segments' bright pixels: logits from the normalised red channel.

    Tests that probabilities are resized back to each mask's own (non-square) size in the
    right orientation: a transposed or misaligned map would score far lower."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def predict_logits(self, x):
        return (x[:, :1] - 0.5) * 20


def test_evaluate_pairs_scores_at_original_size_and_restores_mode(tmp_path):
    folder = tmp_path / "discs"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i, (h, w) in enumerate([(60, 100), (110, 70), (64, 64)]):
        mask = np.zeros((h, w), np.uint8)
        cv2.ellipse(mask, (w // 3, h // 2), (w // 5, h // 4), 0, 0, 360, 255, -1)
        image = np.full((h, w, 3), 60, np.uint8)
        image[mask > 0] = (90, 90, 230)  # BGR: red disc
        cv2.imwrite(str(folder / "images" / f"{i}.png"), image)
        cv2.imwrite(str(folder / "masks" / f"{i}.png"), mask)
    model = _DiscFinder().train()
    summary, rows = evaluate_pairs(model, find_pairs(folder), 64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 0.5, "cpu",
                                   batch_size=2, progress=False, overlays_dir=tmp_path / "ov")
    assert model.training  # the trainer's mode is given back
    assert summary["n"] == 3 and [(r["height"], r["width"]) for r in rows] == [(60, 100), (110, 70), (64, 64)]
    assert summary["mDice"] > 0.9 and summary["MAE"] < 0.1
    assert (tmp_path / "ov" / "sheet_000.png").is_file() and (tmp_path / "ov" / "worst_dice.png").is_file()


def test_real_kvasir_images_of_varied_sizes(tmp_path, capsys, checkpoint):
    """Five real Kvasir pairs (copied to tmp to keep it fast) at their original, varied sizes."""
    kvasir = shared_data("polyp", "TestDataset", "Kvasir")
    smallest = sorted((kvasir / "images").glob("*.jpg"), key=lambda p: p.stat().st_size)[:5]
    subset = tmp_path / "Kvasir5"
    (subset / "images").mkdir(parents=True)
    (subset / "masks").mkdir()
    for image in smallest:
        shutil.copy(image, subset / "images" / image.name)
        shutil.copy(kvasir / "masks" / f"{image.stem}.png", subset / "masks" / f"{image.stem}.png")
    code, out, err = _run(capsys, "--weights", checkpoint, "--data", subset, "--json", tmp_path / "k.json")
    assert code == 0, err
    assert json.loads((tmp_path / "k.json").read_text())["Kvasir5"]["n"] == 5
    with open(tmp_path / "k_per_image.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    sizes = set()
    for image in smallest:
        h, w = cv2.imread(str(image)).shape[:2]
        assert (int(rows[image.stem]["height"]), int(rows[image.stem]["width"])) == (h, w)
        assert int(rows[image.stem]["gt_pixels"]) > 0
        sizes.add((h, w))
    assert len(sizes) >= 3


# ---------------------------------------------------------------- exported models (engines backends)

SCORE_KEYS = ("mDice", "mIoU", "mDice_mean256", "mIoU_mean256", "Sm", "Em", "wFm", "MAE")


def test_onnx_file_scores_as_its_checkpoint(tmp_path, capsys, student_onnx, synth_root):
    """fp32: the same frames through ONNX Runtime give the checkpoint's numbers (probabilities
    agree to ~1e-5, so every metric to well within 1e-3), per image and per set."""
    ckpt, onnx_path, _ = student_onnx
    results = {}
    for label, weights, extra in (("ckpt", ckpt, ["--image-size", "64"]), ("onnx", onnx_path, ["--threads", "1"])):
        out_json = tmp_path / f"{label}.json"
        code, out, err = _run(capsys, "--weights", weights, "--data", synth_root, "--json", out_json, "--device", "cpu", *extra)
        assert code == 0, err
        results[label] = (json.loads(out_json.read_text())["Synthetic"], err)
        with open(tmp_path / f"{label}_per_image.csv") as f:
            results[label] += (list(csv.DictReader(f)),)
    (ref, ref_err, ref_rows), (got, got_err, got_rows) = results["ckpt"], results["onnx"]
    assert "checkpoint" in ref_err and "onnxruntime backend, precision fp32, input 64x64" in got_err
    assert got["n"] == ref["n"] == 7
    for key in SCORE_KEYS:
        assert got[key] == pytest.approx(ref[key], abs=1e-3), key
    assert [r["name"] for r in got_rows] == [r["name"] for r in ref_rows]
    for a, b in zip(got_rows, ref_rows):
        assert float(a["Dice_mean256"]) == pytest.approx(float(b["Dice_mean256"]), abs=2e-3)


def test_evaluate_backend_matches_evaluate_pairs_and_any_worker_count(student_onnx, synth_root):
    from engines import load_backend
    from kdas_core.io.checkpoint import load_checkpoint
    from kdas_core.evaluate import evaluate_backend

    ckpt, onnx_path, _ = student_onnx
    pairs = resolve_layout(synth_root).tests["Synthetic"]
    model, meta = load_checkpoint(ckpt, "cpu")
    ref, ref_rows = evaluate_pairs(model, pairs, 64, meta["mean"], meta["std"], meta["threshold"], "cpu", progress=False)
    backend = load_backend(onnx_path, backend="onnxruntime", device="cpu", threads=1)
    one, rows1 = evaluate_backend(backend, pairs, batch_size=3, progress=False)
    two, rows2 = evaluate_backend(backend, pairs, batch_size=3, progress=False, workers=2)
    assert rows2 == rows1 and two == one  # metric processes change nothing
    for key in SCORE_KEYS:
        assert one[key] == pytest.approx(ref[key], abs=1e-3), key
    assert [r["name"] for r in rows1] == [r["name"] for r in ref_rows]


def test_cli_exported_model_errors_exit_2(tmp_path, capsys, student_onnx, synth_root):
    _, onnx_path, _ = student_onnx
    code, _, err = _run(capsys, "--weights", onnx_path, "--data", synth_root, "--image-size", "96")
    assert code == 2 and "exported for 64x64" in err and "Traceback" not in err
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    code, _, err = _run(capsys, "--weights", bad, "--data", synth_root)
    assert code == 2 and "bad.onnx" in err
    code, _, err = _run(capsys, "--weights", onnx_path, "--data", synth_root, "--workers", "0")
    assert code == 2 and "--workers" in err


def test_split_val_scores_exactly_the_training_runs_validation_images(tmp_path, capsys, checkpoint):
    from kdas_core.data.dataset import split_by_groups

    root = write_dataset(tmp_path / "d", n_train=10, n_test=2, size=64, seed=5)
    out_json = tmp_path / "val.json"
    code, _, err = _run(capsys, "--weights", checkpoint, "--data", root, "--split", "val", "--groups", "none",
                        "--val-fraction", "0.3", "--json", out_json, "--device", "cpu")
    assert code == 0, err
    assert list(json.loads(out_json.read_text())) == ["validation"]
    with open(tmp_path / "val_per_image.csv") as f:
        names = [r["name"] for r in csv.DictReader(f)]
    held_out = split_by_groups(resolve_layout(root).train, 0.3, "none").val
    assert names == [Path(p[0]).stem for p in held_out] and len(names) == 3
    assert all(n.startswith("train_") for n in names)  # training images, not the test set
    assert "validation split of" in err and "7 train / 3 val" in err

    code, _, err = _run(capsys, "--weights", checkpoint, "--data", root, "--split", "val", "--val-fraction", "0")
    assert code == 2 and "--val-fraction must be in (0, 1)" in err


def test_flip_tta_is_mirror_consistent_and_refused_for_exports(tmp_path, capsys, checkpoint, synth_root, student_onnx):
    """With --tta flip a mirrored image gets the mirrored prediction, so every per-image score is
    the same on a mirrored copy of the set; without TTA an (untrained, asymmetric) model differs."""
    from kdas_core.io.checkpoint import load_checkpoint

    model, meta = load_checkpoint(str(checkpoint), "cpu")
    pairs = resolve_layout(synth_root).tests["Synthetic"]
    mirrored = tmp_path / "mirrored"
    for sub in ("images", "masks"):
        (mirrored / sub).mkdir(parents=True)
    for img, msk in pairs:
        name = Path(img).stem + ".png"  # PNG: the mirrored file holds exactly the mirrored pixels
        cv2.imwrite(str(mirrored / "images" / name), cv2.flip(cv2.imread(img), 1))
        cv2.imwrite(str(mirrored / "masks" / name), cv2.flip(cv2.imread(msk), 1))
    args = (64, meta["mean"], meta["std"], 0.5, "cpu")
    scores = {}
    for tta in ("none", "flip"):
        for label, ps in (("orig", pairs), ("mirror", find_pairs(mirrored))):
            _, rows = evaluate_pairs(model, ps, *args, progress=False, tta=tta)
            scores[tta, label] = np.array([r["Dice_mean256"] for r in rows])
    assert np.allclose(scores["flip", "orig"], scores["flip", "mirror"], atol=2e-3)
    assert not np.allclose(scores["none", "orig"], scores["none", "mirror"], atol=2e-3)

    code, _, err = _run(capsys, "--weights", student_onnx[1], "--data", synth_root, "--tta", "flip")
    assert code == 2 and "--tta flip runs a checkpoint" in err


def test_an_output_that_cannot_be_written_is_named_before_the_work_starts(tmp_path, capsys):
    from kdas_core.evaluate import main

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    for flags, said in ((["--json", "/proc/x.json"], "--json /proc/x.json: cannot create files in /proc"),
                        (["--json", str(weights)], "is an input of this command")):
        rc = main(["--weights", str(weights), "--data", str(tmp_path / "nope"), *flags])
        err = capsys.readouterr().err
        assert rc == 2 and said in err and ".tmp-" not in err, err
