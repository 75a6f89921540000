"""Test helpers shipped with the package, for our own tests and for agent authors.

``FakeClock`` replaces the real clock: time moves only when a test advances it or when code
sleeps on it (the sleep returns at once and moves the clock, like trio's autojump clock), so
retry backoff, breaker cool-downs and budget windows are tested without real sleeps.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio.lowlevel
from prometheus_client import CollectorRegistry

from supervisor.clock import Clock, Duration, seconds
from supervisor.outcome import RunRecord
from supervisor.state.base import AgentState, StateStore
from supervisor.state.memory import MemoryStore

__all__ = ["FakeClock", "MemoryStore", "run_agent"]


class FakeClock:
    """A clock that moves only when told to, or when something sleeps on it."""

    def __init__(self, start: datetime | None = None) -> None:
        self._start = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._offset = 0.0
        #: every delay passed to ``sleep``, in order
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._offset)

    def monotonic(self) -> float:
        return 1000.0 + self._offset

    def advance(self, delay: Duration) -> None:
        """Move time forward by ``delay``."""
        step = seconds(delay)
        if step < 0:
            raise ValueError("a clock cannot go backwards")
        self._offset += step

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.advance(max(0.0, delay))
        await anyio.lowlevel.checkpoint()


async def run_agent(
    fn: Callable[..., Awaitable[Any]],
    params: Any = None,
    *,
    name: str = "agent-under-test",
    state: dict[str, Any] | None = None,
    store: StateStore | None = None,
    clock: Clock | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109 - the run deadline guard under test, not a wait
    max_steps: int = 200,
    retry_attempts: int = 1,
    services: dict[str, Any] | None = None,
    agent_config: dict[str, Any] | None = None,
) -> tuple[RunRecord, AgentState]:
    """Run one agent function once under the real runner and guards, in memory.

    Returns the run record and the committed state. ``state`` seeds the agent's data;
    ``store`` defaults to a fresh ``MemoryStore`` and ``clock`` to a ``FakeClock`` (so retry
    backoff does not sleep). ``agent_config`` sets keys of the agent's config entry as in YAML
    (``{"http": {"allow_hosts": ["api.example.com"]}}``). The timeout is a real deadline
    (anyio cancel scopes follow the event loop's clock). For agent authors' tests as much as ours::

        record, state = await run_agent(my_agent, MyParams(url="..."))
        assert record.outcome is Outcome.SUCCESS
    """
    from supervisor.config import AgentConfig, AgentSpec, ResolvedGuards
    from supervisor.guards.breaker import CircuitBreaker
    from supervisor.guards.retry import RetryPolicy
    from supervisor.metrics import Metrics
    from supervisor.runner import AgentSlot, Runner

    clock = clock or FakeClock()
    store = store or MemoryStore()
    await store.open()
    if state is not None:
        seeded = await store.load(name)
        seeded.data = dict(state)
        await store.commit(seeded)
    guards = ResolvedGuards(
        timeout=timeout,
        cleanup_grace=1.0,
        max_steps=max_steps,
        retry=RetryPolicy(max_attempts=retry_attempts, base_delay=1.0, max_delay=60.0),
        transient=(),
        circuit_failures=0,
        circuit_cooldown=60.0,
    )
    config = AgentConfig.model_validate(
        {
            "name": name,
            "run": f"{fn.__module__}:{fn.__name__}",
            "schedule": {"every": 3600},
            **(agent_config or {}),
        }
    )
    takes_params = len(inspect.signature(fn).parameters) >= 2
    spec = AgentSpec(config, fn, params, guards, None, takes_params)
    runner = Runner(
        store=store,
        metrics=Metrics(CollectorRegistry()),
        clock=clock,
        services=services,
    )
    slot = AgentSlot(spec, CircuitBreaker(0, 60.0, clock))
    record = await runner.fire(slot, None, trigger="test")
    if record is None:
        raise RuntimeError(f"agent {name!r} could not run: {slot.blocked}")
    return record, await store.load(name)
