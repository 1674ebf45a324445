"""ExecuTorch export (.pte programs for PyTorch's on-device runtime, XNNPACK delegate on Android and iOS CPUs).

The program takes float RGB 0..255 images 1 x 3 x H x W (the input format built in) and outputs logits; int8 uses
the PT2E flow with XNNPACK's quantizer. The check runs the program in the ExecuTorch runtime itself."""
from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.errors import library_notices_quieted
from common.input_format import InputFormat, Preprocess
from common.verification import ExportVerificationError, VerificationReport, as_batch, judge, reference_logits

CALIBRATION_BATCH = 16  # int8 calibration images per call of the prepared graph


def export_executorch(model: nn.Module, *, input_format: InputFormat, image_size: int, output: str | Path,
                      quantize: str | None = None, calibration: np.ndarray | None = None,
                      metadata: dict | None = None) -> Path:
    """Lower an eval-mode network with its input format to an XNNPACK-delegated .pte at `output`;
    quantize="int8" needs `calibration` images (RGB uint8 N x H x W x 3). `metadata`, the input format and the image
    size become methods of the program that return them as strings (`module.execute("class_names")`), as an ONNX
    export holds them in its metadata_props."""
    from common.export import model_properties

    with library_notices_quieted():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

    graph = nn.Sequential(Preprocess(input_format), model).eval()
    example = (torch.rand(1, 3, image_size, image_size) * 255,)
    if quantize == "int8":
        if calibration is None or not len(calibration):
            raise ValueError("int8 quantization needs calibration images")
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                              get_symmetric_quantization_config)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        # Calibrated in batches from a copy with a dynamic batch size: the observers' and the graph's cost per call
        # is then paid per batch, not per image; the program below is exported at batch 1 as ever.
        batch = torch.export.Dim("batch", min=1, max=CALIBRATION_BATCH)
        prepared = prepare_pt2e(torch.export.export(graph, (torch.rand(2, 3, image_size, image_size) * 255,),
                                                    dynamic_shapes=({0: batch},)).module(), quantizer)
        with torch.no_grad():
            for start in range(0, len(calibration), CALIBRATION_BATCH):
                prepared(as_batch(calibration[start:start + CALIBRATION_BATCH]))
        graph = convert_pt2e(prepared)
    elif quantize is not None:
        raise ValueError(f"quantize must be None or 'int8', not {quantize!r}")
    program = to_edge_transform_and_lower(torch.export.export(graph, example), partitioner=[XnnpackPartitioner()],
                                          constant_methods=model_properties(input_format, image_size, metadata)
                                          ).to_executorch()
    output = Path(output)
    output.write_bytes(program.buffer)
    return output


class ExecuTorchProgram:
    """A .pte loaded into the ExecuTorch runtime's Python bindings."""

    def __init__(self, path: str | Path) -> None:
        with library_notices_quieted():
            from executorch.runtime import Runtime

        try:
            with runtime_notices_dropped():
                self.method = Runtime.get().load_program(str(path)).load_method("forward")
        except RuntimeError as error:
            raise ExportVerificationError(f"{Path(path).name}: the ExecuTorch runtime cannot load it ({error})") \
                from None

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits for RGB uint8 images N x H x W x 3, one image at a time (the program has batch 1)."""
        return np.concatenate([self.method.execute([as_batch(images[i:i + 1])])[0].clone().numpy()
                               for i in range(len(images))])


# What the runtime's C++ code logs about the CPU and its threads, straight to stderr: nothing to act on.
_RUNTIME_NOTICE = re.compile(rb"\[(cpuinfo_utils|threadpool)\.cpp:\d+\] ")


@contextmanager
def runtime_notices_dropped() -> Iterator[None]:
    """What the block writes to file descriptor 2, where the runtime's C++ code logs, less the runtime's notices."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                held.seek(0)
                kept = [line for line in held.read().splitlines(keepends=True) if not _RUNTIME_NOTICE.match(line)]
                if kept:
                    os.write(2, b"".join(kept))
    finally:
        os.close(saved)


def verify_executorch(path: str | Path, model: nn.Module, input_format: InputFormat, images: np.ndarray, *,
                      quantized: bool, min_agreement: float | None = None) -> VerificationReport:
    """Run a .pte in the ExecuTorch runtime on `images` and judge it against PyTorch: fp32 within 1e-4 of the
    logit range, int8 by top-1 agreement (at least `min_agreement`)."""
    path = Path(path)
    candidate = ExecuTorchProgram(path).logits(images)
    reference = reference_logits(model, input_format, images)
    return judge(reference, candidate, candidate.argmax(axis=1), precision="int8 static" if quantized else "fp32",
                 target=path.name, method="the ExecuTorch runtime", min_agreement=min_agreement)

