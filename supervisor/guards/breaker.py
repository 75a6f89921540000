"""Per-agent circuit breaker: stop firing an agent that keeps failing, then try it again.

After ``threshold`` consecutive failed runs the circuit opens and fires are skipped. Once
``cooldown`` has passed, one trial run is let through (half-open): its success closes the
circuit, its failure opens it again for another cool-down. The state is persisted through
``BreakerSnapshot`` so that a restart does not reset an open circuit.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum

from supervisor.clock import Clock, Duration, seconds
from supervisor.guards.base import check_non_negative
from supervisor.state.base import BreakerSnapshot


class CircuitState(StrEnum):
    """Where a circuit breaker stands."""

    #: runs are allowed; consecutive failures are counted
    CLOSED = "closed"
    #: runs are refused until the cool-down has passed
    OPEN = "open"
    #: one trial run is in flight; its verdict closes or reopens the circuit
    HALF_OPEN = "half_open"

    @property
    def code(self) -> int:
        """Numeric value for a gauge: closed 0, half-open 1, open 2."""
        return _CODES[self]


_CODES = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


class CircuitBreaker:
    """Counts consecutive failures and decides whether the next run may start.

    ``threshold`` 0 disables the breaker: ``allow()`` is always true. Raises ``ValueError``
    on a negative threshold or cool-down.
    """

    __slots__ = ("_clock", "_cooldown", "_failures", "_opened_at", "_state", "_threshold")

    def __init__(self, threshold: int, cooldown: Duration, clock: Clock) -> None:
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self._threshold = threshold
        cooldown_s = seconds(cooldown)
        check_non_negative("cooldown", cooldown_s)
        self._cooldown = timedelta(seconds=cooldown_s)
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at: datetime | None = None

    @classmethod
    def restore(
        cls, snapshot: BreakerSnapshot, threshold: int, cooldown: Duration, clock: Clock
    ) -> CircuitBreaker:
        """A breaker in the persisted state, under the current config.

        A persisted half-open circuit comes back open: its trial died with the old process,
        and the next ``allow()`` after the cool-down starts a new one. Raises ``ValueError``
        on an unknown state name.
        """
        breaker = cls(threshold, cooldown, clock)
        try:
            state = CircuitState(snapshot.state)
        except ValueError:
            raise ValueError(f"unknown circuit breaker state {snapshot.state!r}") from None
        breaker._failures = max(0, snapshot.consecutive_failures)
        if state is CircuitState.CLOSED or threshold == 0:
            return breaker
        opened_at = snapshot.opened_at
        if opened_at is None:
            # An open circuit with no opening time: start the cool-down now rather than guess.
            opened_at = clock.now()
        elif opened_at.tzinfo is None:
            # Every time we write is UTC; a naive one would fail to compare with clock.now().
            opened_at = opened_at.replace(tzinfo=UTC)
        breaker._state = CircuitState.OPEN
        breaker._opened_at = opened_at
        return breaker

    @property
    def state(self) -> CircuitState:
        """The current state."""
        return self._state

    @property
    def consecutive_failures(self) -> int:
        """Failures recorded since the last success."""
        return self._failures

    @property
    def opened_at(self) -> datetime | None:
        """When the circuit last opened, or None while it is closed."""
        return self._opened_at

    @property
    def retry_at(self) -> datetime | None:
        """When the next trial run is allowed, or None unless the circuit is open."""
        if self._state is not CircuitState.OPEN or self._opened_at is None:
            return None
        return self._opened_at + self._cooldown

    @property
    def trial_in_flight(self) -> bool:
        """True while a half-open trial run has been allowed and has no verdict yet."""
        return self._state is CircuitState.HALF_OPEN

    def allow(self) -> bool:
        """Whether a run may start now; after the cool-down, let exactly one trial through."""
        if self._threshold == 0 or self._state is CircuitState.CLOSED:
            return True
        if self._state is CircuitState.HALF_OPEN:
            return False
        retry_at = self.retry_at
        if retry_at is not None and self._clock.now() >= retry_at:
            self._state = CircuitState.HALF_OPEN
            return True
        return False

    def record_success(self) -> None:
        """A run succeeded: close the circuit and reset the failure count."""
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = None

    def record_failure(self) -> None:
        """A run failed: count it; open the circuit at the threshold or when a trial failed."""
        self._failures += 1
        if self._threshold == 0:
            return
        if self._state is CircuitState.HALF_OPEN or (
            self._state is CircuitState.CLOSED and self._failures >= self._threshold
        ):
            self._state = CircuitState.OPEN
            self._opened_at = self._clock.now()
        # Already open: a run that started before the circuit opened finished late; it does
        # not extend the cool-down.

    def release_trial(self) -> None:
        """The trial ended without a verdict (e.g. cancelled): reopen, keeping ``opened_at``.

        The cool-down has already passed, so the next ``allow()`` starts a new trial.
        """
        if self._state is CircuitState.HALF_OPEN:
            self._state = CircuitState.OPEN

    def snapshot(self) -> BreakerSnapshot:
        """The state to persist."""
        return BreakerSnapshot(
            state=self._state.value,
            consecutive_failures=self._failures,
            opened_at=self._opened_at,
        )

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(state={self._state.value}, failures={self._failures}, "
            f"threshold={self._threshold}, opened_at={self._opened_at!r})"
        )
