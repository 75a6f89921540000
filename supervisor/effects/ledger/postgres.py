"""The scale-out effect ledger: one row per ``(agent, kind, key)`` in PostgreSQL.

    effects (agent, kind, key) PK, status, doc jsonb (EffectRecord.to_doc()), node,
            approval_id, intent_at, updated_at, written_at (database time), seq

The database, not an in-memory index, is the truth: several nodes write the same table.
Every write is one transaction that locks the row (``SELECT ... FOR UPDATE``), applies the
life-cycle rule of ``IndexedLedger`` to the record it finds there, and writes the result, so
two nodes can never both start one effect: the second finds the first one's intent and gets
``InvalidTransition``. Reads go to the database too. An intent is committed before ``fn``
runs and the result after it, as in the file ledger.

Orphaned intents. ``node`` names the node that wrote the latest record. An intent is turned
into ``unknown`` only when the node that wrote it can no longer finish it:

- at ``open()``: intents written under this node's own name (its previous process died;
  ``NodeNameInUse`` keeps two live processes from sharing a name), and
- at ``open()`` and ``reap_orphans()``: intents of nodes whose heartbeat in ``nodes`` is
  older than ``node_ttl_s`` seconds, or that have no heartbeat row at all.

Intents of live nodes are never touched: their runs are still going. A node presumed dead
that comes back finds its intent ``unknown`` and its result refused (``InvalidTransition``):
the effect is then held for reconcile or a human, never repeated. A row that does not parse
raises ``LedgerCorruptError`` for that key only; it is left untouched.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

import anyio
import anyio.lowlevel
import psycopg
from psycopg import AsyncConnection

from supervisor.clock import Clock
from supervisor.effects.errors import LedgerCorruptError, LedgerWriteError
from supervisor.effects.ledger.base import (
    COUNTED_BY_RATE_LIMITS,
    EffectRecord,
    EffectStatus,
    OpenReport,
    decode_record,
    encode_record,
)
from supervisor.effects.ledger.indexed import IndexedLedger
from supervisor.errors import StateError
from supervisor.logging import get_logger
from supervisor.state.jsonfile import check_agent_name
from supervisor.state.postgres import DEFAULT_SCHEMA, Database, describe, write_failed

__all__ = ["PostgresLedger"]

_log = get_logger()
_ALL = "*"
_COUNTED = sorted(s.value for s in COUNTED_BY_RATE_LIMITS)
_OWN_ORPHAN = "the process stopped between intent and result"


class PostgresLedger(IndexedLedger):
    """An ``EffectLedger`` in PostgreSQL, safe to share between the nodes of a cluster.

    ``node`` is this node's name (``open()`` adopts the intents its previous process left);
    ``node_ttl_s`` is how stale another node's heartbeat must be before its intents are
    declared orphaned. Give it the node's shared ``Database``, or a URL for a pool of its own.
    """

    def __init__(
        self,
        database: Database | str,
        *,
        node: str,
        clock: Clock | None = None,
        node_ttl_s: float = 30.0,
        schema: str = DEFAULT_SCHEMA,
    ) -> None:
        super().__init__(clock=clock)
        self.database = (
            database if isinstance(database, Database) else Database(database, schema=schema)
        )
        self.node = node
        self.node_ttl_s = node_ttl_s
        self._db_open = False

    def __repr__(self) -> str:
        return f"PostgresLedger({self.database!r}, node={self.node!r})"

    # -- life -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, count the records, and turn orphaned intents into ``unknown`` (durably).

        Raises ``StateError`` when the database cannot be reached.
        """
        if not self._db_open:
            await self.database.open()
            self._db_open = True
        self.report = OpenReport()
        try:
            async with self.database.connection() as conn:
                cur = await conn.execute(self.database.q("SELECT count(*) FROM {s}.effects"))
                row = await cur.fetchone()
        except psycopg.Error as exc:
            raise StateError(_ALL, f"cannot read the effect ledger: {describe(exc)}") from exc
        self.report.records = row[0] if row else 0
        self._opened, self._closed = True, False
        self.report.unknown_marked = await self._reap(own=True)
        if self.report.unknown_marked:
            _log.warning("effects.ledger.unknown_after_restart", count=self.report.unknown_marked)

    async def close(self) -> None:
        """Wait for writes in flight, then release the database (if no one else uses it)."""
        await super().close()
        if self._db_open:
            self._db_open = False
            await self.database.close()

    async def reap_orphans(self) -> int:
        """Turn intents of nodes that stopped heartbeating into ``unknown``; return how many.

        Call it periodically (with the lease checker). Raises ``LedgerWriteError`` when the
        write fails.
        """
        marked = await self._reap(own=False)
        if marked:
            _log.warning("effects.ledger.orphans_marked_unknown", count=marked)
        return marked

    # -- reads ------------------------------------------------------------------------------

    async def get(self, agent: str, kind: str, key: str) -> EffectRecord | None:
        found = await self._select(
            "WHERE agent = %s AND kind = %s AND key = %s", (agent, kind, key), agent
        )
        return found[0] if found else None

    async def list(
        self, agent: str | None = None, status: EffectStatus | None = None
    ) -> builtins.list[EffectRecord]:
        clauses, params = [], []
        if agent is not None:
            clauses.append("agent = %s")
            params.append(agent)
        if status is not None:
            clauses.append("status = %s")
            params.append(status.value)
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        found = await self._select(f"{where}ORDER BY seq", tuple(params), agent or _ALL)
        # Sorted here (stable, first-write order on ties) exactly as the other ledgers do.
        return sorted(found, key=lambda r: r.updated_at)

    async def find_approval(self, approval_id: str) -> EffectRecord | None:
        found = await self._select("WHERE approval_id = %s", (approval_id,), _ALL)
        return found[0] if found else None

    async def starts_since(self, agent: str, kind: str, since: datetime) -> builtins.list[datetime]:
        found = await self._select(
            "WHERE agent = %s AND kind = %s AND status = ANY(%s) AND intent_at > %s",
            (agent, kind, _COUNTED, since),
            agent,
        )
        return sorted(r.intent_at for r in found if r.intent_at is not None)

    # -- writes -----------------------------------------------------------------------------

    async def _update(
        self,
        agent: str,
        kind: str,
        key: str,
        change: Callable[[EffectRecord | None], EffectRecord],
    ) -> EffectRecord:
        """Lock the row, apply ``change`` to what the database holds, write the result."""
        check_agent_name(agent)
        if not self._opened or self._closed:
            raise LedgerWriteError(agent, "the effect ledger is not open")
        # Shielded like the other ledgers' writes: a write under way is seen to its end.
        with anyio.CancelScope(shield=True):
            async with self._lock(agent):
                try:
                    async with self.database.connection() as conn, conn.transaction():
                        new = await self._update_in(conn, agent, kind, key, change)
                except psycopg.Error as exc:
                    raise write_failed(
                        agent, f"write effect {kind}:{key!r}", exc, LedgerWriteError
                    ) from exc
        return new

    async def _update_in(
        self,
        conn: AsyncConnection[Any],
        agent: str,
        kind: str,
        key: str,
        change: Callable[[EffectRecord | None], EffectRecord],
    ) -> EffectRecord:
        for _ in range(2):
            old = await self._locked(conn, agent, kind, key)
            new = change(old)  # InvalidTransition rolls the transaction back
            line = _encode(new)
            if old is not None:
                await conn.execute(
                    self.database.q(
                        "UPDATE {s}.effects SET status = %s, doc = %s::jsonb, node = %s, "
                        "approval_id = %s, intent_at = %s, updated_at = %s, written_at = now() "
                        "WHERE agent = %s AND kind = %s AND key = %s"
                    ),
                    (*self._columns(new, line), agent, kind, key),
                )
                return new
            cur = await conn.execute(
                self.database.q(
                    "INSERT INTO {s}.effects (status, doc, node, approval_id, intent_at, "
                    "updated_at, agent, kind, key) "
                    "VALUES (%s, %s::jsonb, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (agent, kind, key) DO NOTHING RETURNING seq"
                ),
                (*self._columns(new, line), agent, kind, key),
            )
            if await cur.fetchone() is not None:
                return new
            # Another node inserted this key since we looked: apply the rule to its record.
        raise LedgerWriteError(agent, f"effect {kind}:{key!r} kept changing under this write")

    def _columns(self, record: EffectRecord, line: bytes) -> tuple[Any, ...]:
        return (
            record.status.value,
            line.decode(),
            self.node,
            record.approval_id,
            record.intent_at,
            record.updated_at,
        )

    async def _locked(
        self, conn: AsyncConnection[Any], agent: str, kind: str, key: str
    ) -> EffectRecord | None:
        cur = await conn.execute(
            self.database.q(
                "SELECT doc::text FROM {s}.effects WHERE agent = %s AND kind = %s AND key = %s "
                "FOR UPDATE"
            ),
            (agent, kind, key),
        )
        row = await cur.fetchone()
        return None if row is None else _decode(agent, kind, key, row[0])

    async def _reap(self, *, own: bool) -> int:
        """Mark orphaned intents unknown (see the module docstring); return how many."""
        at = self.clock.now()
        marked = 0
        try:
            async with self.database.connection() as conn, conn.transaction():
                cur = await conn.execute(
                    self.database.q(
                        "SELECT agent, kind, key, node, doc::text FROM {s}.effects e "
                        "WHERE status = 'intent' AND ((%s AND node = %s) OR NOT EXISTS ("
                        "  SELECT 1 FROM {s}.nodes n WHERE n.node = e.node "
                        "  AND n.last_seen > now() - make_interval(secs => %s))) "
                        "ORDER BY seq FOR UPDATE SKIP LOCKED"
                    ),
                    (own, self.node, self.node_ttl_s),
                )
                for agent, kind, key, node, raw in await cur.fetchall():
                    try:
                        record = _decode(agent, kind, key, raw)
                    except LedgerCorruptError as exc:
                        self.report.corrupt[agent] = str(exc)
                        continue
                    why = (
                        _OWN_ORPHAN
                        if node == self.node
                        else f"node {node!r} stopped heartbeating between intent and result"
                    )
                    new = replace(
                        record,
                        status=EffectStatus.UNKNOWN,
                        updated_at=at,
                        done_at=at,
                        error=record.error or why,
                    )
                    await conn.execute(
                        self.database.q(
                            "UPDATE {s}.effects SET status = %s, doc = %s::jsonb, "
                            "updated_at = %s, written_at = now() "
                            "WHERE agent = %s AND kind = %s AND key = %s"
                        ),
                        (new.status.value, _encode(new).decode(), at, agent, kind, key),
                    )
                    marked += 1
        except psycopg.Error as exc:
            raise LedgerWriteError(
                _ALL, f"cannot mark orphaned intents unknown: {describe(exc)}"
            ) from exc
        return marked

    async def _select(
        self, where: str, params: tuple[Any, ...], subject: str
    ) -> builtins.list[EffectRecord]:
        if not self._opened or self._closed:
            await anyio.lowlevel.checkpoint()
            raise StateError(subject, "the effect ledger is not open")
        try:
            async with self.database.connection() as conn:
                cur = await conn.execute(
                    self.database.q(
                        f"SELECT agent, kind, key, doc::text FROM {{s}}.effects {where}"
                    ),
                    params,
                )
                rows = await cur.fetchall()
        except psycopg.Error as exc:
            raise StateError(subject, f"cannot read the effect ledger: {describe(exc)}") from exc
        return [_decode(agent, kind, key, raw) for agent, kind, key, raw in rows]


def _encode(record: EffectRecord) -> bytes:
    try:
        return encode_record(record)
    except TypeError as exc:
        raise LedgerWriteError(record.agent, str(exc)) from exc


def _decode(agent: str, kind: str, key: str, raw: str) -> EffectRecord:
    """Parse a row; raise ``LedgerCorruptError`` naming it when it is not this key's record."""
    try:
        record = decode_record(raw)
    except ValueError as exc:
        raise LedgerCorruptError(agent, f"effects row {kind}:{key!r}: {exc}") from exc
    if record.ident != (agent, kind, key):
        raise LedgerCorruptError(
            agent, f"effects row {kind}:{key!r} holds the record of {record.ident!r}"
        )
    return record
