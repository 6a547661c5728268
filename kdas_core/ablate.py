"""Compare distillation methods under one schedule: the table a paper prints.

Examples:
  python -m kdas_core.ablate --teacher runs/teacher/best.safetensors --model polyppvt-lite0 \\
      --data ../shared/data/polyp --methods kdas,kd,at,cwd,skd,hlfd,grd --out runs/ablation
  python -m kdas_core.ablate ... --methods kdas,kdas+cwd:0.5      # '+' combines methods in one row
  python -m kdas_core.ablate ... --resume                          # continue an interrupted ablation

For every method (and `none`, the student trained on the masks alone, unless --no-baseline) the
student is trained with exactly the same flags and seed (same initialisation, same batches), in
OUT/<method>/, by the trainer behind `kdas_core.distill`. The checkpoint chosen by validation
mDice (--checkpoint best) is then evaluated on every test set of --data (or --test-data), and
OUT/ablation.md + OUT/ablation.json hold, per set and as the mean over sets, thresholded mDice and
mIoU and the papers' meanDic (min-max normalised maps, 256 thresholds), with the validation mDice
that chose each checkpoint, the student's parameter count and its training time. The teachers are
evaluated too, as reference rows (--no-teacher-rows skips that).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

from kdas_core.io.atomic import write_json, write_text
from kdas_core.cli.training import run_cli
from kdas_core.cli.conventions import Parser, UsageError
from kdas_core.training.config import add_training_args, config_from_args

RESULT_FILE = "ablation_result.json"


def parse_methods(spec: str, baseline: bool = True) -> list[tuple[str, str]]:
    """'kdas,kdas+cwd:0.5' -> [('none', 'none'), ('kdas', 'kdas'), ('kdas+cwd:0.5', 'kdas,cwd:0.5')]:
    (row label, --kd spec). Every name is checked against the registry."""
    from kdas_core.losses import parse_kd_spec

    rows = [("none", "none")] if baseline else []
    for label in filter(None, (s.strip() for s in spec.split(","))):
        kd = label.replace("+", ",")
        parse_kd_spec(kd)  # unknown names fail here, before any training
        if label not in [r[0] for r in rows]:
            rows.append((label, kd))
    if not rows:
        raise UsageError("--methods is empty (and --no-baseline leaves nothing to train)")
    return rows


def run_dir_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", label.replace(":", "-"))


def test_sets(data: str, test_data: list[str] | None) -> dict[str, list]:
    from kdas_core.data import resolve_layout

    sets: dict[str, list] = {}
    for root in test_data or [data]:
        layout = resolve_layout(root)
        # --test-data names its folder as test data; --data's own images/+masks/ are training data.
        found = layout.evaluation_sets() if test_data else layout.tests
        for name, pairs in found.items():
            sets[name if name not in sets else f"{name}@{os.path.basename(os.path.normpath(root))}"] = pairs
    if not sets:
        if not test_data and resolve_layout(data).kind == "plain":
            raise UsageError(f"{data} is a plain images/+masks/ folder: its pairs are the training data, and scores "
                             "on them are not test scores; give held-out data with --test-data DIR "
                             "(a PraNet root with TestDataset/<name>/, or an images/+masks/ folder)")
        raise UsageError(f"{', '.join(test_data or [data])}: no test sets (TestDataset/<name>/ or images/+masks/); use --test-data")
    return sets


PAPER_KEY = "mDice_mean256_minmax"  # the papers' meanDic: Dice over 256 thresholds of min-max normalised maps
MEAN_KEYS = {"mDice": "mDice", "mIoU": "mIoU", "meanDic": PAPER_KEY}  # row["mean"] key -> per-set key


def evaluate_checkpoint(path: str, sets: dict[str, list], device: str, batch_size: int, progress: bool) -> dict:
    """Per test set for one checkpoint: what the evaluator reports on the raw probabilities
    (thresholded mDice/mIoU, ...) plus the papers' metric, mDice/mIoU over 256 thresholds of
    min-max normalised maps (`mDice_mean256_minmax`, `mIoU_mean256_minmax`)."""
    from kdas_core.io.checkpoint import load_checkpoint
    from kdas_core.evaluation.scoring import evaluate_pairs

    model, meta = load_checkpoint(path, device=device)
    out = {}
    for name, pairs in sets.items():
        args = (model, pairs, int(meta["input_size"]), meta["mean"], meta["std"], float(meta["threshold"]), device)
        summary, _ = evaluate_pairs(*args, batch_size=batch_size, desc=name, progress=progress)
        paper, _ = evaluate_pairs(*args, batch_size=batch_size, desc=f"{name} (min-max)", progress=progress, minmax=True)
        out[name] = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}
        out[name].update({f"{k}_minmax": float(paper[k]) for k in ("mDice_mean256", "mIoU_mean256")})
        out[name]["n"] = len(pairs)
    return {"tests": out, "params": sum(p.numel() for p in model.parameters()), "preset": meta.get("preset")}


def _teacher_rows(paths: list[str], sets: dict[str, list], out: str, resume: bool, device: str,
                  batch_size: int, progress: bool) -> list[dict]:
    """Reference rows for the teachers; cached in OUT/teacher_rows.json (reused by --resume while
    the checkpoint file and the test sets are unchanged)."""
    cache_path = os.path.join(out, "teacher_rows.json")
    cache = {}
    if resume and os.path.exists(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
    rows = []
    for i, path in enumerate(paths):
        st = os.stat(path)
        key = f"v2|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|" + ",".join(f"{n}:{len(p)}" for n, p in sets.items())
        if key not in cache:
            ev = evaluate_checkpoint(path, sets, device, batch_size, progress)
            cache[key] = {"label": f"teacher {ev['preset']}", "role": "teacher", "kd": None,
                          "checkpoint": os.path.abspath(path), "train_seconds": None, **ev}
        row = dict(cache[key])
        if len(paths) > 1:
            row["label"] += f" #{i + 1}"
        rows.append(row)
    write_json(cache_path, cache)
    return rows


def _mean_over_sets(tests: dict, key: str) -> float | None:
    vals = [t[key] for t in tests.values() if key in t]
    return sum(vals) / len(vals) if vals else None


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _mean_row(tests: dict) -> dict:
    return {k: _mean_over_sets(tests, key) for k, key in MEAN_KEYS.items()}


def markdown_table(rows: list[dict], set_names: list[str], header: str = "") -> str:
    cols = ["Method", "Params (M)", "Train time", "Val mDice"]
    for n in set_names:
        cols += [f"{n} mDice", f"{n} mIoU", f"{n} meanDic"]
    cols += ["Mean mDice", "Mean mIoU", "Mean meanDic"]
    lines = [header.rstrip() + "\n"] if header else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    best = {k: max((r["mean"][k] for r in rows if r["role"] == "student" and r["mean"].get(k) is not None), default=None)
            for k in MEAN_KEYS}

    def num(v) -> str:
        return "-" if v is None else f"{v:.4f}"

    for r in rows:
        cells = [r["label"], f"{r['params'] / 1e6:.2f}", _fmt_time(r.get("train_seconds")), num(r.get("best_val_mDice"))]
        for n in set_names:
            t = r["tests"].get(n, {})
            cells += [num(t.get("mDice")), num(t.get("mIoU")), num(t.get(PAPER_KEY))]
        for k in MEAN_KEYS:
            v = r["mean"].get(k)
            # Bold the best student, as a paper would; teachers are reference rows.
            cells.append(f"**{num(v)}**" if v is not None and r["role"] == "student" and v == best[k] else num(v))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "mDice, mIoU: per image at the checkpoint's threshold, then averaged; meanDic: the papers' metric "
              "(Dice averaged over 256 thresholds of each min-max normalised map, PraNet's toolbox); Val mDice: "
              "the best epoch's validation mDice, which chose the checkpoint. Mean: unweighted over test sets."]
    return "\n".join(lines) + "\n"


def _paused(label: str, limit: float) -> dict:
    print(f"[ablate] --time-limit {limit:g} min reached at '{label}': finished rows and the interrupted run are saved; "
          f"run the same command with --resume to continue", flush=True)
    return {"paused_at": label}


def run_ablation(cfg, methods: list[tuple[str, str]], out: str, sets: dict[str, list], resume: bool = False,
                 checkpoint: str = "best", teacher_rows: bool = True, eval_batch_size: int = 4,
                 command: str = "") -> dict:
    """Train + evaluate every (label, kd) in `methods` with the base TrainConfig `cfg`."""
    from kdas_core.training.trainer import run_training

    deadline = time.time() + cfg.time_limit * 60 if cfg.time_limit else None
    os.makedirs(out, exist_ok=True)
    device = cfg.device or ("cuda" if _cuda() else "cpu")
    rows: list[dict] = []
    if teacher_rows:
        rows += _teacher_rows(cfg.teachers, sets, out, resume, device, eval_batch_size, cfg.progress)
    for label, kd in methods:
        run_out = os.path.join(out, run_dir_name(label))
        result_path = os.path.join(run_out, RESULT_FILE)
        if resume and os.path.exists(result_path):
            with open(result_path) as f:
                rows.append(json.load(f))
            print(f"[ablate] {label}: done earlier, kept ({result_path})", flush=True)
            continue
        started = os.path.exists(os.path.join(run_out, "last.safetensors"))
        # --time-limit covers the whole ablation: each run gets what is left of it.
        left = None if deadline is None else (deadline - time.time()) / 60
        if left is not None and left <= 0:
            return _paused(label, cfg.time_limit)
        run_cfg = dataclasses.replace(cfg, kd=kd, out=run_out, teachers=[] if kd == "none" else list(cfg.teachers),
                                      teacher_targets=None if kd == "none" else cfg.teacher_targets,
                                      resume=resume and started, time_limit=left)
        print(f"[ablate] {label}: training (--kd {kd}) -> {run_out}", flush=True)
        t0 = time.time()
        result = run_training(run_cfg)
        wall = time.time() - t0
        if not result["finished"]:
            return _paused(label, cfg.time_limit)
        ckpt = result["best"] if checkpoint == "best" and os.path.exists(result["best"]) else result["last"]
        ev = evaluate_checkpoint(ckpt, sets, device, eval_batch_size, cfg.progress)
        row = {"label": label, "role": "student", "kd": kd, "checkpoint": os.path.abspath(ckpt),
               "train_seconds": result["train_seconds"], "wall_seconds": wall, "best_epoch": result["best_epoch"],
               "best_val_mDice": result["best_val_mDice"], **ev}
        row["mean"] = _mean_row(row["tests"])
        write_json(result_path, row)
        rows.append(row)
    for r in rows:
        r["mean"] = _mean_row(r["tests"])  # also brings rows finished by an older version up to date

    set_names = list(sets)
    header = (f"Ablation: student `{cfg.model}`, {cfg.epochs} epoch(s)"
              + (f" x at most {cfg.steps_per_epoch} steps" if cfg.steps_per_epoch else "")
              + f", image size {cfg.image_size or 'preset'}, batch {cfg.batch_size}, seed {cfg.seed}, device {device}; "
              f"checkpoint: {checkpoint}; test sets: " + ", ".join(f"{n} ({len(p)})" for n, p in sets.items())
              + ".")
    md = markdown_table(rows, set_names, header)
    report = {"command": command, "config": cfg.to_dict(), "checkpoint": checkpoint, "test_sets": {n: len(p) for n, p in sets.items()},
              "rows": rows}
    write_json(os.path.join(out, "ablation.json"), report)
    write_text(os.path.join(out, "ablation.md"), md)
    print(md, flush=True)
    return report


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _methods_epilog() -> str:
    from kdas_core.losses.catalog import kd_methods  # torch-free: --help answers at once

    lines = ["methods (--methods a,b,c; 'a+b:0.5' trains one row with both, b weighted 0.5):"]
    return "\n".join(lines + [f"  {name:<10} {summary}" for name, summary in kd_methods().items()])


def build_parser() -> argparse.ArgumentParser:
    p = Parser(exit_codes=(0, 1, 2, 4, 130), prog="python -m kdas_core.ablate", description=__doc__, epilog=_methods_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("ablation")
    g.add_argument("--methods", required=True, metavar="M[,M...]",
                   help="methods to compare, one row each (see the list below); 'none' is added unless --no-baseline")
    g.add_argument("--no-baseline", dest="baseline", action="store_false", help="do not train the 'none' row")
    g.add_argument("--test-data", action="append", metavar="DIR",
                   help="evaluate on the test sets of DIR instead of --data's (repeatable)")
    g.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="which checkpoint of each run is evaluated (default: best, chosen on the validation split)")
    g.add_argument("--no-teacher-rows", dest="teacher_rows", action="store_false", help="do not evaluate the teachers")
    g.add_argument("--eval-batch-size", type=int, default=4, metavar="B", help="evaluation batch size (default: 4)")
    add_training_args(p, kd="none", kd_flags=("teachers", "teacher_targets"))
    # The shared training flags, re-described for an ablation.
    for action in p._actions:
        if action.dest == "out":
            action.help = "ablation folder: one run per method in OUT/<method>/, and OUT/ablation.md + ablation.json"
            action.metavar = "OUT"
        elif action.dest == "teachers":
            action.help += "; also evaluated as a reference row"
        elif action.dest == "resume":
            action.help = "continue an interrupted ablation: finished rows are kept, an interrupted run resumes exactly"
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def go() -> None:
        methods = parse_methods(args.methods, args.baseline)  # fail on a typo before anything runs
        cfg = config_from_args(args)
        if not cfg.teachers and not cfg.teacher_targets:
            raise UsageError("give --teacher PATH (repeatable) or --teacher-targets DIR (or a --config that has them)")
        sets = test_sets(cfg.data, args.test_data)
        resume = cfg.resume
        cfg = dataclasses.replace(cfg, resume=False)
        run_ablation(cfg, methods, cfg.out, sets, resume=resume, checkpoint=args.checkpoint,
                     teacher_rows=args.teacher_rows, eval_batch_size=args.eval_batch_size,
                     command="python -m kdas_core.ablate " + " ".join(argv if argv is not None else sys.argv[1:]))

    return run_cli(go, "kdas_core.ablate")


if __name__ == "__main__":
    sys.exit(main())
