"""Fixtures for the effects layer: both ledgers, restarts, a run context, a fake target."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from supervisor.context import RunContext
from supervisor.effects import (
    AgentEffectsConfig,
    ApprovalRequest,
    EffectLedger,
    EffectsConfig,
    EffectsService,
    JsonlLedger,
    MemoryLedger,
)
from supervisor.errors import TransientError
from supervisor.guards.steps import StepCounter
from supervisor.testing import FakeClock
from tests.cluster.pg import drop_schema, new_schema, require_postgres


class Ledgers:
    """Builds a ledger of one kind in a fixed place, and rebuilds it there after a 'crash'.

    The place is a directory (jsonl), a ``MemoryDisk`` (memory) or a PostgreSQL schema of
    the test's own (postgresql; every rebuild is the same node restarting).
    """

    def __init__(
        self, kind: str, directory: Path, clock: FakeClock, schema: str | None = None
    ) -> None:
        self.kind = kind
        self.directory = directory
        self.clock = clock
        self.schema = schema
        self.current: EffectLedger | None = None
        #: every ledger built, so that the fixture can release their connections
        self.built: list[EffectLedger] = []

    def build(self, **options: Any) -> EffectLedger:
        """A fresh, unopened ledger on the same durable place as every earlier one."""
        if self.kind == "memory":
            if isinstance(self.current, MemoryLedger):
                self.current = self.current.restarted()
            else:
                self.current = MemoryLedger(clock=self.clock)
        elif self.kind == "postgresql":
            from supervisor.effects.ledger.postgres import PostgresLedger

            assert self.schema is not None
            self.current = PostgresLedger(
                require_postgres(), node="node-1", clock=self.clock, schema=self.schema
            )
        else:
            self.current = JsonlLedger(self.directory, clock=self.clock, **options)
        self.built.append(self.current)
        return self.current

    async def open(self, **options: Any) -> EffectLedger:
        """``build()`` then ``open()``: what a (re)started daemon does."""
        ledger = self.build(**options)
        await ledger.open()
        return ledger


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock starting 2026-01-01 UTC."""
    return FakeClock()


@pytest.fixture(params=["memory", "jsonl", "postgresql"])
async def ledgers(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[Ledgers]:
    """Each ledger kind in turn, with crash/restart support (postgresql: skipped when the
    server is unreachable, failed under CI=true)."""
    if request.param != "postgresql":
        yield Ledgers(request.param, tmp_path / "effects", clock)
        return
    require_postgres()
    made = Ledgers(request.param, tmp_path / "effects", clock, schema=new_schema())
    try:
        yield made
    finally:
        for ledger in made.built:  # a "crashed" ledger still holds its pool
            await ledger.close()
        drop_schema(made.schema)


@dataclass
class Notifications:
    """A notifier that keeps what it was sent."""

    sent: list[ApprovalRequest] = field(default_factory=list)

    async def __call__(self, request: ApprovalRequest) -> None:
        self.sent.append(request)


class Harness:
    """A service on a ledger, and restarts of both, as the daemon would do them."""

    def __init__(
        self, ledgers: Ledgers, clock: FakeClock, config: EffectsConfig | None = None
    ) -> None:
        self.ledgers = ledgers
        self.clock = clock
        self.config = config or EffectsConfig()
        self.notifications = Notifications()
        self.service: EffectsService | None = None

    async def start(self) -> EffectsService:
        """Open a ledger (replaying what is durable) and a new service on it."""
        ledger = await self.ledgers.open()
        self.service = EffectsService(
            ledger, self.clock, config=self.config, notifier=self.notifications
        )
        return self.service

    async def restart(self) -> EffectsService:
        """Drop the in-memory service and ledger, as a crash does, and start again."""
        return await self.start()

    def ctx(
        self,
        agent: str = "publisher",
        run_id: str = "run-1",
        effects: AgentEffectsConfig | None = None,
    ) -> RunContext:
        """A run context whose ``ctx.effect`` goes to the current service."""
        assert self.service is not None
        return make_ctx(self.service, self.clock, agent=agent, run_id=run_id, effects=effects)


def make_ctx(
    service: EffectsService,
    clock: FakeClock,
    *,
    agent: str = "publisher",
    run_id: str = "run-1",
    effects: AgentEffectsConfig | None = None,
) -> RunContext:
    """A ``RunContext`` with only the effects service plugged in."""
    return RunContext(
        agent=agent,
        run_id=run_id,
        state={},
        steps=StepCounter(None),
        clock=clock,
        log=None,
        services={"effects": service},
        config=SimpleNamespace(effects=effects),
    )


@pytest.fixture
async def harness(ledgers: Ledgers, clock: FakeClock) -> AsyncIterator[Harness]:
    """A started harness on each ledger kind."""
    h = Harness(ledgers, clock)
    await h.start()
    yield h
    if ledgers.current is not None:
        await ledgers.current.close()


class FakeTarget:
    """A platform that records every post it receives, and can fail after receiving one."""

    def __init__(self) -> None:
        #: (idempotency key, body) of every post received, duplicates included
        self.received: list[tuple[str, str]] = []
        #: the next this many posts are received, then the connection "resets"
        self.fail_after_receiving = 0
        #: the next this many posts fail before anything is sent (EffectNotStarted-able)
        self.down = 0

    async def post(self, body: str, idempotency_key: str) -> dict[str, Any]:
        """Receive a post; may raise a transient error AFTER having received it."""
        if self.down:
            self.down -= 1
            raise ConnectionRefusedError("platform down: nothing was sent")
        self.received.append((idempotency_key, body))
        if self.fail_after_receiving:
            self.fail_after_receiving -= 1
            raise TransientError("connection reset after the post was sent")
        return {"id": len(self.received), "body": body}

    def count(self, body: str) -> int:
        """How many times ``body`` was received."""
        return sum(1 for _, b in self.received if b == body)

    async def lookup(self, body: str) -> dict[str, Any] | bool:
        """Reconcile: the post as stored by the platform, or False when it has none."""
        for i, (_, b) in enumerate(self.received, start=1):
            if b == body:
                return {"id": i, "body": b}
        return False


@pytest.fixture
def target() -> FakeTarget:
    """A fresh fake platform."""
    return FakeTarget()
