"""The default store: one human-readable JSON file per agent, behind a write-ahead journal.

Layout of the state directory::

    <agent>.json                      the agent's state, indented, keys sorted
    _<name>.json                      a supervisor document (e.g. ``_budget.json``)
    journal.log                       committed records not yet durable in their files
    .<agent>.json.<16 hex>.tmp        a file write in flight (a leftover one is removed by open())
    ._<name>.json.<16 hex>.tmp        a document write in flight (removed likewise)
    .journal.log.<16 hex>.tmp         a journal compaction in flight (removed likewise)
    <agent>.json.corrupt-<16 hex>     a copy of a corrupt file (see below)

Agent names start with a letter or digit, so the leading underscore keeps documents and agents
apart: no agent name maps to a document file and ``agents()`` never lists a document.

Durability. A commit appends the record (the exact bytes of the state file) to ``journal.log``
and returns once the journal is flushed (``journal``: one ``fdatasync``, shared by concurrent
commits). The state files are written behind, off the commit path, by a thread of the store:
within ``write_behind`` seconds of a commit (temp file + rename, no flush), and made durable
at a checkpoint (each written file and the directory flushed, then the journal emptied) every
``checkpoint_interval`` seconds, past ``checkpoint_bytes`` of journal, and on ``close()``.
Until its file is written, a record is served from memory, so ``load`` always returns the
last committed record. ``open()`` replays the journal first: the newest record of each file
wins, a torn tail (a flush a crash cut short, never acknowledged) is dropped, and the files are
written and made durable before anything loads. After a crash a file therefore holds the old
record or the new one, never a mix, and ``load`` returns the last committed one.

Corrupt files. A state file that does not parse is never modified, renamed or deleted by a
load: it waits for a human, and the agent is blocked. Replay is the one exception, and only
when the journal holds a newer committed record for that very file (the file can then only be
a write-behind torn by a power loss, or damage since): the record is written over it, after
its bytes are kept as ``<file>.corrupt-<16 hex>`` and a warning is logged. So: edit state
files only while the daemon is stopped, and after a clean stop (which leaves the journal
empty); after a crash, start and stop it once first, or the edit may be replayed over.

Symlinks are not special: a symlinked state file is read through the link, and the next write
replaces the link itself with a regular file, so nothing is ever written outside the directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from supervisor.errors import StateCorruptError, StateError, StateWriteError
from supervisor.fsio import describe_os_error as describe
from supervisor.fsio import fsync_directory, prepare_directory, replace_atomically
from supervisor.state.base import AgentState
from supervisor.state.codec import (
    NAME,
    Unparseable,
    check_agent_name,
    check_doc_name,
    decode_doc,
    decode_state,
    doc_subject,
    encode_doc,
    encode_state,
    parse_doc,
    parse_state,
)
from supervisor.state.journal import (
    JOURNAL_NAME,
    JOURNAL_TEMP,
    GroupCommit,
    Journal,
    JournalDamaged,
    frame,
    read_journal,
)

# The codec's names are re-exported: other modules import them from here.
__all__ = [
    "JsonFileStore",
    "check_agent_name",
    "check_doc_name",
    "decode_doc",
    "decode_state",
    "doc_subject",
    "encode_doc",
    "encode_state",
]

_TEMP_NAME = re.compile(r"\._?[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.json\.[0-9a-f]{16}\.tmp")
_FILE_MODE = 0o640
_DIR_MODE = 0o750
# StateError names an agent; errors about the whole directory name this placeholder.
_ALL_AGENTS = "*"


class JsonFileStore:
    """A ``StateStore`` keeping ``<directory>/<agent>.json`` per agent, journal first.

    ``write_behind``, ``checkpoint_interval`` (seconds) and ``checkpoint_bytes`` pace the
    state files behind the journal (see the module docstring). With ``keep_corrupt_copy`` a
    load that finds a corrupt file also saves a copy of its bytes next to it, so the evidence
    survives whatever a human or a policy does to the original.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        keep_corrupt_copy: bool = False,
        write_behind: float = 0.5,
        checkpoint_interval: float = 30.0,
        checkpoint_bytes: int = 8 << 20,
    ) -> None:
        self.directory = Path(directory)
        self.keep_corrupt_copy = keep_corrupt_copy
        self.write_behind = write_behind
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_bytes = checkpoint_bytes
        #: leftover temp files the last ``open()`` removed (each one is a write cut short)
        self.stale_temp_files_removed = 0
        #: records the last ``open()`` replayed from the journal, and torn bytes it dropped
        self.replayed = 0
        self.torn_bytes = 0
        self.journal = Journal(self.directory / JOURNAL_NAME)
        self._group = GroupCommit(self._flush)
        # Guards everything below; the write-behind thread waits on ``_wake``.
        self._mem = threading.Lock()
        self._wake = threading.Condition(self._mem)
        #: key -> (sequence, bytes): committed records whose file is not written yet
        self._pending: dict[str, tuple[int, bytes]] = {}
        #: keys whose file was written since the last checkpoint, not flushed yet
        self._unsynced: set[str] = set()
        self._seq = 0
        #: monotonic time the journal took its first record since it was last emptied
        self._dirty_since: float | None = None
        self._writer: threading.Thread | None = None
        self._stop = False
        #: the last write-behind error per key, logged once until the key is written
        self._write_errors: dict[str, str] = {}
        # One write-behind or checkpoint at a time (the thread, ``checkpoint``, ``close``).
        self._cycle = threading.Lock()

    def __repr__(self) -> str:
        return f"JsonFileStore({str(self.directory)!r})"

    def path_for(self, agent: str) -> Path:
        """The state file of ``agent``; raises ``StateError`` for an unsafe name."""
        return self.directory / f"{check_agent_name(agent)}.json"

    def doc_path(self, name: str) -> Path:
        """The file of the document ``name``; raises ``StateError`` for an unsafe name."""
        return self.directory / f"_{check_doc_name(name)}.json"

    async def open(self) -> None:
        """Create the directory if missing, remove temp files left by a crash, replay the journal.

        Raises ``StateError`` when the path exists but is not a directory, cannot be created
        or cleaned, or the journal cannot be read or is damaged before its end.
        """
        self.stale_temp_files_removed = await anyio.to_thread.run_sync(self._prepare)
        await anyio.to_thread.run_sync(self._recover)

    async def close(self) -> None:
        """Return once every commit in flight has finished and the files are durable.

        A checkpoint that fails is logged (the journal then keeps the records for the next
        ``open``). The store may be used again afterwards.
        """
        await anyio.to_thread.run_sync(self._shutdown)

    async def checkpoint(self) -> None:
        """Write every committed record to its file, make the files durable, empty the journal.

        Raises ``StateWriteError`` when a file or the journal cannot be written; every
        record is then still in the journal.
        """
        problem = await anyio.to_thread.run_sync(self._checkpoint_now)
        if problem is not None:
            raise StateWriteError(_ALL_AGENTS, f"checkpoint of {self.directory} failed: {problem}")

    async def load(self, agent: str) -> AgentState:
        """Return ``agent``'s state, or a fresh one when it has none yet.

        Raises ``StateCorruptError`` when the file exists but cannot be used (even when it is
        empty) and ``StateError`` when it cannot be read or the name is unsafe.
        """
        path = self.path_for(agent)
        with self._mem:
            entry = self._pending.get(agent)
        if entry is not None:
            return decode_state(agent, entry[1], f"{self.journal.path} (record of {path.name})")
        return await anyio.to_thread.run_sync(self._load, agent, path)

    async def commit(self, state: AgentState) -> None:
        """Replace the agent's state atomically and durably (journal flushed on return).

        The record written is ``state`` as it was when ``commit`` was called. Raises
        ``StateWriteError`` when the journal cannot be written (the previous state is then
        intact, unless the message says otherwise) and ``StateError`` for an unsafe name.
        Once the write has started, cancelling the caller does not cut it short.
        """
        raw = encode_state(state)
        agent = state.agent
        await self._commit(agent, raw, agent, self.directory / f"{agent}.json")

    async def agents(self) -> list[str]:
        """Names of the agents that have stored state, sorted; documents are not listed.

        Raises ``StateError`` when the directory cannot be listed.
        """
        names = set(await anyio.to_thread.run_sync(self._list))
        with self._mem:
            names.update(key for key in self._pending if not key.startswith("_"))
        return sorted(names)

    async def load_doc(self, name: str) -> dict[str, Any] | None:
        """Return the document ``name`` (``_<name>.json``), or None when it has none.

        Raises ``StateCorruptError`` when the file is not a JSON object (it is left untouched;
        with ``keep_corrupt_copy`` a copy is saved too) and ``StateError`` when it cannot be
        read or the name is unsafe.
        """
        path = self.doc_path(name)
        with self._mem:
            entry = self._pending.get(f"_{name}")
        if entry is not None:
            return decode_doc(name, entry[1], f"{self.journal.path} (record of {path.name})")
        return await anyio.to_thread.run_sync(self._load_doc, name, path)

    async def commit_doc(self, name: str, doc: dict[str, Any]) -> None:
        """Replace the document atomically and durably, like ``commit``.

        The document written is ``doc`` as it was when ``commit_doc`` was called. Raises
        ``StateWriteError`` when the write fails or ``doc`` would not load back, and
        ``StateError`` for an unsafe name. Cancelling the caller does not cut a write short.
        """
        raw = encode_doc(name, doc)
        await self._commit(f"_{name}", raw, doc_subject(name), self.doc_path(name))

    async def _commit(self, key: str, raw: bytes, subject: str, path: Path) -> None:
        try:
            await self._group.commit(key, raw)
        except OSError as exc:
            journal = self.journal
            if journal.broken is not None:
                raise StateWriteError(
                    subject, f"cannot write {path}: the journal {journal.path} {journal.broken}"
                ) from exc
            raise StateWriteError(
                subject,
                f"cannot write {path} through the journal {journal.path}: {describe(exc)}; "
                "the previous state is intact",
            ) from exc

    # Everything below runs in worker threads, the journal's or the write-behind thread.

    def _flush(self, items: list[tuple[str, bytes]]) -> None:
        """Append a batch to the journal, durably; then its records are committed."""
        data = b"".join([frame(key, raw) for key, raw in items])
        with self.journal.lock:
            self.journal.append(data)
            with self._mem:
                for key, raw in items:
                    self._seq += 1
                    self._pending[key] = (self._seq, raw)
                if self._dirty_since is None:
                    self._dirty_since = time.monotonic()
                if self._writer is None:
                    self._writer = threading.Thread(
                        target=self._write_behind_loop, name="state-write-behind", daemon=True
                    )
                    self._writer.start()

    def _write_behind_loop(self) -> None:
        """The write-behind thread: runs while there is anything to write or checkpoint."""
        while True:
            with self._mem:
                if not self._stop:
                    self._wake.wait(self.write_behind)
                if self._stop or (not self._pending and self.journal.size == 0):
                    self._writer = None
                    return
            self._cycle_once(False, False)

    def _cycle_once(self, checkpoint: bool, replay: bool) -> str | None:
        """Write pending records to their files; checkpoint when asked or due.

        Returns what went wrong (also logged), or None. Never raises.
        """
        with self._cycle:
            problem = self._write_pending(replay)
            if problem is None and (checkpoint or self._checkpoint_due()):
                try:
                    self._checkpoint()
                except OSError as exc:
                    problem = f"checkpoint failed: {describe(exc)}"
                    _log().warning("state.checkpoint_failed", directory=str(self.directory),
                                   error=describe(exc))  # fmt: skip
            return problem

    def _checkpoint_due(self) -> bool:
        since = self._dirty_since
        return self.journal.size >= self.checkpoint_bytes or (
            since is not None and time.monotonic() - since >= self.checkpoint_interval
        )

    def _write_pending(self, replay: bool = False) -> str | None:
        with self._mem:
            records = dict(self._pending)
        return self._write_records(records, replay)

    def _write_records(self, records: dict[str, tuple[int, bytes]], replay: bool) -> str | None:
        """Write each record to its file (temp + rename, not flushed); the first error, or None."""
        first: str | None = None
        for key, (seq, raw) in records.items():
            path = self.directory / f"{key}.json"
            try:
                if not (replay and self._replay_keeps(key, path, raw)):
                    replace_atomically(self.directory, path, raw, mode=_FILE_MODE, flush=False)
            except OSError as exc:
                problem = f"cannot write {path}: {describe(exc)}"
                first = first or problem
                if self._write_errors.get(key) != problem:
                    self._write_errors[key] = problem
                    _log().warning("state.write_behind_failed", file=str(path),
                                   error=describe(exc), journal=str(self.journal.path))  # fmt: skip
                continue
            self._write_errors.pop(key, None)
            with self._mem:
                self._unsynced.add(key)
                current = self._pending.get(key)
                if current is not None and current[0] == seq:
                    del self._pending[key]
        return first

    def _replay_keeps(self, key: str, path: Path, raw: bytes) -> bool:
        """Before replay writes ``path``: True if it already holds ``raw``; a corrupt file's
        bytes are kept beside it (see the module docstring)."""
        try:
            current = path.read_bytes()
        except OSError:
            return False  # missing, or the write will fail and say why
        if current == raw:
            return True
        try:
            parse_doc(current) if key.startswith("_") else parse_state(key, current)
        except Unparseable as exc:
            kept = self._keep_copy(path, current)
            _log().warning("state.replay_replaced_corrupt_file", file=str(path),
                           problem=str(exc), kept=kept.lstrip("; "))  # fmt: skip
        return False

    def _checkpoint(self) -> None:
        """Make every acknowledged record durable in its file, then drop it from the journal."""
        journal = self.journal
        with journal.lock, self._mem:
            mark = journal.size
            late = dict(self._pending)
        if not mark:
            return
        # Records acknowledged since the write-behind above: written now, so that every
        # record before ``mark`` is in its file.
        problem = self._write_records(late, False)
        if problem is not None:
            raise OSError(0, problem)
        with self._mem:
            synced = set(self._unsynced)
        for key in synced:
            fd = os.open(self.directory / f"{key}.json", os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(self.directory)
        with journal.lock:
            journal.compact(mark)
            with self._mem:
                self._unsynced -= synced
                self._dirty_since = time.monotonic() if journal.size else None

    def _checkpoint_now(self) -> str | None:
        self._group.wait_idle()
        return self._cycle_once(True, False)

    def _shutdown(self) -> None:
        self._group.wait_idle()
        with self._mem:
            self._stop = True
            self._wake.notify_all()
            writer = self._writer
        if writer is not None:
            writer.join()
        try:
            self._cycle_once(True, False)
        finally:
            with self.journal.lock:
                self.journal.close()
            with self._mem:
                self._stop = False

    def _prepare(self) -> int:
        return prepare_directory(
            self.directory, mode=_DIR_MODE, temp_names=(_TEMP_NAME, JOURNAL_TEMP), what="state"
        )

    def _recover(self) -> None:
        """Replay the journal: its records become pending, then are written and made durable."""
        journal = self.journal
        with self._cycle, journal.lock:
            try:
                data = journal.path.read_bytes()
            except FileNotFoundError:
                data = b""
            except OSError as exc:
                raise StateError(
                    _ALL_AGENTS, f"cannot read the journal {journal.path}: {describe(exc)}"
                ) from exc
            try:
                found = read_journal(data)
            except JournalDamaged as exc:
                raise StateError(_ALL_AGENTS, f"journal {journal.path}: {exc}") from None
            if found.torn_bytes:
                try:
                    os.truncate(journal.path, found.end)
                    fd = os.open(journal.path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    raise StateError(
                        _ALL_AGENTS,
                        f"cannot cut the torn tail off the journal {journal.path}: {describe(exc)}",
                    ) from exc
                _log().warning("state.journal_torn_tail", journal=str(journal.path),
                               dropped_bytes=found.torn_bytes)  # fmt: skip
            # Past the records: zeros filled ahead (kept), or nothing once a torn tail is cut.
            journal.reset(found.end, found.end if found.torn_bytes else len(data))
            with self._mem:
                self._pending.clear()
                self._unsynced.clear()
                for key, raw in found.records:
                    self._seq += 1
                    self._pending[key] = (self._seq, raw)
                self._dirty_since = time.monotonic() if found.records else None
                self.replayed = len(self._pending)
                self.torn_bytes = found.torn_bytes
        if found.records:
            _log().info("state.journal_replayed", journal=str(journal.path),
                        records=len(found.records), files=self.replayed)  # fmt: skip
            # Failures are logged; the records stay pending (served from memory) and in the
            # journal, so nothing committed is lost.
            self._cycle_once(True, True)

    def _load(self, agent: str, path: Path) -> AgentState:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return AgentState(agent=agent)
        except OSError as exc:
            raise StateError(agent, f"cannot read {path}: {describe(exc)}") from exc
        try:
            return parse_state(agent, raw)
        except Unparseable as exc:
            message = f"{path}: {exc}"
            if self.keep_corrupt_copy:
                message += self._keep_copy(path, raw)
            raise StateCorruptError(agent, message) from exc.__cause__

    def _load_doc(self, name: str, path: Path) -> dict[str, Any] | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(doc_subject(name), f"cannot read {path}: {describe(exc)}") from exc
        try:
            return parse_doc(raw)
        except Unparseable as exc:
            message = f"{path}: {exc}"
            if self.keep_corrupt_copy:
                message += self._keep_copy(path, raw)
            raise StateCorruptError(doc_subject(name), message) from exc.__cause__

    def _keep_copy(self, path: Path, raw: bytes) -> str:
        # Named by content: loading the same corrupt file again does not pile up copies.
        copy = path.with_name(f"{path.name}.corrupt-{hashlib.sha256(raw).hexdigest()[:16]}")
        try:
            if not copy.exists():
                replace_atomically(self.directory, copy, raw, mode=_FILE_MODE)
                fsync_directory(self.directory)
        except OSError as exc:
            return f"; could not keep a copy at {copy}: {describe(exc)}"
        return f"; a copy is kept at {copy}"

    def _list(self) -> list[str]:
        try:
            with os.scandir(self.directory) as entries:
                names = [
                    e.name[: -len(".json")]
                    for e in entries
                    if e.name.endswith(".json")
                    and NAME.fullmatch(e.name[: -len(".json")])
                    and e.is_file()
                ]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(
                _ALL_AGENTS, f"cannot list state directory {self.directory}: {describe(exc)}"
            ) from exc
        return names


def _log() -> Any:
    # Imported late: the store is imported by tools that never configure logging.
    from supervisor.logging import get_logger

    return get_logger()
