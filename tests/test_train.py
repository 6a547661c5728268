"""End to end on a tiny synthetic set: train -> resume -> distill -> evaluate, and the CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdas_core import distill, evaluate, train
from kdas_core.io.checkpoint import read_metadata, read_tensors

FAST = ["--image-size", "64", "--batch-size", "4", "--workers", "0", "--no-progress", "--pretrained", "none",
        "--steps-per-epoch", "3", "--multiscale", "0.75,1"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "data"
    from kdas_core.data import synthetic

    assert synthetic.main(["--out", str(out), "--train", "24", "--test", "6", "--image-size", "64", "--seed", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def teacher_run(synthetic, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "teacher"
    assert train.main(["--model", "polyppvt-lite0", "--data", str(synthetic), "--out", str(run), "--epochs", "2", *FAST]) == 0
    return run


def test_train_writes_checkpoints_config_and_logs(teacher_run):
    for name in ("best.safetensors", "last.safetensors", "train_state.safetensors", "config.json", "log.csv"):
        assert (teacher_run / name).is_file(), name
    meta = read_metadata(str(teacher_run / "best.safetensors"))
    assert meta["input_size"] == 64 and meta["preset"] == "polyppvt-lite0"
    assert "mDice" in meta["val_metrics"] and meta["data"]["n_val"] >= 1
    assert meta["selection"] == "best validation mDice"
    rows = (teacher_run / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and "val_mDice" in rows[0]
    assert any(p.name.startswith("events") for p in (teacher_run / "tb").iterdir())


def test_interrupted_run_resumes_bit_for_bit(synthetic, tmp_path, monkeypatch):
    """Kill a run after epoch 1 (simulated by an exception from the second epoch's first step),
    resume it, and compare with an uninterrupted run."""
    from kdas_core.training import trainer

    straight = tmp_path / "straight"
    assert train.main(["--model", "polyppvt-lite0", "--data", str(synthetic), "--out", str(straight), "--epochs", "2", *FAST]) == 0

    broken = tmp_path / "broken"
    real_rescale = trainer._rescale
    calls = {"n": 0}

    def dying_rescale(image, mask, rate):
        calls["n"] += 1
        if calls["n"] == 4:  # first step of epoch 2 (3 steps per epoch)
            raise KeyboardInterrupt
        return real_rescale(image, mask, rate)

    monkeypatch.setattr(trainer, "_rescale", dying_rescale)
    assert train.main(["--model", "polyppvt-lite0", "--data", str(synthetic), "--out", str(broken), "--epochs", "2", *FAST]) == 130
    assert read_metadata(str(broken / "last.safetensors"))["epoch"] == 1
    monkeypatch.setattr(trainer, "_rescale", real_rescale)
    assert train.main(["--model", "polyppvt-lite0", "--data", str(synthetic), "--out", str(broken), "--epochs", "2", *FAST,
                       "--resume"]) == 0
    a, _ = read_tensors(str(straight / "last.safetensors"))
    b, _ = read_tensors(str(broken / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_time_limit_pauses_at_an_epoch_boundary_and_resume_finishes(synthetic, tmp_path, capsys):
    run = tmp_path / "limited"
    args = ["--model", "polyppvt-lite0", "--data", str(synthetic), "--out", str(run), "--epochs", "3", *FAST]
    # A limit far below one epoch: exactly one epoch runs, then the run pauses cleanly.
    assert train.main([*args, "--time-limit", "0.0001"]) == 0
    out = capsys.readouterr().out
    assert "paused at epoch 1" in out and "--resume" in out
    assert read_metadata(str(run / "last.safetensors"))["epoch"] == 1
    assert train.main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed at epoch 2: epochs 2..3" in out and "init: resumed from" in out and "after epoch 1" in out
    assert "starts again from its beginning" in out  # a partly done epoch is redone, and the log says so
    assert read_metadata(str(run / "last.safetensors"))["epoch"] == 3
    assert len((run / "log.csv").read_text().strip().splitlines()) == 1 + 3
    assert train.main([*args, "--resume"]) == 0  # finished: says so instead of "epochs 4..3"
    out = capsys.readouterr().out
    assert "all 3 epochs already done: nothing to train" in out and "4..3" not in out
    with pytest.raises(SystemExit):  # argparse: must be > 0
        train.main([*args, "--time-limit", "0"])


def test_a_log_gets_one_line_per_epoch_not_progress_bars(synthetic, tmp_path):
    """stderr/stdout are pipes here (as under nohup or SLURM): no tqdm redraws, one [kdas] line per epoch."""
    args = [a for a in FAST if a != "--no-progress"]
    cmd = [sys.executable, "-m", "kdas_core.train", "--model", "polyppvt-lite0", "--data", str(synthetic),
           "--out", str(tmp_path / "r"), "--epochs", "2", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "batch/s" not in r.stderr and "it/s" not in r.stderr
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("[kdas] epoch=")] == ["epoch=1", "epoch=2"]


def test_a_failed_start_leaves_no_empty_out_folder(synthetic, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    out = tmp_path / "student"
    assert distill.main(["--teacher", str(bad), "--model", "polyppvt-lite0", "--data", str(synthetic),
                         "--out", str(out), *FAST]) == 2
    assert not out.exists()


def test_distill_kdas_then_evaluate(synthetic, teacher_run, tmp_path, capsys):
    run = tmp_path / "student"
    teacher = str(teacher_run / "best.safetensors")
    assert distill.main(["--teacher", teacher, "--model", "polyppvt-lite0", "--data", str(synthetic), "--out", str(run),
                         "--epochs", "1", "--kd", "kdas", *FAST]) == 0
    meta = read_metadata(str(run / "best.safetensors"))
    assert meta["kd"] == "kdas" and meta["teachers"][0]["preset"] == "polyppvt-lite0"
    # the weights the bare name resolved to travel with the file (a later default cannot relabel it)
    assert meta["kd_weights"] == {"kdas": 0.5} and meta["epochs"] == 1
    log = (run / "log.csv").read_text()
    assert "train_kdas/attn_kl" in log and "train_kdas/sgm" in log

    out_json = tmp_path / "eval.json"
    capsys.readouterr()
    assert evaluate.main(["--weights", str(run), "--data", str(synthetic), "--json", str(out_json),  # the run folder
                          "--device", "cpu"]) == 0
    assert f"--weights {run}: a run folder; using its best.safetensors" in capsys.readouterr().err
    result = json.loads(out_json.read_text())
    assert set(result) == {"Synthetic"}
    assert {"mDice", "mIoU", "Sm", "Em", "wFm", "MAE", "n"} <= set(result["Synthetic"])
    assert result["Synthetic"]["n"] == 6


def test_pretrained_timm_without_network_says_what_to_do_instead(synthetic, tmp_path, capsys, monkeypatch):
    """The hub download failing (here: no network, as the hub library reports it) is exit 4 with
    the way out, not the hub library's own message as a usage error."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    from kdas_core.models import encoder

    real = encoder.timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(encoder.timm, "create_model", offline)
    code = train.main(["--model", "polyppvt-lite0", "--data", str(synthetic), "--out", str(tmp_path / "r"), *FAST,
                       "--pretrained", "timm"])
    err = capsys.readouterr().err
    assert code == 4, err
    assert "--pretrained timm" in err and "need the network" in err and "--pretrained PATH" in err
    assert "internal error" not in err and not (tmp_path / "r" / "last.safetensors").exists()


def test_train_replays_a_distillation_config_as_its_no_kd_twin(teacher_run, tmp_path, capsys):
    config = json.loads((teacher_run / "config.json").read_text())
    config.update(kd="kdas", teachers=[str(tmp_path / "gone.safetensors")], teacher_targets=str(tmp_path / "gone"))
    path = tmp_path / "distill-config.json"
    path.write_text(json.dumps(config))
    run = tmp_path / "twin"
    assert train.main(["--config", str(path), "--out", str(run), "--epochs", "1"]) == 0
    assert "no-KD twin" in capsys.readouterr().err
    saved = json.loads((run / "config.json").read_text())
    assert saved["kd"] == "none" and saved["teachers"] == [] and saved["teacher_targets"] is None
    assert {k: v for k, v in saved.items() if k not in ("kd", "teachers", "teacher_targets", "out", "epochs", "resolved")} \
        == {k: v for k, v in config.items() if k not in ("kd", "teachers", "teacher_targets", "out", "epochs", "resolved")}


def test_cli_errors_are_clear(synthetic, teacher_run, tmp_path, capsys):
    assert train.main(["--model", "polyppvt-lite0", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), *FAST]) == 2
    assert "no such data folder" in capsys.readouterr().err
    assert train.main(["--model", "polyppvt-lite0", "--data", str(synthetic), "--out", str(teacher_run), *FAST]) == 2
    assert "--resume" in capsys.readouterr().err
    assert train.main(["--model", "polyppvt-lite0", "--data", str(synthetic), "--out", str(tmp_path / "new"), "--resume", *FAST]) == 2
    assert distill.main(["--teacher", str(teacher_run / "best.safetensors"), "--model", "polyppvt-lite0", "--data",
                         str(synthetic), "--out", str(tmp_path / "s"), "--kd", "bogus", *FAST]) == 2
    assert "unknown --kd method" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    assert distill.main(["--teacher", str(bad), "--model", "polyppvt-lite0", "--data", str(synthetic),
                         "--out", str(tmp_path / "s2"), *FAST]) == 2
    assert "bad.safetensors" in capsys.readouterr().err


def test_help_lists_models_and_kd_methods():
    out = subprocess.run([sys.executable, "-m", "kdas_core.distill", "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("polyppvt-b2", "polyppvt-lite0", "kdas", "hlfd", "grd", "--resume"):
        assert word in out


@pytest.mark.slow
def test_torchrun_two_processes(synthetic, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    run = tmp_path / "ddp"
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "kdas_core.train", "--model", "polyppvt-lite0",
                           "--data", str(synthetic), "--out", str(run), "--epochs", "1", "--device", "cpu", *FAST],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("[kdas] done") == 1  # rank 0 only
    assert (run / "best.safetensors").is_file()
