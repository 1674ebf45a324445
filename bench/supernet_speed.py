"""Training images/s of the OneShot supernet (a new path every step) next to the OneShot network's.

One SGD step of the label-smoothed loss on random images, channels_last, both models at the same batch and size,
timed in alternating rounds so that machine noise falls on both alike. The supernet's paths are those
train_supernet.py draws (290M-360M FLOPs by default).
    python bench/supernet_speed.py [--image-size 64] [--batch-size 48] [--rounds 3] [--steps 3] [--results-json FILE]
"""
from __future__ import annotations

import sys
import time

import torch
from torch import nn

from timing import add_results_argument, write_json
from common.cli import ArgumentParser, mac_count, multiple_of_32, positive_int
from common.errors import exit_on_user_error
from common.models import REPO_ROOT, load_network_module

sys.path.insert(0, str(REPO_ROOT / "OneShot"))
import search_space  # noqa: E402
import supernet  # noqa: E402


@exit_on_user_error
def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=multiple_of_32, default=64, help="image size (default: 64)")
    parser.add_argument("--batch-size", type=positive_int, default=48, help="batch size (default: 48)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="alternating rounds (default: 3)")
    parser.add_argument("--steps", type=positive_int, default=3, help="steps per model per round (default: 3)")
    parser.add_argument("--flops-min", type=mac_count, default="290M",
                        help="smallest multiply-accumulates of a supernet path, counted at 224x224 (default: 290M)")
    parser.add_argument("--flops-max", type=mac_count, default="360M",
                        help="largest multiply-accumulates of a supernet path (default: 360M)")
    add_results_argument(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    models = {"supernet": supernet.create_network(), "OneShot": load_network_module("OneShot").create_network()}
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.batch_size,))
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    optimizers, seconds, iteration = {}, {name: 0.0 for name in models}, 0
    for name, model in models.items():
        models[name] = model.train().to(memory_format=torch.channels_last)
        optimizers[name] = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)

    def step(name: str) -> None:
        nonlocal iteration
        if name == "supernet":
            models[name].set_architecture(search_space.path_for_iteration(0, iteration, args.flops_min,
                                                                          args.flops_max))
            iteration += 1
        loss = criterion(models[name](images), labels)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    for name in models:  # warm-up
        step(name)
    for _ in range(args.rounds):
        for name in models:
            started = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            seconds[name] += time.perf_counter() - started
    steps = args.rounds * args.steps
    results = {name: args.batch_size * steps / seconds[name] for name in models}
    print(f"training images/s at batch {args.batch_size}, {args.image_size}px, {torch.get_num_threads()} threads:")
    for name, value in results.items():
        print(f"  {name:9s} {value:8.1f}")
    print(f"  supernet / OneShot: {results['supernet'] / results['OneShot']:.2f}x")
    write_json(args.results_json, {"batch": args.batch_size, "size": args.image_size, "images_per_second": results})


if __name__ == "__main__":
    main()
