"""Cached teacher targets: the teachers' output maps for every training image, computed once, so
that output-level distillation (`--kd kdas`, `kdas-paper`, `kd`) costs what plain training costs.

Examples:
  python -m kdas_core.teacher_targets --teacher runs/teacher/best.safetensors --data ../shared/data/polyp-352 \\
      --out runs/targets-256
  python -m kdas_core.teacher_targets --teacher T1 --teacher T2 --tta flip --data DATA --out runs/targets-ens
  python -m kdas_core.distill --teacher-targets runs/targets-256 --kd kdas --model polyppvt-lite0 \\
      --data ../shared/data/polyp-352 --out runs/student-kdas
  python -m kdas_core.teacher_targets --score runs/targets-a --score runs/targets-b --data DATA

`--score` judges caches before a student trains on them: each is scored on the validation split
that a training run on the same --data holds out (its --val-fraction and --groups), as the student
sees it (the stored S/8 logits upsampled to S, sigmoid(P1 + P2), resized to the mask), and with two
or more, so is their average in logit space: what --teacher A --teacher B would cache with the same
sizes and TTA, without running the teachers again. The teachers must have been trained with that
split held out, or the figures say nothing. Metrics as in kdas_core.evaluate --minmax: Dice at the
threshold on the probabilities, meanDic over 256 thresholds on min-max normalised maps.

What is stored (OUT/targets.safetensors): for each training image, the teachers' logits P1 and P2
on the image resized to the training size S (as the training loader resizes it, before any
augmentation), at the decoder's own resolution S/8 in float16 — the teacher's full-size P1/P2 are
bilinear upsamplings of exactly these maps, so nothing is lost but float16 rounding (about 2 KB
per image at 256). With `--teacher-size native` each teacher sees the image at its own input
size instead (a teacher trained at 352 is best at 352), and its maps are resampled to the S/8
grid. Several teachers are averaged in logit space; `--tta flip` also averages each teacher with
its prediction on the horizontally flipped image, flipped back, and `--scales 0.75,1,1.25` with
its predictions at those multiples of its size (multi-scale TTA, at the sum of the rates' costs).

During `distill --teacher-targets`, each stored pair is upsampled to S and then goes through
exactly the geometric augmentation its image gets (the same flips, rotation and crop, in the same
call, bilinear), and through the same multi-scale resize per batch. Photometric augmentation
(colour jitter) changes the image only, so the targets are those of the un-jittered image.

The file records a key: the teachers' SHA-256, the image size, the TTA, and a SHA-1 of the
training images' bytes. Targets made with another teacher, for other data or another size are
refused by name.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from kdas_core.cli.conventions import (DEVICE_HELP, Parser, UsageError, add_progress_flag, device_arg, positive_int,
                                      require_device, run_cli)
from kdas_core.data.targets import FILE, FORMAT, STRIDE, data_digest, save
from kdas_core.models.presets import DEFAULT_THRESHOLD, TTA_MODES, image_size_arg, image_size_problem, scaled_size

TEACHER_SIZES = ("train", "native")


def compute(teachers: list[str], data: str, size: int, tta: str = "none", batch_size: int = 8,
            device: str = "cpu", progress: bool = True, teacher_size: str = "train",
            scales: tuple[float, ...] = (1.0,)):
    """(targets (N, 2, S/8, S/8) float16, metadata) for every training image of `data`.

    teacher_size "train": each teacher sees the image at the training size S, as a live teacher
    in `distill --teacher` does; "native": at its own checkpoint's input size, its P1/P2 logits
    then resampled (bilinear) to the S/8 grid: a teacher trained at 352 keeps its 352 accuracy.
    `scales`: multi-scale TTA, each teacher also run at its size times each rate (rounded to the
    encoder's stride, as multi-scale training rounds), every map resampled to the S/8 grid and
    averaged with the others in logit space."""
    import torch
    import torch.nn.functional as F

    from kdas_core.io.checkpoint import file_sha256, load_checkpoint
    from kdas_core.data.dataset import _normalise, read_image, resolve_layout
    from kdas_core.data.transforms import to_tensor

    problem = image_size_problem(size)
    if problem:
        raise UsageError(f"--image-size {problem}")
    layout = resolve_layout(data)
    pairs = layout.train
    if not pairs:
        raise UsageError(f"{data}: no training data (TrainDataset/ or images/+masks/)")
    if teacher_size not in TEACHER_SIZES:
        raise UsageError(f"--teacher-size must be one of {', '.join(TEACHER_SIZES)}, got {teacher_size!r}")
    scales = tuple(float(r) for r in scales)
    if not scales or any(not 0.25 <= r <= 4.0 for r in scales):
        raise UsageError(f"--scales must be rates from 0.25 to 4, e.g. 0.75,1,1.25; got {','.join(map(str, scales)) or 'none'}")
    models = [load_checkpoint(p, device) for p in teachers]
    base = [int(meta["input_size"]) if teacher_size == "native" else size for _, meta in models]
    runs = [(model, meta, scaled_size(b, r)) for (model, meta), b in zip(models, base) for r in scales]
    sizes = [t_size for _, _, t_size in runs]
    shas = [file_sha256(p) for p in teachers]  # the key and the record: each file hashed once
    out = torch.empty(len(pairs), 2, size // STRIDE, size // STRIDE, dtype=torch.float16)
    started = time.time()
    bar = None
    from kdas_core.cli.conventions import bars_wanted

    if bars_wanted(progress):  # on a terminal; a log gets the summary line at the end
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc="teacher targets", unit="img", dynamic_ncols=True)
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            images = [read_image(p[0]) for p in chunk]
            resized = {s_: torch.stack([to_tensor(im, None, s_)[0] for im in images]) for s_ in set(sizes)}
            acc = torch.zeros(len(chunk), 2, size // STRIDE, size // STRIDE)
            for model, meta, t_size in runs:
                x = torch.stack([_normalise(im, meta["mean"], meta["std"]) for im in resized[t_size]]).to(device)
                views = [(x, False)] + ([(torch.flip(x, dims=[-1]), True)] if tta == "flip" else [])
                for v, flipped in views:
                    o = model(v)
                    maps = torch.cat([o["p1_low"], o["p2_low"]], dim=1).float().cpu()
                    if maps.shape[-1] != size // STRIDE:
                        maps = F.interpolate(maps, size=(size // STRIDE, size // STRIDE), mode="bilinear",
                                             align_corners=False)
                    acc += (torch.flip(maps, dims=[-1]) if flipped else maps) / (len(views) * len(runs))
            out[start:start + len(chunk)] = acc.half()
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    meta = {
        "format": FORMAT,
        "key": {"teachers": sorted(shas), "image_size": size, "tta": tta, "teacher_sizes": sorted(set(sizes)),
                "scales": list(scales),
                "data_sha1": data_digest(pairs)},
        "stems": [Path(p[0]).stem for p in pairs],
        "teachers": [{"path": os.path.abspath(p), "preset": m["preset"], "sha256": sha,
                      "val_metrics": m.get("val_metrics", {})} for p, sha, (_, m) in zip(teachers, shas, models)],
        "data_root": os.path.abspath(data),
        "seconds": round(time.time() - started, 1),
    }
    return out, meta


def _rates(text: str) -> tuple[float, ...]:
    """argparse `type=` for --scales: comma-separated rates."""
    try:
        rates = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.75,1,1.25, got {text!r}") from None
    if not rates:
        raise argparse.ArgumentTypeError(f"expected at least one rate, got {text!r}")
    return rates


def build_parser() -> argparse.ArgumentParser:
    from kdas_core.training.config import defaults
    from kdas_core.models.presets import Preset

    PRESET_SIZE = Preset.input_size  # the presets' size, used when training keeps the preset's

    p = Parser(exit_codes=(0, 1, 2, 4, 130), prog="python -m kdas_core.teacher_targets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", action="append", metavar="CKPT",
                   help="teacher checkpoint; repeat to average several teachers")
    p.add_argument("--score", action="append", metavar="CACHE",
                   help="instead of making targets: score this cache (a folder or its targets.safetensors) on "
                        "the validation split of --data; repeat to score several and their average")
    p.add_argument("--data", required=True, metavar="DIR", help="the training data the student will use (as --data of distill)")
    p.add_argument("--out", metavar="DIR", help=f"folder for {FILE} (required with --teacher)")
    p.add_argument("--json", metavar="OUT", help="with --score: write the scores here as JSON")
    p.add_argument("--val-fraction", type=float, default=defaults()["val_fraction"], metavar="F",
                   help="with --score: the training run's --val-fraction (default: %(default)s, the training default)")
    p.add_argument("--groups", default=defaults()["groups"], metavar="auto|none|CSV",
                   help="with --score: the training run's --groups (default: %(default)s, the training default)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, metavar="T",
                   help="with --score: threshold for Dice/IoU (default: %(default)s, the shipped one)")
    p.add_argument("--image-size", type=image_size_arg, default=defaults()["image_size"] or PRESET_SIZE, metavar="S",
                   help="the student's training size, as its --image-size (default: %(default)s, the training default)")
    p.add_argument("--tta", choices=TTA_MODES, default="none", help="average with the flipped image (default: none)")
    p.add_argument("--teacher-size", choices=TEACHER_SIZES, default="train",
                   help="train: each teacher sees the image at --image-size, as a live teacher does; native: at "
                        "its own checkpoint's input size (e.g. 352 for a teacher trained at 352), its maps then "
                        "resampled to the training grid (default: %(default)s)")
    p.add_argument("--scales", type=_rates, default=(1.0,), metavar="R,R,...",
                   help="multi-scale TTA: also run each teacher at its size times each rate (rounded to a "
                        "multiple of 32) and average the maps, e.g. 0.75,1,1.25 for three times the cost "
                        "(default: 1, one scale)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="teacher batch size (default: 8)")
    p.add_argument("--device", type=device_arg, metavar="DEV", help=f"{DEVICE_HELP} (default: cuda when available)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="PyTorch CPU threads (default: PyTorch's choice)")
    add_progress_flag(p)
    return p


def _score_cli(args) -> None:
    from kdas_core.evaluation.scoring import format_table, score_cached_targets
    from kdas_core.io.atomic import check_output_path, write_json

    if args.out:
        raise UsageError("--out goes with --teacher; --score writes only --json")
    made = [flag for flag, given in (("--tta", args.tta != "none"), ("--scales", args.scales != (1.0,)),
                                     ("--teacher-size", args.teacher_size != "train")) if given]
    if made:
        raise UsageError(f"{', '.join(made)}: options for making targets with --teacher; a cache given to "
                         "--score is scored as it was made")
    if args.json:
        check_output_path(args.json, "--json", inputs=tuple(args.score))
    results = score_cached_targets(args.score, args.data, args.val_fraction, args.groups, args.threshold)
    print(f"cached maps as the student's loss sees them: Dice/IoU at threshold {args.threshold:g}, "
          "meanDic/meanIoU (_mean256) on min-max normalised maps", file=sys.stderr)
    print(format_table(results, label="targets"))
    if args.json:
        write_json(args.json, {k: {m: v if isinstance(v, int) else float(v) for m, v in r.items()} for k, r in results.items()})
        print(f"wrote {args.json}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> None:
        from kdas_core.io.checkpoint import read_metadata

        if bool(args.teacher) == bool(args.score):
            raise UsageError("give --teacher (make targets) or --score (score caches), not both and not neither")
        if args.score:
            return _score_cli(args)
        if args.json:
            raise UsageError("--json goes with --score; making targets writes only --out")
        if not args.out:
            raise UsageError("--out is required with --teacher: the folder the targets are written to")
        device = require_device(args.device)  # a GPU that is not here: exit 4, before any work
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        for t in args.teacher:
            read_metadata(t)  # a bad checkpoint fails before any work
        targets, meta = compute(args.teacher, args.data, args.image_size, args.tta, args.batch_size, device,
                                progress=args.progress, teacher_size=args.teacher_size, scales=args.scales)
        path = save(args.out, targets, meta)
        size_mb = os.path.getsize(path) / 1e6
        seen = "/".join(str(s_) for s_ in meta["key"]["teacher_sizes"])
        print(f"[kdas] {len(meta['stems'])} targets from {len(args.teacher)} teacher(s) run at {seen}px, tta {args.tta}, "
              f"for training at {args.image_size}px -> {path} ({size_mb:.1f} MB, {meta['seconds']:.0f} s)")

    return run_cli(go, "kdas_core.teacher_targets")


if __name__ == "__main__":
    sys.exit(main())
