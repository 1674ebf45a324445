"""Checkpoint averaging, best-K selection, the weight EMA across a resume, and BatchNorm re-estimation."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from common import average
from common.average import average_checkpoints, main, select_best_checkpoints
from common.bn_recalibrate import recalibrate_batchnorm
from common.atomic_io import file_sha256
from common.checkpoint import get_training_state, load_checkpoint
from common.checkpoint_store import save_checkpoint
from common.ema import create_ema
from common.errors import UserError
from common.model_state import RELEASE_METADATA_KEY, read_checkpoint_metadata

from conftest import REPO_ROOT


class Tiny(nn.Module):
    """Conv, BN, a non-BN buffer, dropout and a classifier: every kind of state averaging must handle."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("scale", torch.tensor([2.0, 3.0]))
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(self.drop(x)) * self.scale[0]


def _randomised(seed: int, classes: int = 5) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny(classes)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_()
        model.bn.num_batches_tracked.fill_(1000 * seed)
    return model


def _save_run(folder, iterations_and_metrics, ema=None, seed_offset=0):
    """One checkpoint per (iteration, metrics) through the real save_checkpoint; the models it saved."""
    models = {}
    for iteration, metrics in iterations_and_metrics:
        model = _randomised(iteration + seed_offset)
        save_checkpoint(get_training_state(model, ema=ema, iteration=iteration, metrics=metrics), iteration,
                        folder, keep=100)
        models[iteration] = model
    return models


def _checkpoint(folder, iteration):
    return folder / f"checkpoint-{iteration:010d}.pth"


# -- arithmetic -----------------------------------------------------------------------------------------------

def test_average_equals_float64_reference_and_takes_newest_integers(tmp_path, monkeypatch):
    monkeypatch.setattr(average, "_CHUNK", 7)  # sums go slice by slice: make the slices and a remainder show
    models = _save_run(tmp_path, [(10, {}), (20, {}), (30, {})])
    # Out of order on purpose: the integer buffer must come from the newest iteration, not the last path.
    order = [20, 30, 10]
    averaged = average_checkpoints([_checkpoint(tmp_path, i) for i in order], progress=False)

    states = [models[i].state_dict() for i in order]
    assert list(averaged) == list(states[0])
    for key, value in averaged.items():
        if key.endswith("num_batches_tracked"):
            assert value.dtype == torch.int64 and value.item() == 30_000
            continue
        reference = torch.zeros_like(value, dtype=torch.float64)
        for state in states:
            reference += state[key].double()
        assert value.dtype == torch.float32
        assert torch.equal(value, (reference / 3).float()), key


def test_writes_safetensors_and_torch_files_atomically(tmp_path):
    _save_run(tmp_path, [(1, {}), (2, {})])
    inputs = [_checkpoint(tmp_path, 1), _checkpoint(tmp_path, 2)]
    out = tmp_path / "out"
    averaged = average_checkpoints(inputs, out / "avg.safetensors", progress=False)
    average_checkpoints(inputs, out / "avg.pth", progress=False)
    # No temporary files left; each file has its SHA-256 beside it, as every shared weights file.
    assert sorted(p.name for p in out.iterdir()) == ["avg.pth", "avg.pth.sha256", "avg.safetensors",
                                                     "avg.safetensors.sha256"]

    with safe_open(out / "avg.safetensors", framework="pt") as file:
        assert all(torch.equal(file.get_tensor(key), value) for key, value in averaged.items())
        metadata = json.loads(file.metadata()[RELEASE_METADATA_KEY])
    assert [item["iteration"] for item in metadata["averaged_from"]] == [1, 2]
    assert metadata["weights"] == "model"
    from_torch = torch.load(out / "avg.pth", weights_only=True)
    assert all(torch.equal(from_torch[key], value) for key, value in averaged.items())


def test_dtypes_are_preserved(tmp_path):
    generator = torch.Generator().manual_seed(0)
    states = []
    for index in range(3):
        states.append({
            "half": torch.randn(64, generator=generator).half(),
            "bf16": torch.randn(64, generator=generator).bfloat16(),
            "double": torch.randn(64, generator=generator, dtype=torch.float64),
            "bn.num_batches_tracked": torch.tensor(7 + index),
            "mask": torch.rand(64, generator=generator) > 0.5,
        })
        save_file(states[-1], tmp_path / f"w{index}.safetensors")
    averaged = average_checkpoints([tmp_path / f"w{i}.safetensors" for i in range(3)], progress=False)

    for key, value in averaged.items():
        assert value.dtype == states[0][key].dtype, key
    for key in ("half", "bf16", "double"):
        reference = sum(state[key].double() for state in states) / 3
        assert torch.equal(averaged[key], reference.to(states[0][key].dtype)), key
    # No iteration recorded in these files: the last path counts as the newest.
    assert averaged["bn.num_batches_tracked"].item() == 9
    assert torch.equal(averaged["mask"], states[2]["mask"])


def test_tensors_sharing_storage_and_legacy_files_average_correctly(tmp_path):
    # Pages of a summed tensor are dropped from memory; a second name for the same storage must still read the
    # file's values, and a legacy (non-mappable) file must not be touched by that at all.
    shared = [torch.randn(300_000) for _ in range(2)]
    torch.save({"a": shared[0], "b": shared[0]}, tmp_path / "zip.pth")
    torch.save({"a": shared[1], "b": shared[1]}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    averaged = average_checkpoints([tmp_path / "zip.pth", tmp_path / "legacy.pth"], progress=False)
    expected = ((shared[0].double() + shared[1].double()) / 2).float()
    assert torch.equal(averaged["a"], expected) and torch.equal(averaged["b"], expected)


def test_ema_weights_by_choice(tmp_path):
    ema = create_ema(_randomised(99))
    models = _save_run(tmp_path, [(1, {}), (2, {})], ema=ema)
    paths = [_checkpoint(tmp_path, 1), _checkpoint(tmp_path, 2)]
    from_ema = average_checkpoints(paths, progress=False, use_ema=True)
    raw = average_checkpoints(paths, progress=False)
    assert torch.equal(from_ema["fc.weight"], ema.module.fc.weight)
    assert torch.equal(raw["fc.weight"], ((models[1].fc.weight.double() + models[2].fc.weight.double()) / 2).float())


# -- mismatched inputs ----------------------------------------------------------------------------------------

def test_mismatched_keys_are_named(tmp_path):
    save_file({"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.zeros(2)}, tmp_path / "one.safetensors")
    save_file({"a": torch.zeros(2), "x": torch.zeros(2)}, tmp_path / "two.safetensors")
    with pytest.raises(UserError) as error:
        average_checkpoints([tmp_path / "one.safetensors", tmp_path / "two.safetensors"], progress=False)
    message = str(error.value)
    assert "two.safetensors" in message and "one.safetensors" in message
    assert "lacks 2 of its keys (b, c)" in message and "has 1 it lacks (x)" in message


def test_mismatched_shapes_are_named(tmp_path):
    _save_run(tmp_path / "five", [(1, {})])
    torch.manual_seed(0)
    save_checkpoint(get_training_state(Tiny(classes=7), iteration=2), 2, tmp_path / "seven")
    with pytest.raises(UserError) as error:
        average_checkpoints([_checkpoint(tmp_path / "five", 1), _checkpoint(tmp_path / "seven", 2)], progress=False)
    message = str(error.value)
    assert "fc.weight has shape (5, 4)" in message and "(7, 4)" in message
    assert "and 1 more keys" in message  # fc.bias
    assert str(_checkpoint(tmp_path / "five", 1)) in message and str(_checkpoint(tmp_path / "seven", 2)) in message


@pytest.mark.parametrize("theirs, expected", [
    ({"arch": "ShuffleNetV2.Large", "classes": list("abcde")}, "two/checkpoint-0000000002.pth holds ShuffleNetV2.Large "
                                                               "and {one} OneShot; average checkpoints of one "
                                                               "architecture"),
    ({"arch": "OneShot", "classes": list("abcdz")}, "were trained on other classes (z in "),
    ({"arch": "OneShot", "classes": list("abcde"), "architecture": {"blocks": [0] * 20}},
     "hold different searched OneShot architectures")])
def test_files_of_another_model_or_other_classes_are_refused_before_their_tensors(tmp_path, theirs, expected):
    """Same-shaped classifiers of other classes averaged silently: their rows stand for other classes."""
    for folder, metadata in (("one", {"arch": "OneShot", "classes": list("abcde")}), ("two", theirs)):
        save_checkpoint(get_training_state(_randomised(0), iteration=2, metadata=metadata), 2, tmp_path / folder)
    with pytest.raises(UserError) as error:
        average_checkpoints([_checkpoint(tmp_path / "one", 2), _checkpoint(tmp_path / "two", 2)], progress=False)
    assert expected.format(one=_checkpoint(tmp_path / "one", 2)) in str(error.value)


def test_other_bad_inputs(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "float.safetensors")
    save_file({"a": torch.zeros(2, dtype=torch.int64)}, tmp_path / "int.safetensors")
    with pytest.raises(UserError, match="at least one"):
        average_checkpoints([], progress=False)
    with pytest.raises(UserError, match="given twice"):
        average_checkpoints([tmp_path / "float.safetensors"] * 2, progress=False)
    with pytest.raises(UserError, match="is one of the inputs"):
        average_checkpoints([tmp_path / "float.safetensors"], tmp_path / "float.safetensors", progress=False)
    with pytest.raises(UserError, match="floating-point and integer"):
        average_checkpoints([tmp_path / "float.safetensors", tmp_path / "int.safetensors"], progress=False)
    _save_run(tmp_path, [(1, {})])
    with pytest.raises(UserError, match="without EMA weights"):
        average_checkpoints([_checkpoint(tmp_path, 1)], use_ema=True, progress=False)


# -- best-K selection -----------------------------------------------------------------------------------------

RUN = [(10, {"top1_error": 40.0, "loss": 2.0}), (20, {"top1_error": 30.0, "loss": 1.5}),
       (30, {"top1_error": 35.0, "loss": 1.7}), (40, {"top1_error": 30.0, "loss": 1.9}),
       (50, {"loss": 1.4}), (60, {"top1_error": float("nan"), "loss": 1.6})]


def test_a_damaged_checkpoint_is_passed_over_for_the_next_best(tmp_path, capsys):
    _save_run(tmp_path, RUN[:4])
    damaged = _checkpoint(tmp_path, 40)  # ties with 20 for the best top1_error, and is newer
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert [c.iteration for c in select_best_checkpoints(tmp_path, 2, "top1_error")] == [20, 30]
    assert f"{damaged.name} does not match the SHA-256 of its sidecar" in capsys.readouterr().err
    # --save --best through the command: the average of the good ones, the output folder made only then.
    assert main(["--save", str(tmp_path), "--best", "2", "--output", str(tmp_path / "out" / "avg.safetensors"),
                 "--no-progress"]) == 0
    assert "checkpoint-0000000020.pth" in capsys.readouterr().out


def test_top_k_is_rebuilt_from_disk_after_a_restart(tmp_path, capsys):
    _save_run(tmp_path, RUN[:3])
    assert [c.iteration for c in select_best_checkpoints(tmp_path, 2, "top1_error")] == [20, 30]
    # A restart: more checkpoints arrive from another process; a fresh call sees every one, not the last
    # improvements remembered in memory. 20 and 40 tie: the newer wins.
    _save_run(tmp_path, RUN[3:])
    best = select_best_checkpoints(tmp_path, 3, "top1_error")
    assert [c.iteration for c in best] == [40, 20, 30]
    assert best[0].metrics["top1_error"] == 30.0
    assert "2 checkpoint(s)" in capsys.readouterr().err  # 50 lacks it, 60 recorded NaN
    # Higher is better: accuracy alias (100 - error) gives the same ranking.
    assert [c.iteration for c in select_best_checkpoints(tmp_path, 3, "top1")] == [40, 20, 30]
    assert [c.iteration for c in select_best_checkpoints(tmp_path, 2, "loss")] == [50, 20]
    assert [c.iteration for c in select_best_checkpoints(tmp_path, 2, "loss", lower_is_better=False)] == [10, 40]
    assert len(select_best_checkpoints(tmp_path, 10, "top1_error")) == 4
    assert "only 4" in capsys.readouterr().err


def test_selection_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        select_best_checkpoints(tmp_path / "missing", 2, "loss")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(UserError, match="holds no checkpoints"):
        select_best_checkpoints(tmp_path / "empty", 2, "loss")
    _save_run(tmp_path, RUN[:2])
    with pytest.raises(UserError, match="records 'top5'.*loss, top1_error"):
        select_best_checkpoints(tmp_path, 2, "top5")
    with pytest.raises(UserError, match="--lower-is-better or --higher-is-better"):
        select_best_checkpoints(tmp_path, 2, "f1")
    with pytest.raises(UserError, match="at least 1"):
        select_best_checkpoints(tmp_path, 0, "loss")


# -- command line ---------------------------------------------------------------------------------------------

def test_command_line_best_k(tmp_path, capsys):
    _save_run(tmp_path, RUN)
    output = tmp_path / "avg.safetensors"
    assert main(["--save", str(tmp_path), "--best", "2", "--metric", "top1", "--output", str(output),
                 "--no-progress"]) == 0
    out, err = capsys.readouterr()
    line = out.strip()
    assert line.startswith("averaged 2 checkpoint(s) (model weights): checkpoint-0000000040.pth (top1 70.000), "
                           "checkpoint-0000000020.pth (top1 70.000)")
    assert f"sha256 {file_sha256(output)}" in line
    assert "note: an average's BatchNorm statistics are means of its inputs'" in err
    # The "average" of one checkpoint is that checkpoint, its BatchNorm statistics its own: no such note.
    assert main(["--save", str(tmp_path), "--best", "1", "--metric", "top1", "--output", str(output),
                 "--no-progress"]) == 0
    assert "BatchNorm" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--save", str(tmp_path), "--best", "2", "--metric", "f1", "--output", str(output)])
    assert exit_info.value.code == 2


def test_a_plain_torch_file_names_the_recorded_facts_it_cannot_keep(tmp_path, capsys):
    """An average written as .pth dropped the inputs' class names and image size without a word: eval.py then
    refused the val folders and predict.py cropped 224px for a 64px network."""
    for iteration in (10, 20):
        state = get_training_state(_randomised(iteration), iteration=iteration,
                                   metadata={"classes": list("abcde"), "num_classes": 5, "image_size": 64})
        save_checkpoint(state, iteration, tmp_path, keep=10)
    inputs = [_checkpoint(tmp_path, 10), _checkpoint(tmp_path, 20)]
    average_checkpoints(inputs, tmp_path / "avg.pth", progress=False)
    assert (f"note: {tmp_path / 'avg.pth'} is a plain torch.save state dict, which holds no metadata: the classes, "
            "num_classes, image_size the inputs record are not in it") in capsys.readouterr().out
    average_checkpoints(inputs, tmp_path / "avg.safetensors", progress=False)
    assert "note:" not in capsys.readouterr().out
    assert read_checkpoint_metadata(tmp_path / "avg.safetensors")["image_size"] == 64


def test_command_line_explicit_inputs_as_a_module(tmp_path):
    _save_run(tmp_path, RUN[:2])
    output = tmp_path / "avg.pth"
    result = subprocess.run([sys.executable, "-m", "common.average", "--inputs", str(_checkpoint(tmp_path, 10)),
                             str(_checkpoint(tmp_path, 20)), "--output", str(output), "--no-progress"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "checkpoint-0000000010.pth (top1_error 40.000), checkpoint-0000000020.pth (top1_error 30.000)" in \
        result.stdout
    assert output.is_file()


# -- EMA across a resume --------------------------------------------------------------------------------------

def _train(model, optimizer, ema, steps, first_step):
    for step in range(first_step, first_step + steps):
        generator = torch.Generator().manual_seed(step)
        loss = model(torch.randn(4, 3, 6, 6, generator=generator)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model, step=step)


def _fresh(seed):
    model = _randomised(seed)
    model.drop.p = 0.0  # deterministic steps without touching the global RNG
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, optimizer, create_ema(model, decay=0.99)


def test_ema_continues_identically_after_resume(tmp_path):
    model, optimizer, ema = _fresh(1)
    _train(model, optimizer, ema, 12, first_step=1)
    uninterrupted = {key: value.clone() for key, value in ema.module.state_dict().items()}

    model, optimizer, ema = _fresh(1)
    _train(model, optimizer, ema, 5, first_step=1)
    path = save_checkpoint(get_training_state(model, optimizer, ema=ema, iteration=5), 5, tmp_path)
    # A new process: other initial weights everywhere, then the checkpoint.
    model, optimizer, ema = _fresh(2)
    load_checkpoint(path, model, optimizer, ema=ema)
    _train(model, optimizer, ema, 7, first_step=6)

    resumed = ema.module.state_dict()
    assert all(torch.equal(resumed[key], value) for key, value in uninterrupted.items())
    # And the EMA really is an average, not a copy of the model.
    assert not torch.equal(resumed["fc.weight"], model.fc.weight)


def test_ema_warm_up_and_low_precision():
    ema = create_ema(Tiny(), decay=0.9998)
    assert ema.get_decay(1) == 0.0 and 0.3 < ema.get_decay(2) < 0.4 and ema.get_decay(10**9) == 0.9998
    assert create_ema(Tiny().bfloat16()).module.fc.weight.dtype == torch.float32


# -- BatchNorm re-estimation ----------------------------------------------------------------------------------

class WithSideHead(nn.Module):
    """Returns (logits, side) in training mode like Large/ExLarge; the side head has its own BN."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4, momentum=0.3)
        self.side_bn = nn.BatchNorm1d(4)
        self.register_buffer("table", torch.arange(4.0))
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor):
        x = torch.relu(self.bn(self.conv(self.bn_in(x))))
        pooled = x.mean((2, 3))
        logits = self.fc(self.drop(pooled))
        return (logits, self.side_bn(pooled)) if self.training else logits


def test_recalibration_changes_only_bn_buffers_and_gives_the_cumulative_mean():
    torch.manual_seed(0)
    model = WithSideHead().double()
    with torch.no_grad():
        for norm in (model.bn_in, model.bn, model.side_bn):
            norm.running_mean.fill_(5.0)
            norm.running_var.fill_(9.0)
    model.eval()
    model.fc.train()  # a mixed mode, to see that every module's own mode comes back
    before = {key: value.clone() for key, value in model.state_dict().items()}
    batches = [torch.randn(8, 3, 5, 5, dtype=torch.float64) * (i + 1) + i for i in range(6)]
    pulled = []

    def data():
        for batch in batches:
            pulled.append(batch)
            yield batch

    recalibrate_batchnorm(model, data(), 4)

    assert len(pulled) == 4  # a batch that is not used is not fetched either
    after = model.state_dict()
    bn_buffers = {f"{name}.{buffer}" for name in ("bn_in", "bn", "side_bn")
                  for buffer in ("running_mean", "running_var", "num_batches_tracked")}
    for key, value in before.items():
        if key not in bn_buffers:
            assert torch.equal(after[key], value), key
    # The first BN sees the inputs themselves: its statistics are the plain mean of the per-batch statistics.
    means = torch.stack([batch.mean((0, 2, 3)) for batch in batches[:4]])
    variances = torch.stack([batch.transpose(0, 1).reshape(3, -1).var(1, unbiased=True) for batch in batches[:4]])
    assert torch.allclose(model.bn_in.running_mean, means.mean(0), rtol=0, atol=1e-12)
    assert torch.allclose(model.bn_in.running_var, variances.mean(0), rtol=0, atol=1e-12)
    for norm in (model.bn_in, model.bn, model.side_bn):
        assert norm.num_batches_tracked.item() == 4
        assert not torch.equal(norm.running_mean, torch.full_like(norm.running_mean, 5.0))
    assert model.bn.momentum == 0.3 and model.bn_in.momentum == 0.1
    assert not model.training and model.fc.training and not model.bn.training


def test_recalibration_with_a_forward_function_and_too_little_data():
    model = WithSideHead()
    seen = []

    def forward(net, batch):
        seen.append(batch["label"])
        return net(batch["image"])

    recalibrate_batchnorm(model, ({"image": torch.randn(4, 3, 2, 2), "label": i} for i in range(3)), 2, forward)
    assert seen == [0, 1] and model.training
    with pytest.raises(UserError, match="needs 5 batches but the data gave only 2"):
        recalibrate_batchnorm(model, [torch.randn(4, 3, 2, 2)] * 2, 5)
    assert model.bn.momentum == 0.3 and model.training


# -- what an average says about itself -------------------------------------------------------------------------

def test_an_average_claims_no_metrics_of_its_own_and_strips_local_paths(tmp_path):
    """Through the real commands: python -m common.average, then common.release of its output."""
    for iteration, error in ((10, 40.0), (20, 30.0), (30, 35.0)):
        metadata = {"arch": "Tiny", "classes": ["a", "b"], "args": {"train_dir": "/home/someone/data"}}
        save_checkpoint(get_training_state(_randomised(iteration), iteration=iteration, metadata=metadata,
                                           metrics={"top1_error": error}), iteration, tmp_path, keep=100)
    output = tmp_path / "out" / "avg.safetensors"
    result = subprocess.run([sys.executable, "-m", "common.average", "--save-dir", str(tmp_path), "--best", "2",
                             "--output", str(output), "--no-progress"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("--average-best K --recompute-bn N") == 1
    stored = read_checkpoint_metadata(output)
    assert "metrics" not in stored and "iteration" not in stored and "args" not in stored
    assert "/home/someone" not in json.dumps(stored)
    assert stored["arch"] == "Tiny" and stored["classes"] == ["a", "b"]
    assert stored["averaged_from"] == [
        {"file": "checkpoint-0000000020.pth", "iteration": 20, "metrics": {"top1_error": 30.0}},
        {"file": "checkpoint-0000000030.pth", "iteration": 30, "metrics": {"top1_error": 35.0}}]

    release = tmp_path / "release.safetensors"
    result = subprocess.run([sys.executable, "-m", "common.release", str(output), "--output", str(release)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    released = read_checkpoint_metadata(release)
    assert "metrics" not in released and released["averaged_from"] == stored["averaged_from"]


def test_a_kill_between_a_release_and_its_sidecar_leaves_no_wrong_sha256(tmp_path, monkeypatch):
    """The file was replaced first and its .sha256 second: a kill between them left the new weights beside the old
    file's SHA-256. The old sidecar now goes first, so the new file is left without one, never with a wrong one."""
    from common import release
    output = tmp_path / "average.safetensors"
    release.write_release(output, {"w": torch.zeros(3)}, {})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(release, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        release.write_release(output, {"w": torch.ones(3)}, {})
    assert load_file(output)["w"].tolist() == [1.0, 1.0, 1.0]
    assert not output.with_name("average.safetensors.sha256").exists()
