"""ImageNet-layout data: folder scanning, the original train and eval transforms, a resumable sample stream, loaders.
Batches are uint8 RGB N x 3 x H x W in channels_last memory; `common.input_format.Preprocess` makes the network input.
The stream is hand-written so that iteration t's data depends only on (seed, t, batch, dataset size), not on ranks,
workers or resumes: position p reads sample order_e[p % N] of epoch e = p // N, augmented with a seed of (seed, p)."""
from __future__ import annotations

import functools
import io
import itertools
import logging
import math
import os
import random
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from common.errors import UserError, listed

log = logging.getLogger(__name__)

# Prefetched batches per worker; each item a worker makes is a whole batch, so two keep the GPU fed.
PREFETCH_BATCHES_PER_WORKER = 2
# The recipe's eval resize for a 224 crop; other crop sizes keep the ratio.
EVAL_RESIZE_FOR_224 = 256
# ITU-R 601-2 luma, as PIL's "L" conversion and torchvision's grayscale use.
_LUMA = np.array([0.299, 0.587, 0.114])

_MASK64 = (1 << 64) - 1
_TAG_ORDER, _TAG_SAMPLE, _TAG_EVAL = 1, 2, 3


class DataError(UserError):
    """A data folder or a data setting the pipeline cannot use; the message names the flag and what to do."""


# -- folders ----------------------------------------------------------------------------------------------------

def scan_image_folder(root: str | Path, flag: str = "--train-dir", *,
                      class_to_index: dict[str, int] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(samples, classes) of an ImageNet-layout folder root/<class>/<image>, in torchvision ImageFolder order, names
    starting with a dot ignored (see `walk_files`). `class_to_index` (names to 0 .. len - 1) forces the labels;
    `classes[i]` names label i."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{flag} {root}: no such folder")
    if not root.is_dir():
        raise DataError(f"{flag} {root}: not a folder (expected root/<class>/<image>)")
    try:
        folders = sorted(entry.name for entry in os.scandir(root)
                         if entry.is_dir() and not entry.name.startswith("."))
    except OSError as error:
        raise DataError(f"{flag} {root}: cannot read it ({error.strerror or error})") from None
    if not folders:
        raise DataError(f"{flag} {root}: has no class sub-folders (expected {root}/<class>/<image>)")
    if class_to_index is None:
        class_to_index = {name: index for index, name in enumerate(folders)}
    elif unknown := [name for name in folders if name not in class_to_index]:
        raise DataError(f"{flag} {root}: {len(unknown)} class folder(s) not in the label set of "
                        f"{len(class_to_index)} classes: {listed(unknown, 5)}")

    seen: dict[str, str] = {}  # shared by the classes: one folder under two labels is refused too
    images = {name: _class_images(root, name, class_to_index[name], flag, seen) for name in folders}
    if not any(images.values()):
        raise DataError(f"{flag} {root}: its class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    if empty := [name for name in folders if not images[name]]:
        # As torchvision's ImageFolder: a class without images would get a label that nothing teaches or tests.
        raise DataError(f"{flag} {root}: {len(empty)} class folder(s) hold no images ({listed(empty, 5)}); put images "
                        f"in them or remove them")
    samples = [sample for name in folders for sample in images[name]]
    return samples, sorted(class_to_index, key=class_to_index.__getitem__)


# torchvision ImageFolder's extensions.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _class_images(root: Path, name: str, label: int, flag: str, seen: dict[str, str]) -> list[tuple[str, int]]:
    """The images under root/name in torchvision's order (see `walk_files`). A folder reached twice is refused:
    torchvision follows a link back to an ancestor 40 levels deep, and so trained on every image of the loop 40
    times, the other classes' under this class's label; a link to another class's folder reads its images twice,
    under two labels."""
    files, repeated = walk_files(root / name, seen)
    if repeated:
        again, first = repeated[0]
        link = "a symbolic link back to it" if again.startswith(first + os.sep) else "a symbolic link to it"
        raise DataError(f"{flag} {root}: {again} is {first} again ({link}), so its images would be read twice, under "
                        "this class's label; remove the link")
    return [(path, label) for path in files if path.lower().endswith(IMAGE_EXTENSIONS)]


def walk_files(folder: str | Path, seen: dict[str, str] | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """(files, repeated folders) under `folder` in sorted order, symbolic links followed, names starting with a dot
    (.DS_Store, .ipynb_checkpoints, macOS's ._ copies) left out. A folder whose real path is in `seen` (real path to
    the folder first read there; filled in here) is not read again but listed as (folder, first) in repeated."""
    seen = {} if seen is None else seen
    walked, repeated = [], []
    for current, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            repeated.append((current, seen[real]))
            folders.clear()
            continue
        seen[real] = current
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        walked.append((current, names))
    files = [os.path.join(current, name) for current, names in sorted(walked) for name in sorted(names)
             if not name.startswith(".")]
    return files, repeated


# -- transforms -------------------------------------------------------------------------------------------------

def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) after resizing the short side to `short_side`: long side int(short_side * long / short + 0.5)."""
    if height <= width:
        return short_side, int(short_side * width / height + 0.5)
    return int(short_side * height / width + 0.5), short_side


def center_crop(image: Tensor, size: int) -> Tensor:
    """The central size x size window (a view) of a ... x H x W image at least that large."""
    from torchvision.transforms.functional import center_crop as crop  # on first use: --help imports no torchvision
    return crop(image, [size, size])


class EvalTransform:
    """The released weights' eval transform, as the original scripts ran it: cv2.resize's bilinear resize of the
    short side (256 for a 224 crop), center crop; an `open_image` image (or PIL image or tensor) to uint8 3 x H x W."""

    def __init__(self, crop_size: int = 224) -> None:
        self.crop_size = crop_size
        self.resize_size = round(crop_size * EVAL_RESIZE_FOR_224 / 224)

    def __call__(self, image: EncodedJpeg | Image.Image | Tensor) -> Tensor:
        pixels = decode_rgb_array(image)
        height, width = short_side_size(*pixels.shape[:2], self.resize_size)
        if (height, width) != pixels.shape[:2]:
            pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR)
        return center_crop(torch.from_numpy(pixels).permute(2, 0, 1), self.crop_size)

    def __repr__(self) -> str:
        return f"EvalTransform(resize {self.resize_size} OpenCV bilinear, center crop {self.crop_size})"


class TrainTransform:
    """The original augmentation (RandomResizedCrop, ColorJitter of brightness, contrast and saturation, horizontal
    flip), its parameters drawn as torchvision draws them from a generator seeded by `seed` (else by torch's); an
    `open_image` image (or PIL image or tensor) to a uint8 3 x H x W view of H x W x 3 memory, which collates into
    channels_last."""

    def __init__(self, crop_size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), jitter: float = 0.4, antialias: bool = True) -> None:
        self.crop_size = crop_size
        self.antialias = antialias
        self.scale = scale
        self.ratio = ratio
        self.jitter_range = (max(0.0, 1 - jitter), 1 + jitter)

    def __call__(self, image: EncodedJpeg | Image.Image | Tensor, seed: int | None = None) -> Tensor:
        rng = random.Random(int(torch.empty((), dtype=torch.int64).random_()) if seed is None else seed)
        full_height, full_width = image.shape[-2:] if isinstance(image, Tensor) else (image.height, image.width)
        top, left, height, width = _crop_params(rng, full_height, full_width, self.scale, self.ratio)
        steps, factors = rng.sample(range(3), 3), [rng.uniform(*self.jitter_range) for _ in range(3)]
        flip = rng.random() < 0.5
        size = self.crop_size
        # Drawn before decoding, so a JPEG is decoded no larger than the crop needs to cover size x size pixels.
        pixels = decode_rgb_array(image, at_least=(math.ceil(full_height * size / height),
                                                   math.ceil(full_width * size / width)), fast_upsampling=True)
        factor = pixels.shape[1] / full_width
        window = pixels[round(top * factor):round((top + height) * factor),
                        round(left * factor):round((left + width) * factor)]
        if self.antialias:
            # PIL's bilinear filter. Torch's uint8 kernel, given interleaved pixels, returns them so, as OpenCV wants.
            crop = torch.from_numpy(np.ascontiguousarray(window)).unsqueeze(0).permute(0, 3, 1, 2)
            window = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0].permute(1, 2, 0).numpy()
        else:  # OpenCV's bilinear: faster, sharper where it shrinks
            window = cv2.resize(window, (size, size), interpolation=cv2.INTER_LINEAR)
        out = _color_jitter(window, steps, factors)
        return torch.from_numpy(cv2.flip(out, 1) if flip else out).permute(2, 0, 1)

    def __repr__(self) -> str:
        return (f"TrainTransform(RandomResizedCrop {self.crop_size} scale {self.scale} ratio "
                f"({self.ratio[0]:.3g}, {self.ratio[1]:.3g}){'' if self.antialias else ' no antialias'}, "
                f"ColorJitter {self.jitter_range}, flip)")


def _crop_params(rng: random.Random, height: int, width: int, scale: tuple[float, float],
                 ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop, drawn as torchvision's RandomResizedCrop.get_params draws it."""
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        crop_width, crop_height = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            return rng.randint(0, height - crop_height), rng.randint(0, width - crop_width), crop_height, crop_width
    # The central crop of the whole image, its aspect ratio brought into `ratio`.
    crop_width = min(width, round(height * max(ratio)))
    crop_height = min(height, round(crop_width / min(ratio)))
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def _color_jitter(pixels: np.ndarray, steps: list[int], factors: list[float]) -> np.ndarray:
    """Brightness (0), contrast (1) and saturation (2) blends of uint8 H x W x 3 pixels, in the order of `steps`."""
    # Each blend is an affine map of the colour: consecutive ones compose into one 3 x 4 matrix for cv2.transform.
    matrix = np.eye(3, 4)
    for position, (step, factor) in enumerate(zip(steps, factors)):
        if step == 0:
            matrix *= factor
        elif step == 1:
            grey = _LUMA @ (matrix @ [*cv2.mean(pixels)[:3], 1.0])
            matrix *= factor
            matrix[:, 3] += (1 - factor) * grey
        else:
            matrix = factor * matrix + (1 - factor) * (_LUMA @ matrix)
        # Only a factor above 1 can leave 0..255: clamp there (cv2.transform does) as torchvision clamps each blend.
        if factor > 1 and position < len(steps) - 1:
            pixels, matrix = cv2.transform(pixels, matrix), np.eye(3, 4)
    return cv2.transform(pixels, matrix)


# -- the sample stream ------------------------------------------------------------------------------------------

def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping): a bijection that scatters nearby inputs."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(*words: int) -> int:
    key = 0
    for word in words:
        key = int(_mix64(np.array([key ^ (word & _MASK64)], dtype=np.uint64))[0])
    return key


def _hashed(key: int, values: np.ndarray) -> np.ndarray:
    return _mix64(values.astype(np.uint64) ^ np.uint64(key))


@functools.lru_cache(maxsize=4)  # a batch spans at most a couple of epochs unless the dataset is tiny
def _epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample indices of `epoch` in reading order: sorted hashes, the same on every numpy and torch version."""
    hashes = _hashed(_key(seed, _TAG_ORDER, epoch), np.arange(num_samples, dtype=np.uint64))
    return np.argsort(hashes, kind="stable")


class StreamSampler:
    """Endless batch sampler of the training stream (module docstring): per iteration from `start_iteration` on,
    this rank's (sample index, seed) pairs."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int, start_iteration: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if num_samples < 1:
            raise ValueError("num_samples must be at least 1")
        if global_batch_size < 1:
            raise DataError(f"--batch-size {global_batch_size}: must be at least 1")
        if global_batch_size % world_size:
            raise DataError(f"--batch-size {global_batch_size}: the global batch must divide evenly among "
                            f"{world_size} ranks; use a multiple of {world_size}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.seed = seed
        self.start_iteration = start_iteration
        self.rank = rank
        self._sample_key = _key(seed, _TAG_SAMPLE)

    def batch_at(self, iteration: int) -> list[tuple[int, int]]:
        """This rank's (sample index, sample seed) pairs of global batch `iteration`."""
        first = iteration * self.global_batch_size + self.rank * self.local_batch_size
        positions = np.arange(first, first + self.local_batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_samples)
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs).tolist():
            in_epoch = epochs == epoch
            indices[in_epoch] = _epoch_order(self.num_samples, self.seed, epoch)[offsets[in_epoch]]
        return list(zip(indices.tolist(), _hashed(self._sample_key, positions).tolist()))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return map(self.batch_at, itertools.count(self.start_iteration))


def evaluation_order(labels: Sequence[int]) -> np.ndarray:
    """The fixed evaluation order of samples with these labels, the same on every machine: classes dealt round by
    round (every class's first image, then its second, ...), so the first N images spread evenly over the classes."""
    labels = np.asarray(labels, dtype=np.int64)
    positions = np.arange(len(labels), dtype=np.uint64)
    by_class = np.lexsort((_hashed(_key(0, _TAG_EVAL, 0), positions), labels))
    sorted_labels = labels[by_class]
    round_of = np.empty(len(labels), dtype=np.int64)
    round_of[by_class] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels)
    class_in_round = _hashed(_key(0, _TAG_EVAL, 1), round_of * (int(labels.max(initial=0)) + 1) + labels)
    return np.lexsort((class_in_round, round_of))


# -- dataset, collation, loaders -------------------------------------------------------------------------------

class UndecodableImage(Exception):
    """An image file that cannot be read or decoded (the message names the decoder's error)."""


class EncodedJpeg(NamedTuple):
    """A JPEG file's bytes, not yet decoded, its upright size from the header and its EXIF orientation (1 to 8)."""
    data: bytes
    height: int
    width: int
    orientation: int = 1


# EXIF orientation 2 to 8: the turn of stored pixels (H x W x C) that shows them upright, as ImageOps.exif_transpose.
_UPRIGHT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
            5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
            7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: np.rot90(a)}
_EXIF_ORIENTATION = 0x0112


def open_image(path: str) -> EncodedJpeg | Image.Image:
    """The image at `path`, not yet decoded (a transform may ask for a reduced size), turned upright by its EXIF
    orientation as phones store photos: an EncodedJpeg for an RGB or greyscale JPEG file, else the PIL image;
    UndecodableImage when it cannot even be opened."""
    try:
        with open(path, "rb") as file:
            data = file.read()
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:  # not a JPEG, or one libjpeg-turbo's header reader rejects: PIL's turn
            colorspace = None
        if colorspace in ("YCbCr", "Gray", "RGB"):
            orientation = _jpeg_orientation(data)
            return EncodedJpeg(data, *((width, height) if orientation >= 5 else (height, width)), orientation)
        # Another import may have turned this on; truncated files must fail here rather than load half grey.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with warnings.catch_warnings():
            # Above 89 Mpixel PIL warns in two lines that name no file. A 100 Mpixel photo is no attack; an image
            # above twice that, PIL's limit, is refused and so skipped, naming the file.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)  # from the path, so that PIL's errors name the file
        return ImageOps.exif_transpose(image) if image.getexif().get(_EXIF_ORIENTATION, 1) in _UPRIGHT else image
    except Exception as error:
        raise UndecodableImage(f"{type(error).__name__}: {error}") from None


def _jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation of a JPEG file's bytes, 1 (as stored) when it has none. The header's segments are
    walked to the image data (a few steps; searching the file's bytes would cost 3% of an image's decoding), and
    only an Exif segment is parsed."""
    offset = 2
    while offset + 4 <= len(data) and data[offset] == 0xFF:
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte before a marker
            offset += 1
            continue
        if marker == 0xDA:  # start of scan: no Exif segment before the image data
            return 1
        if marker == 0xE1 and data[offset + 4:offset + 10] == b"Exif\x00\x00":
            with Image.open(io.BytesIO(data)) as image:
                orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            return orientation if orientation in _UPRIGHT else 1
        offset += 2 + int.from_bytes(data[offset + 2:offset + 4], "big")
    return 1


def decode_rgb_array(image: EncodedJpeg | Image.Image | Tensor, at_least: tuple[int, int] | None = None,
                     fast_upsampling: bool = False) -> np.ndarray:
    """An opened image's pixels as uint8 RGB H x W x 3 (UndecodableImage if they cannot be decoded). A JPEG given
    `at_least` (height, width) is decoded at the smallest of 1/2, 1/4, 1/8 size covering it; `fast_upsampling`
    repeats subsampled chroma instead of interpolating it (same colour means, a few levels off at colour edges)."""
    if isinstance(image, Tensor):
        return np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    if isinstance(image, EncodedJpeg):
        turned = image.orientation >= 5  # stored with height and width swapped
        height, width = (image.width, image.height) if turned else (image.height, image.width)
        at_least = at_least[::-1] if turned and at_least else at_least
        # Only powers of two: libjpeg-turbo's other factors (7/8, 3/4, ...) are slower than a full decode.
        divisor = 1
        while (at_least is not None and divisor < 8 and math.ceil(height / (2 * divisor)) >= at_least[0]
               and math.ceil(width / (2 * divisor)) >= at_least[1]):
            divisor *= 2
        try:
            # libjpeg-turbo scales to ceil(side / divisor), the smallest output at least this large.
            pixels = simplejpeg.decode_jpeg(image.data, colorspace="RGB", min_height=math.ceil(height / divisor),
                                            min_width=math.ceil(width / divisor), fastupsample=fast_upsampling)
        except ValueError as error:
            raise UndecodableImage(f"{type(error).__name__}: {error}") from None
        return pixels if image.orientation == 1 else np.ascontiguousarray(_UPRIGHT[image.orientation](pixels))
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # see open_image
    try:
        image.load()
        if image.mode.startswith("I"):  # 16- or 32-bit grey levels, which PIL's conversion to RGB clips at 255
            levels = np.asarray(image)
            if image.mode.startswith("I;16") or levels.max(initial=0) > 255:
                levels = np.clip(levels, 0, 65535) >> 8
            return np.repeat(levels.astype(np.uint8)[..., None], 3, axis=2)
        return np.array(image if image.mode == "RGB" else image.convert("RGB"))
    # Decoders raise many types on damaged input; whatever the type, the file is unusable: skipped and counted.
    except Exception as error:
        image.close()
        raise UndecodableImage(f"{type(error).__name__}: {error}") from None


@functools.cache
def _warned_flags(paths_hash: int, count: int) -> Tensor:
    """Per list of files, which were warned about: in shared memory, so a file is named once per run."""
    return torch.zeros(count, dtype=torch.uint8).share_memory_()


class ImageDataset(Dataset):
    """(uint8 image, label) per sample, or None for a file that cannot be decoded (one warning line); with
    `with_index`, (image, label, index). An item is an index, or an (index, sample seed) pair from `StreamSampler`
    whose seed the transform draws its parameters from (`transform(image, seed)`), leaving torch's generator alone.
    The paths are one bytes object (a fixed-width array would pad every path to the longest) and the labels one
    array, so forked workers copy no objects."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform, *, with_index: bool = False) -> None:
        encoded = [os.fsencode(path) for path, _ in samples]
        self._paths = b"".join(encoded)
        self._path_ends = np.cumsum([len(path) for path in encoded], dtype=np.int64)
        self._labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))
        self._warned = _warned_flags(hash(self._paths), len(samples))
        self.transform = transform
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self._labels)

    def path(self, index: int) -> str:
        start = int(self._path_ends[index - 1]) if index else 0
        return os.fsdecode(self._paths[start:int(self._path_ends[index])])

    def __getitem__(self, item: int | tuple[int, int]) -> tuple | None:
        index, sample_seed = item if isinstance(item, tuple) else (item, None)
        try:
            image = open_image(self.path(index))
            pixels = self.transform(image) if sample_seed is None else self.transform(image, sample_seed)
        except UndecodableImage as error:
            if not self._warned[index]:
                self._warned[index] = 1
                log.warning("skipped %s: cannot decode it (%s); from now on it is skipped without a word, and "
                            "counted", self.path(index), error)
            return None
        label = int(self._labels[index])
        return (pixels, label, index) if self.with_index else (pixels, label)


def collate_skip_corrupt(batch: list, image_shape: tuple[int, int, int] | None = None) -> tuple[Tensor, Tensor, int]:
    """(uint8 images N x 3 x H x W, int64 labels, number of skipped undecodable images) of a list of items;
    `image_shape` shapes the empty image tensor when every image of a batch was skipped."""
    kept = [item for item in batch if item is not None]
    if kept:
        # Inside a worker default_collate stacks into shared memory; H x W x 3 pixels stack without a transpose.
        images = default_collate([item[0].permute(1, 2, 0) for item in kept]).permute(0, 3, 1, 2)
    else:
        images = torch.empty((0, *(image_shape or (3, 0, 0))), dtype=torch.uint8)
    return images, torch.tensor([item[1] for item in kept], dtype=torch.int64), len(batch) - len(kept)


def collate_skip_corrupt_with_indices(batch: list, image_shape: tuple[int, int, int] | None = None
                                      ) -> tuple[Tensor, Tensor, int, Tensor]:
    """As `collate_skip_corrupt` for (image, label, index) items, plus the int64 indices of the kept images."""
    indices = torch.tensor([item[2] for item in batch if item is not None], dtype=torch.int64)
    return *collate_skip_corrupt(batch, image_shape), indices


def _outlive_stop_signals(worker_id: int) -> None:
    """A worker outlives Ctrl-C, SIGTERM and SIGUSR2 (the training saves before it stops) but not a parent's SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # no way to tell the sender (macOS): SIGTERM keeps its default
        return
    # Blocked before any other thread exists, so every thread inherits the mask and only the one below sees them.
    handled = {signal.SIGTERM, signal.SIGUSR2}
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    parent = os.getppid()

    def answer() -> None:
        while True:
            received = signal.sigwaitinfo(handled)
            if received.si_signo == signal.SIGTERM and received.si_pid == parent:
                os._exit(0)

    threading.Thread(target=answer, name="stop-signals", daemon=True).start()


def _loader(dataset: Dataset, batch_sampler, collate: Callable, crop_size: int, workers: int,
            pin_memory: bool) -> DataLoader:
    collate_fn = functools.partial(collate, image_shape=(3, crop_size, crop_size))
    # A generator of its own: iter(loader) drawing from the global RNG would change a resumed run's dropout masks.
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=pin_memory, persistent_workers=workers > 0, generator=torch.Generator(),
                      worker_init_fn=_outlive_stop_signals if workers > 0 else None,
                      prefetch_factor=PREFETCH_BATCHES_PER_WORKER if workers > 0 else None)


def build_train_loader(train_dir: str | Path, *, crop_size: int, global_batch_size: int, seed: int,
                       start_iteration: int = 0, rank: int = 0, world_size: int = 1, workers: int = 4,
                       pin_memory: bool = False, samples_filter: Callable[[list], list] | None = None
                       ) -> tuple[DataLoader, list[str]]:
    """(loader, classes): the endless loader yields (uint8 images, int64 labels, skipped count) for this rank;
    `samples_filter` picks the (path, label) samples to train on.
    `loader.batch_sampler` is the `StreamSampler`: set its `start_iteration` and iter(loader) again to resume."""
    samples, classes = scan_image_folder(train_dir, "--train-dir")
    if samples_filter is not None:
        samples = samples_filter(samples)
    sampler = StreamSampler(len(samples), global_batch_size, seed, start_iteration=start_iteration, rank=rank,
                            world_size=world_size)
    dataset = ImageDataset(samples, TrainTransform(crop_size))
    return _loader(dataset, sampler, collate_skip_corrupt, crop_size, workers, pin_memory), classes


def build_eval_loader(val_dir: str | Path, *, crop_size: int = 224, batch_size: int = 100, workers: int = 4,
                      limit: int | None = None, rank: int = 0, world_size: int = 1, flag: str = "--val-dir",
                      class_to_index: dict[str, int] | None = None, pin_memory: bool = False
                      ) -> tuple[DataLoader, list[str], list[str]]:
    """(loader, classes, paths): evaluation in the fixed order, its first `limit` images when given. `paths` is the
    whole order; rank r reads positions r, r + W, ... Batches: (images, labels, skipped, positions in `paths`)."""
    if limit is not None and limit < 1:
        raise DataError(f"--limit {limit}: must be at least 1")
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: must be at least 1")
    samples, classes = scan_image_folder(val_dir, flag, class_to_index=class_to_index)
    ordered = [samples[i] for i in evaluation_order([label for _, label in samples])[:limit].tolist()]
    shard = list(range(rank, len(ordered), world_size))
    batches = [shard[i:i + batch_size] for i in range(0, len(shard), batch_size)]
    dataset = ImageDataset(ordered, EvalTransform(crop_size), with_index=True)
    loader = _loader(dataset, batches, collate_skip_corrupt_with_indices, crop_size, workers, pin_memory)
    return loader, classes, [path for path, _ in ordered]
