"""Train ShuffleNetV2.Large with the original Large recipe (network.RECIPE): batch 256, lr 0.25, 600,000 iterations,
side-head losses weighted 1.0 / 0.7 / 0.5 / 0.3 (MODELS.md). Trains on the input format it is evaluated with
(network.INPUT_FORMAT).

    python train.py --train-dir /data/imagenet/train --val-dir /data/imagenet/val
    torchrun --nproc_per_node 8 train.py --train-dir ... --val-dir ...
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import network  # noqa: E402
from common.training import exit_status, load_training_checkpoint, run_training  # noqa: E402
from network import RECIPE  # noqa: E402  (the model's training defaults live with the network)


def load_checkpoint(path, model, **objects) -> dict:
    """Resume from this project's checkpoints (`--eval` runs eval.py, which takes released files too)."""
    return load_training_checkpoint(path, model, **objects)


def main(argv: list[str] | None = None) -> str:
    return run_training(network, RECIPE, load_checkpoint, argv)


if __name__ == "__main__":
    sys.exit(exit_status(main()))
