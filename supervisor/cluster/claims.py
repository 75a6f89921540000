"""Fire claims in PostgreSQL: one row per ``(agent, planned_at)``, exactly one winner.

    fire_claims (agent, planned_at) PK, node, fencing_token bigserial (unique), lease_until,
                lease_s, status running|done|abandoned, claimed_at, finished_at, outcome,
                run_id, attempt, abandoned_node, abandoned_by

Every decision is one SQL statement whose ``WHERE`` clause is the rule, evaluated by the
database under its row lock and with its clock (``now()``), never a node's:

- claim:    ``INSERT ... ON CONFLICT DO NOTHING RETURNING``: the unique key picks one winner.
- renew:    ``UPDATE ... WHERE fencing_token = $t AND status = 'running' AND lease_until >
            now()``: a lease that has run out cannot be revived, even if nobody noticed yet.
- finish:   the same fence, setting ``done``.
- expired:  ``UPDATE ... WHERE status = 'running' AND lease_until < now() RETURNING``: when
            several nodes check at once, each row goes to one of them.
- takeover: ``UPDATE ... WHERE fencing_token = $old AND status = 'abandoned'``, giving the
            row a new token, so the stale holder's token never matches again.

``finish_and_commit`` finishes the claim and writes the agent's state in one transaction: a
run's results are stored if and only if its lease was still held when they were.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from supervisor.cluster.base import Claim, ClaimStatus
from supervisor.errors import StateError
from supervisor.state.base import AgentState
from supervisor.state.postgres import Database, PostgresStore, describe, write_failed

__all__ = ["SKIPPED_OUTCOME", "PgFireClaims"]

_COLUMNS = (
    "agent, planned_at, node, fencing_token, lease_until, lease_s, status, claimed_at, "
    "finished_at, outcome, run_id, attempt, slot, abandoned_node, abandoned_by"
)
#: the outcome recorded on a fire skipped because every slot of its agent was busy
SKIPPED_OUTCOME = "skipped_overlap"
_FENCE = "fencing_token = %s AND status = 'running' AND lease_until > now()"


class PgFireClaims:
    """``FireClaims`` on a ``Database`` (opened and closed by its owner).

    Raises ``StateError`` when the database cannot be reached: a node that cannot claim
    must not run the fire (another node may).
    """

    def __init__(self, database: Database) -> None:
        self.database = database

    def __repr__(self) -> str:
        return f"PgFireClaims({self.database!r})"

    async def claim(
        self,
        agent: str,
        planned_at: datetime,
        node: str,
        lease_s: float,
        *,
        run_id: str | None = None,
        slots: int = 1,
    ) -> Claim | None:
        """Claim the fire of ``(agent, planned_at)`` for ``node``.

        Returns the ``RUNNING`` claim when this node won it; None when the fire is already
        claimed (another node won: ``skipped_claimed_elsewhere``); a ``SKIPPED`` claim when
        this node saw first that every one of the agent's ``slots`` is running another fire
        (``skipped_overlap``, recorded so that every fire keeps its one row).
        ``planned_at`` must be timezone-aware and the same on every node: the scheduler's
        planned fire time, not the moment the node saw it.
        """
        _check_lease(lease_s)
        if planned_at.tzinfo is None:
            raise ValueError("planned_at must be timezone-aware")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots!r}")
        action = f"claim the fire of {agent!r} at {planned_at.isoformat()}"
        for slot in range(slots):
            # One statement whatever the answer: the fire's key is the conflict target, so a
            # fire claimed elsewhere returns no row (the common loss, on every other node);
            # a run slot of the agent held by another fire is a unique violation of the
            # running-slot index instead (try the next slot).
            try:
                won = await self._one(
                    "INSERT INTO {s}.fire_claims "
                    "(agent, planned_at, node, lease_until, lease_s, slot, status, run_id) "
                    "VALUES (%s, %s, %s, now() + make_interval(secs => %s), %s, %s, "
                    "'running', %s) "
                    f"ON CONFLICT (agent, planned_at) DO NOTHING RETURNING {_COLUMNS}",
                    (agent, planned_at, node, lease_s, lease_s, slot, run_id),
                    action,
                )
            except StateError as exc:
                if isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                    continue
                raise
            return won
        return await self._one(
            "INSERT INTO {s}.fire_claims "
            "(agent, planned_at, node, lease_until, lease_s, status, outcome, finished_at) "
            "VALUES (%s, %s, %s, now(), %s, 'skipped', %s, now()) "
            f"ON CONFLICT DO NOTHING RETURNING {_COLUMNS}",
            (agent, planned_at, node, lease_s, SKIPPED_OUTCOME),
            action,
        )

    async def renew(self, claim: Claim) -> bool:
        """Extend the lease to ``now() + lease_s``; False when it was lost or finished."""
        renewed = await self._one(
            "UPDATE {s}.fire_claims SET lease_until = now() + make_interval(secs => lease_s) "
            f"WHERE {_FENCE} RETURNING {_COLUMNS}",
            (claim.fencing_token,),
            f"renew the lease of {claim.agent!r}",
        )
        return renewed is not None

    async def finish(self, claim: Claim, outcome: str) -> bool:
        """Mark the claim ``done`` with ``outcome``; False when the lease was lost first."""
        done = await self._one(
            "UPDATE {s}.fire_claims SET status = 'done', finished_at = now(), outcome = %s "
            f"WHERE {_FENCE} RETURNING {_COLUMNS}",
            (outcome, claim.fencing_token),
            f"finish the claim of {claim.agent!r}",
        )
        return done is not None

    async def check_fence(
        self, claim: Claim, conn: AsyncConnection[Any] | None = None, *, lock: bool = False
    ) -> bool:
        """True while ``claim`` is running with an unexpired lease.

        Inside the caller's transaction (``conn``) with ``lock``, the claim row stays locked
        until that transaction ends, so the lease cannot be declared abandoned between this
        check and the caller's commit.
        """
        statement = f"SELECT fencing_token FROM {{s}}.fire_claims WHERE {_FENCE}"
        if lock:
            statement += " FOR UPDATE"
        if conn is not None:
            cur = await conn.execute(self.database.q(statement), (claim.fencing_token,))
            return await cur.fetchone() is not None
        try:
            async with self.database.connection() as own:
                cur = await own.execute(self.database.q(statement), (claim.fencing_token,))
                return await cur.fetchone() is not None
        except psycopg.Error as exc:
            raise StateError(claim.agent, f"cannot check the fence: {describe(exc)}") from exc

    async def finish_and_commit(
        self,
        claim: Claim,
        outcome: str,
        store: PostgresStore,
        state: AgentState | Callable[[AgentState], AgentState],
    ) -> AgentState | None:
        """Finish ``claim`` and commit the agent's state in one transaction, fenced.

        ``state`` is the state to write, or a function building it from the stored one (read
        with its row locked: the runner's commit keeps what other nodes' runs of the agent
        and an operator's pause wrote meanwhile). Returns None, writing nothing, when the
        lease was lost (a takeover may be running the fire: this run's results must not
        land); else the state as written. Raises what ``store.commit`` raises: when the state
        itself is refused (``StateCorruptError``, or a state that would not load back) the
        claim is still finished with ``outcome``, as the run did end; when the database
        fails, the claim stays running and its lease runs out.
        """
        statement = self.database.q(
            "UPDATE {s}.fire_claims SET status = 'done', finished_at = now(), outcome = %s "
            f"WHERE {_FENCE} RETURNING fencing_token"
        )
        with anyio.CancelScope(shield=True):
            try:
                async with store.database.connection() as conn, conn.transaction():
                    cur = await conn.execute(statement, (outcome, claim.fencing_token))
                    if await cur.fetchone() is None:
                        return None
                    build = state if callable(state) else (lambda _stored: state)
                    written = await store.update_in(conn, claim.agent, build)
            except psycopg.Error as exc:
                raise write_failed(claim.agent, "commit the run's state", exc) from exc
            except StateError:
                # Not the database's fault: the run is over all the same, so is its claim
                # (else its lease would run out and a takeover would meet the same state).
                await self.finish(claim, outcome)
                raise
        return written

    async def expired(self, checker: str, *, limit: int = 100) -> list[Claim]:
        """Mark up to ``limit`` running claims past their lease ``abandoned`` by ``checker``.

        Each abandoned claim is returned to exactly one caller, however many check at once
        (rows another checker holds are skipped, the ``WHERE`` is re-checked under the lock).
        """
        return await self._many(
            "UPDATE {s}.fire_claims SET status = 'abandoned', abandoned_node = node, "
            "abandoned_by = %s, finished_at = now(), outcome = 'abandoned' "
            "WHERE (agent, planned_at) IN ("
            "  SELECT agent, planned_at FROM {s}.fire_claims "
            "  WHERE status = 'running' AND lease_until < now() "
            "  ORDER BY lease_until LIMIT %s FOR UPDATE SKIP LOCKED"
            f") AND status = 'running' AND lease_until < now() RETURNING {_COLUMNS}",
            (checker, limit),
            "find expired leases",
        )

    async def takeover(
        self, claim: Claim, node: str, lease_s: float, *, run_id: str | None = None
    ) -> Claim | None:
        """Take the abandoned ``claim`` for ``node`` with a fresh token and lease.

        None when another node took it first, or when the agent's slot is running a newer
        fire meanwhile (the agent runs anyway: the abandoned fire then stays abandoned).
        """
        _check_lease(lease_s)
        try:
            return await self._one(
                "UPDATE {s}.fire_claims SET status = 'running', node = %s, "
                "fencing_token = DEFAULT, lease_until = now() + make_interval(secs => %s), "
                "lease_s = %s, claimed_at = now(), finished_at = NULL, outcome = NULL, "
                "run_id = %s, attempt = attempt + 1 "
                f"WHERE fencing_token = %s AND status = 'abandoned' RETURNING {_COLUMNS}",
                (node, lease_s, lease_s, run_id, claim.fencing_token),
                f"take over the fire of {claim.agent!r}",
            )
        except StateError as exc:
            if isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                return None
            raise

    async def get(self, agent: str, planned_at: datetime) -> Claim | None:
        """The claim of ``(agent, planned_at)``, or None."""
        return await self._one(
            f"SELECT {_COLUMNS} FROM {{s}}.fire_claims WHERE agent = %s AND planned_at = %s",
            (agent, planned_at),
            f"read the claim of {agent!r}",
        )

    async def running(self, node: str | None = None) -> list[Claim]:
        """Running claims (of ``node``, or of every node), oldest first: for ``status``."""
        where = "status = 'running'" + (" AND node = %s" if node is not None else "")
        return await self._many(
            f"SELECT {_COLUMNS} FROM {{s}}.fire_claims WHERE {where} ORDER BY claimed_at",
            (node,) if node is not None else (),
            "list running claims",
        )

    async def latest(self) -> dict[str, Claim]:
        """The most recent claim of every agent: which node ran or runs it (``status``)."""
        claims = await self._many(
            f"SELECT DISTINCT ON (agent) {_COLUMNS} FROM {{s}}.fire_claims "
            "ORDER BY agent, planned_at DESC",
            (),
            "list the latest claims",
        )
        return {c.agent: c for c in claims}

    async def prune(self, older_than_s: float) -> int:
        """Delete finished claims planned more than ``older_than_s`` seconds ago."""
        try:
            async with self.database.connection() as conn:
                cur = await conn.execute(
                    self.database.q(
                        "DELETE FROM {s}.fire_claims WHERE status <> 'running' "
                        "AND planned_at < now() - make_interval(secs => %s)"
                    ),
                    (older_than_s,),
                )
                return cur.rowcount
        except psycopg.Error as exc:
            raise StateError("*", f"cannot prune fire claims: {describe(exc)}") from exc

    async def _many(self, statement: str, params: tuple[Any, ...], action: str) -> list[Claim]:
        try:
            async with self.database.connection() as conn:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(self.database.q(statement), params)
                found = await cur.fetchall()
        except psycopg.Error as exc:
            raise StateError("*", f"cannot {action}: {describe(exc)}") from exc
        return [_claim(row) for row in found]

    async def _one(self, statement: str, params: tuple[Any, ...], action: str) -> Claim | None:
        found = await self._many(statement, params, action)
        return found[0] if found else None


def _check_lease(lease_s: float) -> None:
    if not lease_s > 0:
        raise ValueError(f"lease_s must be > 0, got {lease_s!r}")


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _claim(row: dict[str, Any]) -> Claim:
    return Claim(
        agent=row["agent"],
        planned_at=row["planned_at"].astimezone(UTC),
        node=row["node"],
        fencing_token=row["fencing_token"],
        lease_until=row["lease_until"].astimezone(UTC),
        lease_s=row["lease_s"],
        status=ClaimStatus(row["status"]),
        claimed_at=row["claimed_at"].astimezone(UTC),
        attempt=row["attempt"],
        slot=row["slot"],
        run_id=row["run_id"],
        finished_at=_utc(row["finished_at"]),
        outcome=row["outcome"],
        abandoned_node=row["abandoned_node"],
        abandoned_by=row["abandoned_by"],
    )
