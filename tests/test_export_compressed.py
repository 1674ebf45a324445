"""Compressed and int8 exports: Core ML palettes and int8 weights evaluated by the Linux check, int8 ONNX in
onnxruntime, ExecuTorch fp32 and int8 in the ExecuTorch runtime; calibration folders; the fp16 judge on near-ties.

OneShot at 64x64 with 10 classes and calibrated random weights (common.random_weights). Compressing takes as long
at any image size (it works on the weights), so the 8- and 6-bit palettes (k-means over each whole tensor) and the
ExecuTorch lowering are marked slow.
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from common.coreml_verify import MLProgram, import_coremltools, verify_coreml
from common.export import (_forwarded_flags, check_deployment_target, compress_coreml, convert_pytorch_to_coreml,
                           run_export, sweep_table)
from common.model_state import RELEASE_METADATA_KEY
from common.quantize import load_calibration_images
from common.random_weights import calibrated_random_network
from common.verification import (ExportVerificationError, judge, make_test_images, mean_kl_divergence,
                                 reference_logits)
from conftest import REPO_ROOT, network

SMALL = 64
CLASSES = [f"class {i}" for i in range(10)]
pytestmark = pytest.mark.filterwarnings("ignore:Function _TORCH_OPS_REGISTRY:DeprecationWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def oneshot():
    """Calibrated random weights with a classifier fitted to be decisive on the verification images (a lead of 10
    logits, ten different classes), as a trained one is: agreement is only meaningful away from near-ties."""
    images = make_test_images(16, SMALL)  # what run_export verifies a compressed export on
    net = calibrated_random_network(network("OneShot"), network("OneShot").INPUT_FORMAT, 10, 0, SMALL,
                                    decisive_on=images)
    # The agreement tests mean something only if the network's top-1 varies over the verification images and is
    # as stable as a trained network's: one grey level of noise must not change it (a plain random network's
    # changes on a third of the images, and no int8 export can agree with it).
    top1 = reference_logits(net, network("OneShot").INPUT_FORMAT, images).argmax(1)
    noise = np.random.default_rng(0).integers(-1, 2, images.shape)
    noisy = (images.astype(np.int16) + noise).clip(0, 255).astype(np.uint8)
    assert len(set(top1.tolist())) >= 3
    assert (reference_logits(net, network("OneShot").INPUT_FORMAT, noisy).argmax(1) == top1).mean() >= 0.9
    return net


@pytest.fixture(scope="module")
def weights(oneshot, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "oneshot.safetensors"
    save_file({k: v.contiguous() for k, v in oneshot.state_dict().items()}, str(path),
              metadata={RELEASE_METADATA_KEY: json.dumps({"classes": CLASSES, "image_size": SMALL})})
    return path


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory):
    """23 JPEGs like the verification images (ExecuTorch calibrates a batch of 16, then one of 7), in two class
    folders, and one file that is not an image at all."""
    root = tmp_path_factory.mktemp("calibration")
    for index, image in enumerate(make_test_images(23, SMALL, seed=50)):
        folder = root / ("a" if index % 2 else "b")
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{index}.jpg", quality=95)
    (root / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def export(weights, tmp_path, *flags):
    return run_export(network("OneShot"), ["--weights", str(weights), "--output", str(tmp_path / "out"), *flags])


@pytest.fixture(scope="module")
def base_package(oneshot, tmp_path_factory):
    """One fp16 conversion (iOS18, which holds every compression) that the compression tests start from."""
    return convert_pytorch_to_coreml(oneshot, input_format=network("OneShot").INPUT_FORMAT, image_size=SMALL,
                                     class_names=CLASSES, deployment_target="iOS18",
                                     output=tmp_path_factory.mktemp("base") / "base.mlpackage")


@pytest.fixture(scope="module")
def compressed(base_package, tmp_path_factory):
    """compressed(compression): the base package with its weights compressed, saved as a package of its own, as
    (path, MLModel); each compression made once (palettize4 serves two tests)."""
    made = {}

    def make(compression: str):
        if compression not in made:
            mlmodel = compress_coreml(import_coremltools().models.MLModel(str(base_package), skip_model_load=True),
                                      compression)
            mlmodel.user_defined_metadata["compression"] = compression
            path = tmp_path_factory.mktemp(compression) / f"{compression}.mlpackage"
            mlmodel.save(str(path))
            made[compression] = path, mlmodel
        return made[compression]

    return make


def test_coreml_compression_command_line(weights, tmp_path, capsys):
    """A compression through the command line: the compressed program is evaluated on Linux (its dequantization
    ops included), its agreement and KL are reported, its deployment target is in the package."""
    output = tmp_path / "out.mlpackage"
    assert run_export(network("OneShot"), ["--weights", str(weights), "--output", str(output), "--compress",
                                           "int8", "--min-agreement", "0.5",
                                           "--results-json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement" in printed and "mean KL divergence" in printed
    program = MLProgram(output)
    assert program.compression == "int8" and program.operation_counts["constexpr_affine_dequantize"] >= 50
    metadata = import_coremltools().models.MLModel(str(output), skip_model_load=True).user_defined_metadata
    assert metadata["minimum_deployment_target"].startswith("iOS16")
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["deployment_target"] == "iOS16" and 0.5 <= result["top1_agreement"] <= 1
    assert result["mean_kl"] > 0 and result["bytes"] < 4.5e6  # fp16 weights alone are 6.9 MB


@pytest.mark.parametrize("compression, operation, target", [
    ("int8", "constexpr_blockwise_shift_scale", "iOS16"),  # iOS18's form of int8 weights
    ("palettize4", "constexpr_lut_to_dense", "iOS18"),
    pytest.param("palettize6", "constexpr_lut_to_dense", "iOS16", marks=pytest.mark.slow),
    pytest.param("palettize8", "constexpr_lut_to_dense", "iOS16", marks=pytest.mark.slow),
])
def test_coreml_compression_verified(oneshot, compressed, compression, operation, target):
    """Each other compression, from the one base conversion: the Linux check evaluates the compressed program
    (its palette or dequantization ops included) and reports agreement and KL; the first deployment target
    that holds it is the one the command line states."""
    path, _ = compressed(compression)
    program = MLProgram(path)
    assert program.compression == compression and program.operation_counts[operation] >= 50
    report = verify_coreml(path, oneshot, network("OneShot").INPUT_FORMAT, num_images=16, min_agreement=0.5)
    assert 0.5 <= report.agreement <= 1 and report.mean_kl > 0
    assert check_deployment_target(compression, None) == target
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 4.5e6


def test_deployment_target_too_low_is_a_one_line_error(weights, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export(weights, tmp_path, "--compress", "palettize4", "--deployment-target", "iOS16")
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0 and "\n" not in error
    assert "palettize4 needs --deployment-target iOS18" in error and "iOS16 cannot hold it" in error


def test_broken_palette_is_caught(oneshot, compressed, tmp_path):
    """A palettized package whose stored palettes are reversed in weight.bin: the Linux check rebuilds the
    weights from the palettes, rejects it, and says which way to go."""
    ct = import_coremltools()
    good, mlmodel = compressed("palettize4")
    verify_coreml(good, oneshot, network("OneShot").INPUT_FORMAT, num_images=8, min_agreement=0.5)

    # The palettes (16 entries each) are stored in weight.bin or inline in the program; reverse each one where it
    # is, which maps every weight to another palette entry.
    patched = tmp_path / "patched-weights"
    shutil.copytree(mlmodel.weights_dir, patched)
    spec = mlmodel.get_spec()
    function = spec.mlProgram.functions["main"]
    operations = function.block_specializations[function.opset].operations
    producers = {op.outputs[0].name: op for op in operations}
    reversed_palettes = 0
    for op in operations:
        if op.type != "constexpr_lut_to_dense":
            continue
        argument = op.inputs["lut"].arguments[0]
        value = producers[argument.name].attributes["val"] if argument.name else argument.value
        if value.WhichOneof("value") == "blobFileValue":
            with open(patched / value.blobFileValue.fileName.rsplit("/", 1)[-1], "r+b") as file:
                file.seek(value.blobFileValue.offset)
                _, _, size, data_offset = struct.unpack("<IIQQ", file.read(24))
                file.seek(data_offset)
                palettes = np.frombuffer(file.read(size), dtype=np.float16).reshape(-1, 16)
                file.seek(data_offset)
                file.write(np.ascontiguousarray(palettes[:, ::-1]).tobytes())
        else:
            stored = value.immediateValue.tensor.bytes
            palettes = np.frombuffer(stored.values, dtype=np.float16).reshape(-1, 16)
            stored.values = np.ascontiguousarray(palettes[:, ::-1]).tobytes()
        reversed_palettes += 1
    assert reversed_palettes >= 50
    broken = tmp_path / "broken.mlpackage"
    ct.models.MLModel(spec, weights_dir=str(patched), skip_model_load=True).save(str(broken))
    # Reversed palettes make the activations overflow fp16, or at least change the classes.
    with pytest.raises(ExportVerificationError, match="non-finite outputs|does not match PyTorch") as error:
        verify_coreml(broken, oneshot, network("OneShot").INPUT_FORMAT, num_images=8, min_agreement=0.5)
    assert "more bits" in str(error.value) and "--precision fp32" not in str(error.value)


def test_onnx_int8_agrees_with_fp32(weights, calibration_dir, tmp_path, capsys):
    """Static int8 QDQ calibrated on a folder with an unreadable image (skipped with a line): agrees with fp32 on
    the top-1 class of the verification images (the default gate, 0.9), and its speed is reported beside
    PyTorch's."""
    output = tmp_path / "int8.onnx"
    assert run_export(network("OneShot"), ["--weights", str(weights), "--format", "onnx", "--quantize", "int8",
                                           "--calibration-dir", str(calibration_dir), "--output", str(output),
                                           "--results-json", str(tmp_path / "r.json")]) == 0
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "1 of 24 images could not be read" in captured.out
    assert "calibration: 23 images" in captured.out and "images/s in onnxruntime" in captured.out
    import onnx

    proto = onnx.load(str(output))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "int8" in {p.key: p.value for p in proto.metadata_props}["quantization"]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["top1_agreement"] >= 0.9 and result["verify_clear_images"] >= 8
    assert output.stat().st_size < 0.4 * 4 * 3.5e6


def test_calibration_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match="no images"):
        load_calibration_images(empty, SMALL)
    (empty / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(Exception, match="none of its 1 images could be read"):
        load_calibration_images(empty, SMALL)


def test_quantize_needs_calibration_images(weights, tmp_path, capsys):
    with pytest.raises(SystemExit):
        export(weights, tmp_path, "--format", "onnx", "--quantize", "int8")
    assert "--quantize int8 needs --calibration-dir" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [
    [],
    ["--quantize", "int8"],
], ids=["fp32", "int8"])
def test_executorch_runtime(weights, calibration_dir, oneshot, tmp_path, capsys, quantize):
    """The .pte runs in the ExecuTorch runtime: fp32 within 1e-4 of the logit range, int8 agreeing on top-1."""
    output = tmp_path / "oneshot.pte"
    assert run_export(network("OneShot"), ["--weights", str(weights), "--format", "executorch", "--output",
                                           str(output), "--calibration-dir", str(calibration_dir), *quantize]) == 0
    assert "images/s in the ExecuTorch runtime" in capsys.readouterr().out
    from common.executorch_export import ExecuTorchProgram

    images = make_test_images(3, SMALL, seed=5)
    logits = ExecuTorchProgram(output).logits(images)
    expected = reference_logits(oneshot, network("OneShot").INPUT_FORMAT, images)
    if quantize:
        assert (logits.argmax(1) == expected.argmax(1)).mean() >= 2 / 3
    else:
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4 * np.ptp(expected))
    # An app reads the labels and the input the program expects from the program itself, as from an ONNX file.
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(output))
    said = {name: program.load_method(name).execute([])[0] for name in ("class_names", "image_size", "input_format")}
    assert json.loads(said["class_names"]) == CLASSES and said["image_size"] == str(SMALL)
    assert json.loads(said["input_format"])["channel_order"] == "BGR"
    # The runtime's C++ code logs what it found of the CPU straight to stderr (five lines on loading a program in
    # a new process): none of it reaches the user.
    code = f"from common.executorch_export import ExecuTorchProgram; ExecuTorchProgram({str(output)!r})"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and loaded.stderr == "", loaded.stderr


def test_fp16_judge_ignores_near_ties():
    """An untrained network's logits tied to 1e-7: fp16 cannot order them, so the judge leaves those images out
    (and says so) rather than failing the export and blaming the input format."""
    reference = np.array([[0.1, 0.1 + 1e-7, 0.05], [2.0, 0.0, 1.0]])
    candidate = np.array([[0.1 + 1e-4, 0.1, 0.05], [2.001, 0.0, 1.0]])
    report = judge(reference, candidate, candidate.argmax(1), precision="fp16", target="t", method="m")
    assert report.clear_images == 1 and report.top1_agreement == 1
    assert "1 of 2 images left out" in report.summary()
    tied = judge(reference[:1], candidate[:1], [0], precision="fp16", target="t", method="m")
    assert tied.clear_images == 0
    with pytest.raises(ExportVerificationError, match="fp16 rounding size: export with --precision fp32") as error:
        judge(np.array([[2.0, 0.0, 1.9]]), np.array([[1.95, 0.0, 1.96]]), [2], precision="fp16", target="t",
              method="m")
    assert "input format" not in str(error.value)


def test_untrained_network_fp16_export(tmp_path):
    """The reported case end to end: an untrained OneShot whose classifier makes the logits near-ties converts
    to fp16 and verifies instead of being deleted."""
    net = calibrated_random_network(network("OneShot"), network("OneShot").INPUT_FORMAT, 10, 0, SMALL)
    with torch.no_grad():
        net.classifier[0].weight.mul_(1e-6)
    package = convert_pytorch_to_coreml(net, input_format=network("OneShot").INPUT_FORMAT, image_size=SMALL,
                                        class_names=CLASSES, output=tmp_path / "untrained.mlpackage")
    report = verify_coreml(package, net, network("OneShot").INPUT_FORMAT, num_images=2)
    assert report.clear_images < report.images


def test_sweep_command_and_table():
    """The sweep passes each entry the user's flags but sets format, precision and output itself, and tabulates
    failures as well as measurements."""
    argv = ["--weights", "w.pth", "--sweep", "--format", "onnx", "--val-dir=v", "--output", "o", "--image-size",
            "64", "--min-agreement", "0.5"]
    assert _forwarded_flags(argv) == ["--weights", "w.pth", "--val-dir=v", "--image-size", "64"]
    rows = [{"name": "ONNX int8", "bytes": 3.6e6, "top1_agreement": 0.95, "verify_clear_images": 20,
             "mean_kl": 0.004, "export_seconds": 12.0, "peak_memory_mb": 900.0, "export_images_per_s": 80.0,
             "pytorch_images_per_s": 40.0, "export_top1": 0.7, "export_top5": 0.9, "pytorch_top1": 0.71,
             "pytorch_top5": 0.9},
            {"name": "Core ML palettize4", "error": "exit status 2"},
            {"name": "ONNX fp32", "bytes": 1e7, "export_seconds": 7.0, "export_images_per_s": 1020.8,
             "pytorch_images_per_s": 103.9}]
    table = sweep_table(rows).splitlines()
    assert table[0].startswith("| format | MB | top-1 agreement | mean KL | top-1 / top-5")
    assert ("| ONNX int8 | 3.6 | 95% of 20 | 0.004 | 70.0% / 90.0% (71.0% / 90.0%) | 12 | 900 | 80 (40, 2.00x) |"
            in table)
    assert table[3].startswith("| Core ML palettize4 | failed: exit status 2 |")
    assert table[4].endswith("| 1021 (104, 9.82x) |")  # not 1.02e+03


def test_mean_kl_divergence_is_the_divergence_and_never_below_zero():
    p, q = np.array([[0.0, 0.0]]), np.array([[np.log(3.0), 0.0]])
    expected = 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)
    assert mean_kl_divergence(p, q) == pytest.approx(expected, rel=1e-12)
    assert mean_kl_divergence(p, p) == 0
    # Logits 300 apart: summed in float64, the KL of these two sums to -2.9e-45 without the clamp.
    reference = np.array([[-130.803, -121.440, 39.314, 74.856, -46.093, 200.950, 99.267, -109.158, 98.111, -54.342]])
    candidate = np.array([[-130.410, -121.516, 38.877, 75.387, -46.586, 200.567, 99.218, -108.471, 98.002, -55.614]])
    assert mean_kl_divergence(reference, candidate) >= 0


def test_an_export_that_fails_verification_leaves_nothing_and_exits_1(oneshot, tmp_path, capsys):
    """A failure found during the work ends with status 1, not the 2 of a command refused before any work, and
    leaves no file at --output: logits beyond fp16's range (65504) overflow an fp16 Core ML program."""
    state = {k: v.contiguous() for k, v in oneshot.state_dict().items()}
    state["classifier.0.weight"] = state["classifier.0.weight"] * 1e5
    weights = tmp_path / "huge_logits.safetensors"
    save_file(state, str(weights), metadata={RELEASE_METADATA_KEY: json.dumps({"classes": CLASSES,
                                                                                "image_size": SMALL})})
    with pytest.raises(SystemExit) as stopped:
        run_export(network("OneShot"), ["--weights", str(weights), "--output", str(tmp_path / "out.mlpackage")])
    assert stopped.value.code == 1
    err = capsys.readouterr().err  # coremltools' progress bars, then the one line
    assert err.endswith("\nerror: out.mlpackage gives non-finite outputs (fp16): an overflow; try --precision fp32\n")
    assert "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == [weights]
