"""Cluster-wide budgets: spend windows as PostgreSQL rows, reserved by a conditional UPDATE.

``PgBudgetLedger`` has ``BudgetLedger``'s interface (``budget.py``) and windows (``windows.py``),
but the shared windows live in the database, one row per window and period::

    budget_windows (key PK "<kind>:<scope>:<period>", kind, scope, period,
                    spent, reserved, spent_tokens, reserved_tokens)   (nano-dollars, tokens)

A reservation is one transaction: lock the call's rows in key order (``SELECT ... ORDER BY
key FOR UPDATE``, so concurrent reservers never deadlock), check them most specific first
(the error names the first window the call would not fit, as ``BudgetExceeded``), then::

    UPDATE budget_windows SET reserved = reserved + $x ...
    WHERE key = $k AND spent + reserved + $x <= $limit RETURNING ...

for every window at once; fewer rows back than windows means no fit and the transaction
rolls back, holding nothing. However many nodes reserve at once, spent + reserved never
passes a limit. ``settle`` replaces the reservation by the actual cost in the same rows;
a reservation left by a node that died stays counted (it may have been billed), as the
file ledger counts outstanding reservations as spent after a crash.

The run window stays in memory (a run lives on one node). Periods (UTC day and hour) come
from the injected clock, so nodes should keep their clocks in sync (NTP): a node whose clock
is off counts near a boundary in the neighbouring period. Every lock on the global rows is
held for one short transaction; that serialises reservations cluster-wide (hundreds per
second), far above what LLM calls need.
"""

from __future__ import annotations

import itertools
from datetime import UTC, timedelta
from typing import Any

import anyio
import anyio.lowlevel
import psycopg
from psycopg import AsyncConnection

from supervisor.clock import Clock
from supervisor.errors import BudgetExceeded, StateError
from supervisor.llm.budget import DOC_NAME, Reservation
from supervisor.llm.config import BudgetsConfig, LimitConfig
from supervisor.llm.windows import (
    DAY,
    GLOBAL,
    Window,
    WindowKind,
    WindowStatus,
    check_amounts,
    check_fits,
    is_current,
    periods,
    report,
    shared_windows,
    to_nanos,
)
from supervisor.state.jsonfile import doc_subject
from supervisor.state.postgres import Database, describe, write_failed

__all__ = ["PgBudgetLedger", "window_key"]

_SUBJECT = doc_subject(DOC_NAME)
_ROW = "key, spent, reserved, spent_tokens, reserved_tokens"


def window_key(kind: WindowKind, scope: str, period: str) -> str:
    """The row key of one shared window: ``agent_day:alpha:2026-03-01``."""
    return f"{kind.value}:{scope}:{period}"


class PgBudgetLedger:
    """``BudgetLedger`` with its agent and global windows shared by every node in PostgreSQL.

    The ``Database`` is opened and closed by its owner. ``limits`` may be replaced (reload);
    it applies from the next reservation. ``snapshot()`` reports the values last read.
    """

    def __init__(self, database: Database, clock: Clock, limits: BudgetsConfig) -> None:
        self.limits = limits
        #: transactions written so far (one per reservation and per settlement)
        self.writes = 0
        self._db = database
        self._clock = clock
        self._runs: dict[str, Window] = {}
        # The shared windows as last read, for snapshot(); keyed by row key.
        self._seen: dict[str, Window] = {}
        self._outstanding: dict[int, Reservation] = {}
        self._ids = itertools.count(1)
        self._existing: set[str] = set()

    def __repr__(self) -> str:
        return f"PgBudgetLedger({self._db!r}, outstanding={len(self._outstanding)})"

    @property
    def outstanding(self) -> int:
        """Reservations of this node not yet settled or released."""
        return len(self._outstanding)

    async def load(self) -> None:
        """Read the current windows (for ``snapshot``). Raises ``StateError``."""
        await self.refresh()

    async def refresh(self) -> None:
        """Re-read the current hour's and day's windows; call it before publishing metrics.

        Raises ``StateError`` when the database cannot be read.
        """
        day, hour = periods(self._clock)
        try:
            async with self._db.connection() as conn:
                cur = await conn.execute(
                    self._db.q(
                        f"SELECT {_ROW}, kind, scope, period FROM {{s}}.budget_windows "
                        "WHERE period IN (%s, %s)"
                    ),
                    (day, hour),
                )
                rows = await cur.fetchall()
        except psycopg.Error as exc:
            raise StateError(_SUBJECT, f"cannot read budget windows: {describe(exc)}") from exc
        # The limit each agent window was last checked against (an agent's own override)
        # is this node's knowledge, not the database's: keep it across the re-read.
        known = {key: w.limit for key, w in self._seen.items() if w.limit is not None}
        self._seen = {}
        for key, spent, reserved, spent_tokens, reserved_tokens, kind, scope, period in rows:
            window = self._mirror(WindowKind(kind), scope, period)
            window.limit = known.get(key)
            _store(window, (key, spent, reserved, spent_tokens, reserved_tokens))

    async def reserve(
        self,
        agent: str,
        run_id: str,
        usd: float,
        tokens: int,
        *,
        run_limit: LimitConfig | None = None,
        agent_day_limit: LimitConfig | None = None,
    ) -> Reservation:
        """Hold ``usd`` and ``tokens`` in the run window and in the shared rows.

        Returns once the reservation is committed. Raises ``BudgetExceeded`` naming the first
        window it would not fit, holding nothing; ``ValueError`` for a bad amount;
        ``StateWriteError`` when the database write fails (nothing is then held). A caller
        cancelled meanwhile holds nothing either.
        """
        check_amounts(usd, tokens)
        nanos = to_nanos(usd)
        limits = self.limits
        run = self._runs.get(run_id)
        if run is None:
            run = self._runs[run_id] = Window(WindowKind.RUN, run_id, None)
        run_lim = run_limit if run_limit is not None else limits.per_run
        check_fits(run, run_lim, nanos, tokens, usd)
        # Held in memory at once, with no await in between, so calls of one run see each other.
        run.hold(nanos, tokens, run_lim)
        day, hour = periods(self._clock)
        shared = shared_windows(self._mirror, agent, day, hour, limits, agent_day_limit)
        reservation = Reservation(
            next(self._ids), agent, run_id, usd, tokens, (run, *(w for w, _ in shared))
        )
        try:
            with anyio.CancelScope(shield=True):
                await self._reserve_rows(shared, nanos, tokens, usd)
        except BaseException:
            run.settle(nanos, tokens, 0, 0)
            raise
        for window, limit in shared:
            window.limit = limit  # reported by snapshot() (an agent's override included)
        self._outstanding[reservation.id] = reservation
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            # Committed, but the caller is gone: the call will not be made.
            with anyio.CancelScope(shield=True):
                await self.release(reservation)
            raise
        return reservation

    async def settle(self, reservation: Reservation, usd: float, tokens: int) -> None:
        """Replace ``reservation`` by the actual cost in its windows (written at once).

        Settling twice does nothing. Raises ``ValueError`` for a bad amount and
        ``StateWriteError`` when the write fails (the reservation then stays counted in
        the shared windows: they never undercount).
        """
        check_amounts(usd, tokens)
        if self._outstanding.pop(reservation.id, None) is None:
            return
        nanos, held = to_nanos(usd), to_nanos(reservation.usd)
        run, *shared = reservation._windows
        run.settle(held, reservation.tokens, nanos, tokens)
        keys = sorted(_key_of(w) for w in shared)
        with anyio.CancelScope(shield=True):
            try:
                async with self._db.connection() as conn, conn.transaction():
                    await self._lock(conn, keys)
                    cur = await conn.execute(
                        self._db.q(
                            "UPDATE {s}.budget_windows SET "
                            "reserved = greatest(reserved - %s, 0), "
                            "reserved_tokens = greatest(reserved_tokens - %s, 0), "
                            "spent = spent + %s, spent_tokens = spent_tokens + %s, "
                            f"updated_at = now() WHERE key = ANY(%s) RETURNING {_ROW}"
                        ),
                        (held, reservation.tokens, nanos, tokens, keys),
                    )
                    rows = await cur.fetchall()
            except psycopg.Error as exc:
                raise write_failed(_SUBJECT, "settle a budget reservation", exc) from exc
        self.writes += 1
        self._remember(shared, rows)

    async def release(self, reservation: Reservation) -> None:
        """Drop ``reservation`` unused (the call was not made)."""
        await self.settle(reservation, 0.0, 0)

    def end_run(self, run_id: str) -> None:
        """Forget the run's window; its spend stays in the shared windows."""
        self._runs.pop(run_id, None)

    async def flush(self) -> None:
        """Nothing to do: every change is committed before its method returns."""
        await anyio.lowlevel.checkpoint()

    async def close(self) -> None:
        """Nothing to release (the ``Database`` belongs to its owner)."""
        await anyio.lowlevel.checkpoint()

    async def prune(self, keep_days: int = 2) -> int:
        """Delete windows of periods older than ``keep_days`` UTC days; return how many."""
        day = self._clock.now().astimezone(UTC).date()
        before = (day - timedelta(days=keep_days)).strftime(DAY)
        try:
            async with self._db.connection() as conn:
                cur = await conn.execute(
                    self._db.q("DELETE FROM {s}.budget_windows WHERE period < %s"), (before,)
                )
                return cur.rowcount
        except psycopg.Error as exc:
            raise StateError(_SUBJECT, f"cannot prune budget windows: {describe(exc)}") from exc

    def snapshot(self) -> list[WindowStatus]:
        """The current windows as last read: the global ones always, then agents and runs."""
        day, hour = periods(self._clock)
        self._mirror(WindowKind.GLOBAL_HOUR, GLOBAL, hour)
        self._mirror(WindowKind.GLOBAL_DAY, GLOBAL, day)
        current = [w for w in self._seen.values() if is_current(w, day, hour)]
        return report([*current, *self._runs.values()], self.limits)

    # -- plumbing ---------------------------------------------------------------------------

    async def _reserve_rows(
        self, shared: list[tuple[Window, LimitConfig]], nanos: int, tokens: int, usd: float
    ) -> None:
        keys = [_key_of(w) for w, _ in shared]
        try:
            async with self._db.connection() as conn:
                await self._ensure_rows(conn, [w for w, _ in shared])
                async with conn.transaction():
                    rows = await self._lock(conn, sorted(keys))
                    if len(rows) != len(keys):
                        # A row this node believed made was pruned: make it, lock again.
                        self._existing.difference_update(keys)
                        await self._ensure_rows(conn, [w for w, _ in shared])
                        rows = await self._lock(conn, sorted(keys))
                    self._remember([w for w, _ in shared], rows)
                    for window, limit in shared:
                        check_fits(window, limit, nanos, tokens, usd)  # names the window
                    cur = await conn.execute(
                        self._db.q(
                            "UPDATE {s}.budget_windows w SET reserved = w.reserved + %s, "
                            "reserved_tokens = w.reserved_tokens + %s, updated_at = now() "
                            "FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) "
                            "AS l(key, usd, tokens) WHERE w.key = l.key "
                            "AND (l.usd IS NULL OR w.spent + w.reserved + %s <= l.usd) "
                            "AND (l.tokens IS NULL OR "
                            "w.spent_tokens + w.reserved_tokens + %s <= l.tokens) "
                            f"RETURNING {', '.join('w.' + c for c in _ROW.split(', '))}"
                        ),
                        (
                            nanos,
                            tokens,
                            keys,
                            [None if lim.usd is None else to_nanos(lim.usd) for _, lim in shared],
                            [lim.tokens for _, lim in shared],
                            nanos,
                            tokens,
                        ),
                    )
                    updated = await cur.fetchall()
                    if len(updated) != len(keys):
                        # The rows are locked and were checked above: only a bug gets here.
                        raise BudgetExceeded(
                            "a shared budget window refused the reservation",
                            limit=0.0,
                            observed=usd,
                        )
        except psycopg.Error as exc:
            raise write_failed(_SUBJECT, "reserve budget", exc) from exc
        self.writes += 1
        self._remember([w for w, _ in shared], updated)

    async def _ensure_rows(self, conn: AsyncConnection[Any], windows: list[Window]) -> None:
        """Create missing window rows (own statement, before the reservation's locks)."""
        missing = [w for w in windows if _key_of(w) not in self._existing]
        if not missing:
            return
        missing.sort(key=_key_of)
        await conn.execute(
            self._db.q(
                "INSERT INTO {s}.budget_windows (key, kind, scope, period) "
                "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[]) "
                "ON CONFLICT (key) DO NOTHING"
            ),
            (
                [_key_of(w) for w in missing],
                [w.kind.value for w in missing],
                [w.key for w in missing],
                [w.period for w in missing],
            ),
        )
        self._existing.update(_key_of(w) for w in missing)

    async def _lock(self, conn: AsyncConnection[Any], keys: list[str]) -> list[tuple[Any, ...]]:
        """Lock the rows of ``keys`` in key order; return their current values."""
        cur = await conn.execute(
            self._db.q(
                f"SELECT {_ROW} FROM {{s}}.budget_windows WHERE key = ANY(%s) "
                "ORDER BY key FOR UPDATE"
            ),
            (keys,),
        )
        return await cur.fetchall()

    def _remember(self, windows: list[Window], rows: list[tuple[Any, ...]]) -> None:
        by_key = {row[0]: row for row in rows}
        for window in windows:
            row = by_key.get(_key_of(window))
            if row is not None:
                _store(window, row)

    def _mirror(self, kind: WindowKind, scope: str, period: str) -> Window:
        key = window_key(kind, scope, period)
        window = self._seen.get(key)
        if window is None:
            window = self._seen[key] = Window(kind, scope, period)
        return window


def _key_of(window: Window) -> str:
    assert window.period is not None, "run windows are not shared"
    return window_key(window.kind, window.key, window.period)


def _store(window: Window, row: tuple[Any, ...]) -> None:
    _, window.spent, window.reserved, window.spent_tokens, window.reserved_tokens = row
