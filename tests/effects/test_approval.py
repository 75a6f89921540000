"""Human approval: pending -> approved -> runs once at the next call; rejected; expired."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import anyio
import pytest

from supervisor.effects import (
    ApprovalClosed,
    ApprovalConfig,
    ApprovalNotFound,
    ApprovalPending,
    ApprovalRequest,
    EffectKindConfig,
    EffectParamsChanged,
    EffectRateLimited,
    EffectRejected,
    EffectsConfig,
    EffectStatus,
    parse_rate,
)
from supervisor.testing import FakeClock
from tests.effects.conftest import FakeTarget, Harness, Ledgers

PARAMS = {"amount_eur": 1200, "to": "ACME Ltd"}


def _pay(target: FakeTarget) -> Any:
    """fn for ctx.effect: 'pay' by posting to the target."""
    return lambda ik: target.post("payment 1200 EUR to ACME", ik)


async def _ask(harness: Harness, target: FakeTarget, run_id: str = "run-1") -> Any:
    """The agent asks for the high-risk payment."""
    return await harness.ctx(run_id=run_id).effect(
        "pay",
        "invoice-42",
        _pay(target),
        params=PARAMS,
        high_risk=True,
        reason="invoice 42 is due today",
    )


async def _request(harness: Harness, target: FakeTarget) -> ApprovalPending:
    with pytest.raises(ApprovalPending) as err:
        await _ask(harness, target)
    return err.value


async def test_high_risk_effect_waits_durably_and_notifies(
    harness: Harness, target: FakeTarget, clock: FakeClock
) -> None:
    """A high-risk effect does not run: a durable request says what and why, the notifier
    gets it, and asking again does not create or send a second one."""
    pending = await _request(harness, target)
    assert target.received == []
    [sent] = harness.notifications.sent
    assert sent.id == pending.approval_id
    assert (sent.agent, sent.kind, sent.key, sent.params, sent.reason) == (
        "publisher",
        "pay",
        "invoice-42",
        PARAMS,
        "invoice 42 is due today",
    )
    assert sent.expires_at == clock.now() + timedelta(days=1)
    assert sent.to_dict()["approve"] == f"agent-supervisor approve {sent.id}"

    with pytest.raises(ApprovalPending) as again:
        await _ask(harness, target, run_id="run-2")
    assert again.value.approval_id == pending.approval_id
    assert len(harness.notifications.sent) == 1

    await harness.restart()
    assert harness.service is not None
    assert [r.id for r in await harness.service.pending()] == [pending.approval_id]


async def test_approved_effect_runs_once_at_the_next_call_after_a_restart(
    harness: Harness, target: FakeTarget
) -> None:
    """pending -> restart -> approve -> the next call runs it, once; later calls are
    duplicates."""
    pending = await _request(harness, target)
    service = await harness.restart()
    approved = await service.approve(pending.approval_id, by="ana")
    assert (approved.status, approved.decided_by) == (EffectStatus.APPROVED, "ana")
    assert target.received == []  # approval alone runs nothing

    assert await _ask(harness, target, run_id="run-2") == {
        "id": 1,
        "body": "payment 1200 EUR to ACME",
    }
    await _ask(harness, target, run_id="run-3")
    assert len(target.received) == 1
    assert await service.pending() == []
    with pytest.raises(ApprovalClosed):
        await service.approve(pending.approval_id, by="ana")


async def test_rejected_effect_never_runs(harness: Harness, target: FakeTarget) -> None:
    """pending -> reject -> every later call raises EffectRejected(rejected); never runs."""
    pending = await _request(harness, target)
    assert harness.service is not None
    rejected = await harness.service.reject(pending.approval_id, by="ana", reason="wrong amount")
    assert rejected.status is EffectStatus.REJECTED
    for run in range(3):
        with pytest.raises(EffectRejected, match="wrong amount") as err:
            await _ask(harness, target, run_id=f"run-{run}")
        assert err.value.reason == "rejected"
    assert target.received == []
    with pytest.raises(ApprovalClosed):
        await harness.service.approve(pending.approval_id, by="bob")


async def test_pending_request_expires_and_never_runs(
    harness: Harness, target: FakeTarget, clock: FakeClock
) -> None:
    """pending -> the expiry passes -> expire_due() marks it expired; approve is refused
    and the agent's calls raise EffectRejected(approval_expired)."""
    pending = await _request(harness, target)
    clock.advance(timedelta(days=1, seconds=1))
    assert harness.service is not None
    [expired] = await harness.service.expire_due()
    assert (expired.id, expired.status) == (pending.approval_id, EffectStatus.EXPIRED)
    assert await harness.service.expire_due() == []
    with pytest.raises(ApprovalClosed, match="expired"):
        await harness.service.approve(pending.approval_id, by="ana")
    with pytest.raises(EffectRejected) as err:
        await _ask(harness, target, run_id="run-2")
    assert err.value.reason == "approval_expired"
    assert target.received == []


async def test_expiry_is_enforced_without_expire_due(
    harness: Harness, target: FakeTarget, clock: FakeClock
) -> None:
    """Even if nobody runs expire_due, a late approve or a late call sees the expiry."""
    pending = await _request(harness, target)
    clock.advance(timedelta(days=2))
    assert harness.service is not None
    with pytest.raises(ApprovalClosed, match="expired"):
        await harness.service.approve(pending.approval_id, by="ana")
    with pytest.raises(EffectRejected):
        await _ask(harness, target)
    assert target.received == []


async def test_an_approval_not_used_in_time_expires_too(
    harness: Harness, target: FakeTarget, clock: FakeClock
) -> None:
    """An approved effect must run within the expiry of the decision; a call after that
    is rejected, never executed late by surprise."""
    pending = await _request(harness, target)
    assert harness.service is not None
    clock.advance(timedelta(hours=20))
    approved = await harness.service.approve(pending.approval_id, by="ana")
    assert approved.expires_at == clock.now() + timedelta(days=1)
    clock.advance(timedelta(days=1, seconds=1))
    with pytest.raises(EffectRejected, match="expired"):
        await _ask(harness, target, run_id="run-2")
    assert target.received == []


async def test_approval_covers_exactly_the_params_shown(
    harness: Harness, target: FakeTarget
) -> None:
    """The approval is for the params the reviewer saw: other params are refused
    (params_changed) and the approved ones still run."""
    pending = await _request(harness, target)
    assert harness.service is not None
    await harness.service.approve(pending.approval_id, by="ana")
    with pytest.raises(EffectParamsChanged):
        await harness.ctx().effect(
            "pay",
            "invoice-42",
            _pay(target),
            params={**PARAMS, "amount_eur": 99_000},
            high_risk=True,
        )
    assert target.received == []
    await _ask(harness, target)
    assert len(target.received) == 1


async def test_high_risk_by_config_per_kind(
    ledgers: Ledgers, clock: FakeClock, target: FakeTarget
) -> None:
    """effects.kinds.pay.high_risk in config makes every 'pay' wait, without the flag."""
    harness = Harness(
        ledgers, clock, EffectsConfig(kinds={"pay": EffectKindConfig(high_risk=True)})
    )
    await harness.start()
    with pytest.raises(ApprovalPending):
        await harness.ctx().effect("pay", "x", _pay(target))
    await harness.ctx().effect("post", "y", _pay(target))  # other kinds are not high risk
    assert len(target.received) == 1


async def test_no_approval_is_asked_for_what_the_rate_limit_refuses(
    ledgers: Ledgers, clock: FakeClock, target: FakeTarget
) -> None:
    """A high-risk effect whose window is full is refused first; nobody is bothered."""
    config = EffectsConfig(kinds={"pay": EffectKindConfig(rate=parse_rate("1/day"))})
    harness = Harness(ledgers, clock, config)
    await harness.start()
    await harness.ctx().effect("pay", "first", _pay(target))
    with pytest.raises(EffectRateLimited):
        await _ask(harness, target)
    assert harness.notifications.sent == []


async def test_unknown_approval_ids_and_anonymous_decisions_are_refused(
    harness: Harness, target: FakeTarget
) -> None:
    """approve/reject of an unknown id raise ApprovalNotFound; a decision needs a name."""
    pending = await _request(harness, target)
    assert harness.service is not None
    with pytest.raises(ApprovalNotFound):
        await harness.service.approve("000000000000", by="ana")
    with pytest.raises(ApprovalNotFound):
        await harness.service.reject("000000000000", by="ana")
    with pytest.raises(ValueError, match="name"):
        await harness.service.approve(pending.approval_id, by="")


async def test_a_failing_or_hanging_notifier_does_not_lose_the_request(
    harness: Harness, target: FakeTarget
) -> None:
    """The notifier failing, or taking longer than notify_timeout, is logged; the request is
    durable and listed anyway."""
    assert harness.service is not None

    async def broken(request: ApprovalRequest) -> None:
        raise ConnectionError("webhook down")

    harness.service.notifier = broken
    await _request(harness, target)

    async def hangs(request: ApprovalRequest) -> None:
        await anyio.sleep_forever()

    harness.service.notifier = hangs
    harness.service.config = EffectsConfig(approval=ApprovalConfig(notify_timeout=0.01))
    with anyio.fail_after(5), pytest.raises(ApprovalPending):
        await harness.ctx().effect("pay", "other", _pay(target), high_risk=True)
    assert len(await harness.service.pending()) == 2
