"""`kdas_core.ablate`: a tiny end-to-end ablation on synthetic data (CPU, one step per method)."""

from __future__ import annotations

import json

import pytest

from kdas_core.ablate import main, markdown_table, parse_methods, run_dir_name


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from kdas_core.io.checkpoint import build_metadata, save_checkpoint
    from kdas_core.data.synthetic import write_dataset
    from kdas_core.models import create_model

    root = tmp_path_factory.mktemp("ablate")
    data = write_dataset(root / "data", n_train=6, n_test=3, size=64, seed=0)
    teacher = create_model("polyppvt-lite0")  # an untrained stand-in: only the plumbing is tested
    ckpt = str(root / "teacher.safetensors")
    save_checkpoint(ckpt, teacher, build_metadata("polyppvt-lite0", input_size=64))
    return root, str(data), ckpt


def _args(root, data, ckpt, methods, *extra):
    return ["--teacher", ckpt, "--model", "polyppvt-lite0", "--data", data, "--methods", methods,
            "--out", str(root / "abl"), "--epochs", "1", "--steps-per-epoch", "1", "--image-size", "64",
            "--batch-size", "2", "--device", "cpu", "--pretrained", "none", "--multiscale", "1",
            "--workers", "0", "--val-fraction", "0.34", "--no-progress", "--seed", "3", *extra]


def test_parse_methods():
    assert parse_methods("kdas,kdas+cwd:0.5") == [("none", "none"), ("kdas", "kdas"), ("kdas+cwd:0.5", "kdas,cwd:0.5")]
    assert parse_methods("none,kd", baseline=False) == [("none", "none"), ("kd", "kd")]
    assert run_dir_name("kdas+cwd:0.5") == "kdas+cwd-0.5"
    with pytest.raises(ValueError, match="unknown --kd method"):
        parse_methods("kdas,nope")


def test_unknown_method_fails_before_training(tiny_setup, capsys):
    root, data, ckpt = tiny_setup
    assert main(_args(root, data, ckpt, "kd,hfld")) == 2
    assert "unknown --kd method 'hfld'" in capsys.readouterr().err
    assert not (root / "abl" / "none").exists()


def test_tiny_ablation_writes_tables_and_resumes(tiny_setup, monkeypatch):
    root, data, ckpt = tiny_setup
    assert main(_args(root, data, ckpt, "hlfd+cwd:0.5")) == 0
    out = root / "abl"
    report = json.loads((out / "ablation.json").read_text())
    labels = [r["label"] for r in report["rows"]]
    assert labels == ["teacher polyppvt-lite0", "none", "hlfd+cwd:0.5"]
    for r in report["rows"]:
        assert set(r["tests"]) == {"Synthetic"}
        t = r["tests"]["Synthetic"]
        assert 0.0 <= t["mDice"] <= 1.0 and "mIoU" in t
        # the papers' metric is scored on min-max normalised maps: its own pass, not a copy of the raw one
        assert 0.0 <= t["mDice_mean256_minmax"] <= 1.0 and 0.0 <= t["mIoU_mean256_minmax"] <= 1.0
        assert r["mean"]["meanDic"] == t["mDice_mean256_minmax"]
        assert r["params"] > 1e6
    students = [r for r in report["rows"] if r["role"] == "student"]
    assert all(r["train_seconds"] > 0 and r["mean"]["mDice"] is not None for r in students)
    assert students[1]["kd"] == "hlfd,cwd:0.5"
    md = (out / "ablation.md").read_text()
    assert ("| Method | Params (M) | Train time | Val mDice | Synthetic mDice | Synthetic mIoU | Synthetic meanDic "
            "| Mean mDice | Mean mIoU | Mean meanDic |") in md
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + 3  # column names + 3 rows

    # --resume keeps finished rows (and the teacher's evaluation) without training or evaluating again.
    import kdas_core.ablate as ablate
    import kdas_core.training.trainer as trainer

    def refuse(*a, **k):
        raise AssertionError("--resume redid finished work")

    monkeypatch.setattr(ablate, "evaluate_checkpoint", refuse)
    monkeypatch.setattr(trainer, "run_training", refuse)
    assert main(_args(root, data, ckpt, "hlfd+cwd:0.5", "--resume")) == 0
    again = json.loads((out / "ablation.json").read_text())
    assert [r["label"] for r in again["rows"]] == labels
    assert again["rows"][1]["tests"] == report["rows"][1]["tests"]
    assert main(_args(root, data, ckpt, "hlfd+cwd:0.5", "--resume", "--no-teacher-rows")) == 0
    assert [r["label"] for r in json.loads((out / "ablation.json").read_text())["rows"]] == labels[1:]


def test_time_limit_pauses_the_ablation_and_resume_completes_it(tiny_setup, capsys):
    root, data, ckpt = tiny_setup
    args = _args(root, data, ckpt, "kd", "--no-teacher-rows", "--epochs", "2")
    args[args.index("--out") + 1] = str(root / "abl-limited")
    assert main([*args, "--time-limit", "0.0001"]) == 0
    assert "--resume" in capsys.readouterr().out
    out = root / "abl-limited"
    assert not (out / "ablation.json").exists() and not (out / "kd").exists()  # paused inside 'none'
    assert (out / "none" / "last.safetensors").exists()
    assert main([*args, "--resume"]) == 0
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["none", "kd"]


def test_markdown_table_bolds_best_student_only():
    def row(label, role, params, secs, dice, iou, paper, val=None):
        t = {"mDice": dice, "mIoU": iou, "mDice_mean256_minmax": paper}
        return {"label": label, "role": role, "params": params, "train_seconds": secs, "best_val_mDice": val,
                "tests": {"A": t}, "mean": {"mDice": dice, "mIoU": iou, "meanDic": paper}}

    rows = [row("teacher", "teacher", 25e6, None, 0.9, 0.8, 0.95),
            row("none", "student", 3e6, 75, 0.5, 0.4, 0.7, val=0.61),
            row("kd", "student", 3e6, 3700, 0.6, 0.5, 0.65, val=0.62)]
    md = markdown_table(rows, ["A"])
    # each mean column bolds its own best student: kd for mDice/mIoU, none for meanDic; never the teacher
    assert "| kd | 3.00 | 1h01m | 0.6200 | 0.6000 | 0.5000 | 0.6500 | **0.6000** | **0.5000** | 0.6500 |" in md
    assert "| none | 3.00 | 1m15s | 0.6100 | 0.5000 | 0.4000 | 0.7000 | 0.5000 | 0.4000 | **0.7000** |" in md
    assert "| teacher | 25.00 | - | - | 0.9000 | 0.8000 | 0.9500 | 0.9000 | 0.8000 | 0.9500 |" in md
