"""Eval images/s per model at 224: the plain path against the fast path and its compile / bf16 variants.

The plain path is eager float32 with BatchNorm not folded on contiguous NCHW; the fast path folds BatchNorm into
the convs and runs channels_last under inference mode (common.inference.prepare_inference_model, as eval.py does).
Both include the input format (uint8 RGB -> BGR float, mean) on the device. Variants are timed in turns, one call
of each per round, so a load from other processes on the machine slows all of them alike.

    python bench/eval_speed.py [--models OneShot ...] [--batch-size N] [--variants ...] [--quick] [--json FILE]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Callable

import torch

from timing import rate, write_json
from common.inference import prepare_inference_model
from common.models import MODEL_FOLDERS, load_network_module

IMAGE_SIZE = 224
# Batches of a few seconds each: ExLarge is 46 GMACs per image, Large 12.8, OneShot 0.33.
BATCH = {"OneShot": 32, "ShuffleNetV2.Large": 8, "ShuffleNetV2.ExLarge": 4}
VARIANTS = {
    "plain": {"fold_bn": False, "channels_last": False},
    "fast": {},
    "fast+bf16": {"amp": "bf16"},
    "fast+compile": {"compile": True},
    "fast+compile+bf16": {"compile": True, "amp": "bf16"},
}
DEFAULT_VARIANTS = ("plain", "fast", "fast+bf16", "fast+compile+bf16")


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Seconds per call of each run (median, min, max), calling every run once per round."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return {name: {"median": statistics.median(values), "min": min(values), "max": max(values)}
            for name, values in seconds.items()}


def bench_model(model_name: str, variants: list[str], batch: int, repeats: int, warmup: int) -> dict:
    network = load_network_module(model_name)
    torch.manual_seed(0)
    model = network.create_network().eval()
    images = torch.randint(0, 256, (batch, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    runs = {}
    # The plain path uses `model` itself, so it is prepared last: the fast variants fold copies of it.
    for variant in sorted(variants, key=lambda name: name == "plain"):
        runner = prepare_inference_model(model, input_format=network.INPUT_FORMAT, device="cpu",
                                         **VARIANTS[variant])
        started = time.perf_counter()
        runner(images)  # torch.compile compiles here
        print(f"  {model_name} {variant}: first call {time.perf_counter() - started:.1f} s", flush=True)
        runs[variant] = lambda runner=runner: runner(images)
    seconds = interleaved({name: runs[name] for name in variants}, repeats, warmup)
    del runs, model
    gc.collect()
    results = {variant: rate(seconds[variant], batch) for variant in variants}
    if "plain" in results:
        for variant in variants:
            results[variant]["ratio"] = results[variant]["median"] / results["plain"]["median"]
    return {"batch": batch, "images_per_second": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_FOLDERS), choices=MODEL_FOLDERS)
    parser.add_argument("--batch-size", type=int,
                        help="images per call (default: " + ", ".join(f"{m} {b}" for m, b in BATCH.items()) + ")")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                        help="paths to time (fast+compile compiles for minutes on 2 cores)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per model")
    parser.add_argument("--quick", action="store_true", help="3 rounds after one warm-up round, no torch.compile")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    variants = [v for v in args.variants if not (args.quick and "compile" in v)]
    repeats, warmup = (3, 1) if args.quick else (args.repeats, 2)
    print(f"eval images/s at {IMAGE_SIZE}px on {torch.get_num_threads()} threads; median of {repeats} rounds "
          f"after {warmup} warm-up round(s), [min, max]; ratio = median / plain median", flush=True)
    results = {}
    for model_name in args.models:
        result = bench_model(model_name, variants, args.batch_size or BATCH[model_name], repeats, warmup)
        results[model_name] = result
        for variant, speed in result["images_per_second"].items():
            ratio = f"  {speed['ratio']:.2f}x" if "ratio" in speed else ""
            print(f"eval {model_name:22s} {variant:18s} {speed['median']:8.2f} img/s  "
                  f"[{speed['min']:.2f}, {speed['max']:.2f}]{ratio}  (batch {result['batch']})", flush=True)
    write_json(args.json, {"image_size": IMAGE_SIZE, "threads": torch.get_num_threads(), "models": results})


if __name__ == "__main__":
    main()
