"""The helpers shipped in ``supervisor.testing``: FakeClock and run_agent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest
from pydantic import BaseModel

from supervisor import Outcome, RunContext, TransientError
from supervisor.clock import Clock
from supervisor.testing import FakeClock, MemoryStore, run_agent

# -- FakeClock --------------------------------------------------------------------------------


def test_fake_clock_starts_at_a_fixed_utc_time() -> None:
    """A new FakeClock reads 2026-01-01T00:00Z and monotonic 1000.0, and is a Clock."""
    clock = FakeClock()

    assert clock.now() == datetime(2026, 1, 1, tzinfo=UTC)
    assert clock.now().tzinfo is not None
    assert clock.monotonic() == 1000.0
    assert isinstance(clock, Clock)


def test_fake_clock_can_start_elsewhere() -> None:
    """The start time can be given; monotonic time is independent of it."""
    start = datetime(2030, 6, 1, 12, tzinfo=UTC)
    clock = FakeClock(start)

    assert clock.now() == start
    assert clock.monotonic() == 1000.0


@pytest.mark.parametrize(
    "delay", [90, 90.0, timedelta(minutes=1, seconds=30)], ids=["int", "float", "timedelta"]
)
def test_advance_moves_wall_and_monotonic_time_together(delay: float | timedelta) -> None:
    """advance() accepts seconds or a timedelta and moves both clocks by it."""
    clock = FakeClock()
    clock.advance(delay)

    assert clock.now() == datetime(2026, 1, 1, 0, 1, 30, tzinfo=UTC)
    assert clock.monotonic() == 1090.0


def test_time_does_not_move_by_itself() -> None:
    """Reading the clock twice gives the same time: only advance and sleep move it."""
    clock = FakeClock()

    assert (clock.now(), clock.monotonic()) == (clock.now(), clock.monotonic())


@pytest.mark.parametrize("delay", [-1, timedelta(seconds=-0.5)], ids=["seconds", "timedelta"])
def test_fake_clock_cannot_go_backwards(delay: float | timedelta) -> None:
    """advance() with a negative delay raises ValueError and leaves the time alone."""
    clock = FakeClock()

    with pytest.raises(ValueError, match="cannot go backwards"):
        clock.advance(delay)
    assert clock.monotonic() == 1000.0


async def test_sleep_returns_at_once_and_moves_the_clock() -> None:
    """sleep() records each delay and advances by it, without waiting for real."""
    clock = FakeClock()
    with anyio.fail_after(1):
        await clock.sleep(3600)
        await clock.sleep(0.5)

    assert clock.sleeps == [3600, 0.5]
    assert clock.monotonic() == 1000.0 + 3600.5
    assert clock.now() == datetime(2026, 1, 1, 1, 0, 0, 500000, tzinfo=UTC)


async def test_negative_sleep_is_recorded_but_does_not_move_the_clock() -> None:
    """A negative delay is a zero sleep: recorded as asked, time unchanged."""
    clock = FakeClock()
    await clock.sleep(-2)

    assert clock.sleeps == [-2]
    assert clock.monotonic() == 1000.0


async def test_sleep_is_a_cancellation_point() -> None:
    """Like a real sleep, a FakeClock sleep in a cancelled scope raises the cancellation."""
    clock = FakeClock()
    after_sleep = False
    with anyio.CancelScope() as scope:
        scope.cancel()
        await clock.sleep(1)
        after_sleep = True

    assert scope.cancelled_caught
    assert not after_sleep


# -- run_agent --------------------------------------------------------------------------------


class Params(BaseModel):
    greeting: str


async def counter(ctx: RunContext) -> int:
    with ctx.step("count"):
        ctx.state["count"] = ctx.state.get("count", 0) + 1
    return int(ctx.state["count"])


async def test_run_agent_returns_the_record_and_the_committed_state() -> None:
    """run_agent runs the function once under the runner: record plus committed state."""
    record, state = await run_agent(counter, name="counter")

    assert record.outcome is Outcome.SUCCESS
    assert (record.agent, record.trigger, record.result) == ("counter", "test", 1)
    assert (record.steps, record.attempts) == (1, 1)
    assert state.agent == "counter"
    assert state.data == {"count": 1}
    assert state.totals == {"success": 1}


async def test_run_agent_seeds_the_agents_state() -> None:
    """state= seeds ctx.state before the run."""
    record, state = await run_agent(counter, state={"count": 41})

    assert record.result == 42
    assert state.data == {"count": 42}


async def test_run_agent_passes_params_to_a_two_argument_agent() -> None:
    """An agent taking (ctx, params) gets the params given."""

    async def greeter(ctx: RunContext, params: Params) -> str:
        return f"{params.greeting}, {ctx.agent}"

    record, _ = await run_agent(greeter, Params(greeting="hello"), name="world")

    assert record.result == "hello, world"


async def test_run_agent_commits_to_the_store_given() -> None:
    """With store=, the committed state lands in that store, for the next run to read."""
    store = MemoryStore()
    await run_agent(counter, store=store, name="c")
    _, state = await run_agent(counter, store=store, name="c")

    assert state.data == {"count": 2}
    assert (await store.load("c")).totals == {"success": 2}


async def test_run_agent_retries_on_the_fake_clock() -> None:
    """retry_attempts enables run-level retry; the backoff is slept on the FakeClock."""
    clock = FakeClock()
    attempts: list[int] = []

    async def flaky(ctx: RunContext) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise TransientError("once")
        return "ok"

    with anyio.fail_after(2):
        record, _ = await run_agent(flaky, clock=clock, retry_attempts=2)

    assert record.outcome is Outcome.SUCCESS
    assert attempts == [1, 2]
    assert len(clock.sleeps) == 1 and 0 <= clock.sleeps[0] <= 1.0


async def test_run_agent_applies_max_steps() -> None:
    """max_steps= bounds the run as in production."""

    async def looper(ctx: RunContext) -> None:
        while True:
            ctx.step("spin")

    record, _ = await run_agent(looper, max_steps=5)

    assert record.outcome is Outcome.MAX_STEPS
    assert record.steps == 5


async def test_run_agent_timeout_is_a_real_deadline() -> None:
    """timeout= is a real (short) deadline: a hanging agent ends as a timeout."""

    async def hangs(ctx: RunContext) -> None:
        await anyio.sleep_forever()

    with anyio.fail_after(5):
        record, _ = await run_agent(hangs, timeout=0.05)

    assert record.outcome is Outcome.TIMEOUT


async def test_run_agent_refuses_an_agent_with_unreadable_state() -> None:
    """When the agent's state cannot be loaded, run_agent raises instead of returning."""
    store = MemoryStore()
    store.corrupt("broken")

    with pytest.raises(RuntimeError, match="'broken' could not run"):
        await run_agent(counter, name="broken", store=store)
