"""Judging an export against PyTorch, whatever runs it, and the ONNX check (Core ML's is common.coreml_verify).

fp32 must match PyTorch's logits within 1e-4 of their range; fp16 and compressed exports must agree on the top-1 class
of the images whose reference top-1 is clear (near-ties are left out and counted), and report mean KL divergence."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common.errors import UserError
from common.input_format import InputFormat, Preprocess

FP32_RELATIVE_TOLERANCE = 1e-4
# A top-1 is clear when its lead over the second class is at least this fraction of the image's largest |logit|
# (fp16 keeps about 3 decimal digits per operation; a network's rounding adds up to about 1% of the logits'
# magnitude) and at least fp16's smallest normal number (below it fp16 keeps fewer digits still).
CLEAR_MARGIN_RELATIVE = 0.02
CLEAR_MARGIN_ABSOLUTE = 2.0 ** -14
DEFAULT_MIN_AGREEMENT = 0.9


class ExportVerificationError(UserError):
    """An exported model that does not compute what the PyTorch model computes, or that cannot be checked."""

    exit_status = 1  # found during the work, after the export: not a command refused before it


@dataclass
class VerificationReport:
    """How an exported model compared with PyTorch on the test images."""

    target: str
    method: str
    precision: str
    images: int
    max_abs_diff: float
    logit_range: float
    tolerance: float | None
    top1_agreement: int
    clear_images: int
    mean_kl: float

    @property
    def agreement(self) -> float | None:
        """Top-1 agreement over the images with a clear reference top-1 (None when there are none)."""
        return self.top1_agreement / self.clear_images if self.clear_images else None

    def summary(self) -> str:
        agreement = f"top-1 agreement {self.top1_agreement}/{self.clear_images}"  # every image is clear in fp32
        if self.tolerance is not None:
            criterion = f"<= {self.tolerance:.3g} required"
        else:
            criterion = "top-1 agreement judged"
            if self.clear_images < self.images:
                agreement += (f" ({self.images - self.clear_images} of {self.images} images left out: PyTorch's "
                              "top-1 leads by less than the rounding can resolve)")
            agreement += f", mean KL divergence {self.mean_kl:.3g}"
        return (f"verified {self.target} ({self.precision}) against PyTorch with {self.method} on {self.images} "
                f"test images: {agreement}, max |logit difference| {self.max_abs_diff:.3g} ({criterion}; logit "
                f"range {self.logit_range:.3g})")


def make_test_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """`count` RGB uint8 images N x size x size x 3: smooth random colour fields with a shape and pixel noise, which
    give the networks natural-looking statistics without image files."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(count):
        cells = int(torch.randint(2, 8, (1,), generator=generator))
        colours = torch.rand(1, 3, cells, cells, generator=generator) * 255
        image = F.interpolate(colours, size=(size, size), mode="bilinear", align_corners=False)[0]
        top, left = (torch.rand(2, generator=generator) * size * 0.6).long().tolist()
        extent = max(2, int(size * (0.2 + 0.3 * float(torch.rand(1, generator=generator)))))
        image[:, top:top + extent, left:left + extent] = torch.rand(3, 1, 1, generator=generator) * 255
        image += torch.randn(image.shape, generator=generator) * 8
        images.append(image.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0))
    return torch.stack(images).numpy()


def as_batch(images: np.ndarray) -> torch.Tensor:
    """RGB uint8 images N x H x W x 3 as a contiguous float N x 3 x H x W tensor, 0..255 (what the exports take)."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32))


@torch.no_grad()
def reference_logits(model: nn.Module, input_format: InputFormat, images: np.ndarray) -> np.ndarray:
    """PyTorch's fp32 logits (eval mode) for RGB uint8 images N x H x W x 3 in the given input format."""
    was_training = model.training
    model.eval()
    try:
        return model(Preprocess(input_format)(as_batch(images))).float().numpy()
    finally:
        model.train(was_training)


def verify_onnx(onnx_path: str | Path, model: nn.Module, input_format: InputFormat, *,
                num_images: int = 4, quantized: bool = False, min_agreement: float | None = None) -> VerificationReport:
    """Check an ONNX file with onnx.checker and onnxruntime against `model`, at batch 1 and at batch N (opset 17 or
    later, dynamic batch; fp32 within 1e-4 of the logit range, `quantized` by top-1 agreement); raise
    ExportVerificationError otherwise."""
    import onnx
    import onnxruntime

    onnx_path = Path(onnx_path)
    try:
        onnx.checker.check_model(str(onnx_path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportVerificationError(f"{onnx_path.name} fails onnx.checker: {error}") from None
    proto = onnx.load(str(onnx_path), load_external_data=False)
    opset = max(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    if opset < 17:
        raise ExportVerificationError(f"{onnx_path.name} uses opset {opset}; 17 or later is required")
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (image_input,) = session.get_inputs()
    batch, _, height, width = image_input.shape
    if isinstance(batch, int):
        raise ExportVerificationError(f"{onnx_path.name} has a fixed batch size {batch}, not a dynamic one")
    images = make_test_images(max(num_images, 2), int(height))
    batch_input = as_batch(images).numpy()
    logits = session.run(None, {image_input.name: batch_input})[0]
    single = session.run(None, {image_input.name: batch_input[:1]})[0]
    reference = reference_logits(model, input_format, images)
    report = judge(reference, logits, logits.argmax(axis=1), precision="int8 static" if quantized else "fp32",
                   min_agreement=min_agreement, target=f"{onnx_path.name} (batch {len(images)})", method="onnxruntime")
    if not np.allclose(single, logits[:1], rtol=0, atol=FP32_RELATIVE_TOLERANCE * report.logit_range + 1e-6):
        raise ExportVerificationError(f"{onnx_path.name} gives other logits at batch 1 than at batch {len(images)}")
    return report


def top1_lead(logits: np.ndarray) -> np.ndarray:
    """How far each row's top-1 logit leads the second (infinite with one class)."""
    if logits.shape[1] < 2:
        return np.full(len(logits), np.inf)
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def mean_kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over images of KL(softmax(reference) || softmax(candidate)), in nats."""
    p, q = (torch.log_softmax(torch.from_numpy(logits).double(), dim=1) for logits in (reference, candidate))
    # Per image the sum can round a hair below 0 (e.g. -1e-182 for equal top classes); a divergence is never negative.
    return float(F.kl_div(q, p, reduction="none", log_target=True).sum(1).clamp(min=0).mean())


def judge(reference: np.ndarray, candidate: np.ndarray, candidate_top1, *, precision: str, target: str,
          method: str, min_agreement: float | None = None) -> VerificationReport:
    """Compare an export's logits with PyTorch's; raise ExportVerificationError when they do not agree: fp32 within
    1e-4 of the reference logit range, else top-1 agreement on `min_agreement` (default all) of the clear images."""
    if candidate.shape != reference.shape:
        raise ExportVerificationError(f"{target} gives outputs of shape {candidate.shape}, PyTorch "
                                      f"{reference.shape}: the export has another number of classes")
    if not np.isfinite(candidate).all():
        advice = ("try --precision fp32" if precision in ("fp16", "fp32") else
                  "its weights do not reproduce the network's: compress less (more bits) or re-export the package")
        raise ExportVerificationError(f"{target} gives non-finite outputs ({precision}): an overflow; {advice}")
    agrees = np.asarray(candidate_top1) == reference.argmax(axis=1)
    logit_range = float(reference.max() - reference.min())
    exact = precision == "fp32"
    # fp32 counts every image; otherwise the images whose top-1 leads the second class by a resolvable margin.
    margin = np.maximum(CLEAR_MARGIN_RELATIVE * np.abs(reference).max(axis=1), CLEAR_MARGIN_ABSOLUTE)
    clear = np.ones(len(reference), dtype=bool) if exact else top1_lead(reference) >= margin
    report = VerificationReport(
        target=target, method=method, precision=precision, images=len(reference),
        max_abs_diff=float(np.abs(candidate - reference).max()), logit_range=logit_range,
        tolerance=FP32_RELATIVE_TOLERANCE * logit_range if exact else None,
        top1_agreement=int(agrees[clear].sum()), clear_images=int(clear.sum()),
        mean_kl=mean_kl_divergence(reference, candidate))
    if exact and not report.max_abs_diff <= report.tolerance:
        raise ExportVerificationError(
            f"{target} does not match PyTorch: max |logit difference| {report.max_abs_diff:.3g} exceeds "
            f"{report.tolerance:.3g} (1e-4 of the logit range {logit_range:.3g}) on {report.images} test images, "
            f"top-1 agreement {report.top1_agreement}/{report.images}; check the input format (channel order, "
            "scale, mean) and the weights")
    required = 1.0 if min_agreement is None else min_agreement
    if not exact and report.clear_images and report.agreement < required:
        raise ExportVerificationError(_disagreement(report, required))
    return report


def _disagreement(report: VerificationReport, required: float) -> str:
    """The failure line of a top-1 check, with the advice its numbers support."""
    text = (f"{report.target} does not match PyTorch: top-1 class agrees on {report.top1_agreement} of "
            f"{report.clear_images} test images with a clear top-1 ({report.agreement:.0%}, {required:.0%} "
            f"required), mean KL divergence {report.mean_kl:.3g}, max |logit difference| {report.max_abs_diff:.3g} "
            f"(logit range {report.logit_range:.3g})")
    if report.precision == "int8 static":
        return text + ("; calibrate on more images like the ones the model will see (--calibration-dir, "
                       "--calibration-images), export fp32, or lower --min-agreement if this loss is acceptable")
    if report.precision not in ("fp16", "fp32"):
        return text + ("; compress less: more bits (palettize8 or palettize6 rather than palettize4, int8 rather "
                       "than fewer bits), or grouped palettes; or lower --min-agreement if this loss is acceptable")
    if report.max_abs_diff > 0.25 * report.logit_range:
        return text + ("; the outputs differ by a large part of the logit range, more than fp16 rounding "
                       "explains: compare the input format (channel order, scale, mean) and the weights")
    return text + "; the differences are of fp16 rounding size: export with --precision fp32"
