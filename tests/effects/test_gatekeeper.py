"""The gatekeeper: least privilege, params before, rate limits, the output check after."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel, Field

from supervisor.effects import (
    AgentEffectsConfig,
    EffectInvalidRequest,
    EffectKindConfig,
    EffectNotAllowed,
    EffectParamsInvalid,
    EffectRateLimited,
    EffectRejected,
    EffectsConfig,
    EffectStatus,
    parse_rate,
)
from supervisor.testing import FakeClock
from tests.effects.conftest import FakeTarget, Harness, Ledgers


class Post(BaseModel):
    """What a post must look like."""

    text: str = Field(min_length=1, max_length=280)
    channel: str = Field(pattern=r"^#[a-z]+$")


def _post(target: FakeTarget, body: str = "hello") -> Any:
    """fn for ctx.effect: post ``body`` to ``target``."""
    return lambda ik: target.post(body, ik)


# -- least privilege --------------------------------------------------------------------------------


async def test_kind_outside_the_allow_list_is_refused_naming_agent_and_rule(
    harness: Harness, target: FakeTarget
) -> None:
    """An agent allowed only 'post' cannot 'delete': refused before anything, with the agent
    and the config rule in the message, counted under not_allowed."""
    ctx = harness.ctx(effects=AgentEffectsConfig(allow=("post",)))
    with pytest.raises(EffectNotAllowed) as err:
        await ctx.effect("delete", "d1", _post(target))
    assert "'publisher'" in str(err.value)
    assert "agents.publisher.effects.allow" in str(err.value)
    assert err.value.reason == "not_allowed" and err.value.allowed == ("post",)
    assert target.received == []
    assert harness.service is not None
    assert harness.service.stats["refused:not_allowed"] == 1
    await ctx.effect("post", "p1", _post(target))
    assert len(target.received) == 1


async def test_empty_allow_list_allows_nothing_and_none_allows_all(
    harness: Harness, target: FakeTarget
) -> None:
    """allow: [] refuses every kind; an omitted allow list permits any kind."""
    with pytest.raises(EffectNotAllowed, match="allowed: none"):
        await harness.ctx(effects=AgentEffectsConfig(allow=())).effect("post", "p1", _post(target))
    await harness.ctx(effects=AgentEffectsConfig()).effect("post", "p1", _post(target))
    assert len(target.received) == 1


@pytest.mark.parametrize(
    ("kind", "key"),
    [("", "k"), ("bad kind", "k"), ("post", ""), ("post", "k" * 1025)],
    ids=["empty-kind", "space-in-kind", "empty-key", "long-key"],
)
async def test_unrecordable_kind_or_key_is_refused(
    harness: Harness, target: FakeTarget, kind: str, key: str
) -> None:
    """A kind that is not a label-safe word, or an empty/over-long key, is refused."""
    with pytest.raises(EffectInvalidRequest):
        await harness.ctx().effect(kind, key, _post(target))
    assert target.received == []


# -- params before ----------------------------------------------------------------------------------


async def test_params_failing_the_model_are_refused(harness: Harness, target: FakeTarget) -> None:
    """Params that fail the pydantic model are refused (invalid_params); nothing recorded."""
    with pytest.raises(EffectParamsInvalid, match="params refused") as err:
        await harness.ctx().effect(
            "post",
            "p1",
            _post(target),
            params={"text": "", "channel": "general"},
            validate=Post,
        )
    assert err.value.reason == "invalid_params"
    assert target.received == []
    ledger = harness.ledgers.current
    assert ledger is not None and await ledger.get("publisher", "post", "p1") is None
    await harness.ctx().effect(
        "post",
        "p1",
        _post(target),
        params={"text": "hi", "channel": "#general"},
        validate=Post,
    )
    assert len(target.received) == 1


@pytest.mark.parametrize(
    "validate",
    [lambda p: False, lambda p: (_ for _ in ()).throw(ValueError("no links allowed"))],
    ids=["returns-false", "raises-valueerror"],
)
async def test_params_refused_by_a_callable(
    harness: Harness, target: FakeTarget, validate: Any
) -> None:
    """A validate callable refuses by returning False or raising ValueError."""
    with pytest.raises(EffectParamsInvalid):
        await harness.ctx().effect(
            "post", "p1", _post(target), params={"text": "x"}, validate=validate
        )
    assert target.received == []


# -- rate limits ------------------------------------------------------------------------------------


async def test_rate_limit_2_per_day_allows_exactly_2_across_a_restart(
    ledgers: Ledgers, clock: FakeClock, target: FakeTarget
) -> None:
    """With post: 2/day, two posts go through, a restart changes nothing, the third is
    refused with limit, observed and when room appears; a day later there is room again."""
    config = EffectsConfig(kinds={"post": EffectKindConfig(rate=parse_rate("2/day"))})
    harness = Harness(ledgers, clock, config)
    await harness.start()
    await harness.ctx().effect("post", "p1", _post(target, "one"))
    clock.advance(timedelta(hours=1))
    await harness.ctx().effect("post", "p2", _post(target, "two"))

    await harness.restart()
    clock.advance(timedelta(hours=1))
    with pytest.raises(EffectRateLimited) as err:
        await harness.ctx(run_id="run-2").effect("post", "p3", _post(target, "three"))
    assert (err.value.limit, err.value.observed, err.value.rule) == (2, 2, "2/day")
    assert err.value.retry_after == pytest.approx(22 * 3600)
    assert len(target.received) == 2

    clock.advance(timedelta(hours=22, seconds=1))
    await harness.ctx(run_id="run-3").effect("post", "p3", _post(target, "three"))
    assert len(target.received) == 3
    assert harness.service is not None and harness.service.stats["refused:rate_limited"] == 1


async def test_rate_limit_counts_unknown_outcomes_but_not_refusals(
    harness: Harness, target: FakeTarget
) -> None:
    """An unknown outcome may have reached the target, so it counts; a duplicate of a done
    key does not take another place."""
    assert harness.service is not None
    harness.service.config = EffectsConfig(
        kinds={"post": EffectKindConfig(rate=parse_rate("2/10min"))}
    )
    target.fail_after_receiving = 1
    with pytest.raises(Exception, match="connection reset"):
        await harness.ctx().effect("post", "p1", _post(target, "one"))
    await harness.ctx().effect("post", "p2", _post(target, "two"))
    await harness.ctx().effect("post", "p2", _post(target, "two"))  # duplicate
    with pytest.raises(EffectRateLimited):
        await harness.ctx().effect("post", "p3", _post(target, "three"))


async def test_agent_rule_overrides_the_top_level_rule_field_by_field(
    harness: Harness, target: FakeTarget
) -> None:
    """An agent's kinds.post.rate overrides the top-level rate; other agents keep theirs."""
    assert harness.service is not None
    harness.service.config = EffectsConfig(
        kinds={"post": EffectKindConfig(rate=parse_rate("5/day"))}
    )
    strict = AgentEffectsConfig(kinds={"post": EffectKindConfig(rate=parse_rate("1/day"))})
    await harness.ctx(effects=strict).effect("post", "p1", _post(target))
    with pytest.raises(EffectRateLimited, match="1/day"):
        await harness.ctx(effects=strict).effect("post", "p2", _post(target))
    await harness.ctx(agent="other").effect("post", "p2", _post(target))


# -- the output check after -------------------------------------------------------------------------


async def test_failed_output_check_runs_rollback_and_records_it(
    harness: Harness, target: FakeTarget
) -> None:
    """check_result fails -> rollback(result) runs -> rolled_back recorded -> EffectRejected
    (output_invalid); the key is consumed: a repeat call neither runs nor rolls back again."""
    rolled: list[Any] = []

    async def rollback(result: Any) -> None:
        rolled.append(result)

    def check(result: Any) -> bool:
        return bool(result["body"].startswith("ok"))

    with pytest.raises(EffectRejected) as err:
        await harness.ctx().effect(
            "post", "p1", _post(target, "bad"), check_result=check, rollback=rollback
        )
    assert (err.value.reason, err.value.rolled_back) == ("output_invalid", True)
    assert rolled == [{"id": 1, "body": "bad"}]
    ledger = harness.ledgers.current
    assert ledger is not None
    record = await ledger.get("publisher", "post", "p1")
    assert record is not None and record.status is EffectStatus.ROLLED_BACK
    assert "output check failed" in (record.error or "")

    with pytest.raises(EffectRejected):
        await harness.ctx().effect(
            "post", "p1", _post(target, "bad"), check_result=check, rollback=rollback
        )
    assert len(target.received) == 1 and len(rolled) == 1
    assert harness.service is not None and harness.service.stats["rolled_back"] == 1


async def test_failed_output_check_without_rollback_needs_a_human(
    harness: Harness, target: FakeTarget
) -> None:
    """Without a rollback hook (or when it fails) the record is check_failed, which a human
    resolves; a raising check counts as a failed check."""

    def check(result: Any) -> None:
        raise ValueError("contains a banned word")

    with pytest.raises(EffectRejected) as err:
        await harness.ctx().effect("post", "p1", _post(target), check_result=check)
    assert err.value.rolled_back is False and "banned word" in str(err.value)
    ledger = harness.ledgers.current
    assert ledger is not None
    record = await ledger.get("publisher", "post", "p1")
    assert record is not None and record.status is EffectStatus.CHECK_FAILED

    async def broken_rollback(result: Any) -> None:
        raise RuntimeError("delete endpoint down")

    with pytest.raises(EffectRejected, match="rollback failed"):
        await harness.ctx().effect(
            "post", "p2", _post(target), check_result=check, rollback=broken_rollback
        )
    record = await ledger.get("publisher", "post", "p2")
    assert record is not None and record.status is EffectStatus.CHECK_FAILED


async def test_passing_output_check_returns_the_result(
    harness: Harness, target: FakeTarget
) -> None:
    """A check returning anything but False passes; the result is returned as usual."""
    result = await harness.ctx().effect(
        "post", "p1", _post(target), check_result=lambda r: r["id"] > 0
    )
    assert result == {"id": 1, "body": "hello"}


# -- counting -------------------------------------------------------------------------------------


class RecordingMetrics:
    """An EffectsMetrics that keeps every hook call."""

    def __init__(self) -> None:
        self.events: Counter[tuple[str, str, str]] = Counter()
        self.refusals: Counter[tuple[str, str, str]] = Counter()

    def effect_event(self, agent: str, kind: str, event: str) -> None:
        self.events[(agent, kind, event)] += 1

    def effect_refused(self, agent: str, kind: str, reason: str) -> None:
        self.refusals[(agent, kind, reason)] += 1


async def test_metrics_hooks_see_events_and_refusals_with_labels(
    harness: Harness, target: FakeTarget
) -> None:
    """Every event and every refusal reaches the metrics hooks with agent, kind, label."""
    metrics = RecordingMetrics()
    assert harness.service is not None
    harness.service.metrics = metrics
    ctx = harness.ctx(effects=AgentEffectsConfig(allow=("post",)))
    await ctx.effect("post", "p1", _post(target))
    await ctx.effect("post", "p1", _post(target))
    with pytest.raises(EffectNotAllowed):
        await ctx.effect("mail", "m1", _post(target))
    assert metrics.events == Counter(
        {("publisher", "post", "executed"): 1, ("publisher", "post", "duplicate_prevented"): 1}
    )
    assert metrics.refusals == Counter({("publisher", "mail", "not_allowed"): 1})
    kinds = [e["kind"] for e in ctx.trace]
    assert kinds == ["effect.executed", "effect.duplicate_prevented", "effect.refused"]
