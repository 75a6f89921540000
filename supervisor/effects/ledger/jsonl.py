"""The default ledger: one append-only JSON-lines file per agent.

Layout of ``<state_dir>/effects/``::

    <agent>.jsonl                   one full record per line, newest last (human-readable)
    .<agent>.jsonl.<16 hex>.tmp     a compaction in flight (a leftover one is removed by open())

Durability. Each write appends one line with a single ``write`` and then ``fdatasync``\\ s
the file before returning, so one effect costs two syncs: the intent (before ``fn`` runs)
and the result. The first write of an agent creates its file and also syncs the directory.
A write that fails is cut back off the file, so the file never holds half a line followed
by more records.

Replay. ``open()`` reads every file; the last line of a key wins. A crash in the middle of
an append leaves a torn last line: every line after the last good one is bad. Such a tail
is dropped (it never finished its fsync, so its writer never went on: a torn intent means
``fn`` never ran, a torn result leaves the intent, which becomes ``unknown``) and reported.
A bad line followed by good ones is not a torn write but damage: that agent's ledger is
left untouched and its effects are refused (``LedgerCorruptError``) until a human looks.

Compaction. When a file passes ``compact_bytes`` and a quarter or more of it is superseded
lines, it is rewritten with the latest record of each key: temp file, fsync, rename over
the file, fsync of the directory. A crash leaves the old file or the new one, both complete.
Keys are kept forever (that is what "at most once, ever" needs), so a file's floor is one
line per key it ever used.

Blocking I/O runs in worker threads; writes of one agent are serialised, different agents
write in parallel. One process writes a directory: the CLI acts through the daemon.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import anyio.to_thread

from supervisor.clock import Clock
from supervisor.effects.errors import LedgerWriteError
from supervisor.effects.ledger.base import (
    EffectRecord,
    decode_record,
    encode_record,
)
from supervisor.effects.ledger.indexed import IndexedLedger
from supervisor.errors import StateError
from supervisor.fsio import (
    describe_os_error,
    fsync_directory,
    prepare_directory,
    replace_atomically,
    write_all,
)
from supervisor.logging import get_logger
from supervisor.state.jsonfile import check_agent_name

__all__ = ["DEFAULT_COMPACT_BYTES", "JsonlLedger"]

_log = get_logger()

#: files are considered for compaction past this size
DEFAULT_COMPACT_BYTES = 4 * 1024 * 1024
_SUFFIX = ".jsonl"
_TEMP_NAME = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.jsonl\.[0-9a-f]{16}\.tmp")
_FILE_MODE = 0o640
_DIR_MODE = 0o750
# fdatasync also flushes the file size an append changed; where it is missing, fsync.
_datasync = getattr(os, "fdatasync", os.fsync)


class JsonlLedger(IndexedLedger):
    """An ``EffectLedger`` keeping ``<directory>/<agent>.jsonl`` per agent."""

    def __init__(
        self,
        directory: Path | str,
        *,
        clock: Clock | None = None,
        compact_bytes: int = DEFAULT_COMPACT_BYTES,
    ) -> None:
        super().__init__(clock=clock)
        if compact_bytes < 1:
            raise ValueError(f"compact_bytes must be >= 1, got {compact_bytes}")
        self.directory = Path(directory)
        self.compact_bytes = compact_bytes
        #: syncs issued so far (file and directory), for measurements
        self.fsyncs = 0
        #: compactions done since open()
        self.compactions = 0
        self._size: dict[str, int] = {}
        # agent -> (kind, key) -> length of the line holding the latest record
        self._live: dict[str, dict[tuple[str, str], int]] = {}

    def __repr__(self) -> str:
        return f"JsonlLedger({str(self.directory)!r})"

    def path_for(self, agent: str) -> Path:
        """The ledger file of ``agent``; raises ``StateError`` for an unsafe name."""
        return self.directory / f"{check_agent_name(agent)}{_SUFFIX}"

    # -- IndexedLedger ------------------------------------------------------------------------

    async def _load(self) -> dict[str, list[EffectRecord]]:
        loaded = await anyio.to_thread.run_sync(self._load_sync)
        for agent, dropped in self.report.torn.items():
            _log.warning(
                "effects.ledger.torn_tail",
                ledger_agent=agent,
                bytes_dropped=dropped,
                path=str(self.path_for(agent)),
            )
        for agent, problem in self.report.corrupt.items():
            _log.error("effects.ledger.corrupt", ledger_agent=agent, problem=problem)
        return loaded

    async def _persist(self, record: EffectRecord, line: bytes) -> None:
        agent = record.agent
        path = self.path_for(agent)
        try:
            size, syncs = await anyio.to_thread.run_sync(self._append_sync, path, line)
        except OSError as exc:
            raise LedgerWriteError(
                agent, f"cannot append to {path}: {describe_os_error(exc)}; the ledger is unchanged"
            ) from exc
        self.fsyncs += syncs
        self._size[agent] = size
        self._live.setdefault(agent, {})[(record.kind, record.key)] = len(line)

    async def _after_write(self, agent: str) -> None:
        size = self._size.get(agent, 0)
        live = sum(self._live.get(agent, {}).values())
        # Each effect leaves its intent line behind its result line, so a file is at most
        # ~40% superseded by effects alone: rewrite once a quarter of it is. Rewriting only
        # when that much is reclaimed keeps the cost per write amortised O(1).
        if size <= self.compact_bytes or 4 * live > 3 * size:
            return
        records = self._records_of(agent)
        lines = [encode_record(r) for r in records]
        path = self.path_for(agent)
        try:
            await anyio.to_thread.run_sync(_replace_atomically, self.directory, path, lines)
        except OSError as exc:
            # The append-only file is still complete and valid; compaction waits for later.
            _log.warning(
                "effects.ledger.compaction_failed", ledger_agent=agent, error=describe_os_error(exc)
            )
            return
        self.fsyncs += 2
        self.compactions += 1
        self._size[agent] = sum(len(line) for line in lines)
        self._live[agent] = {
            (r.kind, r.key): len(line) for r, line in zip(records, lines, strict=True)
        }
        _log.info(
            "effects.ledger.compacted",
            ledger_agent=agent,
            bytes_before=size,
            bytes_after=self._size[agent],
        )

    # -- worker threads -----------------------------------------------------------------------

    def _load_sync(self) -> dict[str, list[EffectRecord]]:
        self._prepare()
        self._size.clear()
        self._live.clear()
        loaded: dict[str, list[EffectRecord]] = {}
        for agent, path in self._files():
            try:
                raw = path.read_bytes()
            except OSError as exc:
                self.report.corrupt[agent] = f"cannot read {path}: {describe_os_error(exc)}"
                continue
            replay = _replay(agent, raw)
            if replay.problem is not None:
                self.report.corrupt[agent] = f"{path}: {replay.problem}"
                continue
            if replay.good_end < len(raw):
                try:
                    _truncate(path, replay.good_end)
                except OSError as exc:
                    self.report.corrupt[agent] = (
                        f"{path}: cannot drop its torn last line: {describe_os_error(exc)}"
                    )
                    continue
                self.fsyncs += 1
                self.report.torn[agent] = len(raw) - replay.good_end
            loaded[agent] = replay.records
            self._size[agent] = replay.good_end
            self._live[agent] = replay.live
        return loaded

    def _prepare(self) -> None:
        self.report.stale_temp_files_removed += prepare_directory(
            self.directory, mode=_DIR_MODE, temp_names=(_TEMP_NAME,), what="effect ledger"
        )

    def _files(self) -> Iterator[tuple[str, Path]]:
        with os.scandir(self.directory) as entries:
            names = sorted(e.name for e in entries if e.name.endswith(_SUFFIX) and e.is_file())
        for name in names:
            agent = name[: -len(_SUFFIX)]
            try:
                check_agent_name(agent)
            except StateError:
                continue
            yield agent, self.directory / name

    def _append_sync(self, path: Path, line: bytes) -> tuple[int, int]:
        """Append ``line`` durably; return the new size and the syncs it took."""
        syncs = 0
        created = False
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = os.open(
                path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE
            )
            created = True
        try:
            before = os.fstat(fd).st_size
            try:
                write_all(fd, line)
                _datasync(fd)
                syncs += 1
            except OSError:
                # Never leave half a line for the next append to be glued onto.
                try:
                    os.ftruncate(fd, before)
                except OSError:
                    pass  # open() will find the torn tail and drop it
                raise
        finally:
            os.close(fd)
        if created:
            # The new file's directory entry must survive a crash too.
            fsync_directory(self.directory)
            syncs += 1
        return before + len(line), syncs


class _Replay:
    __slots__ = ("good_end", "live", "problem", "records")

    def __init__(self) -> None:
        self.records: list[EffectRecord] = []
        self.live: dict[tuple[str, str], int] = {}
        self.good_end = 0
        self.problem: str | None = None


def _replay(agent: str, raw: bytes) -> _Replay:
    """Parse a ledger file; find its torn tail or its damage."""
    out = _Replay()
    pos, lineno = 0, 0
    first_bad: tuple[int, str] | None = None
    while pos < len(raw):
        lineno += 1
        nl = raw.find(b"\n", pos)
        end = len(raw) if nl == -1 else nl
        chunk = raw[pos:end]
        pos = end + 1
        why = _check_line(agent, chunk, complete=nl != -1)
        if isinstance(why, str):
            if first_bad is None:
                first_bad = (lineno, why)
            continue
        if first_bad is not None:
            # A good record after a bad one: the bad one is damage, not a torn last write.
            bad_line, bad_why = first_bad
            out.problem = (
                f"line {bad_line} is bad ({bad_why}) but line {lineno} after it is a valid "
                "record: the file is damaged, not torn by a crash; it is left untouched"
            )
            return out
        out.records.append(why)
        out.live[(why.kind, why.key)] = len(chunk) + 1
        out.good_end = pos
    return out


def _check_line(agent: str, chunk: bytes, *, complete: bool) -> EffectRecord | str:
    if not complete:
        return "no line end"
    try:
        record = decode_record(chunk)
    except ValueError as exc:
        return str(exc)
    if record.agent != agent:
        return f"holds a record of agent {record.agent!r}"
    return record


def _truncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(directory: Path, target: Path, lines: list[bytes]) -> None:
    """Write ``lines`` to a temp file, fsync it, rename it onto ``target``, fsync the dir."""
    replace_atomically(directory, target, b"".join(lines), mode=_FILE_MODE)
    fsync_directory(directory)
