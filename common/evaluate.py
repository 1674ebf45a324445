"""Evaluation: the loop shared by eval.py and the training's validation (timm validate.py's figures, summed over
ranks when distributed), the result files, and every model folder's eval.py command line (`run_eval`), whose
weights, data and speed flags predict.py shares."""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common.atomic_io import atomic_output, atomic_write_text, file_sha256
from common.checkpoint import library_versions
from common.cli import (ArgumentParser, add_device_argument, add_weights_arguments, multiple_of_32, positive_int,
                        prepare_outputs, progress_bar, worker_count)
from common.counting import count_macs, count_parameters
from common.data import EvalTransform, build_eval_loader, scan_image_folder
from common.distributed import DistInfo, all_gather_objects, init_distributed, shutdown_distributed
from common.errors import UserError, exit_on_user_error
from common.hardware import AMP_CHOICES
from common.imagenet import CLASS_MAP_HELP, class_to_index_for, imagenet_wnids, output_names
from common.inference import InferenceModel, InferenceRunner, prepare_inference_model
from common.input_format import InputFormat, Preprocess, add_input_format_arguments, input_format_from_args
from common.model_state import check_model_folder, output_classes, read_checkpoint_metadata, read_weights_file
from common.models import create_network_for

TOP_K = 5


class NothingEvaluated(UserError):
    """Every image was skipped as undecodable: there is no figure to report."""

    exit_status = 1


# Batches between updates of the running accuracy in the progress bar (each update waits for the device).
_POSTFIX_INTERVAL = 10


def warn_if_not_finite(loss: float, what: str, amp: str | None) -> None:
    """A one-line warning when the mean `loss` of an evaluation (`what`) is NaN or infinite: some outputs were, and
    the errors count arbitrary predictions for them."""
    if math.isfinite(loss):
        return
    cause = "huge or NaN values in the weights or BatchNorm statistics"
    if amp == "fp16":
        cause = f"float16's range overflowing (--amp fp16: try bf16 or float32), or {cause}"
    print(f"warning: the {what} loss is {loss}: the network's outputs on some images are NaN or infinite ({cause}), so "
          "the errors above count arbitrary predictions for them", file=sys.stderr, flush=True)


def evaluate(model: nn.Module | InferenceRunner, preprocess: nn.Module | None, loader: Iterable, *,
             device: str | torch.device | None = None, amp: str | None = None, progress: bool = True,
             keep_predictions: bool = False) -> dict:
    """Top-1/top-5 accuracy and error (%), mean loss, images, skipped and images/s of `model` (a network, run in eval
    mode behind `preprocess` on `device` under `amp`, or an InferenceRunner) over `loader` (build_eval_loader's). With
    `keep_predictions`, also "predictions": this rank's positions, labels and top-5 classes and probabilities."""
    if not isinstance(model, InferenceRunner):
        was_training = model.training
        try:
            runner = InferenceRunner(InferenceModel(model.eval(), preprocess), device, amp)
            return evaluate(runner, None, loader, progress=progress, keep_predictions=keep_predictions)
        finally:
            model.train(was_training)
    runner, device = model, model.device
    # correct top-1, correct top-k, summed loss, images, skipped: kept on the device to avoid a sync per batch.
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    kept: dict[str, list[torch.Tensor]] = {"positions": [], "labels": [], "top_classes": [], "top_probs": []}
    batches = getattr(loader, "batch_sampler", None)
    # Closed on the way out of a Ctrl-C too, so that its last refresh does not come after "stopped".
    with progress_bar(total=sum(map(len, batches)) if batches is not None else None, unit="img", desc="eval",
                      disable=not progress) as bar:
        started = time.perf_counter()
        for step, (images, labels, skipped, positions) in enumerate(loader):
            bar.update(len(labels) + skipped)
            totals[4] += skipped
            if not len(labels):
                continue
            logits = runner(images)
            labels = labels.to(device, non_blocking=True)
            k = min(TOP_K, logits.shape[1])
            top_probs, top_classes = logits.softmax(1).topk(k, dim=1)
            correct = top_classes == labels[:, None]
            totals[0] += correct[:, 0].sum()
            totals[1] += correct.any(1).sum()
            totals[2] += F.cross_entropy(logits, labels, reduction="sum")
            totals[3] += len(labels)
            if keep_predictions:
                for name, value in zip(kept, (positions, labels, top_classes, top_probs)):
                    kept[name].append(value.cpu())
            if progress and step % _POSTFIX_INTERVAL == 0:
                _show_accuracy(bar, totals)
        seconds = time.perf_counter() - started
        if progress and totals[3]:
            _show_accuracy(bar, totals)  # the bar's last line ends at this rank's final figure, not a stale one
    results = _results(totals, seconds)
    if keep_predictions:
        results["predictions"] = {name: torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
                                  for name, values in kept.items()}
    return results


def _show_accuracy(bar, totals: torch.Tensor) -> None:
    bar.set_postfix_str(f"acc@1 {100 * totals[0].item() / totals[3].item():.2f}%", refresh=False)


def _results(totals: torch.Tensor, seconds: float) -> dict:
    """The metrics of the tallies, summed over the ranks of a distributed run (the slowest rank's time)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        reduced = torch.cat((totals, torch.tensor([seconds], dtype=torch.float64, device=totals.device)))
        dist.all_reduce(reduced[:5])
        dist.all_reduce(reduced[5:], op=dist.ReduceOp.MAX)
        totals, seconds = reduced[:5], reduced[5].item()
    correct1, correct5, loss_sum, images, skipped = totals.tolist()
    images, count = int(images), max(int(images), 1)
    top1, top5 = 100 * correct1 / count, 100 * correct5 / count
    return {"top1_accuracy": top1, "top5_accuracy": top5, "loss": loss_sum / count, "images": images,
            "skipped": int(skipped), "seconds": seconds, "images_per_second": images / seconds if seconds > 0 else 0.0,
            "top1_error": 100 - top1, "top5_error": 100 - top5}


# -- result files ---------------------------------------------------------------------------------------------------

def write_predictions_csv(path: str | Path, predictions: dict, paths: Sequence[str],
                          class_names: Sequence[str]) -> None:
    """One row per image: path, label, label_name, then index, name and probability of the top-5 classes."""
    k = predictions["top_classes"].shape[1]
    header = ["path", "label", "label_name", *(f"top{rank}_{what}" for rank in range(1, k + 1)
                                               for what in ("index", "name", "prob"))]
    with atomic_output(path) as temp, open(temp, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for row in predictions["positions"].argsort().tolist():
            label = int(predictions["labels"][row])
            cells = [paths[int(predictions["positions"][row])], label, class_names[label]]
            for index, prob in zip(predictions["top_classes"][row].tolist(), predictions["top_probs"][row].tolist()):
                cells += [index, class_names[index], f"{prob:.6f}"]
            writer.writerow(cells)


# -- the eval.py command line ---------------------------------------------------------------------------------------

def add_data_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """The data flags eval.py and predict.py share: batching, workers, device, crop size."""
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help="images per batch (default: %(default)s)")
    parser.add_argument("--workers", type=worker_count, default=min(4, os.cpu_count() or 1),
                        help="data-loading worker processes; 0 loads in the main process (default: the CPU count, "
                             "at most 4)")
    add_device_argument(parser)
    parser.add_argument("--image-size", type=multiple_of_32, metavar="N",
                        help="center-crop size; the short side is first resized to round(N * 256 / 224) (default: "
                             "the size a checkpoint of this project was trained at, else 224)")


def add_model_arguments(parser: argparse.ArgumentParser, input_format: InputFormat | None = None) -> None:
    """The model flags eval.py and predict.py share: input format (the network's `input_format` shown as the
    default), speed and weights."""
    add_input_format_arguments(parser, input_format)
    speed = parser.add_argument_group("speed")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the inference model (Large and ExLarge take a while to compile on a CPU)")
    speed.add_argument("--amp", choices=AMP_CHOICES, default="none",
                       help="autocast precision. none (the default): float32, which reproduces the published "
                            "accuracy exactly; auto: bf16 on CUDA (fp16 where bf16 is not supported), on a CPU bf16 "
                            "only where it is native (AVX512-BF16 or AMX) and measured faster, else float32 (bf16 "
                            "results may differ slightly)")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="memory layout of the fast path (default: auto, channels_last on CUDA, on a CPU the "
                            "layout measured faster for this model in a few calls at start)")
    speed.add_argument("--no-fast", action="store_true",
                       help="plain path: BatchNorm not folded, float32 NCHW unless --amp/--channels-last say "
                            "otherwise (the fast path's outputs equal it within float tolerance)")
    add_weights_arguments(parser.add_argument_group("weights"), "use")


def read_weights_for(network: ModuleType, model_name: str, args: argparse.Namespace,
                     script: str) -> tuple[object, dict, int, InputFormat]:
    """(weights, metadata, crop size, input format) of --weights for `network` of model folder `model_name`, whose
    `script` a file made for another folder is sent to; the flags win over the file, the file over the defaults."""
    weights = read_weights_file(args.weights, trust_pickle=args.trust_pickle)
    metadata = read_checkpoint_metadata(weights)
    check_model_folder(f"--weights {args.weights}", metadata, model_name, script)
    stored = metadata.get("input_format")
    input_format = input_format_from_args(args, InputFormat.from_dict(stored) if stored else network.INPUT_FORMAT)
    Preprocess(input_format)  # reads a --mean-image now, so a bad file is refused before any output folder is made
    return weights, metadata, args.image_size or metadata.get("image_size") or 224, input_format


def build_parser(model_name: str, input_format: InputFormat | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=f"Evaluate {model_name} on an ImageNet-layout val folder (single center crop) and report "
                    "top-1/top-5 accuracy and error, mean loss and images/s, as timm's validate.py does. Under "
                    "torchrun each process evaluates a part and the first reports the whole.")
    parser.add_argument("--weights", "--eval-resume", dest="weights", required=True, metavar="FILE",
                        help="weights to evaluate: a released file of any layout (.pkl/.pth/.pth.tar), a .safetensors "
                             "release or a training checkpoint of this project")
    parser.add_argument("--val-dir", required=True, metavar="DIR",
                        help="val images in ImageFolder layout, one sub-folder per class named by ImageNet wnid "
                             "(or by the class names a checkpoint of this project was trained on)")
    add_data_arguments(parser, batch_size=100)
    parser.add_argument("--num-val-images", "--limit", dest="limit", type=positive_int, metavar="N",
                        help="evaluate only the first N images of the fixed evaluation order (spread over the "
                             "classes; --num-val-images in export.py too, --limit here only)")
    parser.add_argument("--results-json", metavar="FILE",
                        help="write metrics, model, weights (file, SHA-256, --ema or not), data (--val-dir, "
                             "--num-val-images, --class-map), params, MACs, input format, speed settings and "
                             "library versions to FILE")
    parser.add_argument("--predictions-csv", metavar="FILE",
                        help="write per-image top-5 classes (index, name, probability) to FILE")
    parser.add_argument("--class-map", metavar="FILE", help=f"match val folders to network outputs: {CLASS_MAP_HELP}")
    add_model_arguments(parser, input_format)
    return parser


@exit_on_user_error
def run_eval(network: ModuleType, argv: list[str] | None = None, *, load_checkpoint: Callable[..., object]) -> dict:
    """The eval.py command line of a model folder (`network`: its network.py); returns the results. Under torchrun
    each rank evaluates every W-th image and rank 0 reports the sums.
    `load_checkpoint(model, weights, source_name=, use_ema=)` loads a read weights object into the model."""
    model_name = Path(network.__file__).resolve().parent.name
    args = build_parser(model_name, network.INPUT_FORMAT).parse_args(argv)
    # What the data and model code would only find after the weights are read.
    input_format_from_args(args, InputFormat())
    joined = dist.is_available() and dist.is_initialized()  # called from a distributed run: its group stays
    info = init_distributed(args.device)
    try:
        return _run_eval(network, model_name, args, load_checkpoint, info)
    finally:
        if not joined:
            shutdown_distributed()


def _run_eval(network: ModuleType, model_name: str, args: argparse.Namespace, load_checkpoint: Callable[..., object],
              info: DistInfo) -> dict:
    weights, metadata, image_size, input_format = read_weights_for(network, model_name, args, "eval.py")
    num_classes, classes = output_classes(network, weights, metadata)
    # The val folder is checked before the network is built: large models take seconds to build and load.
    folders = scan_image_folder(args.val_dir, "--val-dir")[1]
    loader, _, paths = build_eval_loader(args.val_dir, crop_size=image_size, batch_size=args.batch_size,
                                         workers=args.workers, limit=args.limit, rank=info.rank,
                                         world_size=info.world_size, pin_memory=info.device.type == "cuda",
                                         class_to_index=class_to_index_for(folders, classes, args.class_map))
    # Once the weights and the data are known good, so that a mistyped command leaves no folder behind.
    prepare_outputs({"--results-json": args.results_json, "--predictions-csv": args.predictions_csv},
                    {"--weights": args.weights, "--class-map": args.class_map, "--mean-image": args.mean_image,
                     "--val-dir": paths})
    model = create_network_for(network, num_classes, metadata)
    report = load_checkpoint(model, weights, source_name=str(args.weights), use_ema=args.use_ema)
    del weights
    params = count_parameters(model, include_side_heads=False)
    fast = not args.no_fast
    runner = prepare_inference_model(model, input_format=input_format, device=info.device,
                                     channels_last=args.channels_last, compile=args.compile, amp=args.amp,
                                     fold_bn=fast, image_size=image_size)
    how = ("fast path (BatchNorm folded)" if fast else "plain path") + f", {runner.speed.describe()}"
    on = f"{info.world_size} x {info.device.type}" if info.distributed else str(info.device)
    if info.is_main:
        print(f"{model_name}: {report.summary()}\n{len(paths):,} images of {args.val_dir}, {image_size}px center "
              f"crop of a {EvalTransform(image_size).resize_size}px short side, input {input_format.describe()}; {how}"
              f"{', compiled' if args.compile else ''} on {on}", flush=True)
    results = evaluate(runner, None, loader, progress=info.is_main, keep_predictions=bool(args.predictions_csv))
    if not results["images"]:
        raise NothingEvaluated(f"--val-dir {args.val_dir}: none of its {results['skipped']} image(s) could be "
                               "decoded, so nothing was evaluated and no results were written")
    if args.predictions_csv:
        every_rank = all_gather_objects(results.pop("predictions"), info)
        results["predictions"] = {name: torch.cat([part[name] for part in every_rank]) for name in every_rank[0]}
    if not info.is_main:
        return results
    published = _comparable_published(network, classes, folders, metadata)
    # The files first: a reader of the output that leaves early (`| head`) must not cost them.
    if args.results_json:
        record = _results_record(network, model_name, args, results, metadata, num_classes, input_format, params=params,
                                 image_size=image_size, published=published, device=on, amp=runner.amp,
                                 channels_last=runner.speed.channels_last, compile=args.compile, fast=fast)
        atomic_write_text(args.results_json, json.dumps(record, indent=2) + "\n")
    if args.predictions_csv:
        write_predictions_csv(args.predictions_csv, results.pop("predictions"), paths,
                              output_names(classes, num_classes))
    print(_summary_line(results, published), flush=True)
    warn_if_not_finite(results["loss"], "evaluation", runner.amp)
    return results


def _comparable_published(network: ModuleType, classes: list[str], folders: list[str], metadata: dict) -> dict | None:
    """The published errors where they compare: all 1000 ImageNet classes present, the released architecture."""
    if list(classes) == imagenet_wnids() and len(folders) == len(classes) and not metadata.get("architecture"):
        return {key: network.PUBLISHED[key] for key in ("top1_error", "top5_error")}
    return None


def _results_record(network: ModuleType, model_name: str, args: argparse.Namespace, results: dict, metadata: dict,
                    num_classes: int, input_format: InputFormat, *, params: int, image_size: int, **how) -> dict:
    """The --results-json record: what was evaluated, its metrics, how (`how`), the library versions."""
    with torch.device("meta"):  # the count needs shapes only; a real forward of the large models takes seconds
        macs = count_macs(create_network_for(network, num_classes, metadata), image_size)
    metrics = ("top1_accuracy", "top5_accuracy", "top1_error", "top5_error", "loss", "images", "skipped",
               "images_per_second")
    return {"model": model_name, "weights": str(args.weights), "weights_sha256": file_sha256(args.weights),
            "ema": args.use_ema, "val_dir": str(args.val_dir), "num_val_images": args.limit,
            "class_map": args.class_map, "input_format": {**input_format.to_dict(),
                                                          "description": input_format.describe()},
            **{key: results[key] for key in metrics}, "params": params, "macs": macs, "image_size": image_size,
            **how, "versions": library_versions(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _summary_line(results: dict, published: dict | None) -> str:
    """timm validate.py's summary, ` * Acc@1 a (error) Acc@5 b (error)`, with loss, count and speed."""
    skipped = f" ({results['skipped']:,} skipped: undecodable)" if results["skipped"] else ""
    reference = (f"  [published error: top-1 {published['top1_error']}, top-5 {published['top5_error']}]"
                 if published else "")
    return (f" * Acc@1 {results['top1_accuracy']:.3f} ({results['top1_error']:.3f}) "
            f"Acc@5 {results['top5_accuracy']:.3f} ({results['top5_error']:.3f})  loss {results['loss']:.4f}  "
            f"{results['images']:,} images{skipped}  {results['images_per_second']:.1f} images/s{reference}")
