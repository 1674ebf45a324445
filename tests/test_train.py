"""train.py end to end, through the real script: demo, exact resume after a kill, two gloo ranks, bad data, NaN."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.checkpoint_store import get_latest_model, list_checkpoints
from common.model_state import extract_model_state, load_model_state, read_checkpoint_metadata, read_weights_file
from conftest import REPO_ROOT, network

ONESHOT = REPO_ROOT / "OneShot"
# Small and quick, deterministic, no worker processes unless a test asks for them.
TINY = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--deterministic", "--display-interval", "1",
        "--val-interval", "1000", "--learning-rate", "0.05"]


def train_command(save: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", "--train-dir", str(data), "--save", str(save), *TINY, *extra]


def run(command: list[str], cwd: Path = ONESHOT, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env, **kwargs)


def free_port() -> int:
    """A TCP port nobody listens on now, for torchrun's store (other test runs may use torchrun at the same time)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return extract_model_state(read_weights_file(path))


def test_demo_flag_trains_validates_and_averages(tmp_path):
    result = run([sys.executable, "train.py", "--demo", "--save", str(tmp_path), "--total-iters", "4",
                  "--batch-size", "12", "--image-size", "32", "--val-interval", "2", "--save-interval", "2",
                  "--display-interval", "2", "--workers", "2", "--average-best", "2", "--recompute-bn", "1",
                  "--channels-last"])
    assert result.returncode == 0, result.stderr
    assert "iter 4/4" in result.stdout and "img/s" in result.stdout and "ETA" in result.stdout
    assert "val @ 4" in result.stdout and "val_average_best_2_recomputed_bn @ 4" in result.stdout
    # The averaged release file of a channels_last run loads into a fresh network.
    average = network("OneShot").create_network(num_classes=6)
    load_model_state(average, tmp_path / "average-best-2-recomputed-bn.safetensors")
    path, iterations = get_latest_model(tmp_path)
    assert iterations == 4
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "val", "val_average_best_2",
                                             "val_average_best_2_recomputed_bn"}
    # Every --display-interval iterations, and the first, so that a slow start is seen at once.
    assert [r["iteration"] for r in records if r["split"] == "train"] == [1, 2, 4]
    # A validation record says what it was measured on, as eval.py's results do.
    assert all(r["images"] > 0 and r["skipped"] == 0 for r in records if r["split"] == "val")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert any((tmp_path / "tensorboard").iterdir())
    # An average claims no checkpoint's metrics: it lists its inputs with theirs, and stores what was measured
    # on it under its own name; no local path of the training arguments is in a file meant to be shared.
    measured = {r["split"]: r for r in records if r["split"].startswith("val_average")}
    for name, split in (("average-best-2", "val_average_best_2"),
                        ("average-best-2-recomputed-bn", "val_average_best_2_recomputed_bn")):
        stored = read_checkpoint_metadata(tmp_path / f"{name}.safetensors")
        assert "metrics" not in stored and "iteration" not in stored and "args" not in stored, name
        assert str(tmp_path) not in json.dumps(stored)
        assert [source["iteration"] for source in stored["averaged_from"]] and \
            all("top1_error" in source["metrics"] for source in stored["averaged_from"])
        assert stored["validation"]["split"] == split
        assert stored["validation"]["top1_error"] == pytest.approx(measured[split]["top1_error"])
    assert "--recompute-bn" not in result.stderr  # asked for: no advice to do it


def test_resume_after_kill_is_bit_identical(tmp_path, image_folder):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    command = ["--total-iters", "6", "--save-interval", "3"]
    result = run(train_command(straight, image_folder, *command))
    assert result.returncode == 0, result.stderr

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(train_command(killed, image_folder, *command), cwd=ONESHOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if line.startswith("saved") and "0000000003" in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait()
    assert get_latest_model(killed)[1] == 3, "the kill must land between the checkpoints at 3 and 6"

    result = run(train_command(killed, image_folder, *command))
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    a, b = weights(get_latest_model(straight)[0]), weights(get_latest_model(killed)[0])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def reference_first_step(data: Path, ranks: int) -> tuple[dict[str, torch.Tensor], float]:
    """OneShot's parameters after one SGD step on the first global batch of 12 (seed 0), and that step's loss,
    computed here in one process with the batch split as `ranks` processes split it: BatchNorm statistics per
    part, gradients and losses averaged."""
    from common.data import build_train_loader
    from common.input_format import Preprocess
    from common.training import parameter_groups
    module = network("OneShot")
    torch.manual_seed(0)
    # NCHW float32 as train.py runs with --deterministic on a CPU: the same convolution kernels, so the same
    # rounding.
    model = module.create_network(num_classes=3).train()
    rng = torch.get_rng_state()  # every rank starts its dropout from the same seed
    loader, _ = build_train_loader(data, crop_size=32, global_batch_size=12, seed=0, workers=0)
    images, labels, _ = next(iter(loader))
    inputs = Preprocess(module.INPUT_FORMAT)(images)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    loss = 0.0
    for part_inputs, part_labels in zip(inputs.chunk(ranks), labels.chunk(ranks)):
        torch.set_rng_state(rng)
        part_loss = criterion(model(part_inputs), part_labels) / ranks
        part_loss.backward()
        loss += part_loss.item()
    optimizer = torch.optim.SGD(parameter_groups(model, 4e-5), lr=0.001, momentum=0.9)
    optimizer.step()
    # Running statistics are left out: each rank keeps its own part's, and DDP broadcasts rank 0's.
    return {name: parameter.detach() for name, parameter in model.named_parameters()}, loss


def test_two_gloo_ranks_match_one_process(tmp_path, image_folder):
    common = ["--total-iters", "2", "--save-interval", "1", "--batch-size", "12", "--learning-rate", "0.001"]
    one = run(train_command(tmp_path / "one", image_folder, *common))
    assert one.returncode == 0, one.stderr
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), "train.py", "--train-dir", str(image_folder),
               "--save", str(tmp_path / "two"), *TINY, *common])
    assert two.returncode == 0, two.stderr
    files = sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*.pth"))
    assert files == ["checkpoint-0000000001.pth", "checkpoint-0000000002.pth"]
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["split"] == "train"] == [1, 2]

    # Both runs make exactly the update of the same global batch, the two ranks with BatchNorm statistics of
    # their 6 images each (as the original DataParallel did; SyncBatchNorm needs GPUs).
    # The reference runs on one thread as the runs did (OMP_NUM_THREADS=1): at initialisation the first conv's
    # gradient is large (BatchNorm over 6 tiny images) and magnifies another summation order's rounding to 5e-3.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected_by_folder = {folder: reference_first_step(image_folder, ranks) for folder, ranks in
                              (("one", 1), ("two", 2))}
    finally:
        torch.set_num_threads(threads)
    for folder, (expected, expected_loss) in expected_by_folder.items():
        got = weights(tmp_path / folder / files[0])
        for key, value in expected.items():
            assert torch.allclose(got[key].float(), value.float(), rtol=1e-3, atol=5e-5), (folder, key)
        # The logged loss is the global batch's (the mean over ranks), not rank 0's part.
        log = [json.loads(line) for line in (tmp_path / folder / "metrics.jsonl").read_text().splitlines()]
        assert next(r["loss"] for r in log if r["split"] == "train") == pytest.approx(expected_loss, rel=1e-3)


def test_missing_and_empty_folders_fail_with_one_line(tmp_path):
    missing = run(train_command(tmp_path / "save", tmp_path / "nope", "--total-iters", "2"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "--train-dir" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run(train_command(tmp_path / "save", tmp_path / "empty", "--total-iters", "2"))
    assert empty.returncode == 2 and empty.stderr.strip().count("\n") == 0 and "--train-dir" in empty.stderr
    assert not (tmp_path / "save" / "checkpoint-0000000002.pth").exists()


def test_corrupt_images_are_skipped_and_counted(tmp_path, image_folder):
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(image_folder), str(data)], check=True)
    first_class = sorted(data.iterdir())[0]
    (first_class / "broken.jpg").write_bytes(b"not a jpeg at all")
    good = sorted(first_class.glob("*.jpg"))[0]
    (first_class / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    result = run(train_command(tmp_path / "save", data, "--total-iters", "6", "--save-interval", "6"))
    assert result.returncode == 0, result.stderr
    assert "unreadable" in result.stdout
    assert get_latest_model(tmp_path / "save")[1] == 6


def test_a_val_folder_of_undecodable_images_records_no_metrics(tmp_path, image_folder):
    val = tmp_path / "val"
    for folder in sorted(image_folder.iterdir())[:2]:
        (val / folder.name).mkdir(parents=True)
        (val / folder.name / "broken.jpg").write_bytes(b"not a JPEG")
    result = run(train_command(tmp_path / "save", image_folder, "--val-dir", str(val), "--total-iters", "2",
                               "--val-interval", "2", "--save-interval", "2"))
    assert result.returncode == 0, result.stderr
    assert "val @ 2: none of the 2 --val-dir image(s) could be decoded" in result.stderr
    assert list_checkpoints(tmp_path / "save")[-1].metrics == {}


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, image_folder):
    good = run(train_command(tmp_path, image_folder, "--total-iters", "2", "--save-interval", "2"))
    assert good.returncode == 0, good.stderr
    before, _ = get_latest_model(tmp_path)
    diverging = run(train_command(tmp_path, image_folder, "--total-iters", "8", "--save-interval", "2",
                                  "--learning-rate", "1e30"))
    assert diverging.returncode == 1  # found during the work, as a full disk
    assert "NaN or infinite" in diverging.stderr and diverging.stderr.strip().count("\n") == 0
    assert "checkpoint at iteration 2 was saved" in diverging.stderr and "fp16" not in diverging.stderr
    path, iterations = get_latest_model(tmp_path)
    assert iterations == 2 and path == before
    assert all(torch.isfinite(v).all() for v in weights(path).values() if v.is_floating_point())
    fresh = run(train_command(tmp_path / "fresh", image_folder, "--total-iters", "2", "--learning-rate", "1e30"))
    assert fresh.returncode == 1 and "no checkpoint was saved" in fresh.stderr, fresh.stderr
