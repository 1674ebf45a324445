"""Export ShuffleNetV2.ExLarge to Core ML, ONNX or ExecuTorch, verified against PyTorch (python export.py --help)."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import network  # noqa: E402
from common.export import run_export  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_export(network))
