"""train.py under torchrun with two gloo ranks, through the real script: the demo dataset made by one process while
the others wait, --average-best with every rank taking part, and a rank killed under --max-restarts."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.checkpoint_store import get_latest_model
from common.demo_data import DEMO_CLASSES, demo_dataset
from test_train import REPO_ROOT, TINY, free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(*args: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "--max-restarts", str(restarts), "train.py", *args]


def run_group(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `command` in a session of its own; on time-out kill the whole session (a hung rank included) and fail."""
    process = subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"no end within {timeout} s (a hang):\n{out}\n{err}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def fresh_clone(tmp_path: Path) -> Path:
    """The repository's code without data/: train.py --demo there starts from a clean data folder."""
    clone = tmp_path / "clone"
    for folder in ("common", "OneShot"):
        shutil.copytree(REPO_ROOT / folder, clone / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return clone


def image_count(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*/*.jpg"))


def test_demo_dataset_made_once_by_concurrent_processes(tmp_path):
    cache = tmp_path / "demo"
    code = f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); from common.demo_data import demo_dataset; " \
           f"demo_dataset({str(cache)!r}, train_per_class=40, val_per_class=10)"
    processes = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(3)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], outputs
    # The one that makes it says where, once: a user looking for the data in the model folder finds it.
    assert sum(f"making the built-in demo dataset in {cache}" in out for out, _ in outputs) == 1
    assert image_count(cache / "train") == 40 * len(DEMO_CLASSES)
    assert image_count(cache / "val") == 10 * len(DEMO_CLASSES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "demo.lock"]  # nothing left half-made
    umask = os.umask(0)
    os.umask(umask)
    assert cache.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private folder: others may read it


def test_a_killed_demo_generation_leaves_no_dataset_that_looks_complete(tmp_path):
    cache = tmp_path / "demo"
    code = f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); from common.demo_data import demo_dataset; " \
           f"demo_dataset({str(cache)!r})"
    process = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob(".demo-building-*/train/*/*.jpg")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not cache.exists(), "a killed generation left data/demo behind"
    train, val = demo_dataset(cache, train_per_class=5, val_per_class=2)
    assert image_count(train) == 5 * len(DEMO_CLASSES) and image_count(val) == 2 * len(DEMO_CLASSES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "demo.lock"]


@pytest.mark.slow
def test_two_ranks_demo_on_a_clean_data_folder(tmp_path):
    clone = fresh_clone(tmp_path)
    result = run_group(torchrun("--demo", "--save", str(tmp_path / "run"), *TINY, "--total-iters", "2",
                                "--batch-size", "12"), clone / "OneShot")
    assert result.returncode == 0, result.stderr
    assert image_count(clone / "data" / "demo" / "train") == 120 * len(DEMO_CLASSES)
    assert get_latest_model(tmp_path / "run")[1] == 2


def test_a_ctrl_c_under_torchrun_is_announced_once_and_the_ranks_save_and_stop(tmp_path, image_folder):
    """A terminal's Ctrl-C reaches torchrun and every rank: one line says what happens, not one per rank; the ranks
    save a checkpoint and stop, and the command ends non-zero (torchrun reports the signal its own way). They stop
    within a step or two: they agreed on it only at the next progress line, validation or checkpoint, which can be
    further away than torchrun's 30 s of grace before it kills them (so nothing was saved)."""
    command = torchrun("--train-dir", str(image_folder), "--save", str(tmp_path), *TINY, "--total-iters", "100000",
                       "--batch-size", "12", "--save-interval", "100000", "--display-interval", "100000")
    process = subprocess.Popen(command, cwd=REPO_ROOT / "OneShot", env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in process.stdout:
        if "iter 1/100000" in line:  # the first step's line: then none before iteration 100,000
            time.sleep(1)
            os.killpg(process.pid, signal.SIGINT)
            break
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the ranks did not stop")
    assert process.returncode != 0
    assert err.count("SIGINT: saving a checkpoint, then stopping") == 1, err
    assert 2 <= get_latest_model(tmp_path)[1] < 100000 and "stopped at iteration" in out


@pytest.mark.slow
def test_average_best_under_two_ranks_scores_the_whole_val_set(tmp_path, image_folder):
    result = run_group(torchrun("--train-dir", str(image_folder), "--val-dir", str(image_folder), "--save",
                                str(tmp_path), *TINY, "--total-iters", "4", "--batch-size", "12",
                                "--val-interval", "2", "--save-interval", "2", "--average-best", "2",
                                "--recompute-bn", "1", "--bn-recalibrate", "1"),
                       REPO_ROOT / "OneShot")
    assert result.returncode == 0, result.stderr
    for split in ("val_bn_recalibrated", "val_average_best_2", "val_average_best_2_recomputed_bn"):
        assert f"{split} @ 4: " in result.stdout and result.stdout.count(f"{split} @ 4: ") == 1
    # The whole val set of 24 images every time, not rank 0's half.
    assert result.stdout.count("(24 images)") == 5 and "(12 images)" not in result.stdout
    assert (tmp_path / "average-best-2-recomputed-bn.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["split"] == "val_average_best_2_recomputed_bn" for r in records) == 1


CTRL_C_SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
from common.errors import exit_on_user_error

@exit_on_user_error
def main():
    print("ready", flush=True)
    time.sleep(120)

main()
"""


def test_a_ctrl_c_under_torchrun_stops_every_rank_with_one_line(tmp_path):
    """eval.py, search.py and the other scripts stop at once on a Ctrl-C; under torchrun each rank gets it, and one
    `stopped (Ctrl-C)` says so for all."""
    script = tmp_path / "script.py"
    script.write_text(CTRL_C_SCRIPT.format(repo=str(REPO_ROOT)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(script)]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    ready = 0
    for line in process.stdout:
        ready += line.strip() == "ready"
        if ready == 2:
            os.killpg(process.pid, signal.SIGINT)
            break
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0 and err.count("stopped (Ctrl-C)") == 1, err


RESTARTED_GROUP = """
import os, sys, time
sys.path.insert(0, {repo!r})
import torch
import torch.distributed as dist
from common.distributed import init_distributed, shutdown_distributed
rank, restart = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
if restart and rank == 0:
    time.sleep(3)  # the new rank 0 comes late: rank 1 finds in the store what the previous attempt left there
init_distributed("cpu")
total = torch.ones(1)
dist.all_reduce(total)
print(f"attempt {{restart}} rank {{rank}}: {{int(total.item())}}", flush=True)
if restart < 3 and rank == 1:
    os._exit(1)  # a rank dies: torchrun restarts the group
shutdown_distributed()
"""


def test_a_restarted_group_does_not_read_the_previous_attempts_addresses(tmp_path):
    # torchrun's default rendezvous keeps one store across restarts; the process group's keys are the same each
    # time, so a restarted rank that comes first read the dead rank's old address ("connectFullMesh ... Connection
    # refused"). A race; three restarts with the restarted rank 0 late give it three chances.
    script = tmp_path / "group.py"
    script.write_text(RESTARTED_GROUP.format(repo=str(REPO_ROOT)))
    result = run_group([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "--max-restarts", "3", str(script)], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "attempt 3 rank 0: 2" in result.stdout and "attempt 3 rank 1: 2" in result.stdout


def worker_pids(launcher_pid: int) -> list[int]:
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the ranks' processes through /proc")
def test_a_rank_killed_at_a_random_moment_is_restarted_and_the_run_finishes(tmp_path, image_folder):
    generator = random.Random(os.environ.get("PYTEST_XDIST_WORKER", "") + str(time.time()))
    for attempt in range(2):
        save = tmp_path / f"run{attempt}"
        command = torchrun("--train-dir", str(image_folder), "--save", str(save), *TINY, "--total-iters", "20",
                           "--batch-size", "12", "--save-interval", "5", restarts=2)
        process = subprocess.Popen(command, cwd=REPO_ROOT / "OneShot", env=ENV, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        # Anywhere from start-up (joining the group, DDP's set-up) to late in the schedule.
        moment = generator.randint(0, 16)
        if moment == 0:
            time.sleep(generator.uniform(0.5, 6.0))
            when = "during start-up"
        else:
            seen = ""
            while f"iter {moment}/20" not in seen and process.poll() is None:
                seen = process.stdout.readline()
            when = f"after iteration {moment}"
        # On a loaded machine torchrun may not have started its ranks yet when the sleep ends: wait for them.
        deadline = time.monotonic() + 120
        while not (ranks := worker_pids(process.pid)) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ranks, f"attempt {attempt}: no rank to kill {when}"
        victim = generator.choice(ranks)
        os.kill(victim, signal.SIGKILL)
        try:
            out = process.communicate(timeout=400)[0]
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out = process.communicate()[0]
            pytest.fail(f"attempt {attempt}: killed a rank {when}; no end (a hang):\n{out}")
        assert process.returncode == 0, f"attempt {attempt}: killed a rank {when}\n{out}"
        assert get_latest_model(save)[1] == 20
