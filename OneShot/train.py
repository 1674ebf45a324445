"""Train OneShot with its original recipe (network.RECIPE): batch 1024, lr 0.5, 300,000 iterations (MODELS.md).

    python train.py --train-dir /data/imagenet/train --val-dir /data/imagenet/val
    torchrun --nproc_per_node 8 train.py --train-dir ... --val-dir ...
    python train.py --demo
    python train.py --architecture search.json ...   # a searched architecture (search.py), from scratch
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import network  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.training import NetworkHooks, exit_status, load_training_checkpoint, run_training  # noqa: E402


class ArchitectureHooks(NetworkHooks):
    """--architecture: train a point of the search space; the checkpoints carry it in their metadata."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--architecture", metavar="FILE",
                            help='JSON file: an architecture {"blocks": [...], "channel_scales": [...]} or the '
                                 "output of search.py (its first, best entry); default: the released OneShot, or the "
                                 "architecture of the run resumed in --save or of the --pretrained file")

    def metadata(self, args: argparse.Namespace) -> dict:
        return {"architecture": read_architecture(args.architecture)} if args.architecture else {}


def read_architecture(path: str) -> dict:
    """The architecture in FILE (an architecture object, or search.py's output: its first entry)."""
    try:
        obj = json.loads(Path(path).read_text())
    except OSError as error:
        raise UserError(f"--architecture {path}: cannot read it ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"--architecture {path}: not JSON ({error})") from None
    if isinstance(obj, dict) and isinstance(obj.get("architectures"), list) and obj["architectures"]:
        obj = obj["architectures"][0]
    try:
        blocks, scale_ids = network.architecture_choices(obj)
    except ValueError as error:
        raise UserError(f"--architecture {path}: {error}") from None
    return {"blocks": blocks, "channel_scales": [network.CHANNEL_SCALES[i] for i in scale_ids]}


# The network's recipe, with the flag that trains a searched architecture.
RECIPE = dataclasses.replace(network.RECIPE, hooks=ArchitectureHooks())


def load_checkpoint(path, model, **objects) -> dict:
    """Resume from this project's checkpoints (`--eval` runs eval.py, which takes released files too)."""
    return load_training_checkpoint(path, model, **objects)


def main(argv: list[str] | None = None) -> str:
    return run_training(network, RECIPE, load_checkpoint, argv)


if __name__ == "__main__":
    sys.exit(exit_status(main()))
