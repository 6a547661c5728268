"""Cached teacher targets: equal to the live teacher, warped like the image, refused when stale."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest
import torch

from kdas_core import distill, teacher_targets
from kdas_core.data import targets as targets_file
from kdas_core.evaluation.scoring import score_cached_targets
from kdas_core.io.checkpoint import build_metadata, save_checkpoint
from kdas_core.data import resolve_layout
from kdas_core.data.dataset import TrainDataset
from kdas_core.data.transforms import TrainAugment
from kdas_core.training.trainer import Teacher, TrainStep
from kdas_core.losses import build_distillers
from kdas_core.models import create_model

SIZE = 64
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from kdas_core.data import synthetic

    root = tmp_path_factory.mktemp("tt")
    data = root / "data"
    synthetic.main(["--out", str(data), "--train", "6", "--test", "2", "--image-size", "64", "--seed", "2"])
    torch.manual_seed(0)
    teacher = create_model("polyppvt-lite0").eval()
    path = root / "teacher.safetensors"
    save_checkpoint(str(path), teacher, build_metadata("polyppvt-lite0", input_size=SIZE))
    return data, path, teacher


def _targets(setup, tmp_path, tta="none"):
    data, path, _ = setup
    stored, meta = teacher_targets.compute([str(path)], str(data), SIZE, tta=tta, progress=False)
    targets_file.save(str(tmp_path), stored, meta)
    return stored, meta


def test_cached_loss_equals_the_live_teacher_loss_without_augmentation(setup, tmp_path):
    data, path, teacher = setup
    pairs = resolve_layout(data).train
    stored, _ = _targets(setup, tmp_path)
    loaded, _ = targets_file.load(str(tmp_path), pairs, SIZE)
    ds = TrainDataset(pairs, SIZE, MEAN, STD, augment=False, targets=loaded)
    batch = [ds[i] for i in range(4)]
    image = torch.stack([b["image"] for b in batch])
    mask = torch.stack([b["mask"] for b in batch])
    targets = torch.stack([b["targets"] for b in batch])
    student = create_model("polyppvt-lite0", pretrained=None).eval()
    for kd in ("kdas", "kdas-paper", "kd"):
        distillers = build_distillers(kd, student, [teacher])
        step = TrainStep(student, distillers, [Teacher(teacher, {"mean": MEAN, "std": STD}, str(path))], (MEAN, STD))
        with torch.no_grad():
            _, live = step(image, mask)
            _, cached = step(image, mask, targets)
        for k in live:
            assert cached[k].item() == pytest.approx(live[k].item(), rel=2e-3, abs=1e-4), (kd, k)


def test_flip_tta_targets_follow_a_flip_exactly(setup, tmp_path):
    """With --tta flip the cached map of a flipped image is the flip of the cached map, so the
    warped cache equals the teacher's (TTA) map of the warped image up to float16 rounding."""
    data, path, _ = setup
    pairs = resolve_layout(data).train
    stored, _ = _targets(setup, tmp_path, tta="flip")
    flipped_root = tmp_path / "flipped"
    for sub in ("images", "masks"):
        (flipped_root / "TrainDataset" / sub).mkdir(parents=True)
    for img, msk in pairs:
        # PNG: lossless, so the flipped file holds exactly the flipped pixels.
        cv2.imwrite(str(flipped_root / "TrainDataset" / "images" / (Path(img).stem + ".png")), cv2.flip(cv2.imread(img), 1))
        cv2.imwrite(str(flipped_root / "TrainDataset" / "masks" / (Path(msk).stem + ".png")), cv2.flip(cv2.imread(msk), 1))
    of_flipped, _ = teacher_targets.compute([str(path)], str(flipped_root), SIZE, tta="flip", progress=False)
    assert torch.allclose(torch.flip(stored.float(), dims=[-1]), of_flipped.float(), atol=2e-3)


def test_native_teacher_size_runs_each_teacher_at_its_own_size(setup, tmp_path):
    """--teacher-size native: the teacher sees the image at its checkpoint's input size (96 here)
    and its low-resolution logits are resampled to the training grid (64/8)."""
    import torch.nn.functional as F

    from kdas_core.data.dataset import _normalise, read_image
    from kdas_core.data.transforms import to_tensor

    data, _, teacher = setup
    big = tmp_path / "teacher-96.safetensors"
    save_checkpoint(str(big), teacher, build_metadata("polyppvt-lite0", input_size=96))
    native, meta = teacher_targets.compute([str(big)], str(data), SIZE, teacher_size="native", progress=False)
    at_train, _ = teacher_targets.compute([str(big)], str(data), SIZE, teacher_size="train", progress=False)
    assert meta["key"]["teacher_sizes"] == [96] and native.shape[-1] == SIZE // targets_file.STRIDE
    first = resolve_layout(data).train[0][0]
    x = _normalise(to_tensor(read_image(first), None, 96)[0], MEAN, STD)[None]
    with torch.no_grad():
        o = teacher(x)
    expected = F.interpolate(torch.cat([o["p1_low"], o["p2_low"]], 1), size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(native[0].float(), expected[0], atol=2e-2)  # float16 storage of logits of size ~10
    assert not torch.allclose(native.float(), at_train.float(), atol=2e-2)  # the teacher really saw another size


def test_targets_get_exactly_the_geometry_of_the_image():
    torch.manual_seed(3)
    image = (torch.rand(3, SIZE, SIZE) * 255).to(torch.uint8)
    mask = (torch.rand(1, SIZE, SIZE) > 0.5).float()
    aug = TrainAugment(SIZE)
    aug.colour = lambda x: x  # geometry only, so image and maps can be compared
    for seed in range(6):
        torch.manual_seed(seed)
        img, _, t = aug(image, mask, image.float(), targets_fill=0.0)
        assert (t - img.float()).abs().max() <= 1.01  # the image is rounded to uint8, the maps are not
        torch.manual_seed(seed)
        img, _, t = aug(image, mask, image.float(), targets_fill=-10.0)
        # Where a rotation brought in black corners, the maps say "background" (logit -10).
        assert torch.all(t[:, img.sum(0) == 0] < -9)


def test_stale_targets_are_refused(setup, tmp_path):
    data, path, _ = setup
    pairs = resolve_layout(data).train
    _targets(setup, tmp_path)
    with pytest.raises(targets_file.TeacherTargetsError, match="made at 64 px"):
        targets_file.load(str(tmp_path), pairs, 96)
    with pytest.raises(targets_file.TeacherTargetsError, match="other teacher"):
        targets_file.load(str(tmp_path), pairs, SIZE, teacher_sha256=["0" * 64])
    changed = tmp_path / "changed"
    import shutil

    shutil.copytree(data, changed)
    first = sorted((changed / "TrainDataset" / "images").iterdir())[0]
    img = cv2.imread(str(first))
    cv2.imwrite(str(first), 255 - img)
    with pytest.raises(targets_file.TeacherTargetsError, match="other training images"):
        targets_file.load(str(tmp_path), resolve_layout(changed).train, SIZE)


def test_distill_with_targets_runs_and_feature_methods_refuse_them(setup, tmp_path, capsys):
    data, _, _ = setup
    _targets(setup, tmp_path / "t")
    common = ["--model", "polyppvt-lite0", "--data", str(data), "--teacher-targets", str(tmp_path / "t"),
              "--epochs", "1", "--image-size", str(SIZE), "--batch-size", "2", "--workers", "0", "--no-progress",
              "--pretrained", "none", "--steps-per-epoch", "2", "--val-fraction", "0.34"]
    assert distill.main([*common, "--kd", "kdas", "--out", str(tmp_path / "ok")]) == 0
    log = (tmp_path / "ok" / "log.csv").read_text().splitlines()
    assert "share_kdas/sgm" in log[0]
    assert distill.main([*common, "--kd", "cwd", "--out", str(tmp_path / "no")]) == 2
    assert "needs the teachers' features" in capsys.readouterr().err


def test_bench_train_times_phases_and_kd_cost(setup, tmp_path):
    from kdas_core import bench_train

    data, path, _ = setup
    _targets(setup, tmp_path / "t")
    common = ["--model", "polyppvt-lite0", "--data", str(data), "--image-size", str(SIZE), "--batch-size", "2",
              "--workers", "0", "--pretrained", "none", "--val-fraction", "0.34", "--steps", "2", "--warmup", "0"]
    assert bench_train.main([*common, "--json", str(tmp_path / "b.json")]) == 0
    import json

    r = json.loads((tmp_path / "b.json").read_text())
    assert set(r["phase_ms_median"]) == {"data", "forward", "backward", "optimizer"} and r["images_per_s"] > 0
    assert bench_train.main([*common, "--kd-cost", "--kd", "kdas", "--teacher", str(path), "--teacher-targets",
                             str(tmp_path / "t"), "--json", str(tmp_path / "k.json")]) == 0
    k = json.loads((tmp_path / "k.json").read_text())
    assert set(k["ratio_to_plain"]) == {"plain", "live_teacher", "cached_targets"} and k["ratio_to_plain"]["plain"] == 1
    assert bench_train.main([*common, "--kd-cost", "--kd", "kdas"]) == 2  # no teacher: a named error


def test_teacher_targets_on_a_machine_without_the_gpu_asked_for_exits_4(tmp_path, capsys, monkeypatch):
    import torch

    from kdas_core.cli.conventions import EXIT_UNAVAILABLE
    from kdas_core.teacher_targets import main

    from .conftest import STUDENT

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = main(["--teacher", str(STUDENT), "--data", str(tmp_path), "--out", str(tmp_path / "t"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == EXIT_UNAVAILABLE and "no CUDA GPU is visible" in err and "internal error" not in err


def _cache_from_masks(setup, folder, sign=1.0):
    """A cache whose logits are the masks themselves (±10 per map), sign -1 their inverse."""
    data, path, _ = setup
    pairs = {Path(i).stem: m for i, m in resolve_layout(data).train}
    _, meta = teacher_targets.compute([str(path)], str(data), SIZE, progress=False)
    side = SIZE // targets_file.STRIDE
    rows = []
    for stem in meta["stems"]:
        mask = cv2.resize(cv2.imread(pairs[stem], cv2.IMREAD_GRAYSCALE), (side, side), interpolation=cv2.INTER_AREA)
        logit = torch.where(torch.from_numpy(mask) > 127, 10.0, -10.0) * sign
        rows.append(torch.stack([logit, logit]))
    targets_file.save(str(folder), torch.stack(rows).half(), meta)
    return folder


def test_score_rates_caches_on_the_validation_split_and_their_average(setup, tmp_path, capsys):
    data, _, _ = setup
    good = _cache_from_masks(setup, tmp_path / "good")
    bad = _cache_from_masks(setup, tmp_path / "bad", sign=-1.0)
    res = score_cached_targets([str(good), str(bad)], str(data), val_fraction=0.5)
    assert set(res) == {str(good), str(bad), "average of 2"}
    n = res[str(good)]["n"]
    assert n >= 1 and all(r["n"] == n for r in res.values())
    # the right mask is scored against the right cached row: the mask-shaped logits score high, their inverse near 0
    assert res[str(good)]["mDice"] > 0.75 and res[str(bad)]["mDice"] < 0.25
    # the logit average of a map and its inverse is 0 everywhere: p = .5, every pixel at the threshold predicted
    assert res["average of 2"]["mDice"] < res[str(good)]["mDice"]
    same = score_cached_targets([str(good), str(good)], str(data), val_fraction=0.5)
    assert same["average of 2"]["mDice"] == pytest.approx(same[str(good)]["mDice"], abs=1e-6)

    out = tmp_path / "scores.json"
    assert teacher_targets.main(["--score", str(good), "--data", str(data), "--val-fraction", "0.5",
                                 "--json", str(out)]) == 0
    assert "targets" in capsys.readouterr().out
    import json
    saved = json.loads(out.read_text())
    assert saved[str(good)]["mDice"] == pytest.approx(res[str(good)]["mDice"]) and saved[str(good)]["n"] == n


def test_score_refuses_what_it_cannot_judge(setup, tmp_path, capsys):
    data, path, _ = setup
    good = _cache_from_masks(setup, tmp_path / "good")
    common = ["--data", str(data), "--val-fraction", "0.5"]
    assert teacher_targets.main(["--score", str(good), "--teacher", str(path), *common]) == 2  # both modes
    assert teacher_targets.main(common) == 2  # neither
    assert teacher_targets.main(["--score", str(tmp_path / "nothing"), *common]) == 2
    assert "--score" in capsys.readouterr().err
    assert teacher_targets.main(["--score", str(path), *common]) == 2  # a checkpoint, not a cache
    assert "not a teacher-targets file" in capsys.readouterr().err
    stored, meta = teacher_targets.compute([str(path)], str(data), 128, progress=False)
    targets_file.save(str(tmp_path / "big"), stored, meta)
    assert teacher_targets.main(["--score", str(good), "--score", str(tmp_path / "big"), *common]) == 2
    assert "same --image-size" in capsys.readouterr().err
    assert teacher_targets.main(["--score", str(good), *common[:2], "--val-fraction", "0"]) == 2
    assert teacher_targets.main(["--score", str(good), *common, "--tta", "flip"]) == 2  # scored as made
    assert "scored as it was made" in capsys.readouterr().err
    assert teacher_targets.main(["--teacher", str(path), "--data", str(data)]) == 2  # making targets needs --out
    assert "--out is required" in capsys.readouterr().err


def test_multi_scale_targets_average_the_teacher_over_the_rates(setup, tmp_path, capsys):
    data, path, _ = setup
    one, _ = teacher_targets.compute([str(path)], str(data), SIZE, progress=False)
    twice, _ = teacher_targets.compute([str(path)], str(data), SIZE, progress=False, scales=(1.0, 1.0))
    assert torch.allclose(twice.float(), one.float(), atol=2e-3)  # the mean of a map with itself
    two, meta = teacher_targets.compute([str(path)], str(data), SIZE, progress=False, scales=(0.5, 1.0))
    half, _ = teacher_targets.compute([str(path)], str(data), SIZE, progress=False, scales=(0.5,))
    # the average of the per-scale maps, each resampled to the S/8 grid
    assert torch.allclose(two.float(), (one.float() + half.float()) / 2, atol=2e-2)
    assert not torch.allclose(half.float(), one.float(), atol=1e-2)
    assert meta["key"]["scales"] == [0.5, 1.0] and meta["key"]["teacher_sizes"] == [32, 64]
    common = ["--teacher", str(path), "--data", str(data), "--out", str(tmp_path / "t")]
    with pytest.raises(SystemExit) as bad:
        teacher_targets.main([*common, "--scales", "0.75,x"])
    assert bad.value.code == 2
    assert teacher_targets.main([*common, "--scales", "0.1"]) == 2
    assert "--scales" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
