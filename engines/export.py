"""ONNX export: a graph that takes what the viewer has and returns what it draws.

Input  ``frames``: uint8 RGB, NHWC, (N, S, S, 3), already resized to the model size; N is dynamic.
Output ``probs``:  float32 (N, S, S), sigmoid(P1 + P2).

Normalisation (mean/std from the checkpoint metadata) happens inside the graph, so the app
holds no pre/post-processing constants. The facts a runtime needs (input size, threshold,
source checkpoint hash, ...) are embedded as ONNX metadata_props under ``kdas.*``.

We use the dynamo exporter: the published Polyp-PVT SAM (adaptive pooling of a dynamic size)
fails in the legacy TorchScript exporter. The dynamo exporter specialises any axis whose example
size is 1, so the example batch is 2 and the exported graph is checked for a symbolic batch axis.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from kdas_core.io.atomic import staged
from kdas_core.cli.conventions import name_some

from .errors import BackendError

OPSET = 18
FORMAT = "kdas-onnx/1"
# Bump when the exported graph changes, so cached exports (and engines built from them) are redone.
# 3: Cast uint8 -> float before the NHWC->NCHW Transpose (TensorRT allows UINT8 only at the edges).
REVISION = 3
INPUT_NAME = "frames"
OUTPUT_NAME = "probs"
PRECISIONS = ("fp32", "fp16")


class FramesToProbs(nn.Module):
    """uint8 NHWC RGB frames -> float32 (N,H,W) probabilities, normalisation included.

    `precision="fp16"` runs the network in half precision (normalisation and the final sigmoid
    output stay float32 at the graph's edges). This is what a strongly typed TensorRT network
    needs to build in FP16 (TensorRT 11 has no FP16 builder flag any more).
    """

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], precision: str = "fp32"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.model = model.to(self.dtype).eval()
        # (x/255 - mean)/std == x * scale + shift, with per-channel constants.
        std_t = torch.tensor(std, dtype=torch.float32)
        mean_t = torch.tensor(mean, dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean_t / std_t).view(1, 3, 1, 1), persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        # Cast first: TensorRT takes UINT8 only as a network input/output, so the Transpose (and
        # everything after the input) must see float32; onnx-tensorrt rejects a uint8 Transpose.
        x = frames.to(torch.float32).permute(0, 3, 1, 2) * self.scale + self.shift
        logits = self.model.predict_logits(x.to(self.dtype))
        # squeeze, not [:, 0]: a Squeeze is free in ONNX Runtime, a Gather copies the map
        return torch.sigmoid(logits).to(torch.float32).squeeze(1)


def onnx_metadata(meta: dict[str, Any], image_size: int, precision: str, source_sha256: str, source_path: str) -> dict[str, str]:
    """The `kdas.*` metadata_props written into every exported graph."""
    return {
        "kdas.format": FORMAT,
        "kdas.export_revision": str(REVISION),
        "kdas.preset": str(meta["preset"]),
        "kdas.backbone": str(meta.get("backbone", "")),
        "kdas.input_size": str(int(image_size)),
        "kdas.mean": json.dumps(list(meta["mean"])),
        "kdas.std": json.dumps(list(meta["std"])),
        "kdas.threshold": repr(float(meta["threshold"])),
        "kdas.precision": precision,
        "kdas.source_sha256": source_sha256,
        "kdas.source_path": os.path.abspath(source_path),
        "kdas.input": f"{INPUT_NAME}: uint8 RGB NHWC (N,{image_size},{image_size},3), N dynamic",
        "kdas.output": f"{OUTPUT_NAME}: float32 (N,{image_size},{image_size}) = sigmoid(P1+P2)",
    }


def read_onnx_metadata(path: str) -> dict[str, Any]:
    """Parsed `kdas.*` metadata of an exported graph: input_size (int), threshold (float), mean,
    std, precision, preset, source_sha256, source_path. BackendError for unreadable/foreign files."""
    import onnx

    if not os.path.isfile(path):
        raise BackendError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, truncated file, ...
        raise BackendError(
            f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc}); it may be truncated or "
            "corrupt; export it again with `python -m engines.build --weights CKPT --out DIR`"
        ) from exc
    props = {p.key: p.value for p in model.metadata_props}
    return parse_metadata_props(props, path)


def parse_metadata_props(props: dict[str, str], path: str) -> dict[str, Any]:
    if props.get("kdas.format") != FORMAT:
        raise BackendError(
            f"{path}: ONNX file without KDAS metadata (kdas.format={props.get('kdas.format')!r}); "
            "only graphs exported by `python -m engines.build` carry the input size and threshold"
        )
    try:
        return {
            "preset": props.get("kdas.preset", ""),
            "input_size": int(props["kdas.input_size"]),
            "threshold": float(props["kdas.threshold"]),
            "mean": json.loads(props["kdas.mean"]),
            "std": json.loads(props["kdas.std"]),
            "precision": props.get("kdas.precision", "fp32"),
            "source_sha256": props.get("kdas.source_sha256", ""),
            "source_path": props.get("kdas.source_path", ""),
            "export_revision": int(props.get("kdas.export_revision", "0")),  # 0: exported before revisions were recorded
        }
    except (KeyError, ValueError) as exc:
        raise BackendError(f"{path}: damaged KDAS metadata in ONNX file ({exc}); export it again") from exc


def export_onnx(
    model: nn.Module,
    meta: dict[str, Any],
    out_path: str,
    *,
    image_size: int | None = None,
    precision: str = "fp32",
    source_sha256: str = "",
    source_path: str = "",
    log: Callable[[str], None] | None = None,
) -> str:
    """Export `model` (a PolypPVT in eval mode) to `out_path`, atomically; returns the path.

    Raises BackendError if the exported graph lost its dynamic batch axis or fails onnx.checker.
    """
    import onnx

    size = int(image_size or meta["input_size"])
    log = log or (lambda _msg: None)
    wrapper = FramesToProbs(model, meta["mean"], meta["std"], precision).eval()
    example = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)  # batch 2: see module doc
    batch = torch.export.Dim("batch", min=1, max=1024)
    t0 = time.perf_counter()
    log(f"exporting ONNX ({meta['preset']}, {size}x{size}, {precision}, opset {OPSET}) with the dynamo exporter ...")
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamic_shapes={"frames": {0: batch}},
            optimize=True,
            external_data=False,
        )
    proto = program.model_proto
    _check_dynamic_batch(proto, out_path)
    try:
        inner = uint8_tensors(proto, include_inputs=False, require_typed=False)
    except Exception as exc:  # shape inference itself failed: say so, do not block the export
        log(f"note: could not check the graph's tensor dtypes ({type(exc).__name__}: {exc})")
        inner = []
    if inner:
        raise BackendError(f"{out_path}: exported graph has UINT8 tensors inside it ({name_some(inner, 5)}); TensorRT cannot parse that")
    for key, value in onnx_metadata(meta, size, precision, source_sha256, source_path).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "kdas.engines"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise BackendError(f"{out_path}: exported graph fails onnx.checker: {exc}") from exc
    with staged(out_path, suffix=".onnx") as tmp:
        onnx.save(proto, tmp)
    log(f"exported {out_path} in {time.perf_counter() - t0:.1f} s")
    return out_path


def _check_dynamic_batch(proto, path: str) -> None:
    """Refuse a graph whose batch axis got fixed (the dynamo exporter does so silently)."""
    for value in list(proto.graph.input) + list(proto.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        if not dim0.dim_param:
            raise BackendError(
                f"{path}: export fixed the batch axis of {value.name!r} to {dim0.dim_value}; "
                "the graph must accept any batch size"
            )


def uint8_tensors(proto, include_inputs: bool = True, require_typed: bool = True) -> list[str]:
    """Names of every UINT8 tensor of `proto` after ONNX shape inference (graph inputs only when
    `include_inputs`). TensorRT accepts UINT8 only as a network input or output, so an exported
    KDAS graph must have none besides its `frames` input. `require_typed`: BackendError when
    inference leaves a node output untyped (the answer would be incomplete)."""
    import onnx
    from onnx import TensorProto

    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=require_typed)
    g = inferred.graph
    inputs = {v.name for v in g.input}
    typed = [(v.name, v.type.tensor_type.elem_type) for v in list(g.input) + list(g.value_info) + list(g.output)]
    typed += [(t.name, t.data_type) for t in g.initializer]
    typed += [(n.output[0], a.t.data_type) for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    seen, out = set(), []
    for name, elem in typed:
        if elem == TensorProto.UINT8 and name not in seen and (include_inputs or name not in inputs):
            seen.add(name)
            out.append(name)
    known = {name for name, _ in typed}
    untyped = [o for n in g.node for o in n.output if o and o not in known]
    if untyped and require_typed:  # shape inference could not type them: do not claim the graph is clean
        raise BackendError(f"ONNX shape inference left {len(untyped)} tensor(s) untyped (e.g. {untyped[0]!r}); cannot check dtypes")
    return out


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints several progress lines per export; keep CLI output readable."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    except Exception:
        sys.stderr.write(buf.getvalue())  # show what the exporter said when it fails
        raise
