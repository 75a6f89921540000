"""Exactly once: retries, repeated runs, crashes and restarts never repeat an effect."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from supervisor import RunContext, TransientError
from supervisor.effects import (
    EffectHeld,
    EffectNotStarted,
    EffectsService,
    EffectStatus,
    LedgerWriteError,
    MemoryLedger,
    current_effect,
    idempotency_key,
)
from supervisor.outcome import Outcome
from supervisor.state import MemoryStore
from supervisor.testing import FakeClock, run_agent
from tests.effects.conftest import FakeTarget, Harness

POST = "Launch day! Our new release is out."
KEY = "post:2026-01-01:launch"

# -- the incident: 47 posts --------------------------------------------------------------------


@pytest.mark.parametrize("with_reconcile", [True, False], ids=["reconcile", "no-reconcile"])
async def test_47_scheduled_runs_with_retries_post_exactly_once(
    clock: FakeClock, target: FakeTarget, with_reconcile: bool
) -> None:
    """The incident: the platform receives the post, then the connection resets (a
    TransientError), the run-level retry and 47 scheduled runs follow. The platform receives
    the post exactly once; the repeats are counted as duplicates prevented (with reconcile)
    or held for a human (without)."""
    service = EffectsService(MemoryLedger(clock=clock), clock)
    await service.ledger.open()
    target.fail_after_receiving = 1
    store = MemoryStore()

    async def publisher(ctx: RunContext) -> Any:
        return await ctx.effect(
            "post",
            KEY,
            lambda ik: target.post(POST, ik),
            reconcile=(lambda: target.lookup(POST)) if with_reconcile else None,
        )

    outcomes = []
    for _ in range(47):
        record, _state = await run_agent(
            publisher,
            name="publisher",
            store=store,
            clock=clock,
            retry_attempts=5,
            services={"effects": service},
        )
        outcomes.append(record.outcome)
        clock.advance(3600)

    assert target.count(POST) == 1
    assert target.received[0][0] == idempotency_key("publisher", "post", KEY)
    assert service.stats["outcome_unknown"] == 1
    if with_reconcile:
        # Run 1: attempt 1 posts and "fails", attempt 2 reconciles; runs 2-47 are duplicates.
        assert outcomes == [Outcome.SUCCESS] * 47
        assert service.stats["reconciled_done"] == 1
        assert service.stats["duplicate_prevented"] == 47
        assert service.stats["executed"] == 0
    else:
        assert outcomes == [Outcome.FAILURE] * 47
        assert service.stats["held_unknown"] == 47
    record_ = await service.ledger.get("publisher", "post", KEY)
    assert record_ is not None and record_.attempts == 1


async def test_done_effect_returns_recorded_result_without_calling(
    harness: Harness, target: FakeTarget
) -> None:
    """A second call for a done key returns the first result and does not call fn."""
    ctx = harness.ctx()
    first = await ctx.effect("post", KEY, lambda ik: target.post(POST, ik))
    second = await harness.ctx(run_id="run-2").effect("post", KEY, lambda ik: target.post(POST, ik))
    assert first == second == {"id": 1, "body": POST}
    assert target.count(POST) == 1
    assert harness.service is not None
    assert (harness.service.stats["executed"], harness.service.stats["duplicate_prevented"]) == (
        1,
        1,
    )


async def test_done_effect_survives_a_restart(harness: Harness, target: FakeTarget) -> None:
    """After a restart the ledger still knows the key is done: no second post."""
    await harness.ctx().effect("post", KEY, lambda ik: target.post(POST, ik))
    await harness.restart()
    again = await harness.ctx(run_id="run-2").effect("post", KEY, lambda ik: target.post(POST, ik))
    assert again == {"id": 1, "body": POST}
    assert target.count(POST) == 1


# -- crashes between intent and result ----------------------------------------------------------------


async def _crash_after_intent(harness: Harness) -> None:
    """The process wrote the intent, called the platform, and died before the result."""
    ledger = harness.ledgers.current
    assert ledger is not None
    await ledger.write_intent(
        "publisher",
        "post",
        KEY,
        at=harness.clock.now(),
        run_id="run-1",
        idempotency_key=idempotency_key("publisher", "post", KEY),
    )
    await harness.restart()


async def test_crash_without_reconcile_is_held_and_never_rerun(
    harness: Harness, target: FakeTarget
) -> None:
    """An intent left by a crash reads unknown; without reconcile the effect is held, on
    every later call, and fn never runs."""
    await _crash_after_intent(harness)
    for run in range(3):
        with pytest.raises(EffectHeld, match="held for a human"):
            await harness.ctx(run_id=f"run-{run}").effect(
                "post", KEY, lambda ik: target.post(POST, ik)
            )
    assert target.received == []
    assert harness.service is not None and harness.service.stats["held_unknown"] == 3


async def test_crash_with_reconcile_true_is_done_and_not_rerun(
    harness: Harness, target: FakeTarget
) -> None:
    """reconcile() says it happened: the record becomes done, fn is not called, and the
    reconcile answer is the result from then on."""
    target.received.append(("ik", POST))  # the platform got it before the crash
    await _crash_after_intent(harness)

    async def reconcile() -> bool:
        return True

    result = await harness.ctx().effect(
        "post", KEY, lambda ik: target.post(POST, ik), reconcile=reconcile
    )
    assert result is None
    assert target.count(POST) == 1
    again = await harness.ctx().effect("post", KEY, lambda ik: target.post(POST, ik))
    assert again is None and target.count(POST) == 1
    ledger = harness.ledgers.current
    assert ledger is not None
    record = await ledger.get("publisher", "post", KEY)
    assert record is not None and record.status is EffectStatus.DONE
    assert "reconcile" in (record.note or "")


async def test_crash_with_reconcile_false_runs_once(harness: Harness, target: FakeTarget) -> None:
    """reconcile() says it did not happen: fn runs, once, as attempt 2."""
    await _crash_after_intent(harness)
    result = await harness.ctx().effect(
        "post", KEY, lambda ik: target.post(POST, ik), reconcile=lambda: target.lookup(POST)
    )
    assert result == {"id": 1, "body": POST}
    await harness.ctx().effect(
        "post", KEY, lambda ik: target.post(POST, ik), reconcile=lambda: target.lookup(POST)
    )
    assert target.count(POST) == 1
    ledger = harness.ledgers.current
    assert ledger is not None
    record = await ledger.get("publisher", "post", KEY)
    assert record is not None and (record.status, record.attempts) == (EffectStatus.DONE, 2)
    assert harness.service is not None
    assert harness.service.stats["reconciled_not_done"] == 1


async def test_reconcile_that_cannot_tell_holds(harness: Harness, target: FakeTarget) -> None:
    """reconcile() returning None means 'cannot tell': held, never run."""
    await _crash_after_intent(harness)
    with pytest.raises(EffectHeld, match="could not tell"):
        await harness.ctx().effect(
            "post", KEY, lambda ik: target.post(POST, ik), reconcile=lambda: None
        )
    assert target.received == []


async def test_human_resolution_settles_a_held_effect(harness: Harness, target: FakeTarget) -> None:
    """resolve(happened=False) lets the next call run it once; happened=True makes it done."""
    await _crash_after_intent(harness)
    service = harness.service
    assert service is not None
    record = await service.resolve("publisher", "post", KEY, happened=False, by="ana")
    assert record.status is EffectStatus.FAILED and "ana" in (record.note or "")
    await harness.ctx().effect("post", KEY, lambda ik: target.post(POST, ik))
    await harness.ctx().effect("post", KEY, lambda ik: target.post(POST, ik))
    assert target.count(POST) == 1


# -- what fn raising means ------------------------------------------------------------------------------


async def test_exception_from_fn_leaves_outcome_unknown(
    harness: Harness, target: FakeTarget
) -> None:
    """Any exception from fn (here a TransientError after sending) makes the outcome
    unknown: the exception reaches the caller, and the next call is held, not re-run."""
    target.fail_after_receiving = 1
    with pytest.raises(TransientError):
        await harness.ctx().effect("post", KEY, lambda ik: target.post(POST, ik))
    with pytest.raises(EffectHeld):
        await harness.ctx().effect("post", KEY, lambda ik: target.post(POST, ik))
    assert target.count(POST) == 1


async def test_effect_not_started_may_run_again(harness: Harness, target: FakeTarget) -> None:
    """fn raising EffectNotStarted (nothing was sent) records failed; the next call runs it."""
    target.down = 1

    async def post(ik: str) -> Any:
        try:
            return await target.post(POST, ik)
        except ConnectionRefusedError as exc:
            raise EffectNotStarted("platform refused the connection") from exc

    with pytest.raises(EffectNotStarted):
        await harness.ctx().effect("post", KEY, post)
    assert await harness.ctx().effect("post", KEY, post) == {"id": 1, "body": POST}
    assert target.count(POST) == 1
    assert harness.service is not None and harness.service.stats["not_started"] == 1


async def test_cancelled_during_fn_is_unknown(harness: Harness) -> None:
    """A run cancelled (timeout, shutdown) while fn runs leaves the outcome unknown,
    recorded durably despite the cancellation."""
    started = anyio.Event()

    async def slow(ik: str) -> None:
        started.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(harness.ctx().effect, "post", KEY, slow)
        await started.wait()
        tg.cancel_scope.cancel()
    await harness.restart()
    ledger = harness.ledgers.current
    assert ledger is not None
    record = await ledger.get("publisher", "post", KEY)
    assert record is not None and record.status is EffectStatus.UNKNOWN
    assert ledger.report.unknown_marked == 0  # written at cancellation, not found at open


async def test_call_in_a_cancelled_scope_records_nothing(harness: Harness) -> None:
    """A call made after the run was cancelled raises at once and writes no record."""
    called: list[str] = []

    async def fn(ik: str) -> None:
        called.append(ik)

    with anyio.CancelScope() as scope:
        scope.cancel()
        await harness.ctx().effect("post", KEY, fn)
    ledger = harness.ledgers.current
    assert ledger is not None and await ledger.get("publisher", "post", KEY) is None
    assert called == []


class CancelDuringIntent(MemoryLedger):
    """A ledger that cancels ``scope`` while it writes an intent: the cancellation arrives
    after the intent is durable and before fn is called."""

    scope: anyio.CancelScope | None = None

    async def _persist(self, record: Any, line: bytes) -> None:
        if record.status is EffectStatus.INTENT and self.scope is not None:
            self.scope.cancel()
        await super()._persist(record, line)


async def test_cancelled_after_intent_before_fn_is_failed_not_unknown(clock: FakeClock) -> None:
    """Cancelled between the durable intent and the call of fn: fn never runs and the record
    says failed (nothing happened), so the next call may run it."""
    from tests.effects.conftest import make_ctx

    ledger = CancelDuringIntent(clock=clock)
    await ledger.open()
    service = EffectsService(ledger, clock)
    called: list[str] = []

    async def fn(ik: str) -> str:
        called.append(ik)
        return "posted"

    with anyio.CancelScope() as scope:
        ledger.scope = scope
        await make_ctx(service, clock).effect("post", KEY, fn)
    record = await ledger.get("publisher", "post", KEY)
    assert record is not None and record.status is EffectStatus.FAILED
    assert "before it started" in (record.error or "") and called == []
    ledger.scope = None
    assert await make_ctx(service, clock).effect("post", KEY, fn) == "posted"
    assert len(called) == 1


async def test_result_write_failure_keeps_the_key_from_running_again(
    clock: FakeClock, target: FakeTarget
) -> None:
    """The effect ran but its result could not be recorded (disk full): the call raises
    LedgerWriteError and the key is treated as unknown, never re-run."""
    ledger = MemoryLedger(clock=clock)
    await ledger.open()
    service = EffectsService(ledger, clock)
    from tests.effects.conftest import make_ctx

    ledger.fail_next_write(status=EffectStatus.DONE)
    with pytest.raises(LedgerWriteError):
        await make_ctx(service, clock).effect("post", KEY, lambda ik: target.post(POST, ik))
    with pytest.raises(EffectHeld):
        await make_ctx(service, clock).effect("post", KEY, lambda ik: target.post(POST, ik))
    restarted = ledger.restarted()
    await restarted.open()
    record = await restarted.get("publisher", "post", KEY)
    assert record is not None and record.status is EffectStatus.UNKNOWN
    assert target.count(POST) == 1


async def test_concurrent_calls_for_one_key_run_it_once(
    harness: Harness, target: FakeTarget
) -> None:
    """Eight tasks asking for the same key at once: one runs fn, seven get its result."""
    results: list[Any] = []

    async def post(ik: str) -> Any:
        await anyio.lowlevel.checkpoint()
        return await target.post(POST, ik)

    async def call(i: int) -> None:
        results.append(await harness.ctx(run_id=f"run-{i}").effect("post", KEY, post))

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(call, i)
    assert target.count(POST) == 1
    assert results == [{"id": 1, "body": POST}] * 8
    assert harness.service is not None and harness.service.stats["duplicate_prevented"] == 7


async def test_fn_sees_its_idempotency_key_and_the_current_effect(harness: Harness) -> None:
    """fn gets the stable idempotency key; current_effect() names it while fn runs only."""
    seen: list[Any] = []

    async def fn(ik: str) -> str:
        seen.append((ik, current_effect()))
        return ik

    await harness.ctx().effect("post", KEY, fn, idempotency_header=False)
    ik, call = seen[0]
    assert ik == idempotency_key("publisher", "post", KEY) and len(ik) == 32
    assert call is not None and (call.kind, call.key, call.idempotency_header) == (
        "post",
        KEY,
        False,
    )
    assert current_effect() is None
    assert idempotency_key("publisher", "post", KEY) != idempotency_key("other", "post", KEY)


async def test_oversized_result_is_done_without_its_value(
    harness: Harness,
) -> None:
    """A result over max_result_bytes is recorded as done with a note; the first caller
    still gets it, later callers get None."""

    async def big(ik: str) -> str:
        return "x" * 100_000

    assert len(await harness.ctx().effect("post", KEY, big)) == 100_000
    assert await harness.ctx().effect("post", KEY, big) is None
    ledger = harness.ledgers.current
    assert ledger is not None
    record = await ledger.get("publisher", "post", KEY)
    assert record is not None and "max_result_bytes" in (record.note or "")
