"""``ctx.llm.complete`` against the real fake LLM server on loopback: one test per behaviour.

Every test talks HTTP to ``FakeLLMServer`` (marked integration by the conftest). Time that the
client waits on (backoff, Retry-After, rate limits, breaker cool-downs) is a ``FakeClock``, so
nothing sleeps for real except the read-timeout tests, which use a short real timeout.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import structlog
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from supervisor.config import AgentConfig, ScheduleConfig
from supervisor.context import RunContext
from supervisor.errors import BudgetExceeded, CallRefused, LadderExhausted, MaxStepsExceeded
from supervisor.guards.steps import StepCounter
from supervisor.llm.base import Message, Usage
from supervisor.llm.client import TIER_RAW, TIER_RULE_BASED, LLMResult, LLMService
from supervisor.llm.config import AgentLLMConfig, LimitConfig, LLMConfig
from supervisor.llm.fakeserver import ANTHROPIC_PATH, OPENAI_PATH, FakeLLMServer, Fault
from supervisor.llm.prices import Price
from supervisor.llm.tokens import estimate_tokens
from supervisor.logging import configure_logging, get_logger
from supervisor.metrics import Metrics
from supervisor.outcome import Outcome
from supervisor.testing import FakeClock, MemoryStore, run_agent

#: an API key no redaction pattern would catch by its shape: only knowing the key hides it
KEY = "Kq7-distinctive-llm-key-5521"
SECRET_NAME = "llm_key"
PRICE = Price(input=1.0, output=2.0)  # USD per 1M tokens, for both models
WAIT = 10.0  # the bound on any one call in these tests

WIRES = [("p1", "m1", False), ("p1", "m1", True), ("p2", "m2", False), ("p2", "m2", True)]
WIRE_IDS = ["openai-json", "openai-sse", "anthropic-json", "anthropic-sse"]


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def llm_config(srv: FakeLLMServer, **overrides: Any) -> LLMConfig:
    """Two providers on the fake server: ``p1`` (OpenAI wire, ``m1``) and ``p2`` (Anthropic
    wire, ``m2``); alias ``fast`` = [p1/m1, p2/m2], ``solo`` = [p1/m1]. ``overrides`` are
    merged in depth (``providers={"p1": {"rpm": 1}}`` changes one key)."""
    provider = {
        "api_key": {"secret": SECRET_NAME},
        "timeouts": {"connect": 2, "read": 5, "write": 2, "pool": 2},
        "retry": {"attempts": 3, "base_delay": 0.5, "max_delay": 5, "max_wait": 60},
        "circuit": {"failures": 5, "cooldown": 30},
    }
    price = {"input": PRICE.input, "output": PRICE.output}
    base: dict[str, Any] = {
        "providers": {
            "p1": {**provider, "kind": "openai", "base_url": srv.openai_base_url},
            "p2": {**provider, "kind": "anthropic", "base_url": srv.anthropic_base_url},
        },
        "models": {"p1/m1": {"price": price}, "p2/m2": {"price": price}},
        "aliases": {"fast": ["p1/m1", "p2/m2"], "solo": ["p1/m1"]},
        "default_max_tokens": 256,
    }
    return LLMConfig.model_validate(_merge(base, overrides))


@dataclass
class Harness:
    """One ``LLMService`` on the fake server, with its clock, store and metrics registry."""

    srv: FakeLLMServer
    service: LLMService
    clock: FakeClock
    registry: CollectorRegistry

    def ctx(
        self,
        agent: str = "agent-a",
        run_id: str = "run-1",
        *,
        max_steps: int | None = None,
        llm: AgentLLMConfig | None = None,
    ) -> RunContext:
        """A run context as the runner builds it, with ``ctx.llm`` bound to the service."""
        config = AgentConfig(
            name=agent,
            run="tests.llm.test_client:unused",
            schedule=ScheduleConfig(every=3600),
            llm=llm or AgentLLMConfig(),
        )
        return RunContext(
            agent=agent,
            run_id=run_id,
            state={},
            steps=StepCounter(max_steps),
            clock=self.clock,
            log=get_logger(),
            services={"llm": self.service},
            config=config,
        )

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value("agent_supervisor_" + name, labels)
        return 0.0 if value is None else value

    def attempts(self, status: str, provider: str = "p1", model: str = "m1") -> float:
        """``llm_requests_total`` of agent-a for one provider/model and status."""
        labels = {"agent": "agent-a", "provider": provider, "model": model, "status": status}
        return self.sample("llm_requests_total", **labels)

    def spent(self) -> float:
        """Settled USD in the global day window."""
        (day,) = [w for w in self.service.ledger.snapshot() if w.name == "global_day"]
        assert day.reserved_usd == 0
        return day.spent_usd


Make = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make(fake_llm: FakeLLMServer, tmp_path: Path) -> AsyncIterator[Make]:
    """Build a ``Harness`` from config overrides; every service is closed afterwards."""
    made: list[Harness] = []

    async def build(**overrides: Any) -> Harness:
        clock = FakeClock()
        registry = CollectorRegistry()
        store = MemoryStore()
        await store.open()
        service = LLMService(
            llm_config(fake_llm, **overrides),
            {SECRET_NAME: KEY},
            store=store,
            clock=clock,
            metrics=Metrics(registry),
            state_dir=tmp_path / "state",
            rng=random.Random(7),
        )
        await service.start()
        harness = Harness(fake_llm, service, clock, registry)
        made.append(harness)
        return harness

    yield build
    for harness in made:
        await harness.service.aclose()


@pytest.fixture
def logs() -> Iterator[io.BytesIO]:
    """Log lines go to a byte stream; the logging config is restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    out = io.BytesIO()
    configure_logging(stream=out)
    yield out
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def log_lines(out: io.BytesIO, event: str | None = None) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in out.getvalue().splitlines() if line]
    return [line for line in lines if event is None or line.get("event") == event]


def user(text: str = "hello there") -> list[dict[str, str]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


def conversation(turns: int, size: int = 400) -> list[Message]:
    """A system prompt, then ``turns`` alternating user/assistant messages ending with a user
    message; each turn is ``size`` characters (about ``size / 4`` tokens)."""
    msgs = [Message("system", "you are terse")]
    for i in range(turns):
        role = "user" if (turns - i) % 2 == 1 else "assistant"
        msgs.append(Message(role, f"{i:03d}" + "x" * (size - 3)))
    return msgs


async def complete(ctx: RunContext, alias: str, messages: Sequence[Any], **kw: Any) -> LLMResult:
    with anyio.fail_after(WAIT):
        result: LLMResult = await ctx.llm.complete(alias, messages, **kw)
    return result


def bodies(srv: FakeLLMServer, model: str | None = None) -> list[dict[str, Any]]:
    return [
        r.body
        for r in srv.requests
        if model is None or (isinstance(r.body, dict) and r.body.get("model") == model)
    ]


class Verdict(BaseModel):
    label: str
    score: int


# -- the happy path ------------------------------------------------------------------------------


@pytest.mark.parametrize(("provider", "model", "stream"), WIRES, ids=WIRE_IDS)
async def test_happy_path_returns_text_usage_and_priced_cost(
    make: Make, provider: str, model: str, stream: bool
) -> None:
    """The first tier answers: text, the reported usage, cost = price.cost(usage), tier "0"."""
    h = await make(aliases={"one": [f"{provider}/{model}"]})
    result = await complete(h.ctx(), "one", user("what is two plus two"), stream=stream)

    assert result.text == "echo: what is two plus two"
    assert result.value == result.text
    assert (result.tier, result.provider, result.model) == ("0", provider, model)
    assert not result.degraded and result.hops == () and not result.cached
    prompt = math.ceil(len("be briefwhat is two plus two") / 4)
    assert result.usage == Usage(input_tokens=prompt, output_tokens=math.ceil(len(result.text) / 4))
    assert result.cost_usd == round(PRICE.cost(result.usage), 8) > 0
    assert h.spent() == pytest.approx(result.cost_usd)
    assert h.srv.count() == 1
    assert h.sample("llm_answers_total", agent="agent-a", alias="one", tier="0") == 1
    assert h.attempts("ok", provider, model) == 1


# -- transient errors are retried ---------------------------------------------------------------


@pytest.mark.parametrize(
    "retry_after", ["seconds", "http-date"], ids=["retry-after-seconds", "retry-after-date"]
)
async def test_429_with_retry_after_waits_that_long_then_succeeds(
    make: Make, retry_after: str
) -> None:
    """A 429 with Retry-After (seconds or HTTP-date) holds the next attempt until the deadline."""
    h = await make()
    value: float | str = 2
    if retry_after == "http-date":
        value = format_datetime(h.clock.now() + timedelta(seconds=3), usegmt=True)
    h.srv.enqueue(Fault.status(429, retry_after=value), model="m1")

    result = await complete(h.ctx(), "fast", user())

    assert result.tier == "0" and result.text == "echo: hello there"
    assert h.srv.count(model="m1") == 2
    waited = sum(h.clock.sleeps)  # the backoff, then the rest of the Retry-After on the gate
    assert waited == pytest.approx(2.0 if retry_after == "seconds" else 3.0)
    assert h.sample("llm_retries_total", provider="p1", model="m1") == 1
    assert h.attempts("http_429") == 1


@pytest.mark.parametrize("codes", [(500,), (503,), (500, 503)], ids=["500", "503", "500-503"])
async def test_server_errors_are_retried_then_succeed(make: Make, codes: tuple[int, ...]) -> None:
    """500 and 503 are transient: retried with backoff on the same tier, which then answers."""
    h = await make()
    h.srv.enqueue(*(Fault.status(c) for c in codes), model="m1")

    result = await complete(h.ctx(), "fast", user())

    assert result.tier == "0" and not result.degraded
    assert h.srv.count(model="m1") == len(codes) + 1
    assert h.srv.count(model="m2") == 0
    assert len(h.clock.sleeps) == len(codes)  # one backoff per retry, on the fake clock
    assert all(0 <= s <= 5 for s in h.clock.sleeps)
    assert h.sample("llm_retries_total", provider="p1", model="m1") == len(codes)
    # An error status means no answer was produced: it costs nothing.
    assert h.spent() == pytest.approx(result.cost_usd)


async def test_connection_reset_is_retried(make: Make) -> None:
    """A connection reset after the request was sent is retried, and its worst case charged."""
    h = await make()
    h.srv.enqueue(Fault.reset(), model="m1")
    msgs = user()

    result = await complete(h.ctx(), "fast", msgs, max_tokens=100)

    assert result.tier == "0"
    assert h.srv.count(model="m1") == 2
    worst = PRICE.worst_case(estimate_tokens([Message.coerce(m) for m in msgs]), 100)
    # The reset request may have been billed: its reservation stands as its cost.
    assert h.spent() == pytest.approx(worst + result.cost_usd)


async def test_stall_past_the_read_timeout_is_retried_once_with_a_smaller_context(
    make: Make,
) -> None:
    """A stall longer than the read timeout is a timeout; the retry sends a reduced context."""
    h = await make(
        providers={"p1": {"timeouts": {"read": 0.3}}},
        models={"p1/m1": {"context": 1400}},
    )
    h.srv.enqueue(Fault.stall(1.5), model="m1")
    msgs = conversation(11)  # ~1,150 tokens: fits 1,400 - 100, not the half after a timeout

    result = await complete(h.ctx(), "fast", msgs, max_tokens=100)

    assert result.tier == "0"
    first, second = bodies(h.srv, "m1")
    assert len(first["messages"]) == len(msgs)
    assert len(second["messages"]) < len(msgs)
    assert second["messages"][0] == {"role": "system", "content": "you are terse"}
    assert second["messages"][-1]["content"] == msgs[-1].content
    assert any("earlier messages omitted" in m["content"] for m in second["messages"])
    assert h.attempts("timeout") == 1


async def test_slow_body_within_the_read_timeout_succeeds(make: Make) -> None:
    """A body trickling in, each gap shorter than the read timeout, is a normal answer."""
    h = await make(providers={"p1": {"timeouts": {"read": 1.0}}})
    h.srv.enqueue(Fault.slow_body(0.05, chunks=6), model="m1")

    result = await complete(h.ctx(), "fast", user("slowly now"))

    assert (result.tier, result.text) == ("0", "echo: slowly now")
    assert h.srv.count() == 1


async def test_malformed_json_is_retried(make: Make) -> None:
    """A 200 whose body is not JSON is retried on the same tier."""
    h = await make()
    h.srv.enqueue(Fault.malformed(), model="m1")

    result = await complete(h.ctx(), "fast", user())

    assert result.tier == "0"
    assert h.srv.count(model="m1") == 2
    assert h.attempts("malformed") == 1


async def test_malformed_json_on_every_attempt_moves_to_the_next_tier(make: Make) -> None:
    """When every attempt gets malformed JSON, the next model of the alias answers."""
    h = await make()
    h.srv.enqueue(*[Fault.malformed()] * 3, model="m1")

    result = await complete(h.ctx(), "fast", user())

    assert (result.tier, result.model, result.degraded) == ("1", "m2", True)
    assert result.hops == (("p1/m1", "malformed"),)
    assert h.srv.count(model="m1") == 3


async def test_missing_usage_costs_the_reservation_and_is_flagged(
    make: Make, logs: io.BytesIO
) -> None:
    """No usage reported: the worst-case reservation stands as the cost; the log line says so."""
    h = await make()
    h.srv.enqueue(Fault.no_usage(), model="m1")
    msgs = user("count my tokens")

    result = await complete(h.ctx(), "fast", msgs, max_tokens=100)

    worst = PRICE.worst_case(estimate_tokens([Message.coerce(m) for m in msgs]), 100)
    assert result.usage is None
    assert result.cost_usd == pytest.approx(worst)
    assert h.spent() == pytest.approx(worst)
    (line,) = log_lines(logs, "llm.call")
    assert line["usage_missing"] is True
    assert line["status"] == "ok" and line["cost_usd"] == pytest.approx(worst)
    assert line["tokens_in"] is None


@pytest.mark.parametrize("code", [400, 401, 403, 404, 422])
async def test_permanent_error_goes_straight_to_the_next_tier(make: Make, code: int) -> None:
    """A 4xx other than 408/409/429 is never retried: one request, then the next tier."""
    h = await make()
    h.srv.enqueue(Fault.status(code), model="m1")

    result = await complete(h.ctx(), "fast", user())

    assert result.tier == "1" and result.hops == (("p1/m1", f"http_{code}"),)
    assert h.srv.count(model="m1") == 1
    assert h.clock.sleeps == []
    assert h.spent() == pytest.approx(result.cost_usd)  # the error itself cost nothing


# -- the degradation ladder -----------------------------------------------------------------------


async def test_first_provider_down_second_model_answers(make: Make, logs: io.BytesIO) -> None:
    """p1 keeps failing: the run succeeds on p2's model, tier "1", degraded, hop recorded."""
    h = await make()
    h.srv.script("m1", [Fault.status(503)] * 10)

    async def agent(ctx: RunContext) -> dict[str, Any]:
        result = await ctx.llm.complete("fast", user())
        return {"tier": result.tier, "model": result.model, "hops": result.hops}

    with anyio.fail_after(WAIT):
        record, _ = await run_agent(
            agent, name="ladder", clock=h.clock, services={"llm": h.service}
        )

    assert record.outcome is Outcome.SUCCESS
    assert record.result == {"tier": "1", "model": "m2", "hops": [["p1/m1", "http_503"]]}
    assert h.srv.count(model="m1") == 3 and h.srv.count(model="m2") == 1
    assert h.sample("llm_answers_total", agent="ladder", alias="fast", tier="1") == 1
    assert h.sample("llm_answers_total", agent="ladder", alias="fast", tier="0") == 0
    (hop,) = log_lines(logs, "llm.fallback")
    assert (hop["failed"], hop["reason"], hop["agent"]) == ("p1/m1", "http_503", "ladder")


@pytest.mark.parametrize("async_fallback", [False, True], ids=["sync", "async"])
async def test_both_down_gives_the_rule_based_answer(make: Make, async_fallback: bool) -> None:
    """Every model fails: the agent's fallback (sync or async) answers, tier rule_based."""
    h = await make()
    h.srv.script("m1", [Fault.status(500)] * 10)
    h.srv.script("m2", [Fault.status(500)] * 10)

    def rules() -> str:
        return "rule says: no"

    async def async_rules() -> str:
        return "rule says: no"

    result = await complete(
        h.ctx(), "fast", user(), fallback=async_rules if async_fallback else rules
    )

    assert (result.tier, result.value, result.text) == (TIER_RULE_BASED, "rule says: no", "")
    assert result.degraded and result.note
    assert result.hops == (("p1/m1", "http_500"), ("p2/m2", "http_500"))
    assert h.sample("llm_answers_total", agent="agent-a", alias="fast", tier="rule_based") == 1


async def test_without_fallback_degrade_to_returns_the_raw_input(make: Make) -> None:
    """No rule-based fallback: ``degrade_to`` comes back as the raw answer with a note."""
    h = await make()
    h.srv.script("m1", [Fault.status(500)] * 10)
    h.srv.script("m2", [Fault.status(500)] * 10)
    raw = {"posts": ["a", "b"]}

    result = await complete(h.ctx(), "fast", user(), degrade_to=raw)

    assert (result.tier, result.value, result.degraded) == (TIER_RAW, raw, True)
    assert result.note is not None and "degraded" in result.note
    assert h.sample("llm_answers_total", agent="agent-a", alias="fast", tier="raw") == 1


async def test_nothing_to_fall_back_on_raises_ladder_exhausted(make: Make) -> None:
    """No tier, no fallback, no raw data: ``LadderExhausted`` names every hop."""
    h = await make()
    h.srv.script("m1", [Fault.status(400)])
    h.srv.script("m2", [Fault.status(401)])

    with pytest.raises(LadderExhausted) as info:
        await complete(h.ctx(), "fast", user())

    assert info.value.hops == [("p1/m1", "http_400"), ("p2/m2", "http_401")]


# -- refused before any traffic -------------------------------------------------------------------


async def test_unpriced_model_is_refused_without_a_request(make: Make) -> None:
    """A model with no price is never called: the tier is refused and nothing is sent."""
    h = await make(aliases={"free": ["p1/unpriced-model-x"]})

    with pytest.raises(LadderExhausted) as info:
        await complete(h.ctx(), "free", user())

    assert info.value.hops == [("p1/unpriced-model-x", "unpriced")]
    assert h.srv.count() == 0
    assert h.sample("llm_refused_total", agent="agent-a", reason="unpriced") == 1


async def test_unpriced_model_is_called_when_allowed(make: Make) -> None:
    """With ``allow_unpriced`` the model is called and its cost counts as 0."""
    h = await make(aliases={"free": ["p1/unpriced-model-x"]}, allow_unpriced=True)

    result = await complete(h.ctx(), "free", user())

    assert (result.tier, result.cost_usd) == ("0", 0.0)
    assert h.srv.count() == 1


async def test_alias_not_allowed_for_the_agent_is_refused(make: Make) -> None:
    """An agent limited to some aliases cannot use another one; nothing is sent."""
    h = await make()
    ctx = h.ctx(llm=AgentLLMConfig(aliases=["solo"]))

    with pytest.raises(CallRefused) as info:
        await complete(ctx, "fast", user())

    assert info.value.reason == "alias_not_allowed"
    assert h.srv.count() == 0
    assert (await complete(ctx, "solo", user())).tier == "0"
    assert h.sample("llm_refused_total", agent="agent-a", reason="alias_not_allowed") == 1


async def test_unknown_alias_is_refused(make: Make) -> None:
    """An alias the config does not define is refused with ``unknown_alias``."""
    h = await make()

    with pytest.raises(CallRefused) as info:
        await complete(h.ctx(), "smrat", user())

    assert info.value.reason == "unknown_alias"
    assert h.srv.count() == 0


# -- breakers and rate limits ---------------------------------------------------------------------


async def test_circuit_opens_after_n_failures_and_the_ladder_skips_it(make: Make) -> None:
    """After N failures the model's circuit is open: skipped with no request until the
    cool-down ends, then one trial closes it again."""
    h = await make(providers={"p1": {"circuit": {"failures": 2}, "retry": {"attempts": 1}}})
    h.srv.script("m1", [Fault.status(500)] * 2)
    ctx = h.ctx()

    for _ in range(2):
        assert (await complete(ctx, "fast", user())).hops == (("p1/m1", "http_500"),)
    skipped = await complete(ctx, "fast", user())

    assert skipped.hops == (("p1/m1", "circuit_open"),) and skipped.tier == "1"
    assert h.srv.count(model="m1") == 2  # the open circuit sent nothing
    assert h.sample("llm_circuit_state", provider="p1", model="m1") == 2
    assert h.sample("llm_refused_total", agent="agent-a", reason="circuit_open") == 1

    h.clock.advance(31)  # past the cool-down: one trial, which succeeds and closes it
    trial = await complete(ctx, "fast", user())
    assert trial.tier == "0"
    assert h.srv.count(model="m1") == 3
    assert h.sample("llm_circuit_state", provider="p1", model="m1") == 0


async def test_trial_refused_by_the_budget_does_not_wedge_the_circuit(make: Make) -> None:
    """A half-open trial that ends before any request (budget refused) lets the next call try."""
    h = await make(providers={"p1": {"circuit": {"failures": 1}, "retry": {"attempts": 1}}})
    h.srv.script("m1", [Fault.status(500)])
    assert (await complete(h.ctx(), "solo", user(), fallback=lambda: "-")).tier == "rule_based"
    h.clock.advance(31)

    broke = h.ctx(run_id="run-broke", llm=AgentLLMConfig(per_run=LimitConfig(usd=0)))
    with pytest.raises(BudgetExceeded):
        await complete(broke, "solo", user())

    result = await complete(h.ctx(run_id="run-2"), "solo", user())
    assert result.tier == "0"
    assert h.srv.count(model="m1") == 2


@pytest.mark.parametrize(
    ("max_wait", "tier", "waited"), [(5, "1", 0.0), (120, "0", 60.0)], ids=["refuses", "waits"]
)
async def test_rate_limit_refuses_or_waits(
    make: Make, max_wait: float, tier: str, waited: float
) -> None:
    """rpm 1: the second call in the minute waits for the bucket, or fails over when the wait
    is longer than ``retry.max_wait``."""
    h = await make(providers={"p1": {"rpm": 1, "retry": {"max_wait": max_wait}}})
    ctx = h.ctx()
    assert (await complete(ctx, "fast", user())).tier == "0"

    second = await complete(ctx, "fast", user())

    assert second.tier == tier
    assert sum(h.clock.sleeps) == pytest.approx(waited)
    assert h.srv.count(model="m1") == (1 if tier == "1" else 2)
    if tier == "1":
        assert second.hops == (("p1/m1", "rate_limited"),)
        assert h.sample("llm_refused_total", agent="agent-a", reason="rate_limited") == 1


# -- structured output ---------------------------------------------------------------------------


async def test_schema_valid_answer_is_parsed(make: Make) -> None:
    """A valid JSON answer comes back as the schema's model; JSON mode was asked for."""
    h = await make()
    h.srv.reply("m1", '```json\n{"label": "spam", "score": 9}\n```')

    result = await complete(h.ctx(), "fast", user("classify"), schema=Verdict)

    assert result.value == Verdict(label="spam", score=9)
    assert bodies(h.srv)[0]["response_format"] == {"type": "json_object"}


async def test_schema_invalid_then_repaired_is_parsed(make: Make) -> None:
    """An invalid answer gets one repair request that quotes the validation error."""
    h = await make()

    def reply(body: dict[str, Any]) -> str:
        if "did not match" in body["messages"][-1]["content"]:
            return '{"label": "ham", "score": 1}'
        return '{"label": "ham"}'

    h.srv.reply("m1", reply)

    result = await complete(h.ctx(), "fast", user("classify"), schema=Verdict)

    assert result.value == Verdict(label="ham", score=1) and result.tier == "0"
    first, repair = bodies(h.srv, "m1")
    assert len(repair["messages"]) == len(first["messages"]) + 2
    assert repair["messages"][-2] == {"role": "assistant", "content": '{"label": "ham"}'}
    assert "score" in repair["messages"][-1]["content"]
    assert "Field required" in repair["messages"][-1]["content"]


async def test_schema_invalid_twice_moves_to_the_next_tier(make: Make) -> None:
    """Still invalid after the repair: the next model answers."""
    h = await make()
    h.srv.reply("m1", "not json at all")
    h.srv.reply("m2", '{"label": "ham", "score": 2}')

    result = await complete(h.ctx(), "fast", user("classify"), schema=Verdict)

    assert (result.tier, result.value) == ("1", Verdict(label="ham", score=2))
    assert result.hops == (("p1/m1", "invalid_output"),)
    assert h.srv.count(model="m1") == 2


# -- cache, context, request shape ----------------------------------------------------------------


async def test_cache_hit_sends_nothing_and_costs_nothing(make: Make) -> None:
    """A second identical call is served from the cache: no request, cost 0, counted."""
    h = await make(cache={"enabled": True})
    ctx = h.ctx()
    first = await complete(ctx, "fast", user("cache me"))
    spent = h.spent()

    second = await complete(ctx, "fast", user("cache me"))

    assert second.cached and second.cost_usd == 0 and second.text == first.text
    assert h.srv.count() == 1
    assert h.spent() == spent
    assert h.sample("llm_cache_requests_total", result="hit") == 1
    assert h.sample("llm_cache_requests_total", result="miss") == 1
    assert h.attempts("cache_hit") == 1


async def test_messages_that_do_not_fit_are_pruned_before_sending(make: Make) -> None:
    """A conversation longer than the model's context goes out with the middle dropped."""
    h = await make(models={"p1/m1": {"context": 700}})
    msgs = conversation(15)  # ~1,560 tokens

    result = await complete(h.ctx(), "fast", msgs, max_tokens=100)

    assert result.tier == "0"
    (sent,) = bodies(h.srv)
    out = sent["messages"]
    assert len(out) < len(msgs)
    assert out[0]["content"] == "you are terse" and out[-1]["content"] == msgs[-1].content
    assert any(m["content"].endswith("earlier messages omitted]") for m in out)
    assert estimate_tokens([Message.coerce(m) for m in out]) + 100 <= 700


@pytest.mark.parametrize(
    ("max_tokens", "max_output", "expected"),
    [(None, None, 256), (100, None, 100), (100, 50, 50), (None, 64, 64)],
    ids=["default", "given", "capped-by-model", "default-capped"],
)
@pytest.mark.parametrize("alias", ["m1", "m2"], ids=["openai", "anthropic"])
async def test_max_tokens_is_always_sent(
    make: Make, alias: str, max_tokens: int | None, max_output: int | None, expected: int
) -> None:
    """Every request carries max_tokens: the caller's, else the config default, capped by the
    model's ``max_output``."""
    ref = "p1/m1" if alias == "m1" else "p2/m2"
    h = await make(aliases={alias: [ref]}, models={ref: {"max_output": max_output}})

    await complete(h.ctx(), alias, user(), max_tokens=max_tokens)

    (sent,) = bodies(h.srv)
    assert sent["max_tokens"] == expected


@pytest.mark.parametrize("alias", ["m1", "m2"], ids=["openai", "anthropic"])
async def test_api_key_never_reaches_a_log_line(make: Make, logs: io.BytesIO, alias: str) -> None:
    """A 401 whose body and headers echo the key: the key is in no log line and no error."""
    ref, path = ("p1/m1", OPENAI_PATH) if alias == "m1" else ("p2/m2", ANTHROPIC_PATH)
    h = await make(aliases={alias: [ref]}, log_bodies=True)
    echo = orjson.dumps(
        {"error": {"message": f"Incorrect API key provided: {KEY}", "headers": {"key": KEY}}}
    ).decode()
    h.srv.enqueue(
        Fault.status(401, body=echo, headers={"www-authenticate": f"Bearer {KEY}"}),
        model=ref.partition("/")[2],
    )

    with pytest.raises(LadderExhausted) as info:
        await complete(h.ctx(), alias, user(f"my key is not {KEY[:6]}"))

    (request,) = h.srv.requests
    assert request.path == path
    assert KEY in (request.headers.get("authorization", "") + request.headers.get("x-api-key", ""))
    assert KEY not in str(info.value) and KEY not in repr(info.value)
    text = logs.getvalue().decode()
    assert log_lines(logs, "llm.call") and log_lines(logs, "llm.fallback")
    assert KEY not in text


async def test_every_attempt_counts_as_a_step(make: Make) -> None:
    """Retries are steps too: a run at its max-steps limit cannot retry past it."""
    h = await make()
    h.srv.enqueue(*[Fault.status(503)] * 2, model="m1")
    ctx = h.ctx(max_steps=2)

    with pytest.raises(MaxStepsExceeded):
        await complete(ctx, "fast", user())

    assert ctx.steps == 2
    assert h.srv.count() == 2


async def test_call_cancelled_mid_request_is_charged_its_worst_case(make: Make) -> None:
    """Cancelled while the provider works (run deadline, shutdown): no reservation is left
    behind, and the worst case is charged, as the provider may still bill the request."""
    h = await make()
    h.srv.enqueue(Fault.stall(2.0), model="m1")
    msgs = user()

    with anyio.fail_after(WAIT), anyio.move_on_after(0.3) as scope:
        await h.ctx().llm.complete("fast", msgs, max_tokens=100)

    assert scope.cancelled_caught
    assert h.service.ledger.outstanding == 0
    worst = PRICE.worst_case(estimate_tokens([Message.coerce(m) for m in msgs]), 100)
    assert h.spent() == pytest.approx(worst)


async def test_budget_gauges_follow_spend_at_most_every_second_and_at_run_end(
    make: Make,
) -> None:
    """The budget gauges are refreshed at most once a second while calls are made, and when
    a run that spent anything ends."""
    h = await make(budgets={"global_day": {"usd": 5}})
    ctx = h.ctx()

    def gauge() -> float:
        return h.sample("llm_budget_spent_usd", window="global_day")

    assert h.sample("llm_budget_limit_usd", window="global_day") == 5  # set at start
    h.clock.advance(1)
    first = await complete(ctx, "fast", user("one"))
    assert gauge() == pytest.approx(first.cost_usd)
    second = await complete(ctx, "fast", user("two"))  # within the same second: not yet
    assert gauge() == pytest.approx(first.cost_usd)

    h.service.end_run(ctx.run_id)
    assert gauge() == pytest.approx(first.cost_usd + second.cost_usd)
    h.clock.advance(1)
    third = await complete(h.ctx(run_id="run-2"), "fast", user("three"))
    assert gauge() == pytest.approx(first.cost_usd + second.cost_usd + third.cost_usd)
