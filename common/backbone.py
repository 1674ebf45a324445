"""The interface every network of this repository has, timm's (forward_features, forward_head, get_classifier,
reset_classifier, feature_info, forward_intermediates, prune_intermediate_layers, a features-only form), written
once for their shared shape: a stem, four stages (strides 4, 8, 16, 32), an optional head conv, pooling, dropout, a
classifier, side heads."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from common.input_format import InputFormat
from common.layers import fresh_head

STAGE_REDUCTIONS = (4, 8, 16, 32)


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def stage_indices(indices: int | Sequence[int] | None) -> list[int]:
    """The stages (0 to 3) that `indices` chooses, as timm reads them: an int n the last n, a sequence of indices (-1
    the last), None all; ValueError naming the index out of range."""
    count = len(STAGE_REDUCTIONS)
    if isinstance(indices, bool) or isinstance(indices, int) and not 0 < indices <= count:
        raise ValueError(f"indices {indices}: the last n stages, n from 1 to {count}")
    if indices is None or isinstance(indices, int):
        return list(range(count - (indices or count), count))
    if bad := [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count]:
        raise ValueError(f"stage index {bad[0]}: choose from 0 to {count - 1} (or -1 to -{count})")
    if not indices:
        raise ValueError("indices: choose at least one stage")
    return sorted({i % count for i in indices})


class ClassifierNetwork(nn.Module):
    """Base class of the networks. Subclasses set the class attributes (`classifier_name`: the classifier,
    `side_head_names`: the side heads in stage order, `head_conv_name`: the conv between the last stage and the
    pooling, None without one) and implement forward_stem(x), stages() (the four stages in order),
    stage_module_names() (the module each stage's output comes from, for feature_info), drop_stages_after(last)
    (the others keep their names) and new_classifier(num_classes) (key names as this network's)."""

    classifier_name: str = "fc"
    side_head_names: tuple[str, ...] = ()
    head_conv_name: str | None = None
    stage_channels: tuple[int, int, int, int]
    num_features: int
    input_format: InputFormat = InputFormat()
    # "avg", or "" (timm's global_pool="", which needs num_classes=0): forward_head gives the feature map unpooled.
    global_pool: str = "avg"
    # The size it was trained at, which transforms() crops to: a checkpoint's --image-size, else the released 224.
    image_size: int = 224
    # Set by make_features_only: the stage outputs forward returns, and the keys of the removed modules.
    out_indices: tuple[int, ...] | None = None
    removed_keys: frozenset[str] = frozenset()
    _batchnorm_frozen: bool = False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before pooling (stride 32), head conv included."""
        return self.forward_intermediates(x, indices=1)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits of a forward_features map; with `pre_logits` the pooled features (N x num_features) instead; with
        `global_pool` "" the map itself."""
        if not self.global_pool:
            return x
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.get_classifier()(self.dropout(x))

    def forward(self, x: torch.Tensor):
        """Logits in eval mode; with side heads, (logits, side heads from the deepest to the shallowest) in training
        mode; the chosen stage outputs for a features-only network."""
        if self.out_indices is not None:
            return self.forward_intermediates(x, self.out_indices, intermediates_only=True)
        if not (self.training and self.side_head_names):
            return self.forward_head(self.forward_features(x))
        x, stage_outputs = self.forward_intermediates(x)
        sides = [getattr(self, name)(output) for name, output in zip(self.side_head_names, stage_outputs)]
        return (self.forward_head(x), *reversed(sides))

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's interface: the outputs of the stages `indices` (an int n: the last n), and unless
        `intermediates_only` the final feature map too, as (final, intermediates)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r}: only NCHW is supported")
        take = stage_indices(indices)
        stages = self.stages()
        if intermediates_only or stop_early:
            stages = stages[:max(take) + 1]
        intermediates = []
        x = self.forward_stem(x)
        for index, stage in enumerate(stages):
            x = stage(x)
            if index in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if self.head_conv_name and len(stages) == len(STAGE_REDUCTIONS):
            x = getattr(self, self.head_conv_name)(x)
        return x, intermediates

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_name)

    @property
    def num_classes(self) -> int:
        linears = [m for m in self.get_classifier().modules() if isinstance(m, nn.Linear)]
        return linears[-1].out_features if linears else 0

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A freshly initialised classifier (and side heads) for `num_classes` outputs; 0 for none and no side heads
        (pooled features out, in training mode too). `global_pool` "avg" (kept when None), or "" for the unpooled
        feature map, with 0 classes."""
        pool = self.global_pool if global_pool is None else global_pool
        if pool not in ("avg", ""):
            raise ValueError(f"global_pool {global_pool!r}: these networks pool by average ('avg'), or not at all ('')")
        if not pool and num_classes:
            raise ValueError("global_pool '' gives the feature map, which has no classifier: give num_classes=0")
        self.global_pool = pool
        new = self.new_classifier(num_classes) if num_classes else nn.Identity()
        setattr(self, self.classifier_name, fresh_head(self.get_classifier(), new))
        if not num_classes:  # the side heads are classifiers too: without them the forward is the features in any mode
            drop_side_heads(self)
        for name in self.side_head_names:
            getattr(self, name).reset_classifier(num_classes)

    @property
    def feature_info(self) -> list[dict]:
        """Per stage output (the chosen ones for a features-only network): num_chs, reduction, module."""
        info = [{"num_chs": channels, "reduction": reduction, "module": module}
                for channels, reduction, module in zip(self.stage_channels, STAGE_REDUCTIONS,
                                                       self.stage_module_names())]
        return info if self.out_indices is None else [info[i] for i in self.out_indices]

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's interface: remove the stages after the last of `indices` and, with `prune_head`, the head conv,
        side heads and classifier, leaving what forward_intermediates needs for them; returns the stages taken.
        `prune_norm` is accepted for timm's callers: these networks have no norm after the last stage."""
        take = stage_indices(indices)
        before = set(self.state_dict())
        if prune_head:
            for name in (self.classifier_name, *self.side_head_names, self.head_conv_name):
                if name:
                    delattr(self, name)
            self.side_head_names = ()
        self.drop_stages_after(max(take))
        self.removed_keys = self.removed_keys | (before - set(self.state_dict()))
        return take

    def freeze_backbone(self) -> None:
        """A linear probe: only the classifier trains; every BatchNorm stays in eval mode, even in train()."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(_under(name, self.classifier_name))
        self._batchnorm_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self._batchnorm_frozen:
            for name, module in self.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not _under(name, self.classifier_name):
                    module.eval()
        return self

    def transforms(self, image_size: int | None = None):
        """A callable turning a PIL image into this network's input: EXIF orientation applied, OpenCV-style
        resize of the short side to image_size * 256 / 224, center crop, then `input_format` (3 x H x W float).
        `image_size` defaults to the network's own (`self.image_size`), as eval.py's does."""
        from common.predict import ImageTransform
        return ImageTransform(self.input_format, image_size or self.image_size)


class StagedNetwork(ClassifierNetwork):
    """Large and ExLarge: stem `first_conv` then `max_pool`, the four stages in the ModuleList `features`."""

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.max_pool(self.first_conv(x))

    def stages(self) -> list[nn.Module]:
        return list(self.features)

    def stage_module_names(self) -> list[str]:
        return [f"features.{index}" for index in range(len(self.stage_channels))]

    def drop_stages_after(self, last: int) -> None:
        del self.features[last + 1:]


def build_network(network_class: Callable[[int], ClassifierNetwork], num_classes: int, features_only: bool,
                  out_indices: Sequence[int] | int) -> ClassifierNetwork:
    """A folder's create_network: `network_class(num_classes)`; `num_classes` 0 leaves no classifier, the pooled
    features out, as timm's `num_classes=0`; `features_only` as `make_features_only`."""
    if num_classes < 0:
        raise ValueError(f"num_classes {num_classes}: give 0 (no classifier) or more")
    # A Linear of 0 outputs would be built, and warned about, before it is taken away.
    network = network_class(max(num_classes, 1))
    if num_classes == 0:
        network.reset_classifier(0)
    return make_features_only(network, out_indices) if features_only else network


def drop_side_heads(network: ClassifierNetwork) -> ClassifierNetwork:
    """`network` without the side heads of its training recipe: its forward gives the logits in training mode too,
    as timm's networks' do, and a file's side-head tensors are passed over when loading."""
    before = set(network.state_dict())
    for name in network.side_head_names:
        delattr(network, name)
    network.side_head_names = ()
    network.removed_keys = network.removed_keys | (before - set(network.state_dict()))
    return network


def make_features_only(network: ClassifierNetwork, out_indices: Sequence[int] | int = (0, 1, 2, 3)
                       ) -> ClassifierNetwork:
    """`network` turned into a backbone whose forward returns the outputs of the stages `out_indices` (0 to 3:
    strides 4, 8, 16, 32). The classifier, side heads, head conv and the stages after the last chosen one are
    removed; every other key keeps its name, so released weights load (see common.pretrained.load_pretrained)."""
    network.out_indices = tuple(network.prune_intermediate_layers(out_indices))
    return network
