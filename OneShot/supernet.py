"""The Single Path One-Shot supernet of OneShot's search space (search_space.py).

Every layer holds all four blocks at the largest channel scale (2.0). A path (an architecture) runs one block per
layer and the first `mid` channels of that block's middle convolutions and BatchNorms: weights are shared across
channel choices, as in the paper's channel search. BatchNorm running statistics are shared in the same way (each
path updates the slices it uses), so they fit no path well: supernet validation normalises with batch statistics
instead (`use_batch_statistics_in_eval`) and the search re-estimates them for every candidate. The stem and
last-conv BatchNorms have no affine parameters, as in the original supernet.

Parameters of blocks outside the path take no part in the forward pass, so they get no gradient (None) and SGD
leaves them alone: no weight decay, no momentum. Inside the path, a weight's channels beyond the path's width get a
zero gradient, so weight decay and momentum still move them (as they do in any sliced supernet).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

import network
import search_space
from common.layers import init_weights

# Same as network.py: BGR 0..255 without mean subtraction, the original's input.
INPUT_FORMAT = network.INPUT_FORMAT
MAX_SCALE_ID = len(network.CHANNEL_SCALES) - 1


class SlicedConv2d(nn.Conv2d):
    """A bias-free convolution whose path uses the leading channels of its weight.

    Input channels follow the input tensor; a pointwise conv outputs `active_out` channels (all when None), a
    depthwise conv as many as it gets.
    """

    active_out: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if self.groups == 1:
            weight = self.weight[:self.active_out or self.out_channels, :channels]
            groups = 1
        else:
            weight, groups = self.weight[:channels], channels
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, groups)


class SlicedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the leading channels of its parameters and running statistics (as many as the input has).

    With `batch_statistics_in_eval` set, eval mode normalises with the batch's own statistics (and updates
    nothing): the supernet's shared running statistics mix every path's, so its validation uses these instead.
    """

    batch_statistics_in_eval = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or self.running_mean is None or self.batch_statistics_in_eval
        update = self.training and self.running_mean is not None
        # The running statistics' slices are views, so batch_norm's in-place update lands in the full buffers.
        return F.batch_norm(
            x, self.running_mean[:channels] if update or not use_batch_stats else None,
            self.running_var[:channels] if update or not use_batch_stats else None,
            None if self.weight is None else self.weight[:channels],
            None if self.bias is None else self.bias[:channels], use_batch_stats, factor, self.eps)


def _dw(channels: int, kernel: int, stride: int) -> SlicedConv2d:
    return SlicedConv2d(channels, channels, kernel, stride, kernel // 2, groups=channels, bias=False)


def _pw(in_channels: int, out_channels: int) -> SlicedConv2d:
    return SlicedConv2d(in_channels, out_channels, 1, bias=False)


class SupernetBlock(network.SearchedBlock):
    """network.SearchedBlock (and its forward) at the largest middle width with sliceable layers, the same module
    indices, so a path's weights copy into a standalone network key for key (`path_state_dict`)."""

    def __init__(self, inp: int, oup: int, mid: int, choice: int, stride: int) -> None:
        nn.Module.__init__(self)
        self.stride = stride
        kernel = 3 if choice == 3 else (3, 5, 7)[choice]
        out_main = oup - inp
        bn = SlicedBatchNorm2d
        if choice == 3:
            self.branch_main = nn.Sequential(
                _dw(inp, 3, stride), bn(inp),
                _pw(inp, mid), bn(mid), nn.ReLU(inplace=True),
                _dw(mid, 3, 1), bn(mid),
                _pw(mid, mid), bn(mid), nn.ReLU(inplace=True),
                _dw(mid, 3, 1), bn(mid),
                _pw(mid, out_main), bn(out_main), nn.ReLU(inplace=True),
            )
            self.width_convs = [self.branch_main[2], self.branch_main[7]]
        else:
            self.branch_main = nn.Sequential(
                _pw(inp, mid), bn(mid), nn.ReLU(inplace=True),
                _dw(mid, kernel, stride), bn(mid),
                _pw(mid, out_main), bn(out_main), nn.ReLU(inplace=True),
            )
            self.width_convs = [self.branch_main[0]]
        if stride == 2:
            self.branch_proj = nn.Sequential(
                _dw(inp, kernel, 2), bn(inp),
                _pw(inp, inp), bn(inp), nn.ReLU(inplace=True),
            )

    def set_width(self, mid: int) -> None:
        for conv in self.width_convs:
            conv.active_out = mid


class SupernetLayer(nn.Module):
    """The four block choices of one layer; `choice` is the one the current path runs."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        mid = network.middle_width(oup, MAX_SCALE_ID)
        self.choices = nn.ModuleList(SupernetBlock(inp, oup, mid, choice, stride)
                                     for choice in range(network.NUM_BLOCK_CHOICES))
        self.choice = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.choices[self.choice](x)


class Supernet(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.first_conv = nn.Sequential(
            nn.Conv2d(3, network.STEM_WIDTH, 3, 2, 1, bias=False),
            SlicedBatchNorm2d(network.STEM_WIDTH, affine=False), nn.ReLU(inplace=True))
        self.features = nn.Sequential(*(SupernetLayer(block_inp, oup, stride)
                                        for block_inp, oup, stride, _, _ in search_space.layer_shapes()))
        self.conv_last = nn.Sequential(
            nn.Conv2d(network.STAGE_WIDTHS[-1], network.LAST_WIDTH, 1, bias=False),
            SlicedBatchNorm2d(network.LAST_WIDTH, affine=False), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Sequential(nn.Linear(network.LAST_WIDTH, num_classes, bias=False))
        init_weights(self)
        self.architecture = search_space.from_json(network.released_architecture())
        self.set_architecture(self.architecture)

    def set_architecture(self, choices: search_space.Choices) -> None:
        """Make the forward pass run the path `choices` = (block per layer, channel-scale index per layer)."""
        self.architecture = (tuple(choices[0]), tuple(choices[1]))
        for layer, (block, scale_id), (_, oup, _, _, _) in zip(
                self.features, zip(*self.architecture), search_space.layer_shapes()):
            layer.choice = block
            layer.choices[block].set_width(network.middle_width(oup, scale_id))

    def use_batch_statistics_in_eval(self, enabled: bool) -> None:
        """Eval mode with each batch's own BatchNorm statistics (supernet validation) or the running ones."""
        for module in self.modules():
            if isinstance(module, SlicedBatchNorm2d):
                module.batch_statistics_in_eval = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_last(self.features(self.first_conv(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(self.dropout(x))


def create_network(num_classes: int = 1000) -> Supernet:
    """The supernet with the original initialisation, set to run the released OneShot's path."""
    return Supernet(num_classes)


def create_network_for(metadata: Mapping, num_classes: int | None = None) -> Supernet:
    return create_network(num_classes or metadata.get("num_classes") or 1000)


def path_state_dict(supernet: Supernet, choices: search_space.Choices) -> dict[str, torch.Tensor]:
    """The state dict of the standalone network (network.create_network) of path `choices`: each entry the
    leading slice of the supernet's; the affine-free stem and last BatchNorms become weight 1, bias 0."""
    num_classes = supernet.classifier[0].out_features
    with torch.device("meta"):
        target = network.create_network(num_classes, search_space.to_json(choices)).state_dict()
    source = supernet.state_dict()
    state = {}
    for key, like in target.items():
        if key.startswith("features."):
            layer, rest = key.split(".", 2)[1:]
            value = source[f"features.{layer}.choices.{choices[0][int(layer)]}.{rest}"]
        elif key not in source:  # weight/bias of an affine-free BatchNorm
            value = torch.ones(like.shape) if key.endswith("weight") else torch.zeros(like.shape)
        else:
            value = source[key]
        state[key] = value[tuple(slice(0, n) for n in like.shape)].clone() if like.dim() else value.clone()
    return state
