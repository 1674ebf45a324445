"""Every output path of every script is checked before the work starts, through the scripts.

A folder that cannot be written is a one-line error naming the flag and the path; missing parent folders are
created. Tests run as root, for whom permission bits block nothing, so the unwritable folder is a path through a
regular file: that fails for every user. The scripts' mains run in this process (a subprocess per case costs
seconds of imports each); test_average and test_train run the same scripts as subprocesses.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import average, release
from common.checkpoint import get_training_state
from common.checkpoint_store import save_checkpoint
from common.demo_data import make_image_folder
from common.imagenet import imagenet_wnids
from conftest import REPO_ROOT, network, script_module, user_error_line


@pytest.fixture(scope="module")
def oneshot():
    """OneShot's train.py, eval.py and export.py as modules."""
    return {script: script_module("OneShot", script) for script in ("train", "eval", "export")}


@pytest.fixture(scope="module")
def blocked(tmp_path_factory) -> Path:
    """A regular file: any path under it cannot be created, by root either."""
    path = tmp_path_factory.mktemp("blocked") / "a-file"
    path.write_text("not a folder\n")
    return path


@pytest.fixture(scope="module")
def imagenet_weights(tmp_path_factory) -> Path:
    """A flat OneShot state dict with the 1000 ImageNet outputs, as released files hold (random values)."""
    path = tmp_path_factory.mktemp("weights") / "oneshot.pth"
    torch.save(network("OneShot").create_network(1000).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def wnid_val(tmp_path_factory) -> Path:
    root = make_image_folder(tmp_path_factory.mktemp("val"), num_classes=3, images_per_class=2, size=40)
    for folder, wnid in zip(sorted(root.iterdir()), imagenet_wnids()[:3]):
        folder.rename(root / wnid)
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    model = network("OneShot").create_network(3)
    for iteration in (1, 2):
        save_checkpoint(get_training_state(model, iteration=iteration, metrics={"top1_error": 50.0}), iteration,
                        folder)
    return folder


@pytest.mark.parametrize("flag", ["--results-json", "--predictions-csv"])
def test_eval_refuses_an_unwritable_output_before_evaluating(flag, oneshot, blocked, imagenet_weights, wnid_val,
                                                             capsys):
    line = user_error_line(capsys, oneshot["eval"].main,
                          ["--weights", str(imagenet_weights), "--val-dir", str(wnid_val), "--workers", "0",
                           "--image-size", "32", flag, str(blocked / "out" / "file")])
    assert line == (f"error: {flag} {blocked / 'out' / 'file'}: cannot write there ({blocked} is a file, not a "
                    "folder); choose another path")


def test_eval_creates_missing_output_folders(tmp_path, oneshot, imagenet_weights, wnid_val):
    results, predictions = tmp_path / "a" / "b" / "results.json", tmp_path / "c" / "predictions.csv"
    oneshot["eval"].main(["--weights", str(imagenet_weights), "--val-dir", str(wnid_val), "--workers", "0",
                          "--image-size", "32", "--results-json", str(results), "--predictions-csv",
                          str(predictions)])
    assert json.loads(results.read_text())["images"] == 6
    assert len(predictions.read_text().splitlines()) == 7


def test_a_refused_eval_or_predict_command_leaves_no_output_folder(tmp_path, oneshot, imagenet_weights, wnid_val,
                                                                   capsys):
    predict = script_module("OneShot", "predict").main
    for main, argv, error in (
            (oneshot["eval"].main, ["--weights", str(imagenet_weights), "--val-dir", str(tmp_path / "typo"),
                                    "--results-json", str(tmp_path / "out" / "r.json"), "--predictions-csv",
                                    str(tmp_path / "out" / "p.csv")], "--val-dir"),
            (oneshot["eval"].main, ["--weights", str(tmp_path / "typo.pth"), "--val-dir", str(wnid_val),
                                    "--results-json", str(tmp_path / "out" / "r.json")], str(tmp_path / "typo.pth")),
            (predict, ["--weights", str(imagenet_weights), str(tmp_path / "typo.jpg"), "--predictions-json",
                       str(tmp_path / "out" / "p.json")], str(tmp_path / "typo.jpg"))):
        assert user_error_line(capsys, main, argv).startswith(f"error: {error}")
        assert not (tmp_path / "out").exists()


def test_an_existing_folder_is_no_output_file(tmp_path, oneshot, imagenet_weights, wnid_val, capsys):
    line = user_error_line(capsys, oneshot["eval"].main, ["--weights", str(imagenet_weights), "--val-dir",
                                                         str(wnid_val), "--results-json", str(tmp_path)])
    assert line == f"error: --results-json {tmp_path}: is a folder; give a file name"


def test_train_refuses_an_unwritable_save_folder_and_tensorboard_folder(tmp_path, oneshot, blocked, image_folder,
                                                                        capsys):
    train = oneshot["train"].main
    line = user_error_line(capsys, train, ["--train-dir", str(image_folder), "--save", str(blocked / "run")])
    assert line.startswith(f"error: --save {blocked / 'run'}: cannot write there")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tensorboard").write_text("a file where TensorBoard's folder goes\n")
    line = user_error_line(capsys, train, ["--train-dir", str(image_folder), "--save", str(tmp_path / "run")])
    assert line.startswith(f"error: --save {tmp_path / 'run' / 'tensorboard'}: cannot write there")


def test_a_refused_train_command_leaves_no_save_folder(tmp_path, oneshot, image_folder, capsys):
    train = oneshot["train"].main
    (tmp_path / "garbage.pth").write_text("not weights\n")
    (tmp_path / "architecture.json").write_text('{"blocks": [0]}\n')
    for argv, error in ((["--train-dir", str(tmp_path / "typo")], "--train-dir "),
                        (["--train-dir", str(image_folder), "--total-iters", "0"], "--total-iters "),
                        (["--train-dir", str(image_folder), "--val-dir", str(tmp_path / "typo")], "--val-dir "),
                        (["--train-dir", str(image_folder), "--pretrained", str(tmp_path / "typo.pth")],
                         "--pretrained "),
                        (["--train-dir", str(image_folder), "--pretrained", str(tmp_path / "garbage.pth")],
                         f"{tmp_path / 'garbage.pth'} is not a PyTorch or safetensors weights file"),
                        (["--train-dir", str(image_folder), "--architecture", str(tmp_path / "architecture.json")],
                         "--architecture "),
                        *((["--train-dir", str(image_folder), flag, value], f"{flag} ") for flag, value in
                          (("--momentum", "-0.5"), ("--weight-decay", "-1"), ("--label-smooth", "2"),
                           ("--ema-decay", "1"), ("--num-classes", "0"), ("--learning-rate", "nan")))):
        line = user_error_line(capsys, train, [*argv, "--save", str(tmp_path / "run")])
        assert line.startswith(f"error: {error}")
        assert not (tmp_path / "run").exists(), argv


def test_workers_and_seed_out_of_range_are_refused_by_every_script_that_takes_them(
        tmp_path, oneshot, imagenet_weights, wnid_val, image_folder, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "OneShot"))  # search.py imports its folder's modules
    output = tmp_path / "out"
    cases = {"train": ["--train-dir", str(image_folder), "--save", str(output)],
             "eval": ["--weights", str(imagenet_weights), "--val-dir", str(wnid_val), "--results-json",
                      str(output / "r.json")],
             "predict": ["--weights", str(imagenet_weights), str(wnid_val), "--predictions-json",
                         str(output / "p.json")],
             "search": ["--supernet", str(imagenet_weights), "--output", str(output / "s.json")]}
    for script, argv in cases.items():
        for flag, value, expected in (("--workers", "-1", "must be 0 (load in the main process) or more"),
                                      ("--seed", "-1", "must be between 0 and 2**32 - 1")):
            if flag == "--seed" and script in ("eval", "predict"):
                continue
            line = user_error_line(capsys, script_module("OneShot", script).main, [*argv, flag, value])
            assert line == f"error: {flag} {value}: {expected}", (script, flag)
            assert not output.exists(), (script, flag)
        line = user_error_line(capsys, script_module("OneShot", script).main, [*argv, "--workers", "two"])
        assert line == "error: --workers two: not a whole number; must be 0 (load in the main process) or more", script
    line = user_error_line(capsys, script_module("OneShot", "search").main, [*cases["search"], "--image-size", "33"])
    assert line.startswith("error: --image-size 33: use a multiple of 32")


@pytest.mark.parametrize("kind", ["onnx", "coreml"])
def test_export_refuses_an_unwritable_output(kind, oneshot, blocked, imagenet_weights, capsys):
    output = blocked / f"OneShot.{'onnx' if kind == 'onnx' else 'mlpackage'}"
    line = user_error_line(capsys, lambda argv: oneshot["export"].run_export(network("OneShot"), argv),
                          ["--weights", str(imagenet_weights), "--format", kind, "--output", str(output)])
    assert line.startswith(f"error: --output {output}: cannot write there")


def test_average_refuses_an_unwritable_output_and_creates_missing_folders(tmp_path, blocked, checkpoints, capsys):
    line = user_error_line(capsys, average.main, ["--save", str(checkpoints), "--best", "2", "--output",
                                                 str(blocked / "avg.safetensors")])
    assert line.startswith(f"error: --output {blocked / 'avg.safetensors'}: cannot write there")
    output = tmp_path / "new" / "avg.safetensors"
    assert average.main(["--save", str(checkpoints), "--best", "2", "--output", str(output),
                         "--no-progress"]) == 0
    assert output.is_file()
    # Missing inputs are named before the output's folder is made.
    capsys.readouterr()
    line = user_error_line(capsys, average.main, ["--inputs", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"),
                                                 "--output", str(tmp_path / "other" / "avg.safetensors")])
    assert line == f"error: --inputs: no such file: {tmp_path / 'a.pth'}, {tmp_path / 'b.pth'}; check the paths"
    assert not (tmp_path / "other").exists()


def test_release_refuses_an_unwritable_output_and_creates_missing_folders(tmp_path, blocked, checkpoints, capsys):
    source = str(checkpoints / "checkpoint-0000000002.pth")
    line = user_error_line(capsys, release.main, [source, "--output", str(blocked / "r.safetensors")])
    assert line.startswith(f"error: --output {blocked / 'r.safetensors'}: cannot write there")
    output = tmp_path / "new" / "r.safetensors"
    assert release.main([source, "--output", str(output)]) == 0
    assert output.is_file() and output.with_name("r.safetensors.sha256").is_file()


def test_predict_refuses_a_bad_mean_image_before_making_the_json_folder(tmp_path, imagenet_weights, wnid_val,
                                                                         capsys):
    predict = script_module("OneShot", "predict").main
    (tmp_path / "mean.xml").write_text("not XML\n")
    line = user_error_line(capsys, predict, ["--weights", str(imagenet_weights), str(wnid_val), "--mean-image",
                                             str(tmp_path / "mean.xml"), "--predictions-json",
                                             str(tmp_path / "out" / "predictions.json")])
    assert "cannot read it as an OpenCV XML mean image" in line and not (tmp_path / "out").exists()


def test_predict_refuses_an_unwritable_json_before_reading_images(blocked, imagenet_weights, wnid_val, capsys):
    predict = script_module("OneShot", "predict").main
    line = user_error_line(capsys, predict, ["--weights", str(imagenet_weights), str(wnid_val), "--predictions-json",
                                             str(blocked / "predictions.json")])
    assert line.startswith(f"error: --predictions-json {blocked / 'predictions.json'}: cannot write there")
    assert "images in" not in capsys.readouterr().out


def test_no_output_overwrites_an_input_or_another_output(tmp_path, oneshot, imagenet_weights, wnid_val, checkpoints,
                                                         capsys):
    """eval.py, predict.py and export.py wrote their results over the --weights file (a checkpoint became a JSON
    of 1 kB, exit 0), predict.py over an image it read, eval.py its CSV over its JSON, average over an input."""
    weights = tmp_path / "weights.pth"
    weights.write_bytes(imagenet_weights.read_bytes())
    size = weights.stat().st_size
    predict = script_module("OneShot", "predict").main
    image = next(wnid_val.rglob("*.jpg"))
    common = ["--weights", str(weights), "--workers", "0", "--image-size", "32"]
    for main, argv, expected in (
            (oneshot["eval"].main, [*common, "--val-dir", str(wnid_val), "--results-json", str(weights)],
             f"error: --results-json {weights} is the --weights file: writing it would destroy it; choose another "
             "path"),
            (oneshot["eval"].main, [*common, "--val-dir", str(wnid_val), "--results-json", str(tmp_path / "r"),
                                    "--predictions-csv", str(tmp_path / "." / "r")],
             f"error: --predictions-csv {tmp_path / 'r'} is the file --results-json writes too; give each its own "
             "path"),
            (predict, [*common, str(wnid_val), "--predictions-json", str(image)],
             f"error: --predictions-json {image} is one of the PATH files: writing it would destroy it; choose "
             "another path"),
            (lambda argv: oneshot["export"].run_export(network("OneShot"), argv),
             [*common[:2], "--format", "onnx", "--output", str(tmp_path / "x.onnx"), "--results-json", str(weights)],
             f"error: --results-json {weights} is the --weights file: writing it would destroy it; choose another "
             "path")):
        assert user_error_line(capsys, main, argv) == expected
    assert weights.stat().st_size == size and image.read_bytes()[:2] == b"\xff\xd8"
    inputs = sorted(str(path) for path in checkpoints.glob("*.pth"))
    assert user_error_line(capsys, average.main, ["--inputs", *inputs, "--output", inputs[0]]) == (
        f"error: --output {inputs[0]} is one of the --inputs files: writing it would destroy it; choose another path")


def test_a_command_that_fails_during_the_work_leaves_no_empty_output_folder(tmp_path, imagenet_weights):
    """The output folders are made before the work, so that an unwritable one fails first; eval.py on images of
    which none could be decoded left them behind, empty."""
    for wnid in imagenet_wnids()[:2]:
        (tmp_path / "val" / wnid).mkdir(parents=True)
        (tmp_path / "val" / wnid / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "kept").mkdir()
    result = subprocess.run([sys.executable, "eval.py", "--weights", str(imagenet_weights), "--val-dir",
                             str(tmp_path / "val"), "--workers", "0", "--results-json",
                             str(tmp_path / "new" / "deeper" / "r.json"), "--predictions-csv",
                             str(tmp_path / "kept" / "p.csv")],
                            cwd=REPO_ROOT / "OneShot", capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "nothing was evaluated" in result.stderr, result.stderr
    # stderr is no terminal here: the progress bar wrote no carriage return for the skipped lines to follow on.
    assert sum(line.startswith("skipped ") for line in result.stderr.splitlines()) == 2, result.stderr
    assert not (tmp_path / "new").exists() and (tmp_path / "kept").is_dir()
