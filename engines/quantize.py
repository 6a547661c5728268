"""Static INT8 quantisation of an exported fp32 KDAS graph, with ONNX Runtime's tooling.

    from engines.quantize import quantize_int8
    quantize_int8("deploy/best-256-fp32.onnx", "deploy/best-256-int8.onnx", calibration="DATA/TrainDataset")

What it makes: a QDQ graph (QuantizeLinear/DequantizeLinear pairs around the network's ops,
which ONNX Runtime's CPU provider fuses into integer kernels), with
  - convolutions and matrix products in int8 (QUANTISED_OPS; element-wise ops stay float32);
  - weights int8, symmetric, per output channel, in a 7-bit range (no int16 saturation on CPUs
    without VNNI; see quantize_int8);
  - activations uint8, asymmetric, per tensor, ranges calibrated (MinMax) on real frames;
  - the graph contract of every KDAS export unchanged: uint8 RGB NHWC frames in, float32
    probabilities sigmoid(P1 + P2) out. The output head (the logit upsampling, the P1 + P2 sum,
    the sigmoid) stays float32, so probabilities are not rounded to 256 levels;
  - the `kdas.*` metadata of the fp32 graph, with `kdas.precision = int8`, `kdas.calibration`
    (JSON: folder, number of images, file-list hash, method) and `kdas.quantization` (the scheme
    and the onnxruntime version that made it).

Calibration frames are resized exactly as `kdas_core.evaluate` resizes test images (antialiased
bilinear to the model size, rounded to uint8), so the calibrated ranges are those the evaluator
and the viewer feed the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from kdas_core.data import IMAGE_EXTS

from .errors import BackendError
from .export import INPUT_NAME, OUTPUT_NAME, read_onnx_metadata

DEFAULT_CALIBRATION_IMAGES = 300
CALIBRATION_BATCH = 8
IMAGE_SUFFIXES = tuple(sorted(IMAGE_EXTS))  # kdas_core.data: what counts as an image, everywhere
# Ops quantised. Add/Mul/Concat/Softmax/Resize stay float32: ONNX Runtime's QLinearAdd/QLinearMul
# kernels cost more than the float ops they replace (fp32 Adds are fused into the convolutions),
# measured interleaved on an AVX2 CPU (RESULTS.md, "INT8 on CPU").
QUANTISED_OPS = ("Conv", "MatMul", "Clip", "Relu")
# Ops the output head may hold between the last convolutions and `probs`; kept in float32.
_HEAD_STOP = {"Conv", "ConvTranspose", "MatMul", "Gemm"}


def calibration_images(folder: str | os.PathLike, count: int = DEFAULT_CALIBRATION_IMAGES) -> list[str]:
    """`count` image paths spread evenly over the sorted images of `folder` (or of its `images/`
    subfolder, as in a PraNet TrainDataset), so every source in a mixed folder is represented."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--calibration {folder}: no such folder (give a folder of real frames, e.g. DATA/TrainDataset)")
    if (root / "images").is_dir():
        root = root / "images"
    paths = sorted(str(p) for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"--calibration {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    if count < 1:
        raise ValueError(f"calibration image count must be >= 1, got {count}")
    if len(paths) <= count:
        return paths
    picks = np.linspace(0, len(paths) - 1, count).round().astype(int)
    return [paths[i] for i in picks]


def load_calibration_frame(path: str, size: int) -> np.ndarray:
    """uint8 (size, size, 3) RGB, resized as kdas_core.evaluate resizes test images."""
    from kdas_core.data.dataset import DatasetError, read_image
    from kdas_core.data.transforms import to_tensor

    try:
        image = read_image(path)
    except DatasetError as exc:
        raise FileNotFoundError(str(exc)) from exc
    chw, _ = to_tensor(image, None, size)
    return chw.permute(1, 2, 0).numpy()


class FrameReader:
    """onnxruntime CalibrationDataReader over image files, in batches, with progress."""

    def __init__(self, paths: list[str], size: int, batch: int = CALIBRATION_BATCH, log: Callable[[str], None] | None = None):
        self.paths, self.size, self.batch = paths, size, batch
        self.log = log or (lambda _msg: None)
        self._it: Iterator[dict] | None = None

    def _batches(self) -> Iterator[dict]:
        t0, done = time.perf_counter(), 0
        step = max(1, len(self.paths) // 5)
        for i in range(0, len(self.paths), self.batch):
            chunk = self.paths[i:i + self.batch]
            yield {INPUT_NAME: np.stack([load_calibration_frame(p, self.size) for p in chunk])}
            before, done = done, done + len(chunk)
            if done // step != before // step or done == len(self.paths):
                self.log(f"  calibration {done}/{len(self.paths)} images ({time.perf_counter() - t0:.0f} s)")

    def get_next(self) -> dict | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def head_nodes(model) -> list[str]:
    """Names of the nodes between the network's last weighted ops and the output (upsampling of
    the logits, P1 + P2, sigmoid, squeeze): left in float32 so probabilities stay smooth."""
    producer = {out: node for node in model.graph.node for out in node.output}
    keep, seen = [], set()
    stack = [OUTPUT_NAME]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen or node.op_type in _HEAD_STOP:
            continue
        seen.add(node.name)
        keep.append(node.name)
        stack.extend(i for i in node.input if i)
    return keep


def calibration_record(folder: str | os.PathLike, paths: list[str], method: str) -> dict:
    digest = hashlib.sha256("\n".join(os.path.basename(p) for p in paths).encode()).hexdigest()
    return {"folder": os.path.abspath(folder), "images": len(paths), "files_sha256": digest[:16], "method": method}


def quantize_int8(
    fp32_onnx: str,
    out_path: str,
    calibration: str | os.PathLike,
    *,
    count: int = DEFAULT_CALIBRATION_IMAGES,
    reduce_range: bool = True,
    log: Callable[[str], None] | None = None,
) -> str:
    """Write a static-QDQ INT8 version of the KDAS fp32 graph `fp32_onnx` to `out_path`
    (atomically) and return the path. `calibration`: a folder of real frames (or a folder with
    `images/`), of which `count` spread-out images calibrate the activation ranges.
    `reduce_range` (default): 7-bit weights. x86 CPUs without VNNI (AVX2, AVX-512F) multiply
    uint8 x int8 pairs into saturating int16 sums (vpmaddubsw); full 8-bit weights overflow them
    and cost the bundled student 2.3 / 2.0 pp test mDice (Kvasir / CVC-ClinicDB); 7-bit weights
    cannot overflow."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    log = log or (lambda _msg: None)
    meta = read_onnx_metadata(fp32_onnx)
    if meta["precision"] != "fp32":
        raise BackendError(f"{fp32_onnx}: INT8 quantisation starts from an fp32 export, this one is {meta['precision']}")
    size = meta["input_size"]
    paths = calibration_images(calibration, count)
    source = onnx.load(fp32_onnx)
    props = {p.key: p.value for p in source.metadata_props}
    method = "MinMax"
    log(f"quantising {fp32_onnx} to INT8 (static QDQ, per-channel int8 weights, uint8 activations), "
        f"calibrating on {len(paths)} images of {calibration} at {size}x{size} ...")
    t0 = time.perf_counter()
    directory = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".kdas-int8-", dir=directory) as tmp:
        prepared = os.path.join(tmp, "prepared.onnx")
        quant_pre_process(fp32_onnx, prepared, skip_symbolic_shape=True)
        exclude = head_nodes(onnx.load(prepared))  # names after pre-processing, which may fuse nodes
        quantized = os.path.join(tmp, "int8.onnx")
        quantize_static(
            prepared, quantized, FrameReader(paths, size, log=log),
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude, op_types_to_quantize=list(QUANTISED_OPS), calibrate_method=CalibrationMethod.MinMax,
            # No CalibMaxIntermediateOutputs: onnxruntime 1.32's MinMax calibrator drops (rather
            # than merges) the ranges of every full chunk, calibrating on the remainder only. The
            # augmented graph returns per-tensor min/max scalars, so keeping them all costs little.
        )
        model = onnx.load(quantized)
        del model.metadata_props[:]
        props.update({
            "kdas.precision": "int8",
            "kdas.calibration": json.dumps(calibration_record(calibration, paths, method)),
            "kdas.quantization": (
                f"static QDQ: weights int8 symmetric per-channel{' (7-bit range)' if reduce_range else ''}, "
                f"activations uint8 asymmetric per-tensor ({method}), output head float32; onnxruntime {onnxruntime.__version__}"
            ),
        })
        for key, value in props.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        _check_contract(model, out_path)
        staged = os.path.join(tmp, "out.onnx")
        onnx.save(model, staged)
        os.replace(staged, out_path)
    log(f"wrote {out_path} in {time.perf_counter() - t0:.0f} s")
    return out_path


def _check_contract(model, path: str) -> None:
    """The quantised graph must keep the uint8 NHWC input and float32 output of every KDAS export."""
    from onnx import TensorProto

    (inp,), (out,) = model.graph.input, model.graph.output
    got = (inp.name, inp.type.tensor_type.elem_type, out.name, out.type.tensor_type.elem_type)
    want = (INPUT_NAME, TensorProto.UINT8, OUTPUT_NAME, TensorProto.FLOAT)
    if got != want:
        raise BackendError(f"{path}: quantisation changed the graph contract (input/output {got}, expected {want})")


def calibration_of(path: str) -> dict:
    """The `kdas.calibration` record of an INT8 graph ({} for graphs that were not quantised)."""
    import onnx

    read_onnx_metadata(path)  # BackendError for unreadable/foreign files
    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return json.loads(props["kdas.calibration"]) if "kdas.calibration" in props else {}


def verify_images(folder: str | os.PathLike, count: int = 8, *,
                  calibration_count: int = DEFAULT_CALIBRATION_IMAGES) -> list[str]:
    """Up to `count` image paths of `folder` that `calibration_images(folder, calibration_count)`
    does not pick, spread over those left: a model is not graded on the frames it was calibrated on."""
    from kdas_core.cli.conventions import UsageError

    calibration = set(calibration_images(folder, calibration_count))
    root = Path(folder) / "images" if (Path(folder) / "images").is_dir() else Path(folder)
    rest = sorted(str(p) for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and str(p) not in calibration)
    if not rest:
        raise UsageError(f"--calibration {folder}: all {len(calibration)} images calibrate the model, none is left to "
                         "verify on; pass --verify-frames DIR (other real frames) or a smaller --calibration-images")
    if len(rest) <= count:
        return rest
    picks = np.linspace(0, len(rest) - 1, count).round().astype(int)
    return [rest[i] for i in picks]


def verify_frames(paths: list[str], size: int) -> np.ndarray:
    """The images `paths` (from `verify_images`) as uint8 (N, size, size, 3) frames, resized as for calibration."""
    return np.stack([load_calibration_frame(p, size) for p in paths])
