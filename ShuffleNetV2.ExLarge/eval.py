"""Evaluate ShuffleNetV2.ExLarge on an ImageNet-layout val folder with any released or trained weights file.

    python eval.py --weights FILE --val-dir /data/imagenet/val [--results-json FILE] [--predictions-csv FILE]
    python eval.py --help

The input defaults to BGR 0..255 without mean subtraction, as the published evaluation script used; which input
the released weights expect could not be confirmed, so --mean, --mean-image, --channel-order and --std override it.
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
