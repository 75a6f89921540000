"""The runner: one fire of an agent, from admission to the committed record and its metrics."""

from __future__ import annotations

import inspect
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskGroup
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from supervisor import (
    BudgetExceeded,
    Outcome,
    PermanentError,
    RunContext,
    TransientError,
)
from supervisor.clock import SystemClock
from supervisor.config import AgentConfig, AgentSpec, ResolvedGuards, ScheduleConfig
from supervisor.guards.breaker import CircuitBreaker
from supervisor.guards.loops import DetectorMode, LoopPolicy, StallPolicy
from supervisor.guards.retry import RetryPolicy
from supervisor.metrics import Metrics
from supervisor.outcome import RunRecord
from supervisor.runner import AgentSlot, Runner
from supervisor.state.base import AgentState
from supervisor.testing import FakeClock, MemoryStore, run_agent
from supervisor.traces import TraceStore

P = "agent_supervisor_"
AgentFn = Callable[..., Awaitable[Any]]


def make_spec(
    fn: AgentFn,
    *,
    name: str = "a",
    timeout: float = 30.0,
    cleanup_grace: float = 1.0,
    max_steps: int = 50,
    attempts: int = 1,
    base_delay: float = 1.0,
    max_delay: float = 60.0,
    transient: tuple[type[BaseException], ...] = (),
    circuit_failures: int = 0,
    circuit_cooldown: float = 60.0,
    max_concurrent: int = 1,
    loops: LoopPolicy | None = None,
) -> AgentSpec:
    guards = ResolvedGuards(
        timeout=timeout,
        cleanup_grace=cleanup_grace,
        max_steps=max_steps,
        # No jitter: the backoff sleeps recorded on the FakeClock are then exact.
        retry=RetryPolicy(
            max_attempts=attempts, base_delay=base_delay, max_delay=max_delay, jitter=False
        ),
        transient=transient,
        circuit_failures=circuit_failures,
        circuit_cooldown=circuit_cooldown,
        loops=loops or LoopPolicy(),
    )
    config = AgentConfig(
        name=name,
        run="tests.agents:agent",
        schedule=ScheduleConfig(every=3600),
        max_concurrent=max_concurrent,
    )
    takes_params = len(inspect.signature(fn).parameters) >= 2
    return AgentSpec(config, fn, None, guards, None, takes_params)


@dataclass
class Harness:
    """A runner on a FakeClock, a MemoryStore and a fresh registry."""

    clock: FakeClock = field(default_factory=FakeClock)
    store: MemoryStore = field(default_factory=MemoryStore)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    max_concurrent: int = 16
    keep_errors: int = 3

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.registry)
        self.runner = Runner(
            store=self.store,
            metrics=self.metrics,
            clock=self.clock,
            max_concurrent=self.max_concurrent,
            keep_errors=self.keep_errors,
            rng=random.Random(0),
        )

    def slot(self, fn: AgentFn, **spec: Any) -> AgentSlot:
        s = make_spec(fn, **spec)
        g = s.guards
        return AgentSlot(s, CircuitBreaker(g.circuit_failures, g.circuit_cooldown, self.clock))

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(P + name, labels)

    async def fire(self, slot: AgentSlot, **kwargs: Any) -> RunRecord:
        record = await self.runner.fire(slot, kwargs.pop("planned_at", None), **kwargs)
        assert record is not None
        return record


@pytest.fixture
def h() -> Harness:
    return Harness()


async def fire_in(tg: TaskGroup, h: Harness, slot: AgentSlot) -> list[RunRecord | None]:
    """Start a fire in ``tg``; the list gets its record when it is done."""
    out: list[RunRecord | None] = []

    async def go() -> None:
        out.append(await h.runner.fire(slot, None))

    tg.start_soon(go)
    return out


class Gate:
    """Holds agent runs until released: ``entered`` counts them in, ``release`` lets them go."""

    def __init__(self) -> None:
        self.entered = 0
        self.in_event = anyio.Event()
        self.out_event = anyio.Event()

    async def agent(self, ctx: RunContext) -> str:
        self.entered += 1
        self.in_event.set()
        await self.out_event.wait()
        return "released"


# -- outcomes -------------------------------------------------------------------------------


async def test_success_records_result_state_totals_and_last_success(h: Harness) -> None:
    """A successful run returns its result and commits data, totals and last_success_at."""

    async def agent(ctx: RunContext) -> dict[str, Any]:
        with ctx.step("work"):
            ctx.state["n"] = ctx.state.get("n", 0) + 1
        return {"ok": True, "n": ctx.state["n"]}

    slot = h.slot(agent)
    record = await h.fire(slot)

    assert record.outcome is Outcome.SUCCESS
    assert record.result == {"ok": True, "n": 1}
    assert (record.attempts, record.steps, record.error) == (1, 1, None)
    committed = await h.store.load("a")
    assert committed.data == {"n": 1}
    assert committed.totals == {"success": 1}
    assert committed.last_success_at == h.clock.now()
    assert committed.last_run is not None and committed.last_run.run_id == record.run_id
    assert committed.errors == []
    assert slot.state == committed
    assert h.sample("runs_total", agent="a", outcome="success") == 1
    assert h.sample("last_success_timestamp_seconds", agent="a") == h.clock.now().timestamp()


async def test_failure_keeps_the_last_errors_and_commits_the_agents_state(h: Harness) -> None:
    """Failed runs commit ctx.state anyway and keep only the newest keep_errors errors."""

    async def agent(ctx: RunContext) -> None:
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        raise ValueError(f"boom {ctx.state['n']}")

    slot = h.slot(agent)
    for _ in range(5):
        record = await h.fire(slot)
        assert record.outcome is Outcome.FAILURE

    committed = await h.store.load("a")
    assert committed.data == {"n": 5}
    assert [e.message for e in committed.errors] == [
        "ValueError: boom 3",
        "ValueError: boom 4",
        "ValueError: boom 5",
    ]
    assert {e.error_type for e in committed.errors} == {"ValueError"}
    assert committed.totals == {"failure": 5}
    assert committed.last_success_at is None
    assert h.sample("runs_total", agent="a", outcome="failure") == 5


# -- retry ------------------------------------------------------------------------------------


async def test_transient_error_is_retried_with_backoff_on_the_fake_clock(h: Harness) -> None:
    """TransientError is retried after exponential backoff slept on the FakeClock, not for real."""
    calls: list[int] = []

    async def agent(ctx: RunContext) -> str:
        calls.append(ctx.attempt)
        if len(calls) < 3:
            raise TransientError("flaky upstream")
        return "third time lucky"

    slot = h.slot(agent, attempts=3, base_delay=1.0)
    with anyio.fail_after(2):  # 3 s of backoff slept for real would trip this
        record = await h.fire(slot)

    assert record.outcome is Outcome.SUCCESS
    assert record.result == "third time lucky"
    assert record.attempts == 3
    assert calls == [1, 2, 3]
    assert h.clock.sleeps == [1.0, 2.0]
    assert record.duration_s == 3.0
    assert h.sample("retries_total", agent="a") == 2
    assert h.sample("run_attempts_total", agent="a") == 3


async def test_permanent_error_is_not_retried(h: Harness) -> None:
    """A PermanentError fails the run at once, whatever attempts are left."""
    calls = 0

    async def agent(ctx: RunContext) -> None:
        nonlocal calls
        calls += 1
        raise PermanentError("bad credentials")

    record = await h.fire(h.slot(agent, attempts=5))

    assert record.outcome is Outcome.FAILURE
    assert (calls, record.attempts) == (1, 1)
    assert record.error_type == "PermanentError"
    assert h.clock.sleeps == []
    assert h.sample("retries_total", agent="a") == 0


async def test_exception_class_listed_as_transient_is_retried(h: Harness) -> None:
    """An exception class in ResolvedGuards.transient is retried like a TransientError."""
    calls = 0

    async def agent(ctx: RunContext) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionResetError("peer reset")
        return "ok"

    record = await h.fire(h.slot(agent, attempts=3, transient=(ConnectionError,)))

    assert record.outcome is Outcome.SUCCESS
    assert (calls, record.attempts) == (2, 2)
    assert h.clock.sleeps == [1.0]


@pytest.mark.parametrize(
    ("exc", "transient", "retried"),
    [
        (TransientError("x"), (), True),
        (ConnectionResetError("x"), (ConnectionError,), True),
        (ConnectionResetError("x"), (), False),
        (ValueError("x"), (), False),
        (PermanentError("x"), (), False),
        (PermanentError("x"), (PermanentError,), False),
        (BudgetExceeded("x", limit=1, observed=2), (BudgetExceeded,), False),
    ],
    ids=[
        "transient-error",
        "listed-subclass",
        "unlisted-class",
        "plain-exception",
        "permanent",
        "permanent-even-if-listed",
        "guard-error-even-if-listed",
    ],
)
async def test_which_errors_are_retried(
    h: Harness, exc: Exception, transient: tuple[type[BaseException], ...], retried: bool
) -> None:
    """Only TransientError and listed classes are retried; permanent and guard errors never."""
    calls = 0

    async def agent(ctx: RunContext) -> None:
        nonlocal calls
        calls += 1
        raise exc

    record = await h.fire(h.slot(agent, attempts=2, transient=transient))

    assert record.attempts == calls == (2 if retried else 1)


async def test_retry_gives_up_after_max_attempts(h: Harness) -> None:
    """A failure that stays transient ends as failure after exactly max_attempts attempts."""
    calls = 0

    async def agent(ctx: RunContext) -> None:
        nonlocal calls
        calls += 1
        raise TransientError(f"still down ({calls})")

    record = await h.fire(h.slot(agent, attempts=4))

    assert record.outcome is Outcome.FAILURE
    assert record.attempts == calls == 4
    assert record.error == "TransientError: still down (4)"
    assert h.clock.sleeps == [1.0, 2.0, 4.0]
    assert h.sample("retries_total", agent="a") == 3


async def test_retry_after_is_a_floor_on_the_backoff(h: Harness) -> None:
    """TransientError(retry_after=…) waits at least that long, even past max_delay."""
    calls = 0

    async def agent(ctx: RunContext) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TransientError("rate limited", retry_after=30.0)
        return "ok"

    record = await h.fire(h.slot(agent, attempts=2, base_delay=1.0, max_delay=5.0))

    assert record.outcome is Outcome.SUCCESS
    assert h.clock.sleeps == [30.0]


# -- guards -----------------------------------------------------------------------------------


async def test_max_steps_stops_the_run_at_the_limit_and_keeps_the_partial(h: Harness) -> None:
    """A step past max_steps ends the run as max_steps with steps == limit and the partial kept."""

    async def agent(ctx: RunContext) -> None:
        for i in range(100):
            with ctx.step("item"):
                ctx.partial({"done": i + 1})

    record = await h.fire(h.slot(agent, max_steps=3))

    assert record.outcome is Outcome.MAX_STEPS
    assert record.steps == 3
    assert record.partial == {"done": 3}
    assert record.error_type == "MaxStepsExceeded"
    committed = await h.store.load("a")
    assert committed.last_run is not None
    assert committed.last_run.partial == {"done": 3}
    assert committed.totals == {"max_steps": 1}


async def test_budget_exceeded_raised_by_the_agent_is_its_own_outcome(h: Harness) -> None:
    """BudgetExceeded ends the run as budget_exceeded, carrying the limit and observed value."""

    async def agent(ctx: RunContext) -> None:
        ctx.partial("half done")
        raise BudgetExceeded("daily LLM spend", limit=5, observed=6.5)

    record = await h.fire(h.slot(agent, attempts=3))

    assert record.outcome is Outcome.BUDGET_EXCEEDED
    assert record.attempts == 1
    assert record.error == "daily LLM spend (limit 5, observed 6.5)"
    assert record.partial == "half done"
    assert h.sample("runs_total", agent="a", outcome="budget_exceeded") == 1


async def test_timeout_keeps_the_partial_and_commits_state_written_in_cleanup(h: Harness) -> None:
    """Past its (real, short) deadline a run is a timeout; its shielded cleanup still runs."""

    async def agent(ctx: RunContext) -> None:
        ctx.partial({"fetched": 7})
        try:
            await anyio.sleep_forever()
        finally:
            with ctx.cleanup():
                await anyio.lowlevel.checkpoint()  # would raise if not shielded
                ctx.state["cleaned_up"] = True

    with anyio.fail_after(5):
        record = await h.fire(h.slot(agent, timeout=0.05, cleanup_grace=1.0))

    assert record.outcome is Outcome.TIMEOUT
    assert record.error_type == "RunTimeoutError"
    assert record.partial == {"fetched": 7}
    assert record.attempts == 1
    committed = await h.store.load("a")
    assert committed.data == {"cleaned_up": True}
    assert committed.totals == {"timeout": 1}


async def test_cleanup_that_overruns_the_grace_is_cut_off(h: Harness) -> None:
    """A cleanup block longer than cleanup_grace is cut off; the run still ends and commits."""

    async def agent(ctx: RunContext) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            with ctx.cleanup():
                ctx.state["cleanup"] = "started"
                await anyio.sleep_forever()
                ctx.state["cleanup"] = "finished"

    started = time.monotonic()
    with anyio.fail_after(5):
        record = await h.fire(h.slot(agent, timeout=0.05, cleanup_grace=0.1))

    assert time.monotonic() - started < 2
    assert record.outcome is Outcome.TIMEOUT
    assert (await h.store.load("a")).data == {"cleanup": "started"}


async def test_cancel_all_cancels_a_running_run_and_commits_its_state(h: Harness) -> None:
    """runner.cancel_all() ends a run in flight as cancelled; its state is still committed."""
    running = anyio.Event()

    async def agent(ctx: RunContext) -> None:
        ctx.state["started"] = True
        running.set()
        await anyio.sleep_forever()

    slot = h.slot(agent)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            out = await fire_in(tg, h, slot)
            await running.wait()
            assert h.runner.cancel_all() == 1

    [record] = out
    assert record is not None
    assert record.outcome is Outcome.CANCELLED
    assert record.error is None
    committed = await h.store.load("a")
    assert committed.data == {"started": True}
    assert committed.totals == {"cancelled": 1}
    assert h.runner.in_flight == 0
    assert h.sample("runs_in_flight") == 0


def stall_policy(mode: DetectorMode, max_silence: float) -> LoopPolicy:
    """Only the stall detector, in ``mode``."""
    off = LoopPolicy.disabled()
    return LoopPolicy(off.repeat, off.no_progress, StallPolicy(mode, max_silence))


async def test_enforced_stall_ends_a_silent_run_long_before_its_timeout() -> None:
    """No step and no call for max_silence (real, short): stalled, with evidence, state kept."""
    h = Harness(clock=SystemClock())  # silence is measured on the run's clock

    async def agent(ctx: RunContext) -> None:
        ctx.state["waiting"] = True
        await anyio.sleep_forever()

    started = time.monotonic()
    with anyio.fail_after(5):
        record = await h.fire(
            h.slot(agent, timeout=30, loops=stall_policy(DetectorMode.ENFORCE, 0.05))
        )

    assert time.monotonic() - started < 2
    assert record.outcome is Outcome.STALLED
    assert record.error_type == "RunStalled"
    assert record.extra["loop"]["detector"] == "stall"
    assert (await h.store.load("a")).data == {"waiting": True}


async def test_stall_warning_lets_the_run_finish() -> None:
    """In warn mode a silence is logged once and the run goes on to succeed."""
    h = Harness(clock=SystemClock())

    async def agent(ctx: RunContext) -> str:
        await anyio.sleep(0.3)  # six silences of 0.05 s: one warning, then quiet rechecks
        return "done"

    with anyio.fail_after(5), capture_logs() as logs:
        record = await h.fire(h.slot(agent, loops=stall_policy(DetectorMode.WARN, 0.05)))

    assert record.outcome is Outcome.SUCCESS
    warnings = [e for e in logs if e["event"] == "run.loop_warning"]
    assert [e["detector"] for e in warnings] == ["stall"]
    assert h.sample("loop_detections_total", agent="a", detector="stall", action="warned") == 1


async def test_cancel_all_during_a_stall_watch_is_cancelled_not_stalled(h: Harness) -> None:
    """The daemon's cancel wins: a watched run cancelled by cancel_all ends as cancelled."""
    running = anyio.Event()

    async def agent(ctx: RunContext) -> None:
        running.set()
        await anyio.sleep_forever()

    slot = h.slot(agent, loops=stall_policy(DetectorMode.ENFORCE, 60))
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            out = await fire_in(tg, h, slot)
            await running.wait()
            h.runner.cancel_all()

    [record] = out
    assert record is not None and record.outcome is Outcome.CANCELLED


async def test_runs_due_together_all_start_before_any_commits() -> None:
    """Fires handed off together all start before the first commit (a shared tick's lag)."""
    events: list[str] = []

    class RecordingStore(MemoryStore):
        async def commit(self, state: AgentState) -> None:
            events.append(f"commit {state.agent}")
            await super().commit(state)

    h = Harness(store=RecordingStore())

    async def agent(ctx: RunContext) -> None:
        events.append(f"start {ctx.agent}")

    slots = [h.slot(agent, name=f"agent-{i}") for i in range(5)]
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for slot in slots:
                await fire_in(tg, h, slot)

    assert sorted(events[:5]) == [f"start agent-{i}" for i in range(5)]
    assert sorted(events[5:]) == [f"commit agent-{i}" for i in range(5)]


async def test_each_run_leaves_a_trace_readable_at_once(h: Harness, tmp_path: Path) -> None:
    """With a TraceStore every run's record and events are queued, and a read sees them."""
    traces = TraceStore(tmp_path / "traces")
    h.runner.traces = traces

    async def agent(ctx: RunContext) -> None:
        with ctx.step("fetch"):
            pass

    record = await h.fire(h.slot(agent))
    [row] = await traces.runs("a")
    assert (row["run_id"], row["outcome"], row["steps"]) == (record.run_id, "success", 1)
    found = await traces.find(record.run_id, ["a"])
    assert found is not None
    assert [e["kind"] for e in found["events"]] == ["attempt", "step", "step.end"]


# -- state ------------------------------------------------------------------------------------


async def test_non_serialisable_state_fails_the_run_and_keeps_the_previous_data(
    h: Harness,
) -> None:
    """ctx.state that JSON cannot hold makes the run a failure; the last good data stays."""
    await h.store.commit(AgentState(agent="a", data={"n": 1}))

    async def agent(ctx: RunContext) -> None:
        ctx.state["n"] = 2
        ctx.state["handle"] = object()

    record = await h.fire(h.slot(agent))

    assert record.outcome is Outcome.FAILURE
    assert record.error_type == "TypeError"
    assert record.error is not None
    assert record.error.startswith("ctx.state is not JSON-serialisable")
    committed = await h.store.load("a")
    assert committed.data == {"n": 1}
    assert committed.totals == {"failure": 1}
    assert committed.errors[-1].message.startswith("ctx.state is not JSON-serialisable")


async def test_commit_failure_is_counted_and_keeps_the_slot_state(h: Harness) -> None:
    """A StateWriteError on commit: the run is still recorded, state_errors{op=commit} counts it."""
    await h.store.commit(AgentState(agent="a", data={"n": 1}))

    async def agent(ctx: RunContext) -> None:
        ctx.state["n"] = 2

    slot = h.slot(agent)
    before = await h.runner.ensure_state(slot)
    h.store.fail_next_commit()
    record = await h.fire(slot)

    assert record.outcome is Outcome.SUCCESS
    assert record.extra == {"state_committed": False}
    assert h.sample("state_errors_total", agent="a", op="commit") == 1
    assert h.sample("runs_total", agent="a", outcome="success") == 1
    assert slot.state is before
    assert before is not None and before.data == {"n": 1}
    assert (await h.store.load("a")).data == {"n": 1}


async def test_corrupt_state_blocks_the_agent_and_leaves_the_file_alone(h: Harness) -> None:
    """Unreadable state: fire returns None, the agent is blocked and never run, nothing written."""
    calls = 0

    async def agent(ctx: RunContext) -> None:
        nonlocal calls
        calls += 1

    h.store.corrupt("a")
    raw = h.store.raw("a")
    slot = h.slot(agent)

    assert await h.runner.fire(slot, None) is None
    assert await h.runner.fire(slot, None) is None

    assert calls == 0
    assert slot.blocked is not None and "a" in slot.blocked
    assert h.sample("state_errors_total", agent="a", op="load") == 1
    assert h.store.raw("a") == raw
    assert h.runner.in_flight == 0


# -- admission --------------------------------------------------------------------------------


@pytest.mark.parametrize("preloaded", [True, False], ids=["state-loaded", "state-not-loaded-yet"])
async def test_paused_agent_is_skipped(h: Harness, preloaded: bool) -> None:
    """A paused agent's fire is skipped_paused and its code does not run."""
    await h.store.commit(AgentState(agent="a", paused=True))
    calls = 0

    async def agent(ctx: RunContext) -> None:
        nonlocal calls
        calls += 1

    slot = h.slot(agent)
    if preloaded:
        await h.runner.ensure_state(slot)
    record = await h.fire(slot)

    assert record.outcome is Outcome.SKIPPED_PAUSED
    assert (record.run_id, record.attempts, calls) == ("", 0, 0)
    assert h.sample("runs_total", agent="a", outcome="skipped_paused") == 1
    assert h.runner.in_flight == 0


async def test_fire_while_running_at_max_concurrent_is_skipped_overlap(h: Harness) -> None:
    """A fire while the agent already has max_concurrent runs in flight is skipped_overlap."""
    gate = Gate()
    slot = h.slot(gate.agent, max_concurrent=1)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            first = await fire_in(tg, h, slot)
            await gate.in_event.wait()
            assert slot.running == 1

            skipped = await h.fire(slot)
            gate.out_event.set()

    assert skipped.outcome is Outcome.SKIPPED_OVERLAP
    assert gate.entered == 1
    assert first[0] is not None and first[0].outcome is Outcome.SUCCESS
    assert h.sample("runs_total", agent="a", outcome="skipped_overlap") == 1
    assert slot.running == 0


async def test_open_circuit_skips_until_the_cooldown_then_lets_one_trial_through(
    h: Harness,
) -> None:
    """After N failures fires are skipped_circuit_open; after the cool-down one trial runs."""
    calls = 0
    fail = True

    async def agent(ctx: RunContext) -> None:
        nonlocal calls
        calls += 1
        if fail:
            raise ValueError("down")

    slot = h.slot(agent, circuit_failures=2, circuit_cooldown=60.0)
    assert [(await h.fire(slot)).outcome for _ in range(2)] == [Outcome.FAILURE] * 2
    assert (await h.fire(slot)).outcome is Outcome.SKIPPED_CIRCUIT_OPEN
    assert calls == 2

    h.clock.advance(59)
    assert (await h.fire(slot)).outcome is Outcome.SKIPPED_CIRCUIT_OPEN
    h.clock.advance(1)
    assert (await h.fire(slot)).outcome is Outcome.FAILURE  # the trial, which fails
    assert (await h.fire(slot)).outcome is Outcome.SKIPPED_CIRCUIT_OPEN  # only one trial
    assert calls == 3

    h.clock.advance(timedelta(seconds=60))
    fail = False
    assert (await h.fire(slot)).outcome is Outcome.SUCCESS  # the trial closes the circuit
    assert (await h.fire(slot)).outcome is Outcome.SUCCESS
    assert calls == 5
    assert h.sample("runs_total", agent="a", outcome="skipped_circuit_open") == 3
    assert h.sample("circuit_state", agent="a") == 0


async def test_breaker_snapshot_is_persisted_with_the_committed_state(h: Harness) -> None:
    """The state committed after the failure that opens the circuit records it as open."""

    async def agent(ctx: RunContext) -> None:
        raise ValueError("down")

    slot = h.slot(agent, circuit_failures=2, circuit_cooldown=60.0)
    await h.fire(slot)
    assert (await h.store.load("a")).breaker.state == "closed"
    await h.fire(slot)

    breaker = (await h.store.load("a")).breaker
    assert breaker.state == "open"
    assert breaker.consecutive_failures == 2
    assert breaker.opened_at == h.clock.now()
    assert h.sample("circuit_state", agent="a") == 2


async def test_internal_error_in_fire_is_logged_and_does_not_propagate(h: Harness) -> None:
    """A supervisor bug inside fire is logged as run.internal_error; fire returns None."""

    async def agent(ctx: RunContext) -> None:
        pass

    slot = h.slot(agent)
    h.store.fail_next_commit(RuntimeError("a bug, not a StateError"))
    with capture_logs() as logs:
        assert await h.runner.fire(slot, None) is None

    errors = [e for e in logs if e["event"] == "run.internal_error"]
    assert len(errors) == 1 and errors[0]["agent"] == "a"
    assert (slot.running, h.runner.in_flight) == (0, 0)
    assert h.sample("runs_in_flight") == 0
    assert h.sample("agent_running", agent="a") == 0


async def test_global_limiter_bounds_concurrent_runs() -> None:
    """With max_concurrent=2, a third admitted fire waits for a slot before its code runs."""
    h = Harness(max_concurrent=2)
    gate = Gate()
    slots = [h.slot(gate.agent, name=f"agent-{i}") for i in range(3)]
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            outs = [await fire_in(tg, h, s) for s in slots]
            await anyio.wait_all_tasks_blocked()

            assert gate.entered == 2
            assert h.runner.in_flight == 3
            assert [s.running for s in slots] == [1, 1, 1]
            assert h.runner.limiter.borrowed_tokens == 2
            assert h.runner.limiter.statistics().tasks_waiting == 1
            assert h.sample("runs_in_flight") == 2
            gate.out_event.set()
        await h.runner.wait_idle()

    assert gate.entered == 3
    assert [o[0].outcome for o in outs if o[0] is not None] == [Outcome.SUCCESS] * 3
    assert h.runner.in_flight == 0
    assert h.runner.limiter.borrowed_tokens == 0


async def test_removed_agent_series_do_not_come_back_after_its_run(h: Harness) -> None:
    """forget_agent during a run: the run ends, then the agent's series are gone for good."""
    gate = Gate()
    slot = h.slot(gate.agent)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await fire_in(tg, h, slot)
            await gate.in_event.wait()
            h.metrics.forget_agent("a")
            gate.out_event.set()

    assert h.sample("runs_total", agent="a", outcome="success") is None
    assert h.sample("circuit_state", agent="a") is None
    assert h.sample("runs_in_flight") == 0


# -- bookkeeping ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("late_by", "expected"),
    [(2.5, 2.5), (None, 0.0)],
    ids=["scheduled-fire", "manual-trigger"],
)
async def test_lag_is_measured_from_the_planned_time(
    h: Harness, late_by: float | None, expected: float
) -> None:
    """lag_s is started_at - planned_at on the clock; a manual trigger has no lag."""

    async def agent(ctx: RunContext) -> None:
        pass

    planned = None if late_by is None else h.clock.now() - timedelta(seconds=late_by)
    record = await h.fire(h.slot(agent), planned_at=planned)

    assert record.lag_s == expected
    assert record.planned_at == planned
    assert (await h.store.load("a")).last_planned_fire == planned


async def test_skipped_fire_lag_is_measured_too(h: Harness) -> None:
    """A skipped fire's record carries the lag from its planned time as well."""
    await h.store.commit(AgentState(agent="a", paused=True))

    async def agent(ctx: RunContext) -> None:
        pass

    slot = h.slot(agent)
    await h.runner.ensure_state(slot)
    record = await h.fire(slot, planned_at=h.clock.now() - timedelta(seconds=4))

    assert record.outcome is Outcome.SKIPPED_PAUSED
    assert record.lag_s == 4.0


async def test_run_ids_are_unique_and_time_ordered(h: Harness) -> None:
    """Run ids are unique, and their millisecond prefix follows the wall clock."""

    async def agent(ctx: RunContext) -> str:
        return ctx.run_id

    slot = h.slot(agent)
    before = int(time.time() * 1000)
    ids = [(await h.fire(slot)).run_id for _ in range(50)]
    after = int(time.time() * 1000)

    assert len(set(ids)) == 50
    assert all(re.fullmatch(r"[0-9a-f]+-[0-9a-f]{8}", i) for i in ids)
    stamps = [int(i.split("-")[0], 16) for i in ids]
    assert stamps == sorted(stamps)
    assert before <= stamps[0] and stamps[-1] <= after
    prefixes = [i.split("-")[0] for i in ids]
    assert prefixes == sorted(prefixes)  # the text sorts by time too


async def test_agent_calling_sys_exit_is_a_failed_run_not_a_dead_daemon() -> None:
    """SystemExit raised by agent code ends that run as a failure; nothing propagates."""

    async def quitter(ctx: RunContext) -> None:
        ctx.step("quit")
        raise SystemExit(3)

    record, _ = await run_agent(quitter)
    assert record.outcome is Outcome.FAILURE
    assert "SystemExit" in (record.error or "")


async def test_result_is_kept_in_last_run_and_bounded() -> None:
    """A small result is stored in last_run.result; a huge one is replaced by a size note."""

    async def small(ctx: RunContext) -> dict[str, int]:
        return {"n": 1}

    async def huge(ctx: RunContext) -> str:
        return "x" * 10_000

    _, state = await run_agent(small)
    assert state.last_run is not None and state.last_run.result == {"n": 1}
    _, state = await run_agent(huge)
    assert state.last_run is not None and "omitted" in state.last_run.result
