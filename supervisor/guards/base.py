"""The guard family: small, synchronous state machines that bound what a run may do.

Each guard is pure bookkeeping with no I/O of its own; the runner asks it a question before
or after a piece of work and acts on the answer. Time, where a guard needs it, comes from an
injected ``Clock`` so that tests drive it with ``FakeClock``.

    retry.py     RetryPolicy, is_transient, retry_call   how often and how long to try again
    breaker.py   CircuitBreaker, CircuitState            stop firing an agent that keeps failing
    steps.py     StepCounter                             bound the steps one run may take

A guard that stops a run raises a ``GuardError`` subclass carrying the limit and the
observed value; configuration mistakes raise ``ValueError`` at construction.
"""

from __future__ import annotations

import math


def check_non_negative(name: str, value: float, *, finite: bool = True) -> None:
    """Raise ``ValueError`` unless ``value`` is >= 0 (and finite when ``finite``)."""
    # ``not value >= 0`` also rejects NaN, which every ordinary comparison lets through.
    if not value >= 0 or (finite and math.isinf(value)):
        kind = "a finite number >= 0" if finite else "a number >= 0"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
