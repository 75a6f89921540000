"""Budget ledger: refusal before any window is passed, concurrency, settlement, persistence.

The tests of the ledger's contract take ``ledgers`` and run on both ledgers with the same body:
``store`` (``BudgetLedger``, windows as a document of a store) and ``postgresql``
(``PgBudgetLedger``, windows as rows, in a fresh schema per case). Tests of how the document
ledger writes its document (group commits, the document's format, a corrupt document, failed
or blocked ``commit_doc``, a ``JsonFileStore``) take ``store`` and run on it only; their
PostgreSQL counterparts are in ``tests/cluster/test_budget_pg.py``.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson
import pytest

from supervisor.errors import BudgetExceeded, StateCorruptError, StateWriteError
from supervisor.llm.budget import DOC_NAME, BudgetLedger, Reservation, WindowStatus
from supervisor.llm.config import BudgetsConfig, LimitConfig
from supervisor.state import JsonFileStore, MemoryStore
from supervisor.testing import FakeClock
from tests.llm.budget_ledgers import CountingStore, Ledgers, counted

if TYPE_CHECKING:
    from tests.llm.budget_ledgers import Ledger

START = datetime(2026, 3, 1, 10, 30, tzinfo=UTC)


class BlockingStore(MemoryStore):
    """A ``MemoryStore`` whose document commits wait until ``unblock`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.unblock = anyio.Event()
        self.entered = anyio.Event()

    async def commit_doc(self, name: str, doc: dict[str, Any]) -> None:
        self.entered.set()
        await self.unblock.wait()
        await super().commit_doc(name, doc)


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock at 10:30 UTC."""
    return FakeClock(START)


@pytest.fixture
def store() -> CountingStore:
    """An in-memory store counting document commits."""
    return CountingStore()


def limits(**windows: LimitConfig) -> BudgetsConfig:
    """Budgets with the given windows limited and the rest unlimited."""
    return BudgetsConfig(**windows)


async def ledger_on(
    store: MemoryStore | JsonFileStore, clock: Any, **windows: LimitConfig
) -> BudgetLedger:
    """A loaded ledger with the given limits."""
    ledger = BudgetLedger(store, clock, limits(**windows))
    await ledger.load()
    return ledger


def window(ledger: Ledger, name: str, key: str = "global") -> WindowStatus:
    """The status of one window."""
    found = [w for w in ledger.snapshot() if w.name == name and w.key == key]
    assert len(found) == 1, ledger.snapshot()
    return found[0]


def stored(store: MemoryStore) -> dict[str, Any]:
    """The budget document as the store holds it."""
    doc = store.raw_doc(DOC_NAME)
    assert doc is not None
    loaded: dict[str, Any] = orjson.loads(doc)
    return loaded


# Refusal, window by window.

USD_1 = LimitConfig(usd=1.0)

# (window under test, limits, how the two calls differ so that only that window is shared)
WINDOW_CASES = [
    pytest.param("run", {"per_run": USD_1}, ("a", "r1"), ("a", "r1"), id="run"),
    pytest.param("agent_day", {"per_agent_day": USD_1}, ("a", "r1"), ("a", "r2"), id="agent_day"),
    pytest.param("global_hour", {"global_hour": USD_1}, ("a", "r1"), ("b", "r2"), id="global_hour"),
    pytest.param("global_day", {"global_day": USD_1}, ("a", "r1"), ("b", "r2"), id="global_day"),
]


@pytest.mark.parametrize(("name", "windows", "first", "second"), WINDOW_CASES)
async def test_call_that_would_pass_a_window_is_refused_before_it(
    ledgers: Ledgers,
    clock: FakeClock,
    name: str,
    windows: dict[str, LimitConfig],
    first: tuple[str, str],
    second: tuple[str, str],
) -> None:
    """The second $0.60 call against a $1 window is refused, naming the window; nothing is held."""
    ledger = await ledgers.open(clock, **windows)
    await ledger.reserve(*first, 0.6, 100)
    with pytest.raises(BudgetExceeded, match=f"{name} budget") as caught:
        await ledger.reserve(*second, 0.6, 100)
    assert caught.value.limit == 1.0
    assert caught.value.observed == pytest.approx(1.2)
    assert window(ledger, "global_day").reserved_usd == pytest.approx(0.6)
    assert ledger.outstanding == 1


@pytest.mark.parametrize(("name", "windows", "first", "second"), WINDOW_CASES)
async def test_token_limits_refuse_like_usd_limits(
    ledgers: Ledgers,
    clock: FakeClock,
    name: str,
    windows: dict[str, LimitConfig],
    first: tuple[str, str],
    second: tuple[str, str],
) -> None:
    """A token limit refuses the call whose worst-case tokens would not fit."""
    token_windows = {k: LimitConfig(tokens=1000) for k in windows}
    ledger = await ledgers.open(clock, **token_windows)
    await ledger.reserve(*first, 0.0, 600)
    with pytest.raises(BudgetExceeded, match=f"{name} budget.*token limit") as caught:
        await ledger.reserve(*second, 0.0, 600)
    assert (caught.value.limit, caught.value.observed) == (1000, 1200)


async def test_most_specific_window_is_named_first(ledgers: Ledgers, clock: FakeClock) -> None:
    """When several windows would be passed, the refusal names the run window."""
    ledger = await ledgers.open(clock, per_run=USD_1, global_day=USD_1)
    with pytest.raises(BudgetExceeded, match=r"^run budget"):
        await ledger.reserve("a", "r1", 2.0, 0)


async def test_exact_fit_is_allowed(ledgers: Ledgers, clock: FakeClock) -> None:
    """Ten $0.10 calls fill a $1.00 window exactly (no float drift); the eleventh is refused."""
    ledger = await ledgers.open(clock, global_day=USD_1, global_hour=LimitConfig(tokens=1000))
    for _ in range(10):
        await ledger.reserve("a", "r1", 0.1, 100)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve("a", "r1", 0.000_001, 0)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve("a", "r1", 0.0, 1)
    assert window(ledger, "global_day").reserved_usd == 1.0


async def test_free_call_fits_a_zero_usd_limit(ledgers: Ledgers, clock: FakeClock) -> None:
    """A call priced at $0 (an allowed unpriced model) fits even a $0 limit; tokens still count."""
    ledger = await ledgers.open(clock, global_day=LimitConfig(usd=0.0, tokens=10))
    await ledger.reserve("a", "r1", 0.0, 10)
    with pytest.raises(BudgetExceeded, match="token limit"):
        await ledger.reserve("a", "r1", 0.0, 1)


async def test_agent_limits_replace_the_global_per_run_and_per_agent_day(
    ledgers: Ledgers, clock: FakeClock
) -> None:
    """Per-agent overrides replace the configured per_run/per_agent_day limits, looser or tighter."""
    ledger = await ledgers.open(clock, per_run=USD_1, per_agent_day=USD_1)
    loose = LimitConfig(usd=5.0)
    for _ in range(3):
        await ledger.reserve("big", "r1", 1.0, 0, run_limit=loose, agent_day_limit=loose)
    with pytest.raises(BudgetExceeded, match=r"^run budget") as caught:
        await ledger.reserve("small", "r2", 0.6, 0, run_limit=LimitConfig(usd=0.5))
    assert caught.value.limit == 0.5
    assert window(ledger, "run", "r1").limit_usd == 5.0
    assert window(ledger, "agent_day", "big").limit_usd == 5.0


async def test_invalid_amounts_are_rejected(ledgers: Ledgers, clock: FakeClock) -> None:
    """Negative, NaN or infinite amounts are a ValueError, in reserve and settle alike."""
    ledger = await ledgers.open(clock)
    for usd, tokens in [(-0.1, 0), (math.nan, 0), (math.inf, 0), (0.1, -1)]:
        with pytest.raises(ValueError):
            await ledger.reserve("a", "r1", usd, tokens)
    reservation = await ledger.reserve("a", "r1", 0.1, 1)
    with pytest.raises(ValueError):
        await ledger.settle(reservation, math.nan, 0)
    assert ledger.outstanding == 1


# Concurrency.


async def test_200_concurrent_reservers_never_overshoot(ledgers: Ledgers, clock: FakeClock) -> None:
    """200 concurrent $0.07 reservations from 8 agents against $5: exactly floor(5/0.07) granted
    (and, for the document ledger, a handful of group commits instead of one write per caller)."""
    ledger = await ledgers.open(clock, global_day=LimitConfig(usd=5.0))
    granted: list[Reservation] = []
    refused: list[BudgetExceeded] = []

    async def one(i: int) -> None:
        try:
            granted.append(await ledger.reserve(f"agent-{i % 8}", f"run-{i}", 0.07, 500))
        except BudgetExceeded as exc:
            refused.append(exc)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
    assert len(granted) == math.floor(5.0 / 0.07) == 71
    assert len(refused) == 129
    assert all(exc.observed > 5.0 for exc in refused)
    await ledgers.refresh(ledger)  # concurrent reservers may have read the rows out of order
    day = window(ledger, "global_day")
    assert day.reserved_usd == pytest.approx(71 * 0.07)
    assert day.reserved_usd <= 5.0
    assert sum(w.reserved_usd for w in ledger.snapshot() if w.name == "agent_day") == pytest.approx(
        day.reserved_usd
    )
    if ledgers.store is not None:  # group commit is the document ledger's own
        assert ledgers.store.doc_commits <= 3, ledgers.store.doc_commits
        assert stored(ledgers.store)["global_day"]["usd"] == pytest.approx(71 * 0.07)


async def test_group_commit_covers_reservers_that_arrive_during_a_write(clock: FakeClock) -> None:
    """While one write is in flight, 50 more reservers queue up; one more write covers them all.

    Store only: group commit of the document (``PgBudgetLedger`` writes each reservation).
    """
    store = BlockingStore()
    ledger = await ledger_on(store, clock)
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        await ledger.reserve("a", f"run-{i}", 0.01, 1)
        done += 1

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 0)
            await store.entered.wait()
            for i in range(1, 51):
                tg.start_soon(one, i)
            await anyio.wait_all_tasks_blocked()
            assert done == 0  # nobody returns before a write holding its reservation is done
            store.unblock.set()
    assert done == 51
    assert ledger.writes == 2
    assert stored(store)["global_day"]["usd"] == pytest.approx(0.51)


# Settlement.


async def test_settling_lower_frees_room(ledgers: Ledgers, clock: FakeClock) -> None:
    """A call that cost less than its worst case gives the difference back to every window."""
    ledger = await ledgers.open(clock, global_day=USD_1, per_agent_day=USD_1)
    reservation = await ledger.reserve("a", "r1", 0.8, 1000)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve("a", "r1", 0.3, 0)
    await ledger.settle(reservation, 0.1, 200)
    await ledger.reserve("a", "r1", 0.3, 0)
    day = window(ledger, "global_day")
    assert (day.spent_usd, day.reserved_usd, day.spent_tokens) == (pytest.approx(0.1), 0.3, 200)


async def test_settling_higher_is_recorded_in_full_and_written_at_once(
    ledgers: Ledgers, clock: FakeClock
) -> None:
    """A cost above the reservation is recorded as it is, durably, and blocks later calls."""
    ledger = await ledgers.open(clock, global_day=USD_1)
    reservation = await ledger.reserve("a", "r1", 0.1, 10)
    await ledger.settle(reservation, 1.2, 50)
    assert window(ledger, "global_day").spent_usd == pytest.approx(1.2)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve("a", "r1", 0.0001, 0)
    # Written before settle returned: a ledger started now (no close) sees it.
    restarted = await ledgers.open(clock)
    usd, tokens = counted(window(restarted, "global_day"))
    assert usd == pytest.approx(1.2)
    assert tokens == 50
    if ledgers.store is not None:
        assert stored(ledgers.store)["global_day"] == {"usd": 1.2, "tokens": 50}


async def test_release_drops_the_reservation_and_later_settles_do_nothing(
    ledgers: Ledgers, clock: FakeClock
) -> None:
    """``release`` holds nothing afterwards; settling or releasing again is a no-op."""
    ledger = await ledgers.open(clock)
    reservation = await ledger.reserve("a", "r1", 0.5, 10)
    await ledger.release(reservation)
    await ledger.settle(reservation, 9.0, 9)
    await ledger.release(reservation)
    day = window(ledger, "global_day")
    assert (day.spent_usd, day.reserved_usd, ledger.outstanding) == (0.0, 0.0, 0)


async def test_settlement_is_lazy_and_close_writes_it(
    store: CountingStore, clock: FakeClock
) -> None:
    """A lower settlement waits for the next write; until then the store keeps the worst case.

    Store only: ``PgBudgetLedger`` writes every settlement before ``settle`` returns.
    """
    ledger = await ledger_on(store, clock)
    reservation = await ledger.reserve("a", "r1", 0.5, 100)
    commits = store.doc_commits
    await ledger.settle(reservation, 0.2, 40)
    assert store.doc_commits == commits
    assert stored(store)["global_day"] == {"usd": 0.5, "tokens": 100}
    await ledger.close()
    assert stored(store)["global_day"] == {"usd": 0.2, "tokens": 40}
    assert stored(store)["agent_day"] == {"a": {"usd": 0.2, "tokens": 40}}


async def test_end_run_drops_the_run_window_only(ledgers: Ledgers, clock: FakeClock) -> None:
    """After ``end_run`` the run window is gone; the agent and global windows keep the spend."""
    ledger = await ledgers.open(clock, per_run=USD_1)
    reservation = await ledger.reserve("a", "r1", 0.9, 0)
    ledger.end_run("r1")
    assert [w.name for w in ledger.snapshot()] == ["global_day", "global_hour", "agent_day"]
    await ledger.settle(reservation, 0.9, 0)  # its run window is gone: harmless
    await ledger.reserve("a", "r2", 0.9, 0)
    assert window(ledger, "agent_day", "a").reserved_usd == 0.9
    assert window(ledger, "agent_day", "a").spent_usd == 0.9


# Persistence and time.


async def test_restart_keeps_the_days_spend(ledgers: Ledgers, clock: FakeClock) -> None:
    """A new ledger on the same store (schema) sees today's spend, per agent and globally."""
    first = await ledgers.open(clock, global_day=USD_1)
    reservation = await first.reserve("a", "r1", 0.9, 0)
    await first.settle(reservation, 0.7, 70)
    await first.close()
    second = await ledgers.open(clock, global_day=USD_1)
    assert window(second, "global_day").spent_usd == pytest.approx(0.7)
    assert window(second, "agent_day", "a").spent_tokens == 70
    assert window(second, "global_hour").spent_usd == pytest.approx(0.7)
    with pytest.raises(BudgetExceeded, match="global_day"):
        await second.reserve("b", "r2", 0.4, 0)


async def test_reservations_outstanding_at_a_crash_count_as_spent(
    ledgers: Ledgers, clock: FakeClock
) -> None:
    """A reservation never settled (the process died mid-call) still counts after the restart.

    The document ledger writes it as spent; ``PgBudgetLedger`` leaves it reserved in the rows
    (documented: a dead node's reservation stays counted). Either way it is counted in full.
    """
    first = await ledgers.open(clock, global_day=USD_1)
    await first.reserve("a", "r1", 0.6, 600)
    # No settle, no close: the process is gone.
    second = await ledgers.open(clock, global_day=USD_1)
    day = window(second, "global_day")
    assert counted(day) == (0.6, 600)
    if ledgers.store is not None:
        assert (day.spent_usd, day.spent_tokens, day.reserved_usd) == (0.6, 600, 0.0)
    with pytest.raises(BudgetExceeded):
        await second.reserve("a", "r2", 0.5, 0)


async def test_hour_rollover_frees_the_hour_but_not_the_day(
    ledgers: Ledgers, clock: FakeClock
) -> None:
    """At the top of the hour the hour window starts empty; the day window keeps counting."""
    ledger = await ledgers.open(clock, global_hour=USD_1, global_day=LimitConfig(usd=1.5))
    reservation = await ledger.reserve("a", "r1", 0.9, 0)
    await ledger.settle(reservation, 0.9, 0)
    with pytest.raises(BudgetExceeded, match="global_hour"):
        await ledger.reserve("a", "r1", 0.2, 0)
    clock.advance(timedelta(minutes=30))  # 11:00:00
    await ledger.reserve("a", "r1", 0.2, 0)
    assert window(ledger, "global_hour").period == "2026-03-01T11"
    with pytest.raises(BudgetExceeded, match="global_day"):
        await ledger.reserve("a", "r1", 0.5, 0)
    # A restart in the new hour restores the day and this hour only (the unsettled $0.20
    # counted: as spent by the document ledger, as still reserved by PgBudgetLedger).
    await ledger.close()
    again = await ledgers.open(clock)
    assert counted(window(again, "global_hour"))[0] == pytest.approx(0.2)
    assert counted(window(again, "global_day"))[0] == pytest.approx(1.1)


async def test_day_rollover_frees_day_windows_and_prunes_the_document(
    ledgers: Ledgers, clock: FakeClock
) -> None:
    """At UTC midnight the agent and global day windows start empty, in memory and in the store."""
    ledger = await ledgers.open(clock, per_agent_day=USD_1)
    await ledger.reserve("a", "r1", 0.9, 0)
    clock.advance(timedelta(hours=13, minutes=30))  # 2026-03-02T00:00
    await ledger.reserve("a", "r2", 0.9, 0)
    assert window(ledger, "agent_day", "a").period == "2026-03-02"
    assert window(ledger, "global_day").reserved_usd == 0.9
    assert [w.key for w in ledger.snapshot() if w.name == "agent_day"] == ["a"]
    if ledgers.store is not None:  # the document keeps the new day only
        doc = stored(ledgers.store)
        assert (doc["day"], doc["agent_day"]) == ("2026-03-02", {"a": {"usd": 0.9, "tokens": 0}})
    # A restart a day later starts from nothing.
    clock.advance(timedelta(days=1))
    later = await ledgers.open(clock)
    assert [w.spent_usd for w in later.snapshot()] == [0.0, 0.0]


async def test_clock_set_back_keeps_the_newer_windows(store: CountingStore) -> None:
    """A wall clock stepped back across an hour does not reopen an old, empty window.

    Store only: ``PgBudgetLedger`` takes its periods from the clock as it is (documented:
    nodes keep their clocks in sync; a clock that is off counts in the neighbouring period).
    """

    class SteppedClock(FakeClock):
        def set(self, when: datetime) -> None:
            self._start, self._offset = when, 0.0

    clock = SteppedClock(START)
    ledger = await ledger_on(store, clock, global_hour=USD_1)
    await ledger.reserve("a", "r1", 0.9, 0)
    clock.set(START - timedelta(hours=1))
    with pytest.raises(BudgetExceeded, match="global_hour"):
        await ledger.reserve("a", "r1", 0.2, 0)
    assert window(ledger, "global_hour").period == "2026-03-01T10"


async def test_clock_set_back_across_a_restart_keeps_the_stored_spend(
    store: CountingStore,
) -> None:
    """A document written in a later hour than the clock now says is kept, not forgotten.

    Store only: the document's tolerance of a clock set back; ``PgBudgetLedger`` reads the
    rows of the periods its clock says (see the test above).
    """
    first = await ledger_on(store, FakeClock(START), global_day=USD_1)
    await first.reserve("a", "r1", 0.9, 0)
    behind = FakeClock(START - timedelta(hours=11))  # 23:30 the day before
    second = await ledger_on(store, behind, global_day=USD_1)
    assert window(second, "global_day").spent_usd == 0.9
    assert window(second, "global_day").period == "2026-03-01"
    with pytest.raises(BudgetExceeded):
        await second.reserve("a", "r2", 0.2, 0)


async def test_reserve_loads_the_store_first_when_load_was_not_called(
    ledgers: Ledgers, clock: FakeClock
) -> None:
    """A ledger never loaded still counts the stored spend before it writes anything."""
    first = await ledgers.open(clock)
    await first.reserve("a", "r1", 0.8, 0)
    second = await ledgers.build(clock, global_day=USD_1)
    with pytest.raises(BudgetExceeded):
        await second.reserve("a", "r1", 0.3, 0)
    # The refused ledger wrote nothing over the stored spend.
    third = await ledgers.open(clock)
    assert counted(window(third, "global_day"))[0] == pytest.approx(0.8)
    if ledgers.store is not None:
        assert stored(ledgers.store)["global_day"]["usd"] == pytest.approx(0.8)


async def test_failed_write_refuses_the_call_and_holds_nothing(
    store: CountingStore, clock: FakeClock
) -> None:
    """When the store cannot write, ``reserve`` raises and the reservation is dropped.

    Store only (a failing ``commit_doc``); PostgreSQL: ``tests/cluster/test_budget_pg.py``.
    """
    ledger = await ledger_on(store, clock, global_day=USD_1)
    store.fail_next_commit()
    with pytest.raises(StateWriteError):
        await ledger.reserve("a", "r1", 0.9, 0)
    assert (ledger.outstanding, window(ledger, "global_day").reserved_usd) == (0, 0.0)
    await ledger.reserve("a", "r1", 0.9, 0)
    assert stored(store)["global_day"]["usd"] == pytest.approx(0.9)


async def test_cancelled_reserver_holds_nothing(clock: FakeClock) -> None:
    """A reserver cancelled while its write is pending gets nothing and holds nothing.

    Store only (a blocked ``commit_doc``); PostgreSQL: ``tests/cluster/test_budget_pg.py``.
    """
    store = BlockingStore()
    ledger = await ledger_on(store, clock)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ledger.reserve, "a", "r1", 0.5, 5)
            await store.entered.wait()
            tg.cancel_scope.cancel()
    assert (ledger.outstanding, window(ledger, "global_day").reserved_usd) == (0, 0.0)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(b'{"windows": ', "not valid JSON", id="truncated"),
        pytest.param(b'{"version": 1}', "does not match its schema", id="schema"),
        pytest.param(b'{"version": 2}', "version 2 is newer", id="future"),
        pytest.param(
            b'{"version": 1, "updated_at": "x", "day": "2026-13-45", "hour": "2026-13-45T99",'
            b' "global_day": {"usd": 0, "tokens": 0}, "global_hour": {"usd": 0, "tokens": 0},'
            b' "agent_day": {}}',
            "impossible hour",
            id="impossible-hour",
        ),
        pytest.param(
            b'{"version": 1, "updated_at": "x", "day": "2026-03-01", "hour": "2026-03-01T10",'
            b' "global_day": {"usd": -1, "tokens": 0}, "global_hour": {"usd": 0, "tokens": 0},'
            b' "agent_day": {}}',
            "greater than or equal to 0",
            id="negative-spend",
        ),
    ],
)
async def test_unusable_document_stops_load(clock: FakeClock, raw: bytes, message: str) -> None:
    """A budget document that cannot be used raises instead of starting from zero spend.

    Store only: the persisted document's format.
    """
    store = MemoryStore()
    store.corrupt_doc(DOC_NAME, raw)
    ledger = BudgetLedger(store, clock, limits())
    with pytest.raises(StateCorruptError, match=message):
        await ledger.load()
    assert store.raw_doc(DOC_NAME) == raw


async def test_snapshot_reports_every_window(ledgers: Ledgers, clock: FakeClock) -> None:
    """``snapshot`` lists global day, global hour, agents and runs with their limits."""
    ledger = await ledgers.open(clock, global_day=LimitConfig(usd=10.0, tokens=5000), per_run=USD_1)
    assert [(w.name, w.spent_usd) for w in ledger.snapshot()] == [
        ("global_day", 0.0),
        ("global_hour", 0.0),
    ]
    reservation = await ledger.reserve("alpha", "run-1", 0.25, 100)
    await ledger.settle(reservation, 0.125, 80)
    await ledger.reserve("alpha", "run-1", 0.5, 300)
    assert ledger.snapshot() == [
        WindowStatus("global_day", "global", 0.125, 0.5, 10.0, 80, 5000, 300, "2026-03-01"),
        WindowStatus("global_hour", "global", 0.125, 0.5, None, 80, None, 300, "2026-03-01T10"),
        WindowStatus("agent_day", "alpha", 0.125, 0.5, None, 80, None, 300, "2026-03-01"),
        WindowStatus("run", "run-1", 0.125, 0.5, 1.0, 80, None, 300, None),
    ]


async def test_json_file_store_group_commit_and_restart(tmp_path: Path, clock: FakeClock) -> None:
    """On a real directory: 200 concurrent reservers, a few fsynced writes, spend survives.

    Store only: ``JsonFileStore``.
    """
    store = JsonFileStore(tmp_path / "state")
    await store.open()
    ledger = await ledger_on(store, clock, global_day=LimitConfig(usd=1.0))
    granted = 0

    async def one(i: int) -> None:
        nonlocal granted
        try:
            await ledger.reserve(f"agent-{i % 5}", f"run-{i}", 0.01, 10)
        except BudgetExceeded:
            return
        granted += 1

    started = time.perf_counter()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
    elapsed = time.perf_counter() - started
    assert granted == 100
    assert ledger.writes <= 3, ledger.writes
    assert elapsed < 5.0
    assert await store.agents() == []
    await store.close()  # the store writes its files behind its journal; close writes them
    assert (tmp_path / "state" / "_budget.json").is_file()
    again = await ledger_on(store, clock)
    assert window(again, "global_day").spent_usd == pytest.approx(1.0)
    assert window(again, "agent_day", "agent-0").spent_usd == pytest.approx(0.2)
