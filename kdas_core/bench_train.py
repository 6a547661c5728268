"""Training speed on this machine: images/s and milliseconds per step, split into data loading,
forward, backward and optimiser, so the bottleneck is visible.

Examples:
  python -m kdas_core.bench_train --model polyppvt-lite0 --data ../shared/data/polyp-352 --image-size 256 --batch-size 8
  python -m kdas_core.bench_train --model polyppvt-lite0 --data DATA --image-size 256 --batch-size 8 \\
      --compare baseline default --json results/bench_train_compare.json   # two step settings, interleaved
  python -m kdas_core.bench_train --model polyppvt-lite0 --data DATA --frozen-stages 1 --compare default baseline
  python -m kdas_core.bench_train --model polyppvt-lite0 --data DATA --device cuda --json gpu.json
  python -m kdas_core.bench_train --kd-cost --teacher T.safetensors --teacher-targets TARGETS --kd kdas \\
      --model polyppvt-lite0 --data DATA --json results/kd_cost.json   # plain vs live teacher vs cached, interleaved

It runs the training step of `kdas_core.train` (the same model, loss, optimiser and step options;
every training flag is accepted) for --steps timed steps after --warmup untimed ones, on batches
of the training split drawn as training draws them (one --multiscale factor per batch; progressive
resizing is not applied: every step is at --image-size), and writes nothing but the optional --json.

--compare A B builds both step settings (`--step` names: default, baseline) from the same initial
weights and batches and runs one step of each in turn, so their ratio holds even on a busy machine;
it ends with `speedup X.XX×` (B's images/s over A's). Absolute figures need an otherwise idle
machine: say which it was. With --compile the first steps at each input size compile; their time
is reported apart (`warmup_seconds`), never inside the timed steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time

from kdas_core.io.atomic import write_json
from kdas_core.cli.conventions import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, Parser,
                                      UsageError, nonnegative_int, positive_int, run_cli)
from kdas_core.training.config import STEPS, add_training_args, config_from_args

PHASES = ("data", "forward", "backward", "optimizer")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m kdas_core.bench_train", description=__doc__,
               exit_codes=(EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED))
    g = p.add_argument_group("benchmark")
    g.add_argument("--steps", type=positive_int, default=20, metavar="N", help="timed optimiser steps (default: 20)")
    g.add_argument("--warmup", type=nonnegative_int, default=3, metavar="N", help="untimed steps first (default: 3)")
    g.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    g.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help=f"time two step settings step by step in turn, ending with B's speedup over A; each is a "
                        f"--step name ({', '.join(sorted(STEPS))}), optionally with training flags after a colon, "
                        "comma-separated: default:--frozen-stages=1,--no-frozen-fold")
    g.add_argument("--kd-cost", action="store_true",
                   help="time plain training, --kd with the live --teacher and --kd with --teacher-targets in one run, "
                        "step by step in turn (so the ratios hold on a busy machine)")
    add_training_args(p, kd="none")
    for action in p._actions:
        if action.dest == "out":
            action.help = "unused (the benchmark writes no run folder)"
    return p


class _Variant:
    """One way of training, set up as `kdas_core.train` sets it up: its own student (same seed,
    so the same initial weights as every other variant), step, optimiser and batch stream."""

    def __init__(self, cfg, device, preset, size, pairs, teachers, targets=None):
        import torch

        from kdas_core.data.dataset import TrainDataset
        from kdas_core.losses import build_distillers
        from kdas_core.training.trainer import build_step, init_student

        self.cfg, self.device = cfg, device
        student = init_student(cfg)
        distillers = build_distillers(cfg.kd, student, [t.model for t in teachers])
        self.runner = build_step(cfg, student, distillers, teachers, (list(preset.mean), list(preset.std)), device)
        self.runner.module.train()
        t0 = time.perf_counter()
        self.dataset = TrainDataset(pairs, size, preset.mean, preset.std, augment=cfg.augment,
                                    cache=cfg.cache_images, targets=targets)
        self.cache_seconds = time.perf_counter() - t0 if cfg.cache_images else 0.0
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_size=cfg.batch_size, shuffle=True,
                                                  num_workers=cfg.workers, drop_last=True,
                                                  generator=torch.Generator().manual_seed(cfg.seed))
        self.it = iter(self.loader)
        self.rng = random.Random(cfg.seed)
        self.times: dict[str, list[float]] = {k: [] for k in PHASES}
        self.images = 0
        self.warmup_seconds = 0.0

    def _next_batch(self) -> dict:
        try:
            return next(self.it)
        except StopIteration:  # an epoch's batches ran out: start the loader again
            self.it = iter(self.loader)
            return next(self.it)

    def step(self, sync, timed: bool) -> None:
        from kdas_core.training.trainer import _rescale

        marks = [("start", _now(sync))]
        batch = self._next_batch()
        image, mask = _rescale(batch["image"].to(self.device), batch["mask"].to(self.device),
                               self.rng.choice(self.cfg.multiscale))
        targets = batch["targets"].to(self.device) if "targets" in batch else None
        if targets is not None and targets.shape[-2:] != image.shape[-2:]:
            import torch.nn.functional as F

            targets = F.interpolate(targets, size=image.shape[-2:], mode="bilinear", align_corners=True)
        marks.append(("data", _now(sync)))
        self.runner(image, mask, targets, mark=lambda phase: marks.append((phase, _now(sync))))
        if timed:
            for (_, a), (phase, b) in zip(marks, marks[1:]):
                self.times[phase].append(b - a)
            self.images += image.shape[0]
        else:
            self.warmup_seconds += marks[-1][1] - marks[0][1]

    def figures(self) -> dict:
        import torch

        cfg = self.cfg
        total = sum(sum(v) for v in self.times.values())
        step_s = total / max(1, len(self.times["forward"]))
        return {
            "model": cfg.model, "step": cfg.step, "kd": cfg.kd, "batch_size": cfg.batch_size,
            "step_options": {k: getattr(cfg, k) for k in STEPS["baseline"]},
            "threads": torch.get_num_threads(), "workers": cfg.workers, "cache_images": cfg.cache_images,
            "multiscale": list(cfg.multiscale), "n_train": len(self.dataset),
            "images_per_s": round(self.images / total, 2) if total else 0.0,
            "step_seconds_mean": round(step_s, 4),
            "phase_ms_median": {k: round(1000 * statistics.median(v), 1) for k, v in self.times.items() if v},
            "phase_share": {k: round(sum(v) / total, 3) for k, v in self.times.items() if total},
            "epoch_seconds_estimate": round(len(self.dataset) // cfg.batch_size * step_s, 1),
            "warmup_seconds": round(self.warmup_seconds, 2),
            "cache_seconds": round(self.cache_seconds, 1),
        }


def _now(sync) -> float:
    sync()
    return time.perf_counter()


def _setup(cfg):
    """(device, sync, preset, size, layout, training pairs) of a benchmark, threads applied."""
    import torch

    from kdas_core.cli.conventions import require_device
    from kdas_core.data.dataset import resolve_layout, split_by_groups
    from kdas_core.models import resolve

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(require_device(cfg.device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    preset = resolve(cfg.model)
    layout = resolve_layout(cfg.data)
    split = split_by_groups(layout.train, cfg.val_fraction, cfg.groups)
    return device, sync, preset, cfg.image_size or preset.input_size, layout, split.train


def _interleave(variants: dict[str, _Variant], sync, steps: int, warmup: int) -> None:
    """One step of each variant in turn, `warmup` untimed rounds first."""
    for n in range(warmup + steps):
        for v in variants.values():
            v.step(sync, timed=n >= warmup)


def _header(cfg, device, size, steps: int) -> dict:
    import torch

    return {"model": cfg.model, "image_size": size, "batch_size": cfg.batch_size, "kd": cfg.kd,
            "device": str(device), "threads": torch.get_num_threads(), "workers": cfg.workers, "steps": steps,
            "torch": torch.__version__}


def measure(cfg, steps: int, warmup: int) -> dict:
    """Time `steps` training steps of `cfg`: per-phase medians (ms), images/s, an epoch's estimate."""
    device, sync, preset, size, layout, pairs = _setup(cfg)
    from kdas_core.training.trainer import _load_teachers

    v = _Variant(cfg, device, preset, size, pairs, _load_teachers(cfg.teachers, device))
    _interleave({"only": v}, sync, steps, warmup)
    return {**_header(cfg, device, size, steps), **v.figures()}


def compare(cfgs: dict, steps: int, warmup: int) -> dict:
    """Two (or more) step settings, one step of each in turn from the same initial weights and
    batches; `speedup` is the last one's images/s over the first one's."""
    first = next(iter(cfgs.values()))
    device, sync, preset, size, layout, pairs = _setup(first)
    from kdas_core.training.trainer import _load_teachers

    teachers = _load_teachers(first.teachers, device)
    variants = {name: _Variant(c, device, preset, size, pairs, teachers) for name, c in cfgs.items()}
    _interleave(variants, sync, steps, warmup)
    figures = {name: v.figures() for name, v in variants.items()}
    names = list(figures)
    base, new = figures[names[0]]["images_per_s"], figures[names[-1]]["images_per_s"]
    return {**_header(first, device, size, steps), "order": names, "settings": figures,
            "speedup": round(new / base, 3) if base else None}


def kd_cost(cfg, steps: int, warmup: int) -> dict:
    """Seconds per optimiser step for plain training, live-teacher KD and cached-target KD, measured
    in one process, one step of each in turn, from the same initial weights and batches."""
    from kdas_core.io.checkpoint import file_sha256
    from kdas_core.data.targets import load as load_targets
    from kdas_core.training.trainer import _load_teachers

    device, sync, preset, size, layout, pairs = _setup(cfg)
    stored, _ = load_targets(cfg.teacher_targets, layout.train, size, [file_sha256(p) for p in cfg.teachers],
                             select=pairs)
    teachers = _load_teachers(cfg.teachers, device)
    plain = dataclasses.replace(cfg, kd="none")
    variants = {"plain": _Variant(plain, device, preset, size, pairs, []),
                "live_teacher": _Variant(cfg, device, preset, size, pairs, teachers),
                "cached_targets": _Variant(cfg, device, preset, size, pairs, [], targets=stored)}
    _interleave(variants, sync, steps, warmup)
    step_s = {k: statistics.median([sum(t) for t in zip(*v.times.values())]) for k, v in variants.items()}
    return {**_header(cfg, device, size, steps), "teachers": [t.meta["preset"] for t in teachers],
            "step_seconds_median": {k: round(v, 4) for k, v in step_s.items()},
            "ratio_to_plain": {k: round(v / step_s["plain"], 3) for k, v in step_s.items()}}


def report(r: dict, name: str | None = None) -> str:
    """Two lines for one setting: throughput, then the phases."""
    ph = r["phase_ms_median"]
    label = f"{name:<9} " if name else ""
    return (f"  {label}{r['images_per_s']:.2f} images/s, {r['step_seconds_mean'] * 1000:.0f} ms/step, "
            f"~{r['epoch_seconds_estimate'] / 60:.1f} min/epoch ({r['n_train']} images)"
            + (f", warm-up {r['warmup_seconds']:.1f} s" if r["step_options"]["compile"] else "") + "\n"
            f"  {' ' * len(label)}per step (median): "
            + ", ".join(f"{k} {v:.0f} ms ({r['phase_share'][k]:.0%})" for k, v in ph.items()))


def _describe(r: dict) -> str:
    return (f"{r['model']} at {r['image_size']}px, batch {r['batch_size']}, kd={r['kd']}, {r['device']}, "
            f"{r['threads']} threads, workers {r['workers']}, {r['steps']} timed steps")


def _variant_args(parser: argparse.ArgumentParser, argv: list[str], item: str) -> argparse.Namespace:
    """The command line of one --compare item: the command's flags, then --step NAME and the item's
    own flags (which win)."""
    name, _, extra = item.partition(":")
    if name not in STEPS:
        raise UsageError(f"--compare {item}: {name!r} is not a step setting (choose from {', '.join(sorted(STEPS))})")
    own = [a for a in extra.split(",") if a]
    if any(not a.startswith("--") for a in own):
        raise UsageError(f"--compare {item}: after the colon come training flags, e.g. {name}:--frozen-stages=1")
    rest, skip = [], 0
    for i, a in enumerate(argv):  # drop --compare and its two values
        if skip:
            skip -= 1
        elif a == "--compare":
            skip = 2
        else:
            rest.append(a)
    try:
        ns = parser.parse_args([*rest, "--step", name, *own])
    except SystemExit as exc:
        raise UsageError(f"--compare {item}: the flags after the colon are not valid training flags") from exc
    if not hasattr(ns, "out"):
        ns.out = "-"
    return ns


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "out"):
        args.out = "-"

    def go() -> None:
        cfg = config_from_args(args)
        if args.kd_cost and args.compare:
            raise UsageError("--kd-cost and --compare time different things: give one of them")
        if args.kd_cost:
            if not (cfg.teachers and cfg.teacher_targets and cfg.kd != "none"):
                raise UsageError("--kd-cost needs --teacher, --teacher-targets (made from that teacher) and --kd METHOD")
            r = kd_cost(cfg, args.steps, args.warmup)
            print(f"{r['model']} {r['image_size']}px batch {r['batch_size']}, --kd {r['kd']} from {', '.join(r['teachers'])}: "
                  + ", ".join(f"{k} {v:.3f} s/step ({r['ratio_to_plain'][k]:.2f}x)" for k, v in r["step_seconds_median"].items()))
        else:
            if cfg.kd != "none" and not cfg.teachers:
                raise UsageError(f"--kd {cfg.kd} needs --teacher (bench_train runs the teacher live; "
                                 "--kd-cost compares with cached targets)")
            if args.compare:
                a, b = args.compare
                if a == b:
                    raise UsageError(f"--compare {a} {b}: give two different step settings")
                cfgs = {item: config_from_args(_variant_args(parser, argv, item)) for item in (a, b)}
                r = compare(cfgs, args.steps, args.warmup)
                print(_describe(r) + f", {a} and {b} step by step in turn (speedup: {b} over {a})")
                for name in (a, b):
                    print(report(r["settings"][name], name))
                print(f"speedup {r['speedup']:.2f}×")
            else:
                r = measure(cfg, args.steps, args.warmup)
                print(_describe(r) + f", step {cfg.step}, image cache {'on' if cfg.cache_images else 'off'}"
                      + (f" (built in {r['cache_seconds']:.0f} s)" if cfg.cache_images else ""))
                print(report(r))
        if args.json:
            write_json(args.json, r)

    return run_cli(go, "kdas_core.bench_train")


if __name__ == "__main__":
    sys.exit(main())
