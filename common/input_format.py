"""What a network expects as input (channel order, scale, mean, std), and `Preprocess`, which makes it from uint8
RGB batches on the device, so train, eval and export share one definition."""
from __future__ import annotations

import dataclasses
import math
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.errors import UserError


@dataclass(frozen=True)
class InputFormat:
    """Pixel values 0..255 are reordered, multiplied by `scale`, then `mean` (in the network's channel order) is
    subtracted and `std` divides. `mean_image`, an OpenCV XML mean image (BGR, H x W x 3), replaces `mean`."""

    channel_order: str = "BGR"
    scale: float = 1.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    mean_image: str | None = None

    def __post_init__(self) -> None:
        if self.channel_order not in ("BGR", "RGB"):
            raise ValueError(f"channel_order must be 'BGR' or 'RGB', not {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, and std values must be positive")
        if not all(math.isfinite(value) for value in (*self.mean, *self.std, self.scale)):
            raise ValueError(f"mean {self.mean} and std {self.std} must be finite numbers")

    def replace(self, **changes) -> "InputFormat":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def describe(self) -> str:
        text = f"{self.channel_order} 0..{255 * self.scale:g}"
        if self.mean_image:
            text += f", minus the mean image {Path(self.mean_image).name}"
        elif any(self.mean):
            text += ", minus mean (" + ", ".join(f"{m:g}" for m in self.mean) + ")"
        if any(s != 1 for s in self.std):
            text += ", divided by std (" + ", ".join(f"{s:g}" for s in self.std) + ")"
        return text

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "InputFormat":
        return cls(channel_order=values["channel_order"], scale=float(values["scale"]),
                   mean=tuple(values["mean"]), std=tuple(values["std"]), mean_image=values.get("mean_image"))


class MeanImageError(UserError):
    """A mean-image file that cannot be read; the message names the file and the problem."""


def read_opencv_mean_image(path: str | Path) -> np.ndarray:
    """Read an OpenCV FileStorage XML mean image (`Channel`, `Row`, `Col`, `MeanImg`) as float32 H x W x C
    (hand-written: the format is a few tags, and each problem gets a message of its own)."""
    path = Path(path)
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as error:
        raise MeanImageError(f"{path}: cannot read it as an OpenCV XML mean image ({error})") from None

    def integer(tag: str) -> int:
        node = root.find(tag)
        if node is None or not (node.text or "").strip().isdigit():
            raise MeanImageError(f"{path}: the <{tag}> entry is missing or not a whole number")
        return int(node.text)

    channels, rows, cols = integer("Channel"), integer("Row"), integer("Col")
    data = root.find("MeanImg/data")
    if data is None or not data.text:
        raise MeanImageError(f"{path}: no <MeanImg><data> values")
    try:
        values = np.array(data.text.split(), dtype=np.float32)
    except ValueError:
        raise MeanImageError(f"{path}: <MeanImg><data> holds something other than numbers") from None
    if values.size != channels * rows * cols:
        raise MeanImageError(f"{path}: {values.size} values, but Channel x Row x Col = "
                             f"{channels} x {rows} x {cols} = {channels * rows * cols}")
    return values.reshape(rows, cols, channels)


class Preprocess(nn.Module):
    """RGB images N x 3 x H x W, uint8 or float in 0..255, to the network's input format."""

    def __init__(self, input_format: InputFormat) -> None:
        super().__init__()
        self.input_format = input_format
        self.bgr = input_format.channel_order == "BGR"
        if input_format.mean_image:
            mean_bgr = torch.from_numpy(read_opencv_mean_image(input_format.mean_image)).permute(2, 0, 1)
            mean = (mean_bgr if self.bgr else mean_bgr.flip(0)).unsqueeze(0).contiguous()
        else:
            mean = torch.tensor(input_format.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(input_format.std).view(1, 3, 1, 1), persistent=False)

    def mean_at(self, height: int, width: int) -> torch.Tensor:
        """The mean to subtract for images of this size: a per-pixel mean image is resized to fit."""
        if self.mean.shape[-2:] in ((1, 1), (height, width)):
            return self.mean
        return nn.functional.interpolate(self.mean, size=(height, width), mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
                ) -> torch.Tensor:
        """The network's input in `memory_format`, whatever the images' layout (the loaders' batches are
        channels_last), made in the same pass as the conversion to float."""
        x = images.to(torch.float32, memory_format=memory_format)
        if self.bgr:
            x = x.flip(1)
        if self.input_format.scale != 1.0:
            x = x * self.input_format.scale
        return (x - self.mean_at(x.shape[-2], x.shape[-1])) * self.inv_std


def add_input_format_arguments(parser, default: InputFormat | None = None) -> None:
    """--channel-order, --mean, --std and --mean-image, spelled alike in every script; unset, each keeps the
    weights' own input format (`default`, when given, is shown in the help)."""

    def shown(values) -> str:
        return "" if default is None else f" (default: {values})"

    group = parser.add_argument_group('input format (default: what the weights expect; MODELS.md, "Input format")')
    group.add_argument("--channel-order", choices=("BGR", "RGB"),
                       help="channel order the network takes" + shown(default and default.channel_order))
    group.add_argument("--mean", type=float, nargs=3, metavar=("M1", "M2", "M3"),
                       help="per-channel mean to subtract, in the network's channel order, on the 0..255 scale"
                            + shown(default and " ".join(f"{m:g}" for m in default.mean)))
    group.add_argument("--std", type=float, nargs=3, metavar=("S1", "S2", "S3"),
                       help="per-channel divisor, in the network's channel order"
                            + shown(default and " ".join(f"{s:g}" for s in default.std)))
    group.add_argument("--mean-image", metavar="FILE",
                       help="subtract this per-pixel mean image (OpenCV FileStorage XML, BGR, e.g. the original "
                            "ImageNet_1000_scale224_mean.xml) instead of per-channel means")


def input_format_from_args(args, default: InputFormat) -> InputFormat:
    """`default` with the flags of add_input_format_arguments applied; a one-line error for a bad combination."""
    if args.mean is not None and args.mean_image is not None:
        raise UserError("give either --mean or --mean-image, not both")
    if args.mean_image and not Path(args.mean_image).is_file():
        raise UserError(f"--mean-image {args.mean_image}: no such file")
    if args.std and min(args.std) <= 0:
        raise UserError(f"--std {' '.join(f'{value:g}' for value in args.std)}: every value must be positive (the "
                        "input is divided by it)")
    try:
        return default.replace(channel_order=args.channel_order, mean=tuple(args.mean) if args.mean else None,
                               std=tuple(args.std) if args.std else None, mean_image=args.mean_image)
    except ValueError as error:
        raise UserError(f"input format: {error}") from None
