"""RunContext: steps, trace, partial results, time left, cleanup and plugged-in services."""

from __future__ import annotations

import math
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from supervisor import MaxStepsExceeded, RunContext, Step, SupervisorError
from supervisor.context import TRACE_LIMIT
from supervisor.guards.steps import StepCounter
from supervisor.testing import FakeClock


def make_ctx(
    clock: FakeClock | None = None,
    *,
    max_steps: int | None = 3,
    services: dict[str, Any] | None = None,
    **kwargs: Any,
) -> RunContext:
    return RunContext(
        agent="reporter",
        run_id="r-0001",
        state={},
        steps=StepCounter(max_steps),
        clock=clock or FakeClock(),
        log=None,
        services=services,
        **kwargs,
    )


# -- steps ------------------------------------------------------------------------------------


def test_step_counts_and_numbers_each_step() -> None:
    """Each ctx.step() counts one step and returns it numbered from 1."""
    ctx = make_ctx()
    first, second = ctx.step("fetch"), ctx.step("parse")

    assert isinstance(first, Step)
    assert (first.name, first.number) == ("fetch", 1)
    assert (second.name, second.number) == ("parse", 2)
    assert ctx.steps == 2


def test_step_past_the_limit_raises_and_is_not_counted() -> None:
    """The step after max_steps raises MaxStepsExceeded with limit and observed; count stays."""
    ctx = make_ctx(max_steps=2)
    ctx.step("a")
    ctx.step("b")

    with pytest.raises(MaxStepsExceeded) as err:
        ctx.step("c")

    assert (err.value.limit, err.value.observed) == (2, 3)
    assert "'c'" in str(err.value)
    assert ctx.steps == 2


def test_with_step_adds_a_step_end_event_with_its_duration() -> None:
    """`with ctx.step()` traces the step, then step.end with its duration on the clock."""
    clock = FakeClock()
    ctx = make_ctx(clock)

    with ctx.step("fetch"):
        clock.advance(1.5)

    start, end = ctx.trace
    assert start == {"kind": "step", "name": "fetch", "n": 1, "t": 1000.0}
    assert end == {
        "kind": "step.end",
        "name": "fetch",
        "n": 1,
        "duration_s": 1.5,
        "error": None,
        "t": 1001.5,
    }


def test_step_end_names_the_exception_that_left_the_block() -> None:
    """A step whose block raises still ends in the trace, naming the error; it propagates."""
    ctx = make_ctx()

    with pytest.raises(KeyError), ctx.step("lookup"):
        raise KeyError("missing")

    assert ctx.trace[-1]["kind"] == "step.end"
    assert ctx.trace[-1]["error"] == "KeyError"


# -- trace ------------------------------------------------------------------------------------


def test_trace_is_bounded_and_counts_what_it_dropped() -> None:
    """Past TRACE_LIMIT events the oldest are dropped and counted; the newest are kept."""
    ctx = make_ctx()
    for i in range(TRACE_LIMIT + 10):
        ctx.trace_event("call", i=i)

    assert len(ctx.trace) == TRACE_LIMIT
    assert ctx.trace_dropped == 10
    assert ctx.trace[0]["i"] == 10
    assert ctx.trace[-1]["i"] == TRACE_LIMIT + 9


def test_trace_under_the_limit_drops_nothing() -> None:
    """Up to TRACE_LIMIT events are all kept, in order, none counted as dropped."""
    ctx = make_ctx()
    for i in range(TRACE_LIMIT):
        ctx.trace_event("call", i=i)

    assert [e["i"] for e in ctx.trace] == list(range(TRACE_LIMIT))
    assert ctx.trace_dropped == 0


# -- partial and time -------------------------------------------------------------------------


def test_partial_is_unset_until_given() -> None:
    """A fresh context has no partial result."""
    ctx = make_ctx()

    assert ctx.has_partial is False
    assert ctx.partial_value is None


@pytest.mark.parametrize(
    "value", [None, {"done": 3}, [1, 2]], ids=["none-is-a-value", "dict", "list"]
)
def test_partial_remembers_the_last_value_given(value: Any) -> None:
    """ctx.partial(value) keeps the newest value; even None counts as given."""
    ctx = make_ctx()
    ctx.partial("older")
    ctx.partial(value)

    assert ctx.has_partial is True
    assert ctx.partial_value == value


def test_time_left_counts_down_on_the_clock() -> None:
    """time_left is the deadline minus the clock's monotonic time."""
    clock = FakeClock()
    ctx = make_ctx(clock, deadline=clock.monotonic() + 30)

    assert ctx.time_left() == 30
    clock.advance(12.5)
    assert ctx.time_left() == 17.5
    clock.advance(20)
    assert ctx.time_left() == -2.5


def test_time_left_without_a_deadline_is_infinite() -> None:
    """A context built without a deadline never runs out of time."""
    assert make_ctx().time_left() == math.inf


# -- cleanup ----------------------------------------------------------------------------------


async def test_cleanup_shields_awaits_from_a_cancelled_run() -> None:
    """Inside ctx.cleanup() an await completes although the enclosing scope is cancelled."""
    ctx = make_ctx(cleanup_grace=5.0)
    done = False
    with anyio.CancelScope() as outer:
        outer.cancel()
        with ctx.cleanup():
            await anyio.lowlevel.checkpoint()
            done = True
        await anyio.lowlevel.checkpoint()  # the cancellation takes effect again here

    assert done
    assert outer.cancelled_caught


async def test_cleanup_is_cut_off_after_the_grace() -> None:
    """The cleanup block's own deadline is cleanup_grace from entry; zero cuts it off at once."""
    ctx = make_ctx(cleanup_grace=0.0)
    reached_end = False
    with anyio.fail_after(5), ctx.cleanup() as scope:
        await anyio.sleep_forever()
        reached_end = True

    assert scope.cancelled_caught
    assert not reached_end


# -- services ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attr", ["llm", "http"])
def test_unconfigured_service_raises_naming_agent_and_run(attr: str) -> None:
    """ctx.llm / ctx.http without the service raise SupervisorError naming agent and run id."""
    ctx = make_ctx()

    with pytest.raises(SupervisorError) as err:
        getattr(ctx, attr)

    message = str(err.value)
    assert "'reporter'" in message and "r-0001" in message
    assert f"ctx.{attr} is not configured" in message


async def test_unconfigured_effect_raises_naming_agent_and_run() -> None:
    """ctx.effect without the effects service raises SupervisorError naming agent and run id."""
    ctx = make_ctx()

    async def send() -> None:
        raise AssertionError("must not run")

    with pytest.raises(SupervisorError) as err:
        await ctx.effect("email", "report-42", send)

    message = str(err.value)
    assert "'reporter'" in message and "r-0001" in message
    assert "ctx.effect is not configured" in message


@pytest.mark.parametrize("attr", ["llm", "http"])
def test_configured_service_is_returned(attr: str) -> None:
    """ctx.llm / ctx.http return the service the runner plugged in."""
    service = object()
    ctx = make_ctx(services={attr: service})

    assert getattr(ctx, attr) is service


async def test_effect_delegates_to_the_effects_service() -> None:
    """ctx.effect passes the context, kind, key, function and options to the service."""
    calls: list[tuple[Any, ...]] = []

    class Effects:
        async def run(self, ctx: RunContext, kind: str, key: str, fn: Any, **options: Any) -> Any:
            calls.append((ctx, kind, key, fn, options))
            return await fn()

    async def send() -> str:
        return "sent"

    ctx = make_ctx(services={"effects": Effects()})
    assert await ctx.effect("email", "report-42", send, ttl=60) == "sent"
    assert calls == [(ctx, "email", "report-42", send, {"ttl": 60})]
