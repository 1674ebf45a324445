"""Train the Single Path One-Shot supernet of OneShot's search space (stage 1 of 3; then search.py, train.py).

Each iteration trains one path, drawn uniformly among the architectures with --flops-min..--flops-max
multiply-accumulates (at 224x224) from the seed and the iteration: every rank trains the same path and a resumed
run draws the same paths. --held-out-per-class images of every class are left out of training; search.py scores
its candidates on them. Recipe: the original supernet's (batch 1024, lr 0.5 linear to 0, 150,000 iterations).

    python train_supernet.py --train-dir /data/imagenet/train --val-dir /data/imagenet/val --save supernet
    torchrun --nproc_per_node 8 train_supernet.py --train-dir ... --val-dir ... --save supernet
    python train_supernet.py --demo

Validation runs the fixed reference path (the released OneShot when within the FLOPs range, else a fixed draw),
normalised with each validation batch's own BatchNorm statistics (the shared running statistics mix all paths'):
a sign of progress, not a figure of any one architecture; search.py re-estimates them for every candidate.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import search_space  # noqa: E402
import supernet  # noqa: E402
from common.cli import mac_count, positive_int  # noqa: E402
from common.model_state import unwrap_model  # noqa: E402
from common.training import (DemoRecipe, NetworkHooks, Recipe, exit_status,  # noqa: E402
                             load_training_checkpoint, run_training)


# A sliced weight's gradient comes back in the standard layout. For 1x1 and depthwise kernels under channels_last that
# is the same memory with other strides for a size-1 dimension, which DDP reports (once per rank) as a layout
# mismatch; it copies the gradient into its bucket either way.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


class SupernetHooks(NetworkHooks):
    """The supernet's flags, its held-out split and the path of every iteration."""

    find_unused_parameters = True
    one_network = False  # search.py scores its paths; there is no one network to evaluate or start from weights

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("supernet")
        group.add_argument("--flops-min", type=mac_count, default="290M",
                           help="smallest multiply-accumulates (at 224x224) of a trained path")
        group.add_argument("--flops-max", type=mac_count, default="360M",
                           help="largest multiply-accumulates (at 224x224) of a trained path (the original drew "
                                "its paths from 290M-360M)")
        group.add_argument("--held-out-per-class", type=positive_int, default=50,
                           help="training images per class left out for search.py to score candidates on (the "
                                "paper's 50); drawn from --seed")

    def metadata(self, args: argparse.Namespace) -> dict:
        search_space.check_budget(args.flops_min, args.flops_max, args.num_classes or 1000)
        return {"supernet": {"flops_min": args.flops_min, "flops_max": args.flops_max, "seed": args.seed,
                             "held_out_per_class": args.held_out_per_class}}

    def train_samples(self, samples: list[tuple[str, int]], args: argparse.Namespace) -> list[tuple[str, int]]:
        held_out = set(search_space.held_out_split(samples, args.held_out_per_class, args.seed))
        return [sample for index, sample in enumerate(samples) if index not in held_out]

    def prepare(self, model, iteration: int | None, args: argparse.Namespace) -> None:
        model = unwrap_model(model)
        num_classes = model.classifier[0].out_features
        if iteration is None:
            path = search_space.reference_path(args.seed, args.flops_min, args.flops_max, num_classes)
        else:
            path = search_space.path_for_iteration(args.seed, iteration, args.flops_min, args.flops_max,
                                                   num_classes)
        model.set_architecture(path)
        model.use_batch_statistics_in_eval(iteration is None)


RECIPE = Recipe(model_name="OneShot-supernet", batch_size=1024, learning_rate=0.5, total_iters=150_000,
                # Demo: small images and batches keep 300 iterations affordable on a CPU; each iteration trains one
                # path of 40^20, so the supernet learns far slower than one network (README: "Measured on the
                # built-in data").
                demo=DemoRecipe(batch_size=32, learning_rate=0.02, total_iters=300, image_size=32, val_interval=100,
                                save_interval=100), hooks=SupernetHooks())


def main(argv: list[str] | None = None) -> str:
    return run_training(supernet, RECIPE, load_training_checkpoint, argv)


if __name__ == "__main__":
    sys.exit(exit_status(main()))
