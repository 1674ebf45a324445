"""Evaluation: released files through each folder's eval.py, the fast path against the plain one, the evaluation
loop's metrics, result files, ImageNet class matching, the OpenCV XML mean image, and one-line errors."""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import REPO_ROOT, SHARED, network, released_state_dict, script_module
from torch import nn

from common.checkpoint import get_training_state
from common.counting import count_macs
from common.data import EvalTransform
from common.demo_data import DEMO_CLASSES, make_image_folder
from common.export import run_export
from common.evaluate import build_parser, evaluate
from common.imagenet import ClassMapError, class_to_index_for, imagenet_names, imagenet_wnids
from common.inference import InferenceModel, InferenceRunner, fold_batchnorm, prepare_inference_model
from common.input_format import InputFormat, MeanImageError, Preprocess, read_opencv_mean_image
from common.layers import ConvBNReLU
from common.model_state import load_model_state

MODELS = ("OneShot", "ShuffleNetV2.Large", "ShuffleNetV2.ExLarge")
WNIDS = imagenet_wnids()
RESULT_SCHEMA = {
    "model": str, "weights": str, "weights_sha256": str, "ema": bool, "val_dir": str,
    "num_val_images": (int, type(None)), "class_map": (str, type(None)), "params": int, "macs": int, "image_size": int,
    "input_format": dict, "top1_accuracy": float, "top5_accuracy": float, "top1_error": float,
    "top5_error": float, "loss": float, "images": int, "skipped": int, "images_per_second": float, "device": str,
    "amp": (str, type(None)), "channels_last": bool, "compile": bool, "fast": bool, "published": (dict, type(None)),
    "versions": dict,
    "time": str,
}


# -- helpers --------------------------------------------------------------------------------------------------------

def eval_script(model: str):
    """A folder's eval.py as a module; its `import network` gets that folder's network.py."""
    return script_module(model, "eval")


def run_script(model: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "eval.py", *args], cwd=REPO_ROOT / model, capture_output=True,
                          text=True, timeout=300)


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def expect_user_error(capsys, main, argv: list[str]) -> str:
    """Run an eval.py main in-process; it must exit with status 2 and one `error:` line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return one_line_error(capsys.readouterr().err)


def without_side_heads(state: dict) -> dict:
    return {key: value for key, value in state.items() if not key.startswith("predict_")}


def write_opencv_mean_xml(path: Path, image: np.ndarray) -> None:
    """Write an H x W x C float32 image as OpenCV FileStorage does for the original mean file."""
    rows, cols, channels = image.shape

    def number(value: float) -> str:  # OpenCV writes three-digit exponents: 1.14421082e+002
        mantissa, exponent = f"{value:.8e}".split("e")
        return f"{mantissa}e{int(exponent):+04d}"

    values = [number(v) for v in image.astype(np.float32).reshape(-1).tolist()]
    lines = ["    " + " ".join(values[i:i + 4]) for i in range(0, len(values), 4)]
    path.write_text(f'<?xml version="1.0"?>\n<opencv_storage>\n<Channel>{channels}</Channel>\n<Row>{rows}</Row>\n'
                    f'<Col>{cols}</Col>\n<MeanImg type_id="opencv-matrix">\n  <rows>1</rows>\n'
                    f'  <cols>{image.size}</cols>\n  <dt>f</dt>\n  <data>\n' + "\n".join(lines)
                    + "</data></MeanImg>\n</opencv_storage>\n")


@pytest.fixture(scope="module")
def wnid_folder(tmp_path_factory) -> Path:
    """Generated JPEGs (3 classes x 4 of 72 x 72) under the ImageNet wnid folders of outputs 0, 7 and 999."""
    root = make_image_folder(tmp_path_factory.mktemp("wnid_val"), num_classes=3, images_per_class=4, size=72)
    for folder, wnid in zip(sorted(root.iterdir()), (WNIDS[0], WNIDS[7], WNIDS[999])):
        folder.rename(root / wnid)
    return root


@pytest.fixture(scope="module")
def oneshot_eval():
    return eval_script("OneShot")


@pytest.fixture(scope="module")
def oneshot_file(tmp_path_factory) -> Path:
    """A released-layout OneShot file: a 2019 pickle (not a zip archive) of {'state_dict': module.-prefixed}."""
    path = tmp_path_factory.mktemp("weights") / "oneshot.pth.tar"
    state = {"module." + key: value for key, value in released_state_dict("OneShot").items()}
    torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=False)
    return path


@pytest.fixture(scope="module")
def oneshot_reference(oneshot_eval, oneshot_file, wnid_folder) -> dict:
    """The results of `oneshot_file` on 4 images, and the arguments (less --weights) that gave them."""
    argv = ["--val-dir", str(wnid_folder), "--image-size", "64", "--workers", "0", "--limit", "4"]
    return {"argv": argv, "results": oneshot_eval.main(["--weights", str(oneshot_file), *argv])}


# -- released files through the folders' eval.py --------------------------------------------------------------------

@pytest.fixture(scope="module", params=MODELS)
def released(request) -> tuple[str, dict]:
    """(model, a state dict laid out like its released file); one model at a time: ExLarge's is 1.1 GB."""
    return request.param, released_state_dict(request.param)


def test_released_layout_file_evaluates_through_the_folders_eval_script(released, wnid_folder, tmp_path, capsys):
    model, state = released
    # Layouts of the 2019 files: OneShot as {'state_dict'} with the DataParallel prefix in a legacy pickle (through
    # the real script); Large as a flat legacy pickle without side heads, as snetv2_residual_se.pkl; ExLarge flat,
    # without side heads, in the zip format. SE weights under both names.
    weights = tmp_path / "released.pth"
    if model == "OneShot":
        torch.save({"state_dict": {"module." + key: value for key, value in state.items()}}, weights,
                   _use_new_zipfile_serialization=False)
    else:
        torch.save(without_side_heads(state), weights,
                   _use_new_zipfile_serialization=model == "ShuffleNetV2.ExLarge")
    results = tmp_path / "results.json"
    # One batch for the large models: each of their forward calls costs seconds on a CPU, however small the images.
    argv = ["--weights", str(weights), "--val-dir", str(wnid_folder), "--image-size", "32", "--workers", "0",
            "--batch-size", "5" if model == "OneShot" else "12", "--results-json", str(results)]
    if model == "OneShot":
        completed = run_script(model, *argv)
        assert completed.returncode == 0, completed.stderr
        output = completed.stdout
    else:
        eval_script(model).main(argv)
        output = capsys.readouterr().out
    # The published figures are of all 1000 classes, not of these 3 (test_published_errors_only_beside_imagenet).
    assert output.count(" * Acc@1") == 1 and "published error" not in output
    record = json.loads(results.read_text())
    assert record["model"] == model and record["images"] == 12 and record["image_size"] == 32
    assert record["published"] is None
    input_format = network(model).INPUT_FORMAT
    assert record["input_format"] == json.loads(json.dumps({**input_format.to_dict(),
                                                            "description": input_format.describe()}))
    assert math.isfinite(record["loss"]) and record["images_per_second"] > 0


def test_fast_path_equals_the_plain_path(released):
    model, state = released
    torch.manual_seed(0)
    net = network(model).create_network()
    load_model_state(net, state, for_inference=True)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    input_format = network(model).INPUT_FORMAT
    # float32, as eval.py's default --amp none: on a CPU with native bf16 "auto" may choose bf16, which cannot match.
    runner = prepare_inference_model(net, input_format=input_format, device="cpu", image_size=64, amp="none")
    assert not any(isinstance(module, nn.BatchNorm2d) for module in runner.model.network.modules())
    fast = runner(images)
    plain = prepare_inference_model(net, input_format=input_format, device="cpu", fold_bn=False,
                                    channels_last=False)(images)
    assert fast.dtype == plain.dtype == torch.float32
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4 * plain.abs().max().item())


def test_fixed_batch_pads_short_batches_and_drops_their_logits(released):
    """A compiled runner pads a short last batch to the first batch's size, so it never recompiles."""
    model, state = released
    net = network(model).create_network()
    load_model_state(net, state, for_inference=True)
    inner = InferenceModel(fold_batchnorm(net), Preprocess(network(model).INPUT_FORMAT))
    seen = []
    inner.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    padded, plain = InferenceRunner(inner, "cpu", fixed_batch=True), InferenceRunner(inner, "cpu")
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    padded(images)
    short = padded(images[:1])
    assert seen == [3, 3] and short.shape == (1, 1000)
    torch.testing.assert_close(short, plain(images[:1]), rtol=1e-4, atol=1e-4 * short.abs().max().item())


# -- BatchNorm folding ----------------------------------------------------------------------------------------------

def _randomise_batchnorm(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(module.num_features, generator=generator))
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator))


class ConvUsedTwice(nn.Module):
    """A conv whose output feeds its BN and also the output: folding the BN would change the second use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class SequentialUsedTwice(nn.Sequential):
    """A Sequential subclass with its own forward, which also uses its conv output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self[0](x)
        return self[1](y) * y


def test_fold_batchnorm_folds_sequential_and_unit_pairs_only_and_copies():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          ConvBNReLU(8, 8, 3, groups=4, bn_eps=1e-9), nn.BatchNorm2d(8), ConvUsedTwice(),
                          SequentialUsedTwice(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)))
    _randomise_batchnorm(model)
    model.train()
    original = copy.deepcopy(model.state_dict())
    folded = fold_batchnorm(model)
    # Folded: the Sequential pair and the unit's pair. Kept: a BN after a non-conv, and the convs used twice.
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[3].bn, nn.Identity)
    assert isinstance(folded[4], nn.BatchNorm2d) and isinstance(folded[5].bn, nn.BatchNorm2d)
    assert isinstance(folded[6][1], nn.BatchNorm2d)
    assert not folded.training and model.training
    assert all(torch.equal(value, original[key]) for key, value in model.state_dict().items())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-5)


# -- the evaluation loop --------------------------------------------------------------------------------------------

class LookupNetwork(nn.Module):
    """Returns the logits stored for each image; an image carries its sample number in its first pixel."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0, 0, 0].round().long()]


def test_evaluate_counts_topk_loss_and_skipped_images_and_restores_the_mode():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 7, generator=generator)
    labels = torch.randint(0, 7, (10,), generator=generator)
    images = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(10, dtype=torch.uint8)
    # Three batches; the last lost one undecodable image, the second was entirely undecodable.
    loader = [(images[:6], labels[:6], 0, torch.arange(6)), (images[:0], labels[:0], 2, torch.arange(0)),
              (images[6:], labels[6:], 1, torch.arange(6, 10))]
    model = LookupNetwork(logits).train()
    identity = Preprocess(InputFormat(channel_order="RGB"))
    results = evaluate(model, identity, loader, device="cpu", progress=False, keep_predictions=True)
    assert model.training
    top5 = logits.topk(5, dim=1).indices
    assert results["top1_accuracy"] == pytest.approx(100 * (top5[:, 0] == labels).float().mean().item())
    assert results["top5_accuracy"] == pytest.approx(100 * (top5 == labels[:, None]).any(1).float().mean().item())
    assert results["top1_error"] == pytest.approx(100 - results["top1_accuracy"])
    assert results["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    assert (results["images"], results["skipped"]) == (10, 3)
    predictions = results["predictions"]
    assert torch.equal(predictions["top_classes"], top5) and torch.equal(predictions["labels"], labels)
    torch.testing.assert_close(predictions["top_probs"], logits.softmax(1).topk(5, dim=1).values)


def test_evaluate_with_fewer_than_five_classes_counts_top5_over_all():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 2.0, 1.0]])
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    images[1, 0, 0, 0] = 1
    loader = [(images, torch.tensor([1, 0]), 0, torch.arange(2))]
    results = evaluate(LookupNetwork(logits), Preprocess(InputFormat(channel_order="RGB")), loader, device="cpu",
                       progress=False)
    assert (results["top1_accuracy"], results["top5_accuracy"]) == (50.0, 100.0)


# -- eval.py in-process: layouts, result files, options -------------------------------------------------------------

def test_results_json_schema_and_predictions_csv(oneshot_eval, oneshot_file, wnid_folder, tmp_path):
    results_path, predictions_path = tmp_path / "results.json", tmp_path / "predictions.csv"
    results = oneshot_eval.main(["--weights", str(oneshot_file), "--val-dir", str(wnid_folder), "--image-size", "64",
                                 "--workers", "0", "--limit", "5", "--results-json", str(results_path),
                                 "--predictions-csv", str(predictions_path)])
    record = json.loads(results_path.read_text())
    assert set(record) == set(RESULT_SCHEMA)
    for key, kind in RESULT_SCHEMA.items():
        assert isinstance(record[key], kind), (key, record[key])
    assert set(record["versions"]) == {"python", "torch", "torchvision", "numpy"}
    assert record["weights_sha256"] == hashlib.sha256(oneshot_file.read_bytes()).hexdigest()
    assert record["images"] == results["images"] == 5
    assert (record["ema"], record["val_dir"], record["num_val_images"], record["class_map"]) == (
        False, str(wnid_folder), 5, None)
    assert record["params"] == network("OneShot").PUBLISHED["params"]
    assert record["macs"] == count_macs(network("OneShot").create_network(), 64)
    assert record["input_format"]["description"] == "BGR 0..255"
    assert record["fast"] is True and record["amp"] is None

    with open(predictions_path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 5
    expected_columns = ["path", "label", "label_name"] + [f"top{k}_{field}" for k in range(1, 6)
                                                          for field in ("index", "name", "prob")]
    assert list(rows[0]) == expected_columns
    names = imagenet_names()
    for row in rows:
        folder = Path(row["path"]).parent.name
        assert int(row["label"]) == WNIDS.index(folder) and row["label_name"] == names[int(row["label"])]
        probs = [float(row[f"top{k}_prob"]) for k in range(1, 6)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert row["top1_name"] == names[int(row["top1_index"])]
    # --limit takes the first images of the fixed order: the same images every time.
    again = tmp_path / "again.csv"
    oneshot_eval.main(["--weights", str(oneshot_file), "--val-dir", str(wnid_folder), "--image-size", "64",
                       "--workers", "0", "--limit", "5", "--batch-size", "2", "--no-fast",
                       "--predictions-csv", str(again)])
    with open(again, newline="") as file:
        assert [row["path"] for row in csv.DictReader(file)] == [row["path"] for row in rows]


@pytest.mark.slow
def test_under_two_gloo_ranks_each_evaluates_half_and_rank_0_reports_the_whole(oneshot_file, wnid_folder, tmp_path):
    """torchrun eval.py: one summary line, one progress bar, and the result files of one process."""
    from test_train import free_port

    common = ["eval.py", "--weights", str(oneshot_file), "--val-dir", str(wnid_folder), "--image-size", "64",
              "--workers", "0", "--batch-size", "2", "--device", "cpu"]
    outputs = {}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                                                   "--master_port", str(free_port())])):
        files = ["--results-json", str(tmp_path / f"{name}.json"), "--predictions-csv", str(tmp_path / f"{name}.csv")]
        result = subprocess.run([sys.executable, *launcher, *common, *files], cwd=REPO_ROOT / "OneShot",
                                capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr
        # One bar: it starts once at 0%. A bar redrawn at its last image prints 100% twice (when it closes too).
        assert result.stdout.count(" * Acc@1") == 1 and result.stderr.count("eval:   0%") == 1
        assert "eval: 100%" in result.stderr
        outputs[name] = result
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert one["images"] == two["images"] == 12 and two["device"] == "2 x cpu"
    assert (one["top1_error"], one["top5_error"]) == (two["top1_error"], two["top5_error"])
    assert math.isclose(one["loss"], two["loss"], rel_tol=1e-5)
    rows = {name: list(csv.reader(open(tmp_path / f"{name}.csv"))) for name in ("one", "two")}
    assert [row[:6] for row in rows["one"]] == [row[:6] for row in rows["two"]] and len(rows["two"]) == 13


@pytest.mark.parametrize("layout", ["flat", "state_dict_module_prefix_zip", "no_num_batches_tracked",
                                    "safetensors"])
def test_oneshot_file_layouts_give_the_same_results(layout, oneshot_eval, oneshot_reference, tmp_path):
    state = released_state_dict("OneShot")
    path = tmp_path / "weights.pth"
    if layout == "flat":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif layout == "state_dict_module_prefix_zip":
        torch.save({"state_dict": {"module." + key: value for key, value in state.items()}}, path)
    elif layout == "no_num_batches_tracked":
        torch.save({key: value for key, value in state.items() if "num_batches_tracked" not in key}, path)
    else:
        path = tmp_path / "weights.safetensors"
        safetensors.torch.save_file({key: value.contiguous() for key, value in state.items()}, path)
    results = oneshot_eval.main(["--eval-resume", str(path), *oneshot_reference["argv"]])
    reference = oneshot_reference["results"]
    assert results["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert results["top5_accuracy"] == reference["top5_accuracy"]


def test_a_checkpoint_of_this_project_is_evaluated_on_its_own_classes_and_size(oneshot_eval, image_folder, tmp_path,
                                                                              capsys):
    classes = list(DEMO_CLASSES[:3])
    torch.manual_seed(0)
    model = network("OneShot").create_network(len(classes))
    input_format = InputFormat(channel_order="RGB", mean=(120.0, 110.0, 100.0))
    metadata = {"arch": "OneShot", "classes": classes, "num_classes": len(classes), "image_size": 32,
                "input_format": input_format.to_dict()}
    path = tmp_path / "checkpoint-0000000100.pth"
    torch.save(get_training_state(model, iteration=100, metadata=metadata), path)
    results_path = tmp_path / "results.json"
    oneshot_eval.main(["--weights", str(path), "--val-dir", str(image_folder), "--workers", "0",
                       "--results-json", str(results_path)])
    record = json.loads(results_path.read_text())
    assert record["image_size"] == 32 and record["published"] is None and record["images"] == 24
    assert record["input_format"]["channel_order"] == "RGB" and record["input_format"]["mean"] == [120, 110, 100]
    assert "published error" not in capsys.readouterr().out

    # A val folder with a class the checkpoint never saw.
    other = make_image_folder(tmp_path / "other", num_classes=4, images_per_class=1, size=40)
    error = expect_user_error(capsys, oneshot_eval.main, ["--weights", str(path), "--val-dir", str(other)])
    assert "yellow_ring" in error and "3 classes the weights were trained on" in error


def test_val_folders_not_named_by_wnid_need_a_class_map(oneshot_eval, oneshot_file, image_folder, tmp_path, capsys):
    argv = ["--weights", str(oneshot_file), "--val-dir", str(image_folder), "--image-size", "64", "--workers", "0"]
    error = expect_user_error(capsys, oneshot_eval.main, argv)
    assert "red_disc" in error and "not ImageNet wnids" in error and "--class-map" in error
    class_map = tmp_path / "classes.txt"
    class_map.write_text(f"# folder  output\nred_disc 5\ngreen_square {WNIDS[7]}\n\nblue_triangle 999\n")
    predictions = tmp_path / "predictions.csv"
    oneshot_eval.main([*argv, "--class-map", str(class_map), "--predictions-csv", str(predictions)])
    with open(predictions, newline="") as file:
        labels = {Path(row["path"]).parent.name: int(row["label"]) for row in csv.DictReader(file)}
    assert labels == {"red_disc": 5, "green_square": 7, "blue_triangle": 999}


def test_mean_image_option_reads_the_xml_and_reports_it(oneshot_eval, oneshot_file, wnid_folder, tmp_path):
    mean = np.full((8, 8, 3), 100.0, dtype=np.float32)
    write_opencv_mean_xml(tmp_path / "mean.xml", mean)
    results_path = tmp_path / "results.json"
    oneshot_eval.main(["--weights", str(oneshot_file), "--val-dir", str(wnid_folder), "--image-size", "64",
                       "--workers", "0", "--limit", "2", "--mean-image", str(tmp_path / "mean.xml"),
                       "--results-json", str(results_path)])
    described = json.loads(results_path.read_text())["input_format"]
    assert described["mean_image"] == str(tmp_path / "mean.xml") and "mean.xml" in described["description"]


def test_every_flag_has_help(oneshot_eval, capsys):
    parser = build_parser("OneShot")
    assert all(action.help for action in parser._actions)
    with pytest.raises(SystemExit) as exit_info:
        oneshot_eval.main(["--help"])
    assert exit_info.value.code == 0 and "--eval-resume" in capsys.readouterr().out


# -- one-line errors ------------------------------------------------------------------------------------------------

def test_wrong_model_file_fails_with_one_line_through_the_script(oneshot_file, wnid_folder):
    completed = run_script("ShuffleNetV2.Large", "--weights", str(oneshot_file), "--val-dir", str(wnid_folder),
                           "--workers", "0")
    assert completed.returncode == 2
    assert "a OneShot state dict with 1000 classes" in one_line_error(completed.stderr)


def test_a_checkpoint_of_another_model_is_named(oneshot_eval, wnid_folder, tmp_path, capsys):
    path = tmp_path / "large.pth"
    torch.save({"format": "shufflenet-series/training-checkpoint/1", "iteration": 1, "model": {},
                "metadata": {"arch": "ShuffleNetV2.Large"}}, path)
    error = expect_user_error(capsys, oneshot_eval.main, ["--weights", str(path), "--val-dir", str(wnid_folder)])
    assert "ShuffleNetV2.Large/eval.py" in error


def test_a_val_folder_of_undecodable_images_reports_and_writes_nothing(oneshot_eval, oneshot_file, tmp_path, capsys):
    for wnid in WNIDS[:2]:
        (tmp_path / "val" / wnid).mkdir(parents=True)
        (tmp_path / "val" / wnid / "broken.jpg").write_bytes(b"not a JPEG")
    results = tmp_path / "results.json"
    with pytest.raises(SystemExit) as stop:
        oneshot_eval.main(["--weights", str(oneshot_file), "--val-dir", str(tmp_path / "val"), "--workers", "0",
                           "--results-json", str(results)])
    assert stop.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --val-dir") and "none of its 2 image(s) could be decoded" in error
    assert not results.exists()


@pytest.mark.parametrize("case", ["missing_weights", "weights_folder", "missing_val_dir", "missing_mean_image",
                                  "garbage_mean_image", "bad_class_map_line", "class_map_index_out_of_range",
                                  "small_image_size", "bad_limit"])
def test_bad_inputs_give_one_line_errors(case, oneshot_eval, oneshot_file, wnid_folder, tmp_path, capsys):
    """One line, and no folder for --results-json made: a refused command leaves nothing behind."""
    argv = {"--weights": str(oneshot_file), "--val-dir": str(wnid_folder), "--workers": "0",
            "--results-json": str(tmp_path / "out" / "results.json")}
    expected = {"missing_weights": "no such file", "weights_folder": "is a folder",
                "missing_val_dir": "--val-dir", "missing_mean_image": "--mean-image",
                "garbage_mean_image": "cannot read it as an OpenCV XML mean image",
                "bad_class_map_line": "line 2", "class_map_index_out_of_range": "index 1000 is out of range",
                "small_image_size": "--image-size 16", "bad_limit": "--limit 0"}[case]
    class_map = tmp_path / "classes.txt"
    if case == "missing_weights":
        argv["--weights"] = str(tmp_path / "nothing.pth")
    elif case == "weights_folder":
        argv["--weights"] = str(tmp_path)
    elif case == "missing_val_dir":
        argv["--val-dir"] = str(tmp_path / "no_val")
    elif case == "missing_mean_image":
        argv["--mean-image"] = str(tmp_path / "mean.xml")
    elif case == "garbage_mean_image":
        (tmp_path / "mean.xml").write_text("not XML\n")
        argv["--mean-image"] = str(tmp_path / "mean.xml")
    elif case == "bad_class_map_line":
        class_map.write_text(f"{WNIDS[0]} 0\njust_a_folder\n")
        argv["--class-map"] = str(class_map)
    elif case == "class_map_index_out_of_range":
        class_map.write_text(f"{WNIDS[0]} 1000\n")
        argv["--class-map"] = str(class_map)
    elif case == "small_image_size":
        argv["--image-size"] = "16"
    else:
        argv["--limit"] = "0"
    error = expect_user_error(capsys, oneshot_eval.main, [item for pair in argv.items() for item in pair])
    assert expected in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [["--mean", "nan", "0", "0"], ["--std", "1", "inf", "1"]])
def test_a_mean_or_std_that_is_not_a_finite_number_is_one_line(flags, oneshot_eval, oneshot_file, wnid_folder,
                                                                tmp_path, capsys):
    argv = ["--weights", str(oneshot_file), "--val-dir", str(wnid_folder), "--workers", "0", "--results-json",
            str(tmp_path / "out" / "results.json"), *flags]
    assert "must be finite numbers" in expect_user_error(capsys, oneshot_eval.main, argv)
    assert not (tmp_path / "out").exists()


# -- ImageNet classes -----------------------------------------------------------------------------------------------

def test_imagenet_classes_come_from_timm_in_sorted_wnid_order():
    assert len(WNIDS) == 1000 and WNIDS == sorted(WNIDS) and WNIDS[0] == "n01440764"
    assert imagenet_names()[0].startswith("tench")


def test_class_to_index_covers_every_output_once():
    mapping = class_to_index_for([WNIDS[3], WNIDS[1]], WNIDS)
    assert mapping[WNIDS[3]] == 3 and sorted(mapping.values()) == list(range(1000))


def test_class_map_conflicts_are_refused(tmp_path):
    class_map = tmp_path / "map.txt"
    class_map.write_text("a 3\nb 3\n")
    with pytest.raises(ClassMapError, match="both stand for output 3"):
        class_to_index_for(["a", "b"], WNIDS, class_map)
    class_map.write_text("a 3\na 4\n")
    with pytest.raises(ClassMapError, match="mapped twice"):
        class_to_index_for(["a"], WNIDS, class_map)
    # A folder named like one wnid may stand for another output: that wnid's own output gets a placeholder.
    class_map.write_text(f"{WNIDS[0]} 1\n")
    mapping = class_to_index_for([WNIDS[0]], WNIDS, class_map)
    assert mapping[WNIDS[0]] == 1 and sorted(mapping.values()) == list(range(1000))


# -- image size and the OpenCV XML mean image -----------------------------------------------------------------------

@pytest.mark.parametrize("crop, resize", [(224, 256), (64, 73), (96, 110), (288, 329), (320, 366)])
def test_image_size_keeps_the_256_to_224_resize_ratio(crop, resize, oneshot_eval, oneshot_file, wnid_folder, capsys):
    transform = EvalTransform(crop)
    assert transform.resize_size == resize
    # An 80 x 120 image: the short side becomes `resize`, the long one int(resize * 1.5 + 0.5), then the crop.
    assert transform(torch.zeros(3, 80, 120, dtype=torch.uint8)).shape == (3, crop, crop)
    if crop == 96:
        oneshot_eval.main(["--weights", str(oneshot_file), "--val-dir", str(wnid_folder), "--image-size", "96",
                           "--workers", "0", "--limit", "1"])
        assert "96px center crop of a 110px short side" in capsys.readouterr().out


def test_mean_image_xml_parser_reads_the_opencv_format_exactly(tmp_path):
    generator = np.random.default_rng(0)
    image = (generator.uniform(90, 130, size=(5, 7, 3))).astype(np.float32)
    path = tmp_path / "mean.xml"
    write_opencv_mean_xml(path, image)
    parsed = read_opencv_mean_image(path)
    assert parsed.dtype == np.float32 and parsed.shape == (5, 7, 3)
    assert np.array_equal(parsed, image)

    # Preprocess subtracts it per pixel, BGR mean from BGR pixels, and in RGB order for an RGB network.
    pixels = torch.randint(0, 256, (1, 3, 5, 7), dtype=torch.uint8)
    bgr = Preprocess(InputFormat(channel_order="BGR", mean_image=str(path)))(pixels)
    expected = pixels.float().flip(1) - torch.from_numpy(image).permute(2, 0, 1)
    torch.testing.assert_close(bgr, expected)
    rgb = Preprocess(InputFormat(channel_order="RGB", mean_image=str(path)))(pixels)
    torch.testing.assert_close(rgb, expected.flip(1))


@pytest.mark.parametrize("damage, message", [
    (lambda text: text.replace("<Row>5</Row>", "<Row>6</Row>"), "105 values, but Channel x Row x Col"),
    (lambda text: text.replace("<Channel>3</Channel>\n", ""), "<Channel>"),
    (lambda text: text.replace("<data>", "<data>\n    nine"), "other than numbers"),
    (lambda text: text[: len(text) // 2], "cannot read it"),
])
def test_mean_image_xml_parser_errors_say_what_is_wrong(damage, message, tmp_path):
    path = tmp_path / "mean.xml"
    write_opencv_mean_xml(path, np.ones((5, 7, 3), dtype=np.float32))
    path.write_text(damage(path.read_text()))
    with pytest.raises(MeanImageError, match=message):
        read_opencv_mean_image(path)


def test_the_original_mean_image_file_when_present():
    path = SHARED / "data" / "ImageNet_1000_scale224_mean.xml"
    if not path.is_file():
        pytest.skip(f"{path} is not here (it is test data beside the repository, not part of it)")
    mean = read_opencv_mean_image(path)
    assert mean.shape == (224, 224, 3)
    assert [round(float(v), 2) for v in mean.reshape(-1, 3).astype(np.float64).mean(0)] == [103.06, 115.90, 123.15]
    assert (round(float(mean.min()), 2), round(float(mean.max()), 2)) == (95.33, 129.53)


def test_the_progress_bar_ends_at_the_final_accuracy(tmp_path, capsys):
    from common.data import build_eval_loader
    folder = make_image_folder(tmp_path / "val", num_classes=4, images_per_class=6, size=40)
    # 24 images in batches of 2: the bar's running figure is refreshed every tenth batch, the last after batch 10.
    loader = build_eval_loader(folder, crop_size=32, batch_size=2, workers=0)[0]
    torch.manual_seed(0)
    model = network("OneShot").create_network(4)
    results = evaluate(model, Preprocess(model.input_format), loader, device="cpu", progress=True)
    shown = capsys.readouterr().err.rsplit("acc@1 ", 1)[1].split("%")[0]
    assert shown == f"{results['top1_accuracy']:.2f}"


def test_a_nan_or_overflowing_output_is_said_in_words(oneshot_eval, oneshot_file, wnid_folder, tmp_path, capsys):
    """eval.py printed 'loss nan' beside an accuracy that counts arbitrary predictions, with no word on why."""
    state = {key: value.clone() for key, value in released_state_dict("OneShot").items()}
    state["first_conv.1.running_var"][0] = float("nan")
    broken = tmp_path / "broken.pth.tar"
    torch.save({"state_dict": state}, broken)
    argv = ["--val-dir", str(wnid_folder), "--image-size", "64", "--workers", "0", "--limit", "4"]
    results = oneshot_eval.main(["--weights", str(broken), *argv])
    assert math.isnan(results["loss"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "warning: the evaluation loss is nan: the network's outputs on some images are NaN or infinite (huge or NaN "
        "values in the weights or BatchNorm statistics), so the errors above count arbitrary predictions for them")
    oneshot_eval.main(["--weights", str(oneshot_file), *argv])
    assert "warning" not in capsys.readouterr().err


def test_the_number_of_val_images_is_spelled_as_in_export_py():
    from common.evaluate import build_parser

    for spelling in ("--num-val-images", "--limit"):  # --limit: the earlier spelling, still accepted
        args = build_parser("OneShot").parse_args(["--weights", "w.pth", "--val-dir", "val", spelling, "3"])
        assert args.limit == 3


def test_a_plain_state_dict_of_other_classes_has_the_outputs_of_its_classifier(oneshot_eval, image_folder, tmp_path,
                                                                                 capsys):
    """A state dict saved by hand names no classes: its classifier's rows say how many outputs it has (3 here), not
    ImageNet's 1000; eval.py said the weights predicted the 1000 ImageNet classes, and export.py built 1000 outputs
    and refused the file. Its outputs are matched to class folders with --class-map."""
    weights = tmp_path / "three.pth"
    torch.save(network("OneShot").create_network(3).state_dict(), weights)
    argv = ["--weights", str(weights), "--val-dir", str(image_folder), "--image-size", "32", "--workers", "0"]
    error = expect_user_error(capsys, oneshot_eval.main, argv)
    assert "are not among the 3 classes the weights were trained on (output 0, output 1, output 2)" in error
    class_map = tmp_path / "classes.txt"
    class_map.write_text("".join(f"{folder.name} {index}\n"
                                 for index, folder in enumerate(sorted(image_folder.iterdir()))))
    assert oneshot_eval.main([*argv, "--class-map", str(class_map)])["images"] == 24
    output = tmp_path / "three.onnx"
    assert run_export(network("OneShot"), ["--weights", str(weights), "--format", "onnx", "--image-size", "32",
                                           "--output", str(output)]) == 0
    assert output.is_file()
    # export.py has no --class-map: its refusal of such a --val-dir does not offer one.
    with pytest.raises(SystemExit):
        run_export(network("OneShot"), ["--weights", str(weights), "--format", "onnx", "--image-size", "32",
                                        "--output", str(output), "--val-dir", str(image_folder)])
    error = capsys.readouterr().err
    assert "are not among the 3 classes the weights were trained on" in error and "--class-map" not in error
