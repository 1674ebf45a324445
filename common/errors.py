"""Errors a user can fix. Scripts print their message on one line and exit with status 2, no traceback; a full disk
or a path that cannot be written during the work ends them with one line and status 1; a Ctrl-C with one line and
status 130, as a shell reports an interrupted command; output piped into a reader that left (`| head`) quietly
with status 141, as a shell reports a command its pipe stopped. Libraries' notices about themselves, which nobody
can act on, are kept off the output."""
from __future__ import annotations

import errno
import functools
import logging
import os
import select
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager


def listed(names: Sequence[str], shown: int = 3) -> str:
    """The first `shown` of `names` for a message, and how many more there are."""
    return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")


# Failures of the disk or the file system rather than of this code: a full disk, a quota, a read-only or vanished
# folder. Outputs are checked before the work starts (cli.prepare_output); these can still come during it.
_FILE_SYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT,
                       errno.ENOTDIR, errno.EISDIR}


# coremltools says that its macOS-only runtime is absent; torch logs a deprecation notice for what torchao (which
# coremltools and ExecuTorch import) registers.
_LIBRARY_NOTICE_LOGGERS = ("coremltools", "torch.utils._pytree")


@contextmanager
def library_notices_quieted() -> Iterator[None]:
    """Only errors from the loggers of libraries' notices about themselves during the block."""
    loggers = [logging.getLogger(name) for name in _LIBRARY_NOTICE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class UserError(Exception):
    """Bad input: a missing file, a wrong flag, a file that holds something else. The message says what to do."""

    exit_status = 2


def exit_on_user_error(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Decorate a script's main(): a UserError becomes `error: <message>` on stderr and its exit status (2; 1 for a
    checkpoint that could not be written), a file system failure (full disk, read-only or vanished folder)
    `error: <path>: <reason>` and exit status 1, a Ctrl-C (KeyboardInterrupt) `stopped (Ctrl-C)` and exit status
    130, a SIGTERM `stopped (SIGTERM)` and 143; this project's warnings print as one line."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        warnings.formatwarning = _format_warning
        # SIGTERM (kill, SLURM, torchrun) ends the script as a Ctrl-C does, through the `finally` blocks that remove
        # a partial output, where its default would kill it on the spot; a handler set by someone else stays.
        terminable = (threading.current_thread() is threading.main_thread()
                      and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
        if terminable:
            signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(error.exit_status)
        except BrokenPipeError:
            if not output_reader_left():
                raise
            sys.exit(128 + 13)  # SIGPIPE's number
        except OSError as error:
            if error.errno not in _FILE_SYSTEM_ERRNOS:
                raise
            where = f"{error.filename}: " if error.filename else ""
            print(f"error: {where}{error.strerror}; the files written before are intact (check the folder, its "
                  "permissions and free space)", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt as stop:
            terminated = isinstance(stop, Terminated)
            if os.environ.get("RANK", "0") == "0":  # under torchrun the terminal's Ctrl-C reaches every rank
                print(f"\nstopped ({'SIGTERM' if terminated else 'Ctrl-C'})", file=sys.stderr)
            sys.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))
        finally:
            if terminable:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return wrapper


class Terminated(KeyboardInterrupt):
    """A SIGTERM, raised where the main thread is. A KeyboardInterrupt, so that what handles a Ctrl-C (a data
    loader's worker processes, which stop quietly) handles it alike."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def output_reader_left() -> bool:
    """Whether stdout or stderr is a pipe whose reader left; what they still hold then goes to /dev/null, not to a
    second error at exit. A broken pipe elsewhere (not the script's output) is a failure like any other."""
    left = False
    for stream in (sys.stdout, sys.stderr):
        try:
            poller = select.poll()
            poller.register(stream.fileno(), select.POLLOUT)
            broken = any(events & select.POLLERR for _, events in poller.poll(0))
        except (OSError, ValueError, AttributeError):  # not a real file (a test's capture), or closed
            continue
        if broken:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
            left = True
    return left


_library_format = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """This project's warnings as one line, `warning: <message>`, as its errors are; a library's keep Python's form,
    whose file and line say where they come from."""
    if category.__module__.startswith("common."):
        return f"warning: {message}\n"
    return _library_format(message, category, filename, lineno, line)
