"""The training augmentation keeps the original pipeline's statistics (torchvision's RandomResizedCrop,
ColorJitter and RandomHorizontalFlip on PIL images): crop scale and aspect ratio, colour jitter ranges and flip
rate agree within sampling error, also where the JPEG is decoded at reduced size."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from common.data import TrainTransform, decode_rgb_array

SAMPLES = 300
SIZE = 32
# Two-sample Kolmogorov-Smirnov critical value at a 0.1% false-alarm rate, for SAMPLES against SAMPLES.
KS_LIMIT = 1.95 * np.sqrt(2 / SAMPLES)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The largest gap between the two samples' empirical distribution functions."""
    points = np.sort(np.concatenate([a, b]))
    return float(np.abs(np.searchsorted(np.sort(a), points, side="right") / len(a)
                        - np.searchsorted(np.sort(b), points, side="right") / len(b)).max())


def coordinate_image(width: int, height: int, fmt: str) -> Image.Image:
    """Red grows with x and green with y from 0 to 255, blue constant; opened from an encoded file (undecoded)."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    pixels = np.stack([x, y, np.full_like(x, 128)], axis=-1).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, quality=95)
    buffer.seek(0)
    return Image.open(buffer)


def original(crop_size: int, jitter: float):
    """The original pipeline, ending in a uint8 3 x H x W tensor."""
    augment = transforms.Compose([transforms.RandomResizedCrop(crop_size),
                                  transforms.ColorJitter(jitter, jitter, jitter),
                                  transforms.RandomHorizontalFlip()])
    return lambda image: torch.from_numpy(np.array(augment(image.convert("RGB")))).permute(2, 0, 1)


def geometry(outputs: list[torch.Tensor], width: int, height: int) -> dict[str, np.ndarray]:
    """Per output: the crop's area fraction, log aspect ratio and whether it was flipped, read off the
    coordinate image's gradients (the mean of the first and last columns and rows)."""
    stack = torch.stack(outputs).double()
    left, right = stack[:, 0, :, 0].mean(1), stack[:, 0, :, -1].mean(1)
    top, bottom = stack[:, 1, 0, :].mean(1), stack[:, 1, -1, :].mean(1)
    # The outer pixel centres lie half a pixel inside the crop's edges.
    widths = (right - left).abs() / 255 * SIZE / (SIZE - 1)
    heights = (bottom - top) / 255 * SIZE / (SIZE - 1)
    return {"scale": (widths * heights).numpy(), "log_ratio": torch.log(widths * width / (heights * height)).numpy(),
            "flipped": (right < left).numpy()}


def run(transform, image_of, seeds) -> list[torch.Tensor]:
    outputs = []
    for seed in seeds:
        torch.manual_seed(seed)
        outputs.append(transform(image_of()))
    return outputs


@pytest.mark.parametrize("width, height, fmt", [(160, 120, "PNG"), (640, 480, "JPEG")])
def test_crop_scale_ratio_and_flip_rate_match_the_original(width, height, fmt):
    """640 x 480 JPEGs with 32 px crops decode at reduced size (1/2 to 1/8) for nearly every crop."""
    encoded = coordinate_image(width, height, fmt)
    encoded.load()
    buffer = io.BytesIO()
    encoded.save(buffer, fmt, quality=95)

    def image_of():
        buffer.seek(0)
        return Image.open(buffer)

    ours = geometry(run(TrainTransform(SIZE, jitter=0.0), image_of, range(SAMPLES)), width, height)
    theirs = geometry(run(original(SIZE, 0.0), image_of, range(1000, 1000 + SAMPLES)), width, height)
    for key in ("scale", "log_ratio"):
        assert ks_statistic(ours[key], theirs[key]) < KS_LIMIT, key
    # Within the ranges asked for (small slack for the gradients' rounding and JPEG's).
    assert 0.06 < ours["scale"].min() and ours["scale"].max() < 1.03
    assert np.log(3 / 4) - 0.08 < ours["log_ratio"].min() and ours["log_ratio"].max() < np.log(4 / 3) + 0.08
    for flipped in (ours["flipped"], theirs["flipped"]):
        assert abs(flipped.mean() - 0.5) < 4 * np.sqrt(0.25 / SAMPLES)


def test_colour_jitter_ranges_match_the_original():
    # Left half reddish, right half bluish: brightness moves the mean, contrast and saturation the spread.
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (200, 60, 40)
    pixels[:, 32:] = (40, 90, 190)
    image = Image.fromarray(pixels)
    full_frame = {"scale": (1.0, 1.0), "ratio": (4 / 3, 4 / 3)}
    ours_transform = TrainTransform(SIZE, **full_frame)
    reference = transforms.Compose([transforms.RandomResizedCrop(SIZE, **full_frame),
                                    transforms.ColorJitter(0.4, 0.4, 0.4)])
    ours = torch.stack(run(ours_transform, lambda: image, range(SAMPLES))).double()
    theirs = torch.stack([torch.from_numpy(np.array(t)).permute(2, 0, 1)
                          for t in run(reference, lambda: image, range(1000, 1000 + SAMPLES))]).double()
    for name, statistic in (("channel means", lambda x: x.mean((2, 3))), ("channel spreads", lambda x: x.std((2, 3))),
                            ("grey spread", lambda x: x.mean(1).std((1, 2))[:, None])):
        a, b = statistic(ours).numpy(), statistic(theirs).numpy()
        for channel in range(a.shape[1]):
            assert ks_statistic(a[:, channel], b[:, channel]) < KS_LIMIT, (name, channel)
    # Brightness alone (on grey, contrast and saturation change nothing) spans 0.6x to 1.4x.
    grey = Image.fromarray(np.full((48, 64, 3), 100, dtype=np.uint8))
    values = torch.stack(run(ours_transform, lambda: grey, range(SAMPLES))).double().mean((1, 2, 3)).numpy()
    assert 59 <= values.min() < 64 and 136 < values.max() <= 141
    assert abs(values.mean() - 100) < 4 * 80 / np.sqrt(12 * SAMPLES)


def test_the_same_seed_gives_the_same_output_whatever_was_decoded_before():
    image = coordinate_image(640, 480, "JPEG")
    transform = TrainTransform(SIZE)
    torch.manual_seed(5)
    first = transform(image)
    torch.manual_seed(5)
    assert torch.equal(transform(coordinate_image(640, 480, "JPEG")), first)


@pytest.mark.parametrize("at_least, expected", [(None, (480, 640)), ((480, 640), (480, 640)),
                                                ((420, 560), (480, 640)), ((240, 320), (240, 320)),
                                                ((200, 100), (240, 320)), ((100, 100), (120, 160)),
                                                ((1, 1), (60, 80))])
def test_jpegs_decode_at_full_size_or_a_power_of_two_smaller(at_least, expected):
    # libjpeg-turbo's other factors (7/8, 3/4, ...) take longer than a full-size decode.
    assert decode_rgb_array(coordinate_image(640, 480, "JPEG"), at_least=at_least).shape == (*expected, 3)
