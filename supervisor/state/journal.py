"""The write-ahead journal behind ``JsonFileStore``: one append-only file, group-committed.

A commit is durable once its record is in ``<state_dir>/journal.log`` and the file has been
``fdatasync``-ed: one flush, no create, no rename. Concurrent commits share that flush: the
journal's thread writes everything queued so far in one ``write`` and one ``fdatasync``;
whoever queued meanwhile is covered by the next flush. The per-agent state files are
rewritten from the records afterwards, off the commit path (``jsonfile``).

The file is a sequence of frames, each the exact bytes of a state file behind a header::

    @<key> <length> <crc32, 8 hex>\\n<length bytes>

``<key>`` is the state file's name without ``.json`` (``alpha``, ``_budget``). The file is
zero-filled ahead of its frames (see ``Journal``), so zeros mark the end. A crash can leave
the last frames torn (cut short, or zeros where the filesystem had not written the data yet):
reading stops at the first frame that is incomplete or fails its checksum, and those frames
were never acknowledged. A bad frame *followed by* a good one is not a torn tail but damage to
acknowledged records: ``read_journal`` reports it and nothing is dropped.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import secrets
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from supervisor.fsio import describe_os_error, fsync_directory, write_all

__all__ = ["GroupCommit", "Journal", "JournalDamaged", "Recovered", "frame", "read_journal"]

JOURNAL_NAME = "journal.log"
#: a compaction cut short leaves this (removed by the next open, like commit temp files)
JOURNAL_TEMP = re.compile(r"\.journal\.log\.[0-9a-f]{16}\.tmp")
_HEADER = re.compile(rb"@(_?[A-Za-z0-9][A-Za-z0-9_.-]{0,127}) ([0-9]{1,10}) ([0-9a-f]{8})")
# Longer than any valid header line: a header is looked for within this many bytes.
_MAX_HEADER = 160
_FILE_MODE = 0o640
#: the journal is zero-filled this far ahead of its records (see ``Journal``)
PREALLOCATE = 1 << 20


def frame(key: str, raw: bytes) -> bytes:
    """The journal frame holding ``raw`` (a state file's bytes) for the file ``<key>.json``."""
    return b"@%s %d %08x\n" % (key.encode(), len(raw), zlib.crc32(raw)) + raw


def _frame_at(data: bytes, pos: int) -> tuple[str, bytes, int] | None:
    """The frame starting at ``pos`` as (key, body, end), or None if it is not a whole one."""
    nl = data.find(b"\n", pos, pos + _MAX_HEADER)
    if nl < 0:
        return None
    match = _HEADER.fullmatch(data, pos, nl)
    if match is None:
        return None
    end = nl + 1 + int(match[2])
    body = data[nl + 1 : end]
    if end > len(data) or zlib.crc32(body) != int(match[3], 16):
        return None
    return match[1].decode(), body, end


class JournalDamaged(Exception):
    """A frame in the middle of the journal is bad while later ones are whole."""

    def __init__(self, offset: int, later: int) -> None:
        self.offset = offset
        self.later = later
        super().__init__(
            f"the frame at byte {offset} is damaged but a whole frame follows at byte {later}: "
            "acknowledged records would be lost; the journal is left as it is for a human"
        )


@dataclass
class Recovered:
    """What ``read_journal`` found: every whole frame in order, and where they end."""

    #: (key, file bytes) in journal order; later frames of a key supersede earlier ones
    records: list[tuple[str, bytes]] = field(default_factory=list)
    #: length of the whole frames; bytes past it are zeros or a torn tail
    end: int = 0
    #: bytes past ``end`` that are not zeros: frames a crash cut short (never acknowledged)
    torn_bytes: int = 0


def read_journal(data: bytes) -> Recovered:
    """Parse a journal's bytes. Raises ``JournalDamaged`` (see the module docstring)."""
    out = Recovered()
    pos = 0
    while pos < len(data):
        found = _frame_at(data, pos)
        if found is None:
            later = data.find(b"@", pos + 1)
            while later >= 0:
                if _frame_at(data, later) is not None:
                    raise JournalDamaged(pos, later)
                later = data.find(b"@", later + 1)
            break
        key, body, pos = found
        out.records.append((key, body))
    out.end = pos
    # Zeros are the space filled ahead of the records; anything else was cut short.
    out.torn_bytes = len(data) - pos - data.count(0, pos) if pos < len(data) else 0
    return out


class Journal:
    """The journal file: appends with one ``fdatasync`` each, and compaction.

    The file is zero-filled ahead of the records, ``PREALLOCATE`` bytes at a time, and records
    are written over the zeros: the file's size does not change with an append, so its
    ``fdatasync`` flushes data only, instead of committing the filesystem's own journal (on
    ext4 that commit also carries every other pending metadata change: the state files written
    behind, trace appends). Zeros after the last record read as its end (``read_journal``).

    Every method blocks (threads call it) and raises ``OSError``; ``lock`` must be held.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        #: held around appends and compaction (the journal's and the write-behind thread)
        self.lock = threading.Lock()
        self._fd: int | None = None
        #: bytes of acknowledged frames at the start of the file
        self.size = 0
        #: the file's length: records, then zeros
        self._capacity = 0
        #: set when a failed append could not be undone: the file's tail is unknown
        self.broken: str | None = None

    def reset(self, size: int, capacity: int) -> None:
        """Forget the open file; the next append reopens it (``size`` bytes of records in
        ``capacity`` bytes of file)."""
        self.close()
        self.size = size
        self._capacity = capacity
        self.broken = None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        if self._fd is None:
            existed = self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
            try:
                if not existed:
                    # A record is only durable once the file's directory entry is.
                    fsync_directory(self.path.parent)
                self._capacity = os.fstat(fd).st_size
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        return self._fd

    def append(self, data: bytes) -> None:
        """Write ``data`` after the last record and flush it to disk.

        On failure the bytes written are zeroed again (and flushed), so a failed append leaves
        nothing a restart could read; if even that fails the journal is marked ``broken``.
        """
        if self.broken is not None:
            raise OSError(0, self.broken)
        fd = self._open()
        end = self.size + len(data)
        try:
            if end > self._capacity:
                grow = max(PREALLOCATE, end - self._capacity)
                _pwrite_all(fd, bytes(grow), self._capacity)
                os.fsync(fd)  # the new length must be durable before records in it are
                self._capacity += grow
            _pwrite_all(fd, data, self.size)
            os.fdatasync(fd)
        except OSError as exc:
            try:
                if self._capacity > self.size:
                    _pwrite_all(fd, bytes(min(len(data), self._capacity - self.size)), self.size)
                    os.fdatasync(fd)
            except OSError as undo:
                self.broken = (
                    f"is unusable: an append failed ({describe_os_error(exc)}) and could not "
                    f"be undone ({describe_os_error(undo)}); restart to recover from the "
                    "journal (the failed records may then be applied)"
                )
            raise
        self.size = end

    def compact(self, keep_from: int) -> None:
        """Drop the first ``keep_from`` bytes (records now durable in their files).

        Whatever follows is kept: written with fresh zeros to a new file that replaces the
        journal (flushed, renamed, directory flushed), or, when nothing follows, the file is
        truncated (and zero-filled again by the next append). Both are atomic: never a mix of
        old and new records.
        """
        if self.broken is not None:
            return
        if keep_from >= self.size:
            fd = self._open()
            os.ftruncate(fd, 0)
            os.fsync(fd)
            self.size = self._capacity = 0
            return
        with open(self.path, "rb") as f:
            f.seek(keep_from)
            tail = f.read(self.size - keep_from)
        capacity = max(PREALLOCATE, len(tail) + PREALLOCATE // 2)
        temp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        try:
            try:
                write_all(fd, tail + bytes(capacity - len(tail)))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, self.path)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
        self.close()
        self.size, self._capacity = len(tail), capacity
        fsync_directory(self.path.parent)


def _pwrite_all(fd: int, raw: bytes, offset: int) -> None:
    view = memoryview(raw)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]
        offset += written


_Waiter = tuple[str, bytes, "asyncio.Future[None]", asyncio.AbstractEventLoop]


class GroupCommit:
    """Queues records and flushes them in batches on a thread of its own.

    ``flush(items)`` runs on that thread with a batch's ``(key, bytes)`` pairs; what it raises
    fails every commit in the batch. While one batch is being flushed the next one fills up,
    so a burst of N concurrent commits costs a handful of flushes. A thread of its own rather
    than a worker thread per flush: the hand-off costs about half as much, and a lone commit
    pays it on every run. The thread ends after ``linger`` seconds without work.
    """

    def __init__(
        self, flush: Callable[[list[tuple[str, bytes]]], None], *, linger: float = 5.0
    ) -> None:
        self._flush = flush
        self._linger = linger
        self._cv = threading.Condition()
        self._queue: list[_Waiter] = []
        self._flushing = False
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """Whether a flush is running or records are waiting for one."""
        with self._cv:
            return self._flushing or bool(self._queue)

    async def commit(self, key: str, raw: bytes) -> None:
        """Return once ``raw`` is durable; raises what its batch's flush raised.

        Cancelling the caller does not take the record back: the wait is shielded, and the
        cancellation is delivered once the record's flush is over.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        with self._cv:
            self._queue.append((key, raw, done, loop))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="state-journal", daemon=True)
                self._thread.start()
            else:
                self._cv.notify()
        with anyio.CancelScope(shield=True):
            await done

    def wait_idle(self) -> None:
        """Block until nothing is queued or being flushed (call it from a worker thread)."""
        with self._cv:
            self._cv.wait_for(lambda: not self._queue and not self._flushing)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._flushing = False
                self._cv.notify_all()  # for wait_idle
                if not self._cv.wait_for(lambda: self._queue, timeout=self._linger):
                    self._thread = None
                    return
                batch, self._queue = self._queue, []
                self._flushing = True
            error: Exception | None = None
            try:
                self._flush([(key, raw) for key, raw, _, _ in batch])
            except Exception as exc:
                error = exc
            loops: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
            for _, _, done, loop in batch:
                loops.setdefault(loop, []).append(done)
            for loop, waiting in loops.items():
                try:
                    loop.call_soon_threadsafe(_settle, waiting, error)
                except RuntimeError:  # that event loop is closed: nobody waits any more
                    pass


def _settle(waiting: list[asyncio.Future[None]], error: Exception | None) -> None:
    for done in waiting:
        if done.done():
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
