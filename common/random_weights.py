"""Random networks whose numerics behave like trained ones, for export checks and benchmarks without released
weights."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.verification import as_batch, make_test_images
from common.input_format import InputFormat, Preprocess

BN_SHIFT = 1.0


@torch.no_grad()
def calibrated_random_network(network_module, input_format: InputFormat, num_classes: int = 1000,
                              seed: int = 0, image_size: int = 64, decisive_on: np.ndarray | None = None) -> nn.Module:
    """`network_module.create_network(num_classes)` in eval mode with random weights and BatchNorm statistics
    estimated on 8 synthetic images, so its logits depend on the image as a trained network's do; with
    `decisive_on` images, its classifier is then fitted to them (fit_classifier).

    BatchNorm biases are 1 so ReLUs pass most inputs: a random unit-variance ReLU network is chaotic (one grey level
    flipped 30-39% of OneShot's top-1 classes), a trained one is not (about 2% with the shift). Large/ExLarge residual
    branches get a small output scale, as trained ones have, or fp32 itself misses fp64 by more than 1e-4."""
    torch.manual_seed(seed)
    net = network_module.create_network(num_classes)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the calibration batch
            module.bias.fill_(BN_SHIFT)
    net.train()
    net(Preprocess(input_format)(as_batch(make_test_images(8, image_size, seed=100 + seed))))
    for block in net.modules():
        if hasattr(block, "se_fc1"):
            block.branch_main[-1].bn.weight.mul_(0.2)
            block.branch_main[-1].bn.bias.mul_(0.2)
    net.eval()
    if decisive_on is not None:
        fit_classifier(net, input_format, decisive_on)
    return net


@torch.no_grad()
def fit_classifier(net: nn.Module, input_format: InputFormat, images: np.ndarray, margin: float = 10.0) -> None:
    """Fit the last linear layer so that image i of `images` (RGB uint8 N x H x W x 3) gets class i mod the
    number of classes with a lead of `margin`, as a trained network's top-1 leads on images it knows: a random
    classifier favours one class everywhere or decides by near-ties, and agreement with either proves nothing."""
    last = [module for module in net.get_classifier().modules() if isinstance(module, nn.Linear)][-1]
    inputs = []
    handle = last.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    net(Preprocess(input_format)(as_batch(images)))
    handle.remove()
    features = inputs[0].double()
    targets = torch.zeros(len(images), last.out_features, dtype=torch.float64)
    targets[torch.arange(len(images)), torch.arange(len(images)) % last.out_features] = margin
    if last.bias is not None:
        last.bias.zero_()
    last.weight.copy_((torch.linalg.pinv(features) @ targets).T)
