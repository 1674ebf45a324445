"""train.py's checks and reports, through the real script: val classes checked at start, a one-class folder refused,
a NaN validation loss said in words, an unreadable image named once, a batch of them named as such, `--eval` as
eval.py evaluates; the demo's curves and its word on averaging."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from common.checkpoint_store import get_latest_model, save_checkpoint
from common.model_state import read_weights_file
from common.run_log import curves_figure, plot_curves
from demo import averaging_verdict
from conftest import REPO_ROOT
from test_train import network, run, train_command
from test_train_stops import start


def test_a_stray_val_class_is_refused_before_training(tmp_path, image_folder):
    val = tmp_path / "val"
    shutil.copytree(image_folder, val)
    some_image = next(val.glob("*/*.jpg"))
    (val / "zebra").mkdir()
    shutil.copy(some_image, val / "zebra" / "z.jpg")
    result = run(train_command(tmp_path / "save", image_folder, "--val-dir", str(val), "--total-iters", "4"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--val-dir" in result.stderr and "zebra" in result.stderr
    assert "iter " not in result.stdout and get_latest_model(tmp_path / "save")[0] is None


def test_resuming_with_other_classes_is_refused_in_one_line(tmp_path, image_folder):
    save = tmp_path / "save"
    assert run(train_command(save, image_folder, "--total-iters", "1")).returncode == 0
    renamed = tmp_path / "renamed"
    shutil.copytree(image_folder, renamed)
    first = sorted(renamed.iterdir())[0]
    first.rename(renamed / "zebra")
    result = run(train_command(save, renamed, "--total-iters", "2"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert f"--train-dir {renamed}" in result.stderr and first.name in result.stderr and "zebra" in result.stderr
    result = run(train_command(save, image_folder, "--total-iters", "2", "--num-classes", "7"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "--num-classes" in result.stderr and "another --save" in result.stderr
    other_model = run(train_command(save, image_folder, "--total-iters", "2"), cwd=REPO_ROOT / "ShuffleNetV2.Large")
    assert other_model.returncode == 2 and other_model.stderr.strip().count("\n") == 0, other_model.stderr
    assert f"--save {save}: its run trains OneShot, not ShuffleNetV2.Large" in other_model.stderr
    assert get_latest_model(save)[1] == 1


def test_a_resumed_run_names_the_settings_this_command_changes(tmp_path, image_folder):
    """Resuming with another --batch-size or --image-size, or without --ema, went on without a word."""
    save = tmp_path / "save"
    assert run(train_command(save, image_folder, "--total-iters", "1", "--ema")).returncode == 0
    same = run(train_command(save, image_folder, "--total-iters", "2", "--ema"))
    assert same.returncode == 0 and "note: this command continues" not in same.stdout
    changed = run(train_command(save, image_folder, "--total-iters", "3", "--image-size", "96", "--seed", "5"))
    assert changed.returncode == 0, changed.stderr
    assert (f"note: this command continues the run in --save {save} with --image-size 96 (it ran with 32), --seed 5 "
            "(it ran with 0), no --ema (it ran with it)\n") in changed.stdout


def test_a_resumed_runs_recorded_settings_of_any_type_are_shown_not_a_traceback():
    import argparse

    from common.training import _note_changed_settings
    said = []
    args = argparse.Namespace(save="runs/x", batch_size=8, image_size=64, learning_rate=0.1, warmup_iters=0,
                              momentum=0.9, weight_decay=4e-5, label_smooth=0.1, seed=0, ema=False, ema_decay=0.9998,
                              deterministic=False)
    _note_changed_settings({"batch_size": "8", "image_size": None, "seed": 0}, args, said.append)
    assert said == ["note: this command continues the run in --save runs/x with --batch-size 8 (it ran with 8), "
                    "--image-size 64 (it ran with None)"]


def test_resuming_a_linear_probe_without_freeze_backbone_is_named():
    """Resumed without --freeze-backbone, a linear probe went on as a full fine-tune without a word."""
    import argparse

    from common.training import _note_changed_settings
    said = []
    _note_changed_settings({"freeze_backbone": True}, argparse.Namespace(save="s", freeze_backbone=False), said.append)
    assert said == ["note: this command continues the run in --save s with no --freeze-backbone (it ran with it)"]


def test_no_auto_continue_refuses_a_save_folder_that_holds_a_run(tmp_path, image_folder):
    """It trained afresh into the folder: the new run's checkpoint 1 replaced the old run's, and the old run's
    later checkpoints stayed beside it, the newest of them resumed next time."""
    save = tmp_path / "save"
    assert run(train_command(save, image_folder, "--total-iters", "2", "--save-interval", "1")).returncode == 0
    before = {path.name: path.read_bytes() for path in save.glob("checkpoint-*")}
    result = run(train_command(save, image_folder, "--total-iters", "1", "--no-auto-continue"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert f"--save {save} holds the checkpoints of a run (newest: checkpoint-0000000002.pth)" in result.stderr
    assert {path.name: path.read_bytes() for path in save.glob("checkpoint-*")} == before
    fresh = run(train_command(tmp_path / "fresh", image_folder, "--total-iters", "1", "--no-auto-continue"))
    assert fresh.returncode == 0 and get_latest_model(tmp_path / "fresh")[1] == 1


def test_a_one_class_training_folder_is_refused(tmp_path, image_folder):
    data = tmp_path / "data"
    first_class = sorted(image_folder.iterdir())[0]
    shutil.copytree(first_class, data / first_class.name)
    result = run(train_command(tmp_path / "save", data, "--total-iters", "2"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "only one class folder" in result.stderr


def test_a_nan_validation_loss_is_reported_in_words(tmp_path, image_folder):
    first = run(train_command(tmp_path, image_folder, "--total-iters", "2", "--save-interval", "2"))
    assert first.returncode == 0, first.stderr
    # Running statistics are buffers, not weights: training goes on (batch statistics) and validation overflows.
    path, iterations = get_latest_model(tmp_path)
    state = read_weights_file(path)
    key = next(k for k in state["model"] if k.endswith("running_var"))
    state["model"][key].fill_(float("nan"))
    save_checkpoint(state, 3, tmp_path, keep=5)
    result = run(train_command(tmp_path, image_folder, "--val-dir", str(image_folder), "--total-iters", "4",
                               "--val-interval", "4"))
    assert result.returncode == 0, result.stderr
    assert "val @ 4" in result.stdout
    assert "warning: the val loss is nan" in result.stderr


def test_an_unreadable_image_is_named_once_then_counted(tmp_path, image_folder):
    data, val = tmp_path / "data", tmp_path / "val"
    for folder in (data, val):
        shutil.copytree(image_folder, folder)
        (sorted(folder.iterdir())[0] / f"broken-{folder.name}.jpg").write_bytes(b"not a jpeg at all")
    # 25 images in batches of 8 with 2 worker processes: each broken file comes up in every epoch or validation.
    result = run(train_command(tmp_path / "save", data, "--total-iters", "12", "--workers", "2",
                               "--val-dir", str(val), "--val-interval", "4"))
    assert result.returncode == 0, result.stderr
    for name in ("broken-data.jpg", "broken-val.jpg"):
        assert result.stderr.count(f"{name}: cannot decode it") == 1, result.stderr
    assert "skipped 1 unreadable image(s)" in result.stdout


def test_a_batch_with_no_decodable_image_is_named_as_such_not_as_a_divergence(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "data" / name / f"{i}.jpg").write_bytes(b"not a jpeg at all")
    result = run(train_command(tmp_path / "save", tmp_path / "data", "--total-iters", "2"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: not one image of a training batch after iteration 0 could be decoded")


def test_eval_refuses_custom_classes_for_imagenet_weights_as_eval_py_does(tmp_path, image_folder):
    weights = tmp_path / "imagenet.pth"
    torch.save(network("OneShot").create_network(num_classes=1000).state_dict(), weights)
    result = run([sys.executable, "train.py", "--eval", "--eval-resume", str(weights), "--val-dir",
                  str(image_folder), "--workers", "0"])
    eval_py = run([sys.executable, "eval.py", "--weights", str(weights), "--val-dir", str(image_folder),
                   "--workers", "0"])
    assert eval_py.returncode == 2 and result.returncode == 2
    assert result.stderr == eval_py.stderr and "are not ImageNet wnids" in result.stderr


def test_eval_scores_this_runs_checkpoint_without_train_dir(tmp_path, image_folder):
    trained = run(train_command(tmp_path, image_folder, "--total-iters", "2", "--save-interval", "2"))
    assert trained.returncode == 0, trained.stderr
    result = run([sys.executable, "train.py", "--eval", "--save", str(tmp_path), "--val-dir", str(image_folder),
                  "--workers", "0"])
    assert result.returncode == 0, result.stderr
    # eval.py's report: the checkpoint's 3 classes at its own 32px crop, all 24 images.
    assert " * Acc@1 " in result.stdout and "24 images" in result.stdout and "32px center crop" in result.stdout
    # The same scores as eval.py's own defaults give (float32 whatever precision training chose).
    eval_py = run([sys.executable, "eval.py", "--weights", str(tmp_path / "checkpoint-0000000002.pth"),
                   "--val-dir", str(image_folder), "--workers", "0"])

    def scores(output: str) -> str:
        return next(line for line in output.splitlines() if line.startswith(" * Acc@1")).split("  24 images")[0]
    assert eval_py.returncode == 0 and scores(result.stdout) == scores(eval_py.stdout)


def test_a_second_run_in_the_same_save_folder_is_refused_while_the_first_runs(tmp_path, image_folder):
    first = start(train_command(tmp_path, image_folder, "--total-iters", "100000"))
    try:
        for line in first.stdout:
            if "iter 1/" in line:
                break
        second = run(train_command(tmp_path, image_folder, "--total-iters", "4"))
        assert second.returncode == 2 and second.stderr.strip().count("\n") == 0
        assert f"--save {tmp_path}: another training run is writing its checkpoints there (process {first.pid}" \
            in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    # The lock goes with the process: the same command now resumes.
    again = run(train_command(tmp_path, image_folder, "--total-iters", "4"))
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout


def test_a_damaged_newest_checkpoint_is_passed_over_with_a_one_line_warning(tmp_path, image_folder):
    first = run(train_command(tmp_path, image_folder, "--total-iters", "2", "--save-interval", "1"))
    assert first.returncode == 0, first.stderr
    newest = tmp_path / "checkpoint-0000000002.pth"
    with open(newest, "r+b") as file:
        file.truncate(1000)
    resumed = run(train_command(tmp_path, image_folder, "--total-iters", "3", "--save-interval", "1"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"warning: skipping {newest}: it has 1000 bytes" in resumed.stderr
    assert "CheckpointWarning" not in resumed.stderr and "resumed from" in resumed.stdout


def test_curves_loss_panel_shows_the_curve_under_a_huge_early_val_loss():
    records = [{"split": "train", "iteration": i, "loss": 2.0 - i / 200, "top1_error": 80.0 - i / 4}
               for i in range(10, 201, 10)]
    records += [{"split": "val", "iteration": i, "loss": loss, "top1_error": 50.0, "top5_error": 10.0}
                for i, loss in ((25, 12_000.0), (50, 1.5), (75, float("nan")), (100, 0.8))]
    figure = curves_figure(records)
    loss_axis = figure.axes[0]
    assert loss_axis.get_yscale() == "log"
    val_line = next(line for line in loss_axis.get_lines() if line.get_label() == "val loss")
    assert list(val_line.get_xdata()) == [25, 50, 100]  # the NaN is left out, not drawn as a gap to nowhere


def test_a_full_disk_while_plotting_keeps_the_plot_of_before(tmp_path, monkeypatch):
    """curves.png was written in place: a disk that filled during it left a truncated PNG, the earlier plot gone."""
    from matplotlib.figure import Figure
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"split": "train", "iteration": 1, "loss": 2.0, "top1_error": 80.0}) + "\n")
    plot = plot_curves(metrics, tmp_path / "curves.png")
    before = plot.read_bytes()

    def full_disk(figure, target, **options):
        with open(target, "wb") as file:
            file.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OSError) as failed:
        plot_curves(metrics, plot)
    assert failed.value.filename == str(plot)  # the one-line error names it
    assert plot.read_bytes() == before and sorted(tmp_path.iterdir()) == [plot, metrics]


def test_demo_says_plainly_when_the_average_loses():
    assert "worse than the last checkpoint" in averaging_verdict(18.3, 21.1, 200)
    assert "beats the last checkpoint by 1.0 points" in averaging_verdict(10.0, 9.0, 200)


def test_demo_help_describes_it_and_runs_nothing(capsys, monkeypatch):
    """`python demo.py --help` ran the whole demo (clearing runs/demo first); now it prints the description, and
    an unknown argument is refused, both before anything is touched."""
    import demo
    cleared = []
    monkeypatch.setattr(demo.shutil, "rmtree", lambda *args, **kwargs: cleared.append(args))
    for argv, status in ((["--help"], 0), (["--bogus"], 2)):
        with pytest.raises(SystemExit) as exit_info:
            demo.main(argv)
        assert exit_info.value.code == status
    assert "make demo" in capsys.readouterr().out and not cleared


def test_a_second_demo_in_the_same_clone_is_refused_while_the_first_runs(tmp_path):
    """The demo starts by clearing runs/demo: a second one cleared the first's checkpoints while it trained."""
    # The files of this working tree that git would commit (a git clone would test the last commit), not the runs,
    # data and caches it ignores, which other tests may be writing.
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                             capture_output=True, check=True, timeout=60).stdout.decode()
    for name in filter(None, listing.split("\0")):
        if (REPO_ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, clone / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "demo.py"], cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env, start_new_session=True)
    try:
        # The first demo has claimed the clone and cleared runs/demo once it announces its first step.
        assert "=== train" in first.stdout.readline() + first.stdout.readline()
        second = subprocess.run([sys.executable, "demo.py"], cwd=clone, capture_output=True, text=True, env=env,
                                timeout=120)
        assert second.returncode == 2 and second.stdout == ""
        assert second.stderr.startswith(f"error: a demo is already running in this clone (process {first.pid} on ")
        assert first.poll() is None
    finally:
        first.terminate()  # passed on to its train.py, which has a process group of its own
        first.wait(timeout=120)
