"""Starting from trained weights (any file eval.py accepts): fine-tuning to another number of classes, backbones,
torch.hub and timm. Heads that do not fit start afresh, every other tensor must load with its exact shape."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from common.backbone import ClassifierNetwork, _under
from common.input_format import InputFormat
from common.layers import init_weights
from common.model_state import (LoadReport, WeightsMismatchError, check_model_folder, classifier_rows,
                                describe_weights, mismatch_parts, read_checkpoint_metadata, read_model_state,
                                read_weights_file, unwrap_model)
from common.models import create_network_for, load_network_module


@dataclass
class PretrainedReport(LoadReport):
    """What load_pretrained did: tensors copied, head modules re-initialised."""

    reinitialised: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = super().summary()
        if self.reinitialised:
            text += f"; re-initialised {', '.join(self.reinitialised)}"
        return text


def pretrained_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "the weights"
                     ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(tensors to load, head modules to re-initialise) for `model` from a clean state dict. Raises
    WeightsMismatchError naming the keys that neither fit nor belong to a head."""
    network = unwrap_model(model)
    if not isinstance(network, ClassifierNetwork):
        raise TypeError(f"expected a network of this repository, got {type(network).__name__}")
    target = network.state_dict()
    all_heads = (network.classifier_name, *network.side_head_names)
    heads = [name for name in all_heads if hasattr(network, name)]

    def in_heads(key: str, prefixes: Sequence[str] = all_heads) -> bool:
        return any(_under(key, prefix) for prefix in prefixes)

    def fits(prefix: str) -> bool:
        keys = [k for k in target if _under(k, prefix) and not k.endswith("num_batches_tracked")]
        return all(k in state and state[k].shape == target[k].shape for k in keys)

    # Another number of classes: the classifier and every side head start afresh; otherwise only a head the file
    # lacks (released files may have no side heads).
    if network.classifier_name in heads and not fits(network.classifier_name):
        reinitialised = heads
    else:
        reinitialised = [prefix for prefix in heads if not fits(prefix)]
    body = [k for k in target if not in_heads(k)]
    missing = [k for k in body if k not in state and not k.endswith("num_batches_tracked")]
    misshaped = [k for k in body if k in state and state[k].shape != target[k].shape]
    unexpected = [k for k in state if k not in target and k not in network.removed_keys and not in_heads(k)]
    if missing or misshaped or unexpected:
        raise WeightsMismatchError(
            f"{source} does not fit {type(network).__name__} outside the classifier and side heads: "
            f"{'; '.join(mismatch_parts(state, target, missing, unexpected, misshaped))}; the file looks like "
            f"{describe_weights(state)}")
    return {k: state[k] for k in target if k in state and not in_heads(k, reinitialised)}, reinitialised


def load_pretrained(model: nn.Module, source: Any, *, trust_pickle: bool = False, use_ema: bool = False,
                    source_name: str | None = None) -> PretrainedReport:
    """Load a weights file (path or read object) into `model` for fine-tuning or as a backbone; the heads that do
    not fit get the original initialisation, keys a features-only network dropped are ignored."""
    state, source_name = read_model_state(source, trust_pickle=trust_pickle, use_ema=use_ema, source_name=source_name)
    network = unwrap_model(model)
    loading, reinitialised = pretrained_state(network, state, source_name)
    network.load_state_dict(loading, strict=False)
    for prefix in reinitialised:
        init_weights(network.get_submodule(prefix))
    return PretrainedReport(loaded=len(loading), source=source_name, reinitialised=reinitialised)


MODEL_NAMES = {"oneshot": "OneShot", "shufflenetv2_large": "ShuffleNetV2.Large",
               "shufflenetv2_exlarge": "ShuffleNetV2.ExLarge"}


def metadata_for(folder: str, weights: Any, name: str | os.PathLike) -> dict:
    """What a weights file (`weights`: its path or read contents; `name`: its path) records of its network, checked
    to be the network of model folder `folder`."""
    metadata = read_checkpoint_metadata(weights)
    check_model_folder(str(name), metadata, folder)
    return metadata


def create_model(model: str, weights: str | os.PathLike | None = None, num_classes: int | None = None, *,
                 features_only: bool = False, out_indices: tuple[int, ...] = (0, 1, 2, 3)) -> ClassifierNetwork:
    """A model folder's network (`model`: folder name or one of MODEL_NAMES) in eval mode, with `weights` loaded
    when given. `num_classes` defaults to the file's; `.input_format` is the file's or the network's default."""
    folder = MODEL_NAMES.get(model, model)
    network = load_network_module(folder)
    metadata, state = {}, None
    if weights is not None:
        state = read_weights_file(weights)
        metadata = metadata_for(folder, state, weights)
    if num_classes is None:
        num_classes = metadata.get("num_classes") or (classifier_rows(network, state) if state else 1000)
    net = create_network_for(network, num_classes, metadata, features_only=features_only, out_indices=out_indices)
    if metadata.get("input_format"):
        net.input_format = InputFormat.from_dict(metadata["input_format"])
    if state is not None:
        report = load_pretrained(net, state, source_name=str(weights))
        if report.reinitialised:
            print(f"{folder}: {report.summary()}")
    return net.eval()
