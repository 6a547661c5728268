"""The training loop behind `train`, `distill` and `ablate`.

One loop for plain and distilled training: a distilled run is a plain run plus frozen teachers
and a list of distillers whose terms are added to the (possibly down-weighted) structure loss.
"""

from __future__ import annotations

import csv
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from kdas_core.io.atomic import staged, write_json
from kdas_core.cli.conventions import RUN_BEST, RunFailure, UsageError, bars_wanted
from kdas_core.io.checkpoint import build_metadata, file_sha256, load_checkpoint, read_tensors, save_checkpoint
from kdas_core.data.dataset import TrainDataset, resolve_layout, split_by_groups, subset_pairs
from kdas_core.losses import build_distillers, structure_loss
from kdas_core.losses.structure import boundary_weights
from kdas_core.models import create_model, resolve
from kdas_core.models.cost import count_params
from kdas_core.models.presets import scaled_size
from kdas_core.training import distributed
from kdas_core.training.config import TrainConfig
from kdas_core.training.state import load_train_state, save_train_state


@dataclass
class Teacher:
    model: nn.Module
    meta: dict
    path: str


class TrainStep(nn.Module):
    """Student + distillers in one module, so DDP syncs adapter gradients too.
    Teachers are kept outside the module tree: frozen, never saved with the student."""

    def __init__(self, student: nn.Module, distillers: nn.ModuleList, teachers: list[Teacher], student_norm):
        super().__init__()
        self.student = student
        self.distillers = distillers
        self._teachers = teachers
        self.seg_weight = min([d.seg_weight for d in distillers], default=1.0)
        self._student_norm = student_norm

    def forward(self, image: torch.Tensor, mask: torch.Tensor,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`targets`: cached teacher logits (B, 2, H, W) = P1, P2 of the (averaged) teachers,
        warped like `image`; they stand in for the teachers' forward pass."""
        s_out = self.student(image)
        w = boundary_weights(mask)
        terms = {"seg": self.seg_weight * (structure_loss(s_out["p1"], mask, w) + structure_loss(s_out["p2"], mask, w))}
        if self.distillers:
            if targets is not None:
                t_outs = [{"p1": targets[:, 0:1], "p2": targets[:, 1:2]}]
            else:
                t_outs = []
                with torch.no_grad():
                    for t in self._teachers:
                        t_outs.append(t.model(_renormalise(image, self._student_norm, t.meta)))
            batch = {"image": image, "mask": mask}
            for d in self.distillers:
                terms.update(d(s_out, t_outs, batch))
        total = sum(terms.values())
        return total, terms


def _renormalise(image: torch.Tensor, student_norm: tuple, teacher_meta: dict) -> torch.Tensor:
    """Teachers normalised differently from the student get the same pixels in their own normalisation."""
    s_mean, s_std = student_norm
    if list(s_mean) == list(teacher_meta["mean"]) and list(s_std) == list(teacher_meta["std"]):
        return image
    dev = image.device
    sm, ss = torch.tensor(s_mean, device=dev).view(1, 3, 1, 1), torch.tensor(s_std, device=dev).view(1, 3, 1, 1)
    tm = torch.tensor(teacher_meta["mean"], device=dev).view(1, 3, 1, 1)
    ts = torch.tensor(teacher_meta["std"], device=dev).view(1, 3, 1, 1)
    return ((image * ss + sm) - tm) / ts


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def init_student(cfg: TrainConfig) -> nn.Module:
    """The student as the run starts: seeded first, so the same seed gives bit-identical initial
    weights whatever ran before in the process (ablation rows, tests)."""
    _seed_everything(cfg.seed)
    return create_model(cfg.model, pretrained=None if cfg.resume else cfg.pretrained)


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _rescale(image: torch.Tensor, mask: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Polyp-PVT multi-scale training: whole batch to round(size * rate / 32) * 32."""
    if rate == 1.0:
        return image, mask
    side = scaled_size(image.shape[-1], rate)
    image = F.interpolate(image, size=(side, side), mode="bilinear", align_corners=True)
    mask = (F.interpolate(mask, size=(side, side), mode="bilinear", align_corners=True) > 0.5).float()
    return image, mask


def _load_teachers(paths: list[str], device: torch.device) -> list[Teacher]:
    teachers = []
    for p in paths:
        model, meta = load_checkpoint(p, device=str(device))
        for q in model.parameters():
            q.requires_grad_(False)
        teachers.append(Teacher(model.eval(), meta, p))
    return teachers


class RunLog:
    """Per-epoch CSV + TensorBoard (when installed); rank 0 only."""

    def __init__(self, out: str, resume: bool):
        self.csv_path = os.path.join(out, "log.csv")
        self.rows: list[dict] = []
        if resume and os.path.exists(self.csv_path):
            with open(self.csv_path, newline="") as f:
                self.rows = list(csv.DictReader(f))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out, "tb"))
        except Exception:  # tensorboard missing: the CSV is the log
            self.tb = None

    def write(self, row: dict) -> None:
        self.rows.append(row)
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with staged(self.csv_path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# Fields that say how a run is driven, not what it learns: --resume may change them.
_RUN_CONTROL = {"out", "resume", "time_limit", "progress", "workers", "threads", "cache_images", "val_every",
                "epochs", "device", "amp", "step", "optimizer_impl", "channels_last", "compile", "frozen_fold"}


def build_optimizer(cfg: TrainConfig, step_module: nn.Module, student: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the student (frozen parameters included, so unfreezing later and --resume keep one
    parameter order; AdamW skips a parameter without a gradient) and the distillers' adapters.
    The pretrained encoder learns at --lr, the rest at --lr x --decoder-lr-mult."""
    student_ids = {id(p) for p in student.parameters()}
    params = [p for p in step_module.parameters() if p.requires_grad or id(p) in student_ids]
    encoder_ids = {id(p) for p in student.encoder.parameters()}
    groups = [
        {"params": [p for p in params if id(p) in encoder_ids], "lr_mult": 1.0, "name": "encoder"},
        {"params": [p for p in params if id(p) not in encoder_ids], "lr_mult": cfg.decoder_lr_mult,
         "name": "decoder+heads+adapters"},
    ]
    impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "auto": {}}[cfg.optimizer_impl]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay, **impl)


def frozen_epochs(cfg: TrainConfig) -> int:
    """How many epochs, from the first, train with --frozen-stages fixed."""
    return round(cfg.frozen_for * cfg.epochs) if cfg.frozen_stages else 0


def apply_freeze(cfg: TrainConfig, student: nn.Module, epoch: int) -> None:
    """The encoder's frozen stages for `epoch` (0-based): --frozen-stages for the first
    frozen_epochs(cfg) epochs, none after; --frozen-bn-stats throughout."""
    stages = cfg.frozen_stages if epoch < frozen_epochs(cfg) else 0
    enc = student.encoder
    if (enc.frozen_stages, enc.frozen_bn_stats) != (stages, cfg.frozen_bn_stats):
        enc.freeze(stages, cfg.frozen_bn_stats, fold=cfg.frozen_fold)


class StepRunner:
    """One optimiser step of a run, the same in the trainer and in bench_train: forward (autocast
    on CUDA), the finite-loss check, backward, gradient clipping, the optimiser.

    `mark(phase)`, when given, is called after "forward", "backward" and "optimizer" (bench_train
    times the phases with it)."""

    def __init__(self, cfg: TrainConfig, step_module: "TrainStep", optimizer: torch.optim.Optimizer,
                 device: torch.device, world: int = 1):
        self.cfg, self.module, self.optimizer = cfg, step_module, optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        wrapped: nn.Module = step_module
        if world > 1:
            wrapped = DistributedDataParallel(step_module,
                                              find_unused_parameters=bool(list(step_module.distillers.parameters())))
        self.wrapped = torch.compile(wrapped) if cfg.compile else wrapped
        self.use_amp = cfg.amp and device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.device_type = device.type

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None,
                 where: str = "", mark=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.cfg.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.use_amp):
            loss, terms = self.wrapped(image, mask, targets)
        if mark:
            mark("forward")
        if not torch.isfinite(loss):
            raise RunFailure(f"loss became {loss.item()}{where}: terms "
                             f"{({k: float(v) for k, v in terms.items()})}; lower --lr?")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if mark:
            mark("backward")
        if self.cfg.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            if self.cfg.clip_mode == "value":
                torch.nn.utils.clip_grad_value_(self.params, self.cfg.clip_grad)
            else:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if mark:
            mark("optimizer")
        return loss, terms


def build_step(cfg: TrainConfig, student: nn.Module, distillers: nn.ModuleList, teachers: list[Teacher],
               norm: tuple, device: torch.device, world: int = 1, epoch: int = 0) -> StepRunner:
    """Student + distillers + teachers as one training step with its optimiser, the encoder frozen
    as `epoch` asks and the memory format of --channels-last."""
    apply_freeze(cfg, student, epoch)
    step_module = TrainStep(student, distillers, teachers, norm).to(device)
    if cfg.channels_last:
        # Faster convolutions on GPUs and, for depthwise convs, on CPU too (oneDNN).
        step_module = step_module.to(memory_format=torch.channels_last)
    return StepRunner(cfg, step_module, build_optimizer(cfg, step_module, student), device, world)


def check_resume_config(cfg: TrainConfig, config_path: str) -> None:
    """--resume continues the run RUN holds: refuse a command that would train something else
    (another model, data, schedule or loss), naming each difference; how the run is driven
    (--epochs, --time-limit, threads, speed options that keep the math) may change."""
    from kdas_core.training.config import STEPS, read_config_file

    if not os.path.isfile(config_path):
        return  # a run folder from before config.json existed: nothing to compare with
    # A field a run's config lacks predates its option: that run trained as the baseline step does.
    saved = {**STEPS["baseline"], **read_config_file(config_path)}
    now = cfg.to_dict()
    differ = []
    for k, v in now.items():
        if k in _RUN_CONTROL or k not in saved:
            continue
        old = saved[k]
        old = list(old) if isinstance(old, tuple) else old
        if k in _PATHS:
            old, v = _same_paths(old), _same_paths(v)
        if old != v:
            differ.append(f"{k}: run {_show_value(old)}, now {_show_value(v)}")
    if differ:
        raise UsageError(f"--resume: {cfg.out} was trained differently from what this command asks ("
                         + "; ".join(differ) + "). Resume with the run's own settings "
                         f"(--config {config_path} --resume), or train a new run with another --out")


_PATHS = {"data", "teachers", "teacher_targets", "pretrained", "groups"}


def _same_paths(v: Any) -> Any:
    """Paths compared as the files they name (a relative and an absolute spelling are one run)."""
    if isinstance(v, list):
        return [_same_paths(x) for x in v]
    return os.path.realpath(v) if isinstance(v, str) and os.path.exists(v) else v


def _show_value(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
    return repr(v) if isinstance(v, str) else str(v)


@dataclass
class Run:
    """Everything a training run holds once set up: what `run_training` loops over."""

    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    size: int
    mean: list[float]
    std: list[float]
    train_pairs: list
    val_pairs: list
    paths: dict[str, str]
    student: nn.Module
    teachers: list[Teacher]
    distillers: nn.ModuleList
    runner: StepRunner
    dataset: TrainDataset
    progress: dict[str, Any]
    batches_per_epoch: int
    total_steps: int
    warmup: int
    small_epochs: int
    drop_last: bool
    meta_common: dict[str, Any]
    log: "RunLog | None" = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_run(cfg: TrainConfig) -> Run:
    """Data split, student (fresh or from --resume), teachers or cached targets, the step and its
    optimiser, the dataset; writes config.json and prints the plan (rank 0)."""
    device, rank, world = distributed.setup(cfg.device)
    is_main = rank == 0
    preset = resolve(cfg.model)
    size = cfg.image_size or preset.input_size
    mean, std = list(preset.mean), list(preset.std)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if world > 1 and cfg.frozen_stages and frozen_epochs(cfg) < cfg.epochs:
        raise UsageError("--frozen-for below 1 (stages that start learning mid-run) is not supported with several "
                         "processes (DDP fixes the trained parameters at start); use --frozen-for 1 or 0")
    layout = resolve_layout(cfg.data)
    if not layout.train:
        raise UsageError(f"{cfg.data}: no training data (TrainDataset/ or images/+masks/)")
    split = split_by_groups(layout.train, cfg.val_fraction, cfg.groups)
    train_pairs, val_pairs = split.train, split.val
    if cfg.subset:
        train_pairs = subset_pairs(train_pairs, cfg.subset)

    paths = {k: os.path.join(cfg.out, f) for k, f in (("last", "last.safetensors"), ("best", RUN_BEST),
                                                      ("state", "train_state.safetensors"), ("config", "config.json"))}
    if cfg.resume and not (os.path.exists(paths["last"]) and os.path.exists(paths["state"])):
        raise FileNotFoundError(f"--resume: {cfg.out} has no last.safetensors + train_state.safetensors to resume from")
    if not cfg.resume and os.path.exists(paths["last"]):
        raise FileExistsError(f"{cfg.out} already holds a run; use --resume to continue it or choose another --out")
    if cfg.resume:
        check_resume_config(cfg, paths["config"])
    os.makedirs(cfg.out, exist_ok=True)

    student = init_student(cfg)
    pretrained_desc = getattr(student, "pretrained_source", "none")
    n_params = count_params(student)
    cached = stored = None
    if cfg.teacher_targets:
        from kdas_core.data.targets import load as load_targets

        stored, cached = load_targets(cfg.teacher_targets, layout.train, size,
                                      [file_sha256(p) for p in cfg.teachers] if cfg.teachers else None,
                                      select=train_pairs)
        teachers = []
    else:
        teachers = _load_teachers(cfg.teachers, device)
    if cfg.kd != "none" and not teachers and cached is None:
        raise UsageError(f"--kd {cfg.kd} needs at least one --teacher checkpoint (or --teacher-targets)")
    distillers = build_distillers(cfg.kd, student, [t.model for t in teachers])
    if cached is not None:
        live = [d.name for d in distillers if d.teacher_outputs is None]
        if live or not len(distillers):
            raise UsageError(f"--teacher-targets holds the teachers' output maps only; --kd {cfg.kd} "
                             + (f"({', '.join(live)}) needs the teachers' features: give --teacher instead"
                                if live else "distils nothing: add --kd kdas, kdas-paper or kd"))

    progress = {"epoch": 0, "step": 0, "best_score": -1.0, "best_epoch": 0, "train_seconds": 0.0, "wall_seconds": 0.0}
    if cfg.resume:
        weights, meta = read_tensors(paths["last"])
        student.load_state_dict(weights)
        pretrained_desc = meta.get("pretrained", pretrained_desc)
    runner = build_step(cfg, student, distillers, teachers, (mean, std), device, world)
    if cfg.resume:
        progress = {"wall_seconds": 0.0, **load_train_state(paths["state"], runner.optimizer, distillers,
                                                             runner.scaler)}
        init_desc = f"resumed from {paths['last']} after epoch {progress['epoch']}; first init {pretrained_desc}"
    else:
        init_desc = pretrained_desc

    dataset = TrainDataset(train_pairs, size, mean, std, augment=cfg.augment, cache=cfg.cache_images,
                           progress=bars_wanted(cfg.progress and is_main), targets=stored if cached is not None else None)
    drop_last = len(dataset) >= cfg.batch_size * world * 2
    per_rank = math.ceil(len(dataset) / world)
    batches_per_epoch = per_rank // cfg.batch_size if drop_last else math.ceil(per_rank / cfg.batch_size)
    if cfg.steps_per_epoch:
        batches_per_epoch = min(batches_per_epoch, cfg.steps_per_epoch)
    # 'all' takes an optimiser step at every scale of every batch (the published code).
    steps_per_epoch = batches_per_epoch * (len(cfg.multiscale) if cfg.multiscale_mode == "all" else 1)

    data_info = {"root": os.path.abspath(cfg.data), "n_train": len(train_pairs), "n_val": len(val_pairs),
                 "val_fraction": cfg.val_fraction, "subset": cfg.subset, "groups": cfg.groups,
                 "n_groups": split.n_groups, "test_sets": {n: len(p) for n, p in layout.tests.items()}}
    teacher_info = [{"path": os.path.abspath(t.path), "preset": t.meta["preset"], "sha256": file_sha256(t.path)}
                    for t in teachers]
    if cached is not None:
        teacher_info = [{k: t[k] for k in ("path", "preset", "sha256")} | {"via": "cached targets",
                        "tta": cached["key"]["tta"]} for t in cached["teachers"]]
    meta_common = dict(input_size=size, threshold=cfg.threshold, data=data_info, pretrained=pretrained_desc,
                       kd=cfg.kd, kd_weights={d.name: d.weight for d in distillers}, teachers=teacher_info,
                       recipe=cfg.recipe, epochs=cfg.epochs,
                       selection="best validation mDice" if val_pairs else "last epoch (no validation split)")
    run = Run(cfg, device, rank, world, size, mean, std, train_pairs, val_pairs, paths, student, teachers, distillers,
              runner, dataset, progress, batches_per_epoch, steps_per_epoch * cfg.epochs,
              int(cfg.warmup_epochs * steps_per_epoch),
              round(cfg.progressive[1] * cfg.epochs) if cfg.progressive else 0, drop_last, meta_common)
    if is_main:
        write_json(paths["config"], {**cfg.to_dict(), "resolved": {
            "image_size": size, "mean": mean, "std": std, "device": str(device), "world_size": world,
            "amp": str(runner.amp_dtype) if runner.use_amp else "off", "pretrained": pretrained_desc,
            "steps_per_epoch": steps_per_epoch, "params_student": n_params,
            "params_frozen_at_start": sum(p.numel() for p in student.parameters() if not p.requires_grad),
            "teachers": teacher_info, "data": data_info}})
        run.log = RunLog(cfg.out, cfg.resume)
        frozen = (f", first {cfg.frozen_stages} encoder stage(s) frozen in epochs 1..{frozen_epochs(cfg)}"
                  if frozen_epochs(cfg) else "")
        print(f"[kdas] {cfg.model} ({n_params / 1e6:.2f} M params, init: "
              f"{init_desc}) on {device}, {split.describe()}"
              f"{f' (then --subset {cfg.subset}: {len(train_pairs)} train)' if cfg.subset else ''}; "
              f"{layout.describe_tests()}; {size}px, recipe {cfg.recipe}, step {cfg.step}{frozen}, kd={cfg.kd}, "
              f"{_epochs_plan(progress['epoch'], cfg.epochs, cfg.resume)}", flush=True)
    return run


def train_one_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """One pass over the training images; returns the epoch's log row (loss terms and their shares)."""
    cfg, progress, device = run.cfg, run.progress, run.device
    # Seeding per epoch makes an epoch depend only on (seed, epoch, weights): --resume is exact.
    _seed_everything(cfg.seed * 100003 + epoch)
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    sampler = (DistributedSampler(run.dataset, seed=cfg.seed) if run.world > 1
               else RandomSampler(run.dataset, generator=gen))
    if run.world > 1:
        sampler.set_epoch(epoch)
    loader = DataLoader(run.dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        drop_last=run.drop_last, pin_memory=device.type == "cuda",
                        generator=gen, persistent_workers=False)
    apply_freeze(cfg, run.student, epoch)
    run.runner.module.train()
    for t in run.teachers:
        t.model.eval()
    sums: dict[str, float] = {}
    n_seen, steps_done, lr, t0 = 0, 0, cfg.lr, time.time()
    size_rate = cfg.progressive[0] if epoch < run.small_epochs else 1.0
    bar = _progress(loader, run.batches_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and run.is_main)
    for i, batch in enumerate(bar):
        if i >= run.batches_per_epoch:
            break
        scales = cfg.multiscale if cfg.multiscale_mode == "all" else [random.choice(cfg.multiscale)]
        # Moved once per batch; 'all' rescales the same batch for each of its steps.
        image_b = batch["image"].to(device, non_blocking=True)
        mask_b = batch["mask"].to(device, non_blocking=True)
        targets_b = batch["targets"].to(device, non_blocking=True) if "targets" in batch else None
        for rate in scales:
            lr = cfg.lr * _lr_factor(progress["step"], run.total_steps, run.warmup, cfg.schedule)
            for g in run.runner.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_mult", 1.0)
            image, mask = _rescale(image_b, mask_b, rate * size_rate)
            targets = targets_b  # cached teacher maps: the same resize as the image
            if targets is not None and targets.shape[-2:] != image.shape[-2:]:
                targets = F.interpolate(targets, size=image.shape[-2:], mode="bilinear", align_corners=True)
            loss, terms = run.runner(image, mask, targets, where=f" at epoch {epoch + 1}, step {i + 1}")
            progress["step"] += 1
            steps_done += 1
            n_seen += image.shape[0]
            for k, v in {"loss": loss, **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{sums['loss'] / max(1, steps_done):.4f}", lr=f"{lr:.1e}",
                            img_s=f"{n_seen * run.world / max(1e-6, time.time() - t0):.1f}")
    if hasattr(bar, "close"):
        bar.close()
    epoch_seconds = time.time() - t0
    progress["train_seconds"] += epoch_seconds
    row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "seconds": round(epoch_seconds, 1),
                           "img_per_s": round(n_seen * run.world / max(1e-6, epoch_seconds), 2),
                           "train_side": scaled_size(run.size, size_rate) if size_rate != 1.0 else run.size}
    means = {k: distributed.mean_across(v / max(1, steps_done), device) for k, v in sums.items()}
    row.update({f"train_{k}": v for k, v in means.items()})
    # Each term's share of the total loss: a reader sees at once whether one term dominates.
    if len(means) > 2:
        row.update({f"share_{k}": round(v / means["loss"], 4) for k, v in means.items()
                    if k != "loss" and means["loss"]})
    progress["epoch"] = epoch + 1
    return row


def validate(run: Run) -> dict[str, float]:
    """The student on the held-out split: mDice, mIoU, the papers' mDice_mean256, MAE."""
    from kdas_core.evaluation.scoring import evaluate_pairs  # late import: evaluation imports heavy optional bits

    summary, _ = evaluate_pairs(run.student, run.val_pairs, run.size, run.mean, run.std, run.cfg.threshold,
                                str(run.device), batch_size=max(1, run.cfg.batch_size // 2), desc="validate",
                                progress=bars_wanted(run.cfg.progress))
    return {k: float(summary[k]) for k in ("mDice", "mIoU", "mDice_mean256", "MAE") if k in summary}


def save_epoch(run: Run, val_metrics: dict[str, float], improved: bool) -> None:
    """last (and, when validation improved, best) checkpoint and the exact train state."""
    progress = run.progress
    meta = build_metadata(run.cfg.model, epoch=progress["epoch"], val_metrics=val_metrics, **run.meta_common)
    if improved:
        progress["best_score"] = val_metrics.get("mDice", progress["best_score"])
        progress["best_epoch"] = progress["epoch"]
        save_checkpoint(run.paths["best"], run.student, meta)
    save_checkpoint(run.paths["last"], run.student, meta)
    save_train_state(run.paths["state"], run.runner.optimizer, run.distillers, progress, run.runner.scaler)


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or distil) as configured; returns a summary with paths and the best validation score."""
    started = time.time()
    created_out = None if os.path.isdir(cfg.out) else cfg.out  # removed again if the run fails before writing
    try:
        run = setup_run(cfg)
        progress = run.progress
        longest_epoch = 0.0
        setup_seconds = time.time() - started  # model, data split and image cache: part of the wall time
        for epoch in range(progress["epoch"], cfg.epochs):
            epoch_started = time.time() - setup_seconds
            setup_seconds = 0.0
            row = train_one_epoch(run, epoch)
            if run.is_main:
                val_metrics: dict[str, float] = {}
                if run.val_pairs and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                    val_metrics = validate(run)
                    row.update({f"val_{k}": v for k, v in val_metrics.items()})
                    improved = val_metrics["mDice"] > progress["best_score"]
                else:
                    improved = not run.val_pairs  # no validation split: best = last, said in the metadata
                progress["wall_seconds"] += time.time() - epoch_started
                row["wall_min"] = round(progress["wall_seconds"] / 60, 2)
                save_epoch(run, val_metrics, improved)
                run.log.write(row)
                msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                print(f"[kdas] {msg}{'  *best*' if improved else ''}", flush=True)
            distributed.barrier()
            if cfg.time_limit and epoch + 1 < cfg.epochs:
                # Stop before an epoch that would not fit, judged by the slowest epoch so far.
                now = time.time()
                longest_epoch = max(longest_epoch, now - epoch_started)
                if distributed.any_across(now - started + longest_epoch > cfg.time_limit * 60, run.device):
                    break

        if run.is_main:
            run.log.close()
        return {"is_main": run.is_main, "out": cfg.out, "best": run.paths["best"], "last": run.paths["last"],
                "best_val_mDice": progress["best_score"], "best_epoch": progress["best_epoch"],
                "train_seconds": progress["train_seconds"], "params": count_params(run.student),
                "epoch": progress["epoch"], "finished": progress["epoch"] >= cfg.epochs}
    except BaseException:
        if created_out and os.path.isdir(created_out) and not os.listdir(created_out):
            try:
                os.rmdir(created_out)  # a failed start leaves no empty --out folder behind
            except OSError:
                pass  # another rank was first
        raise
    finally:
        distributed.cleanup()


def _epochs_plan(done: int, epochs: int, resumed: bool) -> str:
    """What this run will do, in words ("epochs 1..8", "resumed: epochs 4..8", "nothing to do")."""
    if done >= epochs:
        return (f"all {epochs} epochs already done: nothing to train (give a larger --epochs with --resume "
                "to train on)")
    if resumed:
        return (f"resumed at epoch {done + 1}: epochs {done + 1}..{epochs} (state is saved at each epoch's end, "
                f"so an epoch interrupted midway starts again from its beginning)")
    return f"epochs 1..{epochs}"


def _progress(loader, total: int, desc: str, enabled: bool):
    if not bars_wanted(enabled):  # a log file gets the one "[kdas] epoch ..." line per epoch instead
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=False)
