"""Checking a saved Core ML package against PyTorch, on any platform.

On macOS Core ML predicts. Elsewhere (Core ML prediction needs macOS) the package is read with coremltools' MIL loader
and evaluated in torch as the runtime would: values stored in their declared dtypes, every operation in fp32."""
from __future__ import annotations

import math
import platform
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common.errors import library_notices_quieted
from common.input_format import InputFormat
from common.verification import (ExportVerificationError, VerificationReport, judge, make_test_images,
                                 reference_logits, top1_lead)

SELECTION_POOL = 4


class UnsupportedProgramError(ExportVerificationError):
    """A Core ML package with operations or types the Linux evaluator does not implement."""


def import_coremltools():
    """coremltools, imported without its notices about itself and the libraries it imports. Its bare `except:`
    around optional imports would swallow a Ctrl-C during the import: a Ctrl-C is held until the import is done."""
    previous = signal.getsignal(signal.SIGINT)  # None: a handler set outside Python, which cannot be put back
    held = (threading.current_thread() is threading.main_thread() and "coremltools" not in sys.modules
            and previous is not None)
    signals = []
    if held:
        signal.signal(signal.SIGINT, lambda signum, frame: signals.append(signum))
    try:
        with library_notices_quieted():
            import coremltools
    finally:
        if held:
            signal.signal(signal.SIGINT, previous)
    if signals:
        signal.raise_signal(signal.SIGINT)
    return coremltools


def verify_coreml(package_path: str | Path, model: nn.Module, input_format: InputFormat, *,
                  images: np.ndarray | None = None, num_images: int = 4,
                  min_agreement: float | None = None) -> VerificationReport:
    """Check a saved .mlpackage against `model` on `images` (RGB uint8 N x H x W x 3) or `num_images` synthetic ones
    (uncompressed: those with the clearest top-1 of four times as many); raise ExportVerificationError if it differs.
    A compressed package must agree on the top-1 of `min_agreement` of them (default: all)."""
    package_path = Path(package_path)
    program = MLProgram(package_path)
    chosen = images is not None
    if not chosen:
        images = make_test_images(num_images if program.compression else SELECTION_POOL * num_images,
                                  program.image_size)
    elif images.shape[1:] != (program.image_size, program.image_size, 3):
        raise ValueError(f"test images must be N x {program.image_size} x {program.image_size} x 3 RGB, "
                         f"not {images.shape}")
    reference = reference_logits(model, input_format, images)
    if not program.compression and not chosen:  # a near-tie says nothing about the conversion
        clearest = np.sort(np.argsort(top1_lead(reference))[-num_images:])
        images, reference = images[clearest], reference[clearest]
    if platform.system() == "Darwin":
        candidate, labels = _predict_with_coreml(package_path, program, images)
        reference = torch.log_softmax(torch.from_numpy(reference).double(), dim=1).numpy()
        # A probability that underflowed to 0 has no logarithm to compare; the label check still covers it.
        candidate = np.where(np.isfinite(candidate), candidate, reference)
        method = "Core ML prediction (log-probabilities)"
    else:
        candidate, labels = program.predict(images)
        method = "the ML program evaluated in torch"
    index = {name: i for i, name in enumerate(program.class_names)}
    return judge(reference, candidate, [index[label] for label in labels],
                 precision=program.compression or program.precision, target=package_path.name, method=method,
                 min_agreement=min_agreement if program.compression else None)


def _predict_with_coreml(package_path: Path, program: MLProgram, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Log-probabilities and labels from Core ML; probabilities that underflowed to 0 give -inf."""
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
        with np.errstate(divide="ignore"):
            rows.append(np.log([probabilities[name] for name in program.class_names]))
        labels.append(result[description.predictedFeatureName])
    return np.stack(rows), labels


# -- the ML program evaluator ------------------------------------------------------------------------------------

_TORCH_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64, "bool": torch.bool,
                 "int4": torch.int8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
                 "int64": torch.int64, "uint8": torch.uint8, "uint16": torch.int64, "uint32": torch.int64,
                 **dict.fromkeys(("uint1", "uint2", "uint3", "uint4", "uint6"), torch.uint8)}


class MLProgram:
    """The ML program of a saved .mlpackage, read with coremltools' MIL loader (no Core ML runtime) and run in torch."""

    def __init__(self, package_path: str | Path) -> None:
        ct = import_coremltools()
        from coremltools.converters.mil.frontend.milproto.load import load
        from coremltools.converters.mil.mil import types

        self._types = types
        path = Path(package_path)
        if not (path / "Manifest.json").is_file():
            raise ExportVerificationError(f"{path} is not a Core ML package (no Manifest.json)")
        mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
        spec = mlmodel.get_spec()
        if spec.WhichOneof("Type") != "mlProgram":
            raise UnsupportedProgramError(f"{path.name} is a {spec.WhichOneof('Type')} model, not an ML program")
        try:
            function = load(spec, spec.specificationVersion, mlmodel.weights_dir).functions["main"]
        except (ValueError, KeyError, NotImplementedError, RuntimeError) as error:
            raise ExportVerificationError(f"{path.name}: coremltools cannot read its ML program ({error})") from None
        self.operations = list(function.operations)
        self.operation_counts = dict(Counter(op.op_type for op in self.operations))
        unknown = sorted({op.op_type for op in self.operations
                          if op.blocks or op.op_type not in _KERNELS and op.op_type not in _CONSTANTS})
        if unknown:
            raise UnsupportedProgramError(
                f"{path.name} uses operations the Linux verifier does not evaluate: {', '.join(unknown)}; "
                "verify it on macOS, or export with --no-verify at your own risk")
        # coremltools rebuilds compressed weights (palettes, int8) from the stored values, as the runtime does.
        self._constants = {op.outputs[0].name: self._constant(op.outputs[0], op) for op in self.operations
                           if op.op_type in _CONSTANTS}

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
        self.precision = "fp16" if any(self._type_name(output) == "fp16"
                                       for op in self.operations for output in op.outputs) else "fp32"
        self.compression = spec.description.metadata.userDefined.get("compression") or None
        self._classify, self._logits_name = self._find_classifier(path.name)
        self.class_names = [str(name) for name in self._classify.inputs["classes"].val]

    def _type_name(self, var: Any) -> str | None:
        if not self._types.is_tensor(var.sym_type) and not self._types.is_scalar(var.sym_type):
            return None
        return self._types.builtin_to_string(var.dtype)

    def _constant(self, var: Any, op: Any) -> Any:
        """A constant's value: a torch tensor in its stored dtype (sub-byte integers widened), a str, or a list."""
        value = var.val if op.op_type == "const" else op.materialized_val_inference()
        if isinstance(value, (str, list, tuple)):
            return value
        type_name = self._type_name(var)
        if type_name not in _TORCH_DTYPES:
            raise UnsupportedProgramError(f"constants of type {type_name} are not supported ({var.name!r})")
        return _from_numpy(np.asarray(value)).to(_TORCH_DTYPES[type_name])

    def _find_classifier(self, name: str) -> tuple[Any, str]:
        """The classify op, and the name of the logits: the input of the softmax that feeds it (through casts)."""
        classify = [op for op in self.operations if op.op_type == "classify"]
        if len(classify) != 1:
            raise UnsupportedProgramError(f"{name} has {len(classify)} classify operations; expected one")
        producer = classify[0].inputs["probabilities"].op
        while producer is not None and producer.op_type == "cast":
            producer = producer.inputs["x"].op
        if producer is None or producer.op_type != "softmax":
            raise UnsupportedProgramError(f"{name}: the classifier's probabilities do not come from a softmax, "
                                          "so there are no logits to compare")
        return classify[0], producer.inputs["x"].name

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Logits (the classifier's softmax input, as fp32) and predicted labels for RGB uint8 images N x H x W x 3."""
        logits, labels = [], []
        label_name = self._classify.outputs[0].name
        for image in images:
            # Core ML feeds the image as 1 x 3 x H x W float in the declared channel order; the program scales it.
            pixels = _from_numpy(image[..., ::-1] if self.color_space == "BGR" else image).permute(2, 0, 1).float()
            values = self.run({self.input_name: pixels.unsqueeze(0)})
            logits.append(values[self._logits_name].float().reshape(-1).numpy())
            labels.append(values[label_name])
        return np.stack(logits), labels

    @torch.no_grad()
    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Every named value of the program for these inputs, evaluating the operations in order."""
        values: dict[str, Any] = {**feeds, **self._constants}
        for op in self.operations:
            if op.op_type in _CONSTANTS:
                continue
            arguments = _Arguments(op.op_type, {key: _input(values, var) for key, var in op.inputs.items()})
            try:
                results = _KERNELS[op.op_type](arguments)
            except Exception as error:
                error.add_note(f"while evaluating the ML program's {op.op_type} {op.outputs[0].name!r}")
                raise
            for output, result in zip(op.outputs, results if isinstance(results, tuple) else (results,), strict=True):
                values[output.name] = self._conform(op, output, result)
        return values

    def _conform(self, op: Any, output: Any, result: Any) -> Any:
        """A result checked against its declared shape and rounded to its declared dtype (fp16 kept in fp32)."""
        type_name = self._type_name(output)
        if type_name is None or not isinstance(result, torch.Tensor):
            return result
        declared = [d if isinstance(d, int) else None for d in output.shape]
        if len(declared) != result.dim() or any(d is not None and d != s for d, s in zip(declared, result.shape)):
            raise ExportVerificationError(f"{op.op_type} {output.name!r}: evaluated shape {tuple(result.shape)}, "
                                          f"declared {tuple(declared)}")
        if type_name not in _TORCH_DTYPES:
            raise UnsupportedProgramError(f"tensors of type {type_name} are not supported")
        return _compute(result.to(_TORCH_DTYPES[type_name]))


_REQUIRED = object()


class _Arguments(dict):
    """An operation's inputs by name; a missing one without a default is an error."""

    def __init__(self, op_type: str, values: dict[str, Any]) -> None:
        super().__init__(values)
        self.op_type = op_type

    def __missing__(self, name: str) -> Any:
        raise ExportVerificationError(f"{self.op_type} is missing its input {name!r}")

    def ints(self, name: str, default: Any = _REQUIRED) -> list[int] | None:
        value = self[name] if default is _REQUIRED else self.get(name, default)
        return value if value is None or isinstance(value, list) else [int(v) for v in value.reshape(-1).tolist()]


def _input(values: dict[str, Any], var: Any) -> Any:
    """An operation's input from the values so far (a list for a tuple of them), as it computes: fp16 in fp32."""
    if isinstance(var, (list, tuple)):
        return [_input(values, v) for v in var]
    return _compute(values[var.name])


def _compute(value: Any) -> Any:
    return value.float() if isinstance(value, torch.Tensor) and value.dtype == torch.float16 else value


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def _padding(args: _Arguments, x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int],
             dilations: Sequence[int]) -> list[int]:
    """F.pad's padding (last axis first, begin then end) for pad_type valid, custom, same or same_lower."""
    pad_type = str(args.get("pad_type", "valid"))
    if pad_type in ("valid", "custom"):
        pads = args.ints("pad") if pad_type == "custom" else [0] * (2 * len(kernel))
        pairs = [pads[i:i + 2] for i in range(0, len(pads), 2)]
    elif pad_type in ("same", "same_lower"):
        pairs = []
        for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            begin = total // 2 if pad_type == "same" else total - total // 2
            pairs.append([begin, total - begin])
    else:
        raise UnsupportedProgramError(f"{args.op_type} pad_type {pad_type!r} is not supported")
    return [p for pair in reversed(pairs) for p in pair]


def _conv(args: _Arguments) -> torch.Tensor:
    x, weight = args["x"], args["weight"]
    if x.dim() != 4:
        raise UnsupportedProgramError(f"conv on rank-{x.dim()} tensors is not supported (2-D convolutions only)")
    strides, dilations = args.ints("strides", [1, 1]), args.ints("dilations", [1, 1])
    pads = _padding(args, x, weight.shape[2:], strides, dilations)
    padding = pads[::2][::-1]
    if pads[1::2] != pads[::2]:
        x, padding = F.pad(x, pads), 0
    return F.conv2d(x, weight, args.get("bias"), strides, padding, dilations, int(args.get("groups", 1)))


def _pool(args: _Arguments, average: bool) -> torch.Tensor:
    x = args["x"]
    if x.dim() != 4:
        raise UnsupportedProgramError(f"{args.op_type} on rank-{x.dim()} tensors is not supported")
    kernel, strides = args.ints("kernel_sizes"), args.ints("strides", [1, 1])
    pads = _padding(args, x, kernel, strides, [1, 1])
    ceil_mode = bool(args.get("ceil_mode", False))
    if not average:
        return F.max_pool2d(F.pad(x, pads, value=-math.inf), kernel, strides, ceil_mode=ceil_mode)
    sums = F.avg_pool2d(F.pad(x, pads), kernel, strides, ceil_mode=ceil_mode, divisor_override=1)
    if args.get("exclude_padding_from_average", False):
        ones = torch.ones_like(x[:1, :1])
        return sums / F.avg_pool2d(F.pad(ones, pads), kernel, strides, ceil_mode=ceil_mode, divisor_override=1)
    return sums / math.prod(kernel)


def _concat(args: _Arguments) -> torch.Tensor:
    values = args["values"]
    axis = int(args["axis"]) % values[0].dim()
    if args.get("interleave", False):
        return torch.stack(values, dim=axis + 1).flatten(axis, axis + 1)
    return torch.cat(values, dim=axis)


def _slice_by_index(args: _Arguments) -> torch.Tensor:
    x = args["x"]
    rank = x.dim()
    begin, end, stride = args.ints("begin"), args.ints("end"), args.ints("stride", [1] * rank)
    begin_mask, end_mask, squeeze_mask = (args.ints(mask, [0] * rank) for mask in
                                          ("begin_mask", "end_mask", "squeeze_mask"))
    # numpy's slices give MIL's semantics: negative positions count from the end, masks mean "to the edge".
    index = tuple(slice(None if begin_mask[axis] else begin[axis], None if end_mask[axis] else end[axis],
                        stride[axis]) for axis in range(rank))
    return _from_numpy(x.numpy()[index]).squeeze(tuple(axis for axis in range(rank) if squeeze_mask[axis]))


def _slice_by_size(args: _Arguments) -> torch.Tensor:
    x = args["x"]
    for axis, (start, size) in enumerate(zip(args.ints("begin"), args.ints("size"))):
        start = start % x.shape[axis]
        x = x.narrow(axis, start, x.shape[axis] - start if size == -1 else size)
    return x


def _gather(args: _Arguments) -> torch.Tensor:
    if int(args.get("batch_dims", 0)) != 0:
        raise UnsupportedProgramError("gather with batch_dims is not supported")
    return _from_numpy(np.take(args["x"].numpy(), args["indices"].long().numpy(), axis=int(args.get("axis", 0))))


def _matmul(args: _Arguments) -> torch.Tensor:
    x, y = (args[n].transpose(-1, -2) if args.get(f"transpose_{n}", False) else args[n] for n in "xy")
    return x @ y


def _classify(args: _Arguments) -> tuple[str, dict[str, float]]:
    probabilities = args["probabilities"].reshape(-1)
    classes = [str(name) for name in args["classes"]]
    if len(classes) != probabilities.numel():
        raise ExportVerificationError(f"classify has {len(classes)} class names for {probabilities.numel()} "
                                      "probabilities")
    return classes[int(probabilities.argmax())], dict(zip(classes, probabilities.tolist()))


_KERNELS: dict[str, Callable[[_Arguments], Any]] = {
    "conv": _conv,
    "batch_norm": lambda a: F.batch_norm(a["x"], a["mean"], a["variance"], a.get("gamma"), a.get("beta"),
                                         eps=float(a.get("epsilon", 1e-5))),
    "max_pool": lambda a: _pool(a, average=False),
    "avg_pool": lambda a: _pool(a, average=True),
    "reduce_mean": lambda a: a["x"].mean(dim=a.ints("axes", None), keepdim=bool(a.get("keep_dims", False))),
    "linear": lambda a: F.linear(a["x"], a["weight"], a.get("bias")),
    "matmul": _matmul,
    "relu": lambda a: torch.relu(a["x"]),
    "sigmoid": lambda a: torch.sigmoid(a["x"]),
    "softmax": lambda a: torch.softmax(a["x"], dim=int(a.get("axis", -1))),
    "add": lambda a: a["x"] + a["y"],
    "sub": lambda a: a["x"] - a["y"],
    "mul": lambda a: a["x"] * a["y"],
    "real_div": lambda a: a["x"] / a["y"],
    # The declared output dtype does the conversion (see MLProgram._conform).
    "cast": lambda a: a["x"],
    "identity": lambda a: a["x"],
    "reshape": lambda a: a["x"].reshape([a["x"].shape[i] if size == 0 else size
                                         for i, size in enumerate(a.ints("shape"))]),
    "expand_dims": lambda a: _from_numpy(np.expand_dims(a["x"].numpy(), tuple(a.ints("axes")))),
    "squeeze": lambda a: a["x"].squeeze(tuple(a.ints("axes", list(range(a["x"].dim()))))),
    "transpose": lambda a: a["x"].permute(a.ints("perm")),
    "concat": _concat,
    "slice_by_index": _slice_by_index,
    "slice_by_size": _slice_by_size,
    "gather": _gather,
    "classify": _classify,
}
# Operations whose values are known before anything runs: constants and compressed weights.
_CONSTANTS = {"const", "constexpr_lut_to_dense", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"}
