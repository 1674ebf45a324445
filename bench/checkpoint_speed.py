"""Checkpoint save and load of a full training state (weights, SGD momentum, EMA) per model, as ratios to the raw
speed of the same disk measured in the same run, interleaved round by round so that drift in the machine's load
hits both alike. The targets: save at most 1.3x, load at most 1.2x. Each ratio is also given for the fastest round
of each of the two, which compares them where the disk's speed swings between two modes whatever writes.

- save: save_checkpoint of the state into a fresh file (hashed while written, fsynced, renamed, sidecar written);
  raw write: the same number of bytes written with write() into a fresh file, then fsync, as `dd conv=fsync`.
  Each removes its previous file first, so both write into the memory that freed (on a VM that hands freed memory
  back to its host, filling memory nothing freed just before costs several times more, which would otherwise
  land on whichever of the two writes second).
- load: load_checkpoint into the live model and EMA and a new optimizer (as a resumed run does), including the
  SHA-256 check of the whole file; load_unchecked: the same without the check (verify=False), which tells what
  the check costs on this machine (the check reads and hashes every byte, the copies come after it);
  raw read: read() of a file of the same size. Each read starts from the disk with the pages of both files dropped
  from the page cache, so that each fills memory freed just before (ExLarge's checked load, 5 rounds in one process
  on a VM, 2026-12-07: 1.36 to 2.69 s with only its own file dropped, 1.39 to 1.62 s with both dropped). The
  reads follow the writes, each first in turn.
- sha256: as many bytes from memory hashed as checkpoints are (SHA-256 of 64 MB pieces on every core): a save or
  load that hashes every byte takes at least as long as the slower of this and the raw write or read, so both are
  also given as ratios to that floor.

    python bench/checkpoint_speed.py [--models ...] [--dir DIR] [--repeats N] [--results-json FILE]
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from timing import add_results_argument, interleaved, paired_ratio, write_json
from common.atomic_io import pieces_sha256
from common.cli import ArgumentParser, existing_folder, positive_int
from common.checkpoint import get_training_state, load_checkpoint
from common.checkpoint_store import PIECE_BYTES, save_checkpoint
from common.ema import create_ema
from common.errors import exit_on_user_error
from common.models import MODEL_FOLDERS, load_network_module

CHUNK = 16 << 20


def raw_write(path: Path, size: int, block: bytes) -> None:
    """Write `size` bytes into a fresh file and fsync them, as `dd conv=fsync` would."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as file:
        for offset in range(0, size, CHUNK):
            file.write(block[:min(CHUNK, size - offset)])
        file.flush()
        os.fsync(file.fileno())


def drop_from_page_cache(path: Path) -> None:
    """Make the next read of `path` come from the disk (its pages are clean: save_checkpoint and raw_write fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_read(path: Path) -> None:
    with open(path, "rb", buffering=0) as file:
        while file.read(CHUNK):
            pass


def sha256_of(size: int, block: bytes) -> None:
    view = memoryview(block)

    def hash_piece(start: int) -> bytes:
        digest, end = hashlib.sha256(), min(start + PIECE_BYTES, size)
        for offset in range(start, end, len(view)):
            digest.update(view[:min(len(view), end - offset)])
        return digest.digest()

    with ThreadPoolExecutor(os.cpu_count()) as hashers:
        pieces_sha256(hashers.map(hash_piece, range(0, size, PIECE_BYTES)))


def bench_model(model_name: str, folder: Path, repeats: int) -> dict:
    torch.manual_seed(0)
    model = load_network_module(model_name).create_network()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for parameter in model.parameters():  # momentum buffers exist after the first step
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    ema = create_ema(model)
    state = get_training_state(model, optimizer, ema=ema, iteration=1000, metrics={"top1_error": 50.0})
    iterations = itertools.count(1000)
    saved = []
    save(state, next(iterations), folder, saved)
    size = saved[-1].stat().st_size
    raw, block = folder / "raw.bin", os.urandom(CHUNK)

    def from_disk(read: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for path in (saved[-1], raw):
                drop_from_page_cache(path)
            read()
        return run

    def load(verify: bool = True) -> None:
        # Into a new optimizer, as a resumed run does: its momentum can stay mapped from the file (no copy), and
        # the mapping goes with the optimizer, so the next save's removal of this file frees its memory.
        load_checkpoint(saved[-1], model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), ema=ema,
                        restore_rng=False, verify=verify)

    reads = ["load", "load_unchecked", "raw_read"]

    def order(round_index: int) -> list[str]:
        # Each read comes first in turn, one round in three, so that what the writes leave behind hits all alike.
        shift = round_index % len(reads)
        return ["save", "raw_write", *reads[shift:], *reads[:shift], "sha256"]

    seconds = interleaved({"save": lambda: save(state, next(iterations), folder, saved),
                           "raw_write": lambda: raw_write(raw, size, block),
                           "load": from_disk(load), "load_unchecked": from_disk(lambda: load(verify=False)),
                           "raw_read": from_disk(lambda: raw_read(raw)),
                           "sha256": lambda: sha256_of(size, block)}, repeats=repeats, warmup=1, order=order)
    raw.unlink()
    for file in folder.glob("checkpoint-*"):
        file.unlink()
    return {"model": model_name, "bytes": size, "seconds": seconds, **ratios(seconds)}


def ratios(seconds: dict[str, dict]) -> dict[str, float]:
    """Save and load against the disk: paired by round, and of the fastest rounds."""
    # The floor of a save or load that hashes every byte: the slower of the disk and the hash, round by round.
    floors = {f"{kind}_floor": {"rounds": [max(disk, hashing) for disk, hashing in
                                           zip(seconds[f"raw_{kind}"]["rounds"], seconds["sha256"]["rounds"])]}
              for kind in ("write", "read")}
    paired = {"save_ratio": ("save", "raw_write"), "save_to_floor": ("save", "write_floor"),
              "load_ratio": ("load", "raw_read"), "load_unchecked_ratio": ("load_unchecked", "raw_read"),
              "load_to_floor": ("load", "read_floor")}
    # Some disks here are bimodal (a 3 GB write takes about 2 s or 4 to 6 s, whichever of the two writes it), which
    # pairing by round cannot cancel: the fastest round of each compares them in the disk's fast mode.
    fastest = {"save_ratio_fastest": ("save", "raw_write"), "load_ratio_fastest": ("load", "raw_read")}
    return {**{name: paired_ratio({**seconds, **floors}, top, bottom) for name, (top, bottom) in paired.items()},
            **{name: min(seconds[top]["rounds"]) / min(seconds[bottom]["rounds"])
               for name, (top, bottom) in fastest.items()}}


def save(state: dict, iteration: int, folder: Path, saved: list[Path]) -> None:
    """save_checkpoint into a fresh file after removing the previous one, as the raw write does."""
    for file in folder.glob("checkpoint-*"):
        file.unlink()
    saved.append(save_checkpoint(state, iteration, folder, keep=1))


@exit_on_user_error
def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_FOLDERS), choices=MODEL_FOLDERS,
                        help="model folders to measure (default: all)")
    parser.add_argument("--dir", type=existing_folder,
                        help="folder on the disk to measure (default: a temporary folder)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed rounds of all six, after one warm-up round (a multiple of 3 puts each read "
                             "first equally often; default: 3)")
    add_results_argument(parser)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    results = []
    # The ratios hold only for a quiet machine: say how busy this one was.
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    try:
        for model_name in args.models:
            r = bench_model(model_name, folder, args.repeats)
            results.append(r)
            t = {name: value["median"] for name, value in r["seconds"].items()}
            print(f"checkpoint {model_name:22s} {r['bytes'] / 1e9:6.2f} GB  save {t['save']:6.2f} s "
                  f"(raw write+fsync {t['raw_write']:6.2f} s, ratio {r['save_ratio']:.2f}, fastest rounds "
                  f"{r['save_ratio_fastest']:.2f}; {r['save_to_floor']:.2f}x the slower of it and the hash)  load "
                  f"{t['load']:6.2f} s (raw read {t['raw_read']:6.2f} s, ratio {r['load_ratio']:.2f}, fastest rounds "
                  f"{r['load_ratio_fastest']:.2f}; hash alone "
                  f"{t['sha256']:6.2f} s, {r['load_to_floor']:.2f}x the slower of the two; without the check "
                  f"{t['load_unchecked']:6.2f} s, ratio {r['load_unchecked_ratio']:.2f})", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write_json(args.results_json, results)


if __name__ == "__main__":
    main()
