"""A model's training recipe: the defaults train.py starts from, kept beside the network (network.RECIPE) as timm
keeps a model's config beside its definition. Plain values, so network.py imports nothing of the training loop."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class DemoRecipe:
    """What `--demo` changes: a short run on a CPU with the built-in dataset."""

    batch_size: int = 48
    learning_rate: float = 0.1
    total_iters: int = 200
    image_size: int = 64
    display_interval: int = 10
    # Checkpoints close together near the end, so that averaging the best few (demo.py) is meaningful.
    val_interval: int = 25
    save_interval: int = 25


@dataclass(frozen=True)
class FinetuneRecipe:
    """What `--pretrained` changes: defaults for fine-tuning on a few thousand images (a model card states them)."""

    batch_size: int
    learning_rate: float
    total_iters: int
    warmup_iters: int
    display_interval: int = 20
    val_interval: int = 250
    save_interval: int = 250


class NetworkHooks:
    """What a folder whose network is not fixed adds to the loop (OneShot's searched architecture in the metadata,
    the supernet's path per iteration); the defaults add nothing."""

    # DDP must expect parameters that get no gradient in an iteration (a supernet trains one path at a time).
    find_unused_parameters: bool = False
    # One fixed network, which eval.py evaluates and --pretrained can start: False for a supernet, whose train.py
    # then has no --pretrained, --freeze-backbone, --eval or --eval-resume.
    one_network: bool = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The folder's own flags."""

    def metadata(self, args: argparse.Namespace) -> dict:
        """Checkpoint metadata from those flags (checked here: raise UserError for bad values)."""
        return {}

    def train_samples(self, samples: list[tuple[str, int]], args: argparse.Namespace) -> list[tuple[str, int]]:
        """The (path, label) samples of --train-dir to train on."""
        return samples

    def prepare(self, model: nn.Module, iteration: int | None, args: argparse.Namespace) -> None:
        """Called before the forward pass of each training iteration, and with None before validation."""


@dataclass(frozen=True)
class Recipe:
    """A model's training defaults (the original recipe) and what its loss is made of."""

    model_name: str
    batch_size: int
    learning_rate: float
    total_iters: int
    # Weights of the losses of the network's outputs: the logits, then the side heads in the order the network
    # returns them in training mode.
    loss_weights: tuple[float, ...] = (1.0,)
    momentum: float = 0.9
    weight_decay: float = 4e-5
    label_smooth: float = 0.1
    image_size: int = 224
    display_interval: int = 20
    val_interval: int = 10_000
    save_interval: int = 10_000
    demo: DemoRecipe = field(default_factory=DemoRecipe)
    finetune: FinetuneRecipe = FinetuneRecipe(batch_size=64, learning_rate=0.01, total_iters=1500, warmup_iters=100)
    hooks: NetworkHooks = field(default_factory=NetworkHooks)
