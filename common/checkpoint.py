"""Training checkpoints: the full state of a run, written atomically with a SHA-256 sidecar, found and restored.

Folder layout: `checkpoint-<iteration, 10 digits>.pth` (the state, torch.save zip format, tensors and plain values
only, so it loads with weights_only=True) and `checkpoint-<iteration>.json` beside it:
`{"format", "file", "iteration", "sha256", "size", "metrics"}`. A checkpoint counts only when both exist and the
data file's size and SHA-256 match the sidecar. Names are ordered by their parsed integer, so iteration counts past
ten digits still sort. One writer per folder (rank 0 of a run).
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import importlib.metadata
import json
import math
import mmap
import os
import platform
import random
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from common.errors import UserError
from common.model_state import CHECKPOINT_FORMAT, load_model_state, read_weights_file, unwrap_model

_DATA_RE = re.compile(r"^checkpoint-(\d+)\.pth$")
_SIDECAR_RE = re.compile(r"^checkpoint-(\d+)\.json$")
_TEMP_RE = re.compile(r"^\.checkpoint-(\d+)\.(?:pth|json)\.\d+\.tmp$")
# Other names with these endings in a checkpoint folder are reported as foreign files.
_WEIGHT_SUFFIXES = (".pth", ".pt", ".pkl", ".tar", ".ckpt", ".bin")
# Integer attributes that EMA helpers use to count their updates (e.g. `updates` in YOLO-style ModelEMA).
_EMA_COUNTERS = ("updates", "num_updates")
# Writes at least this large are hashed in a second thread while they are written.
_PARALLEL_HASH_BYTES = 1 << 20
# Bytes hashed per step when checking a file, each step asking the disk for the next.
_HASH_CHUNK = 16 << 20


class CheckpointError(UserError):
    """A checkpoint that cannot be used as asked."""


class CheckpointWriteError(CheckpointError):
    """Saving failed (disk full, no permission, ...); the checkpoints written before are untouched."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint whose sidecar is missing or unreadable, or whose size or SHA-256 does not match it."""


class CheckpointWarning(UserWarning):
    """A file in a checkpoint folder that get_latest_model passed over."""


@dataclass
class CheckpointInfo:
    """A complete checkpoint as its sidecar describes it."""

    path: Path
    iteration: int
    sha256: str
    size: int
    metrics: dict = field(default_factory=dict)


def get_training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                       scaler: Any = None, ema: Any = None, *, iteration: int, best_metric: float | None = None,
                       data_position: dict | None = None, metrics: dict | None = None,
                       metadata: dict | None = None) -> dict:
    """Everything needed to continue a run exactly, as tensors and plain values only.

    The returned tensors are shared with the live objects (no copy): save it right away.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "iteration": int(iteration),
        "best_metric": None if best_metric is None else float(best_metric),
        "model": unwrap_model(model).state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "ema": None if ema is None else _ema_state(ema),
        "data_position": to_plain(data_position or {}),
        "metrics": to_plain(metrics or {}, json_only=True),
        "rng": _rng_state(),
        "metadata": {**to_plain(metadata or {}), "versions": library_versions(),
                     "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }


def save_checkpoint(state: dict, iters: int, save_dir: str | os.PathLike, *, keep: int = 5,
                    best_metric_name: str | None = None, lower_is_better: bool = True) -> Path | None:
    """Write `state` as checkpoint `iters` in `save_dir` atomically; then keep the newest `keep` plus the best.

    Returns the new file's path, or None on distributed ranks other than 0, which write nothing.
    Write order (each step safe to interrupt; get_latest_model also checks size and SHA-256, so even a
    reordering by the filesystem after a power cut cannot make it pick a bad file):
    1. the state goes to a hidden temporary file in the same folder, hashed while written, then flushed and
       fsynced: until the rename below, no visible name refers to it;
    2. the sidecar goes to its own temporary file, fsynced, then is renamed into place and the folder fsynced:
       a sidecar without its data file is an unfinished save and is skipped;
    3. the data file is renamed into place and the folder fsynced: from here on the checkpoint is complete.
       Sidecar first means a visible data file always has its sidecar, so no reader sees an unverifiable file.
    4. only then are old checkpoints beyond the retention removed (data file first, then its sidecar).
    Re-saving an existing iteration replaces it; between steps 2 and 3 that iteration fails its check and
    get_latest_model falls back to the previous one.
    """
    if _is_secondary_rank():
        return None
    if keep < 1:
        raise CheckpointError(f"keep={keep}: at least one checkpoint must be kept")
    if iters < 0:
        raise CheckpointError(f"iteration {iters} is negative")
    save_dir = Path(save_dir)
    data_path = save_dir / f"checkpoint-{int(iters):010d}.pth"
    sidecar_path = data_path.with_suffix(".json")
    data_temp, sidecar_temp = _temp_path(data_path), _temp_path(sidecar_path)
    sidecar_placed = data_placed = False
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(save_dir)
        digest, size = _write_temp(data_temp, lambda file: _save_without_crc(state, file))
        sidecar = {"format": CHECKPOINT_FORMAT, "file": data_path.name, "iteration": int(iters), "sha256": digest,
                   "size": size, "metrics": to_plain(state.get("metrics") or {}, json_only=True)}
        _write_temp(sidecar_temp, lambda file: file.write(json.dumps(sidecar, indent=1).encode() + b"\n"))
        os.replace(sidecar_temp, sidecar_path)
        sidecar_placed = True
        _fsync_dir(save_dir)
        os.replace(data_temp, data_path)
        data_placed = True
        _fsync_dir(save_dir)
    except BaseException as error:
        for temp in (data_temp, sidecar_temp):
            _remove_quietly(temp)
        if sidecar_placed and not data_placed:
            _remove_quietly(sidecar_path)
        if isinstance(error, OSError):
            raise CheckpointWriteError(_write_error_text(save_dir, data_path.name, error)) from error
        raise
    _apply_retention(save_dir, keep, int(iters), best_metric_name, lower_is_better)
    return data_path


def list_checkpoints(save_dir: str | os.PathLike, verify: bool = False) -> list[CheckpointInfo]:
    """The complete checkpoints in `save_dir` (data file and sidecar, sizes agreeing), oldest first.

    `verify` also checks every SHA-256, which reads every file.
    """
    complete, _ = _scan(Path(save_dir))
    if verify:
        complete = [info for info in complete if _hash_matches(info)]
    return complete


def get_latest_model(save_dir: str | os.PathLike) -> tuple[Path | None, int]:
    """(path, iteration) of the newest checkpoint that passes its size and SHA-256 check; (None, 0) if none.

    Warns (CheckpointWarning, one line each) about the unfinished, damaged and foreign files it passes over.
    """
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


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise CheckpointCorruptError unless `path` has its sidecar and matches its size and SHA-256."""
    _verified_info(Path(path))


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, scaler: Any = None, ema: Any = None, *, restore_rng: bool = True,
                    map_location: Any = "cpu", verify: bool = True) -> dict:
    """Restore a checkpoint into the given live objects; returns the whole state (iteration, best_metric,
    data_position, metrics, metadata).

    The file's SHA-256 is checked before anything is restored (in a second thread while the file is mapped and
    unpickled; `verify=False` skips it for a data file copied without its sidecar).
    Parts the checkpoint lacks (e.g. no scaler state from a run without AMP) leave that object as it is, with
    a warning.
    """
    path = Path(path)
    if verify:
        info = _verified_info(path, check_hash=False)
        # Mapping and unpickling the file changes nothing outside it, so it runs while a second thread checks
        # the SHA-256; nothing is written into the live objects before the check has passed.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:
            hashing = hasher.submit(_hash_matches, info)
            try:
                state = read_weights_file(path, map_location=map_location)
            except Exception:
                # A damaged file may already fail to unpickle: the hash tells which error is the right one.
                if not hashing.result():
                    raise CheckpointCorruptError(_hash_mismatch_text(path)) from None
                raise
            if not hashing.result():
                raise CheckpointCorruptError(_hash_mismatch_text(path))
    else:
        state = read_weights_file(path, map_location=map_location)
    if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint of this project, so training cannot resume "
                              "from it; move it out of the --save folder (eval.py and export.py read it as it is)")
    load_model_state(model, state["model"], strict=True, source_name=str(path))
    _restore(path, "optimizer", optimizer, state.get("optimizer"))
    _restore(path, "scheduler", scheduler, state.get("scheduler"))
    _restore(path, "scaler", scaler, state.get("scaler"))
    if ema is not None:
        _restore_ema(path, ema, state.get("ema"))
    if restore_rng:
        _set_rng_state(state["rng"])
    return state


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for the caller to write the whole new file to. When the block ends without
    an exception the file is fsynced and renamed over `path`, and the rename made durable, so `path` holds either
    its old content or the complete new one; on any exception the temporary file is removed."""
    path = Path(path)
    temp = _temp_path(path)
    try:
        yield temp
        _fsync_file(temp)
        os.replace(temp, path)
    except BaseException:
        _remove_quietly(temp)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> tuple[str, int]:
    """Write a file through `write(file)` so that `path` holds either its old content or the complete new one.

    Returns (SHA-256 hex, size) of what was written, hashed on the way (no read back). Raises OSError.
    """
    with atomic_output(path) as temp:
        return _write_temp(temp, write)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's content, hashed straight from the page cache while the kernel reads ahead (no
    copy into this process, the disk read overlapping the hashing)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            return digest.hexdigest()
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
            if hasattr(mapped, "madvise"):
                mapped.madvise(mmap.MADV_SEQUENTIAL)
            for start in range(0, size, _HASH_CHUNK):
                if hasattr(os, "posix_fadvise"):
                    # Ask for the next chunk now, so the disk reads it while this one is hashed.
                    os.posix_fadvise(file.fileno(), start + _HASH_CHUNK, _HASH_CHUNK, os.POSIX_FADV_WILLNEED)
                digest.update(view[start:start + _HASH_CHUNK])
    return digest.hexdigest()


def to_plain(value: Any, *, json_only: bool = False) -> Any:
    """`value` as plain Python values (and tensors unless `json_only`), so that weights_only loading reads it.

    Namespaces and dataclasses become dicts, paths and unknown objects strings, tuples lists, numpy values
    numbers or tensors.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Enum):
        return to_plain(value.value, json_only=json_only)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if isinstance(value, torch.Tensor):
        if json_only:
            return value.item() if value.numel() == 1 else value.tolist()
        return value.detach()
    if isinstance(value, Mapping):
        return {_plain_key(key): to_plain(item, json_only=json_only) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_plain(item, json_only=json_only) for item in value]
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name), json_only=json_only) for f in fields(value)}
    if isinstance(value, argparse.Namespace):
        return to_plain(vars(value), json_only=json_only)
    # Paths, dtypes, devices, functions: their text is what a reader of the metadata needs.
    return str(value)


def _plain_key(key: Any) -> Any:
    return key if isinstance(key, (str, int)) and not isinstance(key, bool) else str(key)


def _is_secondary_rank() -> bool:
    distributed = torch.distributed
    return distributed.is_available() and distributed.is_initialized() and distributed.get_rank() != 0


def _ema_state(ema: Any) -> dict:
    averaged = unwrap_model(ema)
    # Wrapper buffers such as AveragedModel.n_averaged live outside the averaged network.
    wrapper = {}
    if isinstance(ema, nn.Module) and ema is not averaged:
        wrapper = {key: value for key, value in ema.state_dict().items() if not key.startswith("module.")}
    counters = {name: getattr(ema, name) for name in _EMA_COUNTERS
                if isinstance(getattr(ema, name, None), int) and not isinstance(getattr(ema, name), bool)}
    return {"module": averaged.state_dict(), "wrapper": wrapper, "counters": counters}


def _rng_state() -> dict:
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"bit_generator": numpy_state["bit_generator"],
                  "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(rng: dict) -> None:
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = rng["numpy"]
    np.random.set_state({"bit_generator": numpy_state["bit_generator"],
                         "state": {"key": numpy_state["key"].cpu().numpy().astype(np.uint32),
                                   "pos": numpy_state["pos"]},
                         "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    torch.set_rng_state(rng["torch"].cpu())
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(rng["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


def library_versions() -> dict:
    """Versions of Python and the libraries that decide numerics, as recorded in checkpoints and results."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _restore(path: Path, part: str, target: Any, saved: Any) -> None:
    # A disabled GradScaler saves {} and restores nothing: that pair needs no warning.
    if target is None or (not saved and not target.state_dict()):
        return
    if not saved:
        warnings.warn(f"{path} has no {part} state; the {part} keeps its current state", CheckpointWarning,
                      stacklevel=3)
        return
    try:
        target.load_state_dict(saved)
    except (ValueError, KeyError, RuntimeError) as error:
        text = " ".join(str(error).split())
        raise CheckpointError(f"{path}: the saved {part} state does not fit this {part} ({text}); resume with the "
                              "settings the run was started with") from error


def _restore_ema(path: Path, ema: Any, saved: dict | None) -> None:
    if saved is None:
        warnings.warn(f"{path} has no EMA weights; the EMA keeps its current weights", CheckpointWarning,
                      stacklevel=3)
        return
    load_model_state(ema, saved["module"], strict=True, source_name=f"{path} (EMA)")
    if isinstance(ema, nn.Module):
        with torch.no_grad():
            for key, value in saved["wrapper"].items():
                ema.get_buffer(key).copy_(value)
    for name, value in saved["counters"].items():
        setattr(ema, name, value)


def _scan(save_dir: Path) -> tuple[list[CheckpointInfo], list[tuple[int | None, Path, str]]]:
    """Complete checkpoints by the cheap checks (sidecar present and readable, sizes agree), and the rest."""
    if not save_dir.is_dir():
        return [], []
    data, sidecars = {}, {}
    problems: list[tuple[int | None, Path, str]] = []
    for entry in os.scandir(save_dir):
        name = entry.name
        if match := _DATA_RE.match(name):
            data[name[:-4]] = (int(match.group(1)), Path(entry.path))
        elif _SIDECAR_RE.match(name):
            sidecars[name[:-5]] = Path(entry.path)
        elif match := _TEMP_RE.match(name):
            problems.append((int(match.group(1)), Path(entry.path), "an unfinished save (temporary file)"))
        elif name.endswith(_WEIGHT_SUFFIXES) and entry.is_file():
            problems.append((None, Path(entry.path), "not a checkpoint of this project (its name does not fit "
                                                     "checkpoint-<iteration>.pth)"))
    complete = []
    for stem, (iteration, path) in data.items():
        sidecar_path = sidecars.get(stem)
        if sidecar_path is None:
            problems.append((iteration, path, f"no sidecar {stem}.json: an unfinished save or a file not written "
                                              "by this project"))
            continue
        try:
            info = _parse_sidecar(path, sidecar_path, iteration)
            actual = path.stat().st_size
        except (CheckpointCorruptError, OSError) as error:
            problems.append((iteration, path, str(error)))
            continue
        if actual != info.size:
            problems.append((iteration, path, f"it has {actual} bytes, its sidecar says {info.size}: an unfinished "
                                              "or damaged save"))
            continue
        complete.append(info)
    complete.sort(key=lambda info: info.iteration)
    return complete, problems


def _parse_sidecar(path: Path, sidecar_path: Path, iteration: int) -> CheckpointInfo:
    try:
        sidecar = json.loads(sidecar_path.read_bytes())
        if sidecar.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointCorruptError(f"{sidecar_path.name} was not written by this project")
        if sidecar.get("iteration") != iteration:
            raise CheckpointCorruptError(f"{sidecar_path.name} describes iteration {sidecar.get('iteration')}")
        return CheckpointInfo(path=path, iteration=iteration, sha256=str(sidecar["sha256"]),
                              size=int(sidecar["size"]), metrics=dict(sidecar.get("metrics") or {}))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointCorruptError(f"its sidecar {sidecar_path.name} is unreadable") from None


def _hash_mismatch_text(path: Path) -> str:
    return (f"{path}: its SHA-256 does not match its sidecar, the file is damaged; resume from an earlier "
            "checkpoint (get_latest_model picks the newest good one)")


def _verified_info(path: Path, check_hash: bool = True) -> CheckpointInfo:
    advice = "resume from an earlier checkpoint (get_latest_model picks the newest good one)"
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
        raise CheckpointCorruptError(f"{path}: {error}; {advice}") from None
    size = path.stat().st_size
    if size != info.size:
        raise CheckpointCorruptError(f"{path} has {size} bytes but its sidecar says {info.size}: an unfinished or "
                                     f"damaged save; {advice}")
    if check_hash and not _hash_matches(info):
        raise CheckpointCorruptError(_hash_mismatch_text(path))
    return info


def _hash_matches(info: CheckpointInfo) -> bool:
    try:
        return file_sha256(info.path) == info.sha256
    except OSError:
        return False


def _save_without_crc(state: dict, file: BinaryIO) -> None:
    """torch.save without the zip's CRC-32 of every record: a whole extra pass over the bytes, and the sidecar's
    SHA-256, checked before every load, already covers them (torch.load does not read the CRCs)."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, file)
    finally:
        torch.serialization.set_crc32_options(previous)


class _HashingWriter:
    """A write-only file wrapper that hashes and counts the bytes passing through it.

    torch.save hands over each tensor's storage as a memoryview of the tensor itself (no copy); a large one is
    hashed in a second thread while this one writes it (both release the GIL), so hashing costs no extra time
    where the disk is the slower of the two.
    """

    def __init__(self, file: BinaryIO, hasher: ThreadPoolExecutor) -> None:
        self._file = file
        self._hasher = hasher
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        hashing = self._hasher.submit(self.sha256.update, data) if len(data) >= _PARALLEL_HASH_BYTES else None
        try:
            written = self._file.write(data)
        except OSError as error:
            # torch.save's C++ writer turns exceptions into a RuntimeError; keep the OSError for the message.
            self.error = error
            raise
        finally:
            # The memoryview may point into memory torch frees once this call returns: finish hashing first.
            if hashing is not None:
                hashing.result()
        if hashing is None:
            self.sha256.update(data)
        self.size += len(data)
        return written

    def flush(self) -> None:
        self._file.flush()


def _write_temp(temp: Path, write: Callable[[BinaryIO], object]) -> tuple[str, int]:
    with open(temp, "wb") as file, ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:
        writer = _HashingWriter(file, hasher)
        try:
            write(writer)
        except Exception:
            if writer.error is not None:
                raise writer.error from None
            raise
    return writer.sha256.hexdigest(), writer.size


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDWR)  # Windows refuses to fsync a read-only descriptor
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (POSIX; elsewhere directories cannot be opened for fsync)."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _remove_stale_temps(save_dir: Path) -> None:
    """Temporary files left by a writer that was killed; the folder has a single writer, so none is in use."""
    for entry in os.scandir(save_dir):
        if _TEMP_RE.match(entry.name):
            _remove_quietly(Path(entry.path))


def _apply_retention(save_dir: Path, keep: int, newest: int, metric: str | None, lower_is_better: bool) -> None:
    complete, _ = _scan(save_dir)
    kept = {info.iteration for info in complete[-keep:]} | {newest}
    if metric is not None:
        best = _best(complete, metric, lower_is_better)
        if best is not None:
            kept.add(best.iteration)
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
            _remove_quietly(Path(entry.path))


def _best(complete: list[CheckpointInfo], metric: str, lower_is_better: bool) -> CheckpointInfo | None:
    scored = [info for info in complete
              if isinstance(info.metrics.get(metric), (int, float)) and math.isfinite(info.metrics[metric])]
    if not scored:
        return None
    sign = 1 if lower_is_better else -1
    # On a tie the newer checkpoint wins.
    return min(scored, key=lambda info: (sign * info.metrics[metric], -info.iteration))


def _write_error_text(save_dir: Path, name: str, error: OSError) -> str:
    reason = error.strerror or str(error)
    code = errno.errorcode.get(error.errno or 0)
    hint = {errno.ENOSPC: "free some disk space or choose another --save",
            errno.EDQUOT: "free some quota or choose another --save",
            errno.EACCES: "choose a folder you can write to (--save)",
            errno.EROFS: "choose a folder you can write to (--save)"}.get(error.errno, "check the folder")
    return (f"could not save {name} in {save_dir}: {reason}{f' ({code})' if code else ''}; the checkpoints "
            f"saved before are intact; {hint}")
