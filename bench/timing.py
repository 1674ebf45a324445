"""Timing helpers for the benchmarks: medians of several runs after a warm-up, with min and max."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.atomic_io import atomic_write_text  # noqa: E402 (after the repository root is on the path)
from common.cli import prepare_output  # noqa: E402
from common.errors import UserError  # noqa: E402


def measure(run: Callable[[], object], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Seconds per call of `run`: median, min and max of `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)}


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, warmup: int,
                order: Callable[[int], list[str]] | None = None) -> dict[str, dict]:
    """Seconds per call of each run (median, min, max, and each round's under "rounds"), calling every run once per
    round, in the order `order(round)` names them (default: as given)."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(repeats):
        for name in order(round_index) if order is not None else runs:
            started = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - started)
    return {name: {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}
            for name, values in seconds.items()}


def paired_ratio(seconds: dict[str, dict], top: str, bottom: str) -> float:
    """The median over rounds of `top`'s seconds / `bottom`'s within each round (with `top` a baseline, `bottom`'s
    speed-up over it), so that the machine's drift between rounds (30% within minutes on the VMs here) cancels out."""
    return statistics.median(a / b for a, b in zip(seconds[top]["rounds"], seconds[bottom]["rounds"]))


def rate(seconds: dict[str, float], items: float) -> dict[str, float]:
    """Items per second from `measure`'s seconds (the fastest run gives the max rate)."""
    return {"median": items / seconds["median"], "min": items / seconds["max"], "max": items / seconds["min"]}


def _results_file(text: str) -> str:
    """An argparse type: a results file that can be written, checked before the measuring starts."""
    try:
        prepare_output("--results-json", text)
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--results-json ")) from None
    return text


def add_results_argument(parser: argparse.ArgumentParser) -> None:
    """--results-json FILE (or --json, its older name), spelled as eval.py and export.py spell it."""
    parser.add_argument("--results-json", "--json", dest="results_json", type=_results_file, metavar="FILE",
                        help="also write the results to FILE as JSON")


def write_json(path: str | None, results: object) -> None:
    """Write `results` to `path` (nothing when None), replacing the file whole: a stopped run leaves no half file."""
    if path:
        atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def matmul_gflops(size: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """This machine's dense matmul speed in GFLOP/s (multiply and add counted as 2) for `dtype`."""
    import torch
    a, b = (torch.randn(size, size).to(getattr(torch, dtype)) for _ in range(2))
    seconds = measure(lambda: a @ b, repeats=repeats)
    return 2 * size ** 3 / seconds["median"] / 1e9
