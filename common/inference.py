"""The inference path shared by evaluation and export: BatchNorm folded into the convolutions, the input format
applied on the device, channels_last memory, and optionally torch.compile and autocast."""
from __future__ import annotations

import copy

import torch
from torch import nn

from common.input_format import InputFormat, Preprocess
from common.layers import ConvBNReLU

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 autocast is a speed-up."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Rescale `conv` in place so that it computes bn(conv(x)) with `bn`'s running statistics."""
    var = bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
    # An in-place product with a float64 factor is computed in float64 and rounded once to the weight's dtype,
    # without a float64 copy of the weight (ExLarge's convs hold 1 GB).
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter(((bias - bn.running_mean.double()) * scale + beta).to(conv.weight.dtype))


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None
            and conv.out_channels == bn.num_features)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every Conv2d -> BatchNorm2d pair folded into the conv (BN -> Identity).

    Pairs are taken only where the conv output can reach nothing but the BN: adjacent children of an
    nn.Sequential, and the `conv`/`bn` of a ConvBNReLU unit, each with its own forward unchanged (a subclass
    with another forward could use the conv output elsewhere). Any other layout is left as it is.
    """
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        forward = type(module).forward
        if forward is ConvBNReLU.forward and _foldable(module.conv, module.bn):
            _folded_conv(module.conv, module.bn)
            module.bn = nn.Identity()
        elif forward is nn.Sequential.forward:
            names = list(module._modules)
            for first, second in zip(names, names[1:]):
                if _foldable(module._modules[first], module._modules[second]):
                    _folded_conv(module._modules[first], module._modules[second])
                    module._modules[second] = nn.Identity()
    return model


class InferenceModel(nn.Module):
    """The network behind its input format: uint8 (or 0..255 float) RGB N x 3 x H x W in, logits out.

    `memory_format` converts the preprocessed batch (channels_last for a channels_last network); None keeps it.
    """

    def __init__(self, network: nn.Module, preprocess: nn.Module,
                 memory_format: torch.memory_format | None = None) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.network = network
        self.memory_format = memory_format

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        if self.memory_format is not None:
            x = x.contiguous(memory_format=self.memory_format)
        return self.network(x)


class InferenceRunner:
    """Calls a model on its device under inference mode and autocast; returns float32 logits.

    Input batches may live on any device (a DataLoader's pinned CPU memory is copied without blocking). With
    `fixed_batch`, a batch smaller than the first one is padded with blank images up to its size and their logits
    dropped: a compiled model then never recompiles for the last batch of a dataset or one shortened by skipped
    files (each recompile costs as much as the first compile). The model must treat images independently, as a
    network in eval mode does.
    """

    def __init__(self, model: nn.Module, device: torch.device, amp: str | None = None,
                 fixed_batch: bool = False) -> None:
        if amp is not None and amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)} or None, not {amp!r}")
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
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=AMP_DTYPES.get(self.amp),
                                                    enabled=self.amp is not None):
            return self.model(images)[:count].float()


def prepare_inference_model(model: nn.Module, *, input_format: InputFormat, device: str | torch.device,
                            channels_last: bool = True, compile: bool = False, amp: str | None = None,
                            fold_bn: bool = True) -> InferenceRunner:
    """A callable for evaluation: uint8 RGB batches N x 3 x H x W in, float32 logits out.

    The input format is applied on `device`, inside the callable. The fast path (the defaults) folds BatchNorm
    into the convs and uses channels_last; `compile` adds torch.compile with frozen weights, `amp` ("bf16" or
    "fp16") autocast.
    fold_bn=False with channels_last=False is the plain path. Folding works on a copy; without it `model`
    itself is put in eval mode and moved to `device`.
    """
    device = torch.device(device)
    network = fold_batchnorm(model) if fold_bn else model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    wrapped = InferenceModel(network, Preprocess(input_format), memory_format).to(device).eval()
    wrapped.network.to(memory_format=memory_format)
    if compile:
        # Freezing turns the weights into constants, so inductor folds and prepacks them once (oneDNN's blocked
        # layouts on CPU) instead of on every call: measured 1.2x on Large, 1.1x on OneShot at float32.
        wrapped = torch.compile(wrapped, options={"freezing": True})
    return InferenceRunner(wrapped, device, amp, fixed_batch=compile)
