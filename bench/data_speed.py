"""Data pipeline images/s per worker: decode + train augmentation (with the antialiased resize it trains with, and
with OpenCV's plain bilinear one) and decode + eval transform, against decoding alone (with PIL, and with
simplejpeg's libjpeg-turbo at full size, the decoder the pipeline uses) and against the original training pipeline
(PIL decode, torchvision RandomResizedCrop, ColorJitter and flip on PIL images, then the original OpenCV-style BGR
float tensor conversion), all in the same run on the same ImageNet-sized JPEG files (500 x 375, quality 90) written
for it.

    python bench/data_speed.py [--images 96] [--results-json FILE]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
import torch
from PIL import Image
from torchvision import transforms

from timing import add_results_argument, interleaved, paired_ratio, rate, write_json
from common.cli import ArgumentParser, positive_int
from common.data import EvalTransform, ImageDataset, TrainTransform
from common.errors import exit_on_user_error


def write_jpegs(folder: Path, count: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        # Smooth content with some texture, closer to a photo's compressed size than pure noise.
        base = rng.integers(0, 255, size=(12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((500, 375), Image.BICUBIC)
        noisy = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-12, 12, (375, 500, 3)), 0, 255)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(noisy.astype(np.uint8)).save(path, quality=90)
        samples.append((str(path), 0))
    return samples


def original_train_pipeline(crop_size: int = 224):
    """The original training pipeline, as the 2019 training scripts ran it."""
    augment = transforms.Compose([transforms.RandomResizedCrop(crop_size),
                                  transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
                                  transforms.RandomHorizontalFlip(0.5)])

    def run(path: str) -> torch.Tensor:
        with Image.open(path) as image:
            pixels = np.asarray(augment(image.convert("RGB")))
        # ToBGRTensor: HWC RGB -> CHW BGR float.
        return torch.from_numpy(np.ascontiguousarray(pixels[:, :, ::-1].transpose(2, 0, 1))).float()

    return run


@exit_on_user_error
def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=positive_int, default=96, help="JPEG files per measurement (default: 96)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="measured passes over the files, every case once per round (default: 5)")
    add_results_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one worker process uses one core
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        samples = write_jpegs(Path(folder), args.images)

        def pil_only() -> None:
            for path, _ in samples:
                with Image.open(path) as image:
                    image.convert("RGB").load()

        def turbo_only() -> None:
            for path, _ in samples:
                with open(path, "rb") as file:
                    simplejpeg.decode_jpeg(file.read(), colorspace="RGB")

        train = ImageDataset(samples, TrainTransform(224))
        train_plain_resize = ImageDataset(samples, TrainTransform(224, antialias=False))
        evaluation = ImageDataset(samples, EvalTransform(224))
        original = original_train_pipeline(224)
        cases = {"pil_decode": pil_only,
                 "simplejpeg_decode": turbo_only,
                 "original_train_augment": lambda: [original(path) for path, _ in samples],
                 "decode_train_augment": lambda: [train[(i, 1000 + i)] for i in range(len(samples))],
                 "decode_train_no_antialias": lambda: [train_plain_resize[(i, 1000 + i)] for i in range(len(samples))],
                 "decode_eval_transform": lambda: [evaluation[i] for i in range(len(samples))]}
        seconds = interleaved(cases, repeats=args.repeats, warmup=1)
    results = {name: {**rate(seconds[name], len(samples)), "x_pil_decode": paired_ratio(seconds, "pil_decode", name),
                      "x_original": paired_ratio(seconds, "original_train_augment", name)} for name in cases}
    for name, value in results.items():
        turbo = paired_ratio(seconds, "simplejpeg_decode", name)
        print(f"data {name:24s} {value['median']:8.1f} img/s per worker  ({value['x_pil_decode']:.2f} x PIL decode "
              f"alone, {turbo:.2f} x simplejpeg decode alone, {value['x_original']:.2f} x the original training "
              "pipeline)")
    write_json(args.results_json, results)


if __name__ == "__main__":
    main()
