"""common.submit, the SLURM launcher, where there is no SLURM: refused unless asked for local processes, and then a
real two-rank job of submitit's local executor that trains and saves like torchrun's ranks."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from common.checkpoint_store import get_latest_model
from common.model_state import read_checkpoint_metadata
from conftest import REPO_ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def submit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.submit", *args], cwd=REPO_ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="SLURM is installed here")
def test_without_slurm_nothing_starts_unless_local_processes_are_asked_for(tmp_path):
    result = submit("--model", "OneShot", "--log-dir", str(tmp_path / "logs"), "--", "--demo")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: no SLURM on this machine (no sbatch found); --cluster local runs the "
                                     "job's 8 ranks as processes here, or use torchrun")
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_a_local_two_rank_job_trains_and_saves(tmp_path, image_folder):
    save = tmp_path / "run"
    result = submit("--model", "OneShot", "--cluster", "local", "--gpus-per-node", "2", "--log-dir",
                    str(tmp_path / "logs"), "--", "--train-dir", str(image_folder), "--save", str(save),
                    "--image-size", "32", "--batch-size", "8", "--workers", "0", "--total-iters", "2",
                    "--save-interval", "2", "--val-interval", "1000", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "submitted job" in result.stdout and "(local)" in result.stdout
    # The ranks are this machine's processes: the command waits for them and says how they ended.
    assert result.stdout.rstrip().endswith(": train.py finished")
    assert get_latest_model(save)[1] == 2
    assert sorted(path.name for path in (tmp_path / "logs").iterdir()) == [result.stdout.split()[2]]  # no "%j"
    logs = {path.name: path.read_text() for path in (tmp_path / "logs").rglob("*_log.out")}
    assert len(logs) == 2 and any("of global batch 8 on 2 x cpu" in text for text in logs.values())


@pytest.mark.slow
def test_a_ctrl_c_stops_a_local_job_with_one_line_and_its_ranks_save(tmp_path, image_folder):
    """A terminal's Ctrl-C reaches the whole process group: submitit's controller, which waits on the ranks, printed
    a KeyboardInterrupt traceback after the command's `stopped (Ctrl-C)`."""
    save, logs = tmp_path / "run", tmp_path / "logs"
    process = subprocess.Popen(
        [sys.executable, "-m", "common.submit", "--model", "OneShot", "--cluster", "local", "--gpus-per-node", "2",
         "--log-dir", str(logs), "--", "--train-dir", str(image_folder), "--save", str(save), "--image-size", "32",
         "--batch-size", "8", "--workers", "0", "--total-iters", "100000", "--display-interval", "1",
         "--val-interval", "100000", "--device", "cpu"],
        cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not any("iter 2/" in path.read_text() for path in logs.rglob("*_log.out")):
        assert time.monotonic() < deadline and process.poll() is None, "the job did not start training"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    try:
        out, err = process.communicate(timeout=120)
        while time.monotonic() < deadline and not list(save.glob("checkpoint-*.json")):  # the ranks outlive it
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130 and err.strip() == "stopped (Ctrl-C)", err
    assert get_latest_model(save)[1] >= 2


def test_a_debug_job_runs_here_and_says_how_it_ended(tmp_path, image_folder):
    result = submit("--model", "OneShot", "--cluster", "debug", "--log-dir", str(tmp_path / "logs"), "--",
                    "--train-dir", str(image_folder), "--save", str(tmp_path / "run"), "--image-size", "32",
                    "--batch-size", "8", "--workers", "0", "--total-iters", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith(": train.py finished") and get_latest_model(tmp_path / "run")[1] == 1


def test_a_local_job_that_fails_ends_with_its_error_in_one_line_and_status_1(tmp_path):
    result = submit("--model", "OneShot", "--cluster", "local", "--gpus-per-node", "2", "--log-dir",
                    str(tmp_path / "logs"), "--", "--train-dir", str(tmp_path / "absent"), "--save",
                    str(tmp_path / "run"), "--device", "cpu")
    job = result.stdout.split()[2]
    assert result.returncode == 1 and result.stderr == (
        f"error: job {job}: rank 0 failed: error: --train-dir {tmp_path / 'absent'}: no such folder (its log: "
        f"{tmp_path / 'logs' / job / f'{job}_0_log.err'})\n")


def test_bad_numbers_and_a_mistyped_train_flag_are_refused_before_anything_is_submitted(tmp_path):
    logs = tmp_path / "logs"
    for flags, expected in ((["--nodes", "0"], "error: --nodes 0: must be at least 1"),
                            (["--gpus-per-node", "-1"], "error: --gpus-per-node -1: must be at least 1"),
                            (["--time", "0"], "error: --time 0: must be at least 1"),
                            # train.py's numbers are refused here too, not after the job waited in the queue.
                            (["--", "--demo", "--total-iters", "0"], "error: train.py's arguments after --: "
                                                                      "--total-iters 0: must be at least 1"),
                            # A batch the ranks cannot share failed only once the job ran.
                            (["--gpus-per-node", "2", "--", "--demo", "--batch-size", "15"],
                             "error: train.py's batch of 15 (--batch-size) must divide by the job's 2 ranks (--nodes x "
                             "--gpus-per-node)")):
        train_flags = [] if "--" in flags else ["--", "--demo"]
        result = submit("--model", "OneShot", "--cluster", "local", "--log-dir", str(logs), *flags, *train_flags)
        assert result.returncode == 2 and result.stderr.strip() == expected
    result = submit("--model", "OneShot", "--cluster", "local", "--log-dir", str(logs), "--", "--demo",
                    "--totl-iters", "3")
    assert result.returncode == 2 and result.stderr.strip() == ("error: train.py's arguments after --: unrecognized "
                                                                "arguments: --totl-iters 3")
    assert not logs.exists()


def test_a_supernet_job_runs_train_supernet_and_only_oneshot_has_one(tmp_path, image_folder):
    """Stage 1 of the search goes to the cluster too: --script train_supernet.py, its own flags checked here."""
    save = tmp_path / "supernet"
    result = submit("--model", "OneShot", "--script", "train_supernet.py", "--cluster", "debug", "--log-dir",
                    str(tmp_path / "logs"), "--", "--train-dir", str(image_folder), "--save", str(save),
                    "--image-size", "32", "--batch-size", "8", "--workers", "0", "--total-iters", "1",
                    "--held-out-per-class", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith(": train_supernet.py finished")
    checkpoint, iteration = get_latest_model(save)
    assert iteration == 1 and "supernet" in read_checkpoint_metadata(checkpoint)
    refused = submit("--model", "OneShot", "--script", "train_supernet.py", "--cluster", "local", "--log-dir",
                     str(tmp_path / "logs2"), "--", "--demo", "--flops-max", "330")
    assert refused.returncode == 2 and refused.stderr.strip().startswith(
        "error: train_supernet.py's arguments after --: --flops-max 330:")
    other = submit("--model", "ShuffleNetV2.Large", "--script", "train_supernet.py", "--cluster", "local",
                   "--log-dir", str(tmp_path / "logs2"), "--", "--demo")
    assert other.returncode == 2 and other.stderr.strip() == ("error: --script train_supernet.py: ShuffleNetV2.Large "
                                                              "has none; give --model OneShot")
    assert not (tmp_path / "logs2").exists()
