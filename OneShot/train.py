"""Train OneShot with its original recipe: batch 1024, lr 0.5, 300,000 iterations (MODELS.md).

    python train.py --train-dir /data/imagenet/train --val-dir /data/imagenet/val
    torchrun --nproc_per_node 8 train.py --train-dir ... --val-dir ...
    python train.py --demo
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import network  # noqa: E402
from common.training import FinetuneRecipe, Recipe, exit_status, load_training_checkpoint, run_training  # noqa: E402

# --pretrained FILE: fine-tuning defaults for a few thousand images (about 32 epochs of 3,000 at this batch),
# chosen by rule of thumb, not tuned.
RECIPE = Recipe(model_name="OneShot", batch_size=1024, learning_rate=0.5, total_iters=300_000,
                finetune=FinetuneRecipe(batch_size=64, learning_rate=0.02, total_iters=1500, warmup_iters=100))


def load_checkpoint(path, model, **objects) -> dict:
    """Resume from this project's checkpoints (`--eval` runs eval.py, which takes released files too)."""
    return load_training_checkpoint(path, model, **objects)


def main(argv: list[str] | None = None) -> str:
    return run_training(network, RECIPE, load_checkpoint, argv)


if __name__ == "__main__":
    sys.exit(exit_status(main()))
