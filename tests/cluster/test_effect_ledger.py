"""The PostgreSQL effect ledger shared by several nodes: one start per key, orphans only
from dead nodes. The single-node contract runs in ``tests/effects`` (postgresql param)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import pytest

from supervisor.cluster.nodes import PgNodeRegistry
from supervisor.effects import EffectStatus, InvalidTransition, LedgerCorruptError, LedgerWriteError
from supervisor.effects.ledger.postgres import PostgresLedger
from supervisor.testing import FakeClock
from tests.cluster.conftest import NodeFactory
from tests.cluster.pg import arm_write_failure, execute

pytestmark = pytest.mark.integration

A = "publisher"
LedgerFactory = Callable[[str], Awaitable[PostgresLedger]]


@pytest.fixture
async def ledger_on(connect: NodeFactory) -> AsyncIterator[LedgerFactory]:
    """Opens a ledger for the named node on a pool of its own; closed after the test."""
    opened: list[PostgresLedger] = []

    async def make(node: str) -> PostgresLedger:
        ledger = PostgresLedger(await connect(), node=node, clock=FakeClock(), node_ttl_s=30)
        await ledger.open()
        opened.append(ledger)
        return ledger

    yield make
    for ledger in opened:
        await ledger.close()


async def intent(ledger: PostgresLedger, key: str, run_id: str = "r1") -> None:
    """Write the intent of ``key`` as the effects service does."""
    await ledger.write_intent(
        A, "post", key, at=ledger.clock.now(), run_id=run_id, idempotency_key=f"ik-{key}"
    )


async def test_two_nodes_never_both_start_one_effect(ledger_on: LedgerFactory) -> None:
    """Nodes a and b race 20 times each for the same key: one intent is written, every
    other attempt is refused by the ledger itself."""
    a, b = await ledger_on("a"), await ledger_on("b")
    started: list[str] = []
    refused = 0

    async def attempt(ledger: PostgresLedger, i: int) -> None:
        nonlocal refused
        try:
            await intent(ledger, "k1", run_id=f"{ledger.node}-{i}")
        except InvalidTransition:
            refused += 1
        else:
            started.append(ledger.node)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(attempt, a, i)
                tg.start_soon(attempt, b, i)
    assert len(started) == 1 and refused == 39
    record = await b.get(A, "post", "k1")
    assert record is not None and (record.status, record.attempts) == (EffectStatus.INTENT, 1)


async def test_intents_of_live_nodes_are_left_alone_and_of_dead_ones_reaped(
    ledger_on: LedgerFactory, connect: NodeFactory, schema: str
) -> None:
    """Node b starting does not touch node a's intent while a heartbeats; once a stops,
    b's reaper turns it unknown, and a coming back cannot record a result over it."""
    registry = PgNodeRegistry(await connect(), "a", config_hash="h", version="1")
    await registry.register()
    a = await ledger_on("a")
    await intent(a, "k1")

    b = await ledger_on("b")
    assert b.report.unknown_marked == 0
    assert await b.reap_orphans() == 0
    record = await b.get(A, "post", "k1")
    assert record is not None and record.status is EffectStatus.INTENT

    execute(schema, "UPDATE {s}.nodes SET last_seen = now() - interval '1 minute'")
    assert await b.reap_orphans() == 1
    record = await b.get(A, "post", "k1")
    assert record is not None and record.status is EffectStatus.UNKNOWN
    assert "node 'a' stopped heartbeating" in (record.error or "")
    with pytest.raises(InvalidTransition):
        await a.write_result(A, "post", "k1", at=a.clock.now(), result=1, note=None)
    assert await b.reap_orphans() == 0


async def test_a_corrupt_row_blocks_only_its_key(ledger_on: LedgerFactory, schema: str) -> None:
    """A row that does not parse raises ``LedgerCorruptError`` for its key and is never
    overwritten; other keys of the agent work."""
    ledger = await ledger_on("a")
    await intent(ledger, "k1")
    execute(schema, "UPDATE {s}.effects SET doc = %s::jsonb", ('{"v": 1, "zzz": 1}',))
    with pytest.raises(LedgerCorruptError, match="unknown fields"):
        await ledger.get(A, "post", "k1")
    with pytest.raises(LedgerCorruptError):
        await ledger.write_result(A, "post", "k1", at=ledger.clock.now(), result=1, note=None)
    await intent(ledger, "k2")
    assert execute(schema, "SELECT doc->>'zzz' FROM {s}.effects WHERE key = 'k1'") == [("1",)]


async def test_a_failed_write_leaves_the_ledger_unchanged(
    ledger_on: LedgerFactory, schema: str
) -> None:
    """A write the database rejects (disk full) raises ``LedgerWriteError``; nothing is
    stored and the key can start afterwards."""
    ledger = await ledger_on("a")
    arm_write_failure(schema, ("effects",))
    with pytest.raises(LedgerWriteError, match="previous data is intact"):
        await intent(ledger, "k1")
    assert await ledger.get(A, "post", "k1") is None
    await intent(ledger, "k1")
    record = await ledger.get(A, "post", "k1")
    assert record is not None and record.attempts == 1
