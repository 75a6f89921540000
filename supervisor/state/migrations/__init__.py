"""Versioned PostgreSQL migrations, applied at start under an advisory lock.

``apply_migrations`` runs in one transaction that first takes a transaction-level advisory
lock keyed by the schema name, so when several nodes start at once they take turns: the
first creates the schema and applies what is missing, the others then find nothing to do.
DDL is transactional in PostgreSQL, so a failed migration leaves the schema as it was.
Applied versions are recorded in ``<schema>.schema_migrations``.
"""

from __future__ import annotations

import zlib
from typing import Any

from psycopg import AsyncConnection, sql

from supervisor.errors import StateError
from supervisor.state.migrations.versions import MIGRATIONS, Migration

__all__ = ["LATEST_VERSION", "MIGRATIONS", "Migration", "SchemaTooNew", "apply_migrations"]

LATEST_VERSION = MIGRATIONS[-1].version
#: first key of the two-key advisory lock: "ASUP", so other users of advisory locks on the
#: same database are unlikely to collide with it
_LOCK_CLASS = 0x41535550


class SchemaTooNew(StateError):
    """The schema was migrated by a newer supervisor than this one."""


def lock_key(schema: str) -> int:
    """The second advisory lock key for ``schema`` (a signed 32-bit int, stable forever)."""
    key = zlib.crc32(schema.encode())
    return key - 2**32 if key >= 2**31 else key


def render(statement: str, schema: str) -> sql.Composed:
    """``statement`` with ``{s}`` replaced by the quoted schema name."""
    return sql.SQL(statement).format(s=sql.Identifier(schema))


async def apply_migrations(conn: AsyncConnection[Any], schema: str) -> list[int]:
    """Bring ``schema`` up to ``LATEST_VERSION``; return the versions applied by this call.

    ``conn`` must be in autocommit mode (the migration is its own transaction). Raises
    ``SchemaTooNew`` when the schema holds a version this supervisor does not know, and
    ``psycopg.Error`` when a statement fails (nothing is then changed).
    """
    applied_now: list[int] = []
    async with conn.transaction():
        # Held until this transaction ends: concurrent starters queue here.
        await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, lock_key(schema)))
        cur = await conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        if await cur.fetchone() is None:
            # Checked first: CREATE SCHEMA needs a privilege an operator-made schema does not.
            await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        await conn.execute(
            render(
                """
                CREATE TABLE IF NOT EXISTS {s}.schema_migrations (
                    version integer PRIMARY KEY,
                    name text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
                """,
                schema,
            )
        )
        cur = await conn.execute(render("SELECT version FROM {s}.schema_migrations", schema))
        done = {row[0] for row in await cur.fetchall()}
        newest = max(done, default=0)
        if newest > LATEST_VERSION:
            raise SchemaTooNew(
                "*",
                f"PostgreSQL schema {schema!r} is at version {newest}, newer than this "
                f"supervisor knows ({LATEST_VERSION}): upgrade this node",
            )
        for migration in MIGRATIONS:
            if migration.version in done:
                continue
            for statement in migration.statements:
                await conn.execute(render(statement, schema))
            await conn.execute(
                render("INSERT INTO {s}.schema_migrations (version, name) VALUES (%s, %s)", schema),
                (migration.version, migration.name),
            )
            applied_now.append(migration.version)
    return applied_now
