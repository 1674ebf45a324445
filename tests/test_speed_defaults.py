"""The speed settings chosen by the hardware: --amp and --channels-last "auto" per device, the measured layout
choice, the warning for emulated bf16, and train.py recording its choice and keeping it on resume."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
import warnings

import pytest
import torch
from torch import nn

from common import hardware
from common.hardware import EmulatedBF16Warning, SpeedChoice, resolve_speed
from common.checkpoint_store import get_latest_model
from common.inference import prepare_inference_model
from common.model_state import read_checkpoint_metadata
from conftest import REPO_ROOT, network


@pytest.fixture
def native_bf16(monkeypatch):
    """Fake the capability probe: `native_bf16(True)` makes this CPU look like one with AVX512-BF16."""
    monkeypatch.setattr(hardware, "_warned_emulated", False)
    return lambda native: monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: native)


def sleeper(slow: set[tuple[bool, str | None]], calls: list):
    """A `prepare` whose candidates in `slow` take 30 ms a call and the others none."""
    def prepare(channels_last, amp):
        def call():
            calls.append((channels_last, amp))
            if (channels_last, amp) in slow:
                time.sleep(0.03)
        return call
    return prepare


def test_auto_on_a_cpu_without_native_bf16_measures_the_layouts_in_float32(native_bf16):
    native_bf16(False)
    calls = []
    choice = resolve_speed(None, "auto", "cpu", sleeper({(False, None)}, calls))
    assert set(calls) == {(False, None), (True, None)}  # no bf16 candidate where it is emulated
    assert (choice.channels_last, choice.amp) == (True, None)
    assert "channels_last float32" in choice.reason and "NCHW float32" in choice.reason
    calls.clear()
    choice = resolve_speed(None, "auto", "cpu", sleeper({(True, None)}, calls))
    assert (choice.channels_last, choice.amp) == (False, None)


def test_auto_on_a_cpu_with_native_bf16_also_measures_bf16(native_bf16):
    native_bf16(True)
    calls = []
    slow = {(False, None), (True, None), (False, "bf16")}
    choice = resolve_speed(None, "auto", "cpu", sleeper(slow, calls))
    assert set(calls) == {(False, None), (True, None), (False, "bf16"), (True, "bf16")}
    assert (choice.channels_last, choice.amp) == (True, "bf16")
    # bf16 is chosen only where it measures faster: never slower than float32 NCHW.
    choice = resolve_speed(None, "auto", "cpu", sleeper({(True, None), (False, "bf16"), (True, "bf16")}, []))
    assert (choice.channels_last, choice.amp) == (False, None)


def scripted(channels_last_delays: dict[int, float]):
    """A `prepare` in which NCHW takes 30 ms a call and channels_last none, except its calls named in
    `channels_last_delays` (0 is the warm-up), which take that many seconds."""
    calls = {True: 0, False: 0}

    def prepare(channels_last, amp):
        def call():
            index = calls[channels_last]
            calls[channels_last] += 1
            time.sleep(channels_last_delays.get(index, 0.0) if channels_last else 0.03)
        return call
    return prepare


def test_one_slow_round_does_not_hide_a_faster_layout_nor_one_fast_round_pick_a_slower_one(native_bf16):
    native_bf16(False)
    # Slower than NCHW in one timed round only (something else ran then): still the faster layout.
    choice = resolve_speed(None, "auto", "cpu", scripted({2: 0.06}))
    assert (choice.channels_last, choice.amp) == (True, None), choice.reason
    # Faster in one timed round only: NCHW stays.
    choice = resolve_speed(None, "auto", "cpu", scripted({index: 0.06 for index in range(11) if index != 2}))
    assert (choice.channels_last, choice.amp) == (False, None), choice.reason


def test_plain_float32_nchw_is_the_answer_without_measuring(native_bf16):
    native_bf16(True)
    assert resolve_speed(None, "auto", "cpu", None) == SpeedChoice(False, None,
                                                                  "auto without measuring: plain float32 NCHW")


def test_explicit_flags_win_and_nothing_is_timed(native_bf16):
    native_bf16(True)
    calls = []
    choice = resolve_speed(True, "none", "cpu", sleeper(set(), calls))
    assert (choice.channels_last, choice.amp) == (True, None) and calls == []
    choice = resolve_speed(False, "bf16", "cpu", sleeper(set(), calls))
    assert (choice.channels_last, choice.amp) == (False, "bf16") and calls == []
    # Only the layout is left to measure when --amp is given.
    resolve_speed(None, "none", "cpu", sleeper(set(), calls))
    assert set(calls) == {(False, None), (True, None)}


def test_explicit_bf16_on_an_emulating_cpu_warns_once_with_what_to_expect(native_bf16):
    native_bf16(False)
    with pytest.warns(EmulatedBF16Warning, match="no native bfloat16.*slower than float32"):
        assert resolve_speed(False, "bf16", "cpu", None).amp == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_speed(False, "bf16", "cpu", None)  # once per process
    native_bf16(True)
    hardware._warned_emulated = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_speed(False, "bf16", "cpu", None)


@pytest.mark.skipif(platform.machine() != "x86_64" or not torch.backends.mkldnn.is_available(),
                    reason="oneDNN's instruction-set cap is an x86 setting")
def test_a_cpu_whose_onednn_is_held_to_avx2_has_no_native_bf16_and_explicit_bf16_warns():
    """ONEDNN_MAX_CPU_ISA=AVX2 runs oneDNN as on an AVX2-only CPU, where bf16 is emulated: the real capability check
    (not a monkeypatched one) must see that, auto must not measure bf16, and an explicit bf16 must warn."""
    code = ("from common.hardware import cpu_supports_bf16, describe_cpu, resolve_speed; print(cpu_supports_bf16()); "
            "tried = set(); resolve_speed(None, 'auto', 'cpu', lambda layout, amp: tried.add(amp) or (lambda: None)); "
            "print(sorted(map(str, tried))); print(describe_cpu()); resolve_speed(False, 'bf16', 'cpu', None)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**{name: value for name, value in os.environ.items()
                                    if name not in hardware._ISA_LIMITS}, "ONEDNN_MAX_CPU_ISA": "AVX2"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == ["False", "['None']"]
    described = result.stdout.splitlines()[2]
    assert "; bf16 emulated (not native); " in described and described.endswith("; held to ONEDNN_MAX_CPU_ISA=AVX2")
    assert "EmulatedBF16Warning: --amp bf16: this CPU has no native bfloat16" in result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_is_channels_last_with_bf16_or_fp16():
    choice = resolve_speed(None, "auto", "cuda", None)
    assert choice.channels_last is True
    assert choice.amp == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


def test_an_avx512_cpu_without_bf16_instructions_does_not_count_as_native(monkeypatch):
    """oneDNN's check alone says yes on Skylake-class CPUs, which emulate bf16; an x86 CPU needs a bf16 flag too."""
    onednn_says = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512bw"}))
    assert hardware.cpu_supports_bf16() is False
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert hardware.cpu_supports_bf16() is onednn_says
    # No /proc/cpuinfo (Windows, macOS): oneDNN's word stands.
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset())
    assert hardware.cpu_supports_bf16() is onednn_says


def test_capabilities_are_read_from_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: True)
    capabilities = hardware.cpu_capabilities()
    assert capabilities["avx512f"] and capabilities["avx512_bf16"] and not capabilities["amx_bf16"]
    assert "AVX-512, AVX512-BF16; bf16 native" in hardware.describe_cpu(capabilities)


def test_eval_fast_path_measures_its_layout_and_keeps_plain_float32_for_the_plain_path(native_bf16):
    native_bf16(False)
    torch.manual_seed(0)
    model = network("OneShot").create_network(num_classes=10)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    fast = prepare_inference_model(model, input_format=network("OneShot").INPUT_FORMAT, device="cpu", image_size=32)
    assert fast.speed.amp is None and "auto, timed on 4 images of 32px" in fast.speed.reason
    assert fast.model.memory_format == (torch.channels_last if fast.speed.channels_last else torch.contiguous_format)
    plain = prepare_inference_model(model, input_format=network("OneShot").INPUT_FORMAT, device="cpu",
                                    fold_bn=False)
    assert (plain.speed.channels_last, plain.speed.amp) == (False, None)
    torch.testing.assert_close(fast(images), plain(images), rtol=1e-4, atol=1e-4)


def test_training_step_timer_leaves_the_model_and_the_random_streams_alone():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    rng = torch.get_rng_state()
    choice = resolve_speed(None, "none", "cpu", hardware.training_step_timer(model, 4, 8, "cpu"))
    assert choice.amp is None and "paired rounds" in choice.reason
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_train_records_its_choice_and_a_resumed_run_keeps_it(tmp_path, image_folder):
    command = [sys.executable, "train.py", "--train-dir", str(image_folder), "--save", str(tmp_path),
               "--image-size", "32", "--batch-size", "4", "--workers", "0", "--display-interval", "1",
               "--val-interval", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command + ["--total-iters", "1"], cwd=REPO_ROOT / "OneShot", capture_output=True,
                           text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    assert "speed settings:" in first.stdout and "auto, timed on training steps of 4 images of 32px" in first.stdout
    path, _ = get_latest_model(tmp_path)
    metadata = read_checkpoint_metadata(path)
    chosen = metadata["args"]["channels_last"]
    assert isinstance(chosen, bool) and metadata["args"]["amp"] is None and "auto, timed" in metadata["speed"]

    resumed = subprocess.run(command + ["--total-iters", "2"], cwd=REPO_ROOT / "OneShot", capture_output=True,
                             text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr
    layout = "channels_last" if chosen else "NCHW"
    assert f"speed settings: {layout} float32 (layout and precision as recorded in the checkpoint" in resumed.stdout
    assert read_checkpoint_metadata(get_latest_model(tmp_path)[0])["args"]["channels_last"] == chosen

