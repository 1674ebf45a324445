"""The training augmentation keeps the original pipeline's statistics (torchvision's RandomResizedCrop,
ColorJitter and RandomHorizontalFlip on PIL images): crop scale and aspect ratio, colour jitter ranges and flip
rate agree within sampling error, also where the JPEG is decoded at reduced size; the one-pass colour jitter
agrees with torchvision's step-by-step blends pixel by pixel; files open and decode as PIL decodes them."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional

from common.data import TrainTransform, _color_jitter, _crop_params, decode_rgb_array, open_image

SAMPLES = 300
SIZE = 32
# Two-sample Kolmogorov-Smirnov critical value at a 0.1% false-alarm rate, for SAMPLES against SAMPLES.
KS_LIMIT = 1.95 * np.sqrt(2 / SAMPLES)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as in a loader worker: on these tiny images torch's thread pool costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The largest gap between the two samples' empirical distribution functions."""
    points = np.sort(np.concatenate([a, b]))
    return float(np.abs(np.searchsorted(np.sort(a), points, side="right") / len(a)
                        - np.searchsorted(np.sort(b), points, side="right") / len(b)).max())


def coordinate_image(folder, width: int, height: int, fmt: str) -> str:
    """A file whose red grows with x and green with y from 0 to 255, blue constant."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    pixels = np.stack([x, y, np.full_like(x, 128)], axis=-1).round().astype(np.uint8)
    path = str(folder / f"coordinates_{width}x{height}.{fmt.lower()}")
    Image.fromarray(pixels).save(path, fmt, quality=95)
    return path


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
        # As torch.manual_seed on CPU, without its wrapper's stack capture (milliseconds a call in torch 2.14).
        torch.default_generator.manual_seed(seed)
        outputs.append(transform(image_of()))
    return outputs


@pytest.mark.parametrize("width, height, fmt", [(160, 120, "PNG"), (640, 480, "JPEG")])
def test_crop_scale_ratio_and_flip_rate_match_the_original(width, height, fmt, tmp_path):
    """640 x 480 JPEGs with 32 px crops decode at reduced size (1/2 to 1/8) for nearly every crop."""
    path = coordinate_image(tmp_path, width, height, fmt)
    ours = geometry(run(TrainTransform(SIZE, jitter=0.0), lambda: open_image(path), range(SAMPLES)), width, height)
    theirs = geometry(run(original(SIZE, 0.0), lambda: Image.open(path), range(1000, 1000 + SAMPLES)), width, height)
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


def test_colour_jitter_in_one_pass_matches_torchvisions_blends_step_by_step():
    """Any order and factors, clamps inside included (bright pixels pushed past 255, then blended back), against
    torchvision's blends on a float image (PIL's differ from both by truncating to uint8 after each blend)."""
    generator = np.random.default_rng(0)
    pixels = generator.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    pixels[:4] = 250  # a bright band that a factor above 1 clamps
    blends = [functional.adjust_brightness, functional.adjust_contrast, functional.adjust_saturation]
    differences = []
    for _ in range(60):
        steps = generator.permutation(3).tolist()
        factors = generator.uniform(0.6, 1.4, 3).tolist()
        expected = torch.from_numpy(pixels).permute(2, 0, 1) / 255
        for step, factor in zip(steps, factors):
            expected = blends[step](expected, factor)
        expected = (expected * 255).round().permute(1, 2, 0).numpy()
        differences.append(_color_jitter(pixels, steps, factors).astype(int) - expected)
    # The one-pass form rounds once per pass, where the reference rounds once at the end.
    assert np.abs(differences).max() <= 2 and np.abs(differences).mean() < 0.25


@pytest.mark.parametrize("height, width", [(40, 400), (400, 40), (300, 320), (1, 1)])
def test_crop_fallback_is_torchvisions_central_crop(height, width):
    """Scales above 1 make every try fail, leaving the central crop with the ratio brought into range."""
    image = torch.zeros(1, height, width)
    expected = transforms.RandomResizedCrop.get_params(image, [2.0, 3.0], [3 / 4, 4 / 3])
    assert _crop_params(random.Random(0), height, width, (2.0, 3.0), (3 / 4, 4 / 3)) == tuple(expected)


def test_the_same_seed_gives_the_same_output_whatever_was_decoded_before(tmp_path):
    path = coordinate_image(tmp_path, 640, 480, "JPEG")
    transform = TrainTransform(SIZE)
    torch.manual_seed(5)
    first = transform(open_image(path))
    torch.manual_seed(5)
    transform(open_image(coordinate_image(tmp_path, 160, 120, "PNG")))
    torch.manual_seed(5)
    assert torch.equal(transform(open_image(path)), first)


@pytest.mark.parametrize("at_least, expected", [(None, (480, 640)), ((480, 640), (480, 640)),
                                                ((420, 560), (480, 640)), ((240, 320), (240, 320)),
                                                ((200, 100), (240, 320)), ((100, 100), (120, 160)),
                                                ((1, 1), (60, 80))])
def test_jpegs_decode_at_full_size_or_a_power_of_two_smaller(at_least, expected, tmp_path):
    # libjpeg-turbo's other factors (7/8, 3/4, ...) take longer than a full-size decode.
    image = open_image(coordinate_image(tmp_path, 640, 480, "JPEG"))
    assert decode_rgb_array(image, at_least=at_least).shape == (*expected, 3)


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG")])
def test_files_open_without_pil_where_they_can_and_decode_to_pils_pixels(mode, fmt, tmp_path):
    path = tmp_path / f"image.{fmt.lower()}"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8)).convert(mode).save(path)
    with Image.open(path) as image:
        expected = np.array(image.convert("RGB"))
    opened = open_image(str(path))
    assert isinstance(opened, Image.Image) == (mode == "CMYK" or fmt == "PNG")
    assert np.array_equal(decode_rgb_array(opened), expected)


def test_without_antialiasing_the_same_seed_gives_the_same_crop_jitter_and_flip(tmp_path):
    """On a linear gradient both resize filters give the same values but for rounding (amplified by the jitter)
    and near the crop's edges, where the antialiasing filter is cut short: another crop, jitter or flip would
    differ by tens of grey levels."""
    path = coordinate_image(tmp_path, 160, 120, "PNG")
    outputs = []
    for antialias in (True, False):
        torch.manual_seed(3)
        transform = TrainTransform(SIZE, antialias=antialias)
        outputs.append(torch.stack([transform(open_image(path)) for _ in range(40)]).int())
    difference = (outputs[0] - outputs[1]).abs()
    assert difference.max() <= 6 and difference.float().mean() < 0.5
