"""What this machine computes fast, and the speed settings chosen from it: `--amp auto` and `--channels-last` auto
give channels_last with bf16 (else fp16) on CUDA; on a CPU bf16 only where native, and the layout (and precision)
measured on the real model, so the defaults are never slower than float32 NCHW on the machine at hand."""
from __future__ import annotations

import copy
import functools
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from common.counting import count_macs

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# How much faster than the reference (the first candidate) another must measure to be chosen.
_MARGIN = 1.05
# Timing rounds after the warm-up: at least _ROUNDS, more (up to _MAX_ROUNDS) until _MIN_SECONDS are timed. A
# candidate's speed-up is its lower quartile over the rounds, so neither one slowed round nor one lucky round decides.
_ROUNDS, _MAX_ROUNDS, _MIN_SECONDS = 4, 10, 1.0
# The training probe's batch: at least _PROBE_BATCH images, more (up to the run's own batch) until a forward pass
# holds _PROBE_MACS multiply-accumulates: a small model on a few small images runs other kernels than in training.
_PROBE_BATCH, _PROBE_MACS = 8, 1e9
# Flags of /proc/cpuinfo that decide the speed of the CPU paths.
_CPU_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}
# x86 flags of bfloat16 in hardware (AVX-NE-CONVERT: oneDNN's bf16 kernels for AVX2 CPUs that have it).
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "avx_ne_convert"})
# Environment variables that cap the instruction set of PyTorch's own kernels, oneDNN's and MKL's.
_ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def autocast(device: torch.device, amp: str | None) -> torch.autocast:
    """Autocast to `amp` ("bf16", "fp16"; None: off) on `device`."""
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(amp), enabled=amp is not None)


class EmulatedBF16Warning(UserWarning):
    """bfloat16 asked for on a CPU that only emulates it."""


@dataclass(frozen=True)
class SpeedChoice:
    """A resolved memory layout and autocast precision, and how it was chosen (one line for the log)."""

    channels_last: bool
    amp: str | None
    reason: str

    def describe(self) -> str:
        return f"{_name(self.channels_last, self.amp)} ({self.reason})"


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively, where bf16 autocast can be a speed-up. oneDNN's own check also
    says yes for AVX-512 CPUs without AVX512-BF16 or AMX (Skylake, Cascade Lake), which only emulate it: an x86 CPU
    whose flags can be read (Linux) needs one of _BF16_FLAGS too."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    flags = cpu_flags()
    return not flags or platform.machine().lower() not in ("x86_64", "amd64") or bool(flags & _BF16_FLAGS)


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
    except OSError:
        return {}
    return dict((part.strip() for part in line.split(":", 1)) for line in lines if ":" in line)


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_capabilities() -> dict:
    """What the CPU offers the fast paths: model name, vector extensions, native bf16, PyTorch's kernel level."""
    flags = cpu_flags()
    return {"model": _cpuinfo().get("model name", ""), **{key: key in flags for key in _CPU_FLAGS},
            "bf16_native": cpu_supports_bf16(), "kernels": torch.backends.cpu.get_cpu_capability()}


def describe_cpu(capabilities: dict | None = None) -> str:
    """One line, e.g. "AMD EPYC: AVX2, AVX-512, AVX512-BF16; bf16 native; PyTorch kernels AVX512"."""
    caps = capabilities or cpu_capabilities()
    present = [label for key, label in _CPU_FLAGS.items() if caps.get(key)]
    # Settings that hold the libraries below what the CPU has (to measure as on a smaller CPU) are named.
    limits = [f"{name}={os.environ[name]}" for name in _ISA_LIMITS if os.environ.get(name)]
    return (f"{caps.get('model') or 'CPU'}: {', '.join(present) or 'no AVX flags read'}; bf16 "
            f"{'native' if caps['bf16_native'] else 'emulated (not native)'}; PyTorch kernels {caps['kernels']}"
            + (f"; held to {', '.join(limits)}" if limits else ""))


# Set once the emulated-bf16 warning has been given: it is given once per process.
_warned_emulated = False


def _amp_candidates(amp: str | None, device: torch.device) -> list[str | None]:
    """The precisions `--amp amp` allows on `device`: one, or float32 and bf16 to measure on a bf16-native CPU."""
    global _warned_emulated
    if amp not in (*AMP_CHOICES, None):
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, not {amp!r}")
    if amp == "bf16" and device.type == "cpu" and not cpu_supports_bf16() and not _warned_emulated:
        _warned_emulated = True
        warnings.warn("--amp bf16: this CPU has no native bfloat16 (no AVX512-BF16 or AMX), so PyTorch emulates it: "
                      "expect training and evaluation several times slower than float32, with bf16's rounding; "
                      "--amp auto or none runs float32 here",
                      EmulatedBF16Warning, stacklevel=3)
    if amp != "auto":
        return [None if amp == "none" else amp]
    if device.type == "cuda":
        return ["bf16" if torch.cuda.is_bf16_supported() else "fp16"]
    return [None, "bf16"] if device.type == "cpu" and cpu_supports_bf16() else [None]


def resolve_speed(channels_last: bool | None, amp: str | None, device: str | torch.device,
                  prepare: Callable[[bool, str | None], Callable[[], object]] | None, *, what: str = "") -> SpeedChoice:
    """Resolve `--channels-last` (None: auto) and `--amp` for `device`: the first candidate (float32 NCHW on a CPU),
    or where `prepare(channels_last, amp)` gives a call to time, the fastest candidate that beats the first by the
    margin in three paired rounds of four (one call of each per round, so a drifting machine slows all alike)."""
    device = torch.device(device)
    # The layouts: the explicit one, channels_last on CUDA (tensor cores), both on a CPU.
    layouts = ([channels_last] if channels_last is not None else [False, True] if device.type == "cpu"
               else [device.type == "cuda"])
    candidates = [(layout, precision) for precision in _amp_candidates(amp, device) for layout in layouts]
    if prepare is None or len(candidates) == 1:
        return SpeedChoice(*candidates[0], "set by the flags or the device" if len(candidates) == 1
                           else "auto without measuring: plain float32 NCHW")
    seconds: list[list[float]] = [[] for _ in candidates]
    rounds = 0
    while rounds <= _ROUNDS or (rounds <= _MAX_ROUNDS and sum(map(sum, seconds)) < _MIN_SECONDS):
        for times, candidate in zip(seconds, candidates):
            call = prepare(*candidate)
            started = time.perf_counter()
            call()
            if rounds:  # round 0 warms up (oneDNN builds its kernels on the first call)
                times.append(time.perf_counter() - started)
        rounds += 1
    speedups = [_lower_quartile([reference / own for reference, own in zip(seconds[0], times)]) for times in seconds]
    # Another candidate must beat the reference by more than timing noise to replace it.
    fastest = max(range(len(speedups)), key=lambda index: speedups[index] / (1.0 if index == 0 else _MARGIN))
    others = ", ".join(f"{_name(*candidates[index])} {speedups[index]:.2f}x" for index in range(1, len(speedups)))
    reason = (f"auto, timed{f' {what}' if what else ''}: {others} the speed of {_name(*candidates[0])} "
              f"(the lower quartile of {rounds - 1} paired rounds)")
    return SpeedChoice(*candidates[fastest], reason)


def _lower_quartile(values: list[float]) -> float:
    """The value a quarter of `values` lie below (the smallest of fewer than four)."""
    return sorted(values)[len(values) // 4]


def _name(channels_last: bool, amp: str | None) -> str:
    return f"{'channels_last' if channels_last else 'NCHW'} {amp or 'float32'}"


def probe_batch_size(model: torch.nn.Module, batch: int, image_size: int) -> int:
    """How many images training_step_timer should time a step on, for a run training on `batch` per process."""
    per_image = count_macs(model, image_size)
    return min(batch, max(_PROBE_BATCH, math.ceil(_PROBE_MACS / max(per_image, 1))))


def training_step_timer(model: torch.nn.Module, batch: int, image_size: int,
                        device: str | torch.device) -> Callable[[bool, str | None], Callable[[], object]]:
    """A `prepare` for resolve_speed: one SGD training step of a copy of `model` on random images, per candidate
    layout and precision; `model` and the global random generators stay untouched."""
    device = torch.device(device)
    probe = copy.deepcopy(model).train()
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    # Whole steps with the optimizer, as in training: a forward and backward pass alone can rank the layouts wrongly.
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.0, momentum=0.9)

    def prepare(channels_last: bool, amp: str | None) -> Callable[[], object]:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        probe.to(memory_format=memory_format)
        for parameter, state in optimizer.state.items():  # momentum in the parameters' new layout, as in training
            state["momentum_buffer"] = torch.empty_like(parameter).copy_(state["momentum_buffer"])
        inputs = images.contiguous(memory_format=memory_format)

        def step() -> None:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                optimizer.zero_grad(set_to_none=True)
                with autocast(device, amp):
                    outputs = probe(inputs)
                outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
                # Any scalar of every output: the backward pass costs what the real loss's does.
                sum(output.float().mean() for output in outputs).backward()
                optimizer.step()

        return step

    return prepare
