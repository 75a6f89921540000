"""Budgets and Retry-After under concurrency, against the real fake LLM server on loopback.

Hundreds of ``ctx.llm.complete`` calls from several agents race for a global budget that fits
only some of them; the server's own request log proves that refused calls sent nothing and
that nobody called a provider before the Retry-After deadline it set.

The budget race runs on both ledgers (``budget_kind``): the store's (``BudgetLedger`` in a
``JsonFileStore``) and ``PgBudgetLedger`` in a fresh PostgreSQL schema.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import pytest
from prometheus_client import CollectorRegistry

from supervisor.clock import Clock, SystemClock
from supervisor.config import AgentConfig, ScheduleConfig
from supervisor.context import RunContext
from supervisor.errors import BudgetExceeded
from supervisor.guards.steps import StepCounter
from supervisor.llm.base import Message
from supervisor.llm.budget import DOC_NAME
from supervisor.llm.client import LLMService
from supervisor.llm.config import LLMConfig
from supervisor.llm.fakeserver import FakeLLMServer, Fault
from supervisor.llm.prices import Price
from supervisor.llm.tokens import estimate_tokens
from supervisor.logging import get_logger
from supervisor.metrics import Metrics
from supervisor.state import JsonFileStore
from supervisor.testing import FakeClock
from tests.llm.budget_ledgers import Ledgers

PRICE = Price(input=1.0, output=2.0)  # USD per 1M tokens
MAX_TOKENS = 100
PROMPT = [Message("user", "summarise post #000 " + "x" * 380)]
ESTIMATE = estimate_tokens(PROMPT)
WORST = PRICE.worst_case(ESTIMATE, MAX_TOKENS)  # $0.000307 per call
LIMIT = 0.01  # fits 32 worst cases
AGENTS, CALLS_EACH = 8, 30  # 240 calls in flight at once


def config(srv: FakeLLMServer, **top: Any) -> LLMConfig:
    price = {"input": PRICE.input, "output": PRICE.output}
    return LLMConfig.model_validate(
        {
            "providers": {
                "p1": {
                    "base_url": srv.openai_base_url,
                    "max_connections": 64,
                    "retry": {"attempts": 3, "base_delay": 0.01, "max_delay": 0.05, "max_wait": 5},
                }
            },
            "models": {"p1/m1": {"price": price}, "p1/m1b": {"price": price}},
            "aliases": {"fast": ["p1/m1"], "other": ["p1/m1b"]},
            **top,
        }
    )


def context(service: LLMService, agent: str, clock: Clock) -> RunContext:
    return RunContext(
        agent=agent,
        run_id=f"run-{agent}",
        state={},
        steps=StepCounter(None),
        clock=clock,
        log=get_logger(),
        services={"llm": service},
        config=AgentConfig(name=agent, run="m:f", schedule=ScheduleConfig(every=3600)),
    )


class Opened(NamedTuple):
    service: LLMService
    store: JsonFileStore

    async def close(self) -> None:
        await self.service.aclose()
        await self.store.close()


async def open_service(
    srv: FakeLLMServer,
    directory: Path,
    clock: Clock,
    registry: CollectorRegistry,
    ledgers: Ledgers | None = None,
    **top: Any,
) -> Opened:
    """An ``LLMService`` over a ``JsonFileStore`` in ``directory``, started; its budget ledger
    is the store's, or a new ``PgBudgetLedger`` when ``ledgers`` is of the postgresql kind."""
    store = JsonFileStore(directory)
    await store.open()
    cfg = config(srv, **top)
    budget = None
    if ledgers is not None and ledgers.is_pg:
        budget = await ledgers.build(clock, **dict(cfg.budgets))
    service = LLMService(
        cfg,
        {},
        store=store,
        clock=clock,
        metrics=Metrics(registry),
        rng=random.Random(3),
        budget=budget,
    )
    await service.start()
    return Opened(service, store)


@pytest.fixture
async def budget_service(
    fake_llm: FakeLLMServer, tmp_path: Path, ledgers: Ledgers
) -> AsyncIterator[tuple[Opened, FakeClock, CollectorRegistry]]:
    """A service with a global day limit of ``LIMIT``, on each budget ledger kind."""
    clock, registry = FakeClock(), CollectorRegistry()
    opened = await open_service(
        fake_llm,
        tmp_path / "state",
        clock,
        registry,
        ledgers,
        budgets={"global_day": {"usd": LIMIT}},
    )
    yield opened, clock, registry
    await opened.close()  # a second close (after the restart below) only flushes again


def global_day(service: LLMService) -> Any:
    (window,) = [w for w in service.ledger.snapshot() if w.name == "global_day"]
    return window


@pytest.mark.parametrize("usage", ["worst_case", "reported"])
async def test_concurrent_calls_never_overshoot_a_global_budget(
    fake_llm: FakeLLMServer,
    tmp_path: Path,
    budget_service: tuple[Opened, FakeClock, CollectorRegistry],
    ledgers: Ledgers,
    usage: str,
) -> None:
    """240 concurrent calls from 8 agents at a budget that fits some: settled spend stays
    within the limit, every refused call raised BudgetExceeded and sent no request, and a
    restarted service keeps the day's spend and refuses the next call."""
    opened, clock, registry = budget_service
    service = opened.service
    if usage == "worst_case":
        # Every call costs exactly its reservation: exactly floor(LIMIT / WORST) fit.
        fake_llm.usage_override("m1", input_tokens=ESTIMATE, output_tokens=MAX_TOKENS)
    granted: list[float] = []
    refused: list[BudgetExceeded] = []

    async def call(ctx: RunContext) -> None:
        try:
            result = await ctx.llm.complete("fast", PROMPT, max_tokens=MAX_TOKENS)
        except BudgetExceeded as exc:
            refused.append(exc)
        else:
            granted.append(result.cost_usd)

    contexts = [context(service, f"agent-{i}", clock) for i in range(AGENTS)]
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(CALLS_EACH):
                for ctx in contexts:
                    tg.start_soon(call, ctx)

    assert len(granted) + len(refused) == AGENTS * CALLS_EACH
    assert refused and granted
    if usage == "worst_case":
        assert len(granted) == math.floor(LIMIT / WORST) == 32
    # The server's own count: a refused call sent nothing.
    assert fake_llm.count() == len(granted)
    assert all(exc.limit == LIMIT and exc.observed > LIMIT for exc in refused)
    await ledgers.refresh(service.ledger)  # PgBudgetLedger: read the rows as they are now
    day = global_day(service)
    assert day.reserved_usd == 0
    assert day.spent_usd == pytest.approx(sum(granted))
    assert day.spent_usd <= LIMIT
    refusals = sum(
        registry.get_sample_value(
            "agent_supervisor_llm_refused_total", {"agent": ctx.agent, "reason": "budget"}
        )
        or 0
        for ctx in contexts
    )
    assert refusals == len(refused)

    # Restart: a new service on the same state dir keeps the day's spend.
    spent = day.spent_usd
    await opened.close()
    registry2 = CollectorRegistry()
    again, store2 = await open_service(
        fake_llm,
        tmp_path / "state",
        clock,
        registry2,
        ledgers,
        budgets={"global_day": {"usd": LIMIT}},
    )
    try:
        assert global_day(again).spent_usd == pytest.approx(spent)
        gauge = registry2.get_sample_value(
            "agent_supervisor_llm_budget_spent_usd", {"window": "global_day"}
        )
        assert gauge == pytest.approx(spent)
        with anyio.fail_after(10), pytest.raises(BudgetExceeded):
            # Big enough not to fit whatever is left, however the race above settled.
            await context(again, "agent-0", clock).llm.complete(
                "fast", PROMPT, max_tokens=math.ceil(LIMIT / PRICE.output * 1e6)
            )
        assert fake_llm.count() == len(granted)
    finally:
        await Opened(again, store2).close()
    if not ledgers.is_pg:  # the store ledger's document
        assert (tmp_path / "state" / f"_{DOC_NAME}.json").is_file()


async def test_retry_after_holds_every_agent_until_the_deadline(
    fake_llm: FakeLLMServer, tmp_path: Path
) -> None:
    """Real clock: a 429 with Retry-After: 1 to agent A holds agent B, who calls another
    model of the same provider 0.1 s later: no request reaches the server before the deadline."""
    clock = SystemClock()
    opened = await open_service(fake_llm, tmp_path / "state", clock, CollectorRegistry())
    service = opened.service
    fake_llm.enqueue(Fault.status(429, retry_after=1), model="m1")
    a, b = context(service, "agent-a", clock), context(service, "agent-b", clock)
    b_started: list[float] = []

    async def agent_b() -> None:
        b_started.append(time.monotonic())
        await b.llm.complete("other", PROMPT, max_tokens=MAX_TOKENS)

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.llm.complete, "fast", PROMPT)
                await anyio.to_thread.run_sync(fake_llm.wait_for_requests, 1, 5.0)
                await anyio.sleep(0.1)
                tg.start_soon(agent_b)
    finally:
        await opened.close()

    first, *later = fake_llm.requests
    deadline = first.time + 1.0
    assert first.body["model"] == "m1"
    assert sorted(r.body["model"] for r in later) == ["m1", "m1b"]
    assert b_started[0] < deadline - 0.5  # B really did call while the deadline was ahead
    assert all(r.time >= deadline for r in later), [round(r.time - first.time, 3) for r in later]
