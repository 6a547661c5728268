"""Training speed on this machine: images/s and seconds per epoch, split into data loading, forward,
backward and optimizer time, so the bottleneck is visible.

Examples:
  python -m kdas_core.bench_train --model polyppvt-lite0 --data ../shared/data/polyp-352
  python -m kdas_core.bench_train --model polyppvt-lite0 --data DATA --image-size 352 --threads 2 --json bench.json
  python -m kdas_core.bench_train --model polyppvt-lite0 --data DATA --no-cache-images --workers 1   # today's loader
  python -m kdas_core.bench_train --teacher T.safetensors --kd kdas --model polyppvt-lite0 --data DATA  # KD cost
  python -m kdas_core.bench_train --kd-cost --teacher T.safetensors --teacher-targets TARGETS --kd kdas \
      --model polyppvt-lite0 --data DATA --json results/kd_cost.json   # plain vs live teacher vs cached, interleaved

It runs the training step of `kdas_core.train` (same model, loss, recipe flags; every training
flag is accepted) for --steps timed steps after --warmup untimed ones, on the first batches of
the training split, and writes nothing but the optional --json. Timings are wall-clock: run it on
an otherwise idle machine, or compare two settings back to back and say so.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from .atomic import write_json
from .cli_common import run_cli
from .cli_conventions import UsageError, positive_int
from .training.config import add_training_args, config_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kdas_core.bench_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("benchmark")
    g.add_argument("--steps", type=positive_int, default=20, help="timed optimiser steps (default: 20)")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    g.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    g.add_argument("--teacher", action="append", metavar="CKPT", help="teacher checkpoint(s), to time a --kd step")
    g.add_argument("--kd", default="none", metavar="METHOD", help="distillation method to time (default: none)")
    g.add_argument("--teacher-targets", metavar="DIR", help="cached teacher targets (kdas_core.teacher_targets)")
    g.add_argument("--kd-cost", action="store_true",
                   help="time plain training, --kd with the live --teacher and --kd with --teacher-targets in one run, "
                        "step by step in turn (so the ratios hold on a busy machine)")
    add_training_args(p)
    for action in p._actions:
        if action.dest == "out":
            action.help = "unused (the benchmark writes no run folder)"
    return p


def _now(sync) -> float:
    sync()
    return time.perf_counter()


def _next_batch(state: dict) -> dict:
    """The next batch of state["loader"], starting it again when an epoch's batches run out."""
    try:
        return next(state["it"])
    except StopIteration:
        state["it"] = iter(state["loader"])
        return next(state["it"])


def _setup(cfg):
    """(device, sync, preset, size, layout, training split) of a benchmark, threads applied."""
    import torch

    from .data.dataset import resolve_layout, split_by_groups
    from .models import resolve

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    preset = resolve(cfg.model)
    layout = resolve_layout(cfg.data)
    split = split_by_groups(layout.train, cfg.val_fraction, cfg.groups)
    return device, sync, preset, cfg.image_size or preset.input_size, layout, split


def measure(cfg, steps: int, warmup: int) -> dict:
    """Time `steps` training steps of `cfg`; returns per-phase medians and totals (seconds)."""
    import torch

    from .data.dataset import TrainDataset
    from .training.trainer import TrainStep, _load_teachers, _rescale, init_student
    from .losses import build_distillers

    device, sync, preset, size, layout, split = _setup(cfg)
    student = init_student(cfg)
    teachers = _load_teachers(cfg.teachers, device)
    distillers = build_distillers(cfg.kd, student, [t.model for t in teachers])
    step_module = TrainStep(student, distillers, teachers, (list(preset.mean), list(preset.std))).to(device)
    step_module = step_module.to(memory_format=torch.channels_last).train()
    params = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    t_cache = time.perf_counter()
    dataset = TrainDataset(split.train, size, preset.mean, preset.std, augment=cfg.augment, cache=cfg.cache_images)
    cache_seconds = time.perf_counter() - t_cache if cfg.cache_images else 0.0
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                                         num_workers=cfg.workers, drop_last=True)
    phases: dict[str, list[float]] = {"data": [], "forward": [], "backward": [], "optimizer": []}
    images = 0
    total = warmup + steps
    state = {"loader": loader, "it": iter(loader)}
    rng = random.Random(cfg.seed)
    for n in range(total):
        t0 = _now(sync)
        batch = _next_batch(state)
        image = batch["image"].to(device)
        mask = batch["mask"].to(device)
        image, mask = _rescale(image, mask, rng.choice(cfg.multiscale))
        image = image.contiguous(memory_format=torch.channels_last)
        t1 = _now(sync)
        loss, _ = step_module(image, mask)
        t2 = _now(sync)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = _now(sync)
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        optimizer.step()
        t4 = _now(sync)
        if n >= warmup:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[k].append(dt)
            images += image.shape[0]
    per_step = {k: statistics.median(v) for k, v in phases.items()}
    step_s = sum(statistics.mean(v) for v in phases.values())
    img_s = images / sum(sum(v) for v in phases.values())
    steps_per_epoch = len(dataset) // cfg.batch_size
    return {
        "model": cfg.model, "image_size": size, "batch_size": cfg.batch_size, "kd": cfg.kd,
        "device": str(device), "threads": torch.get_num_threads(), "workers": cfg.workers,
        "cache_images": cfg.cache_images, "multiscale": list(cfg.multiscale), "n_train": len(dataset),
        "steps": steps, "images_per_s": round(img_s, 2), "step_seconds_mean": round(step_s, 4),
        "phase_seconds_median": {k: round(v, 4) for k, v in per_step.items()},
        "phase_share": {k: round(statistics.mean(v) / step_s, 3) for k, v in phases.items()},
        "epoch_seconds_estimate": round(steps_per_epoch * step_s, 1),
        "cache_seconds": round(cache_seconds, 1),
        "torch": torch.__version__,
    }


def kd_cost(cfg, steps: int, warmup: int) -> dict:
    """Seconds per optimiser step for plain training, live-teacher KD and cached-target KD, measured
    in one process, one step of each in turn, from the same initial weights and batches."""
    import torch

    from .checkpoint import file_sha256
    from .data.dataset import TrainDataset
    from .training.trainer import TrainStep, _load_teachers, _rescale, init_student
    from .losses import build_distillers
    from .teacher_targets import load as load_targets

    device, sync, preset, size, layout, split = _setup(cfg)
    norm = (list(preset.mean), list(preset.std))
    pairs = split.train
    stored, _ = load_targets(cfg.teacher_targets, layout.train, size, [file_sha256(p) for p in cfg.teachers],
                             select=pairs)
    teachers = _load_teachers(cfg.teachers, device)
    variants = {}
    for name, kd, tlist, targets in (("plain", "none", [], None), ("live_teacher", cfg.kd, teachers, None),
                                     ("cached_targets", cfg.kd, [], stored)):
        student = init_student(cfg)
        step = TrainStep(student, build_distillers(kd, student, [t.model for t in teachers]), tlist, norm).to(device)
        step = step.to(memory_format=torch.channels_last).train()
        params = [p for p in step.parameters() if p.requires_grad]
        ds = TrainDataset(pairs, size, preset.mean, preset.std, augment=cfg.augment, cache=cfg.cache_images, targets=targets)
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.workers,
                                             drop_last=True, generator=torch.Generator().manual_seed(cfg.seed))
        variants[name] = {"step": step, "opt": torch.optim.AdamW(params, lr=cfg.lr),
                          "loader": loader, "it": iter(loader), "times": []}
    for n in range(warmup + steps):
        for name, v in variants.items():
            t0 = _now(sync)
            batch = _next_batch(v)
            image, mask = _rescale(batch["image"].to(device), batch["mask"].to(device), 1.0)
            targets = batch["targets"].to(device) if "targets" in batch else None
            loss, _ = v["step"](image.contiguous(memory_format=torch.channels_last), mask, targets)
            v["opt"].zero_grad(set_to_none=True)
            loss.backward()
            v["opt"].step()
            if n >= warmup:
                v["times"].append(_now(sync) - t0)
    med = {k: statistics.median(v["times"]) for k, v in variants.items()}
    return {"model": cfg.model, "teachers": [t.meta["preset"] for t in teachers], "kd": cfg.kd, "image_size": size,
            "batch_size": cfg.batch_size, "device": str(device), "threads": torch.get_num_threads(),
            "steps": steps, "step_seconds_median": {k: round(v, 4) for k, v in med.items()},
            "ratio_to_plain": {k: round(v / med["plain"], 3) for k, v in med.items()},
            "torch": torch.__version__}


def report(r: dict) -> str:
    ph = r["phase_seconds_median"]
    lines = [f"{r['model']} at {r['image_size']}px, batch {r['batch_size']}, kd={r['kd']}, {r['device']}, "
             f"{r['threads']} threads, workers {r['workers']}, image cache {'on' if r['cache_images'] else 'off'}",
             f"  {r['images_per_s']:.2f} images/s, {r['step_seconds_mean']:.3f} s/step, "
             f"~{r['epoch_seconds_estimate'] / 60:.1f} min/epoch ({r['n_train']} images)"
             + (f", cache built in {r['cache_seconds']:.0f} s" if r["cache_images"] else ""),
             "  per step (median): " + ", ".join(f"{k} {v * 1000:.0f} ms ({r['phase_share'][k]:.0%})" for k, v in ph.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "out"):
        args.out = "-"

    def go() -> None:
        cfg = config_from_args(args)
        if args.kd_cost:
            if not (cfg.teachers and cfg.teacher_targets and cfg.kd != "none"):
                raise UsageError("--kd-cost needs --teacher, --teacher-targets (made from that teacher) and --kd METHOD")
            r = kd_cost(cfg, args.steps, max(0, args.warmup))
            print(f"{r['model']} {r['image_size']}px batch {r['batch_size']}, --kd {r['kd']} from {', '.join(r['teachers'])}: "
                  + ", ".join(f"{k} {v:.3f} s/step ({r['ratio_to_plain'][k]:.2f}x)" for k, v in r["step_seconds_median"].items()))
        else:
            if cfg.kd != "none" and not cfg.teachers:
                raise UsageError(f"--kd {cfg.kd} needs --teacher")
            r = measure(cfg, args.steps, max(0, args.warmup))
            print(report(r))
        if args.json:
            write_json(args.json, r)

    return run_cli(go, "kdas_core.bench_train")


if __name__ == "__main__":
    sys.exit(main())
