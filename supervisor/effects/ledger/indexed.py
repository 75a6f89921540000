"""``IndexedLedger``: the ``EffectLedger`` protocol over an in-memory index.

A store only supplies ``_load`` (replay what is durable, in write order) and ``_persist``
(make one record durable or raise ``LedgerWriteError``); this class keeps the latest record
of every key in memory, enforces the life cycle drawn in ``base.py`` and serialises the
writes of each agent. The index changes only after ``_persist`` returned.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import datetime
from typing import Any

import anyio
import anyio.lowlevel

from supervisor.clock import Clock, SystemClock
from supervisor.effects.errors import InvalidTransition, LedgerCorruptError, LedgerWriteError
from supervisor.effects.ledger.base import (
    COUNTED_BY_RATE_LIMITS,
    EffectRecord,
    EffectStatus,
    OpenReport,
    encode_record,
)
from supervisor.logging import get_logger

__all__ = ["IndexedLedger", "new_lock"]

_log = get_logger()

# mark(): which statuses each target status may be reached from (None = no record yet).
# INTENT, DONE from INTENT and FAILED/UNKNOWN from INTENT go through write_intent,
# write_result and write_failure, which check their own rules.
_MARK_FROM: dict[EffectStatus, frozenset[EffectStatus | None]] = {
    EffectStatus.PENDING_APPROVAL: frozenset({None, EffectStatus.FAILED}),
    EffectStatus.APPROVED: frozenset({EffectStatus.PENDING_APPROVAL}),
    EffectStatus.REJECTED: frozenset({EffectStatus.PENDING_APPROVAL, EffectStatus.APPROVED}),
    EffectStatus.EXPIRED: frozenset(
        {EffectStatus.PENDING_APPROVAL, EffectStatus.APPROVED, EffectStatus.FAILED}
    ),
    EffectStatus.UNKNOWN: frozenset({EffectStatus.INTENT}),
    EffectStatus.DONE: frozenset(
        {EffectStatus.INTENT, EffectStatus.UNKNOWN, EffectStatus.CHECK_FAILED}
    ),
    EffectStatus.FAILED: frozenset({EffectStatus.INTENT, EffectStatus.UNKNOWN}),
    EffectStatus.ROLLED_BACK: frozenset({EffectStatus.DONE, EffectStatus.CHECK_FAILED}),
    EffectStatus.CHECK_FAILED: frozenset({EffectStatus.DONE, EffectStatus.CHECK_FAILED}),
}
_STARTABLE: frozenset[EffectStatus | None] = frozenset(
    {None, EffectStatus.FAILED, EffectStatus.APPROVED}
)


def new_lock() -> anyio.Lock:
    """A lock that does not yield to the event loop when it is free.

    Each effect takes four locks; a yield on each costs more than the rest of the service's
    own work. ``fast_acquire`` arrived in anyio 4.5.
    """
    try:
        return anyio.Lock(fast_acquire=True)
    except TypeError:  # anyio < 4.5
        return anyio.Lock()


class IndexedLedger:
    """The protocol over an in-memory index; subclasses make records durable.

    Writes of one agent are serialised by a lock and shielded from cancellation: a write
    that reached the store is always reflected in the index, and a cancelled caller learns
    of its cancellation once the write is complete.
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        #: stamps the records ``open()`` writes (intents found without an outcome)
        self.clock: Clock = clock or SystemClock()
        self.report = OpenReport()
        # agent -> (kind, key) -> latest record
        self._index: dict[str, dict[tuple[str, str], EffectRecord]] = {}
        self._approvals: dict[str, tuple[str, str, str]] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._corrupt: dict[str, str] = {}
        self._opened = False
        self._closed = False

    # -- what a store supplies ------------------------------------------------------------

    async def _load(self) -> dict[str, builtins.list[EffectRecord]]:
        """Every durable record per agent, in write order; fill ``report`` as it goes."""
        raise NotImplementedError

    async def _persist(self, record: EffectRecord, line: bytes) -> None:
        """Make ``record`` (encoded as ``line``) durable; raise ``LedgerWriteError`` if not."""
        raise NotImplementedError

    async def _after_write(self, agent: str) -> None:
        """Housekeeping after a write reached the index (the agent's lock is held)."""

    def _records_of(self, agent: str) -> builtins.list[EffectRecord]:
        """The latest record of every key of ``agent``, in first-write order."""
        return list(self._index.get(agent, {}).values())

    # -- life -------------------------------------------------------------------------------

    async def open(self) -> None:
        self.report = OpenReport()
        self._index.clear()
        self._approvals.clear()
        loaded = await self._load()
        self._corrupt = dict(self.report.corrupt)
        for agent, records in loaded.items():
            table = self._index.setdefault(agent, {})
            for record in records:
                table[(record.kind, record.key)] = record
            self.report.records += len(table)
        for table in self._index.values():
            for record in table.values():
                if record.approval_id is not None:
                    self._approvals[record.approval_id] = record.ident
        self._opened, self._closed = True, False
        at = self.clock.now()
        for agent, table in list(self._index.items()):
            for record in [r for r in table.values() if r.status is EffectStatus.INTENT]:
                await self._write(
                    replace(
                        record,
                        status=EffectStatus.UNKNOWN,
                        updated_at=at,
                        done_at=at,
                        error=record.error or "the process stopped between intent and result",
                    ),
                    agent,
                )
                self.report.unknown_marked += 1
        if self.report.unknown_marked:
            _log.warning("effects.ledger.unknown_after_restart", count=self.report.unknown_marked)

    async def close(self) -> None:
        for lock in list(self._locks.values()):
            async with lock:
                pass
        self._closed = True

    # -- reads ------------------------------------------------------------------------------

    async def get(self, agent: str, kind: str, key: str) -> EffectRecord | None:
        self._check_usable(agent)
        return self._index.get(agent, {}).get((kind, key))

    async def list(
        self, agent: str | None = None, status: EffectStatus | None = None
    ) -> builtins.list[EffectRecord]:
        await anyio.lowlevel.checkpoint()
        tables: Iterable[dict[tuple[str, str], EffectRecord]]
        tables = [self._index.get(agent, {})] if agent is not None else self._index.values()
        found = [
            r for table in tables for r in table.values() if status is None or r.status is status
        ]
        return sorted(found, key=lambda r: r.updated_at)

    async def find_approval(self, approval_id: str) -> EffectRecord | None:
        await anyio.lowlevel.checkpoint()
        ident = self._approvals.get(approval_id)
        if ident is None:
            return None
        agent, kind, key = ident
        return self._index.get(agent, {}).get((kind, key))

    async def starts_since(self, agent: str, kind: str, since: datetime) -> builtins.list[datetime]:
        self._check_usable(agent)
        # A scan of the agent's records: a kind limited to N per window keeps few records
        # per window, and a scan of a few thousand records costs well under a millisecond.
        return sorted(
            r.intent_at
            for (k, _), r in self._index.get(agent, {}).items()
            if k == kind
            and r.status in COUNTED_BY_RATE_LIMITS
            and r.intent_at is not None
            and r.intent_at > since
        )

    # -- writes -----------------------------------------------------------------------------

    async def write_intent(
        self,
        agent: str,
        kind: str,
        key: str,
        *,
        at: datetime,
        run_id: str,
        idempotency_key: str,
        params_fingerprint: str | None = None,
    ) -> EffectRecord:
        def change(old: EffectRecord | None) -> EffectRecord:
            status = old.status if old is not None else None
            if status not in _STARTABLE:
                raise InvalidTransition(
                    f"agent {agent!r} effect {kind}:{key!r}: cannot start an effect that is "
                    f"{status}"
                )
            base = old or EffectRecord(agent, kind, key, EffectStatus.INTENT, at)
            return replace(
                base,
                status=EffectStatus.INTENT,
                updated_at=at,
                run_id=run_id,
                attempts=base.attempts + 1,
                intent_at=at,
                done_at=None,
                result=None,
                error=None,
                idempotency_key=idempotency_key,
                params_fingerprint=params_fingerprint or base.params_fingerprint,
            )

        return await self._update(agent, kind, key, change)

    async def write_result(
        self, agent: str, kind: str, key: str, *, at: datetime, result: Any, note: str | None
    ) -> EffectRecord:
        def change(old: EffectRecord | None) -> EffectRecord:
            old = _expect(old, agent, kind, key, EffectStatus.DONE, {EffectStatus.INTENT})
            return replace(
                old,
                status=EffectStatus.DONE,
                updated_at=at,
                done_at=at,
                result=result,
                error=None,
                note=note,
            )

        return await self._update(agent, kind, key, change)

    async def write_failure(
        self,
        agent: str,
        kind: str,
        key: str,
        *,
        at: datetime,
        error: str,
        status: EffectStatus,
    ) -> EffectRecord:
        if status not in (EffectStatus.FAILED, EffectStatus.UNKNOWN):
            raise InvalidTransition(f"a failure is failed or unknown, not {status}")

        def change(old: EffectRecord | None) -> EffectRecord:
            old = _expect(old, agent, kind, key, status, {EffectStatus.INTENT})
            return replace(old, status=status, updated_at=at, done_at=at, error=error)

        return await self._update(agent, kind, key, change)

    async def mark(
        self,
        agent: str,
        kind: str,
        key: str,
        status: EffectStatus,
        *,
        at: datetime,
        **changes: Any,
    ) -> EffectRecord:
        bad = set(changes) - _MARKABLE
        if bad:
            raise InvalidTransition(f"mark() cannot set {sorted(bad)}")
        allowed = _MARK_FROM.get(status)
        if allowed is None:
            raise InvalidTransition(f"mark() cannot set status {status}")

        def change(old: EffectRecord | None) -> EffectRecord:
            current = old.status if old is not None else None
            if current not in allowed:
                raise InvalidTransition(
                    f"agent {agent!r} effect {kind}:{key!r}: cannot go from {current} to {status}"
                )
            base = old or EffectRecord(agent, kind, key, status, at)
            return replace(base, status=status, updated_at=at, **changes)

        return await self._update(agent, kind, key, change)

    # -- plumbing ---------------------------------------------------------------------------

    def _check_usable(self, agent: str) -> None:
        problem = self._corrupt.get(agent)
        if problem is not None:
            raise LedgerCorruptError(agent, problem)

    def _lock(self, agent: str) -> anyio.Lock:
        lock = self._locks.get(agent)
        if lock is None:
            lock = self._locks[agent] = new_lock()
        return lock

    async def _update(
        self,
        agent: str,
        kind: str,
        key: str,
        change: Callable[[EffectRecord | None], EffectRecord],
    ) -> EffectRecord:
        self._check_usable(agent)
        if not self._opened or self._closed:
            raise LedgerWriteError(agent, "the effect ledger is not open")
        # Shielded: once the write is under way the index must learn of it (see class doc).
        with anyio.CancelScope(shield=True):
            async with self._lock(agent):
                old = self._index.get(agent, {}).get((kind, key))
                new = change(old)
                await self._write_locked(new, agent)
        return new

    async def _write(self, record: EffectRecord, agent: str) -> None:
        with anyio.CancelScope(shield=True):
            async with self._lock(agent):
                await self._write_locked(record, agent)

    async def _write_locked(self, record: EffectRecord, agent: str) -> None:
        try:
            line = encode_record(record)
        except TypeError as exc:
            raise LedgerWriteError(agent, str(exc)) from exc
        await self._persist(record, line)
        self._index.setdefault(agent, {})[(record.kind, record.key)] = record
        if record.approval_id is not None:
            self._approvals[record.approval_id] = record.ident
        await self._after_write(agent)


_MARKABLE = frozenset(
    {
        "run_id",
        "result",
        "error",
        "note",
        "done_at",
        "approval_id",
        "params",
        "params_fingerprint",
        "reason",
        "requested_at",
        "expires_at",
        "decided_by",
        "decided_at",
    }
)


def _expect(
    old: EffectRecord | None,
    agent: str,
    kind: str,
    key: str,
    target: EffectStatus,
    allowed: set[EffectStatus],
) -> EffectRecord:
    if old is None or old.status not in allowed:
        current = old.status if old is not None else None
        raise InvalidTransition(
            f"agent {agent!r} effect {kind}:{key!r}: cannot go from {current} to {target}"
        )
    return old
