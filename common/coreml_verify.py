"""Checking a saved Core ML package against PyTorch, on any platform.

Core ML itself runs only on Apple systems, where the package is checked with Core ML's own prediction. Elsewhere
the package is read back (its model description, the ML program's protobuf and the weights in weights/weight.bin)
and the program's operations are evaluated one by one in torch, as the runtime would: a tensor declared fp16 is
stored in fp16 and every operation computes in fp32 from its stored inputs, so the rounding between operations
of an fp16 program is reproduced. An operation this evaluator does not know stops the check with an error before
anything runs, so a program is never half-checked.

The comparison with PyTorch (`judge`) is shared with the ONNX export: fp32 exports must match the logits within
1e-4 of their range over the test images; fp16 exports must agree on the top-1 class of every test image.
"""
from __future__ import annotations

import logging
import math
import platform
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common.errors import UserError
from common.input_format import InputFormat, Preprocess

FP32_RELATIVE_TOLERANCE = 1e-4
SELECTION_POOL = 4


class ExportVerificationError(UserError):
    """An exported model that does not compute what the PyTorch model computes, or that cannot be checked."""


class UnsupportedProgramError(ExportVerificationError):
    """A Core ML package with operations or types the Linux evaluator does not implement."""


def import_coremltools():
    """coremltools, imported without its import-time notices that the macOS-only runtime is absent."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import coremltools
    finally:
        logger.setLevel(level)
    return coremltools


@dataclass
class VerificationReport:
    """How an exported model compared with PyTorch on the test images."""

    target: str
    method: str
    precision: str
    images: int
    max_abs_diff: float
    logit_range: float
    tolerance: float | None
    top1_agreement: int
    operations: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        criterion = (f"<= {self.tolerance:.3g} required" if self.tolerance is not None
                     else "top-1 agreement required")
        return (f"verified {self.target} ({self.precision}) against PyTorch with {self.method} on {self.images} "
                f"test images: top-1 agreement {self.top1_agreement}/{self.images}, max |logit difference| "
                f"{self.max_abs_diff:.3g} ({criterion}; logit range {self.logit_range:.3g})")


def make_test_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """`count` RGB uint8 images, N x size x size x 3: smooth random colour fields with a shape and pixel noise.

    Smooth fields and edges give the networks varied, natural-looking statistics without any image files.
    """
    generator = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(count):
        cells = int(torch.randint(2, 8, (1,), generator=generator))
        colours = torch.rand(1, 3, cells, cells, generator=generator) * 255
        image = F.interpolate(colours, size=(size, size), mode="bilinear", align_corners=False)[0]
        top, left = (torch.rand(2, generator=generator) * size * 0.6).long().tolist()
        extent = max(2, int(size * (0.2 + 0.3 * float(torch.rand(1, generator=generator)))))
        image[:, top:top + extent, left:left + extent] = torch.rand(3, 1, 1, generator=generator) * 255
        image += torch.randn(image.shape, generator=generator) * 8
        images.append(image.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0))
    return torch.stack(images).numpy()


@torch.no_grad()
def reference_logits(model: nn.Module, input_format: InputFormat, images: np.ndarray) -> np.ndarray:
    """PyTorch's fp32 logits (eval mode) for RGB uint8 images N x H x W x 3 in the given input format."""
    was_training = model.training
    model.eval()
    try:
        batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        return model(Preprocess(input_format)(batch)).float().numpy()
    finally:
        model.train(was_training)


def judge(reference: np.ndarray, candidate: np.ndarray, candidate_top1: Sequence[int], *, precision: str,
          target: str, method: str, operations: dict[str, int] | None = None) -> VerificationReport:
    """Compare an export's logits with PyTorch's; raise ExportVerificationError when they do not agree.

    fp32: max |difference| <= 1e-4 x (max - min of the reference logits over all images). fp16: the top-1 class
    agrees on every image. Any non-finite output fails.
    """
    if candidate.shape != reference.shape:
        raise ExportVerificationError(f"{target} gives outputs of shape {candidate.shape}, PyTorch "
                                      f"{reference.shape}: the export has another number of classes")
    if not np.isfinite(candidate).all():
        raise ExportVerificationError(f"{target} gives non-finite outputs ({precision}): an overflow; "
                                      "try --precision fp32")
    reference_top1 = reference.argmax(axis=1)
    logit_range = float(reference.max() - reference.min())
    report = VerificationReport(
        target=target, method=method, precision=precision, images=len(reference),
        max_abs_diff=float(np.abs(candidate - reference).max()), logit_range=logit_range,
        tolerance=FP32_RELATIVE_TOLERANCE * logit_range if precision == "fp32" else None,
        top1_agreement=int((np.asarray(candidate_top1) == reference_top1).sum()), operations=operations or {})
    if report.tolerance is not None and not report.max_abs_diff <= report.tolerance:
        raise ExportVerificationError(
            f"{target} does not match PyTorch: max |logit difference| {report.max_abs_diff:.3g} exceeds "
            f"{report.tolerance:.3g} (1e-4 of the logit range {logit_range:.3g}) on {report.images} test images, "
            f"top-1 agreement {report.top1_agreement}/{report.images}; check the input format (channel order, "
            "scale, mean) and the weights")
    if report.tolerance is None and report.top1_agreement != report.images:
        raise ExportVerificationError(
            f"{target} does not match PyTorch: top-1 class agrees on {report.top1_agreement} of {report.images} "
            f"test images (max |logit difference| {report.max_abs_diff:.3g}, logit range {logit_range:.3g}); "
            "check the input format (channel order, scale, mean), or export with --precision fp32")
    return report


def verify_coreml(package_path: str | Path, model: nn.Module, input_format: InputFormat, *,
                  images: np.ndarray | None = None, num_images: int = 4, seed: int = 0) -> VerificationReport:
    """Check a saved .mlpackage against `model` fed with `input_format`; raise ExportVerificationError if it differs.

    The precision, image size and class names are read from the package. `images` are RGB uint8 N x H x W x 3 at
    the package's size; by default the `num_images` synthetic images with the clearest PyTorch top-1 out of four
    times as many, because a near-tie between two classes on a synthetic image would make fp16 top-1 agreement a
    coin toss rather than a check of the conversion. On macOS Core ML predicts; elsewhere the ML program is
    evaluated in torch.
    """
    package_path = Path(package_path)
    program = MLProgram(package_path)
    if images is None:
        images = make_test_images(SELECTION_POOL * num_images, program.image_size, seed)
        reference = reference_logits(model, input_format, images)
        top2 = np.sort(reference, axis=1)[:, -2:]
        clearest = np.sort(np.argsort(top2[:, 1] - top2[:, 0])[-num_images:])
        images, reference = images[clearest], reference[clearest]
    elif images.shape[1:] != (program.image_size, program.image_size, 3):
        raise ValueError(f"test images must be N x {program.image_size} x {program.image_size} x 3 RGB, "
                         f"not {images.shape}")
    else:
        reference = reference_logits(model, input_format, images)
    if platform.system() == "Darwin":
        candidate, labels = _predict_with_coreml(package_path, program, images)
        reference = _log_softmax(reference)
        # A probability that underflowed to 0 has no logarithm to compare; the label check still covers it.
        candidate = np.where(np.isnan(candidate), reference, candidate)
        method = "Core ML prediction (log-probabilities)"
    else:
        candidate, labels = program.predict(images)
        method = "the ML program evaluated in torch"
    index = {name: i for i, name in enumerate(program.class_names)}
    return judge(reference, candidate, [index[label] for label in labels], precision=program.precision,
                 target=package_path.name, method=method, operations=program.operation_counts)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.from_numpy(logits).double(), dim=1).numpy()


def _predict_with_coreml(package_path: Path, program: "MLProgram",
                         images: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Log-probabilities and labels from Core ML; probabilities that underflowed to 0 give NaN."""
    from PIL import Image

    ct = import_coremltools()
    # fp32 runs on the CPU so the 1e-4 check sees fp32 arithmetic; fp16 runs where an app would run it.
    units = ct.ComputeUnit.CPU_ONLY if program.precision == "fp32" else ct.ComputeUnit.ALL
    mlmodel = ct.models.MLModel(str(package_path), compute_units=units)
    description = mlmodel.get_spec().description
    rows, labels = [], []
    for image in images:
        result = mlmodel.predict({program.input_name: Image.fromarray(image)})
        probabilities = result[description.predictedProbabilitiesName]
        row = np.array([probabilities[name] for name in program.class_names], dtype=np.float64)
        with np.errstate(divide="ignore"):
            rows.append(np.where(row > 0, np.log(row), np.nan))
        labels.append(result[description.predictedFeatureName])
    return np.stack(rows), labels


# ---------------------------------------------------------------------------------------------------------------
# The ML program evaluator

_BLOB_SENTINEL = 0xDEADBEEF
_MODEL_PATH_PREFIX = "@model_path/"


class MLProgram:
    """The ML program of a saved .mlpackage, read with coremltools (no Core ML runtime needed) and run in torch."""

    def __init__(self, package_path: str | Path) -> None:
        ct = import_coremltools()
        from coremltools.proto import MIL_pb2

        self._mil = MIL_pb2
        path = Path(package_path)
        if not (path / "Manifest.json").is_file():
            raise ExportVerificationError(f"{path} is not a Core ML package (no Manifest.json)")
        mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
        spec = mlmodel.get_spec()
        if spec.WhichOneof("Type") != "mlProgram":
            raise UnsupportedProgramError(f"{path.name} is a {spec.WhichOneof('Type')} model, not an ML program")
        self._model_dir = Path(mlmodel.weights_dir).parent
        function = spec.mlProgram.functions["main"]
        block = function.block_specializations[function.opset]
        self.operations = list(block.operations)
        self.operation_counts = dict(Counter(op.type for op in self.operations))
        self._producers = {output.name: op for op in self.operations for output in op.outputs}
        self._constants: dict[str, Any] = {}
        unknown = sorted({op.type for op in self.operations if op.blocks} |
                         {op.type for op in self.operations if op.type not in _KERNELS and op.type != "const"})
        if unknown:
            raise UnsupportedProgramError(
                f"{path.name} uses operations the Linux verifier does not evaluate: {', '.join(unknown)}; "
                "verify it on macOS, or export with --no-verify at your own risk")

        inputs = spec.description.input
        if len(inputs) != 1 or inputs[0].type.WhichOneof("Type") != "imageType":
            raise UnsupportedProgramError(f"{path.name} must have exactly one image input")
        image_type = inputs[0].type.imageType
        color_space = ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(image_type.colorSpace)
        if color_space not in ("RGB", "BGR") or image_type.width != image_type.height:
            raise UnsupportedProgramError(f"{path.name}: a {image_type.width}x{image_type.height} {color_space} "
                                          "image input; the verifier checks square RGB or BGR images")
        self.input_name = inputs[0].name
        self.color_space = color_space
        self.image_size = int(image_type.width)
        self.precision = "fp16" if any(output.type.tensorType.dataType == MIL_pb2.FLOAT16
                                       for op in self.operations for output in op.outputs) else "fp32"
        self._classify, self._logits_name = self._find_classifier(path.name)
        self.class_names = [str(name) for name in self._binding_value(self._classify.inputs["classes"].arguments[0])]

    def _find_classifier(self, name: str) -> tuple[Any, str]:
        """The classify op, and the name of the logits: the input of the softmax that feeds it (through casts)."""
        classify = [op for op in self.operations if op.type == "classify"]
        if len(classify) != 1:
            raise UnsupportedProgramError(f"{name} has {len(classify)} classify operations; expected one")
        producer = self._producers.get(classify[0].inputs["probabilities"].arguments[0].name)
        while producer is not None and producer.type == "cast":
            producer = self._producers.get(producer.inputs["x"].arguments[0].name)
        if producer is None or producer.type != "softmax":
            raise UnsupportedProgramError(f"{name}: the classifier's probabilities do not come from a softmax, "
                                          "so there are no logits to compare")
        return classify[0], producer.inputs["x"].arguments[0].name

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Logits (the classifier's softmax input, as fp32) and predicted labels for RGB uint8 images N x H x W x 3."""
        logits, labels = [], []
        label_name = self._classify.outputs[0].name
        for image in images:
            pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
            # Core ML turns the image into a 1 x 3 x H x W float tensor in the declared channel order; the
            # program's own ops then apply the scale and bias.
            if self.color_space == "BGR":
                pixels = pixels.flip(0)
            values = self.run({self.input_name: pixels.unsqueeze(0)})
            logits.append(values[self._logits_name].float().reshape(-1).numpy())
            labels.append(values[label_name])
        return np.stack(logits), labels

    @torch.no_grad()
    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Every named value of the program for these inputs, evaluating the operations in order."""
        values: dict[str, Any] = dict(feeds)
        for op in self.operations:
            if op.type == "const":
                name = op.outputs[0].name
                if name not in self._constants:
                    self._constants[name] = _compute(self._decode(op.attributes["val"]))
                values[name] = self._constants[name]
                continue
            arguments = {key: [self._binding(binding, values) for binding in argument.arguments]
                         for key, argument in op.inputs.items()}
            try:
                results = _KERNELS[op.type](_Arguments(op.type, arguments))
            except Exception as error:
                error.add_note(f"while evaluating the ML program's {op.type} {op.outputs[0].name!r}")
                raise
            if not isinstance(results, tuple):
                results = (results,)
            for output, result in zip(op.outputs, results, strict=True):
                values[output.name] = self._conform(op, output, result)
        return values

    def _conform(self, op: Any, output: Any, result: Any) -> Any:
        """Round a result to its declared dtype, after checking its declared shape.

        fp16 results are kept as fp32 tensors holding fp16 values (exact), since every op computes in fp32.
        """
        if output.type.WhichOneof("type") != "tensorType" or not isinstance(result, torch.Tensor):
            return result
        tensor_type = output.type.tensorType
        declared = [dim.constant.size if dim.WhichOneof("dimension") == "constant" else None
                    for dim in tensor_type.dimensions]
        if len(declared) != result.dim() or any(d is not None and d != s for d, s in zip(declared, result.shape)):
            raise ExportVerificationError(f"{op.type} {output.name!r}: evaluated shape {tuple(result.shape)}, "
                                          f"declared {tuple(declared)}")
        return _compute(result.to(self._torch_dtype(tensor_type.dataType)))

    def _binding(self, binding: Any, values: dict[str, Any]) -> Any:
        if binding.WhichOneof("binding") == "name":
            return values[binding.name]
        return self._decode(binding.value)

    def _binding_value(self, binding: Any) -> Any:
        """A binding's value without running the program: an inline value or a const op's."""
        if binding.WhichOneof("binding") == "value":
            return self._decode(binding.value)
        producer = self._producers[binding.name]
        if producer.type != "const":
            raise UnsupportedProgramError(f"{binding.name!r} is computed, not a constant")
        return self._decode(producer.attributes["val"])

    def _torch_dtype(self, data_type: int) -> torch.dtype:
        dtypes = {self._mil.FLOAT16: torch.float16, self._mil.FLOAT32: torch.float32,
                  self._mil.FLOAT64: torch.float64, self._mil.INT8: torch.int8, self._mil.UINT8: torch.uint8,
                  self._mil.INT16: torch.int16, self._mil.INT32: torch.int32, self._mil.INT64: torch.int64,
                  self._mil.BOOL: torch.bool}
        if data_type not in dtypes:
            raise UnsupportedProgramError(f"tensors of type {self._mil.DataType.Name(data_type)} are not supported")
        return dtypes[data_type]

    def _decode(self, value: Any) -> Any:
        """A proto Value as a torch tensor, a str, or a list of values."""
        kind = value.WhichOneof("value")
        if kind == "blobFileValue":
            return self._read_blob(value.blobFileValue, value.type.tensorType)
        immediate = value.immediateValue
        which = immediate.WhichOneof("value")
        if which in ("list", "tuple"):
            return [self._decode(element) for element in getattr(immediate, which).values]
        if which != "tensor":
            raise UnsupportedProgramError(f"constant values of kind {which} are not supported")
        tensor_type = value.type.tensorType
        shape = [dim.constant.size for dim in tensor_type.dimensions]
        content = immediate.tensor
        field_name = content.WhichOneof("value")
        if tensor_type.dataType == self._mil.STRING:
            strings = list(content.strings.values)
            return strings[0] if tensor_type.rank == 0 else strings
        dtype = self._torch_dtype(tensor_type.dataType)
        if field_name == "bytes":
            array = np.frombuffer(content.bytes.values, dtype=_numpy_dtype(dtype)).copy()
        else:
            array = np.array(list(getattr(content, field_name).values), dtype=_numpy_dtype(dtype))
        return torch.from_numpy(array.reshape(shape))

    def _read_blob(self, blob: Any, tensor_type: Any) -> torch.Tensor:
        """A tensor stored in weights/weight.bin: a 64-byte record at `offset` (sentinel, dtype, size, data offset)."""
        if not blob.fileName.startswith(_MODEL_PATH_PREFIX):
            raise UnsupportedProgramError(f"weights file {blob.fileName!r} is not inside the package")
        path = self._model_dir / blob.fileName[len(_MODEL_PATH_PREFIX):]
        dtype = self._torch_dtype(tensor_type.dataType)
        blob_codes = {torch.float16: 1, torch.float32: 2}
        if dtype not in blob_codes:
            raise UnsupportedProgramError(f"stored weights of type {dtype} are not supported")
        shape = [dim.constant.size for dim in tensor_type.dimensions]
        with open(path, "rb") as file:
            file.seek(blob.offset)
            sentinel, code, size, data_offset = struct.unpack("<IIQQ", file.read(24))
            expected = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
            if sentinel != _BLOB_SENTINEL or code != blob_codes[dtype] or size != expected:
                raise ExportVerificationError(f"{path} is damaged at offset {blob.offset}: the weight record does "
                                              f"not describe {size} bytes of {dtype} for shape {shape}")
            file.seek(data_offset)
            data = file.read(size)
        if len(data) != size:
            raise ExportVerificationError(f"{path} ends early: a weight at offset {blob.offset} is cut off")
        return torch.from_numpy(np.frombuffer(data, dtype=_numpy_dtype(dtype)).copy().reshape(shape))


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.tensor([], dtype=dtype).numpy().dtype


class _Arguments:
    """An operation's inputs by name. Float tensors come as fp32: each op computes in fp32 from stored values."""

    def __init__(self, op_type: str, values: dict[str, list[Any]]) -> None:
        self.op_type = op_type
        self.values = values

    def has(self, name: str) -> bool:
        return name in self.values

    def raw(self, name: str, default: Any = None) -> Any:
        if name not in self.values:
            if default is None:
                raise ExportVerificationError(f"{self.op_type} is missing its input {name!r}")
            return default
        return self.values[name][0]

    def tensor(self, name: str) -> torch.Tensor:
        return _compute(self.raw(name))

    def tensors(self, name: str) -> list[torch.Tensor]:
        return [_compute(value) for value in self.values[name]]

    def ints(self, name: str, default: list[int] | None = None) -> list[int]:
        value = self.raw(name, default)
        return value if isinstance(value, list) else [int(v) for v in value.reshape(-1).tolist()]

    def int(self, name: str, default: int | None = None) -> int:
        return int(self.raw(name, default))

    def bool(self, name: str, default: bool | None = None) -> bool:
        return bool(self.raw(name, default))

    def bools(self, name: str, default: list[bool]) -> list[bool]:
        value = self.raw(name, default)
        return value if isinstance(value, list) else [bool(v) for v in value.reshape(-1).tolist()]

    def float(self, name: str, default: float) -> float:
        return float(self.raw(name, default))

    def str(self, name: str, default: str) -> str:
        return str(self.raw(name, default))


def _compute(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype == torch.float16:
        return value.float()
    return value


def _spatial_padding(args: _Arguments, x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int],
                     dilations: Sequence[int]) -> list[int]:
    """Begin/end padding per spatial axis, [b0, e0, b1, e1, ...], for pad_type valid, custom, same, same_lower."""
    pad_type = args.str("pad_type", "valid")
    spatial = x.shape[2:]
    if pad_type == "valid":
        return [0] * (2 * len(spatial))
    if pad_type == "custom":
        return args.ints("pad", [0] * (2 * len(spatial)))
    if pad_type not in ("same", "same_lower"):
        raise UnsupportedProgramError(f"{args.op_type} pad_type {pad_type!r} is not supported")
    pads = []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        begin = total // 2 if pad_type == "same" else total - total // 2
        pads += [begin, total - begin]
    return pads


def _torch_pad_order(pads: list[int]) -> list[int]:
    """[b0, e0, b1, e1] (first spatial axis first) to F.pad's order (last axis first)."""
    pairs = [pads[i:i + 2] for i in range(0, len(pads), 2)]
    return [p for pair in reversed(pairs) for p in pair]


def _conv(args: _Arguments) -> torch.Tensor:
    x, weight = args.tensor("x"), args.tensor("weight")
    if x.dim() != 4:
        raise UnsupportedProgramError(f"conv on rank-{x.dim()} tensors is not supported (2-D convolutions only)")
    strides = args.ints("strides", [1, 1])
    dilations = args.ints("dilations", [1, 1])
    pads = _spatial_padding(args, x, weight.shape[2:], strides, dilations)
    padding = pads[::2]
    if pads[1::2] != padding:
        x, padding = F.pad(x, _torch_pad_order(pads)), [0] * len(padding)
    bias = args.tensor("bias") if args.has("bias") else None
    return F.conv2d(x, weight, bias, strides, padding, dilations, args.int("groups", 1))


def _pool(args: _Arguments, average: bool) -> torch.Tensor:
    x = args.tensor("x")
    if x.dim() != 4:
        raise UnsupportedProgramError(f"{args.op_type} on rank-{x.dim()} tensors is not supported")
    kernel = args.ints("kernel_sizes")
    strides = args.ints("strides", [1, 1])
    pads = _torch_pad_order(_spatial_padding(args, x, kernel, strides, [1, 1]))
    ceil_mode = args.bool("ceil_mode", False)
    if not average:
        return F.max_pool2d(F.pad(x, pads, value=-math.inf), kernel, strides, ceil_mode=ceil_mode)
    sums = F.avg_pool2d(F.pad(x, pads), kernel, strides, ceil_mode=ceil_mode, divisor_override=1)
    if args.bool("exclude_padding_from_average", False):
        ones = torch.ones_like(x[:1, :1])
        counts = F.avg_pool2d(F.pad(ones, pads), kernel, strides, ceil_mode=ceil_mode, divisor_override=1)
        return sums / counts
    return sums / math.prod(kernel)


def _batch_norm(args: _Arguments) -> torch.Tensor:
    x = args.tensor("x")
    shape = [1, -1] + [1] * (x.dim() - 2)
    scale = torch.rsqrt(args.tensor("variance") + args.float("epsilon", 1e-5)).view(shape)
    y = (x - args.tensor("mean").view(shape)) * scale
    if args.has("gamma"):
        y = y * args.tensor("gamma").view(shape)
    if args.has("beta"):
        y = y + args.tensor("beta").view(shape)
    return y


def _axes(axes: list[int], rank: int) -> list[int]:
    return sorted(a + rank if a < 0 else a for a in axes)


def _reduce_mean(args: _Arguments) -> torch.Tensor:
    x = args.tensor("x")
    axes = _axes(args.ints("axes"), x.dim()) if args.has("axes") else list(range(x.dim()))
    return x.mean(dim=axes, keepdim=args.bool("keep_dims", False))


def _reshape(args: _Arguments) -> torch.Tensor:
    x = args.tensor("x")
    shape = [x.shape[i] if size == 0 else size for i, size in enumerate(args.ints("shape"))]
    return x.reshape(shape)


def _expand_dims(args: _Arguments) -> torch.Tensor:
    x = args.tensor("x")
    axes = args.ints("axes")
    for axis in _axes(axes, x.dim() + len(axes)):
        x = x.unsqueeze(axis)
    return x


def _squeeze(args: _Arguments) -> torch.Tensor:
    x = args.tensor("x")
    if not args.has("axes"):
        return x.squeeze()
    return x.squeeze(tuple(_axes(args.ints("axes"), x.dim())))


def _concat(args: _Arguments) -> torch.Tensor:
    values = args.tensors("values")
    axis = args.int("axis")
    axis = axis + values[0].dim() if axis < 0 else axis
    if args.bool("interleave", False):
        return torch.stack(values, dim=axis + 1).flatten(axis, axis + 1)
    return torch.cat(values, dim=axis)


def _slice_by_index(args: _Arguments) -> torch.Tensor:
    x = args.tensor("x")
    rank = x.dim()
    begin, end = args.ints("begin"), args.ints("end")
    stride = args.ints("stride", [1] * rank)
    begin_mask = args.bools("begin_mask", [False] * rank)
    end_mask = args.bools("end_mask", [False] * rank)
    squeeze_mask = args.bools("squeeze_mask", [False] * rank)
    # Python's slices give MIL's semantics: negative positions count from the end, masks mean "to the edge".
    slices = [slice(None if begin_mask[axis] else begin[axis], None if end_mask[axis] else end[axis], stride[axis])
              for axis in range(rank)]
    if all(step > 0 for step in stride):
        x = x[tuple(slices)]
    else:
        for axis, axis_slice in enumerate(slices):
            x = x.index_select(axis, torch.tensor(range(x.shape[axis])[axis_slice], dtype=torch.long))
    squeezed = [axis for axis in range(rank) if squeeze_mask[axis]]
    return x.squeeze(tuple(squeezed)) if squeezed else x


def _slice_by_size(args: _Arguments) -> torch.Tensor:
    x = args.tensor("x")
    for axis, (start, size) in enumerate(zip(args.ints("begin"), args.ints("size"))):
        start = start + x.shape[axis] if start < 0 else start
        x = x.narrow(axis, start, x.shape[axis] - start if size == -1 else size)
    return x


def _gather(args: _Arguments) -> torch.Tensor:
    if args.int("batch_dims", 0) != 0:
        raise UnsupportedProgramError("gather with batch_dims is not supported")
    x = args.tensor("x")
    indices = args.raw("indices")
    axis = args.int("axis", 0)
    taken = np.take(x.numpy(), indices.long().numpy(), axis=axis)
    return torch.from_numpy(np.ascontiguousarray(taken))


def _matmul(args: _Arguments) -> torch.Tensor:
    x, y = args.tensor("x"), args.tensor("y")
    if args.bool("transpose_x", False):
        x = x.transpose(-1, -2)
    if args.bool("transpose_y", False):
        y = y.transpose(-1, -2)
    return x @ y


def _linear(args: _Arguments) -> torch.Tensor:
    return F.linear(args.tensor("x"), args.tensor("weight"), args.tensor("bias") if args.has("bias") else None)


def _classify(args: _Arguments) -> tuple[str, dict[str, float]]:
    probabilities = args.tensor("probabilities").reshape(-1)
    classes = [str(name) for name in args.raw("classes")]
    if len(classes) != probabilities.numel():
        raise ExportVerificationError(f"classify has {len(classes)} class names for {probabilities.numel()} "
                                      "probabilities")
    return classes[int(probabilities.argmax())], dict(zip(classes, probabilities.tolist()))


_KERNELS: dict[str, Callable[[_Arguments], Any]] = {
    "conv": _conv,
    "batch_norm": _batch_norm,
    "max_pool": lambda a: _pool(a, average=False),
    "avg_pool": lambda a: _pool(a, average=True),
    "reduce_mean": _reduce_mean,
    "linear": _linear,
    "matmul": _matmul,
    "relu": lambda a: torch.relu(a.tensor("x")),
    "sigmoid": lambda a: torch.sigmoid(a.tensor("x")),
    "softmax": lambda a: torch.softmax(a.tensor("x"), dim=a.int("axis", -1)),
    "add": lambda a: a.tensor("x") + a.tensor("y"),
    "sub": lambda a: a.tensor("x") - a.tensor("y"),
    "mul": lambda a: a.tensor("x") * a.tensor("y"),
    "real_div": lambda a: a.tensor("x") / a.tensor("y"),
    # The declared output dtype does the conversion (see MLProgram._conform).
    "cast": lambda a: a.tensor("x"),
    "identity": lambda a: a.tensor("x"),
    "reshape": _reshape,
    "expand_dims": _expand_dims,
    "squeeze": _squeeze,
    "transpose": lambda a: a.tensor("x").permute(a.ints("perm")),
    "concat": _concat,
    "slice_by_index": _slice_by_index,
    "slice_by_size": _slice_by_size,
    "gather": _gather,
    "classify": _classify,
}

SUPPORTED_OPERATIONS = ("const",) + tuple(sorted(_KERNELS))

