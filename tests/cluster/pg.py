"""The real PostgreSQL for tests: where it is, a throwaway schema per test, skip or fail.

Every test that needs the database calls ``require_postgres()`` (or uses a fixture built on
it). When the server is unreachable the test is skipped with the reason, except under
``CI=true``, where it fails: CI must not pass by skipping the scale-out tests. The server is
``AGENT_SUPERVISOR_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/test``).
Each test works in a schema of its own (``t_<hex>``), dropped afterwards.
"""

from __future__ import annotations

import functools
import os
import uuid
from typing import Any

import pytest

PG_URL = os.environ.get("AGENT_SUPERVISOR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@functools.cache
def _unreachable() -> str | None:
    """Why PostgreSQL cannot be used, or None when it can (checked once per session)."""
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg is not installed ({exc})"
    try:
        psycopg.connect(PG_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def require_postgres() -> str:
    """The test database URL; skips the test (fails it under ``CI=true``) when unreachable."""
    why = _unreachable()
    if why is not None:
        message = (
            f"PostgreSQL at {PG_URL} is not usable: {why} "
            "(start it, or point AGENT_SUPERVISOR_TEST_PG at one)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI=true requires PostgreSQL", pytrace=False)
        pytest.skip(message)
    return PG_URL


def new_schema() -> str:
    """A fresh schema name, unique to this test."""
    return f"t_{uuid.uuid4().hex[:16]}"


def execute(schema: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run ``statement`` (``{s}`` = the quoted schema) on a connection of its own, outside
    the code under test; return the rows it produced."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        cur = conn.execute(sql.SQL(statement).format(s=sql.Identifier(schema)), params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def drop_schema(schema: str) -> None:
    """Remove ``schema`` and everything in it (after a test)."""
    execute(schema, "DROP SCHEMA IF EXISTS {s} CASCADE")


def arm_write_failure(schema: str, tables: tuple[str, ...]) -> None:
    """Make the next row written to any of ``tables`` fail as a full disk would.

    A trigger raises ``disk_full`` when a sequence first hands out 1; sequences are not
    transactional, so the failed write's rollback does not re-arm it and later writes pass.
    """
    execute(schema, "CREATE SEQUENCE IF NOT EXISTS {s}.test_fail_seq")
    execute(schema, "SELECT setval(%s::regclass, 1, false)", (f"{schema}.test_fail_seq",))
    execute(
        schema,
        """
        CREATE OR REPLACE FUNCTION {s}.test_fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval((TG_TABLE_SCHEMA || '.test_fail_seq')::regclass) = 1 THEN
                RAISE EXCEPTION 'could not extend file: No space left on device'
                    USING ERRCODE = 'disk_full';
            END IF;
            RETURN NEW;
        END $$
        """,
    )
    for table in tables:
        execute(schema, f"DROP TRIGGER IF EXISTS test_fail_once ON {{s}}.{table}")
        execute(
            schema,
            f"CREATE TRIGGER test_fail_once BEFORE INSERT OR UPDATE ON {{s}}.{table} "
            "FOR EACH ROW EXECUTE FUNCTION {s}.test_fail_once()",
        )
