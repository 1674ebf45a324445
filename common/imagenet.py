"""The classes a network predicts, and which of its outputs each class folder of a val set stands for.

The released weights predict the 1000 ImageNet-1k classes in sorted wnid order; timm ships the ids and names,
torchvision short unique names, so nothing is downloaded. A checkpoint of this project stores its own class list."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from typing import TYPE_CHECKING

from common.errors import UserError, listed

if TYPE_CHECKING:
    from timm.data import ImageNetInfo

CLASS_MAP_HELP = ("a text file of lines '<class folder> <output index or class name>' (e.g. 'cat 281' or "
                  "'cat n02123045'); blank lines and lines starting with # are skipped; folders it does not name "
                  "must be named after a class")


class ClassMapError(UserError):
    """A val folder whose classes cannot be matched to the network's outputs, or a bad --class-map file."""


@functools.cache
def _info() -> ImageNetInfo:
    from timm.data import ImageNetInfo  # imported on first use: timm takes seconds to import

    return ImageNetInfo("imagenet-1k")


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in sorted order: output i of the released weights is class i."""
    return list(_info().label_names())


def imagenet_names() -> list[str]:
    """Human names of the ImageNet-1k classes in wnid order, e.g. 'tench, Tinca tinca'."""
    return list(_info().label_descriptions())


def imagenet_short_names() -> list[str]:
    """Short unique names of the ImageNet-1k classes in wnid order, e.g. 'tench' (the labels of exported models):
    torchvision's, since timm's repeat ('crane' the bird and the machine)."""
    import torchvision  # imported on first use, like timm

    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def read_class_map(path: str | Path, expected: Sequence[str]) -> dict[str, int]:
    """{class folder: output index} from a --class-map file (format: CLASS_MAP_HELP); a target that is not a whole
    number must be one of `expected`."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise ClassMapError(f"--class-map {path}: cannot read it ({error.strerror or error})") from None
    index_of = {name: index for index, name in enumerate(expected)}
    mapping: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise ClassMapError(f"--class-map {path} line {number}: expected '<class folder> <index or class "
                                f"name>', got {line!r}")
        folder, target = parts
        if target.isdigit():
            index = int(target)
            if index >= len(expected):
                raise ClassMapError(f"--class-map {path} line {number}: index {index} is out of range; the "
                                    f"network has {len(expected)} classes (0 to {len(expected) - 1})")
        elif target in index_of:
            index = index_of[target]
        else:
            raise ClassMapError(f"--class-map {path} line {number}: {target!r} is neither an output index nor "
                                f"one of the {len(expected)} class names ({listed(expected, 4)})")
        if folder in mapping:
            raise ClassMapError(f"--class-map {path} line {number}: class folder {folder!r} is mapped twice")
        mapping[folder] = index
    return mapping


def class_to_index_for(val_classes: Sequence[str], expected: Sequence[str],
                       class_map_file: str | Path | None = None) -> dict[str, int]:
    """A label for each class folder of a val set: the index of the network output it stands for.

    `expected` are the network's class names in output order; a folder is matched by `class_map_file`, else by name.
    Every output index is covered once (common.data.scan_image_folder requires it): outputs no folder stands for keep
    their name, or a placeholder when a mapped folder took that name."""
    mapping = read_class_map(class_map_file, expected) if class_map_file else {}
    index_of = {name: index for index, name in enumerate(expected)}
    labels: dict[str, int] = {}
    unknown = []
    for folder in val_classes:
        index = mapping.get(folder, index_of.get(folder))
        if index is None:
            unknown.append(folder)
        else:
            labels[folder] = index
    if unknown:
        if len(expected) == 1000 and list(expected) == imagenet_wnids():
            what = ("are not ImageNet wnids: the weights predict the 1000 ImageNet-1k classes in sorted wnid order "
                    "(n01440764, n01443537, ...); name the folders by wnid")
        else:
            what = f"are not among the {len(expected)} classes the weights were trained on ({listed(expected, 4)})"
        hint = "add them to --class-map" if class_map_file else "or pass --class-map FILE"
        raise ClassMapError(f"--val-dir: {len(unknown)} of {len(val_classes)} class folders ({listed(unknown, 4)}) "
                            f"{what}, {hint}")
    folder_of: dict[int, str] = {}
    for folder, index in labels.items():
        if index in folder_of:
            raise ClassMapError(f"--val-dir: class folders {folder_of[index]!r} and {folder!r} both stand for "
                                f"output {index} ({expected[index]}); map each output to one folder")
        folder_of[index] = folder
    # "\0" cannot occur in a file name, so a placeholder never captures a folder.
    return {folder_of.get(index, name if name not in labels else f"\0unused output {index}"): index
            for index, name in enumerate(expected)}
