"""The end-to-end demo, `make demo`: OneShot on the built-in dataset, as a user would run it.

Trains with `--demo` (real JPEGs generated on first use in data/demo), averaging the best 3 checkpoints at the
end and re-estimating the average's BatchNorm statistics; evaluates the last checkpoint and the average with
eval.py; exports the average to Core ML and ONNX (each export verified against PyTorch). Every step is the real
command-line script; the demo's run folder runs/demo is started afresh.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from common.cli import ArgumentParser, run_script
from common.errors import exit_on_user_error

ROOT = Path(__file__).resolve().parent
RUN = ROOT / "runs" / "demo"
MODEL_DIR = ROOT / "OneShot"


def step(title: str, args: list[str], cwd: Path = MODEL_DIR) -> None:
    print(f"\n=== {title}\n$ {' '.join(args)}", flush=True)
    started = time.perf_counter()
    status = run_script([sys.executable, *args], cwd=cwd,
                        stopped="demo stopped; it starts afresh when run again")
    if status:
        sys.exit(f"demo: '{title}' failed with exit status {status}")
    print(f"--- {title}: {time.perf_counter() - started:.0f} s", flush=True)


def averaging_verdict(last_error: float, average_error: float, iterations: int) -> str:
    """Whether averaging paid off in this run, in words: it may not, and the demo says so."""
    difference = average_error - last_error
    if abs(difference) < 0.05:
        return "The average scores the same as the last checkpoint."
    if difference < 0:
        return f"The average beats the last checkpoint by {-difference:.1f} points of top-1 error."
    return (f"The average is {difference:.1f} points of top-1 error worse than the last checkpoint in this run: "
            "weight averaging pays when the averaged checkpoints lie close together near the end of a long "
            f"schedule, and those of a {iterations}-iteration demo need not. Here the last checkpoint is the one to "
            "keep.")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    # No options: --help describes the demo, and anything else is refused before runs/demo is cleared.
    ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    from common.atomic_io import claim_output
    from common.checkpoint_store import get_latest_model

    # A second demo would clear runs/demo under the first one.
    RUN.parent.mkdir(parents=True, exist_ok=True)
    claim_output(RUN.parent / ".demo.lock", lambda holder: (
        f"a demo is already running in this clone{holder}; it clears and writes {RUN}, so wait for it to end"))
    shutil.rmtree(RUN, ignore_errors=True)
    save = RUN / "OneShot"
    started = time.perf_counter()
    # Averaged weights need their own BatchNorm statistics: the checkpoints' running means do not average.
    step("train OneShot on the demo dataset, then average the best 3 checkpoints",
         ["train.py", "--demo", "--save", str(save), "--average-best", "3", "--recompute-bn", "20"])
    latest, iterations = get_latest_model(save)
    average = save / "average-best-3-recomputed-bn.safetensors"
    step("evaluate the last checkpoint", ["eval.py", "--weights", str(latest), "--val-dir",
                                          str(ROOT / "data" / "demo" / "val"),
                                          "--results-json", str(RUN / "eval.json")])
    step("evaluate the average", ["eval.py", "--weights", str(average), "--val-dir",
                                  str(ROOT / "data" / "demo" / "val"), "--results-json",
                                  str(RUN / "eval-average.json")])
    step("export to Core ML (verified)", ["export.py", "--weights", str(average), "--format", "coreml",
                                           "--image-size", "64", "--output", str(RUN / "OneShot.mlpackage")])
    step("export to ONNX (verified)", ["export.py", "--weights", str(average), "--format", "onnx",
                                        "--image-size", "64", "--output", str(RUN / "OneShot.onnx")])
    last = json.loads((RUN / "eval.json").read_text())
    averaged = json.loads((RUN / "eval-average.json").read_text())
    print(f"\nDemo finished in {time.perf_counter() - started:.0f} s. OneShot after {iterations} iterations: "
          f"top-1 error {last['top1_error']:.1f}% (chance: 83.3%); average of the best 3: "
          f"{averaged['top1_error']:.1f}%.")
    print(averaging_verdict(last["top1_error"], averaged["top1_error"], iterations))
    print(f"Files in {RUN}: checkpoints, the average, metrics.jsonl, TensorBoard events and curves.png in "
          "OneShot/; eval.json, eval-average.json; OneShot.mlpackage; OneShot.onnx")


if __name__ == "__main__":
    main()
