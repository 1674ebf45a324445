"""Every export format per model, measured: `export.py --sweep` on random weights with calibrated BatchNorm
(common.random_weights) and a classifier fitted to be decisive on the verification images, int8 calibrated on JPEGs of
synthetic images like the verification's (another seed). Size, top-1 agreement and KL with PyTorch, export time,
peak memory, and batch-1 one-thread images/s of ExecuTorch and ONNX against PyTorch eager on this CPU. Random
weights: no accuracy.

    python bench/export_speed.py [--models ...] [--image-size 224] [--quick] [--results-json FILE]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image
from safetensors.torch import save_file

from timing import add_results_argument, write_json
from common.cli import ArgumentParser, multiple_of_32
from common.errors import exit_on_user_error
from common.model_state import RELEASE_METADATA_KEY
from common.models import MODEL_FOLDERS, load_network_module
from common.random_weights import calibrated_random_network
from common.export import DEFAULT_VERIFY_IMAGES_COMPRESSED
from common.verification import make_test_images

REPO = Path(__file__).resolve().parent.parent
CALIBRATION_IMAGES = 100


def sweep_model(model_name: str, image_size: int, folder: Path, calibration: Path) -> list[dict]:
    module = load_network_module(model_name)
    model = calibrated_random_network(module, module.INPUT_FORMAT, image_size=image_size,
                                      decisive_on=make_test_images(DEFAULT_VERIFY_IMAGES_COMPRESSED, image_size))
    weights = folder / f"{model_name}-random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={RELEASE_METADATA_KEY: json.dumps({"image_size": image_size})})
    del model
    output = folder / f"{model_name}-sweep"
    subprocess.run([sys.executable, str(REPO / model_name / "export.py"), "--weights", str(weights), "--sweep",
                    "--calibration-dir", str(calibration), "--output", str(output)], check=False)
    rows = json.loads((output / "sweep.json").read_text())
    shutil.rmtree(output, ignore_errors=True)
    return [{"model": model_name, **row} for row in rows]


@exit_on_user_error
def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_FOLDERS), choices=MODEL_FOLDERS,
                        help="model folders to measure (default: all)")
    parser.add_argument("--image-size", type=multiple_of_32, default=224,
                        help="input size of the exports (default: 224)")
    parser.add_argument("--quick", action="store_true", help="OneShot only")
    add_results_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.models = ["OneShot"]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as folder:
        calibration = Path(folder) / "calibration"
        calibration.mkdir()
        for index, image in enumerate(make_test_images(CALIBRATION_IMAGES, 256, seed=50)):
            Image.fromarray(image).save(calibration / f"{index}.jpg", quality=95)
        for model_name in args.models:
            results += sweep_model(model_name, args.image_size, Path(folder), calibration)
    write_json(args.results_json, results)


if __name__ == "__main__":
    main()
