"""Atomic file output and SHA-256: every file this project writes goes through here, so that a crash, a kill or a
full disk leaves the old file or the complete new one, never a part. A file is written to a hidden temporary name
beside its target, fsynced, renamed over the target, and the rename made durable by fsyncing the folder. Large files
are hashed in pieces on every core while they are written or read, as one SHA-256 is slower than the disk. A run
that writes an output over a long time (checkpoints, a search's state) first claims it with a lock file."""
from __future__ import annotations

import atexit
import errno
import hashlib
import mmap
import os
import platform
import re
import shutil
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any, BinaryIO

from common.errors import UserError

# Maps a write's data to the buffers to write in its place, or None to write the data itself.
Substitute = Callable[[memoryview], Iterable[memoryview] | None]
# Smaller writes are hashed in the writing thread; at most _MAX_PENDING batches of parts wait for a hasher.
_PARALLEL_HASH_BYTES = 1 << 20
_MAX_PENDING = 2 * (os.cpu_count() or 1)
# After this many bytes a flusher thread asks the disk to store them, so the final fsync waits for the last ones only.
_WRITEBACK_BYTES = 256 << 20
_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
# Bytes read per step, into the page cache or, where a file cannot be mapped, into memory.
_READ_CHUNK = 16 << 20
# madvise(MADV_POPULATE_READ) reads a mapped range into memory (Linux 5.14+); Python names it from 3.12 on.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22) if sys.platform.startswith("linux") else None
# The outputs this process is the one writer of, each with its open, locked lock file (see claim_output).
_CLAIMED: dict[Path, Any] = {}


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for the caller to write the whole new file to; when the block ends without an
    exception it replaces `path` durably, on any exception it is removed. An OSError that names no file (a write to
    a full disk) is raised naming `path`."""
    path = Path(path)
    temp = temp_path(path)
    try:
        with failures_named(path):
            yield temp
            _fsync(temp, os.O_RDWR)  # Windows refuses to fsync a read-only descriptor
            os.replace(temp, path)
    except BaseException:
        remove_quietly(temp)
        raise
    fsync_dir(path.parent)


@contextmanager
def failures_named(path: str | os.PathLike) -> Iterator[None]:
    """An OSError of the block that names no file (a write to a full disk, by this code or a library's writer) is
    raised naming `path`, the output the user asked for, so the one-line error says which file failed."""
    try:
        yield
    except shutil.Error as error:
        # shutil.copytree (coremltools' package save) keeps only each failure's text: "[Errno 28] No space ...".
        failures = error.args[0] if error.args and isinstance(error.args[0], list) else []
        found = re.match(r"\[Errno (\d+)\] ([^:]+)", str(failures[0][-1])) if failures else None
        if found is None:
            raise
        raise OSError(int(found[1]), found[2], str(path)) from error
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> tuple[str, int]:
    """Write `path` atomically through `write(file)`; returns (SHA-256 hex, size), hashed on the way. Raises OSError."""
    with atomic_output(path) as temp:
        return write_hashed(temp, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write(path, lambda file: file.write(text.encode()))


def write_hashed(path: Path, write: Callable[[BinaryIO], object], piece_bytes: int | None = None,
                 substitute: Substitute | None = None) -> tuple[str, int]:
    """Create `path` through `write(file)`, hashing the bytes as they pass, then fsync it; returns (digest, size):
    the SHA-256, or with `piece_bytes` the pieces' SHA-256 (see `pieces_sha256`). `substitute(data)` may return the
    buffers to write in place of a write's data. A failed write's OSError is raised as itself, even from wrappers."""
    workers = 1 if piece_bytes is None else os.cpu_count() or 1
    with (open(path, "wb") as file, ThreadPoolExecutor(workers, thread_name_prefix="sha256") as hashers,
          ThreadPoolExecutor(max_workers=1, thread_name_prefix="writeback") as flusher):
        writer = _HashingWriter(file, hashers, flusher, piece_bytes, substitute)
        try:
            write(writer)
            file.flush()
            writer.wait_for_writeback()
            os.fsync(file.fileno())
        except Exception:
            if writer.error is not None:
                raise writer.error from None
            raise
    return writer.digest(), writer.size


def file_sha256(path: str | os.PathLike, piece_bytes: int | None = None) -> str:
    """SHA-256 (hex) of a file's content, or with `piece_bytes` its pieces' SHA-256 (see `pieces_sha256`)."""
    with open(path, "rb") as file:
        if piece_bytes is None:
            return hashlib.file_digest(file, "sha256").hexdigest()
        return _file_pieces_sha256(file, piece_bytes)


def pieces_sha256(piece_digests: Iterable[bytes]) -> str:
    """The SHA-256 of the pieces' SHA-256 digests in order: a file of n bytes has ceil(n / piece_bytes) pieces, each
    piece_bytes long but the last."""
    return hashlib.sha256(b"".join(piece_digests)).hexdigest()


def _file_pieces_sha256(file: BinaryIO, piece_bytes: int) -> str:
    """On Linux this thread reads the mapped file in order, each piece hashed once it is in; elsewhere hashers read."""
    fd = file.fileno()
    size = os.fstat(fd).st_size
    try:
        mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size and _MADV_POPULATE_READ is not None else None
    except OSError:  # a file system that cannot map files
        mapping = None

    def hash_piece(start: int, end: int) -> bytes:
        if mapping is not None:
            with memoryview(mapping) as view, view[start:end] as piece:
                return hashlib.sha256(piece).digest()
        digest = hashlib.sha256()
        for offset in range(start, end, _READ_CHUNK):
            digest.update(os.pread(fd, min(_READ_CHUNK, end - offset), offset))
        return digest.digest()

    populate, read = mapping is not None, 0
    try:
        with ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="sha256") as hashers:
            hashing = []
            for start in range(0, size, piece_bytes):
                end = min(start + piece_bytes, size)
                while populate and read < end:
                    length = min(_READ_CHUNK, size - read)
                    try:
                        mapping.madvise(_MADV_POPULATE_READ, read, length)
                    except OSError as error:
                        if error.errno != errno.EINVAL:
                            raise
                        populate = False  # a kernel before 5.14: the hashers' page faults read instead
                    read += length
                hashing.append(hashers.submit(hash_piece, start, end))
            return pieces_sha256(future.result() for future in hashing)
    finally:
        if mapping is not None:
            mapping.close()


def claim_output(lock_path: str | os.PathLike, refusal: Callable[[str], str]) -> AbstractContextManager:
    """Make this process the one writer of what `lock_path` guards until it ends, or until the context manager
    returned is left (an exclusive lock on that file, which names the holder, and which is removed then); a second
    process is refused with UserError(refusal(" (process N on HOST)")). Nothing is locked where files cannot be
    locked (Windows, some network file systems). A full disk is named."""
    try:
        import fcntl
    except ImportError:
        return nullcontext()
    key = Path(lock_path).resolve()
    if key in _CLAIMED:
        return nullcontext()  # claimed already, for as long as that claim says
    with failures_named(key):
        while True:
            lock = open(key, "a+")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip()
                lock.close()
                raise UserError(refusal(f" ({holder})" if holder else "")) from None
            except OSError:
                lock.close()
                return nullcontext()
            # A holder that just ended removed the file this one opened: lock the file there now instead.
            with suppress(FileNotFoundError):
                if os.stat(key).st_ino == os.fstat(lock.fileno()).st_ino:
                    break
            lock.close()
        try:
            lock.truncate(0)
            lock.write(f"process {os.getpid()} on {platform.node()}\n")
            lock.flush()
        except BaseException:
            lock.close()
            raise
    _CLAIMED[key] = lock
    return _Claim(key)


class _Claim(AbstractContextManager):
    def __init__(self, key: Path) -> None:
        self.key = key

    def __exit__(self, *exc) -> None:
        _release(self.key)


@atexit.register
def _release_all() -> None:
    for key in list(_CLAIMED):
        _release(key)


def _release(key: Path) -> None:
    """End a claim: its lock file removed while still locked (a claimant that opened it locks the next), unlocked."""
    lock = _CLAIMED.pop(key, None)
    if lock is not None:
        remove_quietly(key)
        lock.close()


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
    with suppress(OSError):
        path.unlink()


def _hash_parts(digest, parts: list[memoryview]) -> None:
    for part in parts:
        digest.update(part)


class _HashingWriter:
    """A write-only file that hashes and counts what passes, hashing and writeback overlapping the writes."""

    def __init__(self, file: BinaryIO, hashers: ThreadPoolExecutor, flusher: ThreadPoolExecutor,
                 piece_bytes: int | None, substitute: Substitute | None) -> None:
        self._file, self._hashers, self._flusher, self._substitute = file, hashers, flusher, substitute
        self._pieced = piece_bytes is not None
        self._piece_bytes = piece_bytes or sys.maxsize  # without pieces, the file is one piece
        self._hashes = defaultdict(hashlib.sha256)  # by piece index
        self._writeback: Future | None = None
        self._not_written_back = 0
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        sources = self._substitute(view) if self._substitute is not None else None
        hashing: list[Future] = []
        piece, parts = 0, []
        try:
            for source in [view] if sources is None else sources:
                while len(source):
                    at, offset = divmod(self.size, self._piece_bytes)
                    length = min(len(source), self._piece_bytes - offset)  # a part never spans two pieces
                    part, source = source[:length], source[length:]
                    if parts and at != piece:
                        self._hash_later(piece, parts, hashing)
                        parts = []
                    piece = at
                    parts.append(part)
                    self._write(part)
            if parts and not hashing and sum(map(len, parts)) < _PARALLEL_HASH_BYTES:
                _hash_parts(self._hashes[piece], parts)  # a small write, alone: not worth a thread
            elif parts:
                self._hash_later(piece, parts, hashing)
        finally:
            # The memory may be torch's, freed once this call returns: finish hashing first.
            for future in hashing:
                future.result()
        return len(view)

    def _hash_later(self, piece: int, parts: list[memoryview], hashing: list[Future]) -> None:
        """Hash `parts` in another thread; waits for the oldest batch first when too many wait (memory)."""
        if len(hashing) >= _MAX_PENDING:
            hashing.pop(0).result()
        hashing.append(self._hashers.submit(_hash_parts, self._hashes[piece], parts))

    def digest(self) -> str:
        """The digest of all that was written."""
        if not self._pieced:
            return self._hashes[0].hexdigest()
        return pieces_sha256(self._hashes[index].digest() for index in range(-(-self.size // self._piece_bytes)))

    def _write(self, data: memoryview) -> None:
        try:
            self._file.write(data)
        except OSError as error:
            # torch.save's C++ writer turns exceptions into a RuntimeError; keep the OSError for the message.
            self.error = error
            raise
        self.size += len(data)
        self._not_written_back += len(data)
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
