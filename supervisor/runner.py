"""The engine: one fire of an agent, from admission to the committed record.

    fire -> admission (paused? overlap? circuit open? state readable?) -> global slot
         -> attempts under the deadline (retry with backoff between transient failures)
         -> outcome -> commit (agent data + bookkeeping, one atomic durable write)
         -> breaker, metrics, one ``run.finished`` log line

Cancellation doctrine (anyio): the deadline is a cancel scope around all attempts; the daemon
cancels a run by cancelling its run scope; the commit afterwards is shielded so a stopped run
still leaves valid state.
"""

from __future__ import annotations

import random
import secrets
import time
import traceback
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from typing import Any

import anyio
import orjson
from pydantic import BaseModel

from supervisor.clock import Clock
from supervisor.config import AgentSpec
from supervisor.context import RunContext
from supervisor.effects.errors import ApprovalPending
from supervisor.errors import (
    BudgetExceeded,
    GuardError,
    LoopDetected,
    MaxStepsExceeded,
    PermanentError,
    RunStalled,
    RunTimeoutError,
    StateCorruptError,
    StateError,
)
from supervisor.guards.breaker import CircuitBreaker
from supervisor.guards.loops import Detection, LoopGuards, loop_error
from supervisor.guards.retry import is_transient, retry_call
from supervisor.guards.steps import StepCounter
from supervisor.logging import bind_run, get_logger
from supervisor.metrics import Metrics
from supervisor.outcome import Outcome, RunRecord
from supervisor.state.base import AgentState, ErrorEntry, LastRun, StateStore
from supervisor.traces import TraceStore

_log = get_logger()


def new_run_id() -> str:
    """Time-ordered, unique enough for one fleet: ms since epoch (hex) + 32 random bits."""
    return f"{int(time.time() * 1000):x}-{secrets.token_hex(4)}"


@dataclass(slots=True)
class AgentSlot:
    """Live bookkeeping of one configured agent."""

    spec: AgentSpec
    breaker: CircuitBreaker
    state: AgentState | None = None
    running: int = 0
    #: the reason the agent cannot run (unreadable state), or None
    blocked: str | None = None
    removed: bool = False
    #: the context of the run in progress (for live progress), or None
    live: RunContext | None = None

    @property
    def name(self) -> str:
        return self.spec.name


class Runner:
    """Runs fires of agents under their guards and records what happened."""

    def __init__(
        self,
        *,
        store: StateStore,
        metrics: Metrics,
        clock: Clock,
        max_concurrent: int = 16,
        keep_errors: int = 20,
        services: dict[str, Any] | None = None,
        rng: random.Random | None = None,
        traces: TraceStore | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.keep_errors = keep_errors
        self.services = services or {}
        self.traces = traces
        self.limiter = anyio.CapacityLimiter(max_concurrent)
        self.rng = rng or random.Random()
        self.in_flight = 0
        #: set when the daemon stops: fires still waiting for a global slot do not start
        self.stopping = False
        #: cancel scopes of the runs in flight (the daemon cancels them on shutdown)
        self.scopes: set[anyio.CancelScope] = set()
        self._idle = anyio.Event()
        self._idle.set()

    # -- admission ------------------------------------------------------------------------------

    def admit(self, slot: AgentSlot) -> Outcome | None:
        """Decide synchronously whether a fire may run; None means yes (and reserves it)."""
        state = slot.state
        if state is not None and state.paused:
            return Outcome.SKIPPED_PAUSED
        if slot.running >= slot.spec.config.max_concurrent:
            return Outcome.SKIPPED_OVERLAP
        if not slot.breaker.allow():
            return Outcome.SKIPPED_CIRCUIT_OPEN
        slot.running += 1
        self.in_flight += 1
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        return None

    def cancel_all(self) -> int:
        """Cancel every run in flight; each still commits its state. Returns how many."""
        for scope in list(self.scopes):
            scope.cancel()
        return len(self.scopes)

    async def wait_idle(self) -> None:
        """Return when no run is in flight."""
        await self._idle.wait()

    async def fire(
        self, slot: AgentSlot, planned_at: datetime | None, trigger: str = "schedule"
    ) -> RunRecord | None:
        """One fire of ``slot``'s agent: admit, run, record. Returns None if it was blocked."""
        if slot.blocked is not None:
            _log.error("run.blocked", agent=slot.name, reason=slot.blocked)
            return None
        skip = self.admit(slot)
        if skip is not None:
            return self._record_skip(slot, skip, planned_at, trigger)
        try:
            return await self._run_admitted(slot, planned_at, trigger)
        except Exception:
            # A bug in the supervisor must not take the whole fleet down with it.
            _log.exception("run.internal_error", agent=slot.name)
            return None
        finally:
            slot.running -= 1
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    def _record_skip(
        self, slot: AgentSlot, outcome: Outcome, planned_at: datetime | None, trigger: str
    ) -> RunRecord:
        now = self.clock.now()
        lag = (now - planned_at).total_seconds() if planned_at else 0.0
        self.metrics.record_skip(slot.name, outcome, lag if planned_at else None)
        fields: dict[str, Any] = {"agent": slot.name, "outcome": outcome.value, "trigger": trigger}
        if outcome is Outcome.SKIPPED_CIRCUIT_OPEN and slot.breaker.retry_at is not None:
            fields["circuit_retry_at"] = slot.breaker.retry_at.isoformat()
        _log.info("run.skipped", **fields)
        return RunRecord(
            agent=slot.name,
            run_id="",
            outcome=outcome,
            planned_at=planned_at,
            started_at=now,
            finished_at=now,
            duration_s=0.0,
            lag_s=lag,
            steps=0,
            attempts=0,
            trigger=trigger,
        )

    async def ensure_state(self, slot: AgentSlot) -> AgentState | None:
        """Load the agent's state once; on a bad file block the agent, never touch the file."""
        if slot.state is not None:
            return slot.state
        try:
            slot.state = await self.store.load(slot.name)
        except StateError as exc:
            slot.blocked = str(exc)
            self.metrics.state_error(slot.name, "load")
            kind = "corrupt" if isinstance(exc, StateCorruptError) else "unreadable"
            _log.error("state.load_failed", agent=slot.name, kind=kind, error=str(exc))
            return None
        return slot.state

    # -- the run --------------------------------------------------------------------------------

    async def _run_admitted(
        self, slot: AgentSlot, planned_at: datetime | None, trigger: str
    ) -> RunRecord | None:
        spec = slot.spec
        async with self.limiter:
            if self.stopping:
                # Queued for a slot while the daemon began to stop: never started, so nothing
                # to cancel or commit.
                slot.breaker.release_trial()
                _log.info("run.not_started", agent=slot.name, reason="shutdown")
                return None
            state = await self.ensure_state(slot)
            if state is None:
                return None
            if state.paused:
                # Loaded only now, so admission could not see it; give back a trial it took.
                slot.breaker.release_trial()
                return self._record_skip(slot, Outcome.SKIPPED_PAUSED, planned_at, trigger)
            run_id = new_run_id()
            # run_ended comes last, even when the run raised: it drops the series of an agent
            # removed meanwhile, so nothing recorded afterwards may bring them back.
            with bind_run(spec.name, run_id), self.metrics.running(spec.name):
                return await self._execute(slot, spec, state, run_id, planned_at, trigger)

    async def _execute(
        self,
        slot: AgentSlot,
        spec: AgentSpec,
        state: AgentState,
        run_id: str,
        planned_at: datetime | None,
        trigger: str,
    ) -> RunRecord:
        clock, guards = self.clock, spec.guards
        started_at = clock.now()
        t0 = clock.monotonic()
        lag = (started_at - planned_at).total_seconds() if planned_at else 0.0
        ctx = RunContext(
            agent=spec.name,
            run_id=run_id,
            state=_copy_data(state.data),
            steps=StepCounter(guards.max_steps),
            clock=clock,
            log=_log,
            deadline=t0 + guards.timeout,
            cleanup_grace=guards.cleanup_grace,
            planned_at=planned_at,
            services=self.services,
            config=spec.config,
        )
        loops = LoopGuards(guards.loops, clock, on_detection=partial(self._on_loop, spec.name, ctx))
        ctx.loops = loops
        slot.live = ctx
        outcome, error, result = Outcome.SUCCESS, None, None
        attempts = 0
        run_scope = anyio.CancelScope()
        self.scopes.add(run_scope)
        try:
            with run_scope:
                # The deadline covers every attempt and the backoff between them.
                with anyio.CancelScope(deadline=anyio.current_time() + guards.timeout) as tscope:
                    with anyio.CancelScope() as stall_scope:
                        async with anyio.create_task_group() as tg:
                            if loops.watches_stalls:
                                tg.start_soon(self._stall_watchdog, loops, stall_scope)
                            outcome, error, result, attempts = await self._attempts(spec, ctx, t0)
                            tg.cancel_scope.cancel()
                    if stall_scope.cancelled_caught and loops.tripped is not None:
                        outcome, error = Outcome.STALLED, loop_error(loops.tripped)
                        attempts = max(attempts, ctx.attempt)
                if tscope.cancelled_caught:
                    outcome = Outcome.TIMEOUT
                    error = RunTimeoutError(
                        "the run passed its deadline",
                        limit=guards.timeout,
                        observed=round(clock.monotonic() - t0, 3),
                    )
                    attempts = max(attempts, ctx.attempt)
            if run_scope.cancelled_caught:
                outcome, error = Outcome.CANCELLED, None
                attempts = max(attempts, ctx.attempt)
            elif loops.tripped is not None and outcome in (Outcome.SUCCESS, Outcome.FAILURE):
                # The agent caught the detector's error and went on: the run still ends here.
                outcome, error = Outcome(loops.tripped.outcome), loop_error(loops.tripped)
        finally:
            self.scopes.discard(run_scope)
            slot.live = None
        finished_at = clock.now()
        duration = clock.monotonic() - t0
        record = RunRecord(
            agent=spec.name,
            run_id=run_id,
            outcome=outcome,
            planned_at=planned_at,
            started_at=started_at,
            finished_at=finished_at,
            duration_s=duration,
            lag_s=lag,
            steps=ctx.steps,
            attempts=attempts,
            error=_describe(error) if error else None,
            error_type=type(error).__name__ if error else None,
            partial=ctx.partial_value if outcome is not Outcome.SUCCESS else None,
            result=result,
            trigger=trigger,
            extra=_loop_extra(loops),
        )
        with anyio.CancelScope(shield=True):
            record = await self._commit(slot, state, ctx, record)
        for service in self.services.values():
            end_run = getattr(service, "end_run", None)
            if end_run is not None:
                end_run(run_id)
        if self.traces is not None:
            with anyio.CancelScope(shield=True):
                await self._save_trace(record, ctx)
        self._account(slot, record)
        return record

    async def _attempts(
        self, spec: AgentSpec, ctx: RunContext, t0: float
    ) -> tuple[Outcome, BaseException | None, Any, int]:
        fn = spec.fn
        assert fn is not None, "agent function not imported"
        takes_params = spec.takes_params

        async def attempt(n: int) -> Any:
            ctx.attempt = n
            ctx.trace_event("attempt", n=n)
            if n > 1 and ctx.loops is not None:
                ctx.loops.new_attempt()
            try:
                return await (fn(ctx, spec.params) if takes_params else fn(ctx))
            except (SystemExit, KeyboardInterrupt) as exc:
                # Signals reach the daemon through its own handlers, so these come from the
                # agent's code: a failed run, not a reason to take the whole fleet down.
                raise PermanentError(f"agent raised {type(exc).__name__}({exc})") from None

        def on_retry(n: int, exc: Exception, delay: float) -> None:
            ctx.touch("retry_backoff", grace=delay)
            self.metrics.retry(spec.name)
            ctx.trace_event("retry", n=n, delay_s=round(delay, 3), error=_describe(exc))
            _log.warning(
                "run.retry",
                attempt=n,
                delay_s=round(delay, 3),
                error_type=type(exc).__name__,
                error=_describe(exc),
            )

        try:
            result, attempts = await retry_call(
                attempt,
                spec.guards.retry,
                clock=self.clock,
                is_retryable=lambda exc: is_transient(exc, spec.guards.transient),
                on_retry=on_retry,
                rng=self.rng,
            )
        except MaxStepsExceeded as exc:
            return Outcome.MAX_STEPS, exc, None, ctx.attempt
        except BudgetExceeded as exc:
            return Outcome.BUDGET_EXCEEDED, exc, None, ctx.attempt
        except ApprovalPending as exc:
            return Outcome.AWAITING_APPROVAL, exc, None, ctx.attempt
        except LoopDetected as exc:
            stalled = isinstance(exc, RunStalled)
            return Outcome.STALLED if stalled else Outcome.LOOP_DETECTED, exc, None, ctx.attempt
        except Exception as exc:
            return Outcome.FAILURE, exc, None, ctx.attempt
        return Outcome.SUCCESS, None, _jsonable(result), attempts

    async def _commit(
        self, slot: AgentSlot, state: AgentState, ctx: RunContext, record: RunRecord
    ) -> RunRecord:
        data = ctx.state
        try:
            orjson.dumps(data)
        except TypeError as exc:
            # Keep the last good data; the run is a failure the agent author must fix.
            _log.error("state.not_serialisable", error=str(exc))
            data = state.data
            record = replace(
                record,
                outcome=Outcome.FAILURE,
                error=f"ctx.state is not JSON-serialisable: {exc}",
                error_type="TypeError",
            )
        # Build on the latest committed record, not the one this run started from: with
        # max_concurrent > 1 another run of the agent may have committed meanwhile.
        state = slot.state or state
        new = state.model_copy(deep=False)
        new.data = data
        new.last_run = LastRun(
            run_id=record.run_id,
            outcome=record.outcome.value,
            planned_at=record.planned_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
            duration_s=round(record.duration_s, 6),
            steps=record.steps,
            attempts=record.attempts,
            error=record.error,
            partial=_jsonable(record.partial),
            result=_bounded(record.result, 4096),
        )
        if record.planned_at is not None:
            new.last_planned_fire = record.planned_at
        if record.outcome is Outcome.SUCCESS:
            new.last_success_at = record.finished_at
        elif record.error is not None and self.keep_errors:
            entry = ErrorEntry(
                run_id=record.run_id,
                at=record.finished_at,
                outcome=record.outcome.value,
                error_type=record.error_type,
                message=record.error[:2000],
            )
            new.errors = [*state.errors, entry][-self.keep_errors :]
        new.totals = dict(state.totals)
        new.totals[record.outcome.value] = new.totals.get(record.outcome.value, 0) + 1
        _update_breaker(slot.breaker, record.outcome)
        new.breaker = slot.breaker.snapshot()
        try:
            await self.store.commit(new)
        except StateError as exc:
            self.metrics.state_error(slot.name, "commit")
            _log.error("state.commit_failed", error=str(exc))
            return replace(record, extra={**record.extra, "state_committed": False})
        slot.state = new
        return record

    async def _save_trace(self, record: RunRecord, ctx: RunContext) -> None:
        assert self.traces is not None
        entry = {
            "run_id": record.run_id,
            "agent": record.agent,
            "outcome": record.outcome.value,
            "trigger": record.trigger,
            "started_at": record.started_at.isoformat(),
            "finished_at": record.finished_at.isoformat(),
            "duration_s": round(record.duration_s, 6),
            "steps": record.steps,
            "attempts": record.attempts,
            "error": record.error,
            "events": list(ctx.trace),
            "events_dropped": ctx.trace_dropped,
        }
        try:
            await self.traces.append(record.agent, entry)
        except OSError as exc:  # traces are diagnostics: a full disk must not fail the run
            _log.warning("trace.write_failed", error=str(exc))

    def _on_loop(self, agent: str, ctx: RunContext, found: Detection) -> None:
        self.metrics.loop_detection(agent, found.detector, found.enforced)
        event = "loop.detected" if found.enforced else "loop.warning"
        ctx.trace_event(event, detector=found.detector, message=found.message)
        _log.warning(
            "run.loop_detected" if found.enforced else "run.loop_warning",
            detector=found.detector,
            message=found.message,
            evidence=found.evidence,
        )

    async def _stall_watchdog(self, loops: LoopGuards, scope: anyio.CancelScope) -> None:
        while True:
            delay = loops.stall_deadline() - self.clock.monotonic()
            if delay > 0:
                # Event-loop time, not self.clock.sleep: a FakeClock's sleep jumps at once and
                # would declare every run under test stalled.
                await anyio.sleep(delay)
                continue
            found = loops.check_stall()
            if found is not None and found.enforced:
                scope.cancel()
                return

    def _account(self, slot: AgentSlot, record: RunRecord) -> None:
        self.metrics.observe_run(
            record.agent,
            record.outcome,
            duration_s=record.duration_s,
            steps=record.steps,
            attempts=record.attempts,
            lag_s=record.lag_s if record.planned_at is not None else None,
            finished_ts=record.finished_at.timestamp(),
        )
        self.metrics.set_circuit(record.agent, slot.breaker.state.code)
        fields: dict[str, Any] = {
            "outcome": record.outcome.value,
            "duration_s": round(record.duration_s, 6),
            "steps": record.steps,
            "attempts": record.attempts,
            "lag_s": round(record.lag_s, 6),
            "trigger": record.trigger,
        }
        if record.error:
            fields["error_type"] = record.error_type
            fields["error"] = record.error
        if record.partial is not None:
            fields["partial"] = _bounded(record.partial, 1024)
        if record.result is not None:
            fields["result"] = _bounded(record.result, 1024)
        if record.extra:
            fields.update(record.extra)
        level = "info" if record.outcome in (Outcome.SUCCESS, Outcome.CANCELLED) else "warning"
        getattr(_log, level)("run.finished", **fields)


def _update_breaker(breaker: CircuitBreaker, outcome: Outcome) -> None:
    if outcome is Outcome.SUCCESS:
        breaker.record_success()
    elif outcome.counts_as_failure:
        breaker.record_failure()
    else:  # cancelled: no verdict on the agent's health
        breaker.release_trial()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    if isinstance(exc, GuardError):
        return text
    if not text:
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
        return f"{name}{where}"
    return f"{name}: {text}"[:2000]


def _copy_data(data: dict[str, Any]) -> dict[str, Any]:
    # The agent may mutate its dict freely; the committed record stays untouched until commit.
    return orjson.loads(orjson.dumps(data)) if data else {}


def _loop_extra(loops: LoopGuards) -> dict[str, Any]:
    found = loops.tripped
    if found is None:
        return {}
    return {
        "loop": {"detector": found.detector, "message": found.message, "evidence": found.evidence}
    }


def _bounded(value: Any, limit: int) -> Any:
    """``value`` if its JSON form fits in ``limit`` bytes, else a note saying how big it was."""
    if value is None:
        return None
    size = len(orjson.dumps(value, default=_default))
    return value if size <= limit else {"omitted": f"{size} bytes of JSON, over {limit}"}


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError


def _jsonable(value: Any) -> Any:
    """A JSON-safe copy of an agent's result or partial value (``repr`` when it has none)."""
    if value is None:
        return None
    try:
        return orjson.loads(orjson.dumps(value, default=_default))
    except TypeError:
        return repr(value)[:500]
