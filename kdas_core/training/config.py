"""Training configuration shared by `train`, `distill`, `ablate` and `bench_train`: one source.

Every training option is one field of `TrainConfig`, with its default, help text and flag; the
command-line parser is generated from these fields, so a default is written exactly once.

A *recipe* (`--recipe`) is a named set of changes to those defaults:

- `fast` (the default, i.e. the field defaults themselves): made for short CPU budgets; it won
  the time-to-accuracy benchmark (RESULTS.md, "Time to accuracy");
- `v1`: the recipe of the first releases, kept to replay their runs;
- `published`: as close as this code gets to the published Polyp-PVT/KDAS training script.

Precedence, lowest first: field defaults < `--config RUN/config.json` (a finished or paused run's
resolved configuration) < the recipe < flags given on the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from kdas_core.cli.conventions import DEVICE_HELP, UsageError, device_arg, positive_float, positive_int
from kdas_core.models.presets import DEFAULT_THRESHOLD, PRESETS, image_size_arg, list_models


def scales(s: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.75,1,1.25, got {s!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError("scales must be positive")
    return vals


def progressive_spec(s: str) -> tuple[float, float] | None:
    """'R:F' -> train the first fraction F of the epochs at R x the image size ('off' = never)."""
    if s in ("off", "none", ""):
        return None
    try:
        r, f = (float(x) for x in s.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RATE:FRACTION such as 0.75:0.4, or 'off'; got {s!r}") from None
    if not (0 < r <= 1 and 0 <= f < 1):
        raise argparse.ArgumentTypeError(f"{s!r}: RATE must be in (0, 1] and FRACTION in [0, 1)")
    return (r, f)


def _opt(default: Any, group: str, help: str, cli: str = "common", flag: str | None = None, **argparse_kwargs) -> Any:
    """A config field with its command-line description. cli: 'common' (every training command) or
    'kd' (the commands that take teachers: `add_training_args(kd=...)`). `flag`: when the flag is
    not the field's name (--teacher fills `teachers`)."""
    meta = {"group": group, "help": help, "cli": cli, "flag": flag, "argparse": argparse_kwargs}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


WHAT, SCHEDULE, RUN, STEP, KD = ("what to train", "recipe and schedule", "validation and run",
                                 "training step (speed)", "distillation")


@dataclass
class TrainConfig:
    model: str = _opt(None, WHAT, "model preset or 'polyppvt:<timm backbone>' (see the list below)", metavar="NAME")
    data: str = _opt(None, WHAT, "PraNet root (TrainDataset/, TestDataset/<name>/) or a folder with images/ and masks/",
                     metavar="DIR")
    out: str = _opt(None, WHAT, "run folder: best/last checkpoints, config, logs", metavar="RUN")
    pretrained: str | None = _opt(
        "auto", WHAT, "backbone init: 'auto' (offline ImageNet weights when the backbone has them, else none), "
        "'offline' (EfficientNet-Lite0/1/2 from the registry packages), 'timm' (timm hub, needs internet), 'none', "
        "or PATH to a timm-format .safetensors/.pth", metavar="SRC")
    subset: str | None = _opt(None, WHAT, "train on the k-th of K disjoint parts of the training data (k = 1..K)",
                              metavar="k/K")
    recipe: str = _opt("fast", SCHEDULE, "named set of defaults: fast | v1 | published (see 'recipes' below)",
                       choices=["fast", "v1", "published"])
    epochs: int = _opt(100, SCHEDULE, "epochs (one epoch = one pass over the training images)", type=positive_int)
    image_size: int | None = _opt(None, SCHEDULE, "training side in pixels, a multiple of 32 (none: the preset's, 352)",
                                  type=image_size_arg, metavar="S")
    batch_size: int = _opt(16, SCHEDULE, "per-process batch size", type=positive_int, metavar="B")
    lr: float = _opt(2e-4, SCHEDULE, "AdamW learning rate of the (pretrained) encoder", type=positive_float)
    decoder_lr_mult: float = _opt(5.0, SCHEDULE, "the randomly initialised decoder and heads learn at lr x this",
                                  type=positive_float, metavar="M")
    weight_decay: float = _opt(1e-4, SCHEDULE, "AdamW weight decay", type=float)
    clip_grad: float = _opt(0.5, SCHEDULE, "gradient clip, 0 = off", type=float)
    clip_mode: str = _opt("norm", SCHEDULE, "'norm': scale the global gradient norm to <= clip; 'value': clamp "
                          "each gradient value to +-clip (the published code)", choices=["norm", "value"])
    warmup_epochs: float = _opt(0.3, SCHEDULE, "linear warm-up before the schedule, in epochs", type=float)
    schedule: str = _opt("cosine", SCHEDULE, "learning-rate schedule after the warm-up", choices=["cosine", "constant"])
    multiscale: tuple[float, ...] = _opt((0.75, 1.0, 1.25), SCHEDULE,
                                         "rescale factors, rounded to multiples of 32 ('1' disables)",
                                         type=scales, metavar="R,R,..")
    multiscale_mode: str = _opt("random", SCHEDULE, "'random': one scale drawn per batch (one step); 'all': a step at "
                                "every scale for every batch (the published code: 3 steps per batch, so an "
                                "epoch costs ~3x)", choices=["random", "all"])
    augment: bool = _opt(True, SCHEDULE, "flips, rotation, random resized crop, colour jitter "
                         "(the published code has none: a string comparison disables it)")
    progressive: tuple[float, float] | None = _opt(
        (0.75, 0.35), SCHEDULE, "progressive resizing RATE:FRACTION: the first FRACTION of the epochs trains at "
        "RATE x the image size (cheaper steps while the model is coarse); 'off' disables",
        type=progressive_spec, metavar="R:F")
    steps_per_epoch: int | None = _opt(None, SCHEDULE, "cap optimiser steps per epoch (quick runs)",
                                       type=positive_int, metavar="N")
    val_fraction: float = _opt(0.1, RUN, "part of the training data held out to choose best.safetensors; "
                               "test sets never choose", type=float)
    groups: str = _opt("auto", RUN, "what must stay on one side of the validation split: 'auto' (near-duplicate "
                       "frames, found by image similarity), 'none' (each image alone), or a CSV of stem,group",
                       metavar="auto|none|CSV")
    val_every: int = _opt(1, RUN, "validate every N epochs", type=positive_int, metavar="N")
    threshold: float = _opt(DEFAULT_THRESHOLD, RUN, "mask threshold stored in the checkpoint", type=float)
    seed: int = _opt(0, RUN, "seed of the initialisation, batch order and augmentation", type=int)
    workers: int = _opt(2, RUN, "data-loader worker processes (0: load in the training process)", type=int)
    threads: int | None = _opt(None, RUN, "CPU threads for PyTorch (default: PyTorch's choice)", type=positive_int,
                               metavar="N")
    cache_images: bool = _opt(True, RUN, "decode and resize the training images once, into memory "
                              "(about 3*S*S bytes per image), instead of every epoch")
    device: str | None = _opt(None, RUN, f"{DEVICE_HELP} (default: cuda when a CUDA GPU is visible, else cpu)",
                              type=device_arg, metavar="DEV")
    amp: bool = _opt(True, RUN, "mixed precision on CUDA")
    resume: bool = _opt(False, RUN, "continue RUN exactly from last.safetensors and its train state")
    time_limit: float | None = _opt(None, RUN, "stop cleanly at the last epoch boundary that fits in MIN minutes "
                                    "(job time limits); the same command with --resume continues",
                                    type=positive_float, metavar="MIN")
    progress: bool = _opt(True, RUN, "progress bars")
    step: str = _opt("default", STEP, "named set of the step options below: default | baseline (see 'steps' "
                     "below)", choices=["default", "baseline"])
    frozen_stages: int = _opt(2, STEP, "encoder stages fixed from the input side, stem included (0..4): 1 = "
                              "everything the stride-4 features depend on, 2 = the stride-8 ones too; their "
                              "weights and BatchNorm statistics stay as pretrained and backward stops above them", type=int, metavar="N")
    frozen_for: float = _opt(1.0, STEP, "fraction of the epochs the --frozen-stages stay fixed (1: all of "
                             "training; 0.5: they learn from the middle epoch on)", type=float, metavar="F")
    frozen_fold: bool = _opt(True, STEP, "run each frozen BatchNorm folded into the convolution before it (the "
                             "same function, one pass less over the largest activations)")
    frozen_bn_stats: bool = _opt(False, STEP, "keep every encoder BatchNorm on its pretrained running statistics")
    optimizer_impl: str = _opt("fused", STEP, "AdamW implementation: 'fused' (one kernel for all parameters, "
                               "CPU and CUDA), 'foreach' (batched), 'auto' (PyTorch's own choice: one parameter "
                               "at a time on CPU, foreach on CUDA)", choices=["fused", "foreach", "auto"])
    channels_last: bool = _opt(True, STEP, "channels-last memory format for the model and its inputs")
    compile: bool = _opt(False, STEP, "torch.compile the step (inductor): the first steps at every new input size "
                         "compile (minutes on CPU)")
    teachers: list[str] = _opt([], KD, "teacher checkpoint (.safetensors from kdas_core.train); repeat for several "
                               "teachers", cli="kd", flag="--teacher", action="append", metavar="PATH")
    teacher_targets: str | None = _opt(None, KD, "cached teacher outputs from kdas_core.teacher_targets, instead of "
                                       "running the teachers: distillation at the cost of plain training (kd, kdas, "
                                       "kdas-paper; with --teacher too, the cache must have been made from those "
                                       "checkpoints)", cli="kd", metavar="DIR")
    kd: str = _opt("none", KD, "distillation method(s), see the list below", cli="kd", metavar="METHOD[,METHOD...]")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["multiscale"] = list(self.multiscale)
        d["progressive"] = list(self.progressive) if self.progressive else None
        return d


# Differences from the field defaults; each entry is a reason to exist, see README "Training recipes".
# The field defaults above are the `fast` recipe: it won the time-to-accuracy benchmark (RESULTS.md,
# "Time to accuracy"). The other recipes are changes to them.
_V1 = {"lr": 1e-4, "decoder_lr_mult": 1.0, "warmup_epochs": 1.0, "progressive": None}
RECIPES: dict[str, dict[str, Any]] = {
    "fast": {},
    "v1": _V1,
    "published": {**_V1, "warmup_epochs": 0.0, "schedule": "constant", "clip_mode": "value",
                  "multiscale_mode": "all", "augment": False},
}

# Named training-step settings (--step): which speed options a step uses. Like a recipe, a
# setting is a set of changes to the field defaults, and flags given on the command line override it.
# `default` is the field defaults; `baseline` is the plain step (nothing frozen, PyTorch's own
# optimiser loop), kept so `bench_train --compare baseline default` and accuracy checks can replay it.
STEPS: dict[str, dict[str, Any]] = {
    "default": {},
    "baseline": {"frozen_stages": 0, "frozen_for": 1.0, "frozen_fold": False, "frozen_bn_stats": False, "optimizer_impl": "auto",
                 "channels_last": True, "compile": False},
}

REQUIRED = ("model", "data", "out")


def defaults() -> dict[str, Any]:
    out = {}
    for f in fields(TrainConfig):
        out[f.name] = f.default_factory() if f.default is MISSING else f.default
    return out


def model_help() -> str:
    return "; ".join(f"{k}: {PRESETS[k].description}" for k in list_models())


def recipes_help() -> str:
    base = defaults()
    lines = ["recipes (--recipe; flags given on the command line override them):",
             "  fast       the defaults shown above (README 'Training recipes')"]
    for name, diff in RECIPES.items():
        if diff:
            lines.append(f"  {name:<10} " + ", ".join(f"{k}={_show(v, ':' if k == 'progressive' else ',')}"
                                                      for k, v in diff.items() if base[k] != v))
    lines += ["", "steps (--step; flags given on the command line override them):",
              "  default    the step options shown above"]
    for name, diff in STEPS.items():
        if diff:
            lines.append(f"  {name:<10} " + ", ".join(f"{k}={_show(v)}" for k, v in diff.items() if base[k] != v))
    return "\n".join(lines)


def _show(v: Any, sep: str = ",") -> str:
    """A value as the flag takes it back (--progressive is R:F, --multiscale R,R,..)."""
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return sep.join(f"{x:g}" for x in v)
    return str(v)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_training_args(p: argparse.ArgumentParser, kd: str | None = None,
                      kd_flags: tuple[str, ...] = ("teachers", "teacher_targets", "kd")) -> None:
    """Generate the training flags from `TrainConfig`. Nothing given is put in the namespace
    (argparse.SUPPRESS), so `config_from_args` knows which values the user chose and a
    `--config` file is never overridden by a default.

    `kd`: for the commands that take teachers (distill, ablate, bench_train), the command's own
    default --kd method; the `kd_flags` fields then become flags too."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    base = defaults()
    if kd is not None:
        base["kd"] = kd
    for f in fields(TrainConfig):
        meta = f.metadata
        if not (meta["cli"] == "common" or (meta["cli"] == "kd" and kd is not None and f.name in kd_flags)):
            continue
        if meta["group"] not in groups:
            groups[meta["group"]] = p.add_argument_group(meta["group"])
        g = groups[meta["group"]]
        kwargs = dict(meta["argparse"])
        default = base[f.name]
        help_text = meta["help"]
        if f.name == "model":
            help_text += f" ({model_help()})"
        if f.name in REQUIRED:
            help_text += " (required, or from --config)"
        elif default not in (None, []):
            shown = ("on" if default else "off") if isinstance(default, bool) else _show(
                default, ":" if f.name == "progressive" else ",")
            help_text += f" (default: {shown})"
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "metavar" not in kwargs and "choices" not in kwargs:  # one placeholder style: N, F, not EPOCHS
            kind = getattr(kwargs.get("type"), "__name__", "")
            kwargs["metavar"] = "N" if "int" in kind else "F" if "float" in kind else "VALUE"
        g.add_argument(meta["flag"] or _flag(f.name), dest=f.name, default=argparse.SUPPRESS, help=help_text, **kwargs)
    if kd is not None:
        p.set_defaults(_command_defaults={"kd": kd})
    g = groups[RUN]
    g.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                   help="a run's config.json: replays that run exactly (flags given here override it; "
                        "a new run unless --resume is given)")
    p.epilog = ((p.epilog + "\n\n") if p.epilog else "") + recipes_help()
    p.formatter_class = argparse.RawDescriptionHelpFormatter


# Says how this command is driven, not what the run was: a replay starts afresh unless --resume
# is given (a resumed run's config.json says resume: true).
NOT_REPLAYED = frozenset({"resume"})


def read_config_file(path: str) -> dict[str, Any]:
    """The fields of a run's config.json (what `run_training` wrote), checked by name."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--config {path}: not JSON ({exc})") from None
    known = {f.name for f in fields(TrainConfig)}
    if not isinstance(raw, dict) or "model" not in raw:
        raise UsageError(f"--config {path}: not a kdas run configuration (no 'model' field)")
    unknown = sorted(k for k in raw if k not in known and k != "resolved")
    if unknown:
        raise UsageError(f"--config {path}: unknown field(s) {', '.join(unknown)} (written by another version?)")
    out = {k: v for k, v in raw.items() if k in known and k not in NOT_REPLAYED}
    if out.get("multiscale") is not None:
        out["multiscale"] = tuple(out["multiscale"])
    if out.get("progressive") is not None:
        out["progressive"] = tuple(out["progressive"])
    return out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's configuration. Precedence, lowest first: field defaults < the command's own
    defaults (distill: --kd kdas) < --config RUN/config.json < --recipe / --step < flags given."""
    given = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    values = defaults()
    values.update(getattr(args, "_command_defaults", {}))
    config_path = given.pop("config", None)
    from_file = read_config_file(config_path) if config_path else {}
    chosen = set(given) | set(RECIPES.get(given.get("recipe"), ())) | set(STEPS.get(given.get("step"), ()))
    absent = sorted(set(values) - set(from_file) - NOT_REPLAYED - chosen) if from_file else []
    if absent:
        print(f"[kdas] note: --config {config_path} has no {', '.join(_flag(k) for k in absent)} (written by an "
              "older version): they take today's defaults, which the new run's config.json records", file=sys.stderr)
    values.update(from_file)
    recipe = given.get("recipe", values["recipe"])
    if "recipe" in given or not from_file:
        values.update(RECIPES[recipe])
        values["recipe"] = recipe
    step = given.get("step", values["step"])
    if "step" in given or not from_file:
        values.update(STEPS[step])
        values["step"] = step
    names = {f.name for f in fields(TrainConfig)}
    values.update({k: v for k, v in given.items() if k in names})
    missing = [_flag(k) for k in REQUIRED if not values.get(k)]
    if missing:
        raise UsageError(f"missing {', '.join(missing)} (give them, or --config RUN/config.json)")
    if not 0 <= values["val_fraction"] < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {values['val_fraction']}")
    if not 0 <= values["frozen_stages"] <= 4:
        raise UsageError(f"--frozen-stages must be 0..4 (the encoder has 4 feature stages), got {values['frozen_stages']}")
    if not 0 <= values["frozen_for"] <= 1:
        raise UsageError(f"--frozen-for must be a fraction in [0, 1], got {values['frozen_for']}")
    return TrainConfig(**values)
