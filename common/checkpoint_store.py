"""The checkpoint folder: file names, SHA-256 sidecars, atomic saving, scanning, retention and best-K selection.
`checkpoint-<iteration, 10 digits>.pth` (torch.save zip, tensors packed by common.tensor_pack) counts only with its
`checkpoint-<iteration>.json` sidecar and when its size and SHA-256 match it. One writer per folder (rank 0)."""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist

from common.atomic_io import file_sha256, fsync_dir, remove_quietly, temp_path, write_hashed
from common.errors import UserError
from common.model_state import CHECKPOINT_FORMAT, read_weights_file
from common.tensor_pack import pack_tensors

_DATA_RE = re.compile(r"^checkpoint-(\d+)\.pth$")
_SIDECAR_RE = re.compile(r"^checkpoint-(\d+)\.json$")
_TEMP_RE = re.compile(r"^\.checkpoint-(\d+)\.(?:pth|json)\.\d+\.tmp$")
# Other names with these endings in a checkpoint folder are reported as foreign files.
_WEIGHT_SUFFIXES = (".pth", ".pt", ".pkl", ".tar", ".ckpt", ".bin")
# Accuracy aliases: checkpoints record errors; "top1" means 100 - top1_error, where higher is better.
_ACCURACY_ALIASES = {"top1": "top1_error", "top5": "top5_error"}
# Checkpoints whose SHA-256 this process has checked, by (path, inode, size, mtime): a resume that picks the newest
# good checkpoint (one full hash) and then loads it, or a script that reads a file twice, hashes it once.
_VERIFIED: set[tuple[str, int, int, int]] = set()
# Checkpoints are hashed in pieces of this size, on every core (see atomic_io.pieces_sha256); the sidecar records it.
PIECE_BYTES = 64 << 20
_ADVICE = "use an earlier checkpoint (a resumed run picks the newest good one by itself)"


class CheckpointError(UserError):
    """A checkpoint that cannot be used as asked."""


class CheckpointWriteError(CheckpointError):
    """Saving failed (disk full, no permission, ...); the checkpoints written before are untouched."""

    exit_status = 1  # a failure during the work, as errors.py's file-system failures


class CheckpointCorruptError(CheckpointError):
    """A checkpoint whose sidecar is missing or unreadable, or whose size or SHA-256 does not match it."""


class CheckpointWarning(UserWarning):
    """A file in a checkpoint folder that get_latest_model passed over."""


@dataclass
class CheckpointInfo:
    """A complete checkpoint as its sidecar describes it."""

    path: Path
    iteration: int
    sha256: str  # of the file's pieces of piece_bytes (see atomic_io.pieces_sha256), or of the whole file if None
    size: int
    piece_bytes: int | None = None
    metrics: dict = field(default_factory=dict)


# -- saving ---------------------------------------------------------------------------------------------------

def save_checkpoint(state: dict, iters: int, save_dir: str | os.PathLike, *, keep: int = 5,
                    best_metric_name: str | None = None) -> Path | None:
    """Write `state` as checkpoint `iters` in `save_dir` atomically, then keep the newest `keep` plus the best by
    `best_metric_name` (lower is better unless it is an accuracy); the new path, or None on ranks other than 0.
    The sidecar is renamed into place before the data file: alone, it marks an unfinished save."""
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    if keep < 1:
        raise CheckpointError(f"keep={keep}: at least one checkpoint must be kept")
    if iters < 0:
        raise CheckpointError(f"iteration {iters} is negative")
    save_dir = Path(save_dir)
    data_path = save_dir / f"checkpoint-{int(iters):010d}.pth"
    sidecar_path = data_path.with_suffix(".json")
    data_temp, sidecar_temp = temp_path(data_path), temp_path(sidecar_path)
    sidecar_alone = False
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        for entry in os.scandir(save_dir):
            if _TEMP_RE.match(entry.name):  # left by a killed writer: with one writer per folder, none is in use
                remove_quietly(Path(entry.path))
        packed, tensor_bytes = pack_tensors(state)
        digest, size = write_hashed(data_temp, lambda file: _save_without_crc(packed, file), piece_bytes=PIECE_BYTES,
                                    substitute=tensor_bytes)
        sidecar = {"format": CHECKPOINT_FORMAT, "file": data_path.name, "iteration": int(iters),
                   "pieces_sha256": digest, "piece_bytes": PIECE_BYTES, "size": size,
                   "metrics": to_plain(state.get("metrics") or {}, json_only=True)}
        write_hashed(sidecar_temp, lambda file: file.write(json.dumps(sidecar, indent=1).encode() + b"\n"))
        os.replace(sidecar_temp, sidecar_path)
        sidecar_alone = True
        fsync_dir(save_dir)
        os.replace(data_temp, data_path)
        sidecar_alone = False
        fsync_dir(save_dir)
    except BaseException as error:
        for temp in (data_temp, sidecar_temp):
            remove_quietly(temp)
        if sidecar_alone:
            remove_quietly(sidecar_path)
        if isinstance(error, OSError):
            raise CheckpointWriteError(_write_error_text(save_dir, data_path.name, error)) from error
        raise
    _apply_retention(save_dir, keep, int(iters), best_metric_name)
    return data_path


def to_plain(value: Any, *, json_only: bool = False) -> Any:
    """`value` as plain Python values (and tensors unless `json_only`) that weights_only loading reads: namespaces
    become dicts, tuples lists, numpy values numbers or tensors, anything else (paths, dtypes) its text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if isinstance(value, torch.Tensor):
        if json_only:
            return value.item() if value.numel() == 1 else value.tolist()
        return value.detach()
    if isinstance(value, Mapping):
        return {key if isinstance(key, (str, int)) and not isinstance(key, bool) else str(key):
                to_plain(item, json_only=json_only) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_plain(item, json_only=json_only) for item in value]
    if isinstance(value, argparse.Namespace):
        return to_plain(vars(value), json_only=json_only)
    return str(value)


# -- finding and reading --------------------------------------------------------------------------------------

def list_checkpoints(save_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """The complete checkpoints in `save_dir` (sidecar present, sizes agreeing; SHA-256 not checked), oldest first."""
    return _scan(Path(save_dir))[0]


def get_latest_model(save_dir: str | os.PathLike) -> tuple[Path | None, int]:
    """(path, iteration) of the newest checkpoint that passes its size and SHA-256 check, (None, 0) if none; a
    CheckpointWarning line for each unfinished, damaged or foreign file passed over."""
    complete, problems = _scan(Path(save_dir))
    chosen = None
    for info in reversed(complete):
        if _hash_matches(info):
            chosen = info
            break
        problems.append((info.iteration, info.path, "its SHA-256 does not match its sidecar: the file is damaged"))
    floor = chosen.iteration if chosen else -1
    for iteration, path, reason in sorted(problems, key=lambda item: (item[0] is None, item[0] or 0, item[1])):
        if iteration is None or iteration > floor:
            warnings.warn(f"skipping {path}: {reason}", CheckpointWarning, stacklevel=2)
    return (chosen.path, chosen.iteration) if chosen else (None, 0)


def read_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> Any:
    """The object stored in checkpoint `path`, its size and SHA-256 checked against the sidecar first (once per
    process; not at all with `verify=False`, for a file without its sidecar)."""
    path = Path(path)
    if verify:
        _verify_once(path)
    return read_weights_file(path, verify=False)


def verify_checkpoint(path: str | os.PathLike, check_hash: bool = True) -> CheckpointInfo:
    """`path`'s sidecar; CheckpointCorruptError unless `path` has one and matches its size (and SHA-256)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointCorruptError(f"{path}: no such checkpoint file; check the path")
    match = _DATA_RE.match(path.name)
    sidecar_path = path.with_suffix(".json")
    if match is None or not sidecar_path.is_file():
        raise CheckpointCorruptError(f"{path} has no sidecar {sidecar_path.name}, so its integrity cannot be "
                                     "checked; load it with verify=False if you know where it comes from")
    try:
        info = _parse_sidecar(path, sidecar_path, int(match.group(1)))
    except CheckpointCorruptError as error:
        raise CheckpointCorruptError(f"{path}: {error}; {_ADVICE}") from None
    if check_hash and not _hash_matches(info):
        raise CheckpointCorruptError(f"{path}: its SHA-256 does not match its sidecar, the file is damaged; {_ADVICE}")
    return info


def verify_if_checkpoint(path: str | os.PathLike) -> CheckpointInfo | None:
    """Check a checkpoint of this project (checkpoint-<iteration>.pth, its sidecar beside it) against its sidecar once
    per process (CheckpointCorruptError) and return the sidecar's description; None for any other file."""
    path = Path(path)
    if _DATA_RE.match(path.name) and path.with_suffix(".json").is_file():
        return _verify_once(path)
    return None


# -- best K ---------------------------------------------------------------------------------------------------

def default_lower_is_better(metric: str) -> bool | None:
    """The direction of a known metric: errors and losses fall, accuracies rise; None when unknown."""
    if metric in ("top1", "top5", "accuracy"):
        return False
    if metric.endswith("_error") or "loss" in metric:
        return True
    return None


def metric_value(metrics: Mapping, metric: str) -> float | None:
    """`metric` from a checkpoint's recorded metrics (with the top1/top5 accuracy aliases); None if absent."""
    value = metrics.get(metric)
    if value is None and metric in _ACCURACY_ALIASES:
        error = metrics.get(_ACCURACY_ALIASES[metric])
        value = 100.0 - error if _is_number(error) else None
    return float(value) if _is_number(value) and math.isfinite(value) else None


def best_checkpoints(checkpoints: list[CheckpointInfo], k: int, metric: str,
                     lower_is_better: bool) -> list[CheckpointInfo]:
    """The best `k` of `checkpoints` by their recorded `metric`, best first; on a tie the newer one wins.
    Checkpoints without a finite value of the metric are left out."""
    scored = [(value, info) for info in checkpoints if (value := metric_value(info.metrics, metric)) is not None]
    sign = 1.0 if lower_is_better else -1.0
    scored.sort(key=lambda pair: (sign * pair[0], -pair[1].iteration))
    return [info for _, info in scored[:k]]


# -- internals ------------------------------------------------------------------------------------------------

def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _save_without_crc(state: dict, file: BinaryIO) -> None:
    """torch.save without the zip's CRC-32s: an extra pass over the bytes, which the sidecar's SHA-256 covers."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, file)
    finally:
        torch.serialization.set_crc32_options(previous)


def _scan(save_dir: Path) -> tuple[list[CheckpointInfo], list[tuple[int | None, Path, str]]]:
    """Complete checkpoints by the cheap checks (sidecar readable, sizes agree); (iteration, path, why) for the rest."""
    if not save_dir.is_dir():
        return [], []
    entries = {entry.name: entry for entry in os.scandir(save_dir)}
    complete, problems = [], []
    for name, entry in entries.items():
        path = Path(entry.path)
        if match := _DATA_RE.match(name):
            iteration, sidecar_path = int(match.group(1)), path.with_suffix(".json")
            if sidecar_path.name not in entries:
                problems.append((iteration, path, f"no sidecar {sidecar_path.name}: an unfinished save or a file not "
                                                  "written by this project"))
                continue
            try:
                complete.append(_parse_sidecar(path, sidecar_path, iteration))
            except (CheckpointCorruptError, OSError) as error:
                problems.append((iteration, path, str(error)))
        elif match := _TEMP_RE.match(name):
            problems.append((int(match.group(1)), path, "an unfinished save (temporary file)"))
        elif name.endswith(_WEIGHT_SUFFIXES) and entry.is_file():
            problems.append((None, path, "not a checkpoint of this project (its name does not fit "
                                         "checkpoint-<iteration>.pth)"))
    complete.sort(key=lambda info: info.iteration)
    return complete, problems


def _parse_sidecar(path: Path, sidecar_path: Path, iteration: int) -> CheckpointInfo:
    """The sidecar's description of `path`, checked against the file's name and size."""
    try:
        sidecar = json.loads(sidecar_path.read_bytes())
        if sidecar.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointCorruptError(f"{sidecar_path.name} was not written by this project")
        if sidecar.get("iteration") != iteration:
            raise CheckpointCorruptError(f"{sidecar_path.name} describes iteration {sidecar.get('iteration')}")
        # Sidecars written before checkpoints were hashed in pieces hold the whole file's "sha256".
        pieces = "pieces_sha256" in sidecar
        piece_bytes = sidecar["piece_bytes"] if pieces else None
        if pieces and (type(piece_bytes) is not int or piece_bytes < 1):
            raise ValueError(f"piece_bytes {piece_bytes!r}")  # reported below as an unreadable sidecar
        info = CheckpointInfo(path, iteration, str(sidecar["pieces_sha256" if pieces else "sha256"]),
                              int(sidecar["size"]), piece_bytes, dict(sidecar.get("metrics") or {}))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointCorruptError(f"its sidecar {sidecar_path.name} is unreadable") from None
    if (size := path.stat().st_size) != info.size:
        raise CheckpointCorruptError(f"it has {size} bytes, its sidecar says {info.size}: an unfinished or "
                                     "damaged save")
    return info


def _verify_once(path: Path) -> CheckpointInfo:
    return verify_checkpoint(path, check_hash=_identity(path) not in _VERIFIED)


def _hash_matches(info: CheckpointInfo) -> bool:
    """Whether the file's SHA-256 is its sidecar's; a match is remembered in _VERIFIED."""
    try:
        matches = file_sha256(info.path, info.piece_bytes) == info.sha256
    except OSError:
        return False
    if matches and (identity := _identity(info.path)) is not None:
        _VERIFIED.add(identity)
    return matches


def _identity(path: Path) -> tuple[str, int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns


def _apply_retention(save_dir: Path, keep: int, newest: int, metric: str | None) -> None:
    complete, _ = _scan(save_dir)
    kept = {info.iteration for info in complete[-keep:]} | {newest}
    if metric is not None:
        kept |= {info.iteration for info in best_checkpoints(complete, 1, metric,
                                                             default_lower_is_better(metric) is not False)}
    for info in complete:
        if info.iteration not in kept:
            for path in (info.path, info.path.with_suffix(".json")):
                try:
                    path.unlink(missing_ok=True)
                except OSError as error:
                    warnings.warn(f"could not remove old checkpoint {path}: {error.strerror}", CheckpointWarning,
                                  stacklevel=3)
    # Sidecars whose data file never arrived (a save killed between its two renames).
    for entry in os.scandir(save_dir):
        match = _SIDECAR_RE.match(entry.name)
        if match and int(match.group(1)) not in kept and not Path(entry.path).with_suffix(".pth").exists():
            remove_quietly(Path(entry.path))


def _write_error_text(save_dir: Path, name: str, error: OSError) -> str:
    reason = error.strerror or str(error)
    code = errno.errorcode.get(error.errno or 0)
    hint = {errno.ENOSPC: "free some disk space or choose another --save",
            errno.EDQUOT: "free some quota or choose another --save",
            errno.EACCES: "choose a folder you can write to (--save)",
            errno.EROFS: "choose a folder you can write to (--save)"}.get(error.errno, "check the folder")
    return (f"could not save {name} in {save_dir}: {reason}{f' ({code})' if code else ''}; the checkpoints "
            f"saved before are intact; {hint}")
