"""Every error the supervisor raises, under one root.

    SupervisorError
    ├── ConfigError                  config file unreadable or invalid (carries every problem)
    ├── StateError                   the state store failed
    │   ├── StateCorruptError        a state file exists but does not parse; never overwritten
    │   └── StateWriteError          a durable write failed (disk full, permissions)
    ├── GuardError                   a guard stopped the run; carries the limit and observed value
    │   ├── RunTimeoutError          the run passed its deadline           -> outcome timeout
    │   ├── MaxStepsExceeded         the run asked for one step too many   -> outcome max_steps
    │   ├── BudgetExceeded           a spend limit would be passed -> outcome budget_exceeded
    │   └── LoopDetected             same call repeated / steps without progress
    │       │                                                       -> outcome loop_detected
    │       └── RunStalled           no step and no call for too long -> outcome stalled
    ├── LLMError                     a guarded LLM call failed
    │   ├── ProviderError            one provider attempt failed (translated from httpx2/HTTP)
    │   │   ├── ProviderTimeout      connect/read/write/pool timeout, or a stream went idle
    │   │   ├── ProviderConnectionError  connect refused, reset, protocol error
    │   │   ├── ProviderStatusError  an HTTP error status (``status``; ``retry_after``)
    │   │   └── MalformedResponse    the body is not the wire format we expect
    │   ├── CallRefused              refused before any network traffic (unpriced model,
    │   │                            alias not allowed, rate limit wait too long, circuit open)
    │   ├── OutputInvalid            the answer failed the caller's schema, after repair
    │   └── LadderExhausted          every tier of the alias failed; ``hops`` says why each
    └── AgentError                   raised by agent code to classify its own failure
        ├── TransientError           worth retrying (run-level retry applies)
        └── PermanentError           never retried

Any other exception escaping an agent is a ``failure`` and is not retried, unless the agent's
``guards.retry.transient`` config lists its class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class SupervisorError(Exception):
    """Root of every error raised by agent-supervisor."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem in a config file: where it is and what is wrong."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(SupervisorError):
    """The config is invalid; ``problems`` lists every problem found, each with file:line."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class StateError(SupervisorError):
    """The state store could not read or write an agent's state."""

    def __init__(self, agent: str, message: str) -> None:
        self.agent = agent
        super().__init__(f"agent {agent!r}: {message}")


class StateCorruptError(StateError):
    """A state file exists but cannot be parsed; it is left untouched for a human."""


class StateWriteError(StateError):
    """A durable write failed; the previous state on disk is still intact."""


class GuardError(SupervisorError):
    """A guard stopped a run. ``limit`` is the configured bound, ``observed`` what was seen."""

    def __init__(self, message: str, *, limit: float, observed: float) -> None:
        self.limit = limit
        self.observed = observed
        super().__init__(f"{message} (limit {limit:g}, observed {observed:g})")


class RunTimeoutError(GuardError):
    """The run passed its deadline and was cancelled."""


class MaxStepsExceeded(GuardError):
    """The run asked for a step past its max-steps limit."""


class BudgetExceeded(GuardError):
    """A spend limit would be passed; reserved for the budget guard."""


class LLMError(SupervisorError):
    """A guarded LLM call failed."""


class ProviderError(LLMError):
    """One attempt against one provider failed.

    ``transient`` says whether the same request may succeed later (retry, or next tier);
    ``retry_after`` is the provider's requested wait in seconds, when it gave one.
    """

    transient: bool = True

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        transient: bool | None = None,
    ) -> None:
        self.provider = provider
        self.status = status
        self.retry_after = retry_after
        if transient is not None:
            self.transient = transient
        super().__init__(f"{provider}: {message}")


class ProviderTimeout(ProviderError):
    """A connect, read, write or pool timeout, or a stream idle longer than the read timeout."""


class ProviderConnectionError(ProviderError):
    """The connection failed or was reset."""


class ProviderStatusError(ProviderError):
    """The provider answered with an error status; 408, 409, 429 and 5xx are transient."""


class MalformedResponse(ProviderError):
    """The body did not follow the provider's wire format."""


class CallRefused(LLMError):
    """The call was refused before any network traffic; ``reason`` is a metric label."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class OutputInvalid(LLMError):
    """The model's answer failed the caller's schema, even after one repair attempt."""


class LadderExhausted(LLMError):
    """Every tier of the alias failed; ``hops`` lists ``(tier, reason)`` in order."""

    def __init__(self, alias: str, hops: list[tuple[str, str]]) -> None:
        self.alias = alias
        self.hops = hops
        detail = "; ".join(f"{tier}: {reason}" for tier, reason in hops)
        super().__init__(f"every tier of {alias!r} failed: {detail}")


class LoopDetected(GuardError):
    """A loop detector stopped the run; ``detector`` names it, ``evidence`` says what it saw."""

    def __init__(
        self,
        message: str,
        *,
        limit: float,
        observed: float,
        detector: str = "repeat",
        evidence: dict[str, Any] | None = None,
    ) -> None:
        self.detector = detector
        self.evidence = evidence or {}
        super().__init__(message, limit=limit, observed=observed)


class RunStalled(LoopDetected):
    """The run made no step and no external call for longer than its stall limit."""


class AgentError(SupervisorError):
    """Base for errors an agent raises to classify its own failure."""


class TransientError(AgentError):
    """A failure worth retrying: the run-level retry guard applies.

    ``retry_after`` (seconds) asks for at least that long before the next attempt.
    """

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class PermanentError(AgentError):
    """A failure that retrying cannot fix; never retried."""
