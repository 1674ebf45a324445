"""Eval images/s per model at 224: the plain path against the fast path and its steps, with achieved GFLOP/s.

The plain path is eager float32 with BatchNorm not folded on contiguous NCHW. The fast path, eval.py's default,
folds BatchNorm into the convs and runs float32 under inference mode in the layout it measures faster on this
machine at start (common.inference.prepare_inference_model); fast+bf16 is the same under bf16 autocast
(eval.py --amp bf16), where the CPU computes bfloat16 natively; the full form adds torch.compile with frozen weights
(eval.py --compile --amp bf16). All include the input format (uint8 RGB -> BGR float, mean) on the device.
Variants are timed in turns, one call of each per round, so a load from other processes on the machine slows all
of them alike. GFLOP/s counts 2 FLOPs per multiply-add of the published MACs and is set against this machine's
dense matmul GFLOP/s in the same precision, measured in the same run.

    python bench/eval_speed.py [--models OneShot ...] [--batch-size N] [--variants ...] [--quick] [--results-json FILE]
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from timing import add_results_argument, interleaved, matmul_gflops, paired_ratio, rate, write_json
from common.cli import ArgumentParser, positive_int
from common.errors import exit_on_user_error
from common.hardware import cpu_supports_bf16
from common.inference import prepare_inference_model
from common.models import MODEL_FOLDERS, load_network_module

IMAGE_SIZE = 224
# Batches of a few seconds each: ExLarge is 46 GMACs per image, Large 12.8, OneShot 0.33.
BATCH = {"OneShot": 32, "ShuffleNetV2.Large": 8, "ShuffleNetV2.ExLarge": 4}
VARIANTS = {
    "plain": {"fold_bn": False, "channels_last": False},
    "fast": {"amp": "none"},
    "fast+compile": {"compile": True, "amp": "none"},
    "fast+bf16": {"amp": "bf16"},
    "fast+compile+bf16": {"compile": True, "amp": "bf16"},
}


def full_fast_path() -> str:
    return "fast+compile+bf16" if cpu_supports_bf16() else "fast+compile"


def bench_model(model_name: str, variants: list[str], batch: int, repeats: int, warmup: int,
                peak: dict[str, float]) -> dict:
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
    for variant, speed in results.items():
        speed["gflops"] = 2 * network.PUBLISHED["macs"] * speed["median"] / 1e9
        speed["fraction_of_matmul"] = speed["gflops"] / peak["bfloat16" if "bf16" in variant else "float32"]
        if "plain" in results:
            speed["ratio"] = paired_ratio(seconds, "plain", variant)
    return {"batch": batch, "macs": network.PUBLISHED["macs"], "images_per_second": results}


@exit_on_user_error
def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_FOLDERS), choices=MODEL_FOLDERS,
                        help="model folders to measure (default: all)")
    parser.add_argument("--batch-size", type=positive_int,
                        help="images per call (default: " + ", ".join(f"{m} {b}" for m, b in BATCH.items()) + ")")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="paths to time (default: all; bf16 ones only where the CPU supports bf16). Each "
                             "compiled one compiles for up to a minute per model on 2 cores")
    parser.add_argument("--repeats", type=positive_int, default=7, help="timed rounds per model (default: 7)")
    parser.add_argument("--quick", action="store_true",
                        help="plain, fast and fast+bf16 (where native) only, so nothing compiles; 3 rounds after "
                             "one warm-up round")
    add_results_argument(parser)
    args = parser.parse_args()
    if args.variants:
        variants = args.variants
    elif args.quick:
        variants = ["plain", "fast"] + (["fast+bf16"] if cpu_supports_bf16() else [])
    else:
        variants = [v for v in VARIANTS if "bf16" not in v or cpu_supports_bf16()]
    repeats, warmup = (3, 1) if args.quick else (args.repeats, 2)
    peak = {dtype: matmul_gflops(dtype=dtype) for dtype in ("float32", "bfloat16")}
    print(f"eval images/s at {IMAGE_SIZE}px on {torch.get_num_threads()} threads; median of {repeats} rounds "
          f"after {warmup} warm-up round(s), [min, max]; ratio: the median of plain's time / the variant's in each "
          f"round; dense matmul {peak['float32']:.0f} GFLOP/s fp32, {peak['bfloat16']:.0f} GFLOP/s bf16 "
          f"(bf16 {'native' if cpu_supports_bf16() else 'emulated'})", flush=True)
    results = {}
    for model_name in args.models:
        result = bench_model(model_name, variants, args.batch_size or BATCH[model_name], repeats, warmup, peak)
        results[model_name] = result
        for variant, speed in result["images_per_second"].items():
            ratio = f"  {speed['ratio']:.2f}x" if "ratio" in speed else ""
            print(f"eval {model_name:22s} {variant:18s} {speed['median']:8.2f} img/s  "
                  f"[{speed['min']:.2f}, {speed['max']:.2f}]{ratio}  {speed['gflops']:6.1f} GFLOP/s "
                  f"({speed['fraction_of_matmul']:.0%} of matmul)  (batch {result['batch']})", flush=True)
    write_json(args.results_json, {"image_size": IMAGE_SIZE, "threads": torch.get_num_threads(),
                                   "matmul_gflops": peak, "bf16_native": cpu_supports_bf16(),
                                   "full_fast_path": full_fast_path(), "models": results})


if __name__ == "__main__":
    main()
