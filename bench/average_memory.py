"""Benchmark: peak memory and time of averaging 5 checkpoints, against reading the same 5 files.

    .venv/bin/python bench/average_memory.py [--quick] [--results-json FILE] [--dir DIR] [--threads N]

Writes 5 ExLarge-sized state dicts (OneShot-sized with --quick), then measures in separate processes, so that each
peak RSS (ru_maxrss) belongs to one task alone: (a) torch.load of the 5 files one after another, (b)
common.average.average_checkpoints over them in memory, (c) the same writing a .safetensors output. The RSS of an
idle process that made the same imports is subtracted from each. Goal: peak of (b) and (c) at most 2.5 times one
file's size. The files were just written (then synced to disk), so every measurement reads them from the page cache.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import add_results_argument, write_json
from common.cli import ArgumentParser, existing_folder, positive_int
from common.errors import exit_on_user_error

REPO_ROOT = Path(__file__).resolve().parent.parent

NUM_FILES = 5
GOAL_RATIO = 2.5


def _peak_rss_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _child(mode: str, arguments: list[str], threads: int | None) -> None:
    """Runs in a fresh process: one task, then its peak RSS and time as one JSON line on stdout."""
    import torch

    from common.average import average_checkpoints

    if threads:
        torch.set_num_threads(threads)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    started = time.perf_counter()
    if mode == "write":
        _write_inputs(arguments[0], Path(arguments[1]))
    elif mode == "read":
        for name in arguments:
            state = torch.load(name, map_location="cpu", weights_only=True)
            del state
    elif mode == "average":
        average_checkpoints(arguments, progress=False)
    elif mode == "average+write":
        output = Path(arguments[0]).parent / "average.safetensors"
        average_checkpoints(arguments, output, progress=False)
        output.unlink()
    elapsed = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"mode": mode, "seconds": elapsed, "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu_before,
                      "peak_rss": _peak_rss_bytes()}))


def _run_child(mode: str, arguments: list, threads: int | None = None) -> dict:
    # The parent never imports torch: Linux carries a process's peak RSS over fork and exec, so a parent that
    # held the weights would leave its own peak in every child's ru_maxrss.
    thread_option = ["--threads", str(threads)] if threads else []
    result = subprocess.run([sys.executable, __file__, *thread_option, "--child", mode, *map(str, arguments)],
                            check=True, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _write_inputs(model: str, folder: Path) -> None:
    import torch

    from common.models import load_network_module

    torch.manual_seed(0)
    base = load_network_module(model).create_network().state_dict()
    for index in range(NUM_FILES):
        # Perturb in place and save: a second full copy of the weights is not needed to make distinct files.
        for tensor in base.values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor), alpha=1e-3)
            else:
                tensor.add_(1)
        path = folder / f"checkpoint-{index}.pth"
        torch.save(base, path)
        print(f"wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB)", file=sys.stderr, flush=True)


def _report(model: str, file_size: int, idle: dict, runs: dict, threads: int | None) -> dict:
    """Print the measured peaks and times against one file and reading; returns them for --results-json."""
    numbers = {"model": model, "files": NUM_FILES, "file_bytes": file_size, "idle_rss_bytes": idle["peak_rss"],
               "threads": threads, "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0],
               "goal_peak_to_file_size": GOAL_RATIO}
    print(f"{model}: {NUM_FILES} files of {file_size / 1e9:.3f} GB; peak RSS above an idle process "
          f"({idle['peak_rss'] / 1e9:.2f} GB) as a multiple of one file, time as a multiple of reading "
          f"(torch threads: {threads or 'default'}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    for mode, run in runs.items():
        peak = run["peak_rss"] - idle["peak_rss"]
        name = mode.replace("+", "_and_")
        numbers[f"{name}_peak_bytes"] = peak
        numbers[f"{name}_seconds"] = run["seconds"]
        numbers[f"{name}_cpu_seconds"] = run["cpu_seconds"]
        numbers[f"{name}_peak_to_file_size"] = peak / file_size
        numbers[f"{name}_time_to_read_time"] = run["seconds"] / runs["read"]["seconds"]
        print(f"  {mode:14} peak {peak / 1e9:6.3f} GB = {peak / file_size:5.2f} x file   "
              f"{run['seconds']:6.1f} s = {run['seconds'] / runs['read']['seconds']:5.2f} x reading   "
              f"(CPU {run['cpu_seconds']:.1f} s)")
    worst = max(numbers["average_peak_to_file_size"], numbers["average_and_write_peak_to_file_size"])
    print(f"averaging {'meets' if worst <= GOAL_RATIO else 'MISSES'} the goal: peak {worst:.2f} x file "
          f"(at most {GOAL_RATIO}); 'average+write' includes writing and fsyncing the .safetensors output")
    return numbers


@exit_on_user_error
def main() -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="OneShot-sized files (14 MB) instead of ExLarge (1.08 GB): a smoke test, whose memory "
                             "ratio fixed costs of tens of MB dominate")
    add_results_argument(parser)
    parser.add_argument("--dir", type=existing_folder, metavar="DIR",
                        help="where to put the temporary files (default: the system's)")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="torch threads in the measured processes (default: torch's own choice); on a machine "
                             "whose cores are busy with other work, 1 avoids threads waiting for each other")
    parser.add_argument("--child", nargs="+", metavar=("MODE", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1:], args.threads)
        return 0

    model = "OneShot" if args.quick else "ShuffleNetV2.ExLarge"
    # 271,283,296 float32 parameters and BN buffers for ExLarge, 3.4M for OneShot; 7 files' worth with margin.
    estimate = (14_000_000 if args.quick else 1_090_000_000) * (NUM_FILES + 2)
    parent = Path(args.dir or tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if free < estimate:
        print(f"error: {parent} has {free / 1e9:.1f} GB free, the benchmark needs {estimate / 1e9:.1f} GB; "
              f"choose another --dir", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="average-bench-", dir=parent))
    try:
        _run_child("write", [model, folder])
        files = sorted(folder.glob("checkpoint-*.pth"))
        file_size = files[0].stat().st_size
        # Dirty pages still being written back slow down the first reads of a file (mapped reads most): write
        # them out now so that no measurement pays for the writing.
        os.sync()
        idle = _run_child("idle", [], args.threads)
        runs = {mode: _run_child(mode, files, args.threads) for mode in ("read", "average", "average+write")}
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    numbers = _report(model, file_size, idle, runs, args.threads)
    write_json(args.results_json, numbers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
