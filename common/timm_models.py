"""The three networks registered with timm: `import common.timm_models`, then e.g.

    model = timm.create_model("shufflenetv2_large", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))

Weights come from a local file of any layout eval.py accepts. The configs' mean and std make timm's pipeline give the
weights' 0..255 scale and mean; a BGR model reverses the channels before its first conv (timm's resize is PIL's).
As timm's networks, they give one output in training mode: the side heads of Large's and ExLarge's recipe are left
out unless `side_heads=True`."""
from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from common.backbone import ClassifierNetwork, drop_side_heads, stage_indices
from common.input_format import InputFormat
from common.model_state import read_weights_file
from common.models import create_network_for, load_network_module
from common.pretrained import MODEL_NAMES, load_pretrained, metadata_for

_FIRST_CONVS = {"oneshot": "first_conv.0", "shufflenetv2_large": "first_conv.0.conv",
                "shufflenetv2_exlarge": "first_conv.0.conv"}


def timm_input_format(weights_format: InputFormat) -> InputFormat:
    """What a timm model takes: RGB, 0..1, minus `mean`, divided by `std` (the config's), for weights that take
    `weights_format` (BGR or RGB 0..255 minus a per-channel mean, std 1)."""
    mean = weights_format.mean[::-1] if weights_format.channel_order == "BGR" else weights_format.mean
    return InputFormat(channel_order="RGB", scale=1 / 255, mean=tuple(m / 255 for m in mean),
                       std=tuple(s / 255 for s in weights_format.std))


def _cfg(name: str) -> dict:
    network = load_network_module(MODEL_NAMES[name])
    fmt = timm_input_format(network.INPUT_FORMAT)
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 224 / 256,
        "crop_mode": "center", "interpolation": "bilinear", "mean": fmt.mean, "std": fmt.std,
        "first_conv": _FIRST_CONVS[name], "classifier": network.CLASSIFIER,
        "description": f"{MODEL_NAMES[name]} of the ShuffleNet series; weights from a local file (file=PATH)",
        "notes": (f"the released weights take {network.INPUT_FORMAT.describe()}; this timm model takes RGB as timm's "
                  "transforms give it (mean and std put it on the 0..255 scale) and reverses the channels before "
                  "its first conv",),
    }


default_cfgs = generate_default_cfgs({f"{name}.released": _cfg(name) for name in MODEL_NAMES})


# timm's features_only default: every stage output.
_ALL_STAGES = (0, 1, 2, 3)


def _rgb_to_bgr(module: nn.Module, args: tuple) -> tuple:
    return (args[0].flip(1),) + args[1:]


def _create(name: str, pretrained: bool, **kwargs) -> ClassifierNetwork:
    folder = MODEL_NAMES[name]
    network = load_network_module(folder)
    # The network the file describes (a searched OneShot's architecture, its classes): timm builds before it loads,
    # and keeps a file's classifier only where the config's number of classes is the model's.
    if kwargs.get("features_only"):  # timm's own check of out_indices is an IndexError deep inside it
        stage_indices(kwargs.get("out_indices", _ALL_STAGES))
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    metadata, contents = {}, None
    if pretrained and overlay.get("file"):
        # Read once, here, with this project's checks and one-line errors, and loaded by the model's own
        # load_pretrained (timm's custom_load): timm's torch.load would read the file again and fail on a file that
        # is not weights with a bare unpickling error.
        contents = read_weights_file(overlay["file"])
        metadata = metadata_for(folder, contents, overlay["file"])
        recorded = {"num_classes": metadata["num_classes"]} if metadata.get("num_classes") else {}
        if size := metadata.get("image_size"):  # timm's data config then crops to the size it was trained at
            recorded |= {"input_size": (3, size, size), "pool_size": (size // 32, size // 32)}
        kwargs["pretrained_cfg_overlay"] = {**recorded, **overlay, "custom_load": True}

    def build(num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg", drop_rate: float | None = None,
              drop_path_rate: float | None = None, side_heads: bool = False) -> ClassifierNetwork:
        if in_chans != 3:
            raise ValueError(f"{name}: in_chans {in_chans}: these networks take 3 channels only")
        if drop_path_rate:
            raise ValueError(f"{name}: drop_path_rate {drop_path_rate}: these networks have no stochastic depth")
        model = create_network_for(network, num_classes, metadata)
        if global_pool != "avg":  # "" (with num_classes=0): forward_head gives the feature map, as in timm
            model.reset_classifier(num_classes, global_pool)
        if drop_rate is not None:  # timm's dropout before the classifier; the original rate otherwise
            model.dropout.p = drop_rate
        if not side_heads:  # timm's training expects one output, not (logits, side heads)
            drop_side_heads(model)
        if network.INPUT_FORMAT.channel_order == "BGR":
            model.first_conv.register_forward_pre_hook(_rgb_to_bgr)
            model.input_format = timm_input_format(network.INPUT_FORMAT)
        if contents is not None:
            def load(file: str) -> None:
                del model.load_pretrained  # called once; the model keeps no reference to the file's tensors
                load_pretrained(model, contents, source_name=str(file))

            model.load_pretrained = load
        return model

    return build_model_with_cfg(build, name, pretrained,
                                feature_cfg={"feature_cls": "getter", "out_indices": _ALL_STAGES}, **kwargs)


@register_model
def oneshot(pretrained: bool = False, **kwargs) -> ClassifierNetwork:
    """OneShot (Single Path One-Shot search), 3.4M parameters."""
    return _create("oneshot", pretrained, **kwargs)


@register_model
def shufflenetv2_large(pretrained: bool = False, **kwargs) -> ClassifierNetwork:
    """ShuffleNetV2.Large (SE, residuals), 125.1M parameters; side_heads=True adds its recipe's side heads."""
    return _create("shufflenetv2_large", pretrained, **kwargs)


@register_model
def shufflenetv2_exlarge(pretrained: bool = False, **kwargs) -> ClassifierNetwork:
    """ShuffleNetV2.ExLarge, 255.4M parameters; side_heads=True adds its recipe's side heads."""
    return _create("shufflenetv2_exlarge", pretrained, **kwargs)

