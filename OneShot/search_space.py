"""The Single Path One-Shot search space of OneShot: 20 layers, each a block choice and a channel scale.

An architecture is `{"blocks": [20 ints 0-3], "channel_scales": [20 floats 0.2-2.0]}` (network.py builds any);
inside the search it is the pair of tuples (blocks, scale indices). Every layer's input and output shapes are the
same whatever the choices, so a network's multiply-accumulates (the papers' "FLOPs") and parameters are a fixed
part plus one table entry per layer. The tables are filled by the project's own counters (common.counting) on each
block alone, so a path's count equals the counter's count of the standalone network built from it.
"""
from __future__ import annotations

import os
from functools import cache
from typing import Mapping

import numpy as np
import torch
from torch import nn

import network
from common.counting import count_parameters
from common.errors import UserError

NUM_LAYERS = sum(network.STAGE_REPEATS)
NUM_SCALES = len(network.CHANNEL_SCALES)
# Budgets are counted at the published tables' resolution, whatever the training image size.
BUDGET_IMAGE_SIZE = 224

Choices = tuple[tuple[int, ...], tuple[int, ...]]  # (block per layer, channel-scale index per layer)


def layer_shapes(image_size: int = BUDGET_IMAGE_SIZE) -> list[tuple[int, int, int, int, int]]:
    """Per layer: (block input channels, output channels, stride, input channels of the tensor, input size)."""
    size = (image_size - 1) // 2 + 1
    shapes, inp = [], network.STEM_WIDTH
    for repeats, oup in zip(network.STAGE_REPEATS, network.STAGE_WIDTHS):
        for i in range(repeats):
            stride = 2 if i == 0 else 1
            shapes.append((inp if stride == 2 else oup // 2, oup, stride, inp if stride == 2 else oup, size))
            if stride == 2:
                size = (size - 1) // 2 + 1
        inp = oup
    return shapes


def _conv_macs(sequential: nn.Sequential, size: int) -> tuple[int, int]:
    """(MACs, output size) of a chain of convs as common.counting counts them: output elements x kernel."""
    total = 0
    for module in sequential:
        if isinstance(module, nn.Conv2d):
            size = (size + 2 * module.padding[0] - module.kernel_size[0]) // module.stride[0] + 1
            total += module.out_channels * size * size * module.weight.shape[1] * module.weight[0, 0].numel()
    return total, size


@cache
def cost_tables(num_classes: int = 1000, image_size: int = BUDGET_IMAGE_SIZE
                ) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(fixed MACs, fixed params, MACs[layer, block, scale], params[layer, block, scale]).

    Counted on each block built alone (on the meta device: shapes only) the way common.counting counts; the tests
    check the sums against common.counting's count of whole networks.
    """
    macs = np.zeros((NUM_LAYERS, network.NUM_BLOCK_CHOICES, NUM_SCALES), dtype=np.int64)
    params = np.zeros_like(macs)
    counted: dict[tuple, tuple[int, int]] = {}
    with torch.device("meta"):
        for layer, (block_inp, oup, stride, _, size) in enumerate(layer_shapes(image_size)):
            for block in range(network.NUM_BLOCK_CHOICES):
                for scale in range(NUM_SCALES):
                    mid = network.middle_width(oup, scale)
                    key = (block_inp, oup, mid, block, stride, size)
                    if key not in counted:
                        module = network.SearchedBlock(block_inp, oup, mid, block, stride)
                        branches = [module.branch_main] + ([module.branch_proj] if stride == 2 else [])
                        counted[key] = (sum(_conv_macs(branch, size)[0] for branch in branches),
                                        count_parameters(module))
                    macs[layer, block, scale], params[layer, block, scale] = counted[key]
        stem = nn.Sequential(nn.Conv2d(3, network.STEM_WIDTH, 3, 2, 1, bias=False),
                             nn.BatchNorm2d(network.STEM_WIDTH))
        last = nn.Sequential(nn.Conv2d(network.STAGE_WIDTHS[-1], network.LAST_WIDTH, 1, bias=False),
                             nn.BatchNorm2d(network.LAST_WIDTH))
    stem_macs, _ = _conv_macs(stem, image_size)
    last_macs, _ = _conv_macs(last, layer_shapes(image_size)[-1][4])
    fixed_macs = stem_macs + last_macs + network.LAST_WIDTH * num_classes
    fixed_params = count_parameters(stem) + count_parameters(last) + network.LAST_WIDTH * num_classes
    return fixed_macs, fixed_params, macs, params


def costs(choices: Choices, num_classes: int = 1000) -> tuple[int, int]:
    """(MACs at 224x224, parameters) of an architecture."""
    fixed_macs, fixed_params, macs, params = cost_tables(num_classes)
    rows = np.arange(NUM_LAYERS)
    return (fixed_macs + int(macs[rows, choices[0], choices[1]].sum()),
            fixed_params + int(params[rows, choices[0], choices[1]].sum()))


def macs_range(num_classes: int = 1000) -> tuple[int, int]:
    """The smallest and largest MACs of any architecture of the space."""
    fixed_macs, _, macs, _ = cost_tables(num_classes)
    flat = macs.reshape(NUM_LAYERS, -1)
    return fixed_macs + int(flat.min(1).sum()), fixed_macs + int(flat.max(1).sum())


def from_json(architecture: Mapping) -> Choices:
    """An architecture object as the search's (blocks, scale indices); ValueError names what is wrong."""
    blocks, scale_ids = network.architecture_choices(architecture)
    return tuple(blocks), tuple(scale_ids)


def to_json(choices: Choices, num_classes: int = 1000, **extra) -> dict:
    """The architecture object of `choices`, with its MACs and parameters and any `extra` entries."""
    macs, params = costs(choices, num_classes)
    return {"blocks": list(choices[0]), "channel_scales": [network.CHANNEL_SCALES[i] for i in choices[1]],
            "macs": macs, "params": params, **extra}


def describe(choices: Choices) -> str:
    names = ("3x3", "5x5", "7x7", "Xcp")
    return " ".join(f"{names[b]}@{network.CHANNEL_SCALES[s]:.1f}" for b, s in zip(*choices))


def check_budget(flops_min: float, flops_max: float, num_classes: int = 1000) -> None:
    """UserError unless some architecture of the space has MACs within [flops_min, flops_max]."""
    low, high = macs_range(num_classes)
    if flops_min > flops_max:
        raise UserError(f"--flops-min {flops_min:g} is above --flops-max {flops_max:g}")
    if flops_max < low or flops_min > high:
        raise UserError(f"no architecture has {flops_min / 1e6:g}M-{flops_max / 1e6:g}M FLOPs: the search space "
                        f"spans {low / 1e6:.1f}M-{high / 1e6:.1f}M (multiply-accumulates at 224x224, "
                        f"{num_classes} classes)")


def sample(rng: np.random.Generator, flops_min: float, flops_max: float, num_classes: int = 1000,
           max_draws: int = 200_000) -> Choices:
    """A uniform draw among the architectures with MACs in [flops_min, flops_max]: uniform draws of every
    layer's block and scale, the first one within the range kept (rejection sampling keeps it uniform)."""
    fixed_macs, _, macs, _ = cost_tables(num_classes)
    rows = np.arange(NUM_LAYERS)
    for _ in range(max_draws // 1000):
        blocks = rng.integers(0, network.NUM_BLOCK_CHOICES, size=(1000, NUM_LAYERS))
        scales = rng.integers(0, NUM_SCALES, size=(1000, NUM_LAYERS))
        total = fixed_macs + macs[rows, blocks, scales].sum(1)
        inside = np.flatnonzero((total >= flops_min) & (total <= flops_max))
        if inside.size:
            return tuple(int(b) for b in blocks[inside[0]]), tuple(int(s) for s in scales[inside[0]])
    raise UserError(f"no architecture with {flops_min / 1e6:g}M-{flops_max / 1e6:g}M FLOPs in {max_draws:,} "
                    f"uniform draws: widen --flops-min/--flops-max")


def path_for_iteration(seed: int, iteration: int, flops_min: float, flops_max: float,
                       num_classes: int = 1000) -> Choices:
    """The path the supernet trains at `iteration`: a pure function of the seed and the iteration, so every rank
    draws the same one and a resumed run draws what the uninterrupted run drew."""
    return sample(np.random.default_rng([seed, iteration, 0x5305]), flops_min, flops_max, num_classes)


def reference_path(seed: int, flops_min: float, flops_max: float, num_classes: int = 1000) -> Choices:
    """The supernet's fixed validation path: the released OneShot when within the range, else a fixed draw."""
    released = from_json(network.released_architecture())
    if flops_min <= costs(released, num_classes)[0] <= flops_max:
        return released
    return sample(np.random.default_rng([seed, 0x5EF]), flops_min, flops_max, num_classes)


def held_out_split(samples: list[tuple[str, int]], per_class: int, seed: int) -> list[int]:
    """Indices into `samples` (an ImageFolder scan) of the held-out images: `per_class` of every class, drawn
    from the seed alone. The supernet never trains on them; the search scores candidates on them."""
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(index)
    held_out = []
    for label, indices in sorted(by_class.items()):
        if len(indices) <= per_class:
            folder = os.path.basename(os.path.dirname(samples[indices[0]][0]))
            raise UserError(f"--held-out-per-class {per_class}: class {folder} has only {len(indices)} training "
                            f"images; hold out fewer")
        order = np.random.default_rng([seed, label, 0x4E1D]).permutation(len(indices))
        held_out.extend(indices[i] for i in sorted(order[:per_class]))
    return sorted(held_out)
