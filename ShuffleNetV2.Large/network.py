"""ShuffleNetV2.Large: ShuffleNetV2 blocks with squeeze-excitation and residuals (MODELS.md, "ShuffleNetV2.Large")."""
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

BN_EPS = 1e-9
GROUPS = 8
# (stage prefix, blocks, half width, stride of the first block)
STAGES = [("2", 10, 128, 1), ("3", 10, 256, 2), ("4", 23, 512, 2), ("5", 10, 1024, 2)]
STAGE_CHANNELS = tuple(2 * width for _, _, width, _ in STAGES)
STEM_WIDTH = 128
LAST_WIDTH = 1280

PUBLISHED = {"params": 140_685_664, "macs": 12_780_652_544, "top1_error": 18.56, "top5_error": 4.48}
# The released weights were evaluated on BGR 0..255 with the ImageNet mean image subtracted; these are its
# per-channel averages (MODELS.md, "Input format"). `--mean-image FILE` uses the original per-pixel file.
INPUT_FORMAT = InputFormat(channel_order="BGR", mean=(103.06, 115.90, 123.15))
# What depends on the number of classes (re-initialised by fine-tuning to another count, dropped by features_only);
# the side heads in the order of the stages they follow.
CLASSIFIER = "fc"
SIDE_HEADS = ("predict_56", "predict_28", "predict_14")

# -- training recipe (MODELS.md, "Training recipes"): the original Large recipe: batch 256, lr 0.25 falling linearly
# to 0 over 600,000 iterations. Loss weights of (logits, predict_14, predict_28, predict_56), the order the network
# returns them in training. --pretrained FILE: fine-tuning defaults for a few thousand images (about 16 epochs of
# 3,000 at this batch), chosen by rule of thumb, not tuned.
RECIPE = Recipe(model_name="ShuffleNetV2.Large", batch_size=256, learning_rate=0.25, total_iters=600_000,
                loss_weights=(1.0, 0.7, 0.5, 0.3),
                finetune=FinetuneRecipe(batch_size=32, learning_rate=0.005, total_iters=1500, warmup_iters=100))


def _unit(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
          relu: bool = True) -> ConvBNReLU:
    return ConvBNReLU(in_channels, out_channels, kernel, stride, groups, relu, bn_eps=BN_EPS)


class LargeBlock(nn.Module):
    """Split-and-shuffle block; `inp` is the half-width input, `out` the block's half width."""

    def __init__(self, inp: int, out: int, stride: int, first: bool) -> None:
        super().__init__()
        if stride == 2:
            self.down = _unit(2 * out, 2 * out, 1)
        if first:
            self.proj = _unit(inp, out, 3, stride, relu=False)
        self.branch_main = nn.Sequential(
            _unit(inp, out, 1),
            _unit(out, out, 3, stride, groups=GROUPS),
            _unit(out, out, 1, relu=False),
        )
        self.se_fc1 = nn.Linear(out, out)
        self.se_fc2 = nn.Linear(out, out)
        self.first = first
        self.stride = stride

    def squeeze_excite(self, x: torch.Tensor) -> torch.Tensor:
        scale = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        scale = torch.sigmoid(self.se_fc2(torch.relu(self.se_fc1(scale))))
        return x * scale[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        even, odd = channel_split_shuffle(x)
        main = self.squeeze_excite(self.branch_main(odd))
        if self.first:
            x = torch.cat((self.proj(even), main), 1)
        else:
            x = torch.cat((even, odd + main), 1)
        x = torch.relu(x)
        return self.down(x) if self.stride == 2 else x


class ShuffleNetV2Large(StagedNetwork):
    classifier_name = CLASSIFIER
    side_head_names = SIDE_HEADS
    head_conv_name = "conv_last"
    stage_channels = STAGE_CHANNELS
    num_features = LAST_WIDTH
    input_format = INPUT_FORMAT

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.first_conv = nn.Sequential(_unit(3, 64, 3, 2), _unit(64, 64, 3), _unit(64, STEM_WIDTH, 3))
        self.max_pool = nn.MaxPool2d(3, 2, 1)
        self.features = nn.ModuleList()
        inp = STEM_WIDTH // 2
        for prefix, repeats, width, stride in STAGES:
            stage = nn.Sequential()
            for i in range(repeats):
                first = i == 0
                stage.add_module(prefix + chr(ord("a") + i),
                                 LargeBlock(inp if first else width, width, stride if first else 1, first))
            self.features.append(stage)
            inp = width
        self.predict_56 = SideHead(256, 256, num_classes, BN_EPS)
        self.predict_28 = SideHead(512, 512, num_classes, BN_EPS)
        self.predict_14 = SideHead(1024, 1024, num_classes, BN_EPS)
        self.conv_last = _unit(2 * inp, LAST_WIDTH, 3)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(LAST_WIDTH, num_classes)
        init_weights(self)

    def new_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(LAST_WIDTH, num_classes)


def create_network(num_classes: int = 1000, *, features_only: bool = False,
                   out_indices: tuple[int, ...] = (0, 1, 2, 3)) -> ShuffleNetV2Large:
    """ShuffleNetV2.Large with its original initialisation; keys match the released weights.

    `features_only`: a backbone returning the outputs of stages `out_indices` (strides 4, 8, 16, 32).
    """
    return build_network(ShuffleNetV2Large, num_classes, features_only, out_indices)


if __name__ == "__main__":
    import sys

    from common.counting import figures_main
    sys.exit(figures_main("ShuffleNetV2.Large", create_network, PUBLISHED))
