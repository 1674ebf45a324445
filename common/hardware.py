"""What this machine computes fast, and the speed settings chosen from it.

`--amp auto` and `--channels-last` auto resolve per device: on CUDA channels_last with bf16 (else fp16); on a CPU
bf16 only where native, and the layout (and precision) by a short measurement on the real model, so the defaults
are never slower than float32 NCHW on the machine at hand."""
from __future__ import annotations

import copy
import functools
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# How much faster than the reference (the first candidate) another must measure to be chosen.
_MARGIN = 1.02
# Timing rounds after the warm-up: at least _ROUNDS, more (up to _MAX_ROUNDS) until _MIN_SECONDS are timed.
_ROUNDS, _MAX_ROUNDS, _MIN_SECONDS = 2, 10, 1.0
# Flags of /proc/cpuinfo that decide the speed of the CPU paths.
_CPU_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}


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
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 autocast is a speed-up."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_capabilities() -> dict:
    """What the CPU offers the fast paths: model name, vector extensions, native bf16, PyTorch's kernel level."""
    flags = cpu_flags()
    name = ""
    try:
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), "")
    except OSError:
        pass
    return {"model": name, **{key: key in flags for key in _CPU_FLAGS}, "bf16_native": cpu_supports_bf16(),
            "kernels": torch.backends.cpu.get_cpu_capability()}


def describe_cpu(capabilities: dict | None = None) -> str:
    """One line, e.g. "AMD EPYC: AVX2, AVX-512, AVX512-BF16; bf16 native; PyTorch kernels AVX512"."""
    caps = capabilities or cpu_capabilities()
    present = [label for key, label in _CPU_FLAGS.items() if caps.get(key)]
    return (f"{caps.get('model') or 'CPU'}: {', '.join(present) or 'no AVX flags read'}; bf16 "
            f"{'native' if caps['bf16_native'] else 'emulated (not native)'}; PyTorch kernels {caps['kernels']}")


_warned_emulated = False


def warn_emulated_bf16() -> None:
    """Once per process: bf16 on this CPU is emulated, so it is much slower than float32."""
    global _warned_emulated
    if _warned_emulated:
        return
    _warned_emulated = True
    warnings.warn("--amp bf16: this CPU has no native bfloat16 (no AVX512-BF16 or AMX), so PyTorch emulates it: "
                  "expect training and evaluation several times slower than float32 (6x to 11x measured for "
                  "training), with bf16's rounding; --amp auto (the default) or none runs float32",
                  EmulatedBF16Warning, stacklevel=2)


def amp_candidates(amp: str | None, device: torch.device) -> list[str | None]:
    """The precisions `--amp amp` allows on `device`: one, or float32 and bf16 to measure on a bf16-native CPU."""
    if amp in (None, "none"):
        return [None]
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, not {amp!r}")
    if amp != "auto":
        if amp == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
            warn_emulated_bf16()
        return [amp]
    if device.type == "cuda":
        return ["bf16" if torch.cuda.is_bf16_supported() else "fp16"]
    if device.type == "cpu" and cpu_supports_bf16():
        return [None, "bf16"]
    return [None]


def layout_candidates(channels_last: bool | None, device: torch.device) -> list[bool]:
    """The layouts to consider: the explicit one, channels_last on CUDA (tensor cores), both on a CPU."""
    if channels_last is not None:
        return [channels_last]
    if device.type == "cpu":
        return [False, True]
    return [device.type == "cuda"]


def choose_fastest(candidates: Sequence[tuple[bool, str | None]],
                   prepare: Callable[[bool, str | None], Callable[[], object]], *, what: str = "") -> SpeedChoice:
    """The candidate (channels_last, amp) whose call runs fastest, timed in turns after one warm-up call each.

    `prepare(channels_last, amp)` sets a candidate up and returns the call to time. Rounds take one call of each, so
    load from other processes slows all alike; each one's fastest call counts. The first candidate is the
    reference."""
    seconds: dict[int, list[float]] = {index: [] for index in range(len(candidates))}
    round_index = 0
    while round_index <= _ROUNDS or (round_index <= _MAX_ROUNDS and sum(map(sum, seconds.values())) < _MIN_SECONDS):
        for index, (channels_last, amp) in enumerate(candidates):
            call = prepare(channels_last, amp)
            started = time.perf_counter()
            call()
            if round_index:  # round 0 warms up (oneDNN builds its kernels on the first call)
                seconds[index].append(time.perf_counter() - started)
        round_index += 1
    best = {index: min(values) for index, values in seconds.items()}
    # Another candidate must beat the reference by more than timing noise to replace it.
    fastest = min(best, key=lambda index: best[index] * (1.0 if index == 0 else _MARGIN))
    channels_last, amp = candidates[fastest]
    others = ", ".join(f"{_name(*candidate)} {best[0] / best[index]:.2f}x" for index, candidate in
                       enumerate(candidates) if index)
    reason = (f"auto, timed{f' {what}' if what else ''}: {others} the speed of {_name(*candidates[0])} "
              f"(best of {round_index - 1} rounds)")
    return SpeedChoice(channels_last, amp, reason)


def resolve_speed(channels_last: bool | None, amp: str | None, device: str | torch.device,
                  prepare: Callable[[bool, str | None], Callable[[], object]] | None, *, what: str = "") -> SpeedChoice:
    """Resolve `--channels-last` (None: auto) and `--amp` for `device`: the fastest of several candidates when
    `prepare` can time them (see choose_fastest), else the first (plain float32 NCHW on a CPU)."""
    device = torch.device(device)
    candidates = [(layout, precision) for precision in amp_candidates(amp, device)
                  for layout in layout_candidates(channels_last, device)]
    if prepare is None or len(candidates) == 1:
        layout, precision = candidates[0]
        reason = ("set by the flags or the device" if len(candidates) == 1 else
                  "auto without measuring: plain float32 NCHW")
        return SpeedChoice(layout, precision, reason)
    return choose_fastest(candidates, prepare, what=what)


def _name(channels_last: bool, amp: str | None) -> str:
    return f"{'channels_last' if channels_last else 'NCHW'} {amp or 'float32'}"


def training_step_timer(model: torch.nn.Module, batch: int, image_size: int,
                        device: str | torch.device) -> Callable[[bool, str | None], Callable[[], object]]:
    """A `prepare` for choose_fastest: one forward and backward pass of a copy of `model` in train mode on
    random images, per candidate layout and precision. `model`, its BatchNorm statistics and the global random
    generators stay untouched (the caller's run stays reproducible)."""
    device = torch.device(device)
    probe = copy.deepcopy(model).train()
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)

    def prepare(channels_last: bool, amp: str | None) -> Callable[[], object]:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        probe.to(memory_format=memory_format)
        inputs = images.contiguous(memory_format=memory_format)

        def step() -> None:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                with torch.autocast(device.type, dtype=AMP_DTYPES.get(amp), enabled=amp is not None):
                    outputs = probe(inputs)
                outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
                # Any scalar of every output: the backward pass costs what the real loss's does.
                sum(output.float().mean() for output in outputs).backward()
                probe.zero_grad(set_to_none=True)

        return step

    return prepare
