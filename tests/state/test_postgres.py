"""``PostgresStore`` on the real server: migrations, corrupt rows, faults, the budget ledger.

The shared behaviour is in ``test_contract.py``; here is what only PostgreSQL has. Each test
uses a schema of its own (``tests/cluster/pg.py``), dropped afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import anyio
import pytest

from supervisor.errors import BudgetExceeded, StateCorruptError, StateError, StateWriteError
from supervisor.llm.budget import DOC_NAME, BudgetLedger
from supervisor.llm.config import BudgetsConfig, LimitConfig
from supervisor.state import AgentState
from supervisor.state.migrations import LATEST_VERSION, SchemaTooNew
from supervisor.state.postgres import Database, PostgresStore, redact, split_schema
from supervisor.testing import FakeClock
from tests.cluster.pg import drop_schema, execute, new_schema, require_postgres

pytestmark = pytest.mark.integration


@pytest.fixture
def schema() -> Iterator[str]:
    """A fresh schema name on the test server, dropped after the test."""
    require_postgres()
    name = new_schema()
    yield name
    drop_schema(name)


@pytest.fixture
async def store(schema: str) -> AsyncIterator[PostgresStore]:
    """An opened store on the fresh schema."""
    opened = PostgresStore(require_postgres(), schema=schema)
    await opened.open()
    yield opened
    await opened.close()


def rows(schema: str, statement: str, *params: object) -> list[tuple[object, ...]]:
    """What ``statement`` returns, read outside the store."""
    return execute(schema, statement, params or None)


# Migrations.


async def test_five_nodes_starting_at_once_migrate_exactly_once(schema: str) -> None:
    """Five concurrent ``open()`` calls on a fresh schema all succeed; one applies every
    migration, the others find nothing to do, and each version is recorded once."""
    databases = [Database(require_postgres(), schema=schema) for _ in range(5)]
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for db in databases:
                tg.start_soon(db.open)
    try:
        applied = sorted(v for db in databases for v in db.migrated)
        assert applied == list(range(1, LATEST_VERSION + 1))
        assert sum(1 for db in databases if db.migrated) == 1
        assert rows(schema, "SELECT version FROM {s}.schema_migrations ORDER BY 1") == [
            (v,) for v in range(1, LATEST_VERSION + 1)
        ]
    finally:
        for db in databases:
            await db.close()


async def test_reopening_a_current_schema_changes_nothing(store: PostgresStore) -> None:
    """A second start on a migrated schema applies nothing and keeps the data."""
    await store.commit(AgentState(agent="alpha", data={"kept": True}))
    again = PostgresStore(require_postgres(), schema=store.schema)
    await again.open()
    try:
        assert again.database.migrated == []
        assert (await again.load("alpha")).data == {"kept": True}
    finally:
        await again.close()


async def test_a_schema_newer_than_the_code_is_refused(store: PostgresStore) -> None:
    """A node older than the schema refuses to start rather than guess at its tables."""
    execute(
        store.schema,
        "INSERT INTO {s}.schema_migrations (version, name) VALUES (%s, 'from the future')",
        (LATEST_VERSION + 1,),
    )
    newer = PostgresStore(require_postgres(), schema=store.schema)
    with pytest.raises(SchemaTooNew, match=f"version {LATEST_VERSION + 1}, newer"):
        await newer.open()


async def test_unreachable_server_raises_state_error_without_the_password() -> None:
    """A server that does not answer is a ``StateError`` at ``open()``; the URL in the
    message has its password masked."""
    store = PostgresStore("postgresql://u:secret@127.0.0.1:1/x", timeout=1.0)
    with anyio.fail_after(30), pytest.raises(StateError, match="cannot open PostgreSQL") as info:
        await store.open()
    assert "secret" not in str(info.value) and "***" in str(info.value)


def test_url_helpers() -> None:
    """``split_schema`` takes ``schema=`` off the URL; ``redact`` masks the password."""
    assert split_schema("postgresql://h/db?schema=a&application_name=x") == (
        "postgresql://h/db?application_name=x",
        "a",
    )
    assert split_schema("postgresql://h/db") == ("postgresql://h/db", None)
    assert redact("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    with pytest.raises(ValueError, match="invalid PostgreSQL schema name"):
        Database("postgresql://h/db", schema='x"; DROP TABLE y; --')


async def test_a_closed_store_raises_state_error(schema: str) -> None:
    """Using a store that is not open is a ``StateError``, not a crash."""
    store = PostgresStore(require_postgres(), schema=schema)
    with pytest.raises(StateError, match="not open"):
        await store.load("alpha")


async def test_a_shared_database_stays_open_until_its_last_user_closes(schema: str) -> None:
    """Two parts of a node on one ``Database``: the pool closes with the last of them."""
    db = Database(require_postgres(), schema=schema)
    first, second = PostgresStore(db), PostgresStore(db)
    await first.open()
    await second.open()
    await first.close()
    await second.commit(AgentState(agent="alpha"))
    await second.close()
    with pytest.raises(StateError, match="not open"):
        await second.agents()


# Rows.


async def test_rows_are_queryable_jsonb_with_a_commit_counter(store: PostgresStore) -> None:
    """One row per agent: ``doc`` is jsonb an operator can query, ``version`` counts commits,
    ``updated_at`` is database time."""
    await store.commit(AgentState(agent="alpha", paused=True))
    await store.commit(AgentState(agent="alpha", paused=False, data={"n": 2}))
    ((paused, n, version, fresh),) = rows(
        store.schema,
        "SELECT doc->'paused', doc->'data'->'n', version, now() - updated_at < interval '1 min' "
        "FROM {s}.agents",
    )
    assert (paused, n, version, fresh) == (False, 2, 2, True)


async def test_a_corrupt_row_is_never_overwritten(store: PostgresStore) -> None:
    """A commit over a row that does not validate raises ``StateCorruptError`` and leaves
    the row exactly as it was, for a human."""
    await store.commit(AgentState(agent="alpha"))
    bad = '{"agent": "alpha", "version": 1, "totals": {"runs": "many"}}'
    execute(store.schema, "UPDATE {s}.agents SET doc = %s::jsonb", (bad,))
    with pytest.raises(StateCorruptError, match="does not match the state schema"):
        await store.load("alpha")
    with pytest.raises(StateCorruptError, match=r"totals\.runs"):
        await store.commit(AgentState(agent="alpha", data={"new": 1}))
    assert rows(store.schema, "SELECT doc = %s::jsonb, version FROM {s}.agents", bad) == [(True, 1)]


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        pytest.param(
            '{"agent": "beta", "version": 1}', "holds the state of agent 'beta'", id="other-agent"
        ),
        pytest.param('{"agent": "alpha", "version": 2}', "newer than this supervisor", id="newer"),
        pytest.param('"just a string"', "does not match the state schema", id="string"),
    ],
)
async def test_rows_that_do_not_validate_raise_corrupt(
    store: PostgresStore, stored: str, message: str
) -> None:
    """Whatever JSON a row holds, it must be this agent's state in a format we read."""
    execute(
        store.schema, "INSERT INTO {s}.agents (agent, doc) VALUES ('alpha', %s::jsonb)", (stored,)
    )
    with pytest.raises(StateCorruptError, match=message):
        await store.load("alpha")


async def test_a_corrupt_document_is_never_overwritten(store: PostgresStore) -> None:
    """A document row that is not a JSON object raises on load and refuses a commit."""
    await store.commit_doc("budget", {"v": 1})
    execute(store.schema, "UPDATE {s}.docs SET doc = '[1, 2]'::jsonb")
    with pytest.raises(StateCorruptError, match="not a JSON object"):
        await store.commit_doc("budget", {"v": 2})
    assert rows(store.schema, "SELECT doc::text, version FROM {s}.docs") == [("[1, 2]", 1)]


async def test_nul_character_is_refused_and_the_old_row_kept(store: PostgresStore) -> None:
    """jsonb cannot hold U+0000: such a commit is a ``StateWriteError``; nothing changes."""
    await store.commit(AgentState(agent="alpha", data={"ok": 1}))
    with pytest.raises(StateWriteError, match="previous data is intact"):
        await store.commit(AgentState(agent="alpha", data={"bad": "a\x00b"}))
    assert (await store.load("alpha")).data == {"ok": 1}


async def test_numbers_come_back_equal(store: PostgresStore) -> None:
    """jsonb keeps numbers as decimals: big, tiny and exponent-form floats load back equal."""
    data = {"f": [1e16, 1e300, 5e-324, 0.1, -0.125, 1.0], "i": [2**63 - 1, -(2**63)]}
    await store.commit(AgentState(agent="alpha", data=data))
    assert (await store.load("alpha")).data == data


async def test_a_cancelled_commit_still_completes(store: PostgresStore) -> None:
    """A commit is shielded: cancelling the caller does not cut the transaction short."""
    with anyio.CancelScope() as scope:
        scope.cancel()
        await store.commit(AgentState(agent="alpha", data={"done": True}))
    assert (await store.load("alpha")).data == {"done": True}


# The budget ledger keeps its windows in the "budget" document, unchanged.


async def test_budget_ledger_runs_unchanged_on_postgres(store: PostgresStore) -> None:
    """200 concurrent reservers against a $1 day: exactly 100 fit, the document is in the
    docs table, and a restarted ledger restores the day's spend."""
    clock = FakeClock(datetime(2026, 3, 1, 10, 30, tzinfo=UTC))
    config = BudgetsConfig(global_day=LimitConfig(usd=1.0))
    ledger = BudgetLedger(store, clock, config)
    await ledger.load()
    granted = 0

    async def one(i: int) -> None:
        nonlocal granted
        try:
            await ledger.reserve(f"agent-{i % 5}", f"run-{i}", 0.01, 10)
        except BudgetExceeded:
            return
        granted += 1

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
    assert granted == 100
    assert ledger.writes < 200  # group commits
    assert await store.agents() == []
    ((usd,),) = rows(
        store.schema, "SELECT doc->'global_day'->'usd' FROM {s}.docs WHERE name = %s", DOC_NAME
    )
    assert usd == pytest.approx(1.0)

    clock.advance(timedelta(minutes=5))
    restarted = BudgetLedger(store, clock, config)
    await restarted.load()
    day = [w for w in restarted.snapshot() if w.name == "global_day"]
    assert day[0].spent_usd == pytest.approx(1.0)
