"""Output paths checked before the work starts, the same way in every script.

A result written after an hour of evaluation into a folder that cannot take it is an hour lost; so each script
hands its output flags to `prepare_output` first. Missing parent folders are created; a folder that cannot be
written (read-only, a path through a regular file, no permission) is a one-line UserError naming the flag.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from common.errors import UserError


def prepare_output(flag: str, path: str | os.PathLike, *, folder: bool = False) -> Path:
    """Check that `path`, given by `flag`, can be written, and create the folders it needs.

    With `folder`, `path` is a folder the script writes files into (train.py's --save); otherwise it is a file
    (or a package folder such as an .mlpackage) whose parent folder must take a new entry. The check writes and
    removes a hidden empty file, so it answers for root and for read-only filesystems too.
    """
    path = Path(path)
    target = path if folder else path.parent
    try:
        if not folder and path.is_dir() and path.suffix != ".mlpackage":
            raise UserError(f"{flag} {path}: is a folder; give a file name")
        target.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=".write-test-", dir=target)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        if isinstance(error, (FileExistsError, NotADirectoryError)):
            reason = f"{_blocking_file(target)} is a file, not a folder"
        raise UserError(f"{flag} {path}: cannot write there ({reason}); choose another path") from None
    return path


def _blocking_file(folder: Path) -> Path:
    """The first existing non-folder on the way to `folder`."""
    for candidate in [*reversed(folder.parents), folder]:
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return folder
