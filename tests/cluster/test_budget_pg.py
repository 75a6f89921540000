"""Cluster-wide budgets: three nodes (three pools) reserving against shared windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest

from supervisor.errors import BudgetExceeded, StateWriteError
from supervisor.llm.budget import WindowKind
from supervisor.llm.budget_pg import PgBudgetLedger, window_key
from supervisor.llm.config import BudgetsConfig, LimitConfig
from supervisor.testing import FakeClock
from tests.cluster.conftest import NodeFactory
from tests.cluster.pg import arm_write_failure, execute

pytestmark = pytest.mark.integration

START = datetime(2026, 3, 1, 10, 30, tzinfo=UTC)
DAY_KEY = window_key(WindowKind.GLOBAL_DAY, "global", "2026-03-01")


async def ledgers(connect: NodeFactory, n: int, **limits: LimitConfig) -> list[PgBudgetLedger]:
    """``n`` loaded ledgers, each on a pool of its own (a node), sharing one clock."""
    clock = FakeClock(START)
    made = [PgBudgetLedger(await connect(), clock, BudgetsConfig(**limits)) for _ in range(n)]
    for ledger in made:
        await ledger.load()
    return made


def stored(schema: str, key: str) -> tuple[int, int, int, int]:
    """(spent, reserved, spent_tokens, reserved_tokens) of a window row, in nano-dollars."""
    ((spent, reserved, spent_tokens, reserved_tokens),) = execute(
        schema,
        "SELECT spent, reserved, spent_tokens, reserved_tokens FROM {s}.budget_windows "
        "WHERE key = %s",
        (key,),
    )
    return spent, reserved, spent_tokens, reserved_tokens


async def test_200_reservations_from_3_nodes_never_pass_the_limit(
    connect: NodeFactory, schema: str
) -> None:
    """200 concurrent $0.01 reservations spread over 3 nodes against a $1.00 day: exactly
    100 are granted, the rest refused naming the day window, and the row holds $1.00."""
    nodes = await ledgers(connect, 3, global_day=LimitConfig(usd=1.0))
    granted: list[int] = []
    refused: list[BudgetExceeded] = []

    async def one(i: int) -> None:
        try:
            await nodes[i % 3].reserve(f"agent-{i % 7}", f"run-{i}", 0.01, 10)
        except BudgetExceeded as exc:
            refused.append(exc)
        else:
            granted.append(i)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
    assert len(granted) == 100 and len(refused) == 100
    assert all("global_day budget" in str(exc) for exc in refused)
    assert {i % 3 for i in granted} == {0, 1, 2}
    assert stored(schema, DAY_KEY) == (0, 1_000_000_000, 0, 1000)
    assert sum(n.outstanding for n in nodes) == 100


async def test_settling_lower_frees_room_for_other_nodes(connect: NodeFactory, schema: str) -> None:
    """A worst case settled at its real cost gives the rest back to every node."""
    a, b, c = await ledgers(connect, 3, global_day=LimitConfig(usd=1.0))
    held_a = await a.reserve("x", "r1", 0.5, 100)
    await b.reserve("y", "r2", 0.5, 100)
    with pytest.raises(BudgetExceeded, match="global_day"):
        await c.reserve("z", "r3", 0.4, 100)
    await a.settle(held_a, 0.1, 40)
    await a.settle(held_a, 0.9, 40)  # settled once only
    await c.reserve("z", "r3", 0.4, 100)
    assert stored(schema, DAY_KEY) == (100_000_000, 900_000_000, 40, 200)


async def test_the_most_specific_window_is_named(connect: NodeFactory) -> None:
    """An agent's day is shared by nodes: its limit refuses first and is the one named."""
    a, b = await ledgers(
        connect,
        2,
        per_agent_day=LimitConfig(usd=0.05),
        global_day=LimitConfig(usd=0.05, tokens=1000),
    )
    for i in range(5):
        await (a if i % 2 else b).reserve("alpha", f"r{i}", 0.01, 10)
    with pytest.raises(BudgetExceeded, match="agent_day budget \\(alpha") as info:
        await a.reserve("alpha", "r9", 0.01, 10)
    assert (info.value.limit, info.value.observed) == (0.05, pytest.approx(0.06))


async def test_token_limits_hold_across_nodes(connect: NodeFactory) -> None:
    """Token limits refuse like USD limits, across nodes."""
    a, b = await ledgers(connect, 2, global_hour=LimitConfig(tokens=100))
    await a.reserve("beta", "r1", 0.0, 60)
    with pytest.raises(BudgetExceeded, match="token limit"):
        await b.reserve("gamma", "r2", 0.0, 41)
    await b.reserve("gamma", "r2", 0.0, 40)


async def test_the_run_window_is_kept_in_memory(connect: NodeFactory) -> None:
    """A run's limit counts only that run's calls; another run starts afresh."""
    (ledger,) = await ledgers(connect, 1, per_run=LimitConfig(usd=0.03))
    for _ in range(3):
        await ledger.reserve("alpha", "run-1", 0.01, 1)
    with pytest.raises(BudgetExceeded, match="run budget"):
        await ledger.reserve("alpha", "run-1", 0.01, 1)
    await ledger.reserve("alpha", "run-2", 0.01, 1)
    ledger.end_run("run-1")
    assert [w.key for w in ledger.snapshot() if w.name == "run"] == ["run-2"]


async def test_snapshot_shows_what_other_nodes_spent_after_refresh(connect: NodeFactory) -> None:
    """``refresh`` reads the shared windows: a node reports the cluster's spend."""
    a, b = await ledgers(connect, 2, global_day=LimitConfig(usd=10.0))
    held = await a.reserve("alpha", "r1", 0.5, 80)
    await a.settle(held, 0.125, 80)
    await b.refresh()
    day = [w for w in b.snapshot() if w.name == "global_day"]
    assert (day[0].spent_usd, day[0].reserved_usd, day[0].limit_usd) == (0.125, 0.0, 10.0)
    agent = [w for w in b.snapshot() if w.name == "agent_day"]
    assert (agent[0].key, agent[0].spent_tokens) == ("alpha", 80)


async def test_a_dead_nodes_reservation_stays_counted(connect: NodeFactory, schema: str) -> None:
    """A node that dies holding a reservation leaves it counted (it may have been billed)."""
    (dying,) = await ledgers(connect, 1, global_day=LimitConfig(usd=1.0))
    await dying.reserve("alpha", "r1", 0.75, 10)
    (survivor,) = await ledgers(connect, 1, global_day=LimitConfig(usd=1.0))
    with pytest.raises(BudgetExceeded):
        await survivor.reserve("beta", "r2", 0.3, 10)
    await survivor.reserve("beta", "r2", 0.25, 10)


async def test_a_failed_write_holds_nothing(connect: NodeFactory, schema: str) -> None:
    """A reservation the database rejects raises ``StateWriteError`` and holds nothing,
    in the shared rows or in the run window."""
    (ledger,) = await ledgers(connect, 1, global_day=LimitConfig(usd=1.0))
    await ledger.reserve("alpha", "r1", 0.5, 10)
    arm_write_failure(schema, ("budget_windows",))
    with pytest.raises(StateWriteError, match="previous data is intact"):
        await ledger.reserve("alpha", "r1", 0.25, 10)
    assert stored(schema, DAY_KEY)[1] == 500_000_000
    assert [w.reserved_usd for w in ledger.snapshot() if w.name == "run"] == [0.5]
    assert ledger.outstanding == 1


async def test_a_cancelled_reserver_holds_nothing(connect: NodeFactory, schema: str) -> None:
    """A caller cancelled while reserving gets no reservation and leaves none behind."""
    (ledger,) = await ledgers(connect, 1, global_day=LimitConfig(usd=1.0))
    with anyio.CancelScope() as scope:
        scope.cancel()
        await ledger.reserve("alpha", "r1", 0.5, 10)
    assert ledger.outstanding == 0
    assert stored(schema, DAY_KEY)[1] == 0


async def test_old_periods_are_pruned(connect: NodeFactory, schema: str) -> None:
    """Windows of days long past are deleted; today's stay."""
    clock = FakeClock(START - timedelta(days=5))
    old = PgBudgetLedger(await connect(), clock, BudgetsConfig())
    await old.reserve("alpha", "r1", 0.01, 1)
    clock.advance(timedelta(days=5))
    await old.reserve("alpha", "r2", 0.01, 1)
    assert await old.prune(keep_days=2) == 3
    assert len(execute(schema, "SELECT key FROM {s}.budget_windows")) == 3
