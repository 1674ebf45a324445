"""All benchmarks in one run, as measured ratios: prints a table and writes bench/results.json.

    python bench/run.py            # everything, full sizes (an hour or more on 2 cores)
    python bench/run.py --quick    # fewer repeats and cases (README Performance: its time per machine)
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
from common.atomic_io import atomic_write_text
from common.cli import ArgumentParser, prepare_output
from common.errors import UserError, exit_on_user_error
from common.hardware import cpu_capabilities, describe_cpu

BENCH = Path(__file__).resolve().parent
# section: (script, arguments, arguments added with --quick)
SECTIONS = {
    "eval": ("eval_speed.py", [], ["--quick"]),
    "train": ("train_speed.py", [], ["--quick"]),
    "data": ("data_speed.py", [], []),
    "checkpoint": ("checkpoint_speed.py", [], []),
    "average": ("average_memory.py", [], ["--quick"]),
    "export": ("export_speed.py", [], ["--quick"]),
}


def run_section(name: str, quick: bool) -> tuple[object, float]:
    script, args, quick_args = SECTIONS[name]
    with tempfile.NamedTemporaryFile(suffix=".json") as output:
        command = [sys.executable, str(BENCH / script), *args, *(quick_args if quick else []), "--results-json",
                   output.name]
        print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
        started = time.perf_counter()
        completed = subprocess.run(command, cwd=BENCH)
        seconds = time.perf_counter() - started
        if completed.returncode:
            return {"error": f"exit status {completed.returncode}"}, seconds
        return json.loads(Path(output.name).read_text() or "null"), seconds


def _number(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _speed(value: dict) -> str:
    return f"{_number(value['median'])} [{_number(value['min'])}, {_number(value['max'])}]"


def _training_cell(result: dict) -> str:
    text = _speed(result["images_per_second"])
    if "ratio" in result:
        text += f" ({result['ratio']:.2f}x)"
    if "choice" in result:
        text += f" {result['choice'].split(' (')[0]}"
    return text


def _checkpoint_table(rows: list[dict]) -> list[str]:
    def ratio(r: dict, name: str) -> str:  # results files older than a ratio hold none of it
        return f"{r[name]:.2f}" if name in r else "-"

    lines = ["", "Checkpoint of a full training state (weights, momentum, EMA) against raw disk speed (fastest: "
                 "the fastest round of each):", ""]
    return lines + _table(["model", "size", "save s", "x raw write+fsync", "fastest", "save x max(raw write, SHA-256)",
                           "load s", "x raw read", "fastest", "load x max(raw read, SHA-256)",
                           "load without the check x raw read", "SHA-256 in pieces, all cores, s"], [
        [r["model"], f"{r['bytes'] / 1e9:.2f} GB", _speed(r["seconds"]["save"]), ratio(r, "save_ratio"),
         ratio(r, "save_ratio_fastest"), ratio(r, "save_to_floor"), _speed(r["seconds"]["load"]),
         ratio(r, "load_ratio"), ratio(r, "load_ratio_fastest"), ratio(r, "load_to_floor"),
         ratio(r, "load_unchecked_ratio"), _speed(r["seconds"]["sha256"])] for r in rows])


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def summary(results: dict) -> list[str]:
    """The results as Markdown tables (the README's Performance section is one of these): median [min, max]."""
    sections, machine = results["sections"], results["machine"]
    cpu = describe_cpu(machine["cpu"]) if "cpu" in machine else \
        f"bf16 {'native' if machine['bf16_native'] else 'not native'}"
    dated = f", measured {machine['date']}" if "date" in machine else ""
    lines = [f"{cpu}; {machine['threads']} threads, dense fp32 matmul {machine['matmul_gflops']:.0f} GFLOP/s, "
             f"torch {machine['torch']}{' (--quick)' if results['quick'] else ''}{dated}."]
    ok = {name: value for name, value in sections.items() if not (isinstance(value, dict) and "error" in value)}
    if "eval" in ok:
        models = ok["eval"]["models"]
        variants = list(next(iter(models.values()))["images_per_second"])
        lines += ["", f"Eval images/s at {ok['eval']['image_size']}px (x plain; GFLOP/s as % of dense matmul in "
                      "the same precision):", ""]
        lines += _table(["model"] + variants, [
            [name] + [f"{_number(v['median'])} ({v['ratio']:.2f}x; {v['fraction_of_matmul']:.0%})"
                      for v in result["images_per_second"].values()] for name, result in models.items()])
    if "train" in ok:
        variants = list(dict.fromkeys(r["variant"] for r in ok["train"]))
        cells: dict[tuple, dict] = {}
        for r in ok["train"]:
            cells.setdefault((r["model"], r["size"], r["batch"]), {})[r["variant"]] = r
        lines += ["", "Training images/s (one SGD step of the real loss; compile and bf16 run channels_last; default: "
                      "the layout and precision train.py picks here; x eager):", ""]
        lines += _table(["model", "size", "batch"] + variants, [
            [model, f"{size}px", str(batch)] + [_training_cell(speeds[v]) if v in speeds else "-" for v in variants]
            for (model, size, batch), speeds in cells.items()])
    if "data" in ok:
        # Results files written before 2026-12-06 hold no paired ratios: there, ratios of the medians.
        bases = {"x_pil_decode": ok["data"]["pil_decode"], "x_original": ok["data"]["original_train_augment"]}
        lines += ["", "Data pipeline, images/s per worker process (JPEGs of 500x375):", ""]
        lines += _table(["case", "images/s", "x PIL decode", "x original training pipeline"],
                        [[name, _speed(v)] + [f"{v.get(key, v['median'] / base['median']):.2f}"
                                              for key, base in bases.items()] for name, v in ok["data"].items()])
    if "checkpoint" in ok:
        lines += _checkpoint_table(ok["checkpoint"])
    if "average" in ok:
        a = ok["average"]
        lines += ["", f"Averaging {a['files']} {a['model']} checkpoints of {a['file_bytes'] / 1e9:.2f} GB:", ""]
        lines += _table(["task", "peak memory x one file", "time x reading the files"], [
            [task, f"{a[f'{task}_peak_to_file_size']:.2f}", f"{a[f'{task}_time_to_read_time']:.2f}"]
            for task in ("read", "average", "average_and_write")])
    if "export" in ok:
        from common.export import sweep_table

        lines += ["", "Export sweep (random weights with calibrated BatchNorm), every export verified:", ""]
        for model in dict.fromkeys(r["model"] for r in ok["export"]):
            lines += [f"{model}:", "", sweep_table([r for r in ok["export"] if r["model"] == model]), ""]
    return lines


def read_results(path: str) -> dict:
    """An earlier run's results file; a UserError that names what is wrong with it otherwise."""
    try:
        results = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--summary {path}: no such file; give the --results-json of an earlier run") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"--summary {path}: cannot read it as JSON ({error})") from None
    if not isinstance(results, dict) or not {"machine", "sections"} <= results.keys():
        raise UserError(f"--summary {path}: not a results file of bench/run.py (no 'machine' and 'sections'); give "
                        "the --results-json of an earlier run")
    return results


@exit_on_user_error
def main() -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    parser.add_argument("--quick", action="store_true", help="the quick variant of every section")
    parser.add_argument("--results-json", "--output", dest="results_json", default=str(BENCH / "results.json"),
                        metavar="FILE",
                        help="where to write the results (default: bench/results.json; --output is its older name)")
    parser.add_argument("--summary", metavar="RESULTS_JSON",
                        help="only print the tables of an earlier run's results file, running nothing")
    args = parser.parse_args()
    if args.summary:
        print("\n".join(summary(read_results(args.summary))))
        return 0
    prepare_output("--results-json", args.results_json)  # before the hour of work whose results go there
    started = time.perf_counter()
    gflops = matmul_gflops()
    cpu = cpu_capabilities()
    print(f"machine: {describe_cpu(cpu)}; {torch.get_num_threads()} threads, dense fp32 matmul {gflops:.0f} "
          f"GFLOP/s, torch {torch.__version__}", flush=True)
    results = {"machine": {"matmul_gflops": gflops, "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "python": platform.python_version(),
                           "bf16_native": cpu["bf16_native"], "cpu": cpu,
                           "date": time.strftime("%Y-%m-%d", time.gmtime())},
               "quick": args.quick, "sections": {}, "seconds": {}}
    for name in args.only or SECTIONS:
        results["sections"][name], results["seconds"][name] = run_section(name, args.quick)
    results["total_seconds"] = time.perf_counter() - started
    atomic_write_text(args.results_json, json.dumps(results, indent=2))
    print(f"\nbenchmarks done in {results['total_seconds'] / 60:.1f} min; results in {args.results_json}")
    errors = {name: section["error"] for name, section in results["sections"].items()
              if isinstance(section, dict) and "error" in section}
    for name, seconds in results["seconds"].items():
        print(f"  {name:12s} {seconds:7.1f} s  {errors.get(name, 'ok')}")
    print("\n" + "\n".join(summary(results)))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
