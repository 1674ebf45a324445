"""torch.hub entry points of the three networks; nothing is ever downloaded, weights come from a local file.

    model = torch.hub.load(REPO_DIR, "shufflenetv2_large", source="local", weights=PATH)
    x = model.transforms()(PIL.Image.open("photo.jpg"))      # the network's input, 3 x 224 x 224 for released files
    probabilities = model(x.unsqueeze(0)).softmax(1)

Each entry point returns the network in eval mode with `input_format` (what its input must be: channel order,
scale, mean; common.input_format) and `transforms()`, which turns a PIL image into that input with eval.py's
preprocessing, at the size the file was trained at (a checkpoint's `--image-size`; 224 for released files).
`weights` is any file eval.py accepts (a OneShot checkpoint of a searched architecture builds that architecture);
`num_classes` (default: the file's, else 1000) other than the file's gives a freshly initialised classifier for
fine-tuning. `features_only=True, out_indices=(0, 1, 2, 3)` gives a backbone returning stage outputs
at strides 4, 8, 16, 32. `pretrained=True` without `weights` is refused in words, since nothing is downloaded.
"""
from __future__ import annotations

from torch import nn

from common.pretrained import create_model

dependencies = ["torch", "torchvision", "timm", "safetensors", "numpy", "PIL"]


def _create(model: str, weights: str | None, num_classes: int | None, pretrained: bool, **kwargs) -> nn.Module:
    # torchvision's habit, pretrained=True, would otherwise end in "unexpected keyword argument".
    if pretrained and weights is None:
        raise ValueError(f"{model}: pretrained=True, but nothing is downloaded here: pass weights=PATH, a local copy "
                         "of the released file (torch.hub.help(REPO_DIR, ENTRY, source='local') names it)")
    return create_model(model, weights, num_classes, **kwargs)


def oneshot(weights: str | None = None, num_classes: int | None = None, pretrained: bool = False,
            **kwargs) -> nn.Module:
    """OneShot (3.4M parameters, published top-1 error 25.1%). Input: BGR 0..255, no mean.

    Released file: the original OneShot checkpoint (a `{'state_dict': ...}` pickle); its file name and checksum are
    not recorded in this repository, so check it against the source you downloaded it from.
    """
    return _create("OneShot", weights, num_classes, pretrained, **kwargs)


def shufflenetv2_large(weights: str | None = None, num_classes: int | None = None, pretrained: bool = False,
                       **kwargs) -> nn.Module:
    """ShuffleNetV2.Large (140.7M parameters with side heads, published top-1 error 18.56%). Input: BGR 0..255
    minus the ImageNet per-channel mean.

    Released file: `snetv2_residual_se.pkl`, md5 a68948fcdc791c2bbd237f0ec30dd968 (after a re-upload; an earlier
    download was truncated and fails with "unexpected EOF").
    """
    return _create("ShuffleNetV2.Large", weights, num_classes, pretrained, **kwargs)


def shufflenetv2_exlarge(weights: str | None = None, num_classes: int | None = None, pretrained: bool = False,
                         **kwargs) -> nn.Module:
    """ShuffleNetV2.ExLarge (271.3M parameters with side heads, published top-1 error 15.52%). Input: BGR 0..255,
    no mean (the published evaluation's; unconfirmed for the released weights, see MODELS.md).

    Released file: its file name and checksum are not recorded in this repository; check it against the source you
    downloaded it from.
    """
    return _create("ShuffleNetV2.ExLarge", weights, num_classes, pretrained, **kwargs)
