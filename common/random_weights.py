"""Random networks whose numerics behave like trained ones, for export checks and benchmarks without released
weights."""
from __future__ import annotations

import torch
from torch import nn

from common.verification import make_test_images
from common.input_format import InputFormat, Preprocess


@torch.no_grad()
def calibrated_random_network(network_module, input_format: InputFormat, num_classes: int = 1000,
                              seed: int = 0, image_size: int = 64) -> nn.Module:
    """`network_module.create_network(num_classes)` in eval mode with random weights and BatchNorm statistics
    estimated on 8 synthetic images, so its logits depend on the image as a trained network's do.

    The residual branches of Large and ExLarge then get a small output scale, as trained residual networks have:
    with full-size random branches a 60-block network is chaotic (measured on ExLarge at 224: PyTorch fp32 itself
    is 1.3e-3 of the logit range away from fp64), which no fp32 export can match to 1e-4.
    """
    torch.manual_seed(seed)
    net = network_module.create_network(num_classes)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the calibration batch
    images = torch.from_numpy(make_test_images(8, image_size, seed=100 + seed)).permute(0, 3, 1, 2)
    net.train()
    net(Preprocess(input_format)(images))
    for block in net.modules():
        if hasattr(block, "se_fc1"):
            block.branch_main[-1].bn.weight.mul_(0.2)
            block.branch_main[-1].bn.bias.mul_(0.2)
    return net.eval()
