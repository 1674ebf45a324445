"""Evaluate ShuffleNetV2.Large on an ImageNet-layout val folder with any released or trained weights file.

    python eval.py --weights FILE --val-dir /data/imagenet/val [--results-json FILE] [--predictions-csv FILE]
    python eval.py --weights snetv2_residual_se.pkl --val-dir DIR --mean-image ImageNet_1000_scale224_mean.xml
    python eval.py --help

The input is BGR 0..255 minus the ImageNet mean: per-channel means by default, or with --mean-image the original
per-pixel mean image the released weights were evaluated with (OpenCV XML, not shipped with this repository).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import network  # noqa: E402
from common.evaluate import run_eval  # noqa: E402
from common.model_state import LoadReport, load_model_state  # noqa: E402


def load_checkpoint(model, weights, **options) -> LoadReport:
    """Load any file common.model_state accepts; released files without the training-only side heads load too."""
    return load_model_state(model, weights, for_inference=True, **options)


def main(argv: list[str] | None = None) -> dict:
    return run_eval(network, argv, load_checkpoint=load_checkpoint)


if __name__ == "__main__":
    main()
