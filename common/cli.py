"""Command-line pieces every script shares: output paths checked before the work starts, flag types, help defaults,
and running one script from another. A result written after an hour into a folder that cannot take it is an hour
lost."""
from __future__ import annotations

import argparse
import atexit
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import NoReturn, TypeVar

from common.errors import UserError

T = TypeVar("T")


def prepare_output(flag: str, path: str | os.PathLike | None, *, folder: bool = False) -> Path | None:
    """Check that `path`, given by `flag`, can be written (a one-line UserError naming the flag if not), and create
    the folders it needs (removed at exit if still empty); None (an optional output not asked for) passes. With
    `folder`, `path` is a folder to write files into; otherwise a file or package folder. The check writes and
    removes a hidden empty file, so it also answers for root and read-only filesystems."""
    if path is None:
        return None
    path = Path(path)
    target = path if folder else path.parent
    try:
        if not folder and path.is_dir() and path.suffix != ".mlpackage":
            raise UserError(f"{flag} {path}: is a folder; give a file name")
        missing = [p for p in [*reversed(target.parents), target] if not p.exists()]
        target.mkdir(parents=True, exist_ok=True)
        _MADE.extend(missing)
        descriptor, probe = tempfile.mkstemp(prefix=".write-test-", dir=target)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        if isinstance(error, (FileExistsError, NotADirectoryError)):
            # The first existing non-folder on the way to `target`.
            blocking = next((p for p in [*reversed(target.parents), target] if p.exists() and not p.is_dir()), target)
            reason = f"{blocking} is a file, not a folder"
        raise UserError(f"{flag} {path}: cannot write there ({reason}); choose another path") from None
    return path


# The folders prepare_output made: those a command leaves empty (it failed before writing there) go at exit.
_MADE: list[Path] = []


@atexit.register
def _remove_made_if_empty() -> None:
    for folder in reversed(_MADE):
        with suppress(OSError):
            folder.rmdir()  # only an empty one


def prepare_outputs(outputs: dict[str, str | os.PathLike | None],
                    inputs: dict[str, str | os.PathLike | Sequence[str] | None]) -> None:
    """`prepare_output` for each output file by its flag, once none is another output or one of the files the
    command reads (a one-line UserError naming the flags): `inputs` maps a flag to its file, or to the files it
    stands for (the images of --val-dir). Writing it would destroy the input, or the other result. Inputs are
    compared only with outputs that exist already."""
    given = {flag: Path(path) for flag, path in outputs.items() if path is not None}
    claimed: dict[str, str] = {}
    for flag, path in given.items():
        other = claimed.setdefault(os.path.realpath(path), flag)
        if other != flag:
            raise UserError(f"{flag} {path} is the file {other} writes too; give each its own path")
    existing = {}
    for flag, path in given.items():
        with suppress(OSError):
            found = path.stat()
            existing[(found.st_dev, found.st_ino)] = flag
    for source, files in inputs.items() if existing else ():
        for file in [files] if isinstance(files, (str, os.PathLike)) else files or ():
            with suppress(OSError):
                found = os.stat(file)
                if (flag := existing.get((found.st_dev, found.st_ino))) is not None:
                    one = "the" if isinstance(files, (str, os.PathLike)) else "one of the"
                    raise UserError(f"{flag} {given[flag]} is {one} {source} file{'s' * (one != 'the')}: writing it "
                                    "would destroy it; choose another path")
    for flag, path in outputs.items():
        prepare_output(flag, path)


def checked(convert: Callable[[str], T], within: Callable[[T], bool], requirement: str) -> Callable[[str], T]:
    """An argparse type: `convert(text)` where `within` holds for it. Otherwise the flag is refused when the command
    line is parsed, before any work, as `<flag> <text>: <requirement>` (NaN is never within a range)."""

    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            kind = "not a whole number; " if convert is int else ""
            raise argparse.ArgumentTypeError(f"{text}: {kind}{requirement}") from None
        if not within(value):
            raise argparse.ArgumentTypeError(f"{text}: {requirement}")
        return value

    parse.__name__ = convert.__name__  # argparse names the type by it
    return parse


def _macs(text: str) -> float:
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:].upper())
    return float(text[:-1]) * scale if scale else float(text)


# The flag types the scripts share: counts, --workers, --seed (the range Python's, NumPy's and torch's generators all
# take), fractions, --image-size, and multiply-accumulates as the scripts print them (330M, 0.1G, 330e6).
positive_int = checked(int, lambda value: value >= 1, "must be at least 1")
zero_or_more = checked(int, lambda value: value >= 0, "must be 0 or more")
worker_count = checked(int, lambda value: value >= 0, "must be 0 (load in the main process) or more")
seed_value = checked(int, lambda value: 0 <= value < 2**32, "must be between 0 and 2**32 - 1")
fraction = checked(float, lambda value: 0 <= value <= 1, "must be between 0 and 1")
multiple_of_32 = checked(int, lambda value: value >= 32 and value % 32 == 0,
                     "use a multiple of 32, at least 32, such as 224 (the networks halve the resolution five "
                     "times; at other sizes the halvings pad unevenly)")
_any_mac_count = checked(_macs, lambda value: 0 <= value < math.inf,
                         "give a number of multiply-accumulates, 0 or more, such as 330e6 or 330M")


def mac_count(text: str) -> float:
    """An argparse type for multiply-accumulates (330M, 0.1G, 330e6); a count between 0 and 1M is refused, as it
    is a unit left out (`330` for 330M) rather than a budget any of these networks could meet."""
    value = _any_mac_count(text)
    if 0 < value < 1e6:
        example = f"{text}M" if text[-1:].isdigit() else "330M"
        raise argparse.ArgumentTypeError(f"{text}: {value:g} multiply-accumulates, fewer than any network here; "
                                         f"give millions with M, such as {example}")
    return value


def existing_folder(text: str) -> str:
    """An argparse type for a folder that must already exist."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    return text


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help only where it tells something: not for a default of None or
    False (an unset option, an off switch), and not where the help already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if any(action.default is unset for unset in (None, False, argparse.SUPPRESS)) or "default" in text:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """The parser of every script: a refused command line is one line, `error: <flag> <value>: what is wrong`, and
    exit status 2, as the scripts' other errors are (a UserError; argparse would print its whole usage first), and
    the help shows each default where it tells something."""

    def __init__(self, *args, formatter_class: type = DefaultsHelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UserError(re.sub(r"^argument ([^:]+): ", r"\1 ", message))


def add_device_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--device, worded the same in every script."""
    parser.add_argument("--device", default="auto",
                        help="auto (the default): the GPU when CUDA is present, else the CPU; or cpu, cuda, cuda:N")


def add_weights_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, use: str) -> None:
    """--ema (or --use-ema) and --trust-pickle, worded the same in every script that reads a weights file; `use`
    says what the script does with the weights ("evaluate", "export", ...)."""
    parser.add_argument("--ema", "--use-ema", dest="use_ema", action="store_true",
                        help=f"{use} the EMA weights stored in training checkpoints instead of the trained weights")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow a weights file that loads only by running code stored in it: only for a file you "
                             "made yourself")


class _LogLines:
    """A log file as tqdm's output: each refresh a line of its own instead of a rewrite after a carriage return, so
    that a line written meanwhile (a skipped file's) starts on its own line too."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(**options):
    """A tqdm progress bar on stderr: redrawn in place on a terminal; in a log file (SLURM's output, `2> log`) a
    line every 30 seconds."""
    from tqdm import tqdm  # on first use: --help imports no tqdm
    if sys.stderr.isatty():
        return tqdm(file=sys.stderr, dynamic_ncols=True, **options)
    return tqdm(file=_LogLines(sys.stderr), mininterval=30, ncols=100, **options)


def run_script(command: list[str], cwd: str | os.PathLike | None = None, stopped: str | None = None) -> int:
    """Run another of this project's scripts as a child process; its exit status. A Ctrl-C or SIGTERM is passed
    on to the child, which finishes stopping by itself (a training run saves its checkpoint, an export removes its
    partial output) and says so; then this process exits 130 or 143 after the line `stopped` (by default "stopped
    (Ctrl-C)", and only where the child did not say it). The child has a process group of its own, so each signal
    reaches it once: a terminal's Ctrl-C reaching it directly as well would be a second one, which tells a training
    run to stop without saving."""
    process = subprocess.Popen(command, cwd=cwd, process_group=0)
    received = []

    def pass_on(signum: int, frame) -> None:
        received.append(signum)
        process.send_signal(signum)

    previous = {signum: signal.signal(signum, pass_on) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not received:
        return status
    code = 128 + received[0]
    if stopped or status != code:  # the child ended otherwise, without saying it stopped
        name = "Ctrl-C" if received[0] == signal.SIGINT else signal.Signals(received[0]).name
        print(f"\n{stopped or f'stopped ({name})'}", file=sys.stderr)
    sys.exit(code)
