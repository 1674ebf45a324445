"""All benchmarks in one run, as measured ratios: prints a table and writes bench/results.json.

    python bench/run.py            # everything, full sizes (an hour or more on 2 cores)
    python bench/run.py --quick    # smaller repeats and cases, under 15 minutes on 2 cores
    python bench/run.py --only eval train

Each section runs in its own process (so peak memory and timings do not leak between sections) and is also a
script of its own in bench/ with --help.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from timing import matmul_gflops
from common.inference import cpu_supports_bf16

BENCH = Path(__file__).resolve().parent
# section: (script, arguments, arguments added with --quick)
SECTIONS = {
    "eval": ("eval_speed.py", [], ["--quick"]),
    "train": ("train_speed.py", [], ["--quick"]),
    "data": ("data_speed.py", [], ["--images", "32", "--repeats", "2"]),
    "checkpoint": ("checkpoint_speed.py", [], []),
    "average": ("average_memory.py", [], ["--quick"]),
    "export": ("export_speed.py", [], ["--quick"]),
}


def run_section(name: str, quick: bool) -> tuple[object, float]:
    script, args, quick_args = SECTIONS[name]
    with tempfile.NamedTemporaryFile(suffix=".json") as output:
        command = [sys.executable, str(BENCH / script), *args, *(quick_args if quick else []), "--json", output.name]
        print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
        started = time.perf_counter()
        completed = subprocess.run(command, cwd=BENCH)
        seconds = time.perf_counter() - started
        if completed.returncode:
            return {"error": f"exit status {completed.returncode}"}, seconds
        return json.loads(Path(output.name).read_text() or "null"), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    parser.add_argument("--quick", action="store_true", help="the quick variant of every section")
    parser.add_argument("--output", default=str(BENCH / "results.json"), help="where to write the results")
    args = parser.parse_args()
    started = time.perf_counter()
    gflops = matmul_gflops()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"dense fp32 matmul {gflops:.0f} GFLOP/s, torch {torch.__version__}", flush=True)
    results = {"machine": {"matmul_gflops": gflops, "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "python": platform.python_version(),
                           "bf16_native": cpu_supports_bf16()},
               "quick": args.quick, "sections": {}, "seconds": {}}
    for name in args.only or SECTIONS:
        results["sections"][name], results["seconds"][name] = run_section(name, args.quick)
    results["total_seconds"] = time.perf_counter() - started
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"\nbenchmarks done in {results['total_seconds'] / 60:.1f} min; results in {args.output}")
    for name, seconds in results["seconds"].items():
        status = results["sections"][name].get("error", "ok") if isinstance(results["sections"][name], dict) else "ok"
        print(f"  {name:12s} {seconds:7.1f} s  {status}")


if __name__ == "__main__":
    main()
