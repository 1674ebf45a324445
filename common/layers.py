"""Building pieces shared by the ShuffleNet-Series networks (MODELS.md, "Split and shuffle")."""
from __future__ import annotations

import torch
from torch import nn


def channel_split_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle and split channels: (channels 0, 2, 4, ...), (channels 1, 3, 5, ...), through a rank-5 view only
    (Core ML rejects rank 6)."""
    n, c, h, w = x.shape
    pairs = x.reshape(n, c // 2, 2, h, w)
    return pairs[:, :, 0], pairs[:, :, 1]


class ConvBNReLU(nn.Module):
    """The `Conv_BN_ReLU` unit of Large and ExLarge: `conv` (no bias), `bn`, then ReLU when `relu`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, relu: bool = True, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class SideHead(nn.Module):
    """Training-only auxiliary classifier `predict_*` of Large and ExLarge."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, bn_eps: float) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv = nn.Sequential(ConvBNReLU(in_channels, channels, 1, bn_eps=bn_eps),
                                  ConvBNReLU(channels, channels, 3, bn_eps=bn_eps))
        self.fc = nn.Linear(channels, num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """A freshly initialised `fc` for `num_classes` outputs (0: the pooled features themselves)."""
        channels = self.conv[-1].conv.out_channels
        self.fc = fresh_head(self.fc, nn.Linear(channels, num_classes) if num_classes else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.pool(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def fresh_head(old: nn.Module, new: nn.Module) -> nn.Module:
    """`new` initialised, on the device and in the dtype of `old`'s parameters: the head that replaces `old`."""
    init_weights(new)
    reference = next(old.parameters(), None)
    return new if reference is None else new.to(device=reference.device, dtype=reference.dtype)


def init_weights(model: nn.Module) -> None:
    """The original networks' initialisation (MODELS.md, "Initialisation"): convs under `first_conv` N(0, 0.01), other
    convs N(0, 1 / fan-in channels) (no square root: what the released models were trained from), BatchNorm weight 1,
    bias 1e-4, Linear N(0, 0.01)."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            small = isinstance(module, nn.Linear) or name.startswith("first_conv")
            nn.init.normal_(module.weight, 0.0, 0.01 if small else 1.0 / module.weight.shape[1])
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.constant_(module.bias, 1e-4)
            nn.init.zeros_(module.running_mean)
