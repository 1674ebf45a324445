"""Export to Core ML (an .mlpackage ML program), ONNX or ExecuTorch (.pte), each verified against PyTorch before it
is kept; Core ML weights optionally compressed (palettes, int8), ONNX and ExecuTorch optionally int8. The input format
is built in: Core ML takes a colour image and outputs label and probabilities; ONNX (dynamic batch) and ExecuTorch
(batch 1) take float RGB 0..255 N x 3 x H x W and output logits. Each folder's export.py calls `run_export`."""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from common.cli import (ArgumentParser, add_weights_arguments, fraction, multiple_of_32, positive_int, prepare_output,
                        prepare_outputs, run_script)
from common.coreml_verify import MLProgram, import_coremltools, verify_coreml
from common.atomic_io import atomic_write_text, claim_output, failures_named, file_sha256
from common.errors import UserError, exit_on_user_error
from common.imagenet import imagenet_short_names
from common.input_format import InputFormat, Preprocess, add_input_format_arguments, input_format_from_args
from common.quantize import DEFAULT_CALIBRATION_IMAGES
from common.verification import (DEFAULT_MIN_AGREEMENT, as_batch, make_test_images, mean_kl_divergence,
                                 reference_logits, verify_onnx)

# Each deployment target and its macOS release; the first is the default, the first releases with ML programs (with
# watchOS 8 / tvOS 15).
DEPLOYMENT_TARGETS = {"iOS15": "macOS12", "iOS16": "macOS13", "iOS17": "macOS14", "iOS18": "macOS15"}
# Each Core ML weight compression: the first deployment target whose ML programs hold it, the operation that
# rebuilds the weights there, and what it stores. Palettes and int8 weights need iOS16's constexpr ops; one
# palette per group of channels needs iOS18's (plain 4-bit palettes lose too much: Apple's ResNet-50 figures).
COMPRESSIONS = {
    "palettize8": ("iOS16", "constexpr_lut_to_dense", "8-bit palettes (k-means), one per weight tensor"),
    "palettize6": ("iOS16", "constexpr_lut_to_dense", "6-bit palettes (k-means), one per weight tensor"),
    "palettize4": ("iOS18", "constexpr_lut_to_dense", "4-bit palettes (k-means), one per group of 8 output channels"),
    "int8": ("iOS16", "constexpr_affine_dequantize", "int8 weights, linear symmetric, one scale per output channel"),
}
PALETTE_GROUP_SIZE = 8  # divides every layer's output channels and 1000 classes
MIN_IMAGE_SIZE = 32  # five stride-2 steps in every network
SUFFIXES = {"coreml": ".mlpackage", "onnx": ".onnx", "executorch": ".pte"}


class _CoreMLProgram(nn.Module):
    """What follows the image input's channel order, scale and bias: mean image, std, network, softmax."""

    def __init__(self, network: nn.Module, mean_image: torch.Tensor, inv_std: torch.Tensor) -> None:
        super().__init__()
        self.network, self.mean_image, self.inv_std = network, mean_image, inv_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network((x - self.mean_image) * self.inv_std), dim=1)


def _check_export(model: nn.Module, image_size: int, output: str | Path, kind: str) -> Path:
    """`output` as a Path, once the export can be written there (the writers replace an earlier export)."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, not {image_size}")
    output = Path(output)
    if output.suffix != SUFFIXES[kind]:
        raise UserError(f"{output}: the output of this export must end in {SUFFIXES[kind]}")
    if model.training:
        raise ValueError("export a model in eval mode (model.eval()): training mode would run the side heads")
    _check_replaceable(output, kind)
    return output


def _check_replaceable(output: Path, kind: str) -> None:
    """Refuse an output path that holds something other than an earlier export of the same kind."""
    earlier = (output / "Manifest.json").is_file() if kind == "coreml" else output.is_file()
    if output.exists() and not earlier:
        raise UserError(f"{output} exists and is not an earlier export; choose another --output")


def convert_pytorch_to_coreml(model: nn.Module, *, input_format: InputFormat, image_size: int = 224,
                              precision: str = "fp16", class_names: list[str] | None = None,
                              metadata: dict | None = None, output: str | Path, compression: str | None = None,
                              deployment_target: str | None = None) -> Path:
    """Convert an eval-mode classifier into an ML program at `output`: an image input with `input_format` built in,
    the label and probabilities of `class_names` (default: ImageNet's) out; `metadata` description, author, license
    and version fill those fields, the rest are user-defined. `compression`: a key of COMPRESSIONS."""
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be 'fp16' or 'fp32', not {precision!r}")
    target = check_deployment_target(compression, deployment_target)
    output = _check_export(model, image_size, output, "coreml")
    class_names = list(class_names) if class_names is not None else imagenet_short_names()
    if len(set(class_names)) != len(class_names):
        raise ValueError("class names must be unique: Core ML returns the probabilities as a dict keyed by name")
    example = torch.rand(1, 3, image_size, image_size) * 255
    with torch.no_grad():
        num_outputs = int(model(example).shape[1])
    if num_outputs != len(class_names):
        raise ValueError(f"the model has {num_outputs} outputs but {len(class_names)} class names were given")
    preprocess = Preprocess(input_format)
    ct = import_coremltools()
    per_pixel = input_format.mean_image is not None  # else a zero mean: a no-op that coremltools removes
    program = _CoreMLProgram(model, preprocess.mean_at(image_size, image_size).clone() if per_pixel
                             else torch.zeros(1, 3, 1, 1), preprocess.inv_std.clone()).eval()
    image = ct.ImageType(
        name="image", shape=(1, 3, image_size, image_size), scale=float(input_format.scale),
        bias=[0.0, 0.0, 0.0] if per_pixel else [-float(m) for m in input_format.mean],
        color_layout=ct.colorlayout.BGR if input_format.channel_order == "BGR" else ct.colorlayout.RGB)
    exported = torch.export.export(program, (example,)).run_decompositions({})
    mlmodel = ct.convert(
        exported, inputs=[image], classifier_config=ct.ClassifierConfig(class_names), convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        minimum_deployment_target=getattr(ct.target, target))
    if compression:
        mlmodel = compress_coreml(mlmodel, compression)

    _describe_package(mlmodel, metadata, input_format, image_size, precision, len(class_names), compression, target)
    mlmodel.save(str(output))
    return output


def _describe_package(mlmodel, metadata: dict | None, input_format: InputFormat, image_size: int, precision: str,
                      num_classes: int, compression: str | None, target: str) -> None:
    """Fill the package's description fields and user-defined metadata (see convert_pytorch_to_coreml)."""
    fields = dict(metadata or {})
    description = str(fields.pop("description", "image classifier"))
    if compression:
        stored = COMPRESSIONS[compression][2]
        description += f"; weights compressed: {stored}"
        fields.update(compression=compression, compression_description=stored)
    mlmodel.short_description = f"{description}; needs {target} / {DEPLOYMENT_TARGETS[target]} or later"
    for name in ("author", "license", "version"):
        if name in fields:
            setattr(mlmodel, name, str(fields.pop(name)))
    fields.update(input_format=json.dumps(_portable_format(input_format)),
                  input_format_description=input_format.describe(), image_size=str(image_size),
                  precision=precision, minimum_deployment_target=f"{target} ({DEPLOYMENT_TARGETS[target]})",
                  num_classes=str(num_classes))
    for key, value in fields.items():
        mlmodel.user_defined_metadata[key] = str(value)
    mlmodel.input_description["image"] = (f"{image_size}x{image_size} colour image; converted inside to the "
                                          f"network's input format: {input_format.describe()}")
    description = mlmodel.get_spec().description
    mlmodel.output_description[description.predictedFeatureName] = "most likely class"
    mlmodel.output_description[description.predictedProbabilitiesName] = \
        f"probability of each of the {num_classes} classes"


def check_deployment_target(compression: str | None, deployment_target: str | None) -> str:
    """The deployment target to convert for: the given one, or the first that holds `compression`; a one-line
    error when the given one cannot hold it."""
    if compression is not None and compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, not {compression!r}")
    order = list(DEPLOYMENT_TARGETS)
    needed, operation, _ = COMPRESSIONS[compression] if compression else (order[0], "", "")
    target = deployment_target or needed
    if target not in DEPLOYMENT_TARGETS:
        raise UserError(f"--deployment-target {target}: choose one of {', '.join(DEPLOYMENT_TARGETS)}")
    if order.index(target) < order.index(needed):
        raise UserError(f"--compress {compression} needs --deployment-target {needed} or later ({operation}); "
                        f"{target} cannot hold it")
    return target


def compress_coreml(mlmodel, compression: str):
    """The ML program `mlmodel` with its weights compressed as COMPRESSIONS[compression] describes."""
    import_coremltools()
    from coremltools.optimize import coreml as cto

    if compression == "int8":
        config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=config))
    bits = int(compression.removeprefix("palettize"))
    grouped = dict(granularity="per_grouped_channel", group_size=PALETTE_GROUP_SIZE) if bits == 4 else {}
    config = cto.OpPalettizerConfig(nbits=bits, mode="kmeans", **grouped)
    return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=config))


def _portable_format(input_format: InputFormat) -> dict:
    """The input format as a dict, with the mean image by file name (a local path means nothing elsewhere)."""
    values = input_format.to_dict()
    if values["mean_image"]:
        values["mean_image"] = Path(values["mean_image"]).name
    return values


def export_onnx(model: nn.Module, *, input_format: InputFormat, image_size: int = 224, output: str | Path,
                metadata: dict | None = None) -> Path:
    """Export an eval-mode network with its input format to ONNX opset 18, the lowest torch's exporter writes (input
    `image`: float RGB 0..255, N x 3 x H x W, dynamic N; output `logits`; `metadata` in metadata_props), checked by
    onnx.checker."""
    import onnx

    output = _check_export(model, image_size, output, "onnx")
    graph = nn.Sequential(Preprocess(input_format), model).eval()
    # Batch 2 in the example: torch.export specialises a dimension of size 1.
    example = torch.rand(2, 3, image_size, image_size) * 255
    torch.onnx.export(graph, (example,), str(output), input_names=["image"], output_names=["logits"],
                      opset_version=18, dynamo=True, external_data=False, verbose=False,
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    proto = onnx.load(str(output))
    proto.doc_string = "input image: float32 N x 3 x H x W, RGB, 0..255; output logits: N x classes"
    onnx.helper.set_model_props(proto, model_properties(input_format, image_size, metadata))
    onnx.save(proto, str(output))
    onnx.checker.check_model(str(output), full_check=True)
    return output


def model_properties(input_format: InputFormat, image_size: int, metadata: dict | None) -> dict[str, str]:
    """What an ONNX or ExecuTorch file says about itself (`metadata`, the input format, the image size), as strings:
    ONNX's metadata_props, ExecuTorch's constant methods."""
    return {**{key: str(value) for key, value in (metadata or {}).items()},
            "input_format": json.dumps(_portable_format(input_format)),
            "input_format_description": "the model takes RGB 0..255 and converts it to the network's input format "
                                        f"inside: {input_format.describe()}",
            "image_size": str(image_size)}


def _size_of(path: Path) -> int:
    return sum(item.stat().st_size for item in [path, *path.rglob("*")] if item.is_file())


DEFAULT_VERIFY_IMAGES = 4  # exact exports: each image is a full check
DEFAULT_VERIFY_IMAGES_COMPRESSED = 16  # compressed exports: agreement is a fraction, so more images
DEFAULT_VAL_IMAGES = 256
# Every format --sweep measures: (name in the table, export.py flags).
SWEEP = (("Core ML fp32", ["--format", "coreml", "--precision", "fp32"]),
         ("Core ML fp16", ["--format", "coreml"]),
         ("Core ML palettize8", ["--format", "coreml", "--compress", "palettize8"]),
         ("Core ML palettize6", ["--format", "coreml", "--compress", "palettize6"]),
         ("Core ML palettize4", ["--format", "coreml", "--compress", "palettize4"]),
         ("Core ML int8", ["--format", "coreml", "--compress", "int8"]),
         ("ExecuTorch fp32", ["--format", "executorch"]),
         ("ExecuTorch int8", ["--format", "executorch", "--quantize", "int8"]),
         ("ONNX fp32", ["--format", "onnx"]),
         ("ONNX int8", ["--format", "onnx", "--quantize", "int8"]))


def _parser(model_name: str, default_format: InputFormat) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=f"Export {model_name} to Core ML, ONNX or ExecuTorch and verify the export against PyTorch; "
                    "--sweep measures every format.")
    parser.add_argument("--weights", required=True, metavar="FILE",
                        help="weights to export: a released .pkl/.pth, a .safetensors or a checkpoint of this project")
    parser.add_argument("--format", choices=tuple(SUFFIXES), default="coreml",
                        help="coreml: an .mlpackage ML program with an image input (default); onnx: an .onnx file; "
                             "executorch: a .pte program for the ExecuTorch runtime (XNNPACK delegate)")
    parser.add_argument("--output", metavar="PATH",
                        help=f"where to write (default: next to the weights, {model_name}-<variant>.mlpackage, .onnx "
                             f"or .pte; with --sweep a folder, {model_name}-sweep)")
    parser.add_argument("--precision", choices=("fp16", "fp32"),
                        help="Core ML compute precision (default: fp16); ONNX and ExecuTorch exports are fp32 unless "
                             "--quantize int8")
    _add_compression_arguments(parser)
    parser.add_argument("--val-dir", metavar="DIR",
                        help="labelled images (one sub-folder per class, named as the weights' classes): report "
                             "top-1/top-5 accuracy of PyTorch and of the export")
    parser.add_argument("--num-val-images", type=positive_int, default=DEFAULT_VAL_IMAGES, metavar="N",
                        help=f"use at most N images of --val-dir, spread over it (default: {DEFAULT_VAL_IMAGES})")
    parser.add_argument("--image-size", type=multiple_of_32, metavar="N",
                        help="input image size N x N (default: the checkpoint's, else 224)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the comparison of the export with PyTorch (on by default)")
    add_weights_arguments(parser, "export")
    parser.add_argument("--num-verify-images", type=positive_int, metavar="N",
                        help=f"number of synthetic test images the verification compares (default: "
                             f"{DEFAULT_VERIFY_IMAGES}, {DEFAULT_VERIFY_IMAGES_COMPRESSED} for compressed or int8 "
                             "exports)")
    parser.add_argument("--results-json", metavar="FILE",
                        help="also write the export's measurements (size, time, agreement, accuracy, speed, peak "
                             "memory) to this JSON file; with --sweep, the list of every entry's (as sweep.json)")
    parser.add_argument("--sweep", action="store_true",
                        help="export every format (Core ML fp32/fp16/palettize8/6/4/int8, ExecuTorch fp32/int8, ONNX "
                             "fp32/int8) into the --output folder, each in its own process, and write the table "
                             "sweep.md and sweep.json there")
    add_input_format_arguments(parser, default_format)
    return parser


def _add_compression_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compression (Core ML --compress; ONNX and ExecuTorch --quantize)")
    group.add_argument("--compress", choices=tuple(COMPRESSIONS),
                       help="Core ML weight compression: palettize8/6 (k-means palettes per tensor), palettize4 "
                            "(a palette per group of 8 output channels), int8 (linear symmetric per channel); "
                            "each needs a minimum deployment target, stated in the package")
    group.add_argument("--deployment-target", choices=tuple(DEPLOYMENT_TARGETS),
                       help="Core ML minimum deployment target (default: the first that holds --compress; iOS15 "
                            "without it)")
    group.add_argument("--quantize", choices=("int8",),
                       help="ONNX: static int8 QDQ quantization (per-channel weights); ExecuTorch: PT2E int8 with "
                            "XNNPACK's quantizer; activation ranges calibrated on --calibration-dir")
    group.add_argument("--calibration-dir", metavar="DIR",
                       help="images for --quantize calibration, in class sub-folders or flat (default: --val-dir)")
    group.add_argument("--calibration-images", type=positive_int, default=DEFAULT_CALIBRATION_IMAGES, metavar="N",
                       help="calibrate on at most N images spread over the folder "
                            f"(default: {DEFAULT_CALIBRATION_IMAGES})")
    group.add_argument("--min-agreement", type=fraction, default=DEFAULT_MIN_AGREEMENT, metavar="F",
                       help="a compressed or int8 export must agree with PyTorch's top-1 on this fraction of the "
                            f"test images that have a clear top-1 (default: {DEFAULT_MIN_AGREEMENT})")


def _check_flags(args: argparse.Namespace) -> None:
    """One-line errors for flags that do not go together, before anything is loaded."""
    if args.sweep:
        given = {"--format": args.format if args.format != "coreml" else None, "--precision": args.precision,
                 "--compress": args.compress, "--quantize": args.quantize,
                 "--deployment-target": args.deployment_target,
                 "--min-agreement": args.min_agreement if args.min_agreement != DEFAULT_MIN_AGREEMENT else None}
        if clashing := [f"{flag} {value}" for flag, value in given.items() if value is not None]:
            raise UserError(f"{', '.join(clashing)}: --sweep exports every format with settings of its own (it sets "
                            "--format, --precision, --compress, --quantize and --deployment-target for each, and "
                            "keeps each export whatever its agreement, to show it); leave these out, or export one "
                            "format without --sweep")
        if not (args.calibration_dir or args.val_dir):
            raise UserError("--sweep exports int8 too: give --calibration-dir DIR (or --val-dir DIR) for its "
                            "calibration images")
        return
    if args.format == "coreml":
        if args.quantize:
            raise UserError("--quantize is for --format onnx or executorch; Core ML weights are compressed with "
                            "--compress (palettize8, palettize6, palettize4, int8)")
        check_deployment_target(args.compress, args.deployment_target)
    elif args.precision == "fp16":
        raise UserError(f"{'ONNX' if args.format == 'onnx' else 'ExecuTorch'} exports are fp32; leave out "
                        "--precision or pass --precision fp32")
    elif args.compress or args.deployment_target:
        flag = "--compress" if args.compress else "--deployment-target"
        raise UserError(f"{flag} is for --format coreml; for {args.format} use --quantize int8")
    if args.quantize and not (args.calibration_dir or args.val_dir):
        raise UserError("--quantize int8 needs --calibration-dir DIR: a few hundred images like those the model "
                        "will see (class sub-folders or flat)")


def _top_k(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    return float((np.argsort(-logits, axis=1)[:, :k] == labels[:, None]).any(axis=1).mean())


def _export_logits(kind: str, path: Path, images: np.ndarray) -> np.ndarray:
    """The export's logits for RGB uint8 images N x H x W x 3, run as the verification runs it."""
    if kind == "coreml":
        return MLProgram(path).predict(images)[0]
    if kind == "executorch":
        from common.executorch_export import ExecuTorchProgram

        return ExecuTorchProgram(path).logits(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"image": as_batch(images[i:i + 32]).numpy()})[0]
                           for i in range(0, len(images), 32)])


def _accuracy(kind: str, path: Path, model: nn.Module, input_format: InputFormat, images: np.ndarray,
              labels: np.ndarray) -> dict:
    """Top-1/top-5 of PyTorch and of the export on labelled images, and how the two agree there."""
    reference = np.concatenate([reference_logits(model, input_format, images[i:i + 32])
                                for i in range(0, len(images), 32)])
    candidate = _export_logits(kind, path, images)
    result = {"val_images": len(images),
              "pytorch_top1": _top_k(reference, labels, 1), "pytorch_top5": _top_k(reference, labels, 5),
              "export_top1": _top_k(candidate, labels, 1), "export_top5": _top_k(candidate, labels, 5),
              "val_top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
              "val_mean_kl": mean_kl_divergence(reference, candidate)}
    print(f"on {result['val_images']} --val-dir images: top-1/top-5 accuracy PyTorch {result['pytorch_top1']:.2%}/"
          f"{result['pytorch_top5']:.2%}, export {result['export_top1']:.2%}/{result['export_top5']:.2%}; top-1 "
          f"agreement {result['val_top1_agreement']:.2%}, mean KL {result['val_mean_kl']:.3g}", flush=True)
    return result


@torch.no_grad()
def _speed(kind: str, path: Path, model: nn.Module, input_format: InputFormat, images: np.ndarray) -> dict:
    """Batch-1 one-thread images/s of the export in its runtime and of PyTorch eager, as a phone app runs it."""
    runs = {"pytorch": nn.Sequential(Preprocess(input_format), model).eval()}
    if kind == "executorch":
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        from common.executorch_export import ExecuTorchProgram, runtime_notices_dropped

        with runtime_notices_dropped():
            _unsafe_reset_threadpool(1)
        method = ExecuTorchProgram(path).method
        runs["export"] = lambda batch: method.execute([batch])
    else:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        runs["export"] = lambda batch: session.run(None, {"image": batch.numpy()})
    batches = [as_batch(images[i:i + 1]) for i in range(len(images))]
    rates: dict[str, list[float]] = {name: [] for name in runs}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for run in runs.values():
            run(batches[0])  # warm-up: first-call allocations and lazy initialisation
        # Alternating rounds of at least 0.5 s each: a change in the machine's load hits both alike.
        for _ in range(5):
            for name, run in runs.items():
                done, started = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - started) < 0.5 or not done:
                    for batch in batches:
                        run(batch)
                    done += len(batches)
                rates[name].append(done / elapsed)
    finally:
        torch.set_num_threads(threads)
    export, pytorch = statistics.median(rates["export"]), statistics.median(rates["pytorch"])
    print(f"speed (batch 1, one thread, this CPU, median of alternating rounds): {export:.1f} images/s in "
          f"{'onnxruntime' if kind == 'onnx' else 'the ExecuTorch runtime'}, PyTorch eager {pytorch:.1f} images/s "
          f"({export / pytorch:.2f}x)", flush=True)
    return {"export_images_per_s": export, "pytorch_images_per_s": pytorch, "speed_vs_pytorch": export / pytorch}


def _peak_memory_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10  # bytes on macOS, KiB elsewhere


@dataclass
class _Job:
    """One export, decided from the flags and the weights' metadata before anything long starts."""

    model_name: str
    weights: Path
    stored: dict
    class_names: list[str]
    imagenet: bool
    input_format: InputFormat
    image_size: int
    output: Path
    variant: str
    compressed: bool
    published: dict | None  # the published ImageNet errors, where these weights are the released network's
    contents: object = None  # the file as read, where its classes had to be counted: it is not read twice


@exit_on_user_error
def run_export(network_module: ModuleType, argv: list[str] | None = None) -> int:
    """The export command line of a model folder: load weights, export, verify, measure, print time and size."""
    model_name = Path(network_module.__file__).resolve().parent.name
    args = _parser(model_name, network_module.INPUT_FORMAT).parse_args(argv)
    _check_flags(args)
    if args.sweep:
        return _run_sweep(network_module, model_name, args, argv if argv is not None else sys.argv[1:])
    job = _plan(network_module, model_name, args)
    val, calibration = _read_images(args, job)  # before the long export, so a bad folder fails first
    # After the inputs: a mistyped command leaves no folder behind.
    prepare_outputs({"--output": job.output, "--results-json": args.results_json},
                    {"--weights": args.weights, "--mean-image": args.mean_image})
    # Two exports to one --output would share its staging folder, each removing the other's files.
    with claim_output(job.output.with_name(f".{job.output.name}.lock"), lambda holder: (
            f"--output {job.output}: another export is writing it{holder}; wait for it to end or choose another "
            "--output")):
        result = _export_job(network_module, model_name, args, job, val, calibration)
    if args.results_json:
        atomic_write_text(args.results_json, json.dumps(result, indent=2) + "\n")
    print(f"wrote {job.output} ({_size_of(job.output) / 1e6:.1f} MB)")
    return 0


def _export_job(network_module: ModuleType, model_name: str, args: argparse.Namespace, job: _Job, val, calibration
                ) -> dict:
    """Load the weights, export, verify and measure: the results record."""
    from common.model_state import load_model_state
    from common.models import create_network_for

    model = create_network_for(network_module, len(job.class_names), job.stored)
    load_model_state(model, job.weights if job.contents is None else job.contents, for_inference=True,
                     trust_pickle=args.trust_pickle, use_ema=args.use_ema, source_name=str(job.weights))
    model.eval()
    print(f"{model_name}: exporting {job.weights.name} to {args.format} ({job.variant}, {job.image_size}x"
          f"{job.image_size}, input {job.input_format.describe()})", flush=True)
    result = {"model": model_name, "format": args.format, "variant": job.variant, "image_size": job.image_size,
              "weights": job.weights.name, **_export_verified(args, job, model, val, calibration)}
    if args.no_verify:
        print("not verified (--no-verify)", file=sys.stderr)
    result["peak_memory_mb"] = _peak_memory_mb()
    return result


def _export_verified(args: argparse.Namespace, job: _Job, model: nn.Module, val: tuple | None,
                     calibration: np.ndarray | None) -> dict:
    """Export, verify and measure, then move the export to --output; the figures for the results file."""
    result = {}
    # Written into a hidden folder and moved into place once verified: a failed or interrupted export leaves
    # nothing behind (the folder is made inside the try: a Ctrl-C cannot fall between making and cleaning up).
    staging_dir = job.output.with_name(f".{job.output.name}.partial")
    staging = staging_dir / job.output.name
    try:
        shutil.rmtree(staging_dir, ignore_errors=True)
        staging_dir.mkdir(parents=True)
        with failures_named(job.output):
            result.update(_export(args, job, model, staging, calibration))
        if not args.no_verify:
            result.update(_verify(args, job, model, staging))
        if val is not None:
            result.update(_accuracy(args.format, staging, model, job.input_format, *val))
        if args.format != "coreml":
            result.update(_speed(args.format, staging, model, job.input_format,
                                 make_test_images(4, job.image_size, 1)))
        _check_replaceable(job.output, args.format)
        if job.output.is_dir():
            shutil.rmtree(job.output)
        staging.replace(job.output)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    return result


def _plan(network_module: ModuleType, model_name: str, args: argparse.Namespace) -> _Job:
    """What to export and where, from the flags and the weights' metadata; one-line errors for what cannot be."""
    from common.imagenet import imagenet_wnids, output_names
    from common.model_state import check_model_folder, output_classes, read_checkpoint_metadata, read_weights_file

    weights = Path(args.weights)
    stored = read_checkpoint_metadata(weights)
    check_model_folder(f"--weights {weights}", stored, model_name, "export.py")
    classes, contents = stored.get("classes"), None
    if not classes:  # a plain state dict: its classifier's rows tell how many outputs it has
        # A file that is not weights is refused now: the classes assumed for it would misname --val-dir's folders.
        contents = read_weights_file(weights, trust_pickle=args.trust_pickle)
        try:
            classes = output_classes(network_module, contents, stored)[1]
        except UserError:  # refused where the weights are loaded, after the flags and folders are checked
            classes = imagenet_wnids()
    imagenet = classes == imagenet_wnids()
    stored_format = stored.get("input_format")
    input_format = input_format_from_args(args, InputFormat.from_dict(stored_format) if stored_format
                                          else network_module.INPUT_FORMAT)
    Preprocess(input_format)  # reads a mean image now, so a bad file fails before the long conversion
    image_size = args.image_size or int(stored.get("image_size", 224))
    if image_size < MIN_IMAGE_SIZE:  # only a file's recorded size can be: --image-size is checked when parsed
        raise UserError(f"--weights {weights} records an image size of {image_size}, below {MIN_IMAGE_SIZE}: give "
                        "--image-size N")
    if args.format == "coreml":
        variant = "-".join(filter(None, (args.precision or "fp16", args.compress)))
    else:
        variant = args.quantize or "fp32"
    suffix = SUFFIXES[args.format]
    output = Path(args.output) if args.output else weights.parent / f"{model_name}-{variant}{suffix}"
    if output.suffix != suffix:
        raise UserError(f"--output {output} must end in {suffix} for --format {args.format}")
    _check_replaceable(output, args.format)
    # A checkpoint trained with --num-classes above its class folders has outputs past them, named "output i".
    class_names = output_names(classes, stored.get("num_classes") or len(classes), short=True)
    return _Job(model_name, weights, stored, class_names,
                imagenet, input_format, image_size, output, variant, bool(args.compress or args.quantize),
                network_module.PUBLISHED if imagenet and not stored.get("architecture") else None, contents)


def _read_images(args: argparse.Namespace, job: _Job) -> tuple[tuple[np.ndarray, np.ndarray] | None,
                                                                np.ndarray | None]:
    """The labelled --val-dir images and the --quantize calibration images, each None where not needed."""
    from common.imagenet import imagenet_wnids
    from common.quantize import load_calibration_images, load_labelled_images

    val = calibration = None
    if args.val_dir:
        val = load_labelled_images(args.val_dir, imagenet_wnids() if job.imagenet else job.class_names,
                                   job.image_size, args.num_val_images)
    if args.quantize:
        if not args.calibration_dir:
            print(f"calibrating on --val-dir {args.val_dir} (no --calibration-dir given)", flush=True)
        folder, flag = _calibration_source(args)
        calibration = load_calibration_images(folder, job.image_size, args.calibration_images, flag)
        print(f"calibration: {len(calibration)} images", flush=True)
    return val, calibration


def _calibration_source(args: argparse.Namespace) -> tuple[str, str]:
    """The folder --quantize calibrates on, and the flag that gave it."""
    return (args.calibration_dir, "--calibration-dir") if args.calibration_dir else (args.val_dir, "--val-dir")


def _export(args: argparse.Namespace, job: _Job, model: nn.Module, staging: Path,
            calibration: np.ndarray | None) -> dict:
    """Write the export at `staging`; its time and size."""
    metadata = {"model": job.model_name, "source_weights": job.weights.name,
                "source_weights_sha256": file_sha256(job.weights), "weights": "ema" if args.use_ema else "model",
                "description": f"{job.model_name} image classifier (ShuffleNet-Series), {job.image_size}x"
                               f"{job.image_size} input, {len(job.class_names)} classes"}
    if job.published:
        metadata["published_imagenet_top1_error"] = f"{job.published['top1_error']}%"
        metadata["published_imagenet_top5_error"] = f"{job.published['top5_error']}%"
    named = json.dumps(job.class_names)  # a Core ML classifier holds its labels; ONNX and ExecuTorch hold this
    started = time.perf_counter()
    result = {}
    if args.format == "coreml":
        convert_pytorch_to_coreml(model, input_format=job.input_format, image_size=job.image_size,
                                  precision=args.precision or "fp16", class_names=job.class_names, metadata=metadata,
                                  output=staging, compression=args.compress, deployment_target=args.deployment_target)
        result["deployment_target"] = check_deployment_target(args.compress, args.deployment_target)
    elif args.format == "onnx":
        _export_onnx_file(args, job, model, staging, calibration, {**metadata, "class_names": named})
    else:
        from common.executorch_export import export_executorch

        export_executorch(model, input_format=job.input_format, image_size=job.image_size, output=staging,
                          quantize=args.quantize, calibration=calibration, metadata={**metadata, "class_names": named})
    result.update(export_seconds=time.perf_counter() - started, bytes=_size_of(staging))
    print(f"exported in {result['export_seconds']:.1f} s, {result['bytes'] / 1e6:.1f} MB", flush=True)
    return result


def _export_onnx_file(args: argparse.Namespace, job: _Job, model: nn.Module, staging: Path,
                      calibration: np.ndarray | None, metadata: dict) -> None:
    """fp32 ONNX at `staging`, or with --quantize its int8 copy there."""
    if args.quantize:
        metadata["quantization"] = (f"int8 QDQ, per-channel int8 weights, uint8 activations calibrated on "
                                    f"{len(calibration)} images")
    fp32 = staging.with_name(f"fp32-{staging.name}") if args.quantize else staging
    export_onnx(model, input_format=job.input_format, image_size=job.image_size, output=fp32, metadata=metadata)
    if args.quantize:
        from common.quantize import quantize_onnx

        quantize_onnx(fp32, staging, calibration)
        fp32.unlink()


def _verify(args: argparse.Namespace, job: _Job, model: nn.Module, staging: Path) -> dict:
    """Compare the export with PyTorch on synthetic test images (ExportVerificationError if it fails)."""
    started = time.perf_counter()
    num_images = args.num_verify_images or (DEFAULT_VERIFY_IMAGES_COMPRESSED if job.compressed
                                            else DEFAULT_VERIFY_IMAGES)
    # The agreement gate is for compressed exports only: an exact one is held to its tolerance or to every image.
    min_agreement = args.min_agreement if job.compressed else None
    if args.format == "coreml":
        report = verify_coreml(staging, model, job.input_format, num_images=num_images, min_agreement=min_agreement)
    elif args.format == "onnx":
        report = verify_onnx(staging, model, job.input_format, num_images=num_images, quantized=job.compressed,
                             min_agreement=min_agreement)
    else:
        from common.executorch_export import verify_executorch

        report = verify_executorch(staging, model, job.input_format, make_test_images(num_images, job.image_size),
                                   quantized=job.compressed, min_agreement=min_agreement)
    print(f"{report.summary()}; took {time.perf_counter() - started:.1f} s", flush=True)
    return dict(verify_images=report.images, verify_clear_images=report.clear_images, top1_agreement=report.agreement,
                mean_kl=report.mean_kl, max_abs_diff=report.max_abs_diff, logit_range=report.logit_range)


def _run_sweep(network_module: ModuleType, model_name: str, args: argparse.Namespace, argv: list[str]) -> int:
    """Export every format in its own process (so each one's peak memory is its own) and tabulate the results."""
    weights = Path(args.weights)
    folder = Path(args.output or weights.parent / f"{model_name}-sweep")
    # What every entry reads, checked once here: a mistyped path is one line, not ten failed exports.
    _plan(network_module, model_name, argparse.Namespace(**{**vars(args), "format": "onnx", "quantize": "int8",
                                                            "output": str(folder / f"{model_name}-probe.onnx")}))
    from common.data import scan_image_folder
    from common.quantize import calibration_files

    if args.val_dir:
        scan_image_folder(args.val_dir, "--val-dir")
    calibration_files(*_calibration_source(args))
    prepare_output("--output", folder, folder=True)
    prepare_outputs({"--results-json": args.results_json}, {"--weights": args.weights, "--mean-image": args.mean_image})
    script = Path(network_module.__file__).resolve().parent / "export.py"
    passed = _forwarded_flags(argv)
    rows = []
    for name, flags in SWEEP:
        stem = name.replace(" ", "-")
        suffix = SUFFIXES[flags[flags.index("--format") + 1]]
        results = folder / f"{stem}.json"
        results.unlink(missing_ok=True)
        print(f"\n=== {name} ===", flush=True)
        command = [sys.executable, str(script), *passed, *flags, "--results-json", str(results),
                   "--output", str(folder / f"{model_name}-{stem}{suffix}"), "--min-agreement", "0"]
        status = run_script(command)
        ok = status == 0 and results.is_file()
        rows.append({"name": name, **(json.loads(results.read_text()) if ok else {"error": f"exit status {status}"})})
    listing = json.dumps(rows, indent=2) + "\n"
    atomic_write_text(folder / "sweep.json", listing)
    if args.results_json:
        atomic_write_text(args.results_json, listing)
    table = sweep_table(rows)
    atomic_write_text(folder / "sweep.md", table + "\n")
    print(f"\n{table}\n\nwrote {folder / 'sweep.md'} and {folder / 'sweep.json'}")
    return 0 if all("error" not in row for row in rows) else 1


def _forwarded_flags(argv: list[str]) -> list[str]:
    """The command line without --sweep, --output and the flags each sweep entry sets itself."""
    own = {"--format", "--precision", "--compress", "--quantize", "--deployment-target", "--output",
           "--results-json", "--min-agreement"}
    kept, skip = [], False
    for item in argv:
        name = item.split("=", 1)[0]
        if not skip and name not in own and name != "--sweep":
            kept.append(item)
        skip = not skip and name in own and "=" not in item
    return kept


def _rate(images_per_second: float) -> str:
    """Whole numbers from 100 up (no exponent), three significant figures below."""
    return f"{images_per_second:.0f}" if images_per_second >= 100 else f"{images_per_second:.3g}"


def sweep_table(rows: list[dict]) -> str:
    """The sweep as a Markdown table: size, agreement and KL with PyTorch, accuracy, export time, peak memory,
    and batch-1 images/s against PyTorch eager where the runtime runs here."""
    with_val = any("export_top1" in row for row in rows)
    header = ["format", "MB", "top-1 agreement", "mean KL"]
    header += ["top-1 / top-5 (PyTorch: top-1 / top-5)"] if with_val else []
    header += ["export s", "peak memory MB", "images/s (PyTorch eager, ratio)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | failed: {row['error']} |" + " |" * (len(header) - 2))
            continue
        cells = [row["name"], f"{row['bytes'] / 1e6:.1f}",
                 f"{row['top1_agreement']:.0%} of {row['verify_clear_images']}" if "top1_agreement" in row else "-",
                 f"{row['mean_kl']:.2g}" if "mean_kl" in row else "-"]
        if with_val:
            cells.append(f"{row['export_top1']:.1%} / {row['export_top5']:.1%} ({row['pytorch_top1']:.1%} / "
                         f"{row['pytorch_top5']:.1%})" if "export_top1" in row else "-")
        cells += [f"{row['export_seconds']:.0f}",
                  f"{row['peak_memory_mb']:.0f}" if row.get("peak_memory_mb") else "-",
                  f"{_rate(row['export_images_per_s'])} ({_rate(row['pytorch_images_per_s'])}, "
                  f"{row['export_images_per_s'] / row['pytorch_images_per_s']:.2f}x)"
                  if "export_images_per_s" in row else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
