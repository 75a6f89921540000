"""Guards that bound a run: retry, circuit breaker and max steps (see ``base`` for the family)."""

from __future__ import annotations

from supervisor.guards.breaker import CircuitBreaker, CircuitState
from supervisor.guards.retry import RetryPolicy, is_transient, retry_call
from supervisor.guards.steps import StepCounter

__all__ = [
    "CircuitBreaker",
    "CircuitState",
    "RetryPolicy",
    "StepCounter",
    "is_transient",
    "retry_call",
]
