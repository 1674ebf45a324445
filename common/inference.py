"""The inference path shared by evaluation and export: BatchNorm folded into the convolutions, the input format
applied on the device, channels_last memory, and optionally torch.compile and autocast."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from common.hardware import autocast, resolve_speed
from common.input_format import InputFormat, Preprocess
from common.layers import ConvBNReLU

# Images per call of the layout measurement of the fast path: enough for the per-image speed, cheap for ExLarge.
PROBE_BATCH = 4


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None
            and conv.out_channels == bn.num_features)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with each Conv2d -> BatchNorm2d pair whose conv feeds only the BN (adjacent in an
    nn.Sequential, or a ConvBNReLU's, forward not overridden) folded into the conv, the BN made an Identity."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        forward = type(module).forward
        if forward is ConvBNReLU.forward and _foldable(module.conv, module.bn):
            module.conv, module.bn = fuse_conv_bn_eval(module.conv, module.bn), nn.Identity()
        elif forward is nn.Sequential.forward:
            names = list(module._modules)
            for first, second in zip(names, names[1:]):
                if _foldable(module._modules[first], module._modules[second]):
                    module._modules[first] = fuse_conv_bn_eval(module._modules[first], module._modules[second])
                    module._modules[second] = nn.Identity()
    return model


class InferenceModel(nn.Module):
    """The network behind its input format: uint8 (or 0..255 float) RGB N x 3 x H x W in, logits out."""

    def __init__(self, network: nn.Module, preprocess: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.network = network
        self.memory_format = torch.contiguous_format

    def set_layout(self, channels_last: bool) -> None:
        """The memory layout of the network's weights and of the preprocessed batch."""
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.network.to(memory_format=self.memory_format)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(self.preprocess(images, self.memory_format))


class InferenceRunner:
    """Calls a model on its device under inference mode and autocast; returns float32 logits. With `fixed_batch`, a
    batch smaller than the first is padded with blank images and their logits dropped, so a compiled model never
    recompiles for a short last batch."""

    def __init__(self, model: nn.Module, device: torch.device, amp: str | None = None,
                 fixed_batch: bool = False) -> None:
        self.model = model
        self.device = torch.device(device)
        self.amp = amp
        self.fixed_batch = fixed_batch
        self._batch_size: int | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        count = len(images)
        if self.fixed_batch:
            self._batch_size = self._batch_size or count
            if count < self._batch_size:
                blank = images.new_zeros((self._batch_size - count, *images.shape[1:]))
                images = torch.cat((images, blank))
        with torch.inference_mode(), autocast(self.device, self.amp):
            return self.model(images)[:count].float()


def prepare_inference_model(model: nn.Module, *, input_format: InputFormat, device: str | torch.device,
                            channels_last: bool | None = None, compile: bool = False, amp: str | None = "auto",
                            fold_bn: bool = True, image_size: int = 224) -> InferenceRunner:
    """A runner of uint8 RGB batches to float32 logits on `device`. The fast path (the defaults) folds BatchNorm into
    a copy and picks what `channels_last` and `amp` leave open by timing `image_size` images (resolve_speed);
    fold_bn=False runs `model` itself, float32 NCHW unless asked. The runner's `speed` says what was chosen."""
    device = torch.device(device)
    network = fold_batchnorm(model) if fold_bn else model.eval()
    wrapped = InferenceModel(network, Preprocess(input_format)).to(device).eval()
    if not fold_bn:
        channels_last = bool(channels_last)
        amp = None if amp == "auto" else amp
    images = torch.randint(0, 256, (PROBE_BATCH, 3, image_size, image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))

    def prepare(layout: bool, precision: str | None):
        wrapped.set_layout(layout)
        runner = InferenceRunner(wrapped, device, precision)
        return lambda: runner(images)

    speed = resolve_speed(channels_last, amp, device, prepare, what=f"on {PROBE_BATCH} images of {image_size}px")
    wrapped.set_layout(speed.channels_last)
    if compile:
        # Frozen weights are constants that inductor prepacks once, not per call.
        wrapped = torch.compile(wrapped, options={"freezing": True})
    runner = InferenceRunner(wrapped, device, speed.amp, fixed_batch=compile)
    runner.speed = speed
    return runner
