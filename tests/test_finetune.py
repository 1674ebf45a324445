"""Fine-tuning: train.py --pretrained to another number of classes, --freeze-backbone, resuming an interrupted run."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.checkpoint import get_training_state
from common.checkpoint_store import get_latest_model, save_checkpoint
from common.demo_data import make_image_folder
from common.model_state import WeightsMismatchError, extract_model_state, read_weights_file
from common.pretrained import load_pretrained
from common.training import build_parser, learning_rate, resolve_args
from common.errors import UserError
from conftest import REPO_ROOT, network, released_state_dict

ONESHOT = REPO_ROOT / "OneShot"
TINY = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--deterministic", "--display-interval", "1",
        "--val-interval", "1000", "--learning-rate", "0.05"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *TINY, *args], cwd=ONESHOT, capture_output=True, text=True,
                          timeout=300, env=ENV)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return extract_model_state(read_weights_file(path))


@pytest.fixture(scope="module")
def demo_trained(tmp_path_factory) -> Path:
    """A checkpoint of OneShot trained (briefly) on the 6 classes of the demo data."""
    root = tmp_path_factory.mktemp("demo")
    data = make_image_folder(root / "train", num_classes=6, images_per_class=4, size=40)
    result = run("--train-dir", str(data), "--save", str(root / "run"), "--total-iters", "2")
    assert result.returncode == 0, result.stderr
    return get_latest_model(root / "run")[0]


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("three") / "train", num_classes=3, images_per_class=4, size=40,
                             seed=7)


def test_another_class_count_reinitialises_exactly_the_classifier_and_side_heads():
    state = released_state_dict("ShuffleNetV2.Large")
    with torch.device("meta"):
        model = network("ShuffleNetV2.Large").create_network(num_classes=3)
    model = model.to_empty(device="cpu")
    report = load_pretrained(model, state)
    assert report.reinitialised == ["fc", "predict_56", "predict_28", "predict_14"]
    heads = ("fc.", "predict_")
    loaded = model.state_dict()
    for key, value in loaded.items():
        if key.startswith(heads):
            if key.endswith(("fc.weight", "fc.bias")):
                assert value.shape[0] == 3, key
        else:
            assert torch.equal(value, state[key]), key
    assert report.loaded == sum(not k.startswith(heads) for k in loaded)
    # The re-initialised heads have the original initialisation: Linear N(0, 0.01), zero bias.
    assert torch.count_nonzero(model.fc.bias) == 0 and 0.005 < model.fc.weight.std() < 0.02

    # The same class count loads everything; a file of another network is refused with the keys named.
    same = network("ShuffleNetV2.Large")
    with torch.device("meta"):
        model = same.create_network()
    assert load_pretrained(model.to_empty(device="cpu"), state).reinitialised == []
    with pytest.raises(WeightsMismatchError, match="first_conv"):
        load_pretrained(network("OneShot").create_network(3), state)


def test_finetune_starts_from_the_file_and_freeze_backbone_changes_only_the_classifier(
        tmp_path, demo_trained, three_classes):
    pretrained = weights(demo_trained)
    result = run("--train-dir", str(three_classes), "--save", str(tmp_path), "--pretrained", str(demo_trained),
                 "--freeze-backbone", "--total-iters", "3", "--learning-rate", "0.5")
    assert result.returncode == 0, result.stderr
    line = [line for line in result.stdout.splitlines() if line.startswith("--pretrained:")]
    assert len(line) == 1 and line[0].endswith("re-initialised classifier")
    assert "OneShot: 3 classes" in result.stdout
    tuned = weights(get_latest_model(tmp_path)[0])
    assert tuned.keys() == pretrained.keys()
    for key, value in tuned.items():
        if key.startswith("classifier."):
            assert value.shape == (3, 1024)
        else:  # every backbone weight and BatchNorm buffer, num_batches_tracked included
            assert torch.equal(value, pretrained[key]), key
    # The classifier trained: it is neither the 6-class one nor its fresh initialisation after 3 steps.
    assert tuned["classifier.0.weight"].std() > 0


def test_interrupted_finetune_resumes_from_its_own_checkpoint(tmp_path, demo_trained, three_classes):
    copy = tmp_path / "pretrained.pth"
    copy.write_bytes(demo_trained.read_bytes())
    save = tmp_path / "run"
    command = [sys.executable, "train.py", *TINY, "--train-dir", str(three_classes), "--save", str(save),
               "--pretrained", str(copy), "--total-iters", "4", "--save-interval", "2"]
    process = subprocess.Popen(command, cwd=ONESHOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    for line in process.stdout:
        if line.startswith("saved") and "0000000002" in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait()
    assert get_latest_model(save)[1] == 2
    # The pretrained file is gone: a resumed run must not need it, and must not start from it again.
    copy.unlink()
    result = subprocess.run(command, cwd=ONESHOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "at iteration 2" in result.stdout
    assert "--pretrained:" not in result.stdout
    assert get_latest_model(save)[1] == 4


def test_another_models_file_is_refused_naming_its_folder(tmp_path, demo_trained, three_classes):
    """It ended in a list of 1062 missing and 457 unexpected tensors; eval.py and export.py named the folder."""
    result = subprocess.run([sys.executable, "train.py", *TINY, "--train-dir", str(three_classes), "--save",
                             str(tmp_path / "run"), "--pretrained", str(demo_trained)],
                            cwd=REPO_ROOT / "ShuffleNetV2.Large", capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --pretrained {demo_trained}: a OneShot checkpoint; use OneShot/train.py"
    assert not (tmp_path / "run").exists()


def test_a_pretrained_folder_is_named_as_a_folder(tmp_path, three_classes):
    """It said "no such file" of a folder that exists, where eval.py and export.py say it is a folder."""
    from common.training import _pretrained_metadata
    with pytest.raises(UserError, match=f"--pretrained {tmp_path}: a folder, not a weights file; give the path"):
        _pretrained_metadata(str(tmp_path), "OneShot")
    with pytest.raises(UserError, match="no such file; check the path"):
        _pretrained_metadata(str(tmp_path / "missing.pth"), "OneShot")


def test_pretrained_weights_of_another_architecture_are_named_as_such(tmp_path, demo_trained, three_classes):
    """The file holds the released OneShot; --architecture asks for another: the error said which tensors were
    missing or misshaped (a few hundred), not why."""
    architecture = network("OneShot").released_architecture()
    architecture["blocks"][0] = (architecture["blocks"][0] + 1) % 4
    path = tmp_path / "architecture.json"
    path.write_text(json.dumps(architecture))
    result = run("--train-dir", str(three_classes), "--save", str(tmp_path / "run"), "--pretrained", str(demo_trained),
                 "--architecture", str(path), "--total-iters", "2")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: --pretrained {demo_trained} holds another architecture than --architecture {path}, and weights fit "
        "only the architecture they were trained in: leave out --architecture to fine-tune the file's, or train this "
        "one without --pretrained")
    assert not (tmp_path / "run").exists()


def test_warmup_is_a_function_of_the_iteration():
    def schedule(k: int, warmup_iters: int = 10) -> float:
        return learning_rate(argparse.Namespace(learning_rate=1.0, total_iters=100, warmup_iters=warmup_iters), k)

    assert [round(schedule(k), 4) for k in (0, 4, 9, 10, 50, 99)] == [0.1, 0.48, 0.91, 0.9, 0.5, 0.01]
    assert schedule(0, warmup_iters=0) == 1.0


def test_a_shorter_fine_tune_warms_up_for_the_recipes_share_of_it(tmp_path):
    """The fine-tuning recipe's warm-up (100 of 1500 iterations) must not outlast a shorter run: its rate would
    never reach --learning-rate. Defaulted, it keeps its share; given, a warm-up as long as the run is refused."""
    recipe = network("OneShot").RECIPE
    finetune = recipe.finetune

    def resolved(*argv: str) -> argparse.Namespace:
        return resolve_args(build_parser(recipe).parse_args(["--train-dir", str(tmp_path), *argv]), recipe)

    assert resolved("--pretrained", "w.pth").warmup_iters == finetune.warmup_iters
    assert resolved("--pretrained", "w.pth", "--total-iters", str(2 * finetune.total_iters)).warmup_iters == \
        finetune.warmup_iters
    short = finetune.total_iters // 50
    assert resolved("--pretrained", "w.pth", "--total-iters", str(short)).warmup_iters == \
        -(-short * finetune.warmup_iters // finetune.total_iters)
    assert resolved("--pretrained", "w.pth", "--total-iters", "30", "--warmup-iters", "29").warmup_iters == 29
    assert resolved("--total-iters", "30").warmup_iters == 0
    with pytest.raises(UserError, match=r"^--warmup-iters 30 is not shorter than --total-iters 30: "):
        resolved("--pretrained", "w.pth", "--total-iters", "30", "--warmup-iters", "30")


def test_a_fine_tune_resumed_without_pretrained_keeps_the_fine_tuning_defaults(tmp_path):
    """The README says a resumed fine-tune never reads its --pretrained file again, which invites leaving it out:
    the command then took the original recipe's defaults (300,000 iterations at batch 1024, lr 0.5) and was
    killed for memory on its first step."""
    recipe = network("OneShot").RECIPE
    save = tmp_path / "run"
    state = get_training_state(network("OneShot").create_network(3), iteration=8,
                               metadata={"args": {"pretrained": "w.pth", "total_iters": 8}})
    save_checkpoint(state, 8, save)
    args = resolve_args(build_parser(recipe).parse_args(["--train-dir", str(tmp_path), "--save", str(save)]), recipe)
    assert (args.batch_size, args.total_iters) == (recipe.finetune.batch_size, recipe.finetune.total_iters)
    elsewhere = build_parser(recipe).parse_args(["--train-dir", str(tmp_path), "--save", str(tmp_path / "new")])
    assert resolve_args(elsewhere, recipe).total_iters == recipe.total_iters
