"""Fixtures for the cluster tests: a throwaway schema and "nodes" (one pool each)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from supervisor.state.postgres import Database
from tests.cluster.pg import drop_schema, new_schema, require_postgres

NodeFactory = Callable[[], Awaitable[Database]]


@pytest.fixture
def schema() -> Iterator[str]:
    """A fresh schema on the test server, dropped after the test."""
    require_postgres()
    name = new_schema()
    yield name
    drop_schema(name)


@pytest.fixture
async def connect(schema: str) -> AsyncIterator[NodeFactory]:
    """Opens a ``Database`` with a pool of its own, as a separate node would; all are
    closed after the test."""
    opened: list[Database] = []

    async def node() -> Database:
        db = Database(require_postgres(), schema=schema, max_size=8)
        await db.open()
        opened.append(db)
        return db

    yield node
    for db in opened:
        await db.close()
