"""Model size and cost: parameter count and multiply-accumulates at a given input size.

MACs come from PyTorch's own FlopCounterMode (FLOPs / 2). It counts every matmul, including
the attention products inside PVTv2 and the SAM, which thop-style hook counters skip; that is
why our teacher counts 10.8 GMACs at 352² where the Polyp-PVT/KDAS papers print 10.0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .presets import image_size_arg

if TYPE_CHECKING:  # torch only once the arguments are parsed: --help answers at once
    import torch


def count_params(model: "torch.nn.Module") -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: "torch.nn.Module", size: int = 352) -> int:
    """MACs of one forward pass of the fused prediction (P1 + P2) for a 1x3xSxS input."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.predict_logits(torch.zeros(1, 3, size, size))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def main(argv: list[str] | None = None) -> int:
    """python -m kdas_core.profile [--image-size S] MODEL_OR_CKPT ...: params and GMACs per model."""
    import argparse

    from .cli_conventions import add_deprecated_alias, run_cli
    from .presets import list_models

    p = argparse.ArgumentParser(prog="python -m kdas_core.profile",
                                description="Parameters and GMACs (FlopCounterMode, FLOPs/2) of presets or checkpoints.")
    p.add_argument("models", nargs="+", metavar="MODEL", help=f"preset ({', '.join(list_models())}) or a .safetensors checkpoint")
    p.add_argument("--image-size", dest="size", type=image_size_arg, default=352, metavar="S",
                   help="square input side (default: 352, the papers' size)")
    add_deprecated_alias(p, "--size", "--image-size", "size", type=image_size_arg)
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = p.parse_args(argv)

    def go() -> int:
        from .atomic import write_json
        from .checkpoint import load_checkpoint
        from .models import create_model

        rows = {}
        for name in args.models:  # a typo (unknown preset, not a checkpoint) is a UsageError: one line, exit 2
            model = load_checkpoint(name)[0] if name.endswith(".safetensors") else create_model(name)
            rows[name] = {"params_M": count_params(model) / 1e6, "gmacs": count_macs(model, args.size) / 1e9, "size": args.size}
            print(f"{name:<40} {rows[name]['params_M']:6.2f} M params  {rows[name]['gmacs']:6.2f} GMACs at {args.size}²")
        if args.json:
            write_json(args.json, rows)
        return 0

    return run_cli(go, "kdas_core.profile")


if __name__ == "__main__":
    raise SystemExit(main())
