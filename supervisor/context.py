"""``RunContext``: everything an agent gets from the supervisor for one run.

The agent contract::

    async def my_agent(ctx: RunContext, params: MyParams) -> Any:
        with ctx.step("fetch"):
            ...
        ctx.state["cursor"] = 42        # committed atomically when the run ends
        ctx.partial({"done": 10})       # kept if a guard stops the run early
        ctx.log.info("fetched", items=10)

Every external call goes through ``ctx`` so the guards see it. LLM calls (``ctx.llm``), the
egress-limited HTTP client (``ctx.http``) and exactly-once side effects (``ctx.effect``) are
services the runner plugs in; a context built without them says so clearly when used.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterator, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any

import anyio

from supervisor.clock import Clock
from supervisor.effects.untrusted import untrusted
from supervisor.errors import SupervisorError
from supervisor.guards.loops import LoopGuards, fingerprint, loop_error
from supervisor.guards.steps import StepCounter

#: most trace events kept per run (steps, calls, effects); older ones are counted, not kept
TRACE_LIMIT = 500


class Step:
    """One unit of work. Counting happens when ``ctx.step()`` is called; ``with`` also times it."""

    __slots__ = ("_ctx", "_started", "name", "number")

    def __init__(self, ctx: RunContext, name: str, number: int) -> None:
        self._ctx = ctx
        self.name = name
        self.number = number
        self._started = ctx.clock.monotonic()

    def __enter__(self) -> Step:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        took = self._ctx.clock.monotonic() - self._started
        self._ctx.trace_event(
            "step.end",
            name=self.name,
            n=self.number,
            duration_s=round(took, 6),
            error=type(exc).__name__ if exc is not None else None,
        )


class RunContext:
    """The agent's handle on the supervisor for one run."""

    def __init__(
        self,
        *,
        agent: str,
        run_id: str,
        state: dict[str, Any],
        steps: StepCounter,
        clock: Clock,
        log: Any,
        deadline: float = math.inf,
        cleanup_grace: float = 5.0,
        planned_at: datetime | None = None,
        services: Mapping[str, Any] | None = None,
        config: Any = None,
        loops: LoopGuards | None = None,
    ) -> None:
        self.agent = agent
        self.run_id = run_id
        #: the agent's own persistent data; committed atomically when the run ends
        self.state = state
        self.clock = clock
        #: structured logger bound to ``agent`` and ``run_id``
        self.log = log
        #: monotonic time (``clock.monotonic()``) at which the run is cancelled
        self.deadline = deadline
        self.planned_at = planned_at
        #: the attempt number within this run (1 = first try)
        self.attempt = 1
        self._steps = steps
        self._cleanup_grace = cleanup_grace
        #: the agent's validated config entry (``AgentConfig``); services read their
        #: per-agent settings (allowed aliases, budgets) from it
        self.config = config
        self._bound: dict[str, Any] = {}
        #: loop and stall detectors of this run (None: not watched)
        self.loops = loops
        self._services = dict(services or {})
        self._partial: Any = None
        self._has_partial = False
        self.trace: deque[dict[str, Any]] = deque(maxlen=TRACE_LIMIT)
        self.trace_dropped = 0

    # -- the contract -----------------------------------------------------------------------

    def step(self, name: str) -> Step:
        """Count one unit of work named ``name``.

        Raises ``MaxStepsExceeded`` when this step is past the agent's max-steps limit, and
        ``LoopDetected`` when the run has made too many steps that change nothing.
        """
        if self.loops is not None:
            found = self.loops.on_step(name, self.state)
            if found is not None and found.enforced:
                raise loop_error(found)
        number = self._steps.step(name)
        self.trace_event("step", name=name, n=number)
        return Step(self, name, number)

    @property
    def steps(self) -> int:
        """Steps taken so far in this run (all attempts)."""
        return self._steps.count

    def partial(self, value: Any) -> None:
        """Remember ``value`` as the run's result if a guard stops it early."""
        self._partial = value
        self._has_partial = True

    @property
    def partial_value(self) -> Any:
        return self._partial

    @property
    def has_partial(self) -> bool:
        return self._has_partial

    def time_left(self) -> float:
        """Seconds until the run's deadline."""
        return self.deadline - self.clock.monotonic()

    @contextlib.contextmanager
    def cleanup(self) -> Iterator[anyio.CancelScope]:
        """Shield cleanup code from cancellation, for at most the cleanup grace.

        Use in a ``finally:`` block: awaits inside still work after a timeout or shutdown
        cancelled the run, but the whole block is cut off after ``cleanup_grace`` seconds.
        """
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + self._cleanup_grace
            yield scope

    # -- services plugged in by the runner ----------------------------------------------------

    @property
    def llm(self) -> Any:
        """Guarded LLM calls."""
        return self._service("llm")

    @property
    def http(self) -> Any:
        """The agent's egress-limited HTTP client."""
        return self._service("http")

    async def effect(self, kind: str, key: str, fn: Any, **options: Any) -> Any:
        """Perform a side effect at most once per ``(agent, kind, key)``."""
        service = self._service("effects", "effect")
        fp = fingerprint(kind, key)
        self.call_started("effect", fp)
        failed = True
        try:
            result = await service.run(self, kind, key, fn, **options)
            failed = False
            return result
        finally:
            self.call_finished("effect", fp, failed=failed)

    def untrusted(self, text: str, *, limit: int = 4000, label: str = "external") -> str:
        """Length-limit and delimit external text before it goes into a prompt.

        Injection-like phrasing is flagged (logged and counted), not removed: this is defence
        in depth; least privilege and approval are the real defence.
        """
        out = untrusted(text, limit=limit, label=label)
        if out.flags:
            self.log.warning("untrusted.flagged", label=label, flags=list(out.flags))
            self.trace_event("untrusted.flagged", label=label, flags=list(out.flags))
            metrics = self._services.get("metrics")
            if metrics is not None:
                for flag in out.flags:
                    metrics.untrusted_flag(self.agent, flag)
        return out.text

    # -- loop guards, for the services --------------------------------------------------------

    def call_started(self, kind: str, fp: str) -> None:
        """An external call of ``kind`` with fingerprint ``fp`` is about to be made.

        Raises ``LoopDetected`` when the loop guards refuse it (it would repeat too often).
        """
        if self.loops is not None:
            found = self.loops.before_call(kind, fp)
            if found is not None and found.enforced:
                raise loop_error(found)

    def call_finished(
        self, kind: str, fp: str, response_fp: str | None = None, *, failed: bool = False
    ) -> None:
        """The call announced by ``call_started`` ended; ``response_fp`` fingerprints its answer."""
        if self.loops is not None:
            self.loops.after_call(kind, fp, response_fp, failed=failed)

    def touch(self, activity: str, detail: str | None = None, *, grace: float = 0.0) -> None:
        """A sign of life that is not a step or a call (a backoff, a wait, a streamed chunk)."""
        if self.loops is not None:
            self.loops.touch(activity, detail, grace=grace)

    def _service(self, name: str, attr: str | None = None) -> Any:
        bound = self._bound.get(name)
        if bound is not None:
            return bound
        try:
            service = self._services[name]
        except KeyError:
            raise SupervisorError(
                f"agent {self.agent!r} run {self.run_id}: ctx.{attr or name} is not configured"
            ) from None
        # A daemon-wide service hands each run its own view (charged to this agent and run).
        bound = service.for_run(self) if hasattr(service, "for_run") else service
        self._bound[name] = bound
        return bound

    def _release(self) -> None:
        """The run is over: drop the links back to this context (loop guards, service views).

        They form reference cycles that only the cyclic collector would free; a shared tick
        would leave a thousand of them behind at once.
        """
        self.loops = None
        self._bound.clear()

    # -- tracing ------------------------------------------------------------------------------

    def trace_event(self, kind: str, **fields: Any) -> None:
        """Append an event to the run's trace (the newest ``TRACE_LIMIT`` events are kept)."""
        if len(self.trace) == TRACE_LIMIT:
            # The newest events say most about how a run ended: the deque drops the oldest.
            self.trace_dropped += 1
        fields["kind"] = kind
        fields["t"] = round(self.clock.monotonic(), 6)
        self.trace.append(fields)
