"""The engine: one fire of an agent, from admission to the committed record.

    fire -> admission (paused? overlap? circuit open? state readable?) -> global slot
         -> attempts under the deadline (retry with backoff between transient failures)
         -> outcome -> commit (agent data + bookkeeping, one atomic durable write)
         -> breaker, metrics, one ``run.finished`` log line

Cancellation doctrine (anyio): one cancel scope per run covers all attempts; the deadline,
an enforced stall and the daemon (``cancel_all``) all cancel that scope, and the run records
which of them did. The commit afterwards is shielded so a stopped run still leaves valid state.

The path to a run's start is kept short because a shared tick runs it for every agent on one
event loop, one after the other: no task per run besides the run's own, and no timer per run
either (the deadlines and stall checks of all runs in flight share one event-loop timer, which
is why the runner needs asyncio, as the daemon's APScheduler does); the finishing work (record,
commit, trace, log line) waits until every run due at the same time has started.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import math
import random
import secrets
import time
import traceback
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import orjson
from pydantic import BaseModel

from supervisor.clock import Clock
from supervisor.cluster.base import Claim, ClaimStatus, LeaseLost
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

if TYPE_CHECKING:
    from supervisor.cluster.node import ClusterNode

_log = get_logger()
# Every field set by _commit; the values here are placeholders.
_EPOCH = datetime.fromtimestamp(0, UTC)
_LAST_RUN = LastRun.model_construct(
    run_id="", outcome="", started_at=_EPOCH, finished_at=_EPOCH, duration_s=0.0, steps=0,
    attempts=0,
)  # fmt: skip


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

    def restore_breaker(self, snapshot: Any, clock: Clock) -> None:
        """Rebuild the breaker from ``snapshot`` under the spec's circuit settings."""
        g = self.spec.guards
        self.breaker = CircuitBreaker.restore(
            snapshot, g.circuit_failures, g.circuit_cooldown, clock
        )


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
        cluster: ClusterNode | None = None,
    ) -> None:
        self.store = store
        #: cluster mode: every fire is claimed through it, every commit fenced
        self.cluster = cluster
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
        self._watch = _Watch(clock)
        #: set when in_flight drops to 0; made only while someone waits for it
        self._idle: anyio.Event | None = None

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
        return None

    def cancel_all(self) -> int:
        """Cancel every run in flight; each still commits its state. Returns how many."""
        return self._watch.cancel_all()

    async def wait_idle(self) -> None:
        """Return when no run is in flight."""
        if self.in_flight:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    async def fire(
        self,
        slot: AgentSlot,
        planned_at: datetime | None,
        trigger: str = "schedule",
        *,
        abandoned: Claim | None = None,
    ) -> RunRecord | None:
        """One fire of ``slot``'s agent: admit, run, record. Returns None if it was blocked.

        In cluster mode the fire is claimed first (``abandoned``: take over that claim).
        """
        if self.cluster is not None:
            try:
                return await self._fire_clustered(slot, planned_at, trigger, abandoned)
            except Exception:
                _log.exception("run.internal_error", agent=slot.name)
                return None
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
            self._release(slot)

    def _release(self, slot: AgentSlot) -> None:
        slot.running -= 1
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    # -- cluster mode -----------------------------------------------------------------------------

    async def _fire_clustered(
        self,
        slot: AgentSlot,
        planned_at: datetime | None,
        trigger: str,
        abandoned: Claim | None,
    ) -> RunRecord | None:
        """Claim the fire (or take the abandoned claim over), then run it as on one node.

        The claim decides overlap (the agent's run slots are cluster-wide), and the state
        read fresh after it decides pause and circuit: this node's copies may be stale, as
        the previous run may have been another node's. A global slot is taken before the
        claim, so that a node at its ``max_concurrent_runs`` never holds a lease it cannot
        use (and claims later, leaving the fire to idler nodes).
        """
        cluster = self.cluster
        assert cluster is not None
        await self._acquire_slot()
        try:
            if self.stopping or slot.removed:
                return None
            run_id = new_run_id()
            try:
                if abandoned is not None:
                    claim = await cluster.take_over(abandoned, run_id)
                    if claim is None:
                        return None
                else:
                    planned = planned_at if planned_at is not None else self.clock.now()
                    claim = await cluster.claim(
                        slot.name,
                        planned,
                        run_id=run_id,
                        slots=slot.spec.config.max_concurrent,
                        in_flight=self.in_flight,
                    )
            except StateError as exc:
                _log.error(
                    "cluster.claim_failed",
                    agent=slot.name,
                    planned_at=planned_at.isoformat() if planned_at else None,
                    error=str(exc),
                )
                return None
            if claim is None:
                return self._record_skip(
                    slot, Outcome.SKIPPED_CLAIMED_ELSEWHERE, planned_at, trigger, quiet=True
                )
            if claim.status is not ClaimStatus.RUNNING:
                return self._record_skip(slot, Outcome.SKIPPED_OVERLAP, planned_at, trigger)
            slot.running += 1
            self.in_flight += 1
            try:
                return await self._run_claimed(slot, claim, run_id, planned_at, trigger)
            finally:
                self._release(slot)
        finally:
            self.limiter.release()

    async def _run_claimed(
        self,
        slot: AgentSlot,
        claim: Claim,
        run_id: str,
        planned_at: datetime | None,
        trigger: str,
    ) -> RunRecord | None:
        cluster = self.cluster
        assert cluster is not None
        spec = slot.spec
        state = await self.ensure_state(slot, fresh=True)
        if state is None:
            await cluster.finish(claim, "blocked")
            return None
        slot.restore_breaker(state.breaker, self.clock)
        skip = None
        if state.paused:
            skip = Outcome.SKIPPED_PAUSED
        elif not slot.breaker.allow():
            skip = Outcome.SKIPPED_CIRCUIT_OPEN
        if skip is not None:
            await cluster.finish(claim, skip.value)
            return self._record_skip(slot, skip, planned_at, trigger)
        with bind_run(spec.name, run_id), self.metrics.running(spec.name):
            return await self._execute(slot, spec, state, run_id, planned_at, trigger, claim=claim)

    def _record_skip(
        self,
        slot: AgentSlot,
        outcome: Outcome,
        planned_at: datetime | None,
        trigger: str,
        *,
        quiet: bool = False,
    ) -> RunRecord:
        now = self.clock.now()
        lag = (now - planned_at).total_seconds() if planned_at else 0.0
        self.metrics.record_skip(slot.name, outcome, lag if planned_at else None)
        fields: dict[str, Any] = {"agent": slot.name, "outcome": outcome.value, "trigger": trigger}
        if outcome is Outcome.SKIPPED_CIRCUIT_OPEN and slot.breaker.retry_at is not None:
            fields["circuit_retry_at"] = slot.breaker.retry_at.isoformat()
        # A fire another node runs is the normal case in a cluster: not worth a line each.
        (_log.debug if quiet else _log.info)("run.skipped", **fields)
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

    async def ensure_state(self, slot: AgentSlot, *, fresh: bool = False) -> AgentState | None:
        """Load the agent's state once (``fresh``: again, as it is stored now); on a bad file
        block the agent, never touch the file."""
        if slot.state is not None and not fresh:
            return slot.state
        try:
            slot.state = await self.store.load(slot.name)
            slot.blocked = None
        except StateError as exc:
            slot.blocked = str(exc)
            self.metrics.state_error(slot.name, "load")
            kind = "corrupt" if isinstance(exc, StateCorruptError) else "unreadable"
            _log.error("state.load_failed", agent=slot.name, kind=kind, error=str(exc))
            return None
        return slot.state

    # -- the run --------------------------------------------------------------------------------

    async def _acquire_slot(self) -> None:
        """Take a global run slot. No checkpoint when one is free: on a shared tick every run
        would otherwise go round the event loop once more before it starts."""
        try:
            self.limiter.acquire_nowait()
        except anyio.WouldBlock:
            await self.limiter.acquire()

    async def _run_admitted(
        self, slot: AgentSlot, planned_at: datetime | None, trigger: str
    ) -> RunRecord | None:
        spec = slot.spec
        await self._acquire_slot()
        try:
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
        finally:
            self.limiter.release()

    async def _execute(
        self,
        slot: AgentSlot,
        spec: AgentSpec,
        state: AgentState,
        run_id: str,
        planned_at: datetime | None,
        trigger: str,
        *,
        claim: Claim | None = None,
    ) -> RunRecord:
        clock, guards = self.clock, spec.guards
        started_at = clock.now()
        t0 = clock.monotonic()
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
        # The deadline covers every attempt and the backoff between them.
        scope = anyio.CancelScope()
        run = self._watch.start(scope, guards.timeout, loops if loops.watches_stalls else None)
        try:
            if claim is None:
                with scope:
                    outcome, error, result, attempts = await self._attempts(spec, ctx, t0)
            else:
                assert self.cluster is not None
                lost = partial(self._watch.stop, run, _LEASE_LOST)
                async with self.cluster.keep(claim, lost):
                    with scope:
                        outcome, error, result, attempts = await self._attempts(spec, ctx, t0)
        finally:
            reason = self._watch.end(run)
            slot.live = None
        finished_at = clock.now()
        duration = clock.monotonic() - t0
        with anyio.CancelScope(shield=True):
            # Let every run due now start before this one does its finishing work: on a
            # shared tick, the runs after it would otherwise wait for its commit and log line.
            await anyio.lowlevel.checkpoint()
            if scope.cancelled_caught:
                attempts = max(attempts, ctx.attempt)
                if reason == _STALLED and loops.tripped is not None:
                    outcome, error = Outcome.STALLED, loop_error(loops.tripped)
                elif reason == _LEASE_LOST:
                    outcome, error = (
                        Outcome.LEASE_LOST,
                        LeaseLost(
                            "this node lost the fire's lease (paused or cut off from the database "
                            "past it): the run was stopped and its results are not committed"
                        ),
                    )
                elif reason == _TIMEOUT:
                    outcome = Outcome.TIMEOUT
                    error = RunTimeoutError(
                        "the run passed its deadline",
                        limit=guards.timeout,
                        observed=round(duration, 3),
                    )
                else:  # cancel_all
                    outcome, error = Outcome.CANCELLED, None
            elif loops.tripped is not None and outcome in (Outcome.SUCCESS, Outcome.FAILURE):
                # The agent caught the detector's error and went on: the run still ends here.
                outcome, error = Outcome(loops.tripped.outcome), loop_error(loops.tripped)
            record = RunRecord(
                agent=spec.name,
                run_id=run_id,
                outcome=outcome,
                planned_at=planned_at,
                started_at=started_at,
                finished_at=finished_at,
                duration_s=duration,
                lag_s=(started_at - planned_at).total_seconds() if planned_at else 0.0,
                steps=ctx.steps,
                attempts=attempts,
                error=_describe(error) if error else None,
                error_type=type(error).__name__ if error else None,
                partial=ctx.partial_value if outcome is not Outcome.SUCCESS else None,
                result=result,
                trigger=trigger,
                extra=_loop_extra(loops),
            )
            record = await self._commit(slot, state, ctx, record, claim)
        for service in self.services.values():
            end_run = getattr(service, "end_run", None)
            if end_run is not None:
                end_run(run_id)
        if self.traces is not None:
            self._save_trace(record, ctx)
        ctx._release()
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
        self,
        slot: AgentSlot,
        state: AgentState,
        ctx: RunContext,
        record: RunRecord,
        claim: Claim | None = None,
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
        outcome = record.outcome.value
        _update_breaker(slot.breaker, record.outcome)
        breaker = slot.breaker.snapshot()
        keep_data = data is state.data

        def build(base: AgentState) -> AgentState:
            """This run's commit on top of ``base``: the latest committed record, not the one
            the run started from (another run of the agent may have committed meanwhile)."""
            totals = dict(base.totals)
            totals[outcome] = totals.get(outcome, 0) + 1
            # Built unvalidated from typed values (copies with updates are the cheapest way):
            # the store's encoder refuses a field of the wrong type or a value that would not
            # load back, so validating here would do it twice.
            update: dict[str, Any] = {
                "data": base.data if keep_data else data,
                "last_run": _LAST_RUN.model_copy(
                    update={
                        "run_id": record.run_id,
                        "outcome": outcome,
                        "planned_at": record.planned_at,
                        "started_at": record.started_at,
                        "finished_at": record.finished_at,
                        "duration_s": round(record.duration_s, 6),
                        "steps": record.steps,
                        "attempts": record.attempts,
                        "error": record.error,
                        "partial": _jsonable(record.partial),
                        "result": _bounded(record.result, 4096),
                    }
                ),
                "totals": totals,
                "breaker": breaker,
            }
            if record.planned_at is not None:
                update["last_planned_fire"] = record.planned_at
            if record.outcome is Outcome.SUCCESS:
                update["last_success_at"] = record.finished_at
            elif record.error is not None and self.keep_errors:
                entry = ErrorEntry.model_construct(
                    run_id=record.run_id,
                    at=record.finished_at,
                    outcome=outcome,
                    error_type=record.error_type,
                    message=record.error[:2000],
                )
                update["errors"] = [*base.errors, entry][-self.keep_errors :]
            return base.model_copy(update=update)

        try:
            if claim is not None:
                # Built on the stored state, in the fenced transaction: runs of the agent on
                # other nodes and an operator's pause meanwhile are kept.
                assert self.cluster is not None
                written = await self.cluster.commit(claim, outcome, self.store, build)
                if written is None:
                    _log.warning(
                        "run.fenced_out",
                        planned_at=claim.planned_at.isoformat(),
                        fencing_token=claim.fencing_token,
                        run_outcome=outcome,
                        reason="the lease was lost before the commit: results discarded",
                    )
                    extra = {**record.extra, "state_committed": False, "run_outcome": outcome}
                    return replace(record, outcome=Outcome.LEASE_LOST, extra=extra)
                new = written
            else:
                new = build(slot.state or state)
                await self.store.commit(new)
        except StateError as exc:
            self.metrics.state_error(slot.name, "commit")
            _log.error("state.commit_failed", error=str(exc))
            return replace(record, extra={**record.extra, "state_committed": False})
        slot.state = new
        return record

    def _save_trace(self, record: RunRecord, ctx: RunContext) -> None:
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
        # Queued for the trace writer's thread; a write that fails there is logged, not raised:
        # traces are diagnostics, a full disk must not fail the run.
        self.traces.add(record.agent, entry)

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
        if record.planned_at is not None:
            fields["planned_at"] = record.planned_at.isoformat()
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


# Why the watch cancelled a run; cancel_all is the third canceller and outranks both.
_TIMEOUT = "timeout"
_STALLED = "stalled"
_BY_DAEMON = "cancelled"
_LEASE_LOST = "lease_lost"


class _Run:
    """A run in flight, as the watch sees it."""

    __slots__ = ("context", "done", "loops", "reason", "scope")

    def __init__(
        self, scope: anyio.CancelScope, loops: LoopGuards | None, context: contextvars.Context
    ) -> None:
        self.scope: anyio.CancelScope | None = scope
        self.loops = loops
        self.context: contextvars.Context | None = context
        #: who cancelled the scope (_TIMEOUT, _STALLED, _BY_DAEMON), or ""
        self.reason = ""
        self.done = False


class _Watch:
    """The deadlines and stall checks of every run in flight, on one event-loop timer.

    One timer for all runs rather than a timer (or a watchdog task) per run: starting a run is
    on the critical path of a shared tick, and most runs end long before either is due. The
    entries of a run that ended stay in the heap until their time (or a rebuild) and hold
    nothing but the emptied ``_Run``. Stall checks use event-loop time to wait and the runs'
    clock to judge silence: a ``FakeClock`` jumps at once and would declare every run under
    test stalled. A stall check runs in the run's context, so its log lines name the run.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heap: list[tuple[float, int, bool, _Run]] = []
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._at = math.inf
        self._stale = 0
        self.runs: set[_Run] = set()

    def start(self, scope: anyio.CancelScope, timeout: float, loops: LoopGuards | None) -> _Run:
        """Watch a run: cancel ``scope`` after ``timeout`` s, or on an enforced stall."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests): nothing of the old one is due
            self._loop, self._heap, self._handle, self._at = loop, [], None, math.inf
        run = _Run(scope, loops, contextvars.copy_context())
        self.runs.add(run)
        now = loop.time()
        self._push(now + timeout, False, run)
        if loops is not None:
            self._push(now + max(0.0, loops.stall_deadline() - self._clock.monotonic()), True, run)
        return run

    def end(self, run: _Run) -> str:
        """The run is over: forget it; returns who cancelled it ("" when nobody did)."""
        self.runs.discard(run)
        self._stale += 2 if run.loops is not None else 1  # its entries left in the heap
        run.done = True
        run.scope = run.loops = run.context = None
        if self._stale > 1024 and 2 * self._stale > len(self._heap):
            self._heap = [entry for entry in self._heap if not entry[3].done]
            heapq.heapify(self._heap)
            self._stale = 0
        return run.reason

    def stop(self, run: _Run, reason: str) -> None:
        """Cancel one run for ``reason`` (unless it is over or already being stopped)."""
        if not run.done and not run.reason and run.scope is not None:
            run.reason = reason
            run.scope.cancel()

    def cancel_all(self) -> int:
        """Cancel every run in flight; returns how many."""
        for run in self.runs:
            run.reason = _BY_DAEMON
            assert run.scope is not None
            run.scope.cancel()
        return len(self.runs)

    def _push(self, when: float, stall: bool, run: _Run) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), stall, run))
        if when < self._at:
            assert self._loop is not None
            if self._handle is not None:
                self._handle.cancel()
            self._at = when
            self._handle = self._loop.call_at(when, self._due)

    def _due(self) -> None:
        assert self._loop is not None
        self._handle, self._at = None, math.inf
        heap, now = self._heap, self._loop.time()
        try:
            while heap and heap[0][0] <= now:
                _, _, stall, run = heapq.heappop(heap)
                if run.done:
                    self._stale -= 1
                elif stall:
                    assert run.context is not None
                    run.context.run(self._check_stall, run)
                elif not run.reason:
                    run.reason = _TIMEOUT
                    assert run.scope is not None
                    run.scope.cancel()
        except Exception:  # a detector that raised must not stop every later deadline
            _log.exception("run.watch_failed")
        finally:
            if heap and self._handle is None:
                self._at = heap[0][0]
                self._handle = self._loop.call_at(self._at, self._due)

    def _check_stall(self, run: _Run) -> None:
        loops, loop = run.loops, self._loop
        assert loops is not None and loop is not None and run.scope is not None
        if loops.stall_deadline() <= self._clock.monotonic():
            found = loops.check_stall()
            if found is not None and found.enforced:
                run.reason = run.reason or _STALLED
                run.scope.cancel()
                return
        # Touched since, or warned: look again at the next deadline, never in a spin.
        delay = loops.stall_deadline() - self._clock.monotonic()
        if not math.isinf(delay):
            self._push(loop.time() + max(delay, 0.001), True, run)


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
