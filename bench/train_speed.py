"""Training images/s per model: eager (float32 NCHW) vs channels_last vs torch.compile vs bf16 autocast vs the
default, the layout and precision train.py picks on this machine ("auto": measured at start, as train.py does).
Each variant is timed in alternating rounds with eager, so its ratio to eager is measured side by side; a default
that chose exactly eager's configuration (NCHW float32) is reported as eager's speed, 1.00x.

One optimiser step of the real loss (label smoothing, side-head weights) on random images, per variant. bf16 runs
only where the CPU computes it natively (emulated bf16 is several times slower than float32).
    python bench/train_speed.py [--models OneShot ...] [--sizes 64 224] [--quick] [--results-json FILE]
"""
from __future__ import annotations

import argparse
import gc
from typing import Callable

import torch
from torch import nn

from timing import add_results_argument, interleaved, paired_ratio, rate, write_json
from common.cli import ArgumentParser, multiple_of_32
from common.errors import exit_on_user_error
from common.hardware import (SpeedChoice, cpu_supports_bf16, probe_batch_size, resolve_speed,
                             training_step_timer)
from common.models import MODEL_FOLDERS, load_network_module
from common.training import compute_loss

LOSS_WEIGHTS = {"OneShot": (1.0,), "ShuffleNetV2.Large": (1.0, 0.7, 0.5, 0.3),
                "ShuffleNetV2.ExLarge": (1.0, 0.7, 0.5, 0.3)}
VARIANTS = ("eager", "channels_last", "compile", "bf16", "default")


def build_step(model_name: str, variant: str, size: int, batch: int) -> tuple[Callable[[], None], SpeedChoice | None]:
    """One optimiser step of `variant` on its own copy of the network, and the default's choice (else None)."""
    torch.manual_seed(0)
    model = load_network_module(model_name).create_network().train()
    choice = None
    if variant == "default":
        probe_batch = probe_batch_size(model, batch, size)
        choice = resolve_speed(None, "auto", "cpu", training_step_timer(model, probe_batch, size, "cpu"),
                               what=f"on training steps of {probe_batch} images of {size}px")
        channels_last, amp = choice.channels_last, choice.amp
    else:
        channels_last, amp = variant in ("channels_last", "compile", "bf16"), "bf16" if variant == "bf16" else None
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    step_model = torch.compile(model) if variant == "compile" else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss, _ = compute_loss(step_model(images), labels, criterion, LOSS_WEIGHTS[model_name])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, choice


def bench_against_eager(model_name: str, variants: list[str], size: int, batch: int, repeats: int) -> list[dict]:
    """Each variant timed in alternating rounds with eager (two networks in memory at a time), so that every
    ratio to eager is measured side by side; eager's own figures are those of its first pairing."""
    eager_step, _ = build_step(model_name, "eager", size, batch)

    def eager_alone() -> dict:
        seconds = interleaved({"eager": eager_step}, repeats=repeats, warmup=1)
        return {"variant": "eager", "images_per_second": rate(seconds["eager"], batch)}

    if not variants:
        return [eager_alone()]
    results = []
    for variant in variants:
        step, choice = build_step(model_name, variant, size, batch)
        if choice is not None and not choice.channels_last and choice.amp is None:
            # The default chose exactly what eager runs: timing a second copy would only measure noise.
            results = results or [eager_alone()]
            results.append({"variant": variant, "images_per_second": results[0]["images_per_second"], "ratio": 1.0,
                            "choice": choice.describe(), "same_as": "eager"})
            continue
        seconds = interleaved({"eager": eager_step, variant: step}, repeats=repeats,
                              warmup=2 if variant == "compile" else 1)
        if not results:
            results.append({"variant": "eager", "images_per_second": rate(seconds["eager"], batch)})
        result = {"variant": variant, "images_per_second": rate(seconds[variant], batch),
                  "ratio": paired_ratio(seconds, "eager", variant)}
        results.append(result if choice is None else {**result, "choice": choice.describe()})
        del step
        gc.collect()
    return results


@exit_on_user_error
def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_FOLDERS), choices=MODEL_FOLDERS,
                        help="model folders to measure (default: all)")
    parser.add_argument("--sizes", nargs="+", type=multiple_of_32, default=[64, 224],
                        help="image sizes (multiples of 32; default: 64 224)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="training configurations to time against eager NCHW float32 (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and no torch.compile (compiling a training step takes minutes per model "
                             "and size on a CPU)")
    add_results_argument(parser)
    args = parser.parse_args()
    results = []
    for model_name in args.models:
        for size in args.sizes:
            heavy = model_name != "OneShot" and size >= 224
            batch = 2 if heavy else (8 if size >= 224 or model_name != "OneShot" else 32)
            repeats = 2 if heavy else (3 if args.quick else 4)
            variants = [v for v in args.variants if v != "eager" and not (v == "compile" and args.quick)
                        and not (v == "bf16" and not cpu_supports_bf16())]
            for result in bench_against_eager(model_name, variants, size, batch, repeats):
                result.update(model=model_name, size=size, batch=batch)
                ratio = f" ({result['ratio']:.2f}x eager)" if "ratio" in result else ""
                ratio = " (= eager: the same configuration)" if "same_as" in result else ratio
                print(f"train {model_name:22s} {size:4d}px {result['variant']:14s} "
                      f"{result['images_per_second']['median']:8.2f} img/s{ratio} (batch {batch})"
                      f"{'  ' + result['choice'] if 'choice' in result else ''}", flush=True)
                results.append(result)
    write_json(args.results_json, results)


if __name__ == "__main__":
    main()
