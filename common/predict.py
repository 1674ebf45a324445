"""Classify your own images: the predict.py command line of every model folder (`run_predict`). Images are turned
upright by their EXIF orientation and prepared as eval.py prepares them."""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from common.atomic_io import atomic_write_text
from common.cli import ArgumentParser, positive_int, prepare_outputs
from common.data import EvalTransform, UndecodableImage, collate_skip_corrupt_with_indices, open_image, walk_files
from common.distributed import launched_world_size, resolve_device
from common.errors import UserError, exit_on_user_error, output_reader_left
from common.evaluate import NothingEvaluated, add_data_arguments, add_model_arguments, read_weights_for
from common.imagenet import output_names
from common.inference import prepare_inference_model
from common.input_format import InputFormat, Preprocess
from common.model_state import load_model_state, output_classes
from common.models import create_network_for


class ImageTransform:
    """A PIL image (or a path) to a network's input: upright, eval transform, input format; 3 x H x W float."""

    def __init__(self, input_format: InputFormat, image_size: int = 224) -> None:
        self.input_format = input_format
        self.eval_transform = EvalTransform(image_size)
        self.preprocess = Preprocess(input_format)

    def __call__(self, image: Image.Image | str | Path) -> torch.Tensor:
        image = open_image(str(image)) if isinstance(image, (str, Path)) else ImageOps.exif_transpose(image)
        with torch.no_grad():
            return self.preprocess(self.eval_transform(image).unsqueeze(0))[0]

    def __repr__(self) -> str:
        return f"ImageTransform({self.eval_transform!r}, input {self.input_format.describe()})"


def find_images(paths: list[str]) -> tuple[list[str], int]:
    """(files to classify, files in folders skipped for an extension PIL does not read): a file given by name is
    always tried, folders are searched as training folders are (`walk_files`); each file once, in the order given."""
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    files, others, seen = {}, 0, {}
    for path in paths:
        if os.path.isfile(path):
            files.setdefault(os.path.realpath(path), path)
        elif not os.path.isdir(path):
            raise UserError(f"{path}: no such file or folder")
        else:
            found = walk_files(path, seen)[0]  # a folder reached twice (a link, or given again) is read once
            kept = [file for file in found if os.path.splitext(file)[1].lower() in extensions]
            others += len(found) - len(kept)
            for file in kept:
                files.setdefault(os.path.realpath(file), file)
    return list(files.values()), others


@dataclass
class _PredictDataset(Dataset):
    """(uint8 image, 0, index) per file, or None (with one line on stderr) for a file that cannot be decoded."""

    files: list[str]
    transform: EvalTransform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            return self.transform(open_image(self.files[index])), 0, index
        except UndecodableImage as error:
            print(f"skipped {self.files[index]}: cannot read it as an image ({error})", file=sys.stderr, flush=True)
            return None


def read_class_names(path: str | Path, count: int) -> list[str]:
    """One name per line (blank lines kept out), exactly `count` of them."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as error:
        raise UserError(f"--class-names {path}: cannot read it ({error.strerror or error})") from None
    if len(names) != count:
        given = "1 name" if len(names) == 1 else f"{len(names)} names"
        raise UserError(f"--class-names {path}: {given}, but the weights predict {count} classes; give one name per "
                        "line, in output order")
    return names


class _Output:
    """Prints lines on stdout until their reader leaves (`| head`), then drops them, so that the work goes on for
    --predictions-json; `reader_left` says whether it did."""

    reader_left = False

    def __call__(self, line: str) -> None:
        if self.reader_left:
            return
        try:
            print(line, flush=True)
        except BrokenPipeError:
            if not output_reader_left():
                raise
            self.reader_left = True


def _predict(runner, loader: DataLoader, files: list[str], names: list[str], k: int,
             say: Callable[[str], None]) -> tuple[list[dict], int, float]:
    """Each readable image's top-k classes, said as they come; with the number skipped and the seconds taken."""
    records, skipped = [], 0
    started = time.perf_counter()
    for images, _, batch_skipped, indices in loader:
        skipped += batch_skipped
        if not len(indices):
            continue
        probabilities, classes = runner(images).softmax(1).topk(k, dim=1)
        for index, probs, tops in zip(indices.tolist(), probabilities.tolist(), classes.tolist()):
            predictions = [{"index": c, "name": names[c], "probability": p} for c, p in zip(tops, probs)]
            records.append({"path": files[index], "predictions": predictions})
            say(f"{files[index]}: " + "; ".join(f"{p['name']} ({p['index']}) {p['probability']:.3f}"
                                                for p in predictions))
    return records, skipped, time.perf_counter() - started


def build_parser(model_name: str, input_format: InputFormat | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=f"Classify images with {model_name}: the top-k classes of each image, with the same "
                    "preprocessing as eval.py.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    parser.add_argument("--weights", required=True, metavar="FILE",
                        help="a released file of any layout, a .safetensors release or a checkpoint of this project")
    parser.add_argument("--top-k", type=positive_int, default=5, metavar="K",
                        help="classes shown per image (default: 5)")
    parser.add_argument("--predictions-json", "--json", dest="predictions_json", metavar="FILE",
                        help='write [{"path", "predictions": [{"index", "name", "probability"}]}] to FILE (eval.py '
                             "--predictions-csv is its counterpart for a labelled folder; --json is the older name)")
    parser.add_argument("--class-names", metavar="FILE",
                        help="class names, one per line in output order (default: ImageNet's for released files, "
                             "the training class folders for checkpoints of this project)")
    add_data_arguments(parser, batch_size=32)
    add_model_arguments(parser, input_format)
    return parser


@exit_on_user_error
def run_predict(network: ModuleType, argv: list[str] | None = None) -> list[dict]:
    """The predict.py command line of a model folder (`network`: its network.py); returns the records written
    to --predictions-json. Bad input ends with a one-line error before any image is read."""
    model_name = Path(network.__file__).resolve().parent.name
    args = build_parser(model_name, network.INPUT_FORMAT).parse_args(argv)
    if launched_world_size() > 1:
        # Every rank would classify every image and print and write the same results.
        raise UserError("predict.py runs in one process: start it with python, not torchrun (eval.py runs under "
                        "torchrun for labelled folders)")
    device = resolve_device(args.device)
    files, others = find_images(args.paths)
    if not files:
        raise UserError(f"no image files in {' '.join(args.paths)}")
    weights, metadata, image_size, input_format = read_weights_for(network, model_name, args, "predict.py")
    if others:  # once the command is known good: a refused one says one line
        print(f"ignored {others} file(s) in the folders without an image extension PIL reads", file=sys.stderr)
    num_classes, classes = output_classes(network, weights, metadata)
    names = read_class_names(args.class_names, num_classes) if args.class_names else output_names(classes, num_classes)
    # Once the inputs are known good, so that a mistyped command leaves no folder behind.
    prepare_outputs({"--predictions-json": args.predictions_json},
                    {"--weights": args.weights, "--class-names": args.class_names, "--mean-image": args.mean_image,
                     "PATH": files})
    model = create_network_for(network, num_classes, metadata)
    load_model_state(model, weights, for_inference=True, use_ema=args.use_ema, source_name=str(args.weights))
    del weights
    runner = prepare_inference_model(model, input_format=input_format, device=device, compile=args.compile,
                                     amp=args.amp, channels_last=args.channels_last, fold_bn=not args.no_fast,
                                     image_size=image_size)
    loader = DataLoader(_PredictDataset(files, EvalTransform(image_size)), batch_size=args.batch_size,
                        num_workers=args.workers, collate_fn=collate_skip_corrupt_with_indices)
    # With a file to write, a reader of the output that leaves early (`| head`) must not cost it.
    say = _Output() if args.predictions_json else functools.partial(print, flush=True)
    say(f"{model_name}: {len(files)} image{'s' * (len(files) != 1)}, {image_size}px center crop, input "
        f"{input_format.describe()}; {runner.speed.describe()}{', compiled' if args.compile else ''} on {device}")
    if args.top_k > num_classes:
        print(f"note: --top-k {args.top_k}: the weights predict {num_classes} classes, so each image shows "
              f"{num_classes}", file=sys.stderr)
    records, skipped, seconds = _predict(runner, loader, files, names, min(args.top_k, num_classes), say)
    if not records:
        unread = "the image could not be read" if skipped == 1 else f"none of the {skipped} images could be read"
        raise NothingEvaluated(f"{unread} (see above), so nothing was classified"
                               + (" and --predictions-json was not written" if args.predictions_json else ""))
    _finish(records, skipped, seconds, args.predictions_json, say)
    return records


def _finish(records: list[dict], skipped: int, seconds: float, predictions_json: str | None,
            say: Callable[[str], None]) -> None:
    """Write --predictions-json, then say how many images were classified how fast (or exit 141 if the reader of
    the output left)."""
    if predictions_json:
        atomic_write_text(predictions_json, json.dumps(records, indent=2) + "\n")
    if getattr(say, "reader_left", False):
        sys.exit(128 + 13)  # SIGPIPE's number, as for every script whose output reader left
    note = f", {skipped} unreadable skipped" if skipped else ""
    rate = len(records) / max(seconds, 1e-9)
    say(f"{len(records)} image{'s' * (len(records) != 1)} in {seconds:.2f} s: {rate:.1f} images/s{note}")
    if predictions_json:
        say(f"wrote {predictions_json}")
