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

from ..atomic import staged, write_json
from ..cli_conventions import RunFailure, UsageError, bars_wanted
from ..checkpoint import build_metadata, file_sha256, load_checkpoint, read_tensors, save_checkpoint
from ..data.dataset import TrainDataset, resolve_layout, split_by_groups, subset_pairs
from ..losses import build_distillers, structure_loss
from ..losses.structure import boundary_weights
from ..models import create_model, resolve
from ..profile import count_params
from . import distributed
from .config import TrainConfig
from .state import load_train_state, save_train_state


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
    side = max(32, int(round(image.shape[-1] * rate / 32) * 32))
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


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or distil) as configured; returns a summary with paths and the best validation score."""
    from ..evaluation import evaluate_pairs  # late import: evaluation imports heavy optional bits

    started = time.time()
    device, rank, world = distributed.setup(cfg.device)
    is_main = rank == 0
    created_out = None
    try:
        preset = resolve(cfg.model)
        size = cfg.image_size or preset.input_size
        mean, std = list(preset.mean), list(preset.std)

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        layout = resolve_layout(cfg.data)
        if not layout.train:
            raise UsageError(f"{cfg.data}: no training data (TrainDataset/ or images/+masks/)")
        split = split_by_groups(layout.train, cfg.val_fraction, cfg.groups)
        train_pairs, val_pairs = split.train, split.val
        if cfg.subset:
            train_pairs = subset_pairs(train_pairs, cfg.subset)

        if not os.path.isdir(cfg.out):
            created_out = cfg.out  # removed again if the run fails before writing anything into it
        os.makedirs(cfg.out, exist_ok=True)
        last_path = os.path.join(cfg.out, "last.safetensors")
        best_path = os.path.join(cfg.out, "best.safetensors")
        state_path = os.path.join(cfg.out, "train_state.safetensors")
        if cfg.resume and not (os.path.exists(last_path) and os.path.exists(state_path)):
            raise FileNotFoundError(f"--resume: {cfg.out} has no last.safetensors + train_state.safetensors to resume from")
        if not cfg.resume and os.path.exists(last_path):
            raise FileExistsError(f"{cfg.out} already holds a run; use --resume to continue it or choose another --out")

        student = init_student(cfg)
        pretrained_desc = getattr(student, "pretrained_source", "none")
        n_params = count_params(student)
        cached = None
        if cfg.teacher_targets:
            from ..teacher_targets import load as load_targets

            stored, cached = load_targets(cfg.teacher_targets, layout.train, size,
                                          [file_sha256(p) for p in cfg.teachers] if cfg.teachers else None,
                                          select=train_pairs)
            teachers = []
        else:
            teachers = _load_teachers(cfg.teachers, device)
        if cfg.kd != "none" and not teachers and cached is None:
            raise UsageError(f"--kd {cfg.kd} needs at least one --teacher checkpoint (or --teacher-targets)")
        distillers = build_distillers(cfg.kd, student, [t.model for t in teachers])
        kd_weights = {d.name: d.weight for d in distillers}  # what --kd resolved to, for the metadata
        if cached is not None:
            live = [d.name for d in distillers if d.teacher_outputs is None]
            if live or not len(distillers):
                raise UsageError(f"--teacher-targets holds the teachers' output maps only; --kd {cfg.kd} "
                                 + (f"({', '.join(live)}) needs the teachers' features: give --teacher instead"
                                    if live else "distils nothing: add --kd kdas, kdas-paper or kd"))
        step_module = TrainStep(student, distillers, teachers, (mean, std)).to(device)
        # channels_last: faster convolutions on GPUs and, for depthwise convs, ~20 % on CPU too.
        step_module = step_module.to(memory_format=torch.channels_last)

        params = [p for p in step_module.parameters() if p.requires_grad]
        encoder_ids = {id(p) for p in student.encoder.parameters()}
        lr_groups = [
            {"params": [p for p in params if id(p) in encoder_ids], "lr_mult": 1.0, "name": "encoder"},
            {"params": [p for p in params if id(p) not in encoder_ids], "lr_mult": cfg.decoder_lr_mult,
             "name": "decoder+heads+adapters"},
        ]
        optimizer = torch.optim.AdamW([g for g in lr_groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
        use_amp = cfg.amp and device.type == "cuda"
        amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

        progress = {"epoch": 0, "step": 0, "best_score": -1.0, "best_epoch": 0, "train_seconds": 0.0, "wall_seconds": 0.0}
        if cfg.resume:
            weights, meta = read_tensors(last_path)
            student.load_state_dict(weights)
            progress = {"wall_seconds": 0.0, **load_train_state(state_path, optimizer, distillers, scaler)}
            pretrained_desc = meta.get("pretrained", pretrained_desc)
            init_desc = (f"resumed from {last_path} after epoch {progress['epoch']}; "
                         f"first init {pretrained_desc}")
        else:
            init_desc = pretrained_desc

        wrapped: nn.Module = step_module
        if world > 1:
            wrapped = DistributedDataParallel(step_module, find_unused_parameters=bool(list(distillers.parameters())))

        dataset = TrainDataset(train_pairs, size, mean, std, augment=cfg.augment, cache=cfg.cache_images,
                               progress=bars_wanted(cfg.progress and is_main), targets=stored if cached is not None else None)
        drop_last = len(dataset) >= cfg.batch_size * world * 2
        per_rank = math.ceil(len(dataset) / world)
        batches_per_epoch = per_rank // cfg.batch_size if drop_last else math.ceil(per_rank / cfg.batch_size)
        if cfg.steps_per_epoch:
            batches_per_epoch = min(batches_per_epoch, cfg.steps_per_epoch)
        # 'all' takes an optimiser step at every scale of every batch (the published code).
        steps_per_batch = len(cfg.multiscale) if cfg.multiscale_mode == "all" else 1
        steps_per_epoch = batches_per_epoch * steps_per_batch
        total_steps = steps_per_epoch * cfg.epochs
        warmup = int(cfg.warmup_epochs * steps_per_epoch)
        small_epochs = round(cfg.progressive[1] * cfg.epochs) if cfg.progressive else 0

        data_info = {"root": os.path.abspath(cfg.data), "n_train": len(train_pairs), "n_val": len(val_pairs),
                     "val_fraction": cfg.val_fraction, "subset": cfg.subset, "groups": cfg.groups,
                     "n_groups": split.n_groups, "test_sets": {n: len(p) for n, p in layout.tests.items()}}
        teacher_info = [{"path": os.path.abspath(t.path), "preset": t.meta["preset"], "sha256": file_sha256(t.path)}
                        for t in teachers]
        if cached is not None:
            teacher_info = [{k: t[k] for k in ("path", "preset", "sha256")} | {"via": "cached targets",
                            "tta": cached["key"]["tta"]} for t in cached["teachers"]]
        if is_main:
            write_json(os.path.join(cfg.out, "config.json"), {**cfg.to_dict(), "resolved": {
                "image_size": size, "mean": mean, "std": std, "device": str(device), "world_size": world,
                "amp": str(amp_dtype) if use_amp else "off", "pretrained": pretrained_desc,
                "steps_per_epoch": steps_per_epoch, "params_student": n_params, "teachers": teacher_info,
                "data": data_info}})
            log = RunLog(cfg.out, cfg.resume)
            print(f"[kdas] {cfg.model} ({n_params / 1e6:.2f} M params, init: "
                  f"{init_desc}) on {device}, {split.describe()}"
                  f"{f' (then --subset {cfg.subset}: {len(train_pairs)} train)' if cfg.subset else ''}; "
                  f"{layout.describe_tests()}; {size}px, recipe {cfg.recipe}, kd={cfg.kd}, "
                  f"{_epochs_plan(progress['epoch'], cfg.epochs, cfg.resume)}", flush=True)

        longest_epoch = 0.0
        setup_seconds = time.time() - started  # model, data split and image cache: part of the wall time
        for epoch in range(progress["epoch"], cfg.epochs):
            epoch_started = time.time() - setup_seconds
            setup_seconds = 0.0
            # Seeding per epoch makes an epoch depend only on (seed, epoch, weights): --resume is exact.
            _seed_everything(cfg.seed * 100003 + epoch)
            gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
            sampler = (DistributedSampler(dataset, seed=cfg.seed) if world > 1 else RandomSampler(dataset, generator=gen))
            if world > 1:
                sampler.set_epoch(epoch)
            loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                                drop_last=drop_last, pin_memory=device.type == "cuda",
                                generator=gen, persistent_workers=False)
            step_module.train()
            for t in teachers:
                t.model.eval()
            sums: dict[str, float] = {}
            n_seen, t0 = 0, time.time()
            size_rate = cfg.progressive[0] if epoch < small_epochs else 1.0
            bar = _progress(loader, batches_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and is_main)
            steps_done = 0
            for i, batch in enumerate(bar):
                if i >= batches_per_epoch:
                    break
                scales = cfg.multiscale if cfg.multiscale_mode == "all" else [random.choice(cfg.multiscale)]
                # Moved once per batch; 'all' rescales the same batch for each of its steps.
                image_b = batch["image"].to(device, non_blocking=True)
                mask_b = batch["mask"].to(device, non_blocking=True)
                targets_b = batch["targets"].to(device, non_blocking=True) if "targets" in batch else None
                for rate in scales:
                    lr = cfg.lr * _lr_factor(progress["step"], total_steps, warmup, cfg.schedule)
                    for g in optimizer.param_groups:
                        g["lr"] = lr * g.get("lr_mult", 1.0)
                    image, mask = _rescale(image_b, mask_b, rate * size_rate)
                    targets = targets_b  # cached teacher maps: the same resize as the image
                    if targets is not None and targets.shape[-2:] != image.shape[-2:]:
                        targets = F.interpolate(targets, size=image.shape[-2:], mode="bilinear", align_corners=True)
                    image = image.contiguous(memory_format=torch.channels_last)
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        loss, terms = wrapped(image, mask, targets)
                    if not torch.isfinite(loss):
                        raise RunFailure(f"loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}: "
                                                 f"terms {({k: float(v) for k, v in terms.items()})}; lower --lr?")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if cfg.clip_grad > 0:
                        scaler.unscale_(optimizer)
                        if cfg.clip_mode == "value":
                            torch.nn.utils.clip_grad_value_(params, cfg.clip_grad)
                        else:
                            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    progress["step"] += 1
                    steps_done += 1
                    n_seen += image.shape[0]
                    for k, v in {"loss": loss, **terms}.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{sums['loss'] / max(1, steps_done):.4f}", lr=f"{lr:.1e}",
                                    img_s=f"{n_seen * world / max(1e-6, time.time() - t0):.1f}")
            if hasattr(bar, "close"):
                bar.close()
            steps_done = max(1, steps_done)
            epoch_seconds = time.time() - t0
            progress["train_seconds"] += epoch_seconds
            row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "seconds": round(epoch_seconds, 1),
                                   "img_per_s": round(n_seen * world / max(1e-6, epoch_seconds), 2),
                                   "train_side": int(round(size * size_rate / 32) * 32) if size_rate != 1.0 else size}
            means = {k: distributed.mean_across(v / steps_done, device) for k, v in sums.items()}
            row.update({f"train_{k}": v for k, v in means.items()})
            # Each term's share of the total loss: a reader sees at once whether one term dominates.
            if len(means) > 2:
                row.update({f"share_{k}": round(v / means["loss"], 4) for k, v in means.items()
                            if k != "loss" and means["loss"]})
            progress["epoch"] = epoch + 1

            if is_main:
                val_metrics: dict[str, float] = {}
                is_last = epoch + 1 == cfg.epochs
                if val_pairs and ((epoch + 1) % cfg.val_every == 0 or is_last):
                    summary, _ = evaluate_pairs(student, val_pairs, size, mean, std, cfg.threshold, str(device),
                                                batch_size=max(1, cfg.batch_size // 2), desc="validate",
                                                progress=bars_wanted(cfg.progress))
                    val_metrics = {k: float(summary[k]) for k in ("mDice", "mIoU", "mDice_mean256", "MAE") if k in summary}
                    row.update({f"val_{k}": v for k, v in val_metrics.items()})
                    improved = val_metrics["mDice"] > progress["best_score"]
                elif not val_pairs:
                    improved = True  # no validation split: best = last, said in the metadata
                else:
                    improved = False
                progress["wall_seconds"] += time.time() - epoch_started
                row["wall_min"] = round(progress["wall_seconds"] / 60, 2)
                meta = build_metadata(cfg.model, input_size=size, threshold=cfg.threshold, epoch=epoch + 1,
                                      data=data_info, val_metrics=val_metrics, pretrained=pretrained_desc,
                                      kd=cfg.kd, kd_weights=kd_weights,
                                      teachers=teacher_info, recipe=cfg.recipe, epochs=cfg.epochs,
                                      selection="best validation mDice" if val_pairs else "last epoch (no validation split)")
                if improved:
                    progress["best_score"] = val_metrics.get("mDice", progress["best_score"])
                    progress["best_epoch"] = epoch + 1
                    save_checkpoint(best_path, student, meta)
                save_checkpoint(last_path, student, meta)
                save_train_state(state_path, optimizer, distillers, progress, scaler)
                log.write(row)
                msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                print(f"[kdas] {msg}{'  *best*' if improved else ''}", flush=True)
            distributed.barrier()
            if cfg.time_limit and epoch + 1 < cfg.epochs:
                # Stop before an epoch that would not fit, judged by the slowest epoch so far.
                now = time.time()
                longest_epoch = max(longest_epoch, now - epoch_started)
                if distributed.any_across(now - started + longest_epoch > cfg.time_limit * 60, device):
                    break

        if is_main:
            log.close()
        return {"is_main": is_main, "out": cfg.out, "best": best_path, "last": last_path, "best_val_mDice": progress["best_score"],
                "best_epoch": progress["best_epoch"], "train_seconds": progress["train_seconds"],
                "params": n_params, "epoch": progress["epoch"], "finished": progress["epoch"] >= cfg.epochs}
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
