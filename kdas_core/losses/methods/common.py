"""Helpers shared by the `--kd` methods: reading maps out of a model's output dict, resizing,
channel adapters, attention maps and the KL forms every logit-based method uses.

Conventions (all methods):
- teacher tensors are detached here again (cheap, and safe if a caller forgets no_grad);
- everything is computed in float32 (under AMP the maps arrive in half precision and |F|^4 or
  exp(z / tau) overflow there);
- when student and teacher maps differ in size, the student map is resized to the teacher's.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

# Names a method can ask for: "features.0".."features.3" (encoder, strides 4..32), "cim" (stride 4),
# "cfm", "sam" (decoder, stride 8), "p1_low", "p2_low" (stride-8 logits), "p1", "p2" (input size).


def get_map(out: dict, name: str) -> torch.Tensor:
    if name.startswith("features."):
        return out["features"][int(name.split(".", 1)[1])]
    return out[name]


def map_channels(model: nn.Module) -> dict[str, int]:
    """Channels of every named map of a Polyp-PVT-style model, read from its modules (no forward)."""
    stages = list(model.encoder.channels)
    head = getattr(getattr(model, "decoder", None), "out_cfm", None)
    dec = head.in_channels if head is not None else 32
    chans = {f"features.{i}": c for i, c in enumerate(stages)}
    chans.update({"cim": stages[0], "cfm": dec, "sam": dec, "p1_low": 1, "p2_low": 1, "p1": 1, "p2": 1})
    return chans


def fused_logits(out: dict) -> torch.Tensor:
    """P1 + P2: the map inference thresholds, i.e. the model's final prediction."""
    return out["p1"] + out["p2"]


def resize_to(x: torch.Tensor, size) -> torch.Tensor:
    size = tuple(size[-2:]) if not isinstance(size, int) else (size, size)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


def pair(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 student map at the teacher's size, float32 detached teacher map."""
    t = t.detach().float()
    return resize_to(s.float(), t.shape), t


def adapter(c_in: int, c_out: int) -> nn.Module:
    """1x1 conv from the student's width to the teacher's; Identity when they already match, so
    a student identical to its teacher gives exactly zero loss."""
    return nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, kernel_size=1)


def attention_map(x: torch.Tensor, p: float = 2.0, size=None) -> torch.Tensor:
    """Zagoruyko & Komodakis attention: channel mean of |F|^p, (optionally) resized, flattened,
    L2-normalised -> (B, H*W). Resizing after the channel mean is cheaper than resizing F."""
    a = x.float().abs().pow(p).mean(dim=1, keepdim=True)
    if size is not None:
        a = resize_to(a, size)
    return F.normalize(a.flatten(1), dim=1)


def attention_distance(s: torch.Tensor, t: torch.Tensor, p: float = 2.0, reduction: str = "mean",
                       grid: str = "teacher") -> torch.Tensor:
    """Distance between the attention maps of two feature maps (any channels), compared on the
    teacher's grid (default) or the student's. reduction 'mean': MSE over positions (AT);
    'sum': squared L2 distance per image, averaged over the batch (HLFD's form)."""
    size = t.shape if grid == "teacher" else s.shape
    a_t = attention_map(t.detach(), p, size=size)
    a_s = attention_map(s, p, size=size)
    d = (a_s - a_t).pow(2)
    return d.mean() if reduction == "mean" else d.sum(dim=1).mean()


def binary_kl(s_logits: torch.Tensor, t_prob: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-pixel two-class KL(teacher || student), mean over pixels, times tau^2 (Hinton).
    s_logits: student logits at temperature 1; t_prob: the teacher's sigmoid(z_t / tau)."""
    log_s1 = F.logsigmoid(s_logits / tau)
    log_s0 = F.logsigmoid(-s_logits / tau)
    t1 = t_prob.clamp(0.0, 1.0)
    t0 = 1.0 - t1
    # xlogy keeps 0 * log 0 = 0 for saturated teachers.
    kl = torch.xlogy(t1, t1) - t1 * log_s1 + torch.xlogy(t0, t0) - t0 * log_s0
    return tau * tau * kl.mean()


def binary_kd(s_logits: torch.Tensor, t_logits: torch.Tensor, tau: float) -> torch.Tensor:
    s, t = pair(s_logits, t_logits)
    return binary_kl(s, torch.sigmoid(t / tau), tau)


def softmax_kl(s: torch.Tensor, t: torch.Tensor, tau: float, dim: str) -> torch.Tensor:
    """tau^2 * KL(softmax(t / tau) || softmax(s / tau)) for maps of equal shape (B, C, H, W).
    dim='spatial': one distribution per channel over its H*W positions (CWD), averaged over B*C.
    dim='channel': one distribution per pixel over the C channels, averaged over B*H*W."""
    b, c = s.shape[:2]
    if dim == "spatial":
        s, t = s.reshape(b * c, -1), t.reshape(b * c, -1)
    else:
        s, t = s.movedim(1, -1).reshape(-1, c), t.movedim(1, -1).reshape(-1, c)
    log_s = F.log_softmax(s / tau, dim=1)
    log_t = F.log_softmax(t / tau, dim=1)
    return tau * tau * F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def cosine_matrix(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarities between rows: (..., N, C) x (..., M, C) -> (..., N, M)."""
    x = F.normalize(x, dim=-1)
    y = x if y is None else F.normalize(y, dim=-1)
    return x @ y.transpose(-1, -2)


def concat_resized(maps: Iterable[torch.Tensor]) -> torch.Tensor:
    """Resize maps to the smallest spatial size among them and concatenate channels (HLFD's
    'combined' layers)."""
    maps = [m.float() for m in maps]
    h = min(m.shape[-2] for m in maps)
    w = min(m.shape[-1] for m in maps)
    return torch.cat([resize_to(m, (h, w)) for m in maps], dim=1)


def per_teacher_adapters(student: nn.Module, teachers: list[nn.Module], s_name: str, t_name: str | None = None) -> nn.ModuleList:
    """One adapter per teacher from the student's map `s_name` to the teacher's `t_name`."""
    c_s = map_channels(student)[s_name]
    return nn.ModuleList(adapter(c_s, map_channels(t)[t_name or s_name]) for t in teachers)


def standardise(x: torch.Tensor, eps: float = 1e-5, floor: float = 0.0) -> torch.Tensor:
    """Zero mean, unit variance per (image, channel) over the spatial positions (mtkd's features,
    kdas's logit maps): keeps a map's structure, drops its scale. `floor`: the smallest standard
    deviation divided by, so a near-constant map is centred but not blown up into unit-variance noise."""
    x = x.float()
    mean = x.mean(dim=(-2, -1), keepdim=True)
    var = x.var(dim=(-2, -1), keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps).clamp_min(floor)


def mean_over_teachers(t_outs: list[dict], fn: Callable[[int, dict], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Average a method's terms over several teachers (mtkd weights them adaptively instead)."""
    total: dict[str, torch.Tensor] = {}
    for i, t_out in enumerate(t_outs):
        for k, v in fn(i, t_out).items():
            total[k] = total.get(k, 0.0) + v / len(t_outs)
    return total


def scaled(prefix: str, terms: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": scale * v for k, v in terms.items()}
