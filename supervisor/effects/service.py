"""``ctx.effect``: side effects executed at most once per ``(agent, kind, key)``, ever.

    run(ctx, kind, key, fn, ...)
      kind allowed for this agent?                               no -> EffectNotAllowed
      (per key, one call at a time in this process)
      ledger record for the key?
        done                  -> the recorded result; fn not called  (duplicate_prevented)
        rolled_back, check_failed -> EffectRejected(output_invalid); fn not called
        unknown               -> reconcile() given?  True/value -> done, returned
                                                    False -> failed, go on below
                                                    None/no reconcile -> EffectHeld
        pending_approval      -> ApprovalPending (or expired -> EffectRejected)
        rejected, expired     -> EffectRejected
        approved, failed      -> go on
      params pass validate?                                       no -> EffectParamsInvalid
      high risk?  approval usable and for these params?  no -> durable request, notify,
                                                              ApprovalPending
      rate window of the kind full?                               yes -> EffectRateLimited
      write intent (durable) -> fn(idempotency_key) -> write result (durable)
      check_result(result) fails -> rollback(result) -> EffectRejected(output_invalid)

The guarantee, precisely. For one ledger (one state directory, one daemon process):

- ``fn`` is started at most once per key, except after it raised ``EffectNotStarted`` (its
  own statement that nothing reached the target) or after ``reconcile`` or a human said
  the earlier attempt did not happen. Retries, repeated runs, crashes and restarts do not
  start it again: a started attempt is ``done``, ``failed`` (only via those statements) or
  ``unknown``, and ``unknown`` is never started again on its own.
- Any other exception from ``fn``, a cancellation (timeout, shutdown) or a crash while it
  runs makes the outcome ``unknown``: the supervisor cannot know whether the target acted.
  A ``TransientError`` from ``fn`` is no exception: a connection reset after the request
  was sent is exactly how the 47 duplicate posts happened. ``reconcile`` settles it.
- What reaches the target exactly once is therefore: every key whose ``fn`` either
  returned, raised ``EffectNotStarted`` truthfully, or is settled by a truthful
  ``reconcile``. Without ``reconcile``, an interrupted key is held for a human: at most
  once, never silently twice. ``fn`` receives a stable ``idempotency_key``; a target that
  honours ``Idempotency-Key`` dedupes even a human's wrong "did not happen".
- The caller gets the result of the one execution; later calls get the recorded JSON form
  (a model comes back as a dict). A result over ``max_result_bytes`` or not JSON is
  recorded as done without its value (later calls get None; the record says why).

Approval: an approved effect runs at the agent's next call with the same kind and key,
within the approval's expiry, with the same params; never at once, never by surprise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, Protocol

import anyio
import anyio.lowlevel

from supervisor.clock import Clock
from supervisor.effects.approvals import ApprovalRequest, Notifier, send_notification
from supervisor.effects.calls import (
    EffectCall,
    KeyLocks,
    idempotency_key,
    running,
)
from supervisor.effects.config import (
    AgentEffectsConfig,
    EffectsConfig,
    KindPolicy,
    resolve_policy,
)
from supervisor.effects.control import ControlSurface
from supervisor.effects.errors import (
    ApprovalPending,
    EffectHeld,
    EffectInvalidRequest,
    EffectNotAllowed,
    EffectNotStarted,
    EffectParamsChanged,
    EffectParamsInvalid,
    EffectRateLimited,
    EffectRefused,
    EffectRejected,
    InvalidTransition,
)
from supervisor.effects.gatekeeper import (
    check_params,
    describe,
    maybe_await,
    output_problem,
    rate_retry_after,
    request_problem,
    storable,
)
from supervisor.effects.ledger.base import EffectLedger, EffectRecord, EffectStatus
from supervisor.errors import StateError
from supervisor.logging import get_logger

__all__ = ["EffectCaller", "EffectsMetrics", "EffectsService"]

_log = get_logger()

#: a shielded ledger write after ``fn`` started gets this long; past it the record stays
#: ``intent`` (read as ``unknown``), which is the safe side
WRITE_GRACE = 30.0


class EffectCaller(Protocol):
    """What the service needs of a ``RunContext``."""

    agent: str
    run_id: str
    config: Any

    def trace_event(self, kind: str, **fields: Any) -> None: ...


class EffectsMetrics(Protocol):
    """Counter hooks; ``supervisor.metrics.Metrics`` implements them."""

    def effect_event(self, agent: str, kind: str, event: str) -> None:
        """One of: executed, duplicate_prevented, held_unknown, approval_requested,
        approval_waiting, outcome_unknown, not_started, reconciled_done,
        reconciled_not_done, rolled_back, check_failed, approved, rejected, expired,
        resolved."""

    def effect_refused(self, agent: str, kind: str, reason: str) -> None:
        """An ``EffectRefused`` or ``EffectRejected`` raised to the agent, by its reason."""


@dataclass(frozen=True, slots=True)
class _Recorded:
    """The key is settled: return this recorded result without calling ``fn``."""

    result: Any


class EffectsService(ControlSurface):
    """Runs side effects exactly once through an ``EffectLedger``; the ``effects`` service.

    ``stats`` counts every event and every refusal (``refused:<reason>``) for tests and the
    bench; ``metrics`` (``EffectsMetrics``) gets the same as counter hooks. ``notifier``
    is awaited (bounded by ``effects.approval.notify_timeout``) for each new approval
    request.
    """

    def __init__(
        self,
        ledger: EffectLedger,
        clock: Clock,
        *,
        config: EffectsConfig | None = None,
        metrics: EffectsMetrics | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.ledger = ledger
        self.clock = clock
        self.config = config or EffectsConfig()
        self.metrics = metrics
        self.notifier = notifier
        self.stats: Counter[str] = Counter()
        self._keys = KeyLocks()
        self._kinds = KeyLocks()

    def for_run(self, ctx: Any) -> EffectsService:
        """The service is shared by every run: per-run data travels in ``ctx``."""
        return self

    # -- the agent's call ---------------------------------------------------------------------

    async def run(
        self,
        ctx: EffectCaller,
        kind: str,
        key: str,
        fn: Callable[[str], Awaitable[Any]],
        *,
        params: Any = None,
        validate: Any = None,
        check_result: Callable[[Any], Any] | None = None,
        rollback: Callable[[Any], Any] | None = None,
        reconcile: Callable[[], Any] | None = None,
        high_risk: bool = False,
        reason: str | None = None,
        idempotency_header: bool = True,
    ) -> Any:
        """Run ``fn(idempotency_key)`` at most once for ``(ctx.agent, kind, key)``.

        ``params`` is what the gatekeeper checks (``validate``: a pydantic model class, or
        a callable returning False or raising ``ValueError``/``TypeError`` to refuse) and
        what an approver sees; ``check_result(result)`` returning False or raising refuses
        the output after the fact, and ``rollback(result)`` then undoes it; ``reconcile()``
        answers "did the interrupted attempt happen?" with True (or the result), False, or
        None (cannot tell). Each of them may be sync or async.

        Returns ``fn``'s result, or the recorded result when the key is already done.
        Raises ``EffectRefused`` (nothing happened), ``EffectRejected``, ``ApprovalPending``,
        ``EffectHeld``, whatever ``fn`` or ``reconcile`` raised (``fn``: the outcome is then
        ``unknown``, or ``failed`` for ``EffectNotStarted``) and ``LedgerWriteError``.
        """
        agent = ctx.agent
        # A run already cancelled (timeout, shutdown) writes nothing at all.
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._check_request(ctx, kind, key)
        policy = resolve_policy(kind, self.config, _agent_config(ctx))
        if not policy.allowed:
            self._refuse(ctx, EffectNotAllowed(agent, kind, key, policy.allow_list or ()))
        async with self._keys.hold((agent, kind, key)):
            record = await self.ledger.get(agent, kind, key)
            if record is not None:
                settled = await self._settle(ctx, record, reconcile)
                if isinstance(settled, _Recorded):
                    return settled.result
                record = settled
            summary, fingerprint = await self._gate_params(ctx, kind, key, params, validate)
            if high_risk or policy.high_risk:
                await self._require_approval(
                    ctx, kind, key, record, policy, summary, fingerprint, reason
                )
            async with self._kinds.hold((agent, kind)):
                # Counting and writing the intent under one lock: two calls of the same kind
                # cannot both take the last place in the window.
                await self._check_rate(ctx, kind, key, policy)
                record = await self.ledger.write_intent(
                    agent,
                    kind,
                    key,
                    at=self.clock.now(),
                    run_id=ctx.run_id,
                    idempotency_key=idempotency_key(agent, kind, key),
                    params_fingerprint=fingerprint,
                )
            return await self._execute(ctx, record, fn, check_result, rollback, idempotency_header)

    # -- existing records ---------------------------------------------------------------------

    async def _settle(
        self, ctx: EffectCaller, record: EffectRecord, reconcile: Callable[[], Any] | None
    ) -> EffectRecord | _Recorded:
        agent, kind, key = record.ident
        status = record.status
        if status is EffectStatus.DONE:
            self._event(ctx, kind, key, "duplicate_prevented", attempts=record.attempts)
            return _Recorded(record.result)
        if status in (EffectStatus.ROLLED_BACK, EffectStatus.CHECK_FAILED):
            self._event(ctx, kind, key, "duplicate_prevented", status=status.value)
            self._refuse(
                ctx,
                EffectRejected(
                    agent,
                    kind,
                    key,
                    f"it ran and failed its output check ({status.value}): {record.error}",
                    reason="output_invalid",
                    rolled_back=status is EffectStatus.ROLLED_BACK,
                ),
            )
        if status in (EffectStatus.UNKNOWN, EffectStatus.INTENT):
            # INTENT here (we hold the key's lock) is an attempt whose outcome could not be
            # recorded: the same as unknown.
            return await self._reconcile(ctx, record, reconcile)
        if status in (EffectStatus.PENDING_APPROVAL, EffectStatus.APPROVED):
            if record.expires_at is not None and self.clock.now() >= record.expires_at:
                await self._expire(record)
                status = EffectStatus.EXPIRED
            elif status is EffectStatus.PENDING_APPROVAL:
                self._event(ctx, kind, key, "approval_waiting", approval_id=record.approval_id)
                raise _pending(record)
            else:
                return record
        if status is EffectStatus.REJECTED:
            self._refuse(
                ctx,
                EffectRejected(
                    agent,
                    kind,
                    key,
                    f"rejected by {record.decided_by}: {record.note or 'no reason given'}",
                    reason="rejected",
                ),
            )
        if status is EffectStatus.EXPIRED:
            self._refuse(
                ctx,
                EffectRejected(
                    agent,
                    kind,
                    key,
                    f"approval {record.approval_id} expired; it will not run",
                    reason="approval_expired",
                ),
            )
        return record  # failed: nothing happened, it may start again

    async def _reconcile(
        self, ctx: EffectCaller, record: EffectRecord, reconcile: Callable[[], Any] | None
    ) -> EffectRecord | _Recorded:
        agent, kind, key = record.ident
        where = f"attempt {record.attempts} (run {record.run_id})"
        if reconcile is None:
            self._event(ctx, kind, key, "held_unknown", level="error")
            raise EffectHeld(
                agent,
                kind,
                key,
                f"the outcome of {where} is unknown ({record.error}) and no reconcile was "
                f"given; it is held for a human: agent-supervisor resolve "
                f"{agent} {kind} {key!r} --happened|--not-happened",
            )
        answer = await maybe_await(reconcile())
        if answer is None:
            self._event(ctx, kind, key, "held_unknown", level="error")
            raise EffectHeld(agent, kind, key, f"reconcile could not tell whether {where} happened")
        now = self.clock.now()
        if answer is False:
            updated = await self.ledger.mark(
                agent,
                kind,
                key,
                EffectStatus.FAILED,
                at=now,
                done_at=now,
                note=f"reconcile: {where} did not happen",
            )
            self._event(ctx, kind, key, "reconciled_not_done")
            return updated
        result, note = storable(None if answer is True else answer, self.config.max_result_bytes)
        await self.ledger.mark(
            agent,
            kind,
            key,
            EffectStatus.DONE,
            at=now,
            done_at=now,
            result=result,
            note=note or f"reconcile: {where} happened",
        )
        self._event(ctx, kind, key, "reconciled_done")
        self._event(ctx, kind, key, "duplicate_prevented")
        return _Recorded(result)

    # -- the gatekeeper before ------------------------------------------------------------------

    async def _gate_params(
        self, ctx: EffectCaller, kind: str, key: str, params: Any, validate: Any
    ) -> tuple[Any, str]:
        try:
            return await check_params(params, validate)
        except (ValueError, TypeError) as exc:
            self._refuse(ctx, EffectParamsInvalid(ctx.agent, kind, key, f"params refused: {exc}"))

    async def _require_approval(
        self,
        ctx: EffectCaller,
        kind: str,
        key: str,
        record: EffectRecord | None,
        policy: KindPolicy,
        summary: Any,
        fingerprint: str,
        reason: str | None,
    ) -> None:
        agent, now = ctx.agent, self.clock.now()
        if record is not None and record.approval_usable(now):
            if record.params_fingerprint != fingerprint:
                self._refuse(
                    ctx,
                    EffectParamsChanged(
                        agent,
                        kind,
                        key,
                        f"the params differ from those approved by {record.decided_by} "
                        f"(approval {record.approval_id}); use a new key to ask again",
                    ),
                )
            return
        # Do not ask a human for what the rate limit would refuse anyway.
        await self._check_rate(ctx, kind, key, policy)
        approval_id = await self._new_approval_id()
        record = await self.ledger.mark(
            agent,
            kind,
            key,
            EffectStatus.PENDING_APPROVAL,
            at=now,
            run_id=ctx.run_id,
            approval_id=approval_id,
            params=summary,
            params_fingerprint=fingerprint,
            reason=reason,
            requested_at=now,
            expires_at=now + timedelta(seconds=self.config.approval.expiry),
            decided_by=None,
            decided_at=None,
            error=None,
            note=None,
        )
        self._event(ctx, kind, key, "approval_requested", approval_id=approval_id, level="warning")
        if self.notifier is not None:
            await send_notification(
                self.notifier,
                ApprovalRequest.from_record(record),
                self.config.approval.notify_timeout,
            )
        raise _pending(record)

    async def _check_rate(self, ctx: EffectCaller, kind: str, key: str, policy: KindPolicy) -> None:
        rate = policy.rate
        if rate is None:
            return
        now = self.clock.now()
        starts = await self.ledger.starts_since(
            ctx.agent, kind, now - timedelta(seconds=rate.window)
        )
        retry_after = rate_retry_after(rate, starts, now)
        if retry_after is not None:
            self._refuse(
                ctx,
                EffectRateLimited(
                    ctx.agent,
                    kind,
                    key,
                    rule=str(rate),
                    limit=rate.count,
                    observed=len(starts),
                    retry_after=retry_after,
                ),
            )

    # -- the effect and the gatekeeper after ----------------------------------------------------

    async def _execute(
        self,
        ctx: EffectCaller,
        record: EffectRecord,
        fn: Callable[[str], Awaitable[Any]],
        check_result: Callable[[Any], Any] | None,
        rollback: Callable[[Any], Any] | None,
        idempotency_header: bool,
    ) -> Any:
        agent, kind, key = record.ident
        ikey = record.idempotency_key or idempotency_key(agent, kind, key)
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException as exc:
            # Cancelled after the intent was written but before fn was called: nothing
            # happened, and we know it.
            await self._record_failure(record, exc, EffectStatus.FAILED, "before it started")
            raise
        started = self.clock.monotonic()
        try:
            async with running(EffectCall(agent, kind, key, ikey, idempotency_header)):
                result = await maybe_await(fn(ikey))
        except EffectNotStarted as exc:
            await self._record_failure(record, exc, EffectStatus.FAILED)
            self._event(ctx, kind, key, "not_started", error=describe(exc))
            raise
        except BaseException as exc:
            await self._record_failure(record, exc, EffectStatus.UNKNOWN)
            self._event(ctx, kind, key, "outcome_unknown", error=describe(exc), level="error")
            raise
        stored, note = storable(result, self.config.max_result_bytes)
        done = await self._write_after_start(
            self.ledger.write_result(
                agent, kind, key, at=self.clock.now(), result=stored, note=note
            )
        )
        self._event(
            ctx,
            kind,
            key,
            "executed",
            attempts=record.attempts,
            duration_s=round(self.clock.monotonic() - started, 6),
        )
        if check_result is not None and done is not None:
            await self._check_after(ctx, done, result, check_result, rollback)
        return result

    async def _check_after(
        self,
        ctx: EffectCaller,
        record: EffectRecord,
        result: Any,
        check_result: Callable[[Any], Any],
        rollback: Callable[[Any], Any] | None,
    ) -> None:
        agent, kind, key = record.ident
        why = await output_problem(check_result, result)
        if why is None:
            return
        error = f"output check failed: {why}"
        # check_failed first: a crash or cancellation during the rollback leaves a record
        # that says a human must look, never one that says all is well.
        await self._write_after_start(
            self.ledger.mark(
                agent,
                kind,
                key,
                EffectStatus.CHECK_FAILED,
                at=self.clock.now(),
                error=error + ("" if rollback else "; no rollback hook"),
            )
        )
        rolled_back = False
        if rollback is not None:
            try:
                await maybe_await(rollback(result))
            except Exception as exc:
                error += f"; rollback failed: {describe(exc)}"
                await self._write_after_start(
                    self.ledger.mark(
                        agent,
                        kind,
                        key,
                        EffectStatus.CHECK_FAILED,
                        at=self.clock.now(),
                        error=error,
                    )
                )
            else:
                rolled_back = True
                await self._write_after_start(
                    self.ledger.mark(
                        agent,
                        kind,
                        key,
                        EffectStatus.ROLLED_BACK,
                        at=self.clock.now(),
                        error=error,
                    )
                )
        self._event(
            ctx,
            kind,
            key,
            "rolled_back" if rolled_back else "check_failed",
            error=error,
            level="warning" if rolled_back else "error",
        )
        self._refuse(
            ctx,
            EffectRejected(
                agent, kind, key, error, reason="output_invalid", rolled_back=rolled_back
            ),
        )

    # -- helpers ---------------------------------------------------------------------------------

    def _check_request(self, ctx: EffectCaller, kind: str, key: str) -> None:
        problem = request_problem(kind, key)
        if problem is not None:
            self._refuse(ctx, EffectInvalidRequest(ctx.agent, str(kind), str(key), problem))

    def _refuse(self, ctx: EffectCaller, error: EffectRefused | EffectRejected) -> NoReturn:
        """Count, log and raise ``error``."""
        self.stats["refused"] += 1
        self.stats[f"refused:{error.reason}"] += 1
        if self.metrics is not None:
            self.metrics.effect_refused(error.agent, error.kind, error.reason)
        ctx.trace_event("effect.refused", effect=error.kind, key=error.key, reason=error.reason)
        _log.warning(
            "effect.refused",
            effect=error.kind,
            key=error.key,
            reason=error.reason,
            error=str(error),
        )
        raise error

    def _event(
        self,
        ctx: EffectCaller | None,
        kind: str,
        key: str,
        event: str,
        *,
        agent: str | None = None,
        level: str = "info",
        **fields: Any,
    ) -> None:
        who = agent if agent is not None else (ctx.agent if ctx is not None else "")
        self.stats[event] += 1
        if self.metrics is not None:
            self.metrics.effect_event(who, kind, event)
        if ctx is not None:
            ctx.trace_event(f"effect.{event}", effect=kind, key=key)
        log = getattr(_log, level)
        if ctx is None:
            fields["effect_agent"] = who
        log(f"effect.{event}", effect=kind, key=key, **fields)

    async def _write_after_start(self, write: Awaitable[EffectRecord]) -> EffectRecord | None:
        # Shielded: the run may be cancelled (timeout, shutdown) just as the effect ends,
        # and its outcome must still be recorded. Bounded: past the grace the record stays
        # intent, which reads unknown: the safe side.
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + WRITE_GRACE
            return await write
        _log.error("effect.ledger_write_timeout", grace_s=WRITE_GRACE)
        return None

    async def _record_failure(
        self, record: EffectRecord, exc: BaseException, status: EffectStatus, when: str = ""
    ) -> None:
        """Record how an attempt ended without a result; never masks ``exc``."""
        error = describe(exc) + (f" ({when})" if when else "")
        try:
            await self._write_after_start(
                self.ledger.write_failure(
                    *record.ident, at=self.clock.now(), error=error, status=status
                )
            )
        except (StateError, InvalidTransition) as write_exc:
            # The record stays intent: read as unknown from now on, and after a restart.
            _log.error(
                "effect.failure_not_recorded",
                effect=record.kind,
                key=record.key,
                error=str(write_exc),
            )


def _pending(record: EffectRecord) -> ApprovalPending:
    assert record.approval_id is not None and record.expires_at is not None
    return ApprovalPending(
        record.agent,
        record.kind,
        record.key,
        approval_id=record.approval_id,
        expires_at=record.expires_at,
    )


def _agent_config(ctx: EffectCaller) -> AgentEffectsConfig | None:
    value = getattr(getattr(ctx, "config", None), "effects", None)
    if value is None or isinstance(value, AgentEffectsConfig):
        return value
    return AgentEffectsConfig.model_validate(value)
