"""A small built-in image-classification dataset made from a seed: real JPEG files in ImageFolder layout, each class
a distinct coloured shape on a noisy background, so a network learns it in minutes on a CPU."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEMO_CLASSES = ("red_disc", "green_square", "blue_triangle", "yellow_ring", "purple_cross", "cyan_bars")
_COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
            "purple": (150, 50, 190), "cyan": (40, 200, 210)}
_STAMP = "demo_dataset.json"


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, colour: tuple, box: tuple) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if kind in ("disc", "square"):
        (draw.ellipse if kind == "disc" else draw.rectangle)(box, fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif kind == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    elif kind == "cross":
        w = max(2, int(r / 2.5))
        for bar in ((cx - w, y0, cx + w, y1), (x0, cy - w, x1, cy + w)):
            draw.rectangle(bar, fill=colour)
    else:
        w = max(2, int(r / 4))
        for i in range(-1, 2):
            draw.rectangle((cx + 2 * i * w - w // 2, y0, cx + 2 * i * w + w // 2, y1), fill=colour)


def make_image_folder(root: str | Path, num_classes: int = len(DEMO_CLASSES), images_per_class: int = 20,
                      size: int = 64, seed: int = 0) -> Path:
    """Write `images_per_class` JPEGs for each of the first `num_classes` demo classes under root/<class>/."""
    if not 1 <= num_classes <= len(DEMO_CLASSES):
        raise ValueError(f"num_classes must be between 1 and {len(DEMO_CLASSES)}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for name in DEMO_CLASSES[:num_classes]:
        colour_name, kind = name.split("_")
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            noisy = rng.integers(60, 196, size=3) + rng.normal(0, 18, size=(size, size, 3))  # background, noise
            image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
            extent = rng.uniform(0.35, 0.8) * size
            x0, y0 = rng.uniform(0, size - extent, size=2)
            colour = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255)) for c in _COLOURS[colour_name])
            _draw_shape(ImageDraw.Draw(image), kind, colour, (x0, y0, x0 + extent, y0 + extent))
            image.save(folder / f"{name}_{i:04d}.jpg", quality=90)
    return root


def demo_dataset(cache_dir: str | Path, train_per_class: int = 120, val_per_class: int = 30) -> tuple[Path, Path]:
    """(train_dir, val_dir) of the built-in demo dataset, generated on first use and cached in `cache_dir`. One
    process generates under a lock file while the others wait, in a temporary folder renamed into place when done."""
    cache_dir = Path(cache_dir)
    recipe = {"classes": list(DEMO_CLASSES), "train": train_per_class, "val": val_per_class, "size": 72, "seed": 0}
    splits = cache_dir / "train", cache_dir / "val"
    if _is_built(cache_dir, recipe):
        return splits
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_dir.with_name(cache_dir.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_built(cache_dir, recipe):  # another process made it while this one waited
            return splits
        print(f"making the built-in demo dataset in {cache_dir.resolve()} (once; later runs read it there)", flush=True)
        building = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-building-", dir=cache_dir.parent))
        umask = os.umask(0)
        os.umask(umask)
        building.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the dataset is readable as what mkdir makes
        make_image_folder(building / "train", images_per_class=train_per_class, size=72, seed=0)
        make_image_folder(building / "val", images_per_class=val_per_class, size=72, seed=1)
        (building / _STAMP).write_text(json.dumps(recipe))
        if cache_dir.exists():  # another recipe's dataset, or one of an older layout: set aside, then removed
            old = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-old-", dir=cache_dir.parent))
            cache_dir.rename(old / cache_dir.name)
        building.rename(cache_dir)
        # The set-aside dataset, and what killed generations left behind.
        for leftover in cache_dir.parent.glob(f".{cache_dir.name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return splits


def _is_built(cache_dir: Path, recipe: dict) -> bool:
    try:
        return json.loads((cache_dir / _STAMP).read_text()) == recipe
    except (OSError, ValueError):
        return False
