"""The training step's speed options do what they say: frozen stages stop learning and stop
backward, the named step settings resolve as documented and replay from config.json, bench_train
--compare times both, a resumed run refuses a different configuration, and a distillation's
teacher flags replay from --config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from kdas_core import bench_train, distill, train
from kdas_core.io.checkpoint import read_tensors
from kdas_core.models import create_model
from kdas_core.training import trainer
from kdas_core.training.config import STEPS, add_training_args, config_from_args

FAST = ["--image-size", "64", "--batch-size", "4", "--workers", "0", "--no-progress", "--pretrained", "none",
        "--steps-per-epoch", "2", "--multiscale", "1", "--progressive", "off"]


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    from kdas_core.data import synthetic

    out = tmp_path_factory.mktemp("syn") / "data"
    synthetic.main(["--out", str(out), "--train", "16", "--test", "4", "--image-size", "64", "--seed", "5"])
    return out


def _cfg(*argv: str, kd: str | None = None):
    p = argparse.ArgumentParser()
    add_training_args(p, kd=kd)
    return config_from_args(p.parse_args(list(argv)))


@pytest.mark.parametrize("model", ["polyppvt-lite0", "polyppvt-b0"])
def test_frozen_stages_get_no_gradient_keep_their_statistics_and_the_rest_learns(model):
    torch.manual_seed(0)
    m = create_model(model, pretrained=None)
    n_frozen = m.encoder.freeze(1)
    m.train()
    frozen = [p for p in m.encoder.parameters() if not p.requires_grad]
    assert n_frozen == sum(p.numel() for p in frozen) > 0
    bn_before = {k: v.clone() for k, v in m.encoder.state_dict().items() if "running" in k}
    out = m(torch.randn(2, 3, 64, 64))
    # the stride-4 features come from frozen weights only: nothing in them asks for a gradient
    assert not out["features"][0].requires_grad and out["features"][1].requires_grad
    (out["p1"] + out["p2"]).mean().backward()
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in m.decoder.parameters())
    learning = [p for p in m.encoder.parameters() if p.requires_grad]
    assert learning and all(p.grad is not None for p in learning)
    after = m.encoder.state_dict()
    moved = [k for k, v in bn_before.items() if not torch.equal(v, after[k])]
    frozen_bn = {id(b) for b in m.encoder._fixed_bn}
    for name, mod in m.encoder.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            changed = any(k.startswith(f"{name}.running") for k in moved)
            assert changed == (id(mod) not in frozen_bn), name  # frozen BNs keep theirs, the others move
    assert m.encoder.freeze(0) == 0 and all(p.requires_grad for p in m.parameters())


def test_freeze_out_of_range_is_a_named_error():
    from kdas_core.cli.conventions import UsageError

    m = create_model("polyppvt-lite0", pretrained=None)
    with pytest.raises(UsageError, match="--frozen-stages"):
        m.encoder.freeze(5)
    with pytest.raises(UsageError, match="--frozen-stages must be 0..4"):
        _cfg("--model", "polyppvt-lite0", "--data", "d", "--out", "o", "--frozen-stages", "7")
    with pytest.raises(UsageError, match="--frozen-for"):
        _cfg("--model", "polyppvt-lite0", "--data", "d", "--out", "o", "--frozen-for", "1.5")


def test_step_settings_resolve_and_flags_override_them():
    base = ("--model", "polyppvt-lite0", "--data", "d", "--out", "o")
    d = _cfg(*base)
    b = _cfg(*base, "--step", "baseline")
    assert d.step == "default" and d.frozen_stages == 2 and d.optimizer_impl == "fused"
    assert b.step == "baseline" and all(getattr(b, k) == v for k, v in STEPS["baseline"].items())
    mixed = _cfg(*base, "--step", "baseline", "--frozen-stages", "3")
    assert mixed.frozen_stages == 3 and mixed.optimizer_impl == STEPS["baseline"]["optimizer_impl"]


def test_frozen_for_unfreezes_mid_run_and_the_optimiser_then_moves_those_weights(syn, tmp_path):
    run = tmp_path / "r"
    assert train.main(["--model", "polyppvt-lite0", "--data", str(syn), "--out", str(run), "--epochs", "2",
                       "--frozen-stages", "1", "--frozen-for", "0.5", *FAST]) == 0
    m = trainer.init_student(_cfg("--model", "polyppvt-lite0", "--data", "d", "--out", "o", "--pretrained", "none"))
    m.encoder.freeze(1)
    frozen_names = {n for n, p in m.named_parameters() if not p.requires_grad}
    start = m.state_dict()
    last, _ = read_tensors(str(run / "last.safetensors"))
    # epoch 2 trained the stem too: frozen only for the first half
    assert any(not torch.equal(start[n], last[n]) for n in frozen_names)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["frozen_for"] == 0.5 and cfg["resolved"]["params_frozen_at_start"] > 0


def test_frozen_all_run_keeps_the_frozen_weights_exactly(syn, tmp_path):
    run = tmp_path / "r"
    assert train.main(["--model", "polyppvt-lite0", "--data", str(syn), "--out", str(run), "--epochs", "1", *FAST]) == 0
    m = trainer.init_student(_cfg("--model", "polyppvt-lite0", "--data", "d", "--out", "o", "--pretrained", "none"))
    m.encoder.freeze(1)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    start, (last, _) = m.state_dict(), read_tensors(str(run / "last.safetensors"))
    assert frozen and all(torch.equal(start[n], last[n]) for n in frozen)
    assert any(not torch.equal(start[n], last[n]) for n in last if n not in frozen and "running" not in n)


def test_resume_refuses_a_run_trained_differently_and_keeps_its_config(syn, tmp_path, capsys):
    run = tmp_path / "r"
    args = ["--model", "polyppvt-lite0", "--data", str(syn), "--out", str(run), "--epochs", "2", *FAST]
    assert train.main([*args, "--time-limit", "0.0001"]) == 0
    saved = (run / "config.json").read_text()
    capsys.readouterr()
    assert train.main([*args, "--resume", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "lr: run 0.0002, now 0.01" in err and "--config" in err
    assert train.main([*args, "--resume", "--step", "baseline"]) == 2
    assert "frozen_stages: run 2, now 0" in capsys.readouterr().err
    assert (run / "config.json").read_text() == saved
    # how a run is driven may change: threads and the time limit
    assert train.main([*args, "--resume", "--threads", "1"]) == 0


def test_distill_config_replays_its_teachers_and_method(syn, tmp_path):
    """--config of a distillation replays its --kd and --teacher-targets: the command's own
    defaults (distill: --kd kdas) never override the file."""
    cfg_file = tmp_path / "config.json"
    written = _cfg("--model", "polyppvt-lite0", "--data", "d", "--out", "o", kd="kdas").to_dict()
    written.update(kd="kd:2", teacher_targets="/targets", teachers=["/t.safetensors"])
    cfg_file.write_text(json.dumps(written))
    parser = distill.build_parser()
    replay = config_from_args(parser.parse_args(["--config", str(cfg_file)]))
    assert (replay.kd, replay.teacher_targets, replay.teachers) == ("kd:2", "/targets", ["/t.safetensors"])
    again = config_from_args(parser.parse_args(["--config", str(cfg_file), "--kd", "kdas"]))
    assert again.kd == "kdas" and again.teacher_targets == "/targets"  # a flag given overrides the file
    fresh = config_from_args(parser.parse_args(["--model", "m", "--data", "d", "--out", "o", "--teacher", "t"]))
    assert fresh.kd == "kdas" and fresh.teachers == ["t"]


def test_bench_train_compare_times_both_settings_and_reports_the_speedup(syn, tmp_path, capsys):
    out = tmp_path / "c.json"
    assert bench_train.main(["--model", "polyppvt-lite0", "--data", str(syn), "--image-size", "64", "--batch-size", "2",
                             "--workers", "0", "--pretrained", "none", "--steps", "2", "--warmup", "1",
                             "--compare", "baseline", "default", "--json", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    r = json.loads(out.read_text())
    assert printed[-1] == f"speedup {r['speedup']:.2f}×"
    assert r["order"] == ["baseline", "default"]
    base, new = r["settings"]["baseline"], r["settings"]["default"]
    assert base["step_options"]["frozen_stages"] == 0 and new["step_options"]["frozen_stages"] == 2
    for fig in (base, new):
        assert set(fig["phase_ms_median"]) == {"data", "forward", "backward", "optimizer"}
    assert r["speedup"] == round(new["images_per_s"] / base["images_per_s"], 3)
    assert bench_train.main(["--model", "polyppvt-lite0", "--data", str(syn), "--compare", "default", "default"]) == 2


def test_folded_frozen_batchnorm_computes_the_same_features_and_leaves_the_weights_alone():
    torch.manual_seed(0)
    m = create_model("polyppvt-lite0", pretrained=None)
    for mod in m.encoder.modules():  # statistics unlike a fresh BatchNorm's, so folding them matters
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 3, 96, 96)
    m.encoder.freeze(2, fold=False)
    m.eval()
    with torch.no_grad():
        plain = m(x)["features"][:2]
    m.encoder.freeze(2, fold=True)
    assert sum(getattr(q, "_kdas_folded", False) for q in m.modules()) > 0
    m = m.to(memory_format=torch.channels_last)  # folded weights follow a change of layout
    with torch.no_grad():
        folded = m(x.contiguous(memory_format=torch.channels_last))["features"][:2]
    for a, b in zip(plain, folded):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(weights[k], v) for k, v in m.state_dict().items())
    m.encoder.freeze(0)
    assert not any(getattr(q, "_kdas_folded", False) for q in m.modules())


def test_a_run_on_all_training_images_reports_its_last_epoch_not_a_validation_score(syn, tmp_path, capsys):
    run = tmp_path / "refit"
    assert train.main(["--model", "polyppvt-lite0", "--data", str(syn), "--out", str(run), "--epochs", "1",
                       "--val-fraction", "0", *FAST]) == 0
    out = capsys.readouterr().out
    assert "the model is the last epoch" in out and str(run / "last.safetensors") in out
    assert "-1.0000" not in out
