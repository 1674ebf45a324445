"""Average the weights of checkpoints, e.g. the best K of a training run by a metric recorded in their sidecars,
one memory-mapped tensor at a time, so that memory stays near one output file's size.

    python -m common.average --save models --best 5 --metric top1 --output avg.safetensors
    python -m common.average --inputs a.pth b.pth c.pth --ema --output avg.pth"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from common.checkpoint_store import (CheckpointCorruptError, CheckpointInfo, best_checkpoints,
                                     default_lower_is_better, list_checkpoints, metric_value, verify_if_checkpoint)
from common.cli import ArgumentParser, add_weights_arguments, positive_int, prepare_outputs, progress_bar
from common.errors import UserError, exit_on_user_error, listed
from common.release import shareable_metadata, write_release
from common.model_state import extract_model_state, read_checkpoint_metadata, read_weights_file

_BATCHNORM_NOTE = ("an average's BatchNorm statistics are means of its inputs' and do not fit its weights: "
                   "re-estimate them before judging it, by running the training command again with "
                   "--average-best K --recompute-bn N (at the end of a finished run it only averages the best K "
                   "checkpoints and re-estimates over N training batches, e.g. 200)")
# Elements per slice when summing: 256 kB of float64 fits a core's cache, and torch's grain size, below which an op
# runs on one thread (a busy machine's other threads slow every parallel op down).
_CHUNK = 1 << 15


@dataclass
class _Input:
    """One memory-mapped input: its clean model tensors, its metadata and the address ranges that map its file."""

    path: Path
    state: dict[str, torch.Tensor]
    metadata: dict
    mapped: list[tuple[int, int]]


# -- selection ------------------------------------------------------------------------------------------------

def select_best_checkpoints(save_dir: str | os.PathLike, k: int, metric: str,
                            lower_is_better: bool | None = None) -> list[CheckpointInfo]:
    """The best `k` checkpoints in `save_dir` by `metric`, best first, newer first on a tie; from the sidecars on disk.
    Checkpoints without the metric are left out with a note; none recording it is a UserError."""
    if k < 1:
        raise UserError(f"the number of checkpoints to average must be at least 1, got {k}")
    if lower_is_better is None:
        lower_is_better = default_lower_is_better(metric)
        if lower_is_better is None:
            raise UserError(f"is a lower or a higher {metric!r} better? say --lower-is-better or "
                            f"--higher-is-better (known metrics: top1_error, top5_error, loss, top1, top5)")
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        raise UserError(f"{save_dir}: no such folder; give the --save dir of the training run")
    checkpoints = list_checkpoints(save_dir)
    if not checkpoints:
        raise UserError(f"{save_dir} holds no checkpoints (checkpoint-*.pth with their .json sidecars)")
    ranked = best_checkpoints(checkpoints, len(checkpoints), metric, lower_is_better)
    if not ranked:
        recorded = sorted({name for info in checkpoints for name in info.metrics})
        raise UserError(f"none of the {len(checkpoints)} checkpoints in {save_dir} records {metric!r}; "
                        f"they record: {', '.join(recorded) or 'no metrics at all'}")
    if unscored := [info.path.name for info in checkpoints if metric_value(info.metrics, metric) is None]:
        _note(f"{len(unscored)} checkpoint(s) in {save_dir} record no {metric!r} and are left out "
              f"({listed(unscored)})")
    # A damaged checkpoint is passed over as a resumed run passes it over; the next best takes its place. Each
    # file is hashed once per process, so reading the chosen ones later does not hash them again.
    chosen = []
    for info in ranked:
        if len(chosen) == k:
            break
        try:
            verify_if_checkpoint(info.path)
            chosen.append(info)
        except CheckpointCorruptError:
            _note(f"{info.path.name} does not match the SHA-256 of its sidecar (the file is damaged) and is left out")
    if not chosen:
        raise UserError(f"every checkpoint in {save_dir} that records {metric!r} is damaged (none matches the "
                        "SHA-256 of its sidecar)")
    if len(chosen) < k:
        _note(f"asked for the best {k} by {metric!r} but only {len(chosen)} good checkpoint(s) record it; "
              "using those")
    return chosen


# -- averaging ------------------------------------------------------------------------------------------------

def average_checkpoints(paths: Sequence[str | os.PathLike], output: str | os.PathLike | None = None, *,
                        use_ema: bool = False, trust_pickle: bool = False,
                        progress: bool = True) -> dict[str, torch.Tensor]:
    """The element-wise mean (in float64) of the model (or EMA) weights of `paths`, written to `output` if given.
    Integer tensors (num_batches_tracked) come from the newest input (highest recorded iteration, else the last path):
    a mean of counters counts nothing. Keys, shapes and kinds of dtype must agree."""
    paths = [Path(path) for path in paths]
    if not paths:
        raise UserError("nothing to average: give at least one checkpoint")
    seen = set()
    for path in paths:
        if path.resolve() in seen:
            raise UserError(f"{path} is given twice; list each checkpoint once")
        seen.add(path.resolve())
    if output is not None and Path(output).resolve() in seen:
        raise UserError(f"the output {output} is one of the inputs; write the average to a new file")

    inputs = [_open_input(path, use_ema, trust_pickle) for path in paths]
    _check_same_layout(inputs)
    newest = inputs[_newest([item.metadata for item in inputs])]
    averaged: dict[str, torch.Tensor] = {}
    total, scratch = torch.empty(_CHUNK, dtype=torch.float64), torch.empty(_CHUNK, dtype=torch.float64)
    total_bytes = sum(tensor.nbytes for item in inputs for tensor in item.state.values())
    with progress_bar(total=total_bytes, unit="B", unit_scale=True, desc="averaging", disable=not progress,
                      leave=False) as bar:
        for key in inputs[0].state:
            tensors = [item.state[key] for item in inputs]
            if tensors[0].is_floating_point():
                averaged[key] = torch.empty(tensors[0].shape, dtype=newest.state[key].dtype)
                _mean_into(averaged[key], tensors, total, scratch)
            else:
                averaged[key] = newest.state[key].clone(memory_format=torch.contiguous_format)
            for item, tensor in zip(inputs, tensors):
                _release_pages(tensor, item.mapped)
            bar.update(sum(tensor.nbytes for tensor in tensors))
    if output is not None:
        metadata = _metadata_of([(item.path, item.metadata) for item in inputs], use_ema)
        write_release(Path(output), averaged, metadata)
        if Path(output).suffix != ".safetensors" and (lost := [key for key in _NETWORK_FACTS if metadata.get(key)]):
            print(f"note: {output} is a plain torch.save state dict, which holds no metadata: the {', '.join(lost)} "
                  "the inputs record are not in it, so eval.py, predict.py and export.py will take it for ImageNet's "
                  "classes at 224px; name it .safetensors to keep them")
    return averaged


# What the scripts read from a file's metadata to rebuild and feed its network, beyond the weights.
_NETWORK_FACTS = ("classes", "num_classes", "image_size", "architecture", "input_format")


def average_metadata(paths: Sequence[str | os.PathLike]) -> dict:
    """What an average of `paths` says about itself: the newest input's shareable metadata, and each input with its
    iteration and metrics; no score of its own (nobody measured it; train.py --average-best adds "validation")."""
    return _metadata_of([(Path(path), read_checkpoint_metadata(path)) for path in paths], use_ema=False)


def _metadata_of(sources: list[tuple[Path, dict]], use_ema: bool) -> dict:
    newest = sources[_newest([metadata for _, metadata in sources])][1]
    metadata = {key: value for key, value in shareable_metadata(newest).items()
                if key not in ("iteration", "metrics", "bn_recalibrated")}
    metadata["time_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    metadata["averaged_from"] = [{"file": path.name, "iteration": source.get("iteration"),
                                  "metrics": source.get("metrics") or {}} for path, source in sources]
    metadata["weights"] = "ema" if use_ema else "model"
    metadata["batchnorm_statistics"] = "means of the inputs' running statistics (not re-estimated)"
    return metadata


def _newest(metadata: list[dict]) -> int:
    """The index of the input with the highest recorded iteration (the later one on a tie), else the last one."""
    iterations = [item.get("iteration") for item in metadata]
    if all(isinstance(iteration, int) for iteration in iterations):
        return max(range(len(iterations)), key=lambda index: (iterations[index], index))
    return len(iterations) - 1


def _mean_into(mean: torch.Tensor, tensors: list[torch.Tensor], total: torch.Tensor, scratch: torch.Tensor) -> None:
    """Write the float64 mean of `tensors` into `mean`; `total` and `scratch`: reused buffers of _CHUNK float64."""
    flats = [tensor.reshape(-1) for tensor in tensors]
    flat_mean = mean.view(-1)
    # A slice at a time keeps the float64 sum in cache; a float64 copy plus a same-dtype add is vectorised, a
    # mixed-dtype add_ is not.
    for start in range(0, flat_mean.numel(), _CHUNK):
        stop = min(start + _CHUNK, flat_mean.numel())
        running = total[:stop - start].copy_(flats[0][start:stop])
        for flat in flats[1:]:
            running.add_(scratch[:stop - start].copy_(flat[start:stop]))
        flat_mean[start:stop].copy_(running.div_(len(flats)))


def _open_input(path: Path, use_ema: bool, trust_pickle: bool) -> _Input:
    # read_weights_file maps zip checkpoints and safetensors files: no tensor data is read here.
    obj = read_weights_file(path, trust_pickle=trust_pickle)
    return _Input(path, extract_model_state(obj, use_ema=use_ema, source=str(path)), read_checkpoint_metadata(obj),
                  _mapped_ranges(path))


def _check_same_layout(inputs: list[_Input]) -> None:
    reference = inputs[0]
    for other in inputs[1:]:
        _check_same_network(reference, other)
        missing = [key for key in reference.state if key not in other.state]
        extra = [key for key in other.state if key not in reference.state]
        if missing or extra:
            parts = ([f"lacks {len(missing)} of its keys ({listed(missing)})"] if missing else []) + \
                ([f"has {len(extra)} it lacks ({listed(extra)})"] if extra else [])
            raise UserError(f"{other.path} and {reference.path} hold different tensors: {other.path} "
                            f"{' and '.join(parts)}; average checkpoints of one architecture")
        if misshaped := [key for key, tensor in reference.state.items() if tensor.shape != other.state[key].shape]:
            key = misshaped[0]
            more = f" (and {len(misshaped) - 1} more keys)" if len(misshaped) > 1 else ""
            raise UserError(f"{key} has shape {tuple(reference.state[key].shape)} in {reference.path} but "
                            f"{tuple(other.state[key].shape)} in {other.path}{more}; average checkpoints of one "
                            f"architecture and number of classes")
        for key, tensor in reference.state.items():
            theirs = other.state[key]
            if tensor.is_floating_point() != theirs.is_floating_point():
                raise UserError(f"{key} is {tensor.dtype} in {reference.path} but {theirs.dtype} in {other.path}; "
                                f"floating-point and integer tensors cannot be averaged together")


def _check_same_network(reference: _Input, other: _Input) -> None:
    """What the metadata of this project's files tell before the tensors: the model, a searched architecture and the
    classes (same-shaped classifiers of other classes would average rows that mean different classes)."""
    ours, theirs = reference.metadata, other.metadata
    if ours.get("arch", theirs.get("arch")) != theirs.get("arch", ours.get("arch")):
        raise UserError(f"{other.path} holds {theirs['arch']} and {reference.path} {ours['arch']}; average "
                        "checkpoints of one architecture")
    if ours.get("architecture") != theirs.get("architecture"):
        raise UserError(f"{other.path} and {reference.path} hold different searched OneShot architectures; average "
                        "checkpoints of one architecture")
    if ours.get("classes", theirs.get("classes")) != theirs.get("classes", ours.get("classes")):
        different = [name for name in theirs["classes"] if name not in ours["classes"]] or theirs["classes"]
        raise UserError(f"{other.path} and {reference.path} were trained on other classes ({listed(different)} in "
                        f"{other.path}), so the same classifier rows stand for other classes; average checkpoints of "
                        "runs on the same class folders")


# -- memory: dropping the pages of a mapped input once a tensor has been summed --------------------------------

def _libc_madvise():
    """libc's madvise, which takes any address (mmap.madvise only ranges of Python's own mappings); Linux only."""
    if not sys.platform.startswith("linux"):
        return None
    function = ctypes.CDLL(None, use_errno=True).madvise
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


_MADVISE = _libc_madvise()


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges where this process maps `path` (Linux); empty elsewhere or for a file read whole."""
    if _MADVISE is None:
        return []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
        inode = path.stat().st_ino
    except OSError:
        return []
    real = str(path.resolve())
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == real and int(fields[4]) == inode:
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def _release_pages(tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Drop the pages wholly inside `tensor` from memory, or the process grows to all inputs' size."""
    # Only pages of our private, never written file mappings: they read back from the file; anonymous ones would zero.
    if not mapped or tensor.nbytes == 0:
        return
    start = -(-tensor.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (tensor.data_ptr() + tensor.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start and any(low <= start and end <= high for low, high in mapped):
        _MADVISE(start, end - start, mmap.MADV_DONTNEED)


# -- command line ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m common.average",
        description="Average the weights of checkpoints: the best K of a training run by a recorded metric, or an "
                    "explicit list of files. Streams: memory stays near the size of one output file.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--save", "--save-dir", dest="save", metavar="DIR",
                        help="a training run's checkpoint folder (train.py's --save): average its best --best K "
                             "checkpoints by --metric (--save-dir is the old name)")
    source.add_argument("--inputs", nargs="+", metavar="FILE",
                        help="average exactly these weights files (.pth checkpoints, .safetensors, ...)")
    parser.add_argument("--best", type=positive_int, metavar="K", help="with --save: how many of the best to average")
    parser.add_argument("--metric", default="top1_error",
                        help="validation metric recorded with each checkpoint: top1_error, top5_error, loss, or "
                             "top1/top5 for accuracy (100 - error) (default: top1_error)")
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument("--lower-is-better", dest="lower_is_better", action="store_true", default=None,
                           help="smaller values of --metric are better (default for *_error and loss)")
    direction.add_argument("--higher-is-better", dest="lower_is_better", action="store_false",
                           help="larger values of --metric are better (default for top1, top5)")
    parser.add_argument("--output", required=True, metavar="FILE",
                        help="where to write the average: .safetensors (with metadata) or any other name for a "
                             "torch.save state dict, which keeps no class names, image size or architecture (a "
                             "note names what it leaves out); written atomically")
    add_weights_arguments(parser, "average")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.save is not None:
        if args.best is None:
            parser.error("--save needs --best K")
        chosen = select_best_checkpoints(args.save, args.best, args.metric, args.lower_is_better)
        paths, metrics = [info.path for info in chosen], [info.metrics for info in chosen]
    else:
        if args.best is not None:
            parser.error("--best goes with --save; --inputs averages every file given")
        paths = [Path(name) for name in args.inputs]
        if missing := [str(path) for path in paths if not path.is_file()]:
            raise UserError(f"--inputs: no such file: {listed(missing)}; check the paths")
        infos = [verify_if_checkpoint(path) for path in paths]
        metrics = [{} if info is None else info.metrics for info in infos]
    # After the inputs are known and checked, so that a refused command leaves no output folder behind.
    prepare_outputs({"--output": args.output}, {"--inputs": [str(path) for path in paths]})
    averaged = average_checkpoints(paths, args.output, use_ema=args.use_ema, trust_pickle=args.trust_pickle,
                                   progress=not args.no_progress)
    chosen_text = ", ".join(_describe(path, recorded, args.metric) for path, recorded in zip(paths, metrics))
    size = os.path.getsize(args.output)
    digest = Path(f"{args.output}.sha256").read_text().split()[0]  # written beside it, hashed while writing
    print(f"averaged {len(paths)} checkpoint(s) ({'EMA' if args.use_ema else 'model'} weights): {chosen_text} -> "
          f"{args.output} ({size / 1e6:.1f} MB, sha256 {digest}) in "
          f"{time.perf_counter() - started:.1f} s")
    if any(key.endswith("running_mean") for key in averaged):
        note_batchnorm_statistics(len(paths))
    return 0


def _describe(path: Path, metrics: Mapping, metric: str) -> str:
    value = metric_value(metrics, metric)
    return path.name if value is None else f"{path.name} ({metric} {value:.3f})"


def note_batchnorm_statistics(inputs: int) -> None:
    """The note that an average's BatchNorm statistics need re-estimating; an "average" of one input keeps its own."""
    if inputs > 1:
        _note(_BATCHNORM_NOTE)


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
