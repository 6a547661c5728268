"""Backbone encoders: any timm model with four feature stages at strides 4/8/16/32."""

from __future__ import annotations

import os

import timm
import torch
import torch.nn as nn

from kdas_core.models.efficientnet_lite_weights import PACKAGES as OFFLINE_PACKAGES, load_offline_imagenet
from kdas_core.cli.conventions import UnavailableError, UsageError


class Encoder(nn.Module):
    """Wraps `timm.create_model(..., features_only=True)` and exposes the 4 stages at strides 4..32."""

    def __init__(self, backbone: str):
        super().__init__()
        try:
            probe = timm.create_model(backbone, pretrained=False, features_only=True)
        except RuntimeError as exc:  # timm: "Unknown model (...)": a typo in polyppvt:<backbone>
            if "Unknown model" not in str(exc):
                raise
            raise UsageError(f"backbone {backbone!r}: timm has no such model (timm.list_models('*{backbone[:6]}*') "
                             "lists similar names)") from None
        reductions = probe.feature_info.reduction()
        wanted = [reductions.index(r) for r in (4, 8, 16, 32) if r in reductions]
        if len(wanted) != 4:
            raise UsageError(f"backbone {backbone!r} has no stages at strides 4/8/16/32 (it has {reductions})")
        self.backbone_name = backbone
        self.body = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=tuple(wanted))
        self.channels: list[int] = self.body.feature_info.channels()
        self.frozen_stages = 0
        self.frozen_bn_stats = False
        self._fixed_bn: list[nn.Module] = []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))

    def freeze(self, stages: int = 0, bn_stats: bool = False, fold: bool = True) -> int:
        """Fix the first `stages` of the four feature stages (0..4), counting from the input and
        including the stem: every weight the stride-4 .. stride-(2 ** (stages + 1)) features depend
        on stops learning and its BatchNorm statistics stop moving, so backward stops above them.
        `bn_stats`: also keep every other BatchNorm of the encoder on its running statistics.
        `fold`: run each frozen BatchNorm folded into the convolution before it (the same function,
        one pass less over the largest activations; the modules and their weights stay as they are).
        `freeze(0)` undoes it. Weights are untouched (a checkpoint does not record the freeze).
        Returns the number of frozen parameters."""
        if not 0 <= stages <= 4:
            raise UsageError(f"--frozen-stages must be 0..4 (the encoder has 4 feature stages), got {stages}")
        frozen = self._parameters_feeding(stages)
        for p in self.body.parameters():
            p.requires_grad_(id(p) not in frozen)
        bns = [m for m in self.body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._fixed_bn = [m for m in bns if bn_stats or (any(True for _ in m.parameters())
                                                         and all(id(q) in frozen for q in m.parameters()))]
        self.frozen_stages, self.frozen_bn_stats = stages, bn_stats
        self.train(self.training)
        _unfold(self.body)
        if fold and frozen:
            for conv, bn in self._conv_bn_pairs(frozen):
                _fold(conv, bn)
        return sum(p.numel() for p in self.body.parameters() if id(p) in frozen)

    def _parameters_feeding(self, stages: int) -> set[int]:
        """ids of the parameters that the first `stages` feature maps depend on, found by asking
        autograd on a small input (so it holds for any timm backbone, whatever its module names)."""
        if stages == 0:
            return set()
        params = list(self.body.parameters())
        for p in params:
            p.requires_grad_(True)
        was_training = self.training
        self.eval()  # the probe must not move BatchNorm statistics
        try:
            with torch.enable_grad():
                feats = self.body(torch.zeros(1, 3, 64, 64, device=params[0].device))
                total = sum(f.float().sum() for f in feats[:stages])
                grads = torch.autograd.grad(total, params, allow_unused=True)
        finally:
            self.train(was_training)
        return {id(p) for p, g in zip(params, grads) if g is not None}

    def _conv_bn_pairs(self, frozen: set[int]) -> list[tuple[nn.Conv2d, nn.Module]]:
        """(conv, BatchNorm) pairs of the frozen part where the BatchNorm's input is exactly the
        convolution's output, found by tracing a small input through the encoder."""
        outputs: dict[int, tuple[nn.Module, torch.Tensor]] = {}
        pairs: list[tuple[nn.Conv2d, nn.Module]] = []

        def after_conv(mod, _inp, out):
            outputs[id(out)] = (mod, out)  # the tensor is kept, so its id cannot be reused

        def before_bn(mod, inp):
            hit = outputs.get(id(inp[0]))
            if hit is not None and hit[1] is inp[0]:
                pairs.append((hit[0], mod))

        hooks = []
        for m in self.body.modules():
            params = list(m.parameters(recurse=False))
            if not params or not all(id(q) in frozen for q in params):
                continue
            if type(m) is nn.Conv2d:
                hooks.append(m.register_forward_hook(after_conv))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                hooks.append(m.register_forward_pre_hook(before_bn))
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                self.body(torch.zeros(1, 3, 64, 64, device=next(self.body.parameters()).device))
        finally:
            for h in hooks:
                h.remove()
            self.train(was_training)
        return pairs

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._fixed_bn:
            m.eval()
        return self

    def load_pretrained(self, source: str | None) -> str:
        """Initialise from ImageNet weights. `source`: None/'none', 'timm' (hub), 'offline'
        (registry package, EfficientNet-Lite0/1/2), or a path to a timm-format .safetensors/.pth.
        Returns a short description of what was loaded, for the run's config."""
        if source in (None, "", "none"):
            return "none"
        if source == "auto":
            source = "offline" if self.backbone_name in OFFLINE_PACKAGES else "none"
            if source == "none":
                return "none (no offline ImageNet weights for this backbone; use --pretrained timm or PATH)"
        if source == "timm":
            full = _from_hub(self.backbone_name)
            state, desc = full.state_dict(), f"timm hub ({self.backbone_name})"
        elif source == "offline":
            full = timm.create_model(self.backbone_name, pretrained=False)
            state = load_offline_imagenet(self.backbone_name, full.state_dict())
            desc = f"offline ImageNet ({OFFLINE_PACKAGES.get(self.backbone_name)})"
        else:
            state, desc = _read_state_file(source), f"file {os.path.abspath(source)}"
        self._load_classifier_state(state, desc)
        return desc

    def _load_classifier_state(self, state: dict[str, torch.Tensor], desc: str) -> None:
        own = self.body.state_dict()
        # features_only models drop the head and keep the body's names (or prefix with 'body.' style
        # in FeatureListNet). Match by name, ignore only classifier/head tensors.
        matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
        if missing:
            raise UsageError(
                f"pretrained weights from {desc} leave {len(missing)} backbone tensors unmatched "
                f"(e.g. {missing[:4]}); is it a checkpoint of {self.backbone_name!r}?"
            )
        self.body.load_state_dict(matched, strict=False)


def _from_hub(backbone: str) -> nn.Module:
    """timm's model with its hub weights (downloaded once into the hub cache, then read from it).
    The architecture itself was already built without weights, so a failure here is fetching or
    reading the weights: most often no network. Say what to do instead of the hub's own words."""
    try:
        return timm.create_model(backbone, pretrained=True)
    except Exception as exc:  # huggingface_hub / httpx / OSError: which one depends on versions
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnavailableError(
            f"--pretrained timm: the ImageNet weights of {backbone} could not be fetched from the timm hub "
            f"({type(exc).__name__}: {reason[:160]}). They need the network (huggingface.co) once; timm's cache "
            f"serves them afterwards. Without network: --pretrained PATH (a timm-format .safetensors/.pth of "
            f"{backbone}, e.g. copied from a machine that has it in ~/.cache/huggingface), or --pretrained none"
        ) from exc


def _read_state_file(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--pretrained {path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    # A user-given .pth/.bin: weights_only refuses to run any pickled code.
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UsageError(f"--pretrained {path}: expected a state dict of tensors")
    return obj


def _fold(conv: nn.Conv2d, bn: nn.Module) -> None:
    """Run `conv` then the (eval-mode) `bn` as one convolution: conv's forward uses weights scaled by
    the BatchNorm (recomputed whenever a weight, a statistic, the device or the layout changes),
    bn's forward keeps only what follows the normalisation (timm's BatchNormAct2d: drop + act)."""
    cache: dict[str, object] = {"key": None}

    def folded_weights():
        key = tuple((t.data_ptr(), t._version, t.device, t.stride()) for t in
                    (conv.weight, bn.running_mean, bn.running_var) + ((bn.weight,) if bn.weight is not None else ()))
        if cache["key"] != key:
            with torch.no_grad():
                scale = torch.rsqrt(bn.running_var + bn.eps)
                if bn.weight is not None:
                    scale = scale * bn.weight
                shift = -bn.running_mean * scale
                if bn.bias is not None:
                    shift = shift + bn.bias
                if conv.bias is not None:
                    shift = shift + conv.bias * scale
                w = conv.weight * scale.view(-1, 1, 1, 1)
                cache.update(key=key, w=w.contiguous(memory_format=torch.channels_last)
                             if conv.weight.is_contiguous(memory_format=torch.channels_last) else w, b=shift)
        return cache["w"], cache["b"]

    def conv_forward(x: torch.Tensor) -> torch.Tensor:
        w, b = folded_weights()
        return conv._conv_forward(x, w, b)

    def bn_forward(x: torch.Tensor) -> torch.Tensor:
        for name in ("drop", "act"):  # timm's BatchNormAct2d: normalise, then drop, then act
            if hasattr(bn, name):
                x = getattr(bn, name)(x)
        return x

    conv.forward, bn.forward = conv_forward, bn_forward
    conv._kdas_folded = bn._kdas_folded = True


def _unfold(body: nn.Module) -> None:
    """Undo every `_fold` under `body`: the modules' own forward again."""
    for m in body.modules():
        if getattr(m, "_kdas_folded", False):
            del m.forward
            del m._kdas_folded
