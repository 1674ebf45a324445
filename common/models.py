"""The model folders of this repository, and loading a folder's network.py by path: names such as
`ShuffleNetV2.Large` are not importable, so tools that work across models load them through this module."""
from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_FOLDERS = ("OneShot", "ShuffleNetV2.Large", "ShuffleNetV2.ExLarge")


def load_module(path: str | Path, name: str) -> ModuleType:
    """The Python file `path` run as a module named `name`, registered in sys.modules under that name (so that
    dataclasses and pickling can find it again)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@cache
def load_network_module(model: str) -> ModuleType:
    """The `network.py` module of a model folder (`OneShot`, `ShuffleNetV2.Large`, `ShuffleNetV2.ExLarge`)."""
    if model not in MODEL_FOLDERS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODEL_FOLDERS)}")
    return load_module(REPO_ROOT / model / "network.py", "network_" + model.replace(".", "_"))


def create_network_for(network: ModuleType, num_classes: int, metadata: Mapping, **options):
    """A folder's network as a checkpoint's metadata describes it (a OneShot checkpoint may carry a searched
    architecture: the folder's `create_network_for(metadata, num_classes)`), else `create_network(num_classes)`;
    `options` (features_only, out_indices) go to the builder. It keeps the `image_size` it was trained at."""
    build = getattr(network, "create_network_for", None)
    net = build(metadata, num_classes, **options) if build else network.create_network(num_classes, **options)
    if metadata.get("image_size"):
        net.image_size = metadata["image_size"]
    return net
