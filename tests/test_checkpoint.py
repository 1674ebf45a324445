"""Training checkpoints: round trip, exact resume, crash safety under SIGKILL, retention, damaged files, release."""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import REPO_ROOT, released_state_dict
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn import functional as F

from common import atomic_io, checkpoint, checkpoint_store, release, tensor_pack
from common.checkpoint import get_training_state, load_checkpoint
from common.checkpoint_store import (CheckpointCorruptError, CheckpointError, CheckpointWarning, CheckpointWriteError,
                                     get_latest_model, list_checkpoints, save_checkpoint, verify_checkpoint)
from common.model_state import (WeightsFileError, WeightsMismatchError, load_model_state, read_checkpoint_metadata,
                                read_weights_file)
from common.release import main as release_main

SAMPLES, BATCH = 20, 4
STEPS_PER_EPOCH = SAMPLES // BATCH
TOTAL = 12


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dropout = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 4)
        self.predict_aux = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1)
        return self.fc(self.dropout(x))


class Run:
    """Model, SGD with momentum, AMP grad scaler and EMA, built from `seed`."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = Tiny()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        self.ema = ModelEmaV3(self.model, decay=0.9)

    def objects(self) -> dict:
        return {"optimizer": self.optimizer, "scaler": self.scaler, "ema": self.ema}


def batch_at(iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `iteration` of a fixed dataset reshuffled every epoch: a function of the iteration, as the training
    stream is, so the iteration alone is the data position."""
    data = torch.randn(SAMPLES, 3, 6, 6, generator=torch.Generator().manual_seed(7))
    labels = torch.randint(0, 4, (SAMPLES,), generator=torch.Generator().manual_seed(8))
    epoch, step = divmod(iteration, STEPS_PER_EPOCH)
    index = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(1234 + epoch))[step * BATCH:][:BATCH]
    return data[index], labels[index]


def train(run: Run, start: int, stop: int) -> None:
    run.model.train()
    for iteration in range(start, stop):
        x, y = batch_at(iteration)
        # Python's and numpy's generators feed the augmentation, torch's the dropout: all three must resume.
        x = x * (1 + 0.1 * random.random()) + 0.1 * float(np.random.randn())
        for group in run.optimizer.param_groups:
            group["lr"] = 0.1 * (1 - iteration / TOTAL)
        loss = F.cross_entropy(run.model(x), y)
        run.optimizer.zero_grad()
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.ema.update(run.model, step=iteration + 1)


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _state_of(run: Run) -> dict:
    return {**{f"model.{k}": v for k, v in run.model.state_dict().items()},
            **{f"ema.{k}": v for k, v in run.ema.module.state_dict().items()},
            **{f"momentum.{i}": s["momentum_buffer"] for i, s in run.optimizer.state_dict()["state"].items()}}


@pytest.mark.parametrize("stop_at", [3, 5, 7, 10])
def test_resume_is_bit_identical(tmp_path, deterministic, stop_at):
    _seed_everything(0)
    straight = Run(seed=1)
    train(straight, 0, TOTAL)
    expected = _state_of(straight)

    _seed_everything(0)
    first = Run(seed=1)
    train(first, 0, stop_at)
    state = get_training_state(first.model, **first.objects(), iteration=stop_at)
    path = save_checkpoint(state, stop_at, tmp_path)
    del first, state

    _seed_everything(99)  # a fresh process: other seeds, other initial weights
    resumed = Run(seed=2)
    restored = load_checkpoint(path, resumed.model, **resumed.objects())
    train(resumed, restored["iteration"], TOTAL)
    actual = _state_of(resumed)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_round_trip_of_every_piece(tmp_path):
    run = Run(seed=3)
    _seed_everything(3)
    train(run, 0, 4)
    args = argparse.Namespace(lr=0.1, save=tmp_path / "runs", sizes=(224, 256))
    metadata = {"arch": "Tiny", "classes": ["a", "b", "c", "d"], "image_size": 224, "args": args,
                "input_format": {"channel_order": "BGR", "mean": (0.0, 0.0, 0.0)}}
    metrics = {"top1_error": 30.1, "top5_error": np.float32(10.0), "loss": torch.tensor(1.25)}
    state = get_training_state(run.model, **run.objects(), iteration=4, best_metric=30.1, metrics=metrics,
                               metadata=metadata)
    path = save_checkpoint(state, 4, tmp_path)
    draws = (random.random(), np.random.randn(), torch.rand(3))

    # The file loads with plain weights_only=True: only tensors and plain values inside.
    raw = torch.load(path, weights_only=True)
    assert raw["metadata"]["args"] == {"lr": 0.1, "save": str(tmp_path / "runs"), "sizes": [224, 256]}
    assert raw["metadata"]["versions"].keys() == {"python", "torch", "torchvision", "numpy"}
    assert raw["metadata"]["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert raw["metadata"]["time_utc"].endswith("+00:00")
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["iteration"] == 4 and sidecar["size"] == path.stat().st_size
    assert sidecar["pieces_sha256"] == _pieces_sha256(path.read_bytes(), sidecar["piece_bytes"])
    assert sidecar["metrics"] == {"top1_error": 30.1, "top5_error": 10.0, "loss": 1.25}

    _seed_everything(42)
    fresh = Run(seed=4)
    restored = load_checkpoint(path, fresh.model, **fresh.objects())
    assert (random.random(), np.random.randn()) == draws[:2] and torch.equal(torch.rand(3), draws[2])
    for name in ("model", "optimizer", "scaler"):
        original = getattr(run, name).state_dict()
        assert _equal(getattr(fresh, name).state_dict(), original), name
    assert _equal(fresh.ema.module.state_dict(), run.ema.module.state_dict())
    assert restored["iteration"] == 4 and restored["best_metric"] == 30.1
    assert restored["metrics"]["top5_error"] == 10.0
    assert read_checkpoint_metadata(path)["classes"] == ["a", "b", "c", "d"]
    assert read_checkpoint_metadata(path)["iteration"] == 4


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_tensors_are_stored_packed_and_unpacked_checkpoints_still_load(tmp_path, monkeypatch):
    run = Run(seed=5)
    _seed_everything(5)
    train(run, 0, 2)
    state = get_training_state(run.model, **run.objects(), iteration=2)
    packed = save_checkpoint(state, 2, tmp_path / "packed")
    # One storage per dtype in the file, not one per tensor: torch.load's per-tensor cost is what packing removes.
    raw = torch.load(packed, weights_only=True)
    pack = raw.pop(tensor_pack.PACK_KEY)
    assert len({t.dtype for t in pack["storages"]}) == len(pack["storages"]) <= 3
    assert pack.keys() == {"storages", "groups", "sizes", "skeleton"}
    # What holds tensors is in the pack; the rest stays readable with plain torch.load.
    assert raw.keys() == {"format", "iteration", "best_metric", "scaler", "metrics", "metadata"}
    monkeypatch.setattr(checkpoint_store, "pack_tensors", lambda obj: (obj, None))  # the layout of earlier versions
    unpacked = save_checkpoint(state, 2, tmp_path / "unpacked")
    assert isinstance(torch.load(unpacked, weights_only=True)["model"]["fc.weight"], torch.Tensor)
    for path in (packed, unpacked):
        read = read_weights_file(path)
        assert _equal(read["model"], state["model"]) and _equal(read["optimizer"], state["optimizer"])
        assert read["model"]._metadata == state["model"]._metadata  # module versions, used by load_state_dict
        assert all(read["model"][k].dtype == v.dtype and read["model"][k].shape == v.shape
                   for k, v in state["model"].items())
        fresh = Run(seed=6)
        load_checkpoint(path, fresh.model, **fresh.objects())
        assert _equal(fresh.model.state_dict(), run.model.state_dict())
        assert _equal(fresh.optimizer.state_dict(), run.optimizer.state_dict())


def test_checkpoints_of_the_first_packed_layout_still_load(tmp_path):
    """From 2026-11-30 to 2026-12-06 the pack held no skeleton: each tensor's place in the file's own pickle held a
    reference {"tensor_pack_ref": number}."""
    weights = {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor([7, 8])}
    first_layout = {"format": checkpoint.CHECKPOINT_FORMAT, "iteration": 3,
                    "model": {"a": {"tensor_pack_ref": 0}, "b": {"tensor_pack_ref": 1}},
                    tensor_pack.PACK_KEY: {"storages": [weights["a"].flatten(), weights["b"]],
                                           "groups": torch.tensor([0, 1]), "sizes": torch.tensor([2, 2, 3, 1, 2])}}
    torch.save(first_layout, tmp_path / "first.pth")
    read = read_weights_file(tmp_path / "first.pth", verify=False)  # made here, without a sidecar
    assert read["iteration"] == 3 and _equal(read["model"], weights)


def test_a_checkpoint_holds_only_tensors_and_plain_values(tmp_path):
    """Its skeleton is read by an unpickler that allows no class but OrderedDict: saving refuses anything else at
    once (not at the resume), and a skeleton that names another class, as a tampered file could, is refused."""
    with pytest.raises(TypeError, match=r"plain values only, not \w*Path"):
        save_checkpoint({"model": {"w": torch.ones(2), "where": Path("x")}}, 1, tmp_path)
    assert list(tmp_path.glob("*checkpoint*")) == []
    pack, _ = tensor_pack.pack_tensors({"model": {"w": torch.ones(2)}})
    pack[tensor_pack.PACK_KEY]["skeleton"] = torch.frombuffer(bytearray(
        b"\x80\x04cos\nsystem\n\x8c\x04true\x85R."), dtype=torch.uint8)  # os.system("true")
    torch.save(pack, tmp_path / "tampered.pth")
    with pytest.raises(WeightsFileError, match="names os.system, which a checkpoint never holds"):
        read_weights_file(tmp_path / "tampered.pth")


def _save(folder: Path, iteration: int, **kwargs) -> Path:
    state = {"format": checkpoint.CHECKPOINT_FORMAT, "iteration": iteration, "model": {"w": torch.full((4,), 1.0)},
             "metrics": kwargs.pop("metrics", {})}
    return save_checkpoint(state, iteration, folder, **kwargs)


def _unmappable(*args, **kwargs):
    raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))


def _pieces_sha256(data: bytes, piece: int) -> str:
    return hashlib.sha256(b"".join(hashlib.sha256(data[start:start + piece]).digest()
                                   for start in range(0, len(data), piece))).hexdigest()


@pytest.mark.parametrize("way", ["mapped", "read", "unmappable", "kernel-without-populate"])
def test_file_sha256_matches_hashlib_on_piece_boundaries(tmp_path, monkeypatch, way):
    # Small pieces and read chunks, so that their boundaries are crossed with small files.
    piece = 1 << 16
    monkeypatch.setattr(atomic_io, "_READ_CHUNK", 1 << 14)
    if way == "read":
        monkeypatch.setattr(atomic_io, "_MADV_POPULATE_READ", None)
    elif way == "unmappable":
        monkeypatch.setattr(atomic_io.mmap, "mmap", _unmappable)
    elif way == "kernel-without-populate":
        monkeypatch.setattr(atomic_io, "_MADV_POPULATE_READ", 9999)  # an advice the kernel rejects with EINVAL
    for size in (0, 1, piece - 1, piece, piece + 1, 11 * piece + 7):
        path = tmp_path / f"{size}.bin"
        data = np.random.default_rng(size).bytes(size)
        path.write_bytes(data)
        assert atomic_io.file_sha256(path) == hashlib.sha256(data).hexdigest(), size
        assert atomic_io.file_sha256(path, piece) == _pieces_sha256(data, piece), size


def test_checkpoints_with_a_whole_file_sha256_still_load(tmp_path):
    # Sidecars written before checkpoints were hashed in pieces hold "sha256" of the whole file.
    path = _save(tmp_path, 7)
    sidecar_path = path.with_suffix(".json")
    sidecar = json.loads(sidecar_path.read_text())
    del sidecar["pieces_sha256"], sidecar["piece_bytes"]
    sidecar_path.write_text(json.dumps({**sidecar, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}))
    assert get_latest_model(tmp_path) == (path, 7)
    assert torch.equal(checkpoint_store.read_checkpoint(path)["model"]["w"], torch.full((4,), 1.0))
    sidecar_path.write_text(json.dumps({**sidecar, "sha256": "0" * 64}))
    with pytest.raises(CheckpointCorruptError, match="SHA-256 does not match"):
        checkpoint_store.verify_checkpoint(path)


def test_a_training_checkpoint_read_without_its_sidecar_says_it_was_not_checked(tmp_path):
    """A copy without its sidecar was read and used without a word, though the README says each is checked."""
    copy = tmp_path / "copied.pth"
    copy.write_bytes(_save(tmp_path, 7).read_bytes())
    with pytest.warns(CheckpointWarning, match=f"{copy} is a training checkpoint without its sidecar .* so its "
                                               "SHA-256 could not be checked"):
        read_weights_file(copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_weights_file(tmp_path / "checkpoint-0000000007.pth")  # checked against its sidecar
        read_weights_file(copy, verify=False)


def test_names_sort_by_number_at_any_iteration_count(tmp_path):
    for iteration in (999_999, 5, 1_000_000, 12_345_678_901, 10_000):
        _save(tmp_path, iteration, keep=10)
    assert (tmp_path / "checkpoint-0000000005.pth").exists()
    assert [info.iteration for info in list_checkpoints(tmp_path)] == [5, 10_000, 999_999, 1_000_000, 12_345_678_901]
    assert get_latest_model(tmp_path) == (tmp_path / "checkpoint-12345678901.pth", 12_345_678_901)


def test_retention_keeps_newest_and_best(tmp_path):
    errors = {10: 50.0, 20: 31.0, 30: 40.0, 40: 45.0, 50: 44.0, 60: 42.0}
    for iteration, error in errors.items():
        _save(tmp_path, iteration, keep=2, best_metric_name="top1_error", metrics={"top1_error": error})
    assert [info.iteration for info in list_checkpoints(tmp_path)] == [20, 50, 60]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint-00000000{i}.{ext}" for i in (20, 50, 60)
                                                          for ext in ("json", "pth")]
    # An accuracy is better higher: top1 (100 - top1_error) is highest at 20.
    _save(tmp_path, 70, keep=1, best_metric_name="top1", metrics={"top1_error": 99.0})
    assert [info.iteration for info in list_checkpoints(tmp_path)] == [20, 70]


def test_latest_skips_partial_corrupt_and_foreign_files(tmp_path):
    assert get_latest_model(tmp_path / "missing") == (None, 0)
    assert get_latest_model(tmp_path) == (None, 0)
    good = _save(tmp_path, 100)
    damaged = _save(tmp_path, 200)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    truncated = _save(tmp_path, 300)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    foreign = tmp_path / "checkpoint-0000000400.pth"
    torch.save({"w": torch.zeros(1)}, foreign)
    (tmp_path / ".checkpoint-0000000500.pth.123.tmp").write_bytes(b"partial")
    (tmp_path / "model_best.pth").write_bytes(b"x")
    with pytest.warns(CheckpointWarning) as caught:
        assert get_latest_model(tmp_path) == (good, 100)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 5 and all("\n" not in m for m in messages)
    for name, reason in ((damaged.name, "SHA-256"), (truncated.name, "bytes"), (foreign.name, "no sidecar"),
                         (".checkpoint-0000000500.pth.123.tmp", "unfinished"), ("model_best.pth", "not a checkpoint")):
        assert any(name in m and reason in m for m in messages), (name, messages)

    with pytest.raises(CheckpointCorruptError, match="SHA-256 does not match") as error:
        load_checkpoint(damaged, Tiny())
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointCorruptError, match="sidecar says"):
        verify_checkpoint(truncated)
    with pytest.raises(CheckpointCorruptError, match="no sidecar"):
        load_checkpoint(foreign, Tiny())
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(foreign, Tiny(), verify=False)


def test_full_disk_leaves_earlier_checkpoints_intact(tmp_path, monkeypatch):
    earlier = _save(tmp_path, 10)
    before = sorted(tmp_path.iterdir())

    class FillingFile:
        """A real file that runs out of space after a few hundred bytes, as on a full disk."""

        def __init__(self, path, mode):
            self._file = open(path, mode)
            self.written = 0

        def write(self, data):
            self.written += len(data)
            if self.written > 300:
                self._file.write(bytes(data)[:10])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._file.write(data)

        def __getattr__(self, name):
            return getattr(self._file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._file.close()

    monkeypatch.setattr(atomic_io, "open", FillingFile, raising=False)
    with pytest.raises(CheckpointWriteError) as error:
        _save(tmp_path, 20)
    text = str(error.value)
    assert "\n" not in text and str(tmp_path) in text and "No space left on device (ENOSPC)" in text
    assert "intact" in text
    assert sorted(tmp_path.iterdir()) == before
    verify_checkpoint(earlier)
    assert get_latest_model(tmp_path) == (earlier, 10)


def test_failure_between_the_renames_removes_the_new_sidecar(tmp_path, monkeypatch):
    earlier = _save(tmp_path, 10)
    before = sorted(tmp_path.iterdir())

    def fail(folder):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(checkpoint_store, "fsync_dir", fail)
    with pytest.raises(CheckpointWriteError, match="Input/output error"):
        _save(tmp_path, 20)
    assert sorted(tmp_path.iterdir()) == before
    assert get_latest_model(tmp_path) == (earlier, 10)


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    assert _save(tmp_path / "run", 10) is None
    assert not (tmp_path / "run").exists()


WEIGHT = torch.arange(1_000_000, dtype=torch.float32)  # 4 MB: large enough that kills land mid-write


def _writer(folder: str, start: int) -> None:
    # One thread: a forked child hangs in its first parallel kernel when the parent has used OpenMP (as a pytest
    # run without OMP_NUM_THREADS=1 has by now).
    torch.set_num_threads(1)
    iteration = start
    while True:
        iteration += 1
        state = {"format": checkpoint.CHECKPOINT_FORMAT, "iteration": iteration,
                 "model": {"weight": WEIGHT, "marker": torch.tensor(iteration)},
                 "metrics": {"loss": float(iteration % 7)}}
        save_checkpoint(state, iteration, folder, keep=2, best_metric_name="loss")


def test_sigkill_during_saves_never_leaves_a_bad_latest(tmp_path):
    # fork: the child starts at once with torch imported; it only serialises and writes (no parallel kernels).
    context = multiprocessing.get_context("fork")
    rng = random.Random(0)
    latest, interrupted = 0, 0
    for _ in range(25):
        child = context.Process(target=_writer, args=(str(tmp_path), latest))
        child.start()
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        interrupted += any(name.startswith(".") for name in os.listdir(tmp_path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            path, iteration = get_latest_model(tmp_path)
        if path is None:
            assert iteration == 0 and latest == 0
            continue
        verify_checkpoint(path)
        state = read_weights_file(path)
        assert state["iteration"] == iteration and state["model"]["marker"].item() == iteration
        assert torch.equal(state["model"]["weight"], WEIGHT)
        assert iteration >= latest  # the newest good checkpoint is never lost
        latest = iteration
    assert latest > 0, "the writer never finished a save: the test did not exercise anything"
    assert interrupted > 0, "no kill landed during a save"


def test_release_command(tmp_path, capsys):
    run = Run(seed=5)
    _seed_everything(5)
    train(run, 0, 3)
    metadata = {"arch": "Tiny", "classes": ["a", "b", "c", "d"], "args": {"data": "/private/path"}}
    state = get_training_state(run.model, **run.objects(), iteration=3, metrics={"top1_error": 12.5},
                               metadata=metadata)
    source = save_checkpoint(state, 3, tmp_path / "run")
    output = tmp_path / "tiny-ema.safetensors"
    assert release_main([str(source), "--output", str(output), "--ema"]) == 0
    printed = capsys.readouterr().out
    digest = hashlib.sha256(output.read_bytes()).hexdigest()
    assert f"{digest}  {output.name}" in printed
    assert (tmp_path / "tiny-ema.safetensors.sha256").read_text() == f"{digest}  {output.name}\n"
    weights = safetensors.torch.load_file(output)
    assert not any(key.startswith("predict_") for key in weights)
    assert all(torch.equal(weights[key], value) for key, value in run.ema.module.state_dict().items()
               if not key.startswith("predict_"))
    meta = read_checkpoint_metadata(output)
    assert meta["classes"] == ["a", "b", "c", "d"] and meta["weights"] == "ema" and meta["iteration"] == 3
    assert meta["metrics"] == {"top1_error": 12.5} and "args" not in meta
    load_model_state(Tiny(), output, for_inference=True)
    with pytest.raises(WeightsMismatchError, match="predict_aux"):
        load_model_state(Tiny(), output)


def test_release_of_a_2019_file(tmp_path, capsys):
    source = tmp_path / "oneshot.pkl"
    state = released_state_dict("OneShot")
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, source,
               _use_new_zipfile_serialization=False)
    output = tmp_path / "oneshot.safetensors"
    assert release_main([str(source), "-o", str(output), "--model", "OneShot"]) == 0
    weights = read_weights_file(output)
    assert weights.keys() == state.keys() and all(torch.equal(weights[k], v) for k, v in state.items())
    assert "a OneShot state dict with 1000 classes" in capsys.readouterr().out


def test_a_release_made_again_has_the_same_bytes(tmp_path):
    source = tmp_path / "weights.pth"
    weights = {"conv.weight": torch.randn(4, 3, 3, 3), "half": torch.randn(5).to(torch.bfloat16),
               "fp16": torch.randn(2, 2).half(), "bn.num_batches_tracked": torch.tensor(7), "mask": torch.rand(3) > 0.5}
    torch.save(weights, source)
    outputs = [tmp_path / f"release-{i}.safetensors" for i in range(3)]
    for output in outputs:  # two processes: safetensors' own writer ordered the metadata by a per-process hash map
        subprocess.run([sys.executable, "-m", "common.release", str(source), "--output", str(output)], cwd=REPO_ROOT,
                       check=True, capture_output=True)
    assert outputs[0].read_bytes() == outputs[1].read_bytes() == outputs[2].read_bytes()
    released = safetensors.torch.load_file(outputs[0])
    assert released.keys() == weights.keys()
    assert all(released[k].dtype == v.dtype and torch.equal(released[k], v) for k, v in weights.items())
    (tmp_path / "plain").touch()  # the mode every other output gets (safetensors' writer made files 0600)
    assert outputs[0].stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_a_disk_that_fills_during_a_release_ends_it_with_status_1_and_the_earlier_release_intact(
        tmp_path, monkeypatch, capsys):
    source = tmp_path / "weights.pth"
    torch.save({"w": torch.randn(64)}, source)
    output = tmp_path / "release.safetensors"
    assert release_main([str(source), "--output", str(output)]) == 0
    before = output.read_bytes(), (tmp_path / "release.safetensors.sha256").read_text()
    written = release._write_safetensors

    def fills_the_disk(file, *args):
        written(file, *args)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(release, "_write_safetensors", fills_the_disk)
    with pytest.raises(SystemExit) as stopped:
        release_main([str(source), "--output", str(output)])
    error = capsys.readouterr().err.strip()
    assert stopped.value.code == 1 and len(error.splitlines()) == 1
    assert error.startswith(f"error: {output}: No space left on device")
    assert (output.read_bytes(), (tmp_path / "release.safetensors.sha256").read_text()) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["release.safetensors", "release.safetensors.sha256",
                                                                "weights.pth"]


def test_release_refuses_unsafe_and_wrong_input(tmp_path, capsys):
    marker = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    source = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Evil()}, source)
    with pytest.raises(SystemExit) as exit_info:
        release_main([str(source), "-o", str(tmp_path / "out.safetensors")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--trust-pickle" in err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    with pytest.raises(SystemExit):
        release_main([str(source), "-o", str(tmp_path / "out.pth")])
    assert "must end in .safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        release_main([str(tmp_path / "nothing.pth"), "-o", str(tmp_path / "out.safetensors")])
    assert "no such file" in capsys.readouterr().err


def test_missing_parts_leave_objects_as_they_are(tmp_path):
    model = Tiny()
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    path = save_checkpoint(get_training_state(model, scaler=disabled, iteration=1), 1, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(path, Tiny(), scaler=torch.amp.GradScaler("cpu", enabled=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(CheckpointWarning) as caught:
        load_checkpoint(path, Tiny(), optimizer=optimizer, scaler=torch.amp.GradScaler("cpu"))
    assert sorted(str(w.message).split(" has no ")[1].split()[0] for w in caught) == ["optimizer", "scaler"]
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    other_path = save_checkpoint(get_training_state(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                    iteration=2), 2, tmp_path)
    with pytest.raises(CheckpointError, match="the saved optimizer state does not fit this optimizer"):
        load_checkpoint(other_path, Tiny(), optimizer=other)


def test_cuda_rng_states_are_kept_per_device(tmp_path, monkeypatch):
    """The CUDA branch without a GPU: every device's generator state is saved, and restored to its device."""
    states = [torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.update({device: state}))
    path = save_checkpoint(get_training_state(Tiny(), iteration=1), 1, tmp_path)
    load_checkpoint(path, Tiny())
    assert restored.keys() == {0, 1} and all(torch.equal(restored[i], states[i]) for i in (0, 1))


def test_each_rank_takes_back_its_own_generators(tmp_path, monkeypatch):
    """One RNG mechanism for every rank: the state holds each rank's generators; rank r restores entry r, and every
    rank restores rank 0's when the number of ranks changed."""
    per_rank = []
    for seed in (10, 11):
        _seed_everything(seed)
        per_rank.append(checkpoint.rng_state())
    path = save_checkpoint(get_training_state(Tiny(), iteration=1, rng=per_rank), 1, tmp_path)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    for world_size, rank, seed in ((2, 1, 11), (2, 0, 10), (3, 2, 10)):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, rank=rank: rank)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None, size=world_size: size)
        _seed_everything(99)
        load_checkpoint(path, Tiny())
        drawn = (random.random(), float(np.random.rand()), torch.rand(1).item())
        _seed_everything(seed)
        assert drawn == (random.random(), float(np.random.rand()), torch.rand(1).item()), (world_size, rank)


def test_each_tensor_is_written_where_its_dtype_placeholder_goes_in_any_layout(tmp_path, monkeypatch):
    """Packing copies nothing: torch.save writes one placeholder per dtype and the writer writes the tensors' own
    bytes in its place, copying only tensors that are not contiguous. Pieces of 64 kB: tensors span several pieces
    and pieces hold several tensors."""
    monkeypatch.setattr(checkpoint_store, "PIECE_BYTES", 1 << 16)
    generator = torch.Generator().manual_seed(0)
    state = {"channels_last": torch.randn(4, 3, 5, 5, generator=generator).to(memory_format=torch.channels_last),
             "transposed": torch.randn(6, 7, generator=generator).t(), "scalar": torch.tensor(3),
             "empty": torch.empty(0, 4), "bf16": torch.randn(9, generator=generator).bfloat16(),
             "large": torch.randn(300_000, generator=generator), "nested": [{"counts": torch.arange(5)}],
             "after": torch.randn(20_000, generator=generator)}
    path = save_checkpoint(state, 1, tmp_path)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["pieces_sha256"] == _pieces_sha256(path.read_bytes(), sidecar["piece_bytes"])
    assert _equal(checkpoint_store.read_checkpoint(path), state)


def test_large_writes_hash_in_pieces_and_a_failed_writeback_is_a_full_disk(tmp_path, monkeypatch):
    # Writebacks of 1 MB and hashed pieces of 1.5 MB + 1, so that a 5 MB tensor crosses several of each.
    monkeypatch.setattr(atomic_io, "_WRITEBACK_BYTES", 1 << 20)
    monkeypatch.setattr(checkpoint_store, "PIECE_BYTES", 3 * (1 << 19) + 1)
    big = torch.arange(5 * (1 << 18) + 3, dtype=torch.float32)
    state = {"format": checkpoint.CHECKPOINT_FORMAT, "iteration": 1, "model": {"w": big}, "metrics": {}}
    path = save_checkpoint(state, 1, tmp_path)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["pieces_sha256"] == _pieces_sha256(path.read_bytes(), sidecar["piece_bytes"])
    assert torch.equal(checkpoint_store.read_checkpoint(path)["model"]["w"], big)

    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    before = sorted(tmp_path.iterdir())
    monkeypatch.setattr(atomic_io, "_datasync", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"No space left on device \(ENOSPC\)"):
        save_checkpoint({**state, "iteration": 2}, 2, tmp_path)
    assert sorted(tmp_path.iterdir()) == before
    assert get_latest_model(tmp_path) == (path, 1)
