"""ShuffleNetV2.ExLarge: wider, deeper ShuffleNetV2 with squeeze-excitation (MODELS.md, "ShuffleNetV2.ExLarge")."""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.backbone import StagedNetwork, build_network  # noqa: E402
from common.input_format import InputFormat  # noqa: E402
from common.layers import ConvBNReLU, SideHead, channel_split_shuffle, init_weights  # noqa: E402
from common.recipe import FinetuneRecipe, Recipe  # noqa: E402

BN_EPS = 1e-5
GROUPS = 16
SE_REDUCTION = 4
# (blocks, stage width o, stride of the first block)
STAGES = [(8, 320, 1), (16, 640, 2), (36, 1280, 2), (10, 2560, 2)]
STAGE_CHANNELS = tuple(width for _, width, _ in STAGES)
STEM_WIDTH = 256

PUBLISHED = {"params": 271_283_296, "macs": 46_174_794_752, "top1_error": 15.52, "top5_error": 2.9}
# The published evaluation used BGR 0..255 without mean subtraction; whether the released weights expect that
# could not be confirmed (MODELS.md), so eval/export let a user override it.
INPUT_FORMAT = InputFormat(channel_order="BGR")
# What depends on the number of classes (re-initialised by fine-tuning to another count, dropped by features_only);
# the side heads in the order of the stages they follow.
CLASSIFIER = "fc"
SIDE_HEADS = ("predict_56", "predict_28", "predict_14")

# -- training recipe (MODELS.md, "Training recipes"): Large's recipe, as none was published for ExLarge: batch 256,
# lr 0.25 falling linearly to 0 over 600,000 iterations. Loss weights of (logits, predict_14, predict_28,
# predict_56), the order the network returns them in training. --pretrained FILE: fine-tuning defaults for a few
# thousand images (about 16 epochs of 3,000 at this batch), chosen by rule of thumb, not tuned.
RECIPE = Recipe(model_name="ShuffleNetV2.ExLarge", batch_size=256, learning_rate=0.25, total_iters=600_000,
                loss_weights=(1.0, 0.7, 0.5, 0.3),
                finetune=FinetuneRecipe(batch_size=32, learning_rate=0.005, total_iters=1500, warmup_iters=100))


class FC(nn.Module):
    """The original `FC` unit: a module holding `fc`, so keys read `<name>.fc.weight`."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _unit(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
          relu: bool = True) -> ConvBNReLU:
    return ConvBNReLU(in_channels, out_channels, kernel, stride, groups, relu, bn_eps=BN_EPS)


class ExLargeBlock(nn.Module):
    """The first block of a stage projects the full input; the others split, shuffle and add a residual."""

    def __init__(self, inp: int, width: int, stride: int, first: bool) -> None:
        super().__init__()
        half = width // 2
        if first:
            self.proj = _unit(inp, half, 3, stride)
        self.branch_main = nn.Sequential(
            _unit(inp if first else half, width, 1),
            _unit(width, width, 3, stride, groups=GROUPS),
            _unit(width, width, 3, groups=width, relu=False),
            _unit(width, half, 1, relu=False),
        )
        self.se_fc1 = FC(half, half // SE_REDUCTION)
        self.se_fc2 = FC(half // SE_REDUCTION, half)
        self.first = first

    def squeeze_excite(self, x: torch.Tensor) -> torch.Tensor:
        scale = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        scale = torch.sigmoid(self.se_fc2(torch.relu(self.se_fc1(scale))))
        return x * scale[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            return torch.cat((self.proj(x), self.squeeze_excite(self.branch_main(x))), 1)
        even, odd = channel_split_shuffle(x)
        return torch.cat((even, torch.relu(odd + self.squeeze_excite(self.branch_main(odd)))), 1)


class ShuffleNetV2ExLarge(StagedNetwork):
    classifier_name = CLASSIFIER
    side_head_names = SIDE_HEADS
    head_conv_name = None
    stage_channels = STAGE_CHANNELS
    num_features = STAGES[-1][1]
    input_format = INPUT_FORMAT

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.first_conv = nn.Sequential(_unit(3, 64, 3, 2), _unit(64, 128, 3), _unit(128, STEM_WIDTH, 3))
        self.max_pool = nn.MaxPool2d(3, 2, 1)
        self.features = nn.ModuleList()
        inp = STEM_WIDTH
        for repeats, width, stride in STAGES:
            blocks = [ExLargeBlock(inp if i == 0 else width, width, stride if i == 0 else 1, i == 0)
                      for i in range(repeats)]
            self.features.append(nn.Sequential(*blocks, _unit(width, width, 1)))
            inp = width
        self.predict_56 = SideHead(320, 256, num_classes, BN_EPS)
        self.predict_28 = SideHead(640, 512, num_classes, BN_EPS)
        self.predict_14 = SideHead(1280, 1024, num_classes, BN_EPS)
        self.dropout = nn.Dropout(0.2)
        self.fc = FC(inp, num_classes)
        init_weights(self)

    def new_classifier(self, num_classes: int) -> nn.Module:
        return FC(STAGES[-1][1], num_classes)


def create_network(num_classes: int = 1000, *, features_only: bool = False,
                   out_indices: tuple[int, ...] = (0, 1, 2, 3)) -> ShuffleNetV2ExLarge:
    """ShuffleNetV2.ExLarge with its original initialisation; keys match the released weights.

    `features_only`: a backbone returning the outputs of stages `out_indices` (strides 4, 8, 16, 32).
    """
    return build_network(ShuffleNetV2ExLarge, num_classes, features_only, out_indices)


if __name__ == "__main__":
    import sys

    from common.counting import figures_main
    sys.exit(figures_main("ShuffleNetV2.ExLarge", create_network, PUBLISHED))
