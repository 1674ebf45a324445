"""Atomic file output and SHA-256: every file this project writes goes through here, so that a crash, a kill or a
full disk at any moment leaves the old file or the complete new one, never a part.

A file is written to a hidden temporary name beside its target (`.<name>.<pid>.tmp`), fsynced, renamed over the
target, and the rename made durable by fsyncing the folder.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

# Writes at least this large are hashed in a second thread while they are written.
_PARALLEL_HASH_BYTES = 1 << 20
# Bytes read and hashed per step when checking a file.
_HASH_CHUNK = 16 << 20


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for the caller to write the whole new file to; when the block ends without an
    exception it replaces `path` durably, on any exception it is removed."""
    path = Path(path)
    temp = temp_path(path)
    try:
        yield temp
        _fsync(temp, os.O_RDWR)  # Windows refuses to fsync a read-only descriptor
        os.replace(temp, path)
    except BaseException:
        remove_quietly(temp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> tuple[str, int]:
    """Write `path` atomically through `write(file)`; returns (SHA-256 hex, size), hashed on the way. Raises OSError."""
    with atomic_output(path) as temp:
        return write_hashed(temp, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write(path, lambda file: file.write(text.encode()))


def write_hashed(path: Path, write: Callable[[BinaryIO], object]) -> tuple[str, int]:
    """Create `path` through `write(file)`, hashing the bytes as they pass, then fsync it; returns (SHA-256, size).
    The OSError of a failed write (e.g. ENOSPC) is raised as itself, even from writers that wrap it."""
    with open(path, "wb") as file, ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:
        writer = _HashingWriter(file, hasher)
        try:
            write(writer)
            file.flush()
            os.fsync(file.fileno())
        except Exception:
            if writer.error is not None:
                raise writer.error from None
            raise
    return writer.sha256.hexdigest(), writer.size


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's content: each chunk is hashed in a second thread while the next is read, so the
    time is that of the slower of the disk and the hash, not their sum."""
    digest = hashlib.sha256()
    buffers = (bytearray(_HASH_CHUNK), bytearray(_HASH_CHUNK))
    with open(path, "rb") as file, ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:
        hashing, index = None, 0
        while True:
            view = memoryview(buffers[index])
            count = file.readinto(view)  # the other buffer is being hashed meanwhile
            if hashing is not None:
                hashing.result()
            if not count:
                return digest.hexdigest()
            hashing = hasher.submit(digest.update, view[:count])
            index = 1 - index


def temp_path(path: Path) -> Path:
    """The hidden temporary name a file is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (POSIX; elsewhere directories cannot be opened for fsync)."""
    if os.name == "posix":
        _fsync(folder, os.O_RDONLY)


def _fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_quietly(path: Path) -> None:
    """Remove a file if it is there; a failure to remove it is no reason to stop."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


class _HashingWriter:
    """A write-only file wrapper that hashes and counts the bytes passing through it. torch.save hands over each
    tensor's storage as a memoryview (no copy); a large one is hashed in a second thread while this one writes it
    (both release the GIL), so hashing costs no extra time where the disk is the slower of the two."""

    def __init__(self, file: BinaryIO, hasher: ThreadPoolExecutor) -> None:
        self._file, self._hasher = file, hasher
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        hashing = self._hasher.submit(self.sha256.update, data) if len(data) >= _PARALLEL_HASH_BYTES else None
        try:
            written = self._file.write(data)
        except OSError as error:
            # torch.save's C++ writer turns exceptions into a RuntimeError; keep the OSError for the message.
            self.error = error
            raise
        finally:
            # The memoryview may point into memory torch frees once this call returns: finish hashing first.
            if hashing is not None:
                hashing.result()
        if hashing is None:
            self.sha256.update(data)
        self.size += len(data)
        return written

    def flush(self) -> None:
        self._file.flush()
