"""The training state: everything needed to continue a run exactly, captured into and restored from a checkpoint:
model, optimizer, AMP scaler, EMA and every rank's random generators. The learning rate and the data position are
functions of the iteration, so the iteration stands for both. The files are checkpoint_store's."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from common.checkpoint_store import CheckpointError, CheckpointWarning, read_checkpoint, to_plain
from common.model_state import CHECKPOINT_FORMAT, load_model_state, unwrap_model


def get_training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                       scaler: torch.amp.GradScaler | None = None, ema: nn.Module | None = None, *,
                       iteration: int, best_metric: float | None = None, metrics: dict | None = None,
                       metadata: dict | None = None, rng: list[dict] | None = None) -> dict:
    """Everything needed to continue a run exactly, as tensors and plain values, sharing the live objects' tensors
    (save it right away). `rng` is every rank's `rng_state()` in rank order; by default this process's."""
    return {
        "format": CHECKPOINT_FORMAT,
        "iteration": int(iteration),
        "best_metric": None if best_metric is None else float(best_metric),
        "model": unwrap_model(model).state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "ema": None if ema is None else {"module": unwrap_model(ema).state_dict()},
        "metrics": to_plain(metrics or {}, json_only=True),
        "rng": rng if rng is not None else [rng_state()],
        "metadata": {**to_plain(metadata or {}), "versions": library_versions(),
                     "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scaler: torch.amp.GradScaler | None = None, ema: nn.Module | None = None, *,
                    restore_rng: bool = True, verify: bool = True) -> dict:
    """Restore a checkpoint, its SHA-256 checked first (unless `verify=False`), into the given live objects; returns
    the whole state. Each rank takes back its own random generators when the number of ranks is unchanged, else rank
    0's. A part the checkpoint lacks leaves its object as it is, with a warning."""
    path = Path(path)
    state = read_checkpoint(path, verify=verify)
    if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint of this project, so training cannot resume "
                              "from it; move it out of the --save folder (eval.py and export.py read it as it is)")
    load_model_state(model, state["model"], strict=True, source_name=str(path))
    _restore(path, "optimizer", optimizer, state.get("optimizer"))
    _restore(path, "scaler", scaler, state.get("scaler"))
    if ema is not None and state.get("ema") is None:
        warnings.warn(f"{path} has no EMA weights; the EMA keeps its current weights", CheckpointWarning, stacklevel=2)
    elif ema is not None:
        load_model_state(ema, state["ema"]["module"], strict=True, source_name=f"{path} (EMA)")
    if restore_rng:
        set_rng_state(_this_ranks(state["rng"]))
    return state


def rng_state() -> dict:
    """This process's random generators (Python, NumPy, torch, every CUDA device) as tensors and plain values."""
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


def set_rng_state(rng: dict) -> None:
    """Put back the random generators `rng_state()` captured."""
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = rng["numpy"]
    np.random.set_state({"bit_generator": numpy_state["bit_generator"],
                         "state": {"key": numpy_state["key"].cpu().numpy().astype(np.uint32),
                                   "pos": numpy_state["pos"]},
                         "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    # clone: a state read back from a checkpoint is a view into a packed tensor, and the generators read their
    # state from the start of its storage.
    torch.set_rng_state(rng["torch"].cpu().clone())
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(rng["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu().clone(), device)


def library_versions() -> dict:
    """Versions of Python and the libraries that decide numerics, as recorded in checkpoints and results."""
    return {"python": platform.python_version(),
            **{package: importlib.metadata.version(package) for package in ("torch", "torchvision", "numpy")}}


def _this_ranks(saved: list[dict] | dict) -> dict:
    """This rank's generators from the saved ones (one per rank), or rank 0's when the number of ranks changed."""
    per_rank = [saved] if isinstance(saved, Mapping) else saved
    joined = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if joined else (0, 1)
    return per_rank[rank] if len(per_rank) == world_size else per_rank[0]


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

