"""Signals and train.py, through the real script: a stopped run saves and exits non-zero (130 for Ctrl-C, 143 for
SIGTERM, 140 for SLURM's SIGUSR2), and after the schedule (BN re-estimation, averaging) a signal stops at once."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from common.checkpoint_store import get_latest_model
from common.training import SignalStop, StopRequest
from test_train import ONESHOT, train_command


def start(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, cwd=ONESHOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def signal_after(process: subprocess.Popen, marker: str, signum: int, delay: float = 0.0,
                 group: bool = False) -> tuple[str, str]:
    """Send `signum` once a stdout line contains `marker` (after `delay` seconds), to the process or (`group`) to
    its whole process group, data-loading workers included; (stdout, stderr) at the end."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            time.sleep(delay)
            if group:
                os.killpg(process.pid, signum)
            else:
                process.send_signal(signum)
            break
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"{signal.Signals(signum).name} did not stop the run:\n{''.join(seen)}{out}\n{err}")
    return "".join(seen) + out, err


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGUSR2, 140)])
def test_a_stopped_run_saves_and_exits_non_zero(tmp_path, image_folder, signum, status):
    process = start(train_command(tmp_path, image_folder, "--total-iters", "400", "--save-interval", "1000"))
    out, err = signal_after(process, "iter 2/400", signum)
    assert process.returncode == status, err
    path, iterations = get_latest_model(tmp_path)
    assert 2 <= iterations < 400 and f"stopped at iteration {iterations}" in out


def test_a_stopped_supernet_run_exits_non_zero_too(tmp_path, image_folder):
    command = train_command(tmp_path, image_folder, "--total-iters", "400", "--save-interval", "1000")
    process = start([command[0], "train_supernet.py", *command[2:], "--held-out-per-class", "2"])
    out, err = signal_after(process, "iter 2/400", signal.SIGINT)
    assert process.returncode == 130, err
    assert 2 <= get_latest_model(tmp_path)[1] < 400 and "stopped at iteration" in out


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGUSR2, 140)])
def test_a_signal_to_every_process_still_saves_and_exits_non_zero(tmp_path, image_folder, signum, status):
    """Ctrl-C reaches the terminal's whole process group, and SLURM sends its SIGTERM (time limit) and SIGUSR2
    (before preemption) to every process of the job: the loading workers get it too and must not die of it."""
    process = start(train_command(tmp_path, image_folder, "--total-iters", "400", "--save-interval", "1000",
                                  "--workers", "2"))
    out, err = signal_after(process, "iter 2/400", signum, group=True)
    assert process.returncode == status, err
    assert "Traceback" not in err
    path, iterations = get_latest_model(tmp_path)
    assert 2 <= iterations < 400 and f"stopped at iteration {iterations}" in out


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_after_the_schedule_stops_at_once(tmp_path, image_folder, signum, status):
    # BatchNorm re-estimation over far more batches than the test waits for: only the signal can end it in time.
    process = start(train_command(tmp_path, image_folder, "--total-iters", "2", "--save-interval", "2",
                                  "--bn-recalibrate", "100000"))
    out, err = signal_after(process, "saved", signum, delay=2.0)
    assert process.returncode == status, err
    assert f"{signal.Signals(signum).name}: stopped at once" in err and "Traceback" not in err
    assert get_latest_model(tmp_path)[1] == 2  # the schedule's last checkpoint stays


def test_a_second_ctrl_c_stops_at_once_but_a_forwarded_copy_of_the_first_does_not(monkeypatch):
    """torchrun forwards the terminal's Ctrl-C to ranks that got it already, milliseconds later: that copy must not
    count as the user's second Ctrl-C, which stops at once without saving."""
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # the forwarded copy
        assert stop.signal_name == "SIGINT"
        monkeypatch.setattr(StopRequest, "SAME_REQUEST_SECONDS", 0.0)
        time.sleep(0.01)
        with pytest.raises(SignalStop):
            signal.raise_signal(signal.SIGINT)
