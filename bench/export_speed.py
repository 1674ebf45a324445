"""Core ML and ONNX export per model: time, file size and the verified difference from PyTorch (random weights
with calibrated BatchNorm, common.random_weights).

    python bench/export_speed.py [--models ...] [--image-size 224] [--quick] [--json FILE]
"""
from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from pathlib import Path

from timing import write_json
from common.export import convert_pytorch_to_coreml, export_onnx, verify_onnx
from common.coreml_verify import verify_coreml
from common.models import MODEL_FOLDERS, load_network_module
from common.random_weights import calibrated_random_network

CASES = (("coreml", "fp16"), ("coreml", "fp32"), ("onnx", "fp32"))


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_model(model_name: str, image_size: int, folder: Path, cases) -> list[dict]:
    module = load_network_module(model_name)
    # Calibrated, not plain random: an uncalibrated 60-block network is chaotic, and its fp16 top-1 is noise.
    model = calibrated_random_network(module, module.INPUT_FORMAT, image_size=image_size)
    results = []
    for kind, precision in cases:
        output = folder / f"{model_name}-{precision}.{'mlpackage' if kind == 'coreml' else 'onnx'}"
        started = time.perf_counter()
        if kind == "coreml":
            convert_pytorch_to_coreml(model, input_format=module.INPUT_FORMAT, image_size=image_size,
                                      precision=precision, output=output)
        else:
            export_onnx(model, input_format=module.INPUT_FORMAT, image_size=image_size, output=output)
        export_seconds = time.perf_counter() - started
        started = time.perf_counter()
        verify = verify_coreml if kind == "coreml" else verify_onnx
        report = verify(output, model, module.INPUT_FORMAT, num_images=2)
        result = {"model": model_name, "format": kind, "precision": precision, "image_size": image_size,
                  "export_seconds": export_seconds, "verify_seconds": time.perf_counter() - started,
                  "bytes": size_of(output), "max_abs_diff": report.max_abs_diff, "logit_range": report.logit_range,
                  "top1_agreement": f"{report.top1_agreement}/{report.images}"}
        print(f"export {model_name:22s} {kind:6s} {precision}  {export_seconds:6.1f} s  "
              f"{result['bytes'] / 1e6:7.1f} MB  max |diff| {report.max_abs_diff:.2e} (logit range "
              f"{report.logit_range:.1f})  top-1 agree {result['top1_agreement']}", flush=True)
        results.append(result)
        shutil.rmtree(output, ignore_errors=True) if output.is_dir() else output.unlink()
        gc.collect()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_FOLDERS), choices=MODEL_FOLDERS)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--quick", action="store_true", help="Core ML fp16 and ONNX only, OneShot and Large")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    models = [m for m in args.models if not args.quick or m != "ShuffleNetV2.ExLarge"]
    cases = CASES[::2] if args.quick else CASES
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as folder:
        for model_name in models:
            results += bench_model(model_name, args.image_size, Path(folder), cases)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
