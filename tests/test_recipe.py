"""The training recipe is what it says: seeded initialisation, honest test sets, a leak-free split,
recipes and --config, and the step variants (multi-scale 'all', value clipping, image cache)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdas_core import ablate, train
from kdas_core.data import resolve_layout, split_by_groups
from kdas_core.data.dataset import TrainDataset
from kdas_core.training import trainer
from kdas_core.training.config import RECIPES, add_training_args, config_from_args, defaults
from kdas_core.losses.structure import boundary_weights

from .conftest import shared_data, write_pair_folder

FAST = ["--image-size", "64", "--batch-size", "4", "--workers", "0", "--no-progress", "--pretrained", "none",
        "--steps-per-epoch", "2", "--multiscale", "1", "--no-cache-images", "--progressive", "off"]


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    from kdas_core.data import synthetic

    out = tmp_path_factory.mktemp("syn") / "data"
    synthetic.main(["--out", str(out), "--train", "16", "--test", "4", "--image-size", "64", "--seed", "5"])
    return out


def _cfg(*argv: str):
    p = argparse.ArgumentParser()
    add_training_args(p)
    return config_from_args(p.parse_args(list(argv)))


# --- bug 1: --seed controls the initialisation ------------------------------------------------

def test_same_seed_same_initial_weights_whatever_ran_before():
    cfg = _cfg("--model", "polyppvt-lite0", "--data", "d", "--out", "o", "--pretrained", "none", "--seed", "7")
    a = trainer.init_student(cfg).state_dict()
    torch.randn(1000)  # other work in the same process (an earlier ablation row, say) moves the RNG
    b = trainer.init_student(cfg).state_dict()
    other = trainer.init_student(_cfg("--model", "polyppvt-lite0", "--data", "d", "--out", "o",
                                      "--pretrained", "none", "--seed", "8")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], other[k]) for k in a if a[k].is_floating_point())


def test_two_runs_with_one_seed_have_identical_first_epoch_losses(syn, tmp_path):
    losses = []
    for name in ("a", "b"):
        torch.randn(100)
        assert train.main(["--model", "polyppvt-lite0", "--data", str(syn), "--out", str(tmp_path / name),
                           "--epochs", "1", "--seed", "3", *FAST]) == 0
        with open(tmp_path / name / "log.csv") as f:
            losses.append(next(csv.DictReader(f))["train_loss"])
    assert losses[0] == losses[1]


# --- bug 2: a plain folder has no test set ---------------------------------------------------

def test_plain_folder_is_training_data_not_a_test_set(tmp_path, capsys):
    data = write_pair_folder(tmp_path / "plain", 10)
    layout = resolve_layout(data)
    assert layout.tests == {} and len(layout.evaluation_sets()["plain"]) == 10
    assert train.main(["--model", "polyppvt-lite0", "--data", str(data), "--out", str(tmp_path / "run"),
                       "--epochs", "1", "--val-fraction", "0.2", *FAST]) == 0
    assert "no test set" in capsys.readouterr().out
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["resolved"]["data"]["test_sets"] == {}


def test_ablate_refuses_to_call_training_data_test(tmp_path, capsys):
    data = write_pair_folder(tmp_path / "plain", 8)
    rc = ablate.main(["--teacher", str(tmp_path / "t.safetensors"), "--model", "polyppvt-lite0", "--data", str(data),
                      "--methods", "kd", "--out", str(tmp_path / "abl"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "training data" in err and "--test-data" in err
    assert not (tmp_path / "abl").exists()


# --- bug 3: a leak-free split -----------------------------------------------------------------

def _gray64(path: str) -> np.ndarray:
    g = cv2.resize(cv2.imread(path, cv2.IMREAD_GRAYSCALE), (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
    g -= g.mean()
    return g / (np.linalg.norm(g) + 1e-6)


def _worst_leak(split) -> float:
    """Largest similarity of a validation image to any training image, by a measure independent of
    the one the split uses (normalised cross-correlation of 64x64 grey images)."""
    tr = np.stack([_gray64(p[0]) for p in split.train])
    va = np.stack([_gray64(p[0]) for p in split.val])
    return float((va @ tr.T).max())


@pytest.mark.realdata
def test_no_validation_image_has_a_near_duplicate_in_training():
    layout = resolve_layout(shared_data("polyp-352"))
    old = split_by_groups(layout.train, 0.1, "none")
    new = split_by_groups(layout.train, 0.1, "auto")
    assert _worst_leak(old) > 0.98  # the stem split puts copies of validation frames into training
    assert _worst_leak(new) < 0.95
    assert 0.09 <= len(new.val) / len(layout.train) <= 0.12 and new.n_groups < len(layout.train)


def test_groups_csv_keeps_a_group_together_and_names_bad_rows(tmp_path):
    data = write_pair_folder(tmp_path / "set", 20)
    pairs = resolve_layout(data).train
    groups = tmp_path / "groups.csv"
    groups.write_text("stem,group\n" + "".join(f"{i:03d},{i // 5}\n" for i in range(20)))
    split = split_by_groups(pairs, 0.25, str(groups))
    assert split.n_groups == 4
    val_groups = {int(Path(p[0]).stem) // 5 for p in split.val}
    train_groups = {int(Path(p[0]).stem) // 5 for p in split.train}
    assert val_groups and not val_groups & train_groups
    groups.write_text("000,a\n000,b\n")
    with pytest.raises(ValueError, match="groups.csv:2"):
        split_by_groups(pairs, 0.25, str(groups))


def test_groups_none_is_the_earlier_stem_split(tmp_path):
    from kdas_core.data import split_train_val

    pairs = resolve_layout(write_pair_folder(tmp_path / "set", 30)).train
    assert split_train_val(pairs, 0.1) == (split_by_groups(pairs, 0.1, "none").train, split_by_groups(pairs, 0.1, "none").val)


# --- recipes and --config ---------------------------------------------------------------------

def test_recipe_sets_defaults_and_flags_override_it():
    base = ["--model", "polyppvt-lite0", "--data", "d", "--out", "o"]
    pub = _cfg(*base, "--recipe", "published")
    assert (pub.multiscale_mode, pub.clip_mode, pub.augment, pub.schedule) == ("all", "value", False, "constant")
    assert _cfg(*base, "--recipe", "published", "--augment").augment is True
    default = _cfg(*base)  # recipe fast: every field not given on the command line keeps its dataclass default
    given = {"model": "polyppvt-lite0", "data": "d", "out": "o"}
    assert default.recipe == "fast" and {k: getattr(default, k) for k in defaults()} == {**defaults(), **given}
    v1 = _cfg(*base, "--recipe", "v1", "--epochs", "3")
    assert (v1.lr, v1.decoder_lr_mult, v1.warmup_epochs, v1.progressive, v1.epochs) == (1e-4, 1.0, 1.0, None, 3)
    assert (pub.lr, pub.decoder_lr_mult, pub.progressive) == (1e-4, 1.0, None)  # published = v1's optimiser
    assert all(k in defaults() for r in RECIPES.values() for k in r)


def test_config_file_replays_a_run_and_flags_override(syn, tmp_path):
    run = tmp_path / "run"
    assert train.main(["--model", "polyppvt-lite0", "--data", str(syn), "--out", str(run), "--epochs", "1",
                       "--lr", "3e-4", "--recipe", "v1", *FAST]) == 0
    written = json.loads((run / "config.json").read_text())
    replay = _cfg("--config", str(run / "config.json"))
    assert {k: v for k, v in replay.to_dict().items()} == {k: v for k, v in written.items() if k != "resolved"}
    assert _cfg("--config", str(run / "config.json"), "--epochs", "5").epochs == 5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "polyppvt-lite0", "lr_typo": 1}))
    with pytest.raises(ValueError, match="lr_typo"):
        _cfg("--config", str(bad))


def test_config_replay_starts_afresh_and_names_the_options_an_old_config_lacks(tmp_path, capsys):
    """A resumed run's config.json says resume: true; replaying it into a new folder must not try
    to resume there. A config written before some options existed says which take today's values."""
    full = {**defaults(), "model": "polyppvt-lite0", "data": "d", "out": "o", "resume": True}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**full, "multiscale": list(full["multiscale"]), "progressive": list(full["progressive"])}))
    assert _cfg("--config", str(path), "--out", "new").resume is False
    assert _cfg("--config", str(path), "--resume").resume is True
    assert "note" not in capsys.readouterr().err
    old = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("frozen_stages", "step")}
    path.write_text(json.dumps(old))
    _cfg("--config", str(path))
    err = capsys.readouterr().err
    assert "--frozen-stages, --step" in err and str(path) in err and "--resume" not in err
    assert _cfg("--config", str(path), "--step", "baseline").step == "baseline"
    assert "note" not in capsys.readouterr().err  # --step sets both


def test_missing_required_flags_are_named():
    with pytest.raises(ValueError, match="--data, --out"):
        _cfg("--model", "polyppvt-lite0")


# --- step variants ----------------------------------------------------------------------------

def test_multiscale_all_takes_a_step_per_scale(syn, tmp_path):
    from kdas_core.io.checkpoint import read_tensors

    run = tmp_path / "all"
    args = [a for a in FAST if a not in ("--multiscale", "1")]
    assert train.main(["--model", "polyppvt-lite0", "--data", str(syn), "--out", str(run), "--epochs", "1",
                       "--multiscale", "0.5,1", "--multiscale-mode", "all", *args]) == 0
    _, meta = read_tensors(str(run / "train_state.safetensors"))
    assert meta["progress"]["step"] == 2 * 2  # 2 batches x 2 scales


def test_value_clipping_clamps_each_gradient(monkeypatch, syn, tmp_path):
    seen = {}
    real = torch.nn.utils.clip_grad_value_

    def spy(params, clip):
        seen["clip"] = clip
        real(params, clip)
        seen["max"] = max(float(p.grad.abs().max()) for p in params if p.grad is not None)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_value_", spy)
    assert train.main(["--model", "polyppvt-lite0", "--data", str(syn), "--out", str(tmp_path / "v"), "--epochs", "1",
                       "--clip-mode", "value", "--clip-grad", "0.01", *FAST]) == 0
    assert seen["clip"] == 0.01 and seen["max"] <= 0.01


def test_image_cache_gives_the_same_samples(syn):
    pairs = resolve_layout(syn).train[:4]
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    plain = TrainDataset(pairs, 48, mean, std, augment=True)
    cached = TrainDataset(pairs, 48, mean, std, augment=True, cache=True)
    for i in range(4):
        torch.manual_seed(i)
        a = plain[i]
        torch.manual_seed(i)
        b = cached[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_separable_boundary_weights_equal_the_2d_pool():
    mask = (torch.rand(2, 1, 70, 90) > 0.7).float()
    ref = 1 + 5 * torch.abs(F.avg_pool2d(mask, kernel_size=31, stride=1, padding=15) - mask)
    assert torch.allclose(boundary_weights(mask), ref, atol=1e-5)


# --- time to accuracy -------------------------------------------------------------------------

def _log(run: Path, rows: list[tuple[float, float]]) -> Path:
    run.mkdir(parents=True)
    (run / "log.csv").write_text("epoch,wall_min,val_mDice\n" + "".join(f"{i + 1},{t},{v}\n" for i, (t, v) in enumerate(rows)))
    return run


def test_time_to_accuracy_reads_the_baseline_at_its_budget(tmp_path):
    from kdas_core import time_to_accuracy as tta

    base = _log(tmp_path / "base", [(20, 0.70), (40, 0.80), (61, 0.85)])
    cand = _log(tmp_path / "cand", [(10, 0.75), (19, 0.79), (25, 0.81), (50, 0.84)])
    r = tta.compare(tta.read_curve(str(base)), tta.read_curve(str(cand)), at=60)
    # 61 min is past the budget: the baseline has .80 at 60 min; the candidate passes it at 25 min.
    assert r["baseline_val_mDice_at"] == 0.80 and r["candidate_min_to_reach"] == 25 and r["target_met"]
    assert tta.main(["--baseline", str(base), "--candidate", str(cand), "--json", str(tmp_path / "t.json"),
                     "--png", str(tmp_path / "t.png")]) == 0
    assert cv2.imread(str(tmp_path / "t.png")).shape == (540, 900, 3)
    assert tta.main(["--baseline", str(tmp_path / "nope"), "--candidate", str(cand)]) == 2
