"""The scale-out store: agent state and supervisor documents in PostgreSQL.

Tables (in the schema given by ``schema``, default ``agent_supervisor``; created and
upgraded by ``supervisor.state.migrations`` when the database is opened)::

    agents (agent text PK, doc jsonb, version int, updated_at timestamptz)   one row per agent
    docs   (name text PK,  doc jsonb, version int, updated_at timestamptz)   e.g. "budget"

``version`` counts the commits of a row; ``updated_at`` is database time. ``doc`` holds the
same JSON a ``JsonFileStore`` file holds, and goes through the same encoder and validator:
what could not load back is never written (``StateWriteError``), and a stored row that does
not validate raises ``StateCorruptError`` on load and is never overwritten by a commit: it
waits for a human (fix it with an ``UPDATE`` or remove it with a ``DELETE``).

Differences from the file store that come from the medium: ``jsonb`` cannot hold a string
with a NUL character (such a commit raises ``StateWriteError``), and it keeps numbers as
decimals, so a float written in exponent form with an integral value that fits 64 bits
(``1e16``) loads back as the equal ``int``.

A ``Database`` is one connection pool on one schema; every PostgreSQL-backed part of a node
(this store, the effect ledger, fire claims, node heartbeats, budget windows) shares it.
Errors from psycopg are translated here, once, into ``StateError`` and its subclasses.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import psycopg
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from supervisor.errors import StateCorruptError, StateError, StateWriteError
from supervisor.state.base import AgentState
from supervisor.state.jsonfile import (
    check_agent_name,
    check_doc_name,
    decode_doc,
    decode_state,
    doc_subject,
    encode_doc,
    encode_state,
)
from supervisor.state.migrations import apply_migrations, render

__all__ = [
    "DEFAULT_SCHEMA",
    "Database",
    "PostgresStore",
    "describe",
    "split_schema",
]

DEFAULT_SCHEMA = "agent_supervisor"
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_ALL = "*"


def split_schema(url: str) -> tuple[str, str | None]:
    """Split a ``schema=`` query parameter off a ``postgresql://`` URL.

    libpq does not know that parameter, so ``postgresql://db/x?schema=s`` becomes
    ``("postgresql://db/x", "s")``; a URL without one gives ``(url, None)``.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = [v for k, v in query if k == "schema"]
    if not schema:
        return url, None
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), schema[-1]


def redact(url: str) -> str:
    """``url`` without its password, for logs and error messages."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "password" for k, _ in query):
        query = [(k, "***" if k == "password" else v) for k, v in query]
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*")))
    return urlunsplit(parts._replace(netloc=netloc))


def describe(exc: BaseException) -> str:
    """A one-line account of a psycopg error: the server's message and its SQLSTATE."""
    if isinstance(exc, psycopg.Error):
        message = (exc.diag.message_primary or str(exc) or type(exc).__name__).strip()
        message = message.splitlines()[0] if message else type(exc).__name__
        return f"{message} (SQLSTATE {exc.sqlstate})" if exc.sqlstate else message
    return str(exc) or type(exc).__name__


def write_failed(
    subject: str,
    action: str,
    exc: BaseException,
    error: type[StateWriteError] = StateWriteError,
) -> StateWriteError:
    """The ``error`` for a failed write, saying whether the old data is intact.

    The server rolls back a statement it rejects (the error carries a SQLSTATE) and nothing
    is sent before a connection is obtained; a connection lost mid-write leaves it unknown.
    """
    if isinstance(exc, PoolTimeout) or (isinstance(exc, psycopg.Error) and exc.sqlstate):
        after = "the previous data is intact"
    else:
        after = "the connection failed mid-write: the write may or may not have been applied"
    return error(subject, f"cannot {action}: {describe(exc)}; {after}")


class Database:
    """A connection pool on one database and schema, migrated when first opened.

    ``open`` and ``close`` are counted: every user opens and closes it, the pool lives while
    one of them has it open. ``url`` is a libpq URL (``postgresql://user@host:5432/db``).
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 10.0,
        application_name: str = "agent-supervisor",
    ) -> None:
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(
                f"invalid PostgreSQL schema name {schema!r}: use 1-63 of A-Z a-z 0-9 _ , "
                "not starting with a digit"
            )
        self.url = url
        self.schema = schema
        self.min_size = min_size
        self.max_size = max_size
        #: seconds to wait for a connection (at open, and for each operation)
        self.timeout = timeout
        self.application_name = application_name
        #: migration versions the last ``open`` applied (empty when the schema was current)
        self.migrated: list[int] = []
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self._users = 0
        self._lock = anyio.Lock()
        self._queries: dict[str, sql.Composed] = {}

    def __repr__(self) -> str:
        return f"Database({redact(self.url)!r}, schema={self.schema!r})"

    def q(self, statement: str) -> sql.Composed:
        """``statement`` with ``{s}`` replaced by this database's quoted schema (cached)."""
        query = self._queries.get(statement)
        if query is None:
            query = self._queries[statement] = render(statement, self.schema)
        return query

    async def open(self) -> None:
        """Open the pool (first user only) and apply missing migrations.

        Raises ``StateError`` when the database cannot be reached within ``timeout`` or a
        migration fails, and ``SchemaTooNew`` when the schema is newer than this code.
        """
        async with self._lock:
            if self._users:
                self._users += 1
                return
            pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
                self.url,
                min_size=self.min_size,
                max_size=self.max_size,
                open=False,
                timeout=self.timeout,
                kwargs={"autocommit": True, "application_name": self.application_name},
                name=f"agent-supervisor:{self.schema}",
            )
            try:
                await pool.open(wait=True, timeout=self.timeout)
                async with pool.connection() as conn:
                    self.migrated = await apply_migrations(conn, self.schema)
            except BaseException as exc:
                with anyio.CancelScope(shield=True):
                    await pool.close()
                if isinstance(exc, psycopg.Error):
                    raise StateError(
                        _ALL, f"cannot open PostgreSQL {redact(self.url)}: {describe(exc)}"
                    ) from exc
                raise
            self._pool = pool
            self._users = 1

    async def close(self) -> None:
        """Close the pool once the last user closed it; connections in use finish first."""
        async with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0 and self._pool is not None:
                pool, self._pool = self._pool, None
                with anyio.CancelScope(shield=True):
                    await pool.close(timeout=self.timeout)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A pooled connection in autocommit mode (use ``conn.transaction()`` for more).

        Raises ``StateError`` when the database is not open, and ``PoolTimeout`` (a
        ``psycopg.OperationalError``) when no connection frees up within ``timeout``.
        """
        if self._pool is None:
            raise StateError(_ALL, f"{self!r} is not open")
        async with self._pool.connection() as conn:
            yield conn


class PostgresStore:
    """A ``StateStore`` keeping one row per agent and per document in PostgreSQL.

    Give it a ``Database`` to share one pool with the other PostgreSQL-backed parts of the
    node, or a URL to have one of its own. Commits are shielded from cancellation, like the
    file store's: a cancelled caller learns of it once the transaction is over.
    """

    def __init__(
        self, database: Database | str, *, schema: str = DEFAULT_SCHEMA, **options: Any
    ) -> None:
        self.database = (
            database
            if isinstance(database, Database)
            else Database(database, schema=schema, **options)
        )

    def __repr__(self) -> str:
        return f"PostgresStore({self.database!r})"

    @property
    def schema(self) -> str:
        return self.database.schema

    async def open(self) -> None:
        """Connect and migrate the schema. Raises ``StateError`` when that fails."""
        await self.database.open()

    async def close(self) -> None:
        """Release the pool (when no other part of the node still uses it)."""
        await self.database.close()

    async def load(self, agent: str) -> AgentState:
        """Return ``agent``'s state, or a fresh one when it has no row.

        Raises ``StateCorruptError`` when the row does not validate (it is left untouched)
        and ``StateError`` when it cannot be read or the name is unsafe.
        """
        check_agent_name(agent)
        try:
            async with self.database.connection() as conn:
                cur = await conn.execute(
                    self.database.q("SELECT doc::text FROM {s}.agents WHERE agent = %s"),
                    (agent,),
                )
                row = await cur.fetchone()
        except psycopg.Error as exc:
            raise StateError(agent, f"cannot read {self._where(agent)}: {describe(exc)}") from exc
        if row is None:
            return AgentState(agent=agent)
        return decode_state(agent, row[0].encode(), self._where(agent))

    async def commit(self, state: AgentState) -> None:
        """Replace the agent's row in one transaction.

        Raises ``StateWriteError`` when the state would not load back or the write fails
        (the previous row is then intact, unless the connection died while committing),
        ``StateCorruptError`` when the stored row does not validate (it is never
        overwritten) and ``StateError`` for an unsafe name.
        """
        raw = encode_state(state)
        with anyio.CancelScope(shield=True):
            try:
                async with self.database.connection() as conn, conn.transaction():
                    await self.commit_in(conn, state, raw)
            except psycopg.Error as exc:
                raise write_failed(state.agent, f"commit {self._where(state.agent)}", exc) from exc

    async def commit_in(
        self, conn: AsyncConnection[Any], state: AgentState, raw: bytes | None = None
    ) -> AgentState:
        """Write ``state`` inside the caller's open transaction on ``conn``; return it.

        For a commit that must go together with another write (a fenced finish of a fire
        claim). Raises ``StateWriteError`` and ``StateCorruptError`` as ``commit`` does, and
        ``psycopg.Error`` for the caller to translate (its transaction is then unusable).
        """
        return await self.update_in(conn, state.agent, lambda _stored: state, raw)

    async def update_in(
        self,
        conn: AsyncConnection[Any],
        agent: str,
        build: Callable[[AgentState], AgentState],
        raw: bytes | None = None,
    ) -> AgentState:
        """Write ``build(stored state)`` inside the caller's transaction, the row locked
        from the read to the write: a read-modify-write no other writer can interleave with.
        ``stored`` is a fresh state when the agent has no row. Returns what was written."""
        q = self.database.q
        cur = await conn.execute(
            q("SELECT doc::text FROM {s}.agents WHERE agent = %s FOR UPDATE"), (agent,)
        )
        row = await cur.fetchone()
        # A row that does not validate waits for a human: raising here rolls back.
        stored = (
            decode_state(agent, row[0].encode(), self._where(agent))
            if row is not None
            else AgentState(agent=agent)
        )
        state = build(stored)
        raw = encode_state(state) if raw is None else raw
        await conn.execute(
            q(
                "INSERT INTO {s}.agents AS a (agent, doc) VALUES (%s, %s::jsonb) "
                "ON CONFLICT (agent) DO UPDATE "
                "SET doc = EXCLUDED.doc, version = a.version + 1, updated_at = now()"
            ),
            (agent, raw.decode()),
        )
        return state

    async def set_paused(self, agent: str, paused: bool) -> AgentState:
        """Set only the ``paused`` flag, in one transaction with the row locked: a run
        committing on another node meanwhile keeps its data and this flag. Returns the
        state as written. Raises as ``commit`` does."""
        check_agent_name(agent)
        with anyio.CancelScope(shield=True):
            try:
                async with self.database.connection() as conn, conn.transaction():
                    written = await self.update_in(
                        conn, agent, lambda stored: stored.model_copy(update={"paused": paused})
                    )
            except psycopg.Error as exc:
                raise write_failed(agent, "set the pause flag", exc) from exc
        return written

    async def summaries(self) -> dict[str, tuple[float | None, float | None, bool]]:
        """Agent -> (last run finished, last success, paused), as Unix times, in one query:
        what a node needs to know of the runs other nodes made. Raises ``StateError``."""
        try:
            async with self.database.connection() as conn:
                cur = await conn.execute(
                    self.database.q(
                        "SELECT agent, "
                        "extract(epoch FROM (doc->'last_run'->>'finished_at')::timestamptz), "
                        "extract(epoch FROM (doc->>'last_success_at')::timestamptz), "
                        "coalesce((doc->>'paused')::boolean, false) FROM {s}.agents"
                    )
                )
                rows = await cur.fetchall()
        except psycopg.Error as exc:
            raise StateError(_ALL, f"cannot read {self.schema}.agents: {describe(exc)}") from exc
        return {
            agent: (
                None if run is None else float(run),
                None if ok is None else float(ok),
                bool(paused),
            )
            for agent, run, ok, paused in rows
        }

    async def agents(self) -> list[str]:
        """Names of the agents that have a row, sorted; documents are not listed.

        Raises ``StateError`` when the table cannot be read.
        """
        try:
            async with self.database.connection() as conn:
                cur = await conn.execute(self.database.q("SELECT agent FROM {s}.agents"))
                rows = await cur.fetchall()
        except psycopg.Error as exc:
            raise StateError(_ALL, f"cannot list {self.schema}.agents: {describe(exc)}") from exc
        # Sorted here, not by the database's collation, to match the other stores.
        return sorted(row[0] for row in rows)

    async def load_doc(self, name: str) -> dict[str, Any] | None:
        """Return the document ``name``, or None when it has no row.

        Raises ``StateCorruptError`` when the stored value is not a JSON object (it is left
        untouched) and ``StateError`` when it cannot be read or the name is unsafe.
        """
        check_doc_name(name)
        subject = doc_subject(name)
        try:
            async with self.database.connection() as conn:
                cur = await conn.execute(
                    self.database.q("SELECT doc::text FROM {s}.docs WHERE name = %s"), (name,)
                )
                row = await cur.fetchone()
        except psycopg.Error as exc:
            raise StateError(
                subject, f"cannot read {self._doc_where(name)}: {describe(exc)}"
            ) from exc
        return None if row is None else decode_doc(name, row[0].encode(), self._doc_where(name))

    async def commit_doc(self, name: str, doc: dict[str, Any]) -> None:
        """Replace the document's row in one statement.

        Raises ``StateWriteError`` when ``doc`` would not load back or the write fails,
        ``StateCorruptError`` when the stored value is not a JSON object (never overwritten)
        and ``StateError`` for an unsafe name.
        """
        raw = encode_doc(name, doc)
        subject = doc_subject(name)
        with anyio.CancelScope(shield=True):
            try:
                async with self.database.connection() as conn:
                    cur = await conn.execute(
                        self.database.q(
                            "INSERT INTO {s}.docs AS d (name, doc) VALUES (%s, %s::jsonb) "
                            "ON CONFLICT (name) DO UPDATE "
                            "SET doc = EXCLUDED.doc, version = d.version + 1, updated_at = now() "
                            "WHERE jsonb_typeof(d.doc) = 'object' RETURNING version"
                        ),
                        (name, raw.decode()),
                    )
                    written = await cur.fetchone()
            except psycopg.Error as exc:
                raise write_failed(subject, f"commit {self._doc_where(name)}", exc) from exc
        if written is None:
            raise StateCorruptError(
                subject,
                f"{self._doc_where(name)}: the stored value is not a JSON object; "
                "not overwritten by this commit",
            )

    def _where(self, agent: str) -> str:
        return f"postgresql {self.schema}.agents row {agent!r}"

    def _doc_where(self, name: str) -> str:
        return f"postgresql {self.schema}.docs row {name!r}"
