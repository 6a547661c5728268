"""Training configuration shared by `train`, `distill` and `ablate`, and its command-line flags."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field

from ..models import PRESETS, list_models


@dataclass
class TrainConfig:
    model: str
    data: str
    out: str
    epochs: int = 100
    image_size: int | None = None  # None: the preset's size
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-4
    clip_grad: float = 0.5
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    multiscale: tuple[float, ...] = (0.75, 1.0, 1.25)
    val_fraction: float = 0.1
    seed: int = 0
    workers: int = 2
    device: str | None = None
    amp: bool = True
    pretrained: str | None = "auto"
    resume: bool = False
    subset: str | None = None  # "k/K": train on the k-th of K disjoint parts
    steps_per_epoch: int | None = None  # cap, for short runs
    val_every: int = 1
    threshold: float = 0.5
    # distillation
    teachers: list[str] = field(default_factory=list)
    kd: str = "none"
    progress: bool = True
    time_limit: float | None = None  # minutes; stop at an epoch boundary before running past it

    def to_dict(self) -> dict:
        d = asdict(self)
        d["multiscale"] = list(self.multiscale)
        return d


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _scales(s: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.75,1,1.25, got {s!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError("scales must be positive")
    return vals


def model_help() -> str:
    return "; ".join(f"{k}: {PRESETS[k].description}" for k in list_models())


def add_training_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    g = p.add_argument_group("what to train")
    g.add_argument("--model", required=model_required, metavar="NAME",
                   help=f"model preset ({model_help()}); or 'polyppvt:<timm backbone>'")
    g.add_argument("--data", required=True, metavar="DIR",
                   help="PraNet root (TrainDataset/, TestDataset/<name>/) or a folder with images/ and masks/")
    g.add_argument("--out", required=True, metavar="RUN", help="run folder: best/last checkpoints, config, logs")
    g.add_argument("--pretrained", default="auto", metavar="SRC",
                   help="backbone init: 'auto' (offline ImageNet weights when the backbone has them, else none), "
                        "'offline' (EfficientNet-Lite0/1/2 from the registry packages), 'timm' (timm hub, needs "
                        "internet), 'none', or PATH to a timm-format .safetensors/.pth (default: auto)")
    g.add_argument("--subset", metavar="k/K", help="train on the k-th of K disjoint parts of the training data (k = 1..K)")
    g = p.add_argument_group("schedule (defaults: the Polyp-PVT/KDAS recipe)")
    g.add_argument("--epochs", type=_positive_int, default=100, help="epochs (default: 100)")
    g.add_argument("--image-size", type=_positive_int, metavar="S", help="training side in pixels (default: the preset's, 352)")
    g.add_argument("--batch-size", type=_positive_int, default=16, metavar="B", help="per-process batch size (default: 16)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: 1e-4)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    g.add_argument("--clip-grad", type=float, default=0.5, help="gradient-norm clip, 0 = off (default: 0.5)")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up before the schedule (default: 1)")
    g.add_argument("--schedule", choices=["cosine", "constant"], default="cosine", help="learning-rate schedule (default: cosine)")
    g.add_argument("--multiscale", type=_scales, default=(0.75, 1.0, 1.25), metavar="R,R,..",
                   help="per-batch rescale factors, rounded to multiples of 32 (default: 0.75,1,1.25; '1' disables)")
    g.add_argument("--steps-per-epoch", type=_positive_int, metavar="N", help="cap optimiser steps per epoch (quick runs)")
    g = p.add_argument_group("validation and run")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="part of the training data held out to choose best.safetensors (default: 0.1); test sets never choose")
    g.add_argument("--val-every", type=_positive_int, default=1, help="validate every N epochs (default: 1)")
    g.add_argument("--threshold", type=float, default=0.5, help="mask threshold stored in the checkpoint (default: 0.5)")
    g.add_argument("--seed", type=int, default=0, help="seed for split-independent randomness (default: 0)")
    g.add_argument("--workers", type=int, default=2, help="data-loader worker processes (default: 2)")
    g.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    g.add_argument("--no-amp", dest="amp", action="store_false", help="disable mixed precision on CUDA")
    g.add_argument("--resume", action="store_true", help="continue RUN exactly from last.safetensors and its train state")
    g.add_argument("--time-limit", type=_positive_float, metavar="MIN",
                   help="stop cleanly at the last epoch boundary that fits in MIN minutes (for job time limits); "
                        "the same command with --resume continues")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars (log lines only)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=args.model, data=args.data, out=args.out, epochs=args.epochs, image_size=args.image_size,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
        warmup_epochs=args.warmup_epochs, schedule=args.schedule, multiscale=tuple(args.multiscale),
        val_fraction=args.val_fraction, seed=args.seed, workers=args.workers, device=args.device, amp=args.amp,
        pretrained=args.pretrained, resume=args.resume, subset=args.subset, steps_per_epoch=args.steps_per_epoch,
        val_every=args.val_every, threshold=args.threshold, teachers=list(getattr(args, "teacher", None) or []),
        kd=getattr(args, "kd", "none"), progress=args.progress,
        time_limit=args.time_limit,
    )
