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
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

# Maps a write's data to the buffers to write in its place, or None to write the data itself.
Substitute = Callable[[memoryview], Iterable[memoryview] | None]
# Writes at least this large are hashed in other threads while they are written, in parts of at most _PART bytes,
# with at most _MAX_PENDING batches of parts waiting for a hasher (enough to keep every core busy).
_PARALLEL_HASH_BYTES = 1 << 20
_PART = 64 << 20
_MAX_PENDING = 2 * (os.cpu_count() or 1)
# After this many bytes are written, a third thread asks the disk to store them (fdatasync) while later ones are
# hashed and written, so the final fsync waits only for the last ones (the kernel alone starts writing back late).
_WRITEBACK_BYTES = 256 << 20
_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
# Bytes read per step, into the page cache or, where a file cannot be mapped, into memory.
_READ_CHUNK = 16 << 20
# madvise(MADV_POPULATE_READ) reads a mapped range into memory (Linux 5.14+); Python names it from 3.12 on.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22) if sys.platform.startswith("linux") else None


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for the caller to write the whole new file to; when the block ends without an
    exception it replaces `path` durably, on any exception it is removed. An OSError that names no file (a write to
    a full disk) is raised naming `path`."""
    path = Path(path)
    temp = temp_path(path)
    try:
        yield temp
        _fsync(temp, os.O_RDWR)  # Windows refuses to fsync a read-only descriptor
        os.replace(temp, path)
    except BaseException as error:
        remove_quietly(temp)
        if isinstance(error, OSError) and error.filename is None and error.errno is not None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    fsync_dir(path.parent)


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
    the SHA-256, or with `piece_bytes` the pieces' SHA-256 (see `pieces_sha256`), hashed on every core.
    `substitute(data)`, if given, may return the buffers to write in place of a write's data (None: the data).
    The OSError of a failed write (e.g. ENOSPC) is raised as itself, even from writers that wrap it."""
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
    """The digest of a file hashed in pieces: the SHA-256 of its pieces' SHA-256 digests in order (a file of n bytes
    has ceil(n / piece_bytes) pieces, each piece_bytes long but the last). One SHA-256 runs on one core, slower than
    the disks this was measured on (see README Performance); pieces are hashed on as many cores as there are."""
    return hashlib.sha256(b"".join(piece_digests)).hexdigest()


def _file_pieces_sha256(file: BinaryIO, piece_bytes: int) -> str:
    """Pieces are hashed by one thread per core. On Linux the file is mapped and one more thread reads it into the
    page cache front to back (MADV_POPULATE_READ, in steps of _READ_CHUNK), while the hashers hash each piece in
    place once it is read: the disk sees one sequential stream and the hashers never wait on it mid-piece (threads
    that each read and then hashed a piece of their own were slower: README Performance). Elsewhere, or where the
    file cannot be mapped, each hasher reads its pieces itself."""
    fd = file.fileno()
    size = os.fstat(fd).st_size
    try:
        mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size and _MADV_POPULATE_READ is not None else None
    except OSError:  # a file system that cannot map files
        mapping = None
    reader = _PageCacheReader(mapping, size) if mapping is not None else None

    def hash_piece(start: int) -> bytes:
        end = min(start + piece_bytes, size)
        if reader is None:
            digest = hashlib.sha256()
            for offset in range(start, end, _READ_CHUNK):
                digest.update(os.pread(fd, min(_READ_CHUNK, end - offset), offset))
            return digest.digest()
        reader.wait_until_read(end)
        with memoryview(mapping) as view, view[start:end] as piece:
            return hashlib.sha256(piece).digest()

    starts = range(0, size, piece_bytes)
    try:
        with ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1) or 1, thread_name_prefix="sha256") as hashers:
            return pieces_sha256(hashers.map(hash_piece, starts))
    finally:
        if reader is not None:
            reader.stop()
        if mapping is not None:
            mapping.close()


class _PageCacheReader:
    """A thread that reads a mapped file into the page cache in order; `wait_until_read(end)` returns once bytes
    [0, end) are in (or at once if the kernel cannot populate: the hashers' page faults then read the pages)."""

    def __init__(self, mapping: mmap.mmap, size: int) -> None:
        self._mapping, self._size = mapping, size
        self._read = 0
        self._error: OSError | None = None
        self._stopping = False
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="page-cache-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for offset in range(0, self._size, _READ_CHUNK):
                if self._stopping:
                    return
                length = min(_READ_CHUNK, self._size - offset)
                self._mapping.madvise(_MADV_POPULATE_READ, offset, length)
                with self._progress:
                    self._read = offset + length
                    self._progress.notify_all()
        except OSError as error:
            if error.errno != errno.EINVAL:  # EINVAL: a kernel before 5.14, whose page faults read instead
                self._error = error
        finally:
            with self._progress:
                self._read = self._size
                self._progress.notify_all()

    def wait_until_read(self, end: int) -> None:
        with self._progress:
            self._progress.wait_for(lambda: self._read >= end)
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._stopping = True
        self._thread.join()


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
    tensor's storage as a memoryview (no copy); a large one is written in parts, each piece's parts hashed in another
    thread once the piece is written, while the next is written (both release the GIL), and what is written is sent
    to the disk by a third thread meanwhile: the time is that of the slowest, not their sum. With pieces, a part
    never spans two, so pieces are hashed on as many cores as there are; without, in order by one thread.
    `substitute` may name other buffers to write in place of a write's data (tensors written where torch.save
    writes a placeholder: no copy)."""

    def __init__(self, file: BinaryIO, hashers: ThreadPoolExecutor, flusher: ThreadPoolExecutor,
                 piece_bytes: int | None, substitute: Substitute | None) -> None:
        self._file, self._hashers, self._flusher, self._substitute = file, hashers, flusher, substitute
        self._piece_bytes = piece_bytes
        self._hashes = [hashlib.sha256()]  # one per piece begun, or the one of the whole file
        self._writeback: Future | None = None
        self._not_written_back = 0
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        sources = self._substitute(view) if self._substitute is not None else None
        hashing: list[Future] = []
        piece, parts, batched = 0, [], 0
        try:
            for source in [view] if sources is None else sources:
                while len(source):
                    length = self._part_length(len(source))
                    part, source = source[:length], source[length:]
                    at = self._piece_at(self.size)
                    # A batch of parts goes to a hasher once its piece is written (or, with one hash and its one
                    # thread, which takes batches in order, every _PART bytes).
                    if parts and (at != piece or (self._piece_bytes is None and batched >= _PART)):
                        hashing = self._hash_in_order(piece, parts, hashing)
                        parts, batched = [], 0
                    piece = at
                    parts.append(part)
                    batched += len(part)
                    self._write(part)
                    self._start_writeback(len(part))
            if parts and not hashing and batched < _PARALLEL_HASH_BYTES:
                for part in parts:  # a small write, with nothing else being hashed: here, in order
                    self._hashes[piece].update(part)
            elif parts:
                hashing = self._hash_in_order(piece, parts, hashing)
        finally:
            # The memory may be torch's, freed once this call returns: finish hashing first.
            for future in hashing:
                future.result()
        return len(view)

    def _hash_in_order(self, piece: int, parts: list[memoryview], hashing: list[Future]) -> list[Future]:
        """Hash `parts` into the piece's digest in another thread; the batches still being hashed. Waits while more
        than _MAX_PENDING are, so substituted copies do not pile up in memory."""
        digest = self._hashes[piece]
        hashing = [future for future in hashing if not future.done()]
        while len(hashing) >= _MAX_PENDING:
            hashing.pop(0).result()
        hashing.append(self._hashers.submit(lambda: [digest.update(part) for part in parts]))
        return hashing

    def digest(self) -> str:
        """The digest of all that was written."""
        if self._piece_bytes is None:
            return self._hashes[0].hexdigest()
        return pieces_sha256(digest.digest() for digest in self._hashes[:-(-self.size // self._piece_bytes)])

    def _part_length(self, remaining: int) -> int:
        """How much of the next `remaining` bytes to write as one part: at most the rest of the piece (a part is hashed
        into one piece's digest), else at most _PART."""
        step = _PART if self._piece_bytes is None else self._piece_bytes - self.size % self._piece_bytes
        return min(remaining, step)

    def _piece_at(self, offset: int) -> int:
        """The index in `_hashes` of the piece that holds byte `offset` (0 without pieces)."""
        if self._piece_bytes is None:
            return 0
        while len(self._hashes) <= offset // self._piece_bytes:
            self._hashes.append(hashlib.sha256())
        return offset // self._piece_bytes

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
