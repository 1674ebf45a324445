"""OneShot: the ImageNet network found by Single Path One-Shot architecture search (MODELS.md, "OneShot")."""
from __future__ import annotations

import os
import sys
from typing import Mapping

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.backbone import ClassifierNetwork, build_network  # noqa: E402
from common.input_format import InputFormat  # noqa: E402
from common.layers import channel_split_shuffle, init_weights  # noqa: E402
from common.recipe import FinetuneRecipe, Recipe  # noqa: E402

# Searched choice per layer: 0, 1, 2 = shuffle block with a 3x3, 5x5, 7x7 depthwise kernel; 3 = Xception block.
ARCHITECTURE = [0, 0, 3, 1, 1, 1, 0, 0, 2, 0, 2, 1, 1, 0, 2, 0, 2, 1, 3, 2]
# Scales of a layer's middle width, the paper's channel search space (the released network uses the first 8).
CHANNEL_SCALES = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0]
SCALE_IDS = [6, 5, 3, 5, 2, 6, 3, 4, 2, 5, 7, 5, 4, 6, 7, 4, 4, 5, 4, 3]
NUM_BLOCK_CHOICES = 4
STAGE_REPEATS = [4, 4, 8, 4]
STAGE_WIDTHS = [64, 160, 320, 640]
STEM_WIDTH = 16
LAST_WIDTH = 1024

PUBLISHED = {"params": 3_432_579, "macs": 327_857_920, "top1_error": 25.1, "top5_error": 8.0}
# Released weights: BGR 0..255, no mean subtraction (MODELS.md, "Input format").
INPUT_FORMAT = InputFormat(channel_order="BGR")
# What depends on the number of classes (re-initialised by fine-tuning to another count, dropped by features_only).
CLASSIFIER = "classifier"
SIDE_HEADS: tuple[str, ...] = ()

# -- training recipe (MODELS.md, "Training recipes"): batch 1024, lr 0.5 falling linearly to 0 over 300,000
# iterations. --pretrained FILE: fine-tuning defaults for a few thousand images (about 32 epochs of 3,000 at this
# batch), chosen by rule of thumb, not tuned.
RECIPE = Recipe(model_name="OneShot", batch_size=1024, learning_rate=0.5, total_iters=300_000,
                finetune=FinetuneRecipe(batch_size=64, learning_rate=0.02, total_iters=1500, warmup_iters=100))


def _dw_conv(channels: int, kernel: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel, stride, kernel // 2, groups=channels, bias=False)


def _pw_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


class SearchedBlock(nn.Module):
    """One searched layer: a shuffle block (kernel 3, 5 or 7) or an Xception block (kernel 3, three dw convs)."""

    def __init__(self, inp: int, oup: int, mid: int, choice: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        kernel = 3 if choice == 3 else (3, 5, 7)[choice]
        out_main = oup - inp
        if choice == 3:
            self.branch_main = nn.Sequential(
                _dw_conv(inp, 3, stride), nn.BatchNorm2d(inp),
                _pw_conv(inp, mid), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                _dw_conv(mid, 3, 1), nn.BatchNorm2d(mid),
                _pw_conv(mid, mid), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                _dw_conv(mid, 3, 1), nn.BatchNorm2d(mid),
                _pw_conv(mid, out_main), nn.BatchNorm2d(out_main), nn.ReLU(inplace=True),
            )
        else:
            self.branch_main = nn.Sequential(
                _pw_conv(inp, mid), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                _dw_conv(mid, kernel, stride), nn.BatchNorm2d(mid),
                _pw_conv(mid, out_main), nn.BatchNorm2d(out_main), nn.ReLU(inplace=True),
            )
        if stride == 2:
            self.branch_proj = nn.Sequential(
                _dw_conv(inp, kernel, 2), nn.BatchNorm2d(inp),
                _pw_conv(inp, inp), nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            even, odd = channel_split_shuffle(x)
            return torch.cat((even, self.branch_main(odd)), 1)
        return torch.cat((self.branch_proj(x), self.branch_main(x)), 1)


class OneShotNetwork(ClassifierNetwork):
    classifier_name = CLASSIFIER
    side_head_names = SIDE_HEADS
    head_conv_name = "conv_last"
    stage_channels = tuple(STAGE_WIDTHS)
    num_features = LAST_WIDTH
    input_format = INPUT_FORMAT

    def __init__(self, num_classes: int = 1000, architecture: Mapping | None = None) -> None:
        super().__init__()
        choices, scale_ids = architecture_choices(architecture)
        self.first_conv = nn.Sequential(
            nn.Conv2d(3, STEM_WIDTH, 3, 2, 1, bias=False), nn.BatchNorm2d(STEM_WIDTH), nn.ReLU(inplace=True))
        blocks = []
        inp, layer = STEM_WIDTH, 0
        for repeats, oup in zip(STAGE_REPEATS, STAGE_WIDTHS):
            for i in range(repeats):
                stride = 2 if i == 0 else 1
                block_inp = inp if stride == 2 else oup // 2
                mid = middle_width(oup, scale_ids[layer])
                blocks.append(SearchedBlock(block_inp, oup, mid, choices[layer], stride))
                layer += 1
            inp = oup
        self.features = nn.Sequential(*blocks)
        self.conv_last = nn.Sequential(
            _pw_conv(inp, LAST_WIDTH), nn.BatchNorm2d(LAST_WIDTH), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Sequential(nn.Linear(LAST_WIDTH, num_classes, bias=False))
        init_weights(self)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.first_conv(x)

    def stages(self) -> list[nn.Module]:
        return [self.features[start:end] for start, end in zip(_STAGE_STARTS, _STAGE_ENDS)]

    def stage_module_names(self) -> list[str]:
        return [f"features.{end - 1}" for end in _STAGE_ENDS]

    def drop_stages_after(self, last: int) -> None:
        del self.features[_STAGE_ENDS[last]:]

    def new_classifier(self, num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Linear(LAST_WIDTH, num_classes, bias=False))


_STAGE_ENDS = [sum(STAGE_REPEATS[:i + 1]) for i in range(len(STAGE_REPEATS))]
_STAGE_STARTS = [0] + _STAGE_ENDS[:-1]


def create_network(num_classes: int = 1000, architecture: Mapping | None = None, *, features_only: bool = False,
                   out_indices: tuple[int, ...] = (0, 1, 2, 3)) -> OneShotNetwork:
    """The OneShot network with its original initialisation; keys match the released weights.

    `architecture` is any point of the search space, `{"blocks": [20 ints 0-3], "channel_scales": [20 floats
    0.2-2.0]}` (other keys ignored); None is the released OneShot. `features_only`: a backbone returning the
    outputs of stages `out_indices` (strides 4, 8, 16, 32).
    """
    return build_network(lambda classes: OneShotNetwork(classes, architecture), num_classes, features_only,
                         out_indices)


def create_network_for(metadata: Mapping, num_classes: int | None = None, **options) -> OneShotNetwork:
    """The network a checkpoint's metadata describes: its searched `architecture` when it has one (train.py
    --architecture stores it), else the released OneShot; `num_classes` defaults to the metadata's; `options` as
    create_network's."""
    if num_classes is None:
        num_classes = metadata.get("num_classes") or 1000
    return create_network(num_classes, metadata.get("architecture"), **options)


def released_architecture() -> dict:
    """The released OneShot as a search-space point."""
    return {"blocks": list(ARCHITECTURE), "channel_scales": [CHANNEL_SCALES[i] for i in SCALE_IDS]}


def middle_width(out_channels: int, scale_id: int) -> int:
    """A layer's middle width, `int((oup // 2) * scale)` as in the original code."""
    return int((out_channels // 2) * CHANNEL_SCALES[scale_id])


def architecture_choices(architecture: Mapping | None) -> tuple[list[int], list[int]]:
    """(block choice, channel-scale index) per layer of an architecture object; ValueError names what is wrong."""
    if architecture is None:
        return list(ARCHITECTURE), list(SCALE_IDS)
    if not isinstance(architecture, Mapping) or "blocks" not in architecture or "channel_scales" not in architecture:
        raise ValueError('an architecture is an object {"blocks": [20 ints 0-3], "channel_scales": [20 floats]}')
    layers = sum(STAGE_REPEATS)
    blocks, scales = list(architecture["blocks"]), list(architecture["channel_scales"])
    if len(blocks) != layers or len(scales) != layers:
        raise ValueError(f"an architecture has {layers} blocks and {layers} channel_scales, not "
                         f"{len(blocks)} and {len(scales)}")
    if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < NUM_BLOCK_CHOICES for b in blocks):
        raise ValueError(f"blocks must be integers 0-3 (shuffle 3x3, 5x5, 7x7, Xception), not {blocks}")
    scale_ids = []
    for scale in scales:
        index = round(float(scale) / 0.2) - 1 if isinstance(scale, (int, float)) else -1
        if not 0 <= index < len(CHANNEL_SCALES) or abs(float(scale) - CHANNEL_SCALES[index]) > 1e-6:
            raise ValueError(f"channel_scales must be among {CHANNEL_SCALES}, not {scale}")
        scale_ids.append(index)
    return blocks, scale_ids


if __name__ == "__main__":
    import sys

    from common.counting import figures_main
    sys.exit(figures_main("OneShot", create_network, PUBLISHED))
