"""Atomic file output and SHA-256: every file this project writes goes through here, so that a crash, a kill or a
full disk at any moment leaves the old file or the complete new one, never a part.

A file is written to a hidden temporary name beside its target (`.<name>.<pid>.tmp`), fsynced, renamed over the
target, and the rename made durable by fsyncing the folder.
"""
from __future__ import annotations

import errno
import hashlib
import mmap
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

# Writes at least this large are hashed in a second thread while they are written, in pieces of _PIECE bytes.
_PARALLEL_HASH_BYTES = 1 << 20
_PIECE = 64 << 20
# After this many bytes are written, a third thread asks the disk to store them (fdatasync) while later ones are
# hashed and written, so the final fsync waits only for the last ones (the kernel alone starts writing back late).
_WRITEBACK_BYTES = 256 << 20
_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
# Bytes read and hashed per step when checking a file, and how many steps the reading runs ahead of the hash.
_HASH_CHUNK = 16 << 20
_CHUNKS_AHEAD = 8
# madvise(MADV_POPULATE_READ) reads a mapped range into memory (Linux 5.14+); Python names it from 3.12 on.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22) if sys.platform.startswith("linux") else None


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
    with (open(path, "wb") as file, ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher,
          ThreadPoolExecutor(max_workers=1, thread_name_prefix="writeback") as flusher):
        writer = _HashingWriter(file, hasher, flusher)
        try:
            write(writer)
            file.flush()
            writer.wait_for_writeback()
            os.fsync(file.fileno())
        except Exception:
            if writer.error is not None:
                raise writer.error from None
            raise
    return writer.sha256.hexdigest(), writer.size


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's content. On Linux the file is mapped and hashed in place while a second thread has
    the kernel read the next pieces into the page cache (no copy into a buffer: on a 2-core machine the copy competed
    with the hash); elsewhere, or where the file cannot be mapped, each chunk read is hashed in a second thread while
    the next is read. Either way the time is about that of the slower of the disk and the hash, not their sum."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size and _MADV_POPULATE_READ is not None:
            try:
                mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError:  # a file system that cannot map files
                mapping = None
            if mapping is not None:
                with mapping:
                    digest = _sha256_mapped(mapping, size)
                if digest is not None:
                    return digest
        return _sha256_read(file)


def _sha256_mapped(mapping: mmap.mmap, size: int) -> str | None:
    """The SHA-256 of a mapped file, or None where the kernel cannot populate a mapping (before Linux 5.14)."""
    def populate(start: int) -> None:
        mapping.madvise(_MADV_POPULATE_READ, start, min(_HASH_CHUNK, size - start))

    try:
        populate(0)
    except OSError as error:
        if error.errno == errno.EINVAL:
            return None
        raise
    digest = hashlib.sha256()
    starts = range(0, size, _HASH_CHUNK)
    view = memoryview(mapping)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="readahead") as reader:
        # The reads of the chunks after the one being hashed, oldest first (the first chunk is read already).
        reading = deque(reader.submit(populate, start) for start in starts[1:1 + _CHUNKS_AHEAD])
        try:
            for index, start in enumerate(starts):
                if index:
                    reading.popleft().result()
                if index + 1 + _CHUNKS_AHEAD < len(starts):
                    reading.append(reader.submit(populate, starts[index + 1 + _CHUNKS_AHEAD]))
                digest.update(view[start:start + _HASH_CHUNK])
        finally:
            view.release()
    return digest.hexdigest()


def _sha256_read(file: BinaryIO) -> str:
    digest = hashlib.sha256()
    buffers = (bytearray(_HASH_CHUNK), bytearray(_HASH_CHUNK))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:
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
    tensor's storage as a memoryview (no copy); a large one is written in pieces, each hashed in a second thread
    while the next is written (both release the GIL), and what is written is sent to the disk by a third thread
    meanwhile: the time is that of the slowest of the three, not their sum."""

    def __init__(self, file: BinaryIO, hasher: ThreadPoolExecutor, flusher: ThreadPoolExecutor) -> None:
        self._file, self._hasher, self._flusher = file, hasher, flusher
        self._writeback: Future | None = None
        self._not_written_back = 0
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        if len(view) < _PARALLEL_HASH_BYTES:
            self._write(view)
            self.sha256.update(view)
            return len(view)
        hashing = []
        try:
            for start in range(0, len(view), _PIECE):
                piece = view[start:start + _PIECE]
                hashing.append(self._hasher.submit(self.sha256.update, piece))
                self._write(piece)
                self._start_writeback(len(piece))
        finally:
            # The memoryview may point into memory torch frees once this call returns: finish hashing first.
            for future in hashing:
                future.result()
        return len(view)

    def _write(self, data: memoryview) -> None:
        try:
            self._file.write(data)
        except OSError as error:
            # torch.save's C++ writer turns exceptions into a RuntimeError; keep the OSError for the message.
            self.error = error
            raise
        self.size += len(data)

    def _start_writeback(self, count: int) -> None:
        self._not_written_back += count
        if self._not_written_back >= _WRITEBACK_BYTES and (self._writeback is None or self._writeback.done()):
            self.wait_for_writeback()  # done already: raises its error, if any
            self._file.flush()
            self._writeback = self._flusher.submit(_datasync, self._file.fileno())
            self._not_written_back = 0

    def wait_for_writeback(self) -> None:
        """Wait for the writeback in flight; its OSError (a full disk can show only then) is raised here."""
        if self._writeback is not None:
            try:
                self._writeback.result()
            except OSError as error:
                self.error = error
                raise

    def flush(self) -> None:
        self._file.flush()
