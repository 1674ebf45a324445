"""Export to Core ML (.mlpackage, an ML program) or ONNX, each export verified against PyTorch before it is kept.

Core ML packages take a colour image (ct.ImageType) and have the model's input format built in: the image's
channel order, scale and per-channel mean go into the image input, a per-pixel mean image and a division by std
into the program. They output the class label and the probability of every class. ONNX files take float RGB
0..255 images N x 3 x H x W (the project's convention, see common.input_format) with a dynamic batch, and output
logits. Exports are of eval mode, so the training-only side heads `predict_*` are never part of them.

Each model folder's export.py calls `run_export`, the command line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from common.cli import check_image_size, prepare_output
from common.coreml_verify import (ExportVerificationError, VerificationReport, import_coremltools, judge,
                                  make_test_images, reference_logits, verify_coreml)
from common.checkpoint import file_sha256
from common.errors import UserError, exit_on_user_error
from common.input_format import InputFormat, Preprocess

__all__ = ["convert_pytorch_to_coreml", "export_onnx", "verify_coreml", "verify_onnx", "run_export",
           "imagenet_class_names", "ExportVerificationError", "VerificationReport", "DEPLOYMENT_TARGET"]

# The first releases with ML programs: iOS 15 / macOS 12 / watchOS 8 / tvOS 15.
DEPLOYMENT_TARGET = "iOS15"
MIN_IMAGE_SIZE = 32  # five stride-2 steps in every network


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in class-index order, from torchvision's metadata (nothing is downloaded)."""
    import torchvision

    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


class _CoreMLProgram(nn.Module):
    """What runs after the image input's channel order, scale and bias: mean image, std, network, softmax."""

    def __init__(self, network: nn.Module, mean_image: torch.Tensor | None, inv_std: torch.Tensor | None) -> None:
        super().__init__()
        self.network = network
        self.mean_image = mean_image
        self.inv_std = inv_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean_image is not None:
            x = x - self.mean_image
        if self.inv_std is not None:
            x = x * self.inv_std
        return torch.softmax(self.network(x), dim=1)


def _check_common(model: nn.Module, image_size: int, output: str | Path, suffix: str) -> Path:
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, not {image_size}")
    output = Path(output)
    if output.suffix != suffix:
        raise UserError(f"{output}: the output of this export must end in {suffix}")
    if model.training:
        raise ValueError("export a model in eval mode (model.eval()): training mode would run the side heads")
    return output


def _check_replaceable(output: Path, kind: str) -> None:
    """Refuse an output path that holds something other than an earlier export of the same kind."""
    earlier = output.is_dir() and (output / "Manifest.json").is_file() if kind == "coreml" else output.is_file()
    if output.exists() and not earlier:
        raise UserError(f"{output} exists and is not an earlier export; choose another --output")


def _replace_path(output: Path, kind: str) -> None:
    """Make room for a new export at `output`: an earlier export of the same kind is removed, anything else kept."""
    _check_replaceable(output, kind)
    if output.is_dir():
        shutil.rmtree(output)
    elif output.exists():
        output.unlink()


@torch.no_grad()
def _num_outputs(model: nn.Module, example: torch.Tensor) -> int:
    return int(model(example).shape[1])


def convert_pytorch_to_coreml(model: nn.Module, *, input_format: InputFormat, image_size: int = 224,
                              precision: str = "fp16", class_names: list[str] | None = None,
                              metadata: dict | None = None, output: str | Path) -> Path:
    """Convert an eval-mode classifier into a Core ML ML program (.mlpackage) and save it at `output`.

    The input is an image with `input_format` built in; the outputs are the class label and the probabilities of
    `class_names` (default: the 1000 ImageNet names). `metadata` entries "description", "author", "license" and
    "version" fill the model's fields of those names; all others are stored as user-defined strings.
    """
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be 'fp16' or 'fp32', not {precision!r}")
    output = _check_common(model, image_size, output, ".mlpackage")
    class_names = list(class_names) if class_names is not None else imagenet_class_names()
    if len(set(class_names)) != len(class_names):
        raise ValueError("class names must be unique: Core ML returns the probabilities as a dict keyed by name")
    example = torch.rand(1, 3, image_size, image_size) * 255
    num_outputs = _num_outputs(model, example)
    if num_outputs != len(class_names):
        raise ValueError(f"the model has {num_outputs} outputs but {len(class_names)} class names were given")
    preprocess = Preprocess(input_format)
    ct = import_coremltools()
    per_pixel = input_format.mean_image is not None
    uniform_std = all(s == 1.0 for s in input_format.std)
    program = _CoreMLProgram(
        model, preprocess.mean_at(image_size, image_size).clone() if per_pixel else None,
        None if uniform_std else preprocess.inv_std.clone()).eval()
    image = ct.ImageType(
        name="image", shape=(1, 3, image_size, image_size), scale=float(input_format.scale),
        bias=[0.0, 0.0, 0.0] if per_pixel else [-float(m) for m in input_format.mean],
        color_layout=ct.colorlayout.BGR if input_format.channel_order == "BGR" else ct.colorlayout.RGB)
    exported = torch.export.export(program, (example,)).run_decompositions({})
    mlmodel = ct.convert(
        exported, inputs=[image], classifier_config=ct.ClassifierConfig(class_names), convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET))

    fields = dict(metadata or {})
    mlmodel.short_description = str(fields.pop("description", "image classifier"))
    for name in ("author", "license", "version"):
        if name in fields:
            setattr(mlmodel, name, str(fields.pop(name)))
    fields.update(input_format=json.dumps(_portable_format(input_format)),
                  input_format_description=input_format.describe(), image_size=str(image_size),
                  precision=precision, minimum_deployment_target=f"{DEPLOYMENT_TARGET} (macOS12)",
                  num_classes=str(len(class_names)))
    for key, value in fields.items():
        mlmodel.user_defined_metadata[key] = str(value)
    mlmodel.input_description["image"] = (f"{image_size}x{image_size} colour image; converted inside to the "
                                          f"network's input format: {input_format.describe()}")
    description = mlmodel.get_spec().description
    mlmodel.output_description[description.predictedFeatureName] = "most likely class"
    mlmodel.output_description[description.predictedProbabilitiesName] = \
        f"probability of each of the {len(class_names)} classes"
    _replace_path(output, "coreml")
    mlmodel.save(str(output))
    return output


def _portable_format(input_format: InputFormat) -> dict:
    """The input format as a dict, with the mean image by file name (a local path means nothing elsewhere)."""
    values = input_format.to_dict()
    if values["mean_image"]:
        values["mean_image"] = Path(values["mean_image"]).name
    return values


def export_onnx(model: nn.Module, *, input_format: InputFormat, image_size: int = 224, output: str | Path,
                opset: int = 18, metadata: dict | None = None) -> Path:
    """Export an eval-mode network with its input format to ONNX: input `image` (float RGB 0..255, N x 3 x H x W,
    dynamic N), output `logits`. `metadata` goes into the file's metadata_props. The file passes onnx.checker.

    Opset 18 is the lowest that torch's exporter implements; a lower request would be converted down and may fail.
    """
    import onnx

    if opset < 17:
        raise ValueError(f"opset must be 17 or later, not {opset}")
    output = _check_common(model, image_size, output, ".onnx")
    _replace_path(output, "onnx")
    graph = nn.Sequential(Preprocess(input_format), model).eval()
    # Batch 2 in the example: torch.export specialises a dimension of size 1.
    example = torch.rand(2, 3, image_size, image_size) * 255
    torch.onnx.export(graph, (example,), str(output), input_names=["image"], output_names=["logits"],
                      opset_version=opset, dynamo=True, external_data=False, verbose=False,
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    proto = onnx.load(str(output))
    written = max(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    if written != opset:
        output.unlink()
        raise ValueError(f"asked for ONNX opset {opset}, but the exporter could only write opset {written}")
    proto.doc_string = "input image: float32 N x 3 x H x W, RGB, 0..255; output logits: N x classes"
    entries = dict(metadata or {})
    entries.update(input_format=json.dumps(_portable_format(input_format)),
                   input_format_description=f"the model takes RGB 0..255 and converts it to the network's "
                                            f"input format inside: {input_format.describe()}",
                   image_size=str(image_size))
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=str(value))
    onnx.save(proto, str(output))
    onnx.checker.check_model(str(output), full_check=True)
    return output


def verify_onnx(onnx_path: str | Path, model: nn.Module, input_format: InputFormat, *,
                images: np.ndarray | None = None, num_images: int = 4, seed: int = 0) -> VerificationReport:
    """Check an ONNX file with onnx.checker and onnxruntime against `model`, at batch 1 and at batch N.

    The file must have opset 17 or later and a dynamic batch; its logits must match PyTorch's within 1e-4 of
    their range. Raises ExportVerificationError otherwise.
    """
    import onnx
    import onnxruntime

    onnx_path = Path(onnx_path)
    try:
        onnx.checker.check_model(str(onnx_path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportVerificationError(f"{onnx_path.name} fails onnx.checker: {error}") from None
    proto = onnx.load(str(onnx_path), load_external_data=False)
    opset = max(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    if opset < 17:
        raise ExportVerificationError(f"{onnx_path.name} uses opset {opset}; 17 or later is required")
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (image_input,) = session.get_inputs()
    batch, _, height, width = image_input.shape
    if isinstance(batch, int):
        raise ExportVerificationError(f"{onnx_path.name} has a fixed batch size {batch}, not a dynamic one")
    if images is None:
        images = make_test_images(max(num_images, 2), int(height), seed)
    batch_input = images.transpose(0, 3, 1, 2).astype(np.float32)
    logits = session.run(None, {image_input.name: batch_input})[0]
    single = session.run(None, {image_input.name: batch_input[:1]})[0]
    reference = reference_logits(model, input_format, images)
    operations = dict(sorted(Counter(node.op_type for node in proto.graph.node).items()))
    report = judge(reference, logits, logits.argmax(axis=1), precision="fp32",
                   target=f"{onnx_path.name} (batch {len(images)})", method="onnxruntime", operations=operations)
    judge(reference[:1], single, single.argmax(axis=1), precision="fp32", target=f"{onnx_path.name} (batch 1)",
          method="onnxruntime")
    return report


def _size_of(path: Path) -> int:
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size


def _three_floats(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers such as 103.06,115.90,123.15, not {text!r}")
    return values


def _parser(model_name: str, default_format: InputFormat) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=f"Export {model_name} to Core ML or ONNX and verify the export against PyTorch.")
    parser.add_argument("--weights", required=True, metavar="FILE",
                        help="weights to export: a released .pkl/.pth, a .safetensors or a checkpoint of this project")
    parser.add_argument("--format", choices=("coreml", "onnx"), default="coreml",
                        help="coreml: an .mlpackage ML program with an image input (default); onnx: an .onnx file")
    parser.add_argument("--output", metavar="PATH",
                        help=f"where to write (default: next to the weights, {model_name}-<precision>.mlpackage "
                             "or .onnx)")
    parser.add_argument("--precision", choices=("fp16", "fp32"),
                        help="Core ML compute precision (default fp16); ONNX exports are fp32")
    parser.add_argument("--image-size", type=int, metavar="N",
                        help="input image size N x N (default: the checkpoint's, else 224)")
    parser.add_argument("--mean-image", metavar="FILE",
                        help="subtract this OpenCV XML per-pixel mean image (BGR) instead of a per-channel mean")
    parser.add_argument("--channel-order", choices=("BGR", "RGB"),
                        help=f"channel order the network expects (default {default_format.channel_order})")
    parser.add_argument("--mean", type=_three_floats, metavar="M1,M2,M3",
                        help="per-channel mean to subtract, in the network's channel order "
                             f"(default {','.join(f'{m:g}' for m in default_format.mean)})")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the comparison of the export with PyTorch (on by default)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow weights files that run code when loaded; only for files you made yourself")
    parser.add_argument("--num-verify-images", type=int, default=4, metavar="N",
                        help="number of test images the verification compares (default 4)")
    return parser


@exit_on_user_error
def run_export(network_module: ModuleType, argv: list[str] | None = None) -> int:
    """The export command line of a model folder: load weights, export, verify, print time and size."""
    from common.model_state import load_model_state, read_checkpoint_metadata
    from common.models import create_network_for

    model_name = Path(network_module.__file__).resolve().parent.name
    args = _parser(model_name, network_module.INPUT_FORMAT).parse_args(argv)
    check_image_size(args.image_size)
    if args.num_verify_images < 1:
        raise UserError("--num-verify-images must be at least 1")
    precision = args.precision or ("fp16" if args.format == "coreml" else "fp32")
    if args.format == "onnx" and precision != "fp32":
        raise UserError("ONNX exports are fp32; leave out --precision or pass --precision fp32")
    if args.mean is not None and args.mean_image is not None:
        raise UserError("give either --mean or --mean-image, not both")
    weights = Path(args.weights)
    stored = read_checkpoint_metadata(weights)
    imagenet = not stored.get("classes")
    class_names = imagenet_class_names() if imagenet else list(stored["classes"])
    input_format = (InputFormat.from_dict(stored["input_format"]) if stored.get("input_format")
                    else network_module.INPUT_FORMAT)
    input_format = input_format.replace(channel_order=args.channel_order, mean=args.mean,
                                        mean_image=args.mean_image)
    Preprocess(input_format)  # reads a mean image now, so a bad file fails before the long conversion
    image_size = args.image_size or int(stored.get("image_size", 224))
    if image_size < MIN_IMAGE_SIZE:
        raise UserError(f"--image-size must be at least {MIN_IMAGE_SIZE}")
    suffix = ".mlpackage" if args.format == "coreml" else ".onnx"
    output = Path(args.output) if args.output else weights.parent / f"{model_name}-{precision}{suffix}"
    if output.suffix != suffix:
        raise UserError(f"--output {output} must end in {suffix} for --format {args.format}")
    _check_replaceable(output, args.format)
    prepare_output("--output", output)

    model = create_network_for(network_module, len(class_names), stored)
    load_model_state(model, weights, for_inference=True, trust_pickle=args.trust_pickle)
    model.eval()
    metadata = {"model": model_name, "source_weights": weights.name, "source_weights_sha256": file_sha256(weights),
                "description": f"{model_name} image classifier (ShuffleNet-Series), {image_size}x{image_size} "
                               f"input, {len(class_names)} classes"}
    if imagenet and not stored.get("architecture"):
        published = network_module.PUBLISHED
        metadata["published_imagenet_top1_error"] = f"{published['top1_error']}%"
        metadata["published_imagenet_top5_error"] = f"{published['top5_error']}%"

    # Written into a hidden folder beside the output and moved into place only once verified, so a failed export
    # leaves nothing behind and the verification reports the final file name.
    staging_dir = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging_dir, ignore_errors=True)
    staging_dir.mkdir(parents=True)
    staging = staging_dir / output.name
    print(f"{model_name}: exporting {weights.name} to {args.format} ({precision}, {image_size}x{image_size}, "
          f"input {input_format.describe()})", flush=True)
    started = time.perf_counter()
    try:
        if args.format == "coreml":
            convert_pytorch_to_coreml(model, input_format=input_format, image_size=image_size, precision=precision,
                                      class_names=class_names, metadata=metadata, output=staging)
        else:
            metadata["class_names"] = json.dumps(class_names)
            export_onnx(model, input_format=input_format, image_size=image_size, output=staging,
                        metadata=metadata)
        export_seconds = time.perf_counter() - started
        print(f"exported in {export_seconds:.1f} s, {_size_of(staging) / 1e6:.1f} MB", flush=True)
        if not args.no_verify:
            started = time.perf_counter()
            verify = verify_coreml if args.format == "coreml" else verify_onnx
            report = verify(staging, model, input_format, num_images=args.num_verify_images)
            print(f"{report.summary()}; took {time.perf_counter() - started:.1f} s", flush=True)
        _replace_path(output, args.format)
        staging.rename(output)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    if args.no_verify:
        print("not verified (--no-verify)", file=sys.stderr)
    print(f"wrote {output} ({_size_of(output) / 1e6:.1f} MB)")
    return 0
