"""Model size and cost: parameter count and multiply-accumulates at a given input size.

MACs come from PyTorch's own FlopCounterMode (FLOPs / 2). It counts every matmul, including
the attention products inside PVTv2 and the SAM, which thop-style hook counters skip; that is
why our teacher counts 10.8 GMACs at 352² where the Polyp-PVT/KDAS papers print 10.0.
"""

from __future__ import annotations

from kdas_core.models.cost import count_macs, count_params
from kdas_core.models.presets import image_size_arg


def main(argv: list[str] | None = None) -> int:
    """python -m kdas_core.profile [--image-size S] MODEL_OR_CKPT ...: params and GMACs per model."""
    from kdas_core.cli.conventions import Parser, add_deprecated_alias, run_cli
    from kdas_core.models.presets import list_models

    p = Parser(exit_codes=(0, 1, 2), prog="python -m kdas_core.profile",
                                description="Parameters and GMACs (FlopCounterMode, FLOPs/2) of presets or checkpoints.")
    p.add_argument("models", nargs="*", metavar="MODEL", help=f"preset ({', '.join(list_models())}) or a .safetensors checkpoint")
    p.add_argument("--weights", action="append", default=[], metavar="PATH",
                   help="a checkpoint, the word every command uses for a model file (repeat for several)")
    p.add_argument("--image-size", dest="size", type=image_size_arg, default=None, metavar="S",
                   help="square input side (default: a checkpoint's own input size; 352, the papers' size, for a preset)")
    add_deprecated_alias(p, "--size", "--image-size", "size", type=image_size_arg)
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = p.parse_args(argv)
    args.models = [*args.models, *args.weights]
    if not args.models:
        p.error("name at least one MODEL (a preset) or --weights PATH (a checkpoint)")

    def go() -> int:
        from kdas_core.io.atomic import write_json
        from kdas_core.io.checkpoint import load_checkpoint
        from kdas_core.models import create_model

        rows = {}
        for name in args.models:  # a typo (unknown preset, not a checkpoint) is a UsageError: one line, exit 2
            if name.endswith(".safetensors"):
                model, meta = load_checkpoint(name)
                size = args.size or int(meta["input_size"])
            else:
                model, size = create_model(name), args.size or 352
            rows[name] = {"params_M": count_params(model) / 1e6, "gmacs": count_macs(model, size) / 1e9, "size": size}
            print(f"{name:<40} {rows[name]['params_M']:6.2f} M params  {rows[name]['gmacs']:6.2f} GMACs at {size}²")
        if args.json:
            write_json(args.json, rows)
        return 0

    return run_cli(go, "kdas_core.profile")


if __name__ == "__main__":
    raise SystemExit(main())
