"""Weights in and out: wrappers, released layouts of all three networks, damaged and unsafe files, mismatches."""
from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import network, released_state_dict
from torch import nn

from common.model_state import (WeightsFileError, WeightsMismatchError, extract_model_state, load_model_state,
                                read_checkpoint_metadata, read_weights_file, unwrap_model)

MODELS = ("OneShot", "ShuffleNetV2.Large", "ShuffleNetV2.ExLarge")
CLASSIFIER = {"OneShot": "classifier.0.weight", "ShuffleNetV2.Large": "fc.weight",
              "ShuffleNetV2.ExLarge": "fc.fc.weight"}


class Released:
    """A network and a state dict laid out like its released file (SE aliases included)."""

    def __init__(self, model: str) -> None:
        self.model = model
        # Built on the meta device and then given real (uninitialised) memory: every test overwrites the weights,
        # so drawing 0.4 billion random initial values would only cost time.
        with torch.device("meta"):
            self.net = network(model).create_network()
        self.net.to_empty(device="cpu")
        self.state = released_state_dict(model)
        self.clean = {key: value for key, value in self.state.items() if ".se_block." not in key}

    def zero(self) -> None:
        with torch.no_grad():
            for tensor in self.net.state_dict().values():
                tensor.zero_()

    def assert_loaded(self, skipped: tuple[str, ...] = ()) -> None:
        """Every tensor equals the file's value, except the `skipped` suffixes/prefixes, which stay zero."""
        for key, tensor in self.net.state_dict().items():
            if key.endswith(skipped) or key.startswith(skipped):
                assert not tensor.any(), key
            else:
                assert torch.equal(tensor, self.clean[key]), key


@pytest.fixture(scope="module", params=MODELS)
def released(request) -> Released:
    # One network at a time: Large and ExLarge hold 0.6 and 1.1 GB each.
    return Released(request.param)


def _prefixed(state: dict) -> dict:
    return {"module." + key: value for key, value in state.items()}


def _alias_only(state: dict) -> dict:
    return {key: value for key, value in state.items() if ".se_fc1." not in key and ".se_fc2." not in key}


def _without(state: dict, predicate) -> dict:
    return {key: value for key, value in state.items() if not predicate(key)}


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def _no_num_batches_tracked(state: dict) -> dict:
    return _without(state, lambda key: key.endswith("num_batches_tracked"))


LAYOUTS = {
    "flat": lambda state: state,
    "state_dict": lambda state: {"state_dict": state},
    "module_prefix": _prefixed,
    "alias_only": _alias_only,
    "no_num_batches_tracked": _no_num_batches_tracked,
    "all_at_once": lambda state: {"state_dict": _prefixed(_alias_only(_no_num_batches_tracked(state)))},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_released_layouts_load_strictly(released, layout):
    if released.model != "OneShot" and layout not in ("flat", "all_at_once"):
        pytest.skip("the large networks take these together in all_at_once (each load moves 0.6-1.1 GB)")
    obj = LAYOUTS[layout](released.state)
    keys_before = list(obj)
    released.zero()
    report = load_model_state(released.net, obj, strict=True)
    assert list(obj) == keys_before  # the caller's dict is not modified
    skipped = ("num_batches_tracked",) if layout in ("no_num_batches_tracked", "all_at_once") else ()
    released.assert_loaded(skipped)
    assert report.loaded == len(released.net.state_dict()) - len(report.missing)


def test_missing_side_heads_load_for_inference_only(released):
    if released.model == "OneShot":
        pytest.skip("OneShot has no side heads")
    state = _without(released.state, lambda key: key.startswith("predict_"))
    with pytest.raises(WeightsMismatchError) as error:
        load_model_state(released.net, state)
    assert "side heads" in _one_line(error)
    released.zero()
    report = load_model_state(released.net, {"state_dict": _prefixed(state)}, for_inference=True)
    released.assert_loaded(("predict_",))
    assert report.missing and all(key.startswith("predict_") for key in report.missing)


def test_released_files_load_strictly(released, tmp_path):
    """The 2019 format (legacy non-zip pickle, module prefixes, both SE names), and .safetensors / zip files."""
    legacy = tmp_path / "released.pkl"
    torch.save({"state_dict": _prefixed(released.state)}, legacy, _use_new_zipfile_serialization=False)
    with open(legacy, "rb") as file:
        assert file.read(2) == b"\x80\x02"  # really the legacy pickle format, not a zip archive
    released.zero()
    load_model_state(released.net, legacy)
    released.assert_loaded()
    legacy.unlink()
    if released.model != "OneShot":
        return  # the other formats take the same code path for every network; the small one is enough
    stored = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(_alias_only(released.state), stored)
    released.zero()
    load_model_state(released.net, stored)
    released.assert_loaded()
    zipped = tmp_path / "weights.pth"
    torch.save(_without(released.state, lambda key: key.endswith("num_batches_tracked")), zipped)
    released.zero()
    load_model_state(released.net, zipped)
    released.assert_loaded(("num_batches_tracked",))


def test_other_shapes_are_named_with_the_guess(released):
    state = dict(released.clean)
    key = CLASSIFIER[released.model]
    state[key] = torch.zeros(10, state[key].shape[1])
    with pytest.raises(WeightsMismatchError) as error:
        load_model_state(released.net, state, strict=False)
    text = _one_line(error)
    assert f"{key}: file (10, {state[key].shape[1]}) vs model (1000, {state[key].shape[1]})" in text
    assert f"looks like a {released.model} state dict with 10 classes" in text


def test_wrong_architecture_names_the_guessed_model(released, tmp_path):
    other = "ShuffleNetV2.Large" if released.model == "OneShot" else "OneShot"
    path = tmp_path / "other.pth"
    state = released_state_dict(other) if other == "OneShot" else _large_head()
    torch.save({"state_dict": _prefixed(state)}, path)
    with pytest.raises(WeightsMismatchError) as error:
        load_model_state(released.net, path)
    text = _one_line(error)
    assert str(path) in text and f"looks like a {other} state dict with 1000 classes" in text
    assert "missing (" in text and "unexpected (" in text
    # The original loaders' strict=False silently loaded nothing: here a file that fits nothing is refused.
    with pytest.raises(WeightsMismatchError, match="no tensor fits"):
        load_model_state(released.net, path, strict=False)


def _large_head() -> dict:
    """A few Large keys: enough to be recognised, without building 140M parameters."""
    return {"conv_last.conv.weight": torch.zeros(1280, 2048, 3, 3), "fc.weight": torch.zeros(1000, 1280),
            "fc.bias": torch.zeros(1000)}


def test_non_strict_loads_the_intersection():
    net = network("OneShot").create_network()
    state = released_state_dict("OneShot", seed=3)
    half = dict(list(state.items())[: len(state) // 2])
    half["extra.weight"] = torch.zeros(2)
    before = {key: value.clone() for key, value in net.state_dict().items()}
    with pytest.raises(WeightsMismatchError) as error:
        load_model_state(net, half)
    assert "unexpected (extra.weight)" in _one_line(error)
    assert all(torch.equal(before[key], value) for key, value in net.state_dict().items())  # nothing copied
    report = load_model_state(net, half, strict=False)
    assert report.unexpected == ["extra.weight"]
    assert report.loaded == sum(1 for key in half if key in before)
    for key, value in net.state_dict().items():
        assert torch.equal(value, half[key] if key in half else before[key]), key


def test_conflicting_se_names_mean_a_damaged_file():
    state = {"features.0.2a.se_fc1.weight": torch.ones(2, 2), "features.0.2a.se_block.0.weight": torch.zeros(2, 2)}
    with pytest.raises(WeightsFileError, match="two different tensors for features.0.2a.se_fc1.weight"):
        extract_model_state(state)
    same = {"features.0.2a.se_fc1.weight": torch.ones(2, 2), "features.0.2a.se_block.0.weight": torch.ones(2, 2)}
    assert list(extract_model_state(same)) == ["features.0.2a.se_fc1.weight"]


def test_prefixes_are_all_stripped():
    """The original stripped `module.` while iterating the dict it mutated and left keys prefixed."""
    state = {f"module._orig_mod.layer{i}.weight": torch.full((1,), float(i)) for i in range(2000)}
    clean = extract_model_state({"state_dict": state})
    assert list(clean) == [f"layer{i}.weight" for i in range(2000)]
    assert len(state) == 2000 and all(key.startswith("module.") for key in state)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_that_runs_code_is_refused(tmp_path, legacy):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(WeightsFileError) as error:
        read_weights_file(path)
    text = _one_line(error)
    assert str(path) in text and "pass --trust-pickle only for a file you made yourself" in text
    assert "(io.open)" in text and "could run anything" in text
    with pytest.raises(WeightsFileError):
        load_model_state(nn.Linear(1, 1), path)
    assert not marker.exists()


def test_trust_pickle_opts_in_for_own_old_files(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"state_dict": nn.Linear(2, 3).state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(WeightsFileError, match="trust-pickle"):
        read_weights_file(path)
    assert read_weights_file(path, trust_pickle=True)["args"].lr == 0.1
    load_model_state(nn.Linear(2, 3), path, trust_pickle=True)


@pytest.fixture(scope="module")
def good_files(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("good")
    state = {"state_dict": {f"layer{i}.weight": torch.randn(64, 64) for i in range(8)}}
    torch.save(state, folder / "zip.pth")
    torch.save(state, folder / "legacy.pkl", _use_new_zipfile_serialization=False)
    safetensors.torch.save_file(state["state_dict"], folder / "w.safetensors")
    return {name: (folder / name).read_bytes() for name in ("zip.pth", "legacy.pkl", "w.safetensors")}


@pytest.mark.parametrize("name", ["zip.pth", "legacy.pkl", "w.safetensors"])
def test_truncated_files_say_so(tmp_path, good_files, name):
    data = good_files[name]
    rng = random.Random(name)
    for cut in [9, 100, len(data) // 2, len(data) - 10] + [rng.randrange(9, len(data)) for _ in range(6)]:
        path = tmp_path / name
        path.write_bytes(data[:cut])
        with pytest.raises(WeightsFileError) as error:
            read_weights_file(path)
        text = _one_line(error)
        assert str(path) in text and ("ends early" in text or "damaged" in text), text
        assert "size" in text
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match="ends early"):
        read_weights_file(path)


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty (0 bytes)"),
    (os.urandom(4096), "not a PyTorch or safetensors weights file"),
    (b"\n<!DOCTYPE html><html><head><title>404 Not Found</title></head></html>", "HTML"),
    (b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>", "HTML/XML page"),
    (b"Not Found", "it starts with 'Not Found'"),
])
def test_files_that_are_not_weights(tmp_path, content, expected):
    if content[:1] == b"\x80" or content[:2] == b"PK":
        content = b"\x00" + content  # keep the random case random, not a pickle or zip by chance
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsFileError) as error:
        load_model_state(nn.Linear(1, 1), path)
    text = _one_line(error)
    assert str(path) in text and expected in text


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(WeightsFileError, match="no such file"):
        read_weights_file(tmp_path / "nope.pth")
    with pytest.raises(WeightsFileError, match="is a folder"):
        read_weights_file(tmp_path)


def test_an_export_given_as_weights_is_named_as_such(tmp_path):
    onnx_file, package = tmp_path / "OneShot.onnx", tmp_path / "renamed"
    onnx_file.write_bytes(b"\x08\x0a\x12\x07pytorch")
    package.mkdir()
    (package / "Manifest.json").write_text("{}")
    for path, kind in ((onnx_file, "an ONNX model"), (package, "a Core ML package")):
        with pytest.raises(WeightsFileError, match=f"is an export \\({kind}\\), not weights"):
            read_weights_file(path)


def test_legacy_and_zip_read_with_weights_only(tmp_path, good_files):
    for name in ("zip.pth", "legacy.pkl"):
        path = tmp_path / name
        path.write_bytes(good_files[name])
        obj = read_weights_file(path)
        assert set(obj["state_dict"]) == {f"layer{i}.weight" for i in range(8)}
    assert read_checkpoint_metadata(path) == {}
    assert read_checkpoint_metadata(obj) == {}


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)


def test_unwrap_every_wrapper(tmp_path):
    from timm.utils import ModelEmaV3
    from torch.optim.swa_utils import AveragedModel

    model = _Tiny()
    keys = list(model.state_dict())
    assert unwrap_model(nn.DataParallel(model)) is model
    compiled = torch.compile(model)
    assert unwrap_model(compiled) is model
    assert unwrap_model(nn.DataParallel(compiled)) is model
    ema = ModelEmaV3(model)
    assert list(unwrap_model(ema).state_dict()) == keys and unwrap_model(ema) is ema.module
    averaged = AveragedModel(model)
    assert unwrap_model(averaged) is averaged.module
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(compiled)
        assert unwrap_model(ddp) is model and list(unwrap_model(ddp).state_dict()) == keys
        target = _Tiny()
        load_model_state(nn.parallel.DistributedDataParallel(target), unwrap_model(ddp).state_dict())
        assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), model.state_dict().values()))
    finally:
        torch.distributed.destroy_process_group()
    # A checkpoint saved from a compiled DDP model has both prefixes.
    load_model_state(_Tiny(), {f"_orig_mod.module.{key}": value for key, value in model.state_dict().items()})
