"""The classes a network predicts, and which of its outputs each class folder of a val set stands for. The released
weights predict ImageNet-1k's 1000 classes in sorted wnid order (ids and names from timm and torchvision)."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from common.errors import UserError, listed

CLASS_MAP_HELP = ("a text file of lines '<class folder> <output index or class name>' (e.g. 'cat 281' or "
                  "'cat n02123045'); blank lines and lines starting with # are skipped; folders it does not name "
                  "must be named after a class")


class ClassMapError(UserError):
    """A val folder whose classes cannot be matched to the network's outputs, or a bad --class-map file."""


@functools.cache
def _info():
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


def output_names(classes: Sequence[str], num_classes: int, short: bool = False) -> list[str]:
    """A name for each output: ImageNet's for its wnids (`imagenet_short_names` with `short`), else the weights'
    class names, then "output i" for the outputs past them (a checkpoint trained with more outputs than folders)."""
    if list(classes) == imagenet_wnids():
        classes = imagenet_short_names() if short else imagenet_names()
    names = list(classes)
    return names + [f"output {index}" for index in range(len(names), num_classes)]


def read_class_map(path: str | Path, expected: Sequence[str]) -> dict[str, int]:
    """{class folder: output index} from a --class-map file (format: CLASS_MAP_HELP); a target that is not a whole
    number must be one of `expected`."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise ClassMapError(f"--class-map {path}: cannot read it ({error.strerror or error})") from None
    index_of = {name: index for index, name in enumerate(expected)}
    mapping: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        parts, where = line.strip().rsplit(None, 1), f"--class-map {path} line {number}"
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) != 2:
            raise ClassMapError(f"{where}: expected '<class folder> <index or class name>', got {line.strip()!r}")
        folder, target = parts
        index = int(target) if target.isdigit() else index_of.get(target)
        if index is None:
            raise ClassMapError(f"{where}: {target!r} is neither an output index nor one of the {len(expected)} "
                                f"class names ({listed(expected, 4)})")
        if index >= len(expected):
            raise ClassMapError(f"{where}: index {index} is out of range; the network has {len(expected)} classes "
                                f"(0 to {len(expected) - 1})")
        if folder in mapping:
            raise ClassMapError(f"{where}: class folder {folder!r} is mapped twice")
        mapping[folder] = index
    return mapping


def class_to_index_for(val_classes: Sequence[str], expected: Sequence[str],
                       class_map_file: str | Path | None = None, offer_class_map: bool = True) -> dict[str, int]:
    """{class folder: the network output it stands for}, matched by `class_map_file`, else by name in `expected` (the
    output names); `offer_class_map`: the script has --class-map. Every output index is covered once, as
    common.data.scan_image_folder requires: an output no folder stands for keeps its name, or a placeholder when a
    mapped folder took that name."""
    mapping = read_class_map(class_map_file, expected) if class_map_file else {}
    index_of = {name: index for index, name in enumerate(expected)}
    labels = {folder: mapping.get(folder, index_of.get(folder)) for folder in val_classes}
    if unknown := [folder for folder, index in labels.items() if index is None]:
        if len(expected) == 1000 and list(expected) == imagenet_wnids():
            what = ("are not ImageNet wnids: the weights predict the 1000 ImageNet-1k classes in sorted wnid order "
                    "(n01440764, n01443537, ...); name the folders by wnid")
        else:
            what = f"are not among the {len(expected)} classes the weights were trained on ({listed(expected, 4)})"
        hint = ("add them to --class-map" if class_map_file else "or pass --class-map FILE") if offer_class_map else ""
        raise ClassMapError(f"--val-dir: {len(unknown)} of {len(val_classes)} class folders ({listed(unknown, 4)}) "
                            f"{what}{', ' + hint if hint else ''}")
    folder_of: dict[int, str] = {}
    for folder, index in labels.items():
        if (other := folder_of.setdefault(index, folder)) != folder:
            raise ClassMapError(f"--val-dir: class folders {other!r} and {folder!r} both stand for "
                                f"output {index} ({expected[index]}); map each output to one folder")
    # "\0" cannot occur in a file name, so a placeholder never captures a folder.
    return {folder_of.get(index, name if name not in labels else f"\0unused output {index}"): index
            for index, name in enumerate(expected)}
