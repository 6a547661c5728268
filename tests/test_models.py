import pytest
import torch

from kdas_core.models import PRESETS, create_model, list_models


@pytest.mark.parametrize("name", list_models())
def test_every_preset_forward_shapes(name):
    model = create_model(name).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        out = model(x)
    assert out["p1"].shape == out["p2"].shape == (1, 1, 96, 96)
    assert [f.shape[-1] for f in out["features"]] == [24, 12, 6, 3]
    assert out["cfm"].shape[-2:] == out["sam"].shape[-2:] == (12, 12)
    assert torch.isfinite(model.predict_logits(x)).all()


def test_param_counts_match_the_paper():
    # Paper: teacher 25.1 M, KDAS student 3.65 M.
    count = lambda n: sum(p.numel() for p in create_model(n).parameters()) / 1e6  # noqa: E731
    assert abs(count("polyppvt-b2") - 25.1) < 0.05
    assert abs(count("polyppvt-b0") - 3.65) < 0.01


def test_non_square_and_odd_sizes():
    model = create_model("polyppvt-lite0").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 100, 148))
    assert out["p1"].shape == (2, 1, 100, 148)


def test_unknown_model_lists_presets():
    with pytest.raises(ValueError, match="polyppvt-b2"):
        create_model("polyppvt-b7")


def test_custom_timm_backbone():
    model = create_model("polyppvt:resnet18").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64))["p2"].shape == (1, 1, 64, 64)


def test_presets_carry_normalisation():
    for p in PRESETS.values():
        assert len(p.mean) == len(p.std) == 3 and p.input_size > 0


def test_macs_scale_with_resolution_and_model_size():
    from kdas_core.models.cost import count_macs

    small = create_model("polyppvt-lite0")
    assert 3.5 < count_macs(small, 256) / count_macs(small, 128) < 4.5
    assert count_macs(create_model("polyppvt-b0"), 128) > count_macs(small, 128)
