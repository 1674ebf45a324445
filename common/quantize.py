"""Images for calibrating and measuring exports, prepared as evaluation prepares them and fed as an app feeds the
export (RGB 0..255), and int8 quantization of ONNX exports (onnxruntime QDQ)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from common.data import EvalTransform, UndecodableImage, open_image
from common.errors import UserError
from common.verification import as_batch

DEFAULT_CALIBRATION_IMAGES = 300
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def load_calibration_images(folder: str | Path, image_size: int, limit: int = DEFAULT_CALIBRATION_IMAGES,
                            flag: str = "--calibration-dir") -> np.ndarray:
    """Up to `limit` images spread evenly over `folder` (an ImageFolder tree or flat), as RGB uint8
    N x image_size x image_size x 3 after the evaluation transform. Unreadable images are skipped with a line each."""
    files = _spread(calibration_files(folder, flag), limit)
    images = _eval_images(files, image_size, f"{flag} {folder}")[1]
    if len(images) < len(files):
        print(f"calibration: {len(files) - len(images)} of {len(files)} images could not be read and were skipped",
              flush=True)
    return images


def calibration_files(folder: str | Path, flag: str = "--calibration-dir") -> list[Path]:
    """The image files of `folder` and its sub-folders, sorted; a one-line UserError when there are none."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"{flag} {folder}: no such folder")
    files = sorted(Path(root) / name for root, dirs, names in os.walk(folder)
                   for name in names if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."))
    if not files:
        raise UserError(f"{flag} {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or its sub-folders")
    return files


def quantize_onnx(fp32_path: str | Path, output: str | Path, calibration: np.ndarray) -> Path:
    """Write an int8 copy of an fp32 ONNX export, its metadata kept: QDQ format, per-channel int8 weights, uint8
    activations whose ranges are calibrated on `calibration` (RGB uint8 N x H x W x 3)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter({"image": as_batch(calibration[i:i + 1]).numpy()} for i in range(len(calibration)))

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    output = Path(output)
    prepared = output.with_name(f".{output.stem}.prepared.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        metadata = {entry.key: entry.value for entry in onnx.load(str(fp32_path)).metadata_props}
        proto = onnx.load(str(output))
        onnx.helper.set_model_props(proto, metadata)
        onnx.save(proto, str(output))
    finally:
        prepared.unlink(missing_ok=True)
    return output


def load_labelled_images(folder: str | Path, classes: list[str], image_size: int,
                         limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to `limit` images spread evenly over an ImageFolder val set whose class folders name the network's
    `classes`, after the evaluation transform: (RGB uint8 N x H x W x 3, labels N). Unreadable images are skipped."""
    from common.data import scan_image_folder
    from common.imagenet import class_to_index_for

    samples, folders = scan_image_folder(folder, "--val-dir")
    class_to_index = class_to_index_for(folders, classes, offer_class_map=False)  # export.py has no --class-map
    samples = _spread([(path, class_to_index[folders[label]]) for path, label in samples], limit)
    positions, images = _eval_images([path for path, _ in samples], image_size, f"--val-dir {folder}")
    return images, np.array([samples[i][1] for i in positions])


def _spread(items: list, limit: int) -> list:
    """At most `limit` of `items`, spread evenly over them."""
    if len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def _eval_images(paths: list, image_size: int, source: str) -> tuple[list[int], np.ndarray]:
    """The positions of the readable `paths` and their images after the evaluation transform, RGB uint8
    N x H x W x 3; a line for each unreadable one, a UserError naming `source` when none can be read."""
    transform = EvalTransform(image_size)
    read = {}
    for position, path in enumerate(paths):
        try:
            read[position] = transform(open_image(str(path))).permute(1, 2, 0).numpy()
        except UndecodableImage as error:
            print(f"skipped {path}: cannot decode it ({error})", file=sys.stderr, flush=True)
    if not read:
        raise UserError(f"{source}: none of its {len(paths)} images could be read")
    return list(read), np.stack(list(read.values()))
