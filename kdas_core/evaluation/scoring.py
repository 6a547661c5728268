"""The evaluation core behind `python -m kdas_core.evaluate` (that module is the command line,
kept free of torch so that `--help` answers at once).

`evaluate_pairs(...)` is the reusable core (the trainer calls it for validation each epoch):
images are resized to the model's input size, the probability map sigmoid(P1 + P2) is resized
bilinearly back to each mask's ORIGINAL size, and metrics are computed there (see
kdas_core.evaluation.metrics for the definitions and their sources). `evaluate_backend(...)` does the same
for an exported model (ONNX, TensorRT engine) through the engines backend interface: the same
uint8 frames (resized as above), the same resize back and the same metrics, so fp32, INT8 and
the checkpoint are scored by one code path.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import math
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kdas_core.io.checkpoint import load_checkpoint, read_metadata
from kdas_core.io.atomic import staged, write_json
from kdas_core.cli.conventions import UsageError, bars_wanted, require_device
from kdas_core.data.dataset import EvalDataset, Pair, eval_collate, read_pair, resolve_layout, split_by_groups
from kdas_core.data.transforms import to_tensor
from kdas_core.evaluation.metrics import SUMMARY_KEYS, SegMetrics
from kdas_core.models.presets import DEFAULT_THRESHOLD, TTA_MODES

# ---------------------------------------------------------------- overlays

PANEL = 224           # each panel fits in PANEL x PANEL (letterboxed)
CAPTION = 20          # caption strip height above each tile
TILES_PER_SHEET = 6   # images per PNG sheet
WORST_K = 6           # the lowest-Dice images get a sheet of their own
GT_BGR, PRED_BGR = (0, 200, 0), (0, 230, 255)  # green ground truth, yellow prediction


def _letterbox(img: np.ndarray, interpolation: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Fit into PANEL x PANEL keeping the aspect ratio; returns the panel and the placed box."""
    h, w = img.shape[:2]
    scale = PANEL / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = cv2.resize(img, (nw, nh), interpolation=interpolation)
    panel = np.zeros((PANEL, PANEL) + img.shape[2:], img.dtype)
    y0, x0 = (PANEL - nh) // 2, (PANEL - nw) // 2
    panel[y0:y0 + nh, x0:x0 + nw] = small
    return panel, (y0, x0, nh, nw)


def overlay_tile(raw_rgb: np.ndarray, mask: np.ndarray, prob: np.ndarray, threshold: float, caption: str) -> np.ndarray:
    """BGR tile: input | input with GT (green) and prediction (yellow) contours | probability map."""
    image, _ = _letterbox(cv2.cvtColor(raw_rgb, cv2.COLOR_RGB2BGR), cv2.INTER_AREA)
    gt, _ = _letterbox(mask.astype(np.uint8), cv2.INTER_NEAREST)
    prob_small, _ = _letterbox(prob.astype(np.float32), cv2.INTER_AREA)
    pred = (prob_small >= threshold).astype(np.uint8)

    over = image.copy()
    fill = over.copy()
    fill[pred > 0] = PRED_BGR
    over = cv2.addWeighted(over, 0.75, fill, 0.25, 0)  # translucent prediction area
    for m, colour in ((gt, GT_BGR), (pred, PRED_BGR)):
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(over, contours, -1, colour, 2, cv2.LINE_AA)
    heat = cv2.applyColorMap((np.clip(prob_small, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)

    body = np.concatenate([image, over, heat], axis=1)
    strip = np.full((CAPTION, body.shape[1], 3), 32, np.uint8)
    cv2.putText(strip, caption[:80], (4, CAPTION - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (235, 235, 235), 1, cv2.LINE_AA)
    return np.concatenate([strip, body], axis=0)


class OverlayWriter:
    """Writes sheets of TILES_PER_SHEET tiles (`sheet_000.png`, ...) plus `worst_dice.png`."""

    def __init__(self, folder: str | os.PathLike, threshold: float):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.threshold = threshold
        self.pending: list[np.ndarray] = []
        self.sheets = 0
        self.worst: list[tuple[float, int, np.ndarray]] = []  # max-heap on Dice via negation
        self.count = 0

    def add(self, raw_rgb, mask, prob, row: dict) -> None:
        caption = f"{row['name']}  Dice {row['Dice']:.3f}  IoU {row['IoU']:.3f}"
        tile = overlay_tile(raw_rgb, mask, prob, self.threshold, caption)
        self.pending.append(tile)
        # keep the WORST_K lowest-Dice tiles: heap keyed on -Dice pops the best of the kept ones
        heapq.heappush(self.worst, (-row["Dice"], self.count, tile))
        if len(self.worst) > WORST_K:
            heapq.heappop(self.worst)
        self.count += 1
        if len(self.pending) == TILES_PER_SHEET:
            self._flush()

    def _write(self, name: str, tiles: list[np.ndarray]) -> None:
        sheet = np.concatenate(tiles, axis=0)
        header = np.full((CAPTION, sheet.shape[1], 3), 0, np.uint8)
        cv2.putText(header, "input | green: ground truth, yellow: prediction | probability",
                    (4, CAPTION - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (200, 200, 200), 1, cv2.LINE_AA)
        path = self.folder / name
        if not cv2.imwrite(str(path), np.concatenate([header, sheet], axis=0)):
            raise OSError(f"{path}: could not write overlay image")

    def _flush(self) -> None:
        if self.pending:
            self._write(f"sheet_{self.sheets:03d}.png", self.pending)
            self.sheets += 1
            self.pending = []

    def close(self) -> None:
        self._flush()
        if self.worst:
            ordered = [tile for _, _, tile in sorted(self.worst, key=lambda t: (-t[0], t[1]))]
            self._write("worst_dice.png", ordered)


# ---------------------------------------------------------------- evaluation core

class FrameDataset(EvalDataset):
    """EvalDataset for exported models: "image" is the uint8 HWC frame at the model size (the
    graph normalises inside), resized exactly as EvalDataset resizes before normalising."""

    def __init__(self, pairs: list[Pair], size: int):
        super().__init__(pairs, size, mean=None, std=None)

    def __getitem__(self, i: int) -> dict:
        image, mask = read_pair(*self.pairs[i])
        image_t, _ = to_tensor(image, None, self.size)
        return {"image": image_t.permute(1, 2, 0).contiguous(), "mask": torch.from_numpy(mask),
                "name": Path(self.pairs[i][0]).stem, "raw": torch.from_numpy(image)}


def _score(predict, dataset: EvalDataset, threshold: float, batch_size: int, desc: str | None,
           overlays_dir, progress: bool, minmax: bool, num_workers: int, workers: int) -> tuple[dict, list[dict]]:
    """The loop shared by checkpoints and exported models: `predict(batch images)` gives (N,1,S,S)
    probabilities; each is resized to its mask's original size and scored (in `workers` processes)."""
    from tqdm import tqdm  # only evaluation needs it

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=eval_collate)
    writer = OverlayWriter(overlays_dir, threshold) if overlays_dir is not None else None
    bar = tqdm(total=len(dataset), desc=desc or "evaluate", unit="img", disable=not progress, leave=False,
               dynamic_ncols=True)

    def scored(row: dict, raw=None, mask=None, prob=None) -> None:
        if writer is not None:
            writer.add(raw, mask, prob, row)
        bar.update(1)
        if progress and bar.n % batch_size == 0:
            bar.set_postfix(mDice=f"{acc.summary()['mDice']:.3f}")

    try:
        with SegMetrics(threshold, minmax=minmax, workers=workers) as acc:
            for batch in loader:
                probs = predict(batch["image"])
                for i, mask in enumerate(batch["mask"]):
                    h, w = mask.shape
                    prob = F.interpolate(probs[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)
                    prob = prob[0, 0].clamp_(0, 1).cpu().numpy()
                    mask_np = mask.numpy()
                    # the overlay writer needs the pixels only when it draws them
                    extra = (batch["raw"][i].numpy(), mask_np, prob) if writer is not None else ()
                    acc.submit(prob, mask_np, batch["name"][i], lambda row, e=extra: scored(row, *e))
        if writer is not None:
            writer.close()
    finally:
        bar.close()
    return acc.summary(), acc.rows


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, pairs: list[Pair], size: int, mean, std, threshold: float,
                   device: str | torch.device, batch_size: int = 8, desc: str | None = None,
                   overlays_dir: str | os.PathLike | None = None, progress: bool = True,
                   minmax: bool = False, num_workers: int = 0, workers: int = 1,
                   tta: str = "none") -> tuple[dict, list[dict]]:
    """Score `model` on (image, mask) pairs; returns (summary, per-image rows).

    summary: {"mDice", "mIoU", "mDice_mean256", "mIoU_mean256", "Sm", "Em", "wFm", "MAE", "n"}.
    The model runs in eval mode under no_grad (its previous train/eval mode is restored on return);
    `device` is where the batches go (the model must already be there). `minmax`: the toolbox's
    per-map min-max normalisation (see kdas_core.evaluation.metrics). `num_workers`: data-loading processes;
    `workers`: metric processes (identical numbers, faster on large masks). `tta="flip"`: the
    logits averaged with those of the horizontally flipped image, flipped back (as
    `teacher_targets --tta flip` averages a teacher), at twice the cost.
    """
    if tta not in TTA_MODES:
        raise UsageError(f"--tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    net = getattr(model, "module", model)  # DDP: run the bare module on this rank only
    was_training = net.training
    net.eval()
    device = torch.device(device)

    def predict(images):
        x = images.to(device)
        logits = net.predict_logits(x).float()
        if tta == "flip":
            logits = (logits + torch.flip(net.predict_logits(torch.flip(x, dims=[-1])).float(), dims=[-1])) / 2
        return torch.sigmoid(logits)

    try:
        return _score(predict,
                      EvalDataset(pairs, size, mean, std), threshold, batch_size, desc, overlays_dir,
                      progress, minmax, num_workers, workers)
    finally:
        net.train(was_training)


def evaluate_backend(backend, pairs: list[Pair], threshold: float | None = None, batch_size: int = 8,
                     desc: str | None = None, overlays_dir: str | os.PathLike | None = None,
                     progress: bool = True, minmax: bool = False, num_workers: int = 0,
                     workers: int = 1) -> tuple[dict, list[dict]]:
    """`evaluate_pairs` for an `engines` backend (e.g. `engines.load_backend("model.onnx")`): the
    input size comes from the backend, the threshold from its metadata unless given."""
    size = backend.input_size[0]
    threshold = backend.threshold if threshold is None else threshold

    def predict(frames: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(backend.predict(frames.numpy()))[:, None]

    return _score(predict, FrameDataset(pairs, size), threshold, batch_size, desc, overlays_dir,
                  progress, minmax, num_workers, workers)


def score_cached_targets(caches: list[str], data: str, val_fraction: float, groups: str = "auto",
                         threshold: float = DEFAULT_THRESHOLD) -> dict[str, dict]:
    """`teacher_targets --score`: {cache: summary} of cached teacher targets (kdas_core.data.targets)
    on the validation split of `data` that a training run with this `val_fraction` and `groups`
    holds out, plus "average of N" (their logit-space mean, what one cache of all those teachers
    holds) when several are given. Each row is scored as the student's loss sees it: the S/8
    logits upsampled to S, sigmoid(P1 + P2), resized to the mask; summaries as evaluate_pairs'
    with minmax meanDic."""
    from kdas_core.data import targets as targets_file
    from kdas_core.data.dataset import read_mask

    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {threshold}")
    layout = resolve_layout(data)
    val = validation_pairs(layout, data, val_fraction, groups)
    maps, size = {}, None
    for cache in caches:
        tensors, meta = targets_file.read(cache, "--score")  # read once: its size, then its rows
        s_ = int(meta["key"]["image_size"])
        if size is not None and s_ != size:
            raise UsageError(f"--score {cache}: made at {s_} px, the first cache at {size} px; caches averaged "
                             "together must be made for the same --image-size")
        size = s_
        maps[cache] = targets_file.rows(tensors, meta, cache, layout.train, s_, select=val, flag="--score")[0]
    if len(caches) > 1:
        maps[f"average of {len(caches)}"] = sum(m.float() for m in maps.values()) / len(caches)
    results = {}
    for name, stored in maps.items():
        with SegMetrics(threshold, minmax=True) as acc:
            for (_, mask_path), t in zip(val, stored):
                mask = read_mask(mask_path)
                logits = targets_file.upsample(t, size)  # (2, S, S), as the student's loss sees them
                prob = torch.sigmoid(logits[0] + logits[1])[None, None]
                prob = F.interpolate(prob, size=mask.shape, mode="bilinear", align_corners=False)[0, 0]
                acc.submit(prob.clamp_(0, 1).numpy(), mask, Path(mask_path).stem, lambda row: None)
        results[name] = acc.summary()
    return results


# ---------------------------------------------------------------- CLI

TABLE_COLUMNS = ("n", "mDice", "mIoU", "Sm", "Em", "wFm", "MAE", "mDice_mean256", "mIoU_mean256")
CSV_COLUMNS = ("set", "name", "height", "width", "gt_pixels", "pred_pixels", "Dice", "IoU",
               "Dice_mean256", "IoU_mean256", "Sm", "Em", "wFm", "MAE")


def format_table(results: dict[str, dict], label: str = "test set") -> str:
    name_w = max([len(label)] + [len(k) for k in results])
    head = f"{label:<{name_w}}  " + "  ".join(f"{c:>{max(6, len(c))}}" for c in TABLE_COLUMNS)
    lines = [head, "-" * len(head)]
    for name, s in results.items():
        cells = []
        for c in TABLE_COLUMNS:
            width = max(6, len(c))
            cells.append(f"{s[c]:>{width}d}" if c == "n" else f"{s[c]:>{width}.4f}")
        lines.append(f"{name:<{name_w}}  " + "  ".join(cells))
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with staged(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})


def _json_safe(summary: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {args.threshold}")
    for flag in ("threads", "workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    exported = not args.weights.lower().endswith(".safetensors")
    if args.tta != "none" and (exported or args.backend is not None):
        raise UsageError(f"--tta {args.tta} runs a checkpoint (.safetensors) in PyTorch; an exported model or "
                         "--backend scores the file as it is deployed, without test-time augmentation")
    if args.backend is None and not exported:
        device = require_device(args.device)
        read_metadata(args.weights)  # cheap checks first (checkpoint metadata, data folders), then the model load
    layout = resolve_layout(args.data)
    sets = _validation_set(layout, args) if args.split == "val" else layout.evaluation_sets()
    if not sets:
        raise UsageError(f"{args.data}: no test sets; expected TestDataset/<name>/{{images,masks}} folders "
                         "(a PraNet root) or images/ and masks/ directly in the folder")
    common = dict(batch_size=args.batch_size, progress=bars_wanted(args.progress), minmax=args.minmax,
                  workers=args.workers)
    if args.backend is None and not exported:
        model, meta = load_checkpoint(args.weights, device)
        size = int(args.image_size or meta["input_size"])
        common["tta"] = args.tta
        threshold = float(meta["threshold"] if args.threshold is None else args.threshold)
        print(f"checkpoint {args.weights}: preset {meta['preset']}, input {size}x{size}, threshold {threshold:g}, "
              f"device {device}" + (", min-max normalised maps" if args.minmax else "")
              + (", flip TTA" if args.tta == "flip" else ""), file=sys.stderr)

        def score(pairs, **kw):
            return evaluate_pairs(model, pairs, size, meta["mean"], meta["std"], threshold, device, **kw, **common)
    else:
        backend = _open_backend(args)
        threshold = float(backend.threshold if args.threshold is None else args.threshold)
        size = backend.input_size[0]
        print(f"model {args.weights}: {backend.name} backend, precision {backend.meta.get('precision', 'fp32')}, "
              f"input {size}x{size}, threshold {threshold:g}" + (", min-max normalised maps" if args.minmax else ""),
              file=sys.stderr)
        for note in backend.notes:
            print(f"  note: {note}", file=sys.stderr)

        def score(pairs, **kw):
            return evaluate_backend(backend, pairs, threshold, **kw, **common)

    results: dict[str, dict] = {}
    all_rows: list[dict] = []
    start = time.perf_counter()
    for name, pairs in sets.items():
        overlays = Path(args.save_overlays) / name if args.save_overlays else None
        summary, rows = score(pairs, desc=name, overlays_dir=overlays)
        results[name] = {k: summary[k] for k in ("mDice", "mIoU", "Sm", "Em", "wFm", "MAE", "n")}
        results[name].update({k: summary[k] for k in SUMMARY_KEYS if k not in results[name]})
        all_rows += [{"set": name, **r} for r in rows]
        if not bars_wanted(args.progress):  # a log: one line per test set instead of a bar
            print(f"[kdas] {name}: {results[name]['n']} images, mDice {results[name]['mDice']:.4f}", file=sys.stderr, flush=True)

    print(format_table(results))
    print(f"({sum(r['n'] for r in results.values())} images in {time.perf_counter() - start:.1f}s)", file=sys.stderr)

    csv_path = Path(args.csv) if args.csv else None
    if args.json:
        json_path = Path(args.json)
        write_json(json_path, {k: _json_safe(v) for k, v in results.items()})
        print(f"wrote {json_path}", file=sys.stderr)
        if csv_path is None:
            csv_path = json_path.with_name(json_path.stem + "_per_image.csv")
    if csv_path is not None:
        _write_csv(csv_path, all_rows)
        print(f"wrote {csv_path}", file=sys.stderr)
    if args.save_overlays:
        print(f"wrote overlays under {args.save_overlays}", file=sys.stderr)
    return 0


def validation_pairs(layout, data: str, val_fraction: float, groups: str) -> list[Pair]:
    """The images a training run on the same `data` (with this --val-fraction and --groups) held
    out to choose its checkpoints; the split is described on stderr."""
    if not layout.train:
        raise UsageError(f"{data}: scoring the validation split needs training data (TrainDataset/ or "
                         "images/+masks/) to hold it out of")
    if not 0 < val_fraction < 1:
        raise UsageError(f"--val-fraction must be in (0, 1) to score the validation split, got {val_fraction}")
    split = split_by_groups(layout.train, val_fraction, groups)
    if not split.val:
        raise UsageError(f"{data}: the validation split is empty (--val-fraction {val_fraction:g}); nothing to score")
    print(f"validation split of {data}: {split.describe()}", file=sys.stderr)
    return split.val


def _validation_set(layout, args: argparse.Namespace) -> dict[str, list[Pair]]:
    """{"validation": pairs} for `evaluate --split val`."""
    return {"validation": validation_pairs(layout, args.data, args.val_fraction, args.groups)}


RUNTIMES_GROUP = "kdas_core.runtimes"  # entry points: callables that open an exported model for scoring


def _open_backend(args: argparse.Namespace):
    """A backend for an exported model (ONNX, TensorRT engine) --weights. Runtimes sit in a layer
    above this package (`engines`), so they are found through the `kdas_core.runtimes` entry point
    (pyproject.toml) rather than imported by name. Without --backend an export runs on its own
    runtime: `auto` could fall back to the source checkpoint, and the numbers would then not be
    those of the file asked for."""
    from importlib.metadata import entry_points

    found = sorted(entry_points(group=RUNTIMES_GROUP), key=lambda e: e.name)
    if not found:
        raise UsageError(f"{args.weights}: scoring an exported model needs the runtimes of this project's "
                         "`engines` package, which is not installed; run `pip install -e .` in the repository")
    default = "onnxruntime" if args.weights.lower().endswith(".onnx") else "tensorrt"
    return found[0].load()(args.weights, backend=args.backend or default, device=args.device,
                           image_size=args.image_size, threads=args.threads)
