"""Classify your own images with ShuffleNetV2.ExLarge: the top-k ImageNet classes (or a checkpoint's own classes) of
each image.

    python predict.py --weights FILE photo.jpg holiday/ [--top-k 5] [--predictions-json predictions.json]
    python predict.py --help
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import network  # noqa: E402
from common.predict import run_predict  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    return run_predict(network, argv)


if __name__ == "__main__":
    main()
