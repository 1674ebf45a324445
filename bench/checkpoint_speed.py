"""Checkpoint save and load of a full training state (weights, SGD momentum, EMA) per model, as ratios to the raw
speed of the same disk measured in the same run (write + fsync, and read, of the same number of bytes).

    python bench/checkpoint_speed.py [--models ...] [--dir DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from timing import write_json
from common.checkpoint import get_training_state, load_checkpoint, save_checkpoint
from common.ema import create_ema
from common.models import MODEL_FOLDERS, load_network_module

CHUNK = 16 << 20


def raw_write(path: Path, size: int) -> float:
    """Seconds to write `size` bytes and fsync them, as `dd conv=fsync` would."""
    block = os.urandom(CHUNK)
    started = time.perf_counter()
    with open(path, "wb") as file:
        for offset in range(0, size, CHUNK):
            file.write(block[:min(CHUNK, size - offset)])
        file.flush()
        os.fsync(file.fileno())
    return time.perf_counter() - started


def raw_read(path: Path) -> float:
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as file:
        while file.read(CHUNK):
            pass
    return time.perf_counter() - started


def bench_model(model_name: str, folder: Path) -> dict:
    torch.manual_seed(0)
    model = load_network_module(model_name).create_network()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for parameter in model.parameters():  # momentum buffers exist after the first step
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    ema = create_ema(model)
    state = get_training_state(model, optimizer, ema=ema, iteration=1000, metrics={"top1_error": 50.0})
    started = time.perf_counter()
    path = save_checkpoint(state, 1000, folder, keep=1)
    save_seconds = time.perf_counter() - started
    size = path.stat().st_size
    started = time.perf_counter()
    load_checkpoint(path, model, optimizer, ema=ema, restore_rng=False)
    load_seconds = time.perf_counter() - started
    raw = folder / "raw.bin"
    write_seconds = raw_write(raw, size)
    read_seconds = raw_read(raw)
    raw.unlink()
    for file in folder.glob("checkpoint-*"):
        file.unlink()
    return {"model": model_name, "bytes": size, "save_seconds": save_seconds, "load_seconds": load_seconds,
            "raw_write_seconds": write_seconds, "raw_read_seconds": read_seconds,
            "save_ratio": save_seconds / write_seconds, "load_ratio": load_seconds / read_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_FOLDERS), choices=MODEL_FOLDERS)
    parser.add_argument("--dir", help="folder on the disk to measure (default: a temporary folder)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    results = []
    try:
        for model_name in args.models:
            r = bench_model(model_name, folder)
            results.append(r)
            print(f"checkpoint {model_name:22s} {r['bytes'] / 1e9:6.2f} GB  save {r['save_seconds']:6.2f} s "
                  f"(raw write+fsync {r['raw_write_seconds']:6.2f} s, ratio {r['save_ratio']:.2f})  load "
                  f"{r['load_seconds']:6.2f} s (raw read {r['raw_read_seconds']:6.2f} s, ratio "
                  f"{r['load_ratio']:.2f})", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
