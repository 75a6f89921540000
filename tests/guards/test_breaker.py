"""Circuit breaker: opening, cool-down, the single half-open trial, persistence."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from supervisor.guards.breaker import CircuitBreaker, CircuitState
from supervisor.state.base import BreakerSnapshot
from supervisor.testing import FakeClock

COOLDOWN = 60.0


def _open(breaker: CircuitBreaker, failures: int) -> None:
    for _ in range(failures):
        breaker.record_failure()


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock at the default start time."""
    return FakeClock()


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    """A breaker that opens after 3 failures and cools down for 60 s."""
    return CircuitBreaker(threshold=3, cooldown=COOLDOWN, clock=clock)


def test_state_codes_for_gauge() -> None:
    """Gauge codes are closed 0, half-open 1, open 2; values are the persisted names."""
    assert [s.code for s in CircuitState] == [0, 2, 1]
    assert [s.value for s in CircuitState] == ["closed", "open", "half_open"]


@pytest.mark.parametrize(
    ("threshold", "cooldown"),
    [pytest.param(-1, 1.0, id="negative-threshold"), pytest.param(1, -1.0, id="negative-cooldown")],
)
def test_rejects_invalid_config(clock: FakeClock, threshold: int, cooldown: float) -> None:
    """A negative threshold or cool-down is a ValueError."""
    with pytest.raises(ValueError):
        CircuitBreaker(threshold, cooldown, clock)


def test_opens_after_threshold_consecutive_failures(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    """Failures below the threshold keep it closed; the threshold-th opens it at now."""
    _open(breaker, 2)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    assert breaker.consecutive_failures == 3
    assert breaker.opened_at == clock.now()
    assert breaker.retry_at == clock.now() + timedelta(seconds=COOLDOWN)


def test_success_resets_failure_count(breaker: CircuitBreaker) -> None:
    """A success in between means the failures are no longer consecutive."""
    _open(breaker, 2)
    breaker.record_success()
    assert breaker.consecutive_failures == 0
    _open(breaker, 2)
    assert breaker.state is CircuitState.CLOSED


def test_open_denies_until_cooldown(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """An open circuit refuses runs until the cool-down has fully passed."""
    _open(breaker, 3)
    assert not breaker.allow()
    clock.advance(COOLDOWN - 0.001)
    assert not breaker.allow()
    assert breaker.state is CircuitState.OPEN


def test_one_trial_after_cooldown(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """After the cool-down exactly one trial is allowed; others are refused while it runs."""
    _open(breaker, 3)
    clock.advance(COOLDOWN)
    assert breaker.allow()
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.trial_in_flight
    assert breaker.retry_at is None
    assert not breaker.allow()
    clock.advance(3600)
    assert not breaker.allow()


def test_failed_trial_reopens_with_new_opened_at(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """A failed trial opens the circuit again for a fresh cool-down from now."""
    _open(breaker, 3)
    first_opened = breaker.opened_at
    clock.advance(COOLDOWN + 5)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    assert breaker.opened_at == clock.now()
    assert breaker.opened_at != first_opened
    assert breaker.consecutive_failures == 4
    assert not breaker.allow()
    clock.advance(COOLDOWN)
    assert breaker.allow()


def test_successful_trial_closes(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """A successful trial closes the circuit and clears the count and opening time."""
    _open(breaker, 3)
    clock.advance(COOLDOWN)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.consecutive_failures == 0
    assert breaker.opened_at is None
    assert breaker.retry_at is None
    assert breaker.allow()


def test_release_trial_allows_a_new_trial(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """A trial ended without a verdict reopens with the old opened_at; the next allow trials."""
    _open(breaker, 3)
    opened_at = breaker.opened_at
    clock.advance(COOLDOWN)
    assert breaker.allow()
    breaker.release_trial()
    assert breaker.state is CircuitState.OPEN
    assert breaker.opened_at == opened_at
    assert breaker.consecutive_failures == 3
    assert breaker.allow()
    assert breaker.state is CircuitState.HALF_OPEN


def test_release_trial_outside_half_open_is_a_no_op(breaker: CircuitBreaker) -> None:
    """Releasing with no trial in flight changes nothing."""
    breaker.release_trial()
    assert breaker.state is CircuitState.CLOSED


def test_late_failure_while_open_does_not_extend_cooldown(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    """A failure recorded while already open counts but keeps the opening time."""
    _open(breaker, 3)
    opened_at = breaker.opened_at
    clock.advance(10)
    breaker.record_failure()
    assert breaker.opened_at == opened_at
    assert breaker.consecutive_failures == 4


def test_threshold_zero_disables(clock: FakeClock) -> None:
    """Threshold 0 never opens and always allows."""
    breaker = CircuitBreaker(threshold=0, cooldown=COOLDOWN, clock=clock)
    _open(breaker, 100)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.allow()
    assert breaker.allow()


def test_cooldown_accepts_timedelta(clock: FakeClock) -> None:
    """The cool-down may be given as a timedelta."""
    breaker = CircuitBreaker(threshold=1, cooldown=timedelta(minutes=2), clock=clock)
    breaker.record_failure()
    assert breaker.retry_at == clock.now() + timedelta(minutes=2)


def test_snapshot_restore_round_trip_open(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """An open circuit survives a restart with its count and opening time."""
    _open(breaker, 3)
    snap = breaker.snapshot()
    assert snap == BreakerSnapshot(state="open", consecutive_failures=3, opened_at=clock.now())
    restored = CircuitBreaker.restore(snap, threshold=3, cooldown=COOLDOWN, clock=clock)
    assert restored.state is CircuitState.OPEN
    assert restored.consecutive_failures == 3
    assert restored.opened_at == breaker.opened_at
    assert not restored.allow()
    clock.advance(COOLDOWN)
    assert restored.allow()


def test_snapshot_restore_round_trip_closed(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """A closed circuit keeps its failure count across a restart."""
    _open(breaker, 2)
    restored = CircuitBreaker.restore(breaker.snapshot(), 3, COOLDOWN, clock)
    assert restored.state is CircuitState.CLOSED
    assert restored.consecutive_failures == 2
    restored.record_failure()
    assert restored.state is CircuitState.OPEN


def test_half_open_restores_as_open(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """A trial that died with the process does not block: restored open, trial allowed."""
    _open(breaker, 3)
    clock.advance(COOLDOWN)
    assert breaker.allow()
    snap = breaker.snapshot()
    assert snap.state == "half_open"
    restored = CircuitBreaker.restore(snap, 3, COOLDOWN, clock)
    assert restored.state is CircuitState.OPEN
    assert restored.opened_at == breaker.opened_at
    assert restored.allow()
    assert restored.state is CircuitState.HALF_OPEN


def test_restore_survives_json_round_trip(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """A snapshot written as JSON and read back restores the same breaker."""
    _open(breaker, 3)
    snap = BreakerSnapshot.model_validate_json(breaker.snapshot().model_dump_json())
    restored = CircuitBreaker.restore(snap, 3, COOLDOWN, clock)
    assert restored.opened_at == breaker.opened_at
    assert restored.retry_at == breaker.retry_at


def test_restore_open_without_opened_at_starts_cooldown_now(clock: FakeClock) -> None:
    """An open snapshot missing its opening time starts a fresh cool-down."""
    snap = BreakerSnapshot(state="open", consecutive_failures=5, opened_at=None)
    restored = CircuitBreaker.restore(snap, 3, COOLDOWN, clock)
    assert restored.opened_at == clock.now()
    assert not restored.allow()


def test_restore_naive_opened_at_is_read_as_utc(clock: FakeClock) -> None:
    """A naive opening time is taken as UTC so it compares with the clock."""
    naive = clock.now().replace(tzinfo=None)
    snap = BreakerSnapshot(state="open", consecutive_failures=3, opened_at=naive)
    restored = CircuitBreaker.restore(snap, 3, COOLDOWN, clock)
    assert restored.opened_at == naive.replace(tzinfo=UTC)
    assert not restored.allow()


def test_restore_with_breaker_now_disabled_is_closed(clock: FakeClock) -> None:
    """If the config now disables the breaker, a persisted open circuit comes back closed."""
    snap = BreakerSnapshot(
        state="open", consecutive_failures=3, opened_at=datetime(2026, 1, 1, tzinfo=UTC)
    )
    restored = CircuitBreaker.restore(snap, 0, COOLDOWN, clock)
    assert restored.state is CircuitState.CLOSED
    assert restored.allow()


def test_restore_rejects_unknown_state(clock: FakeClock) -> None:
    """An unknown state name is a ValueError."""
    with pytest.raises(ValueError, match="unknown circuit breaker state"):
        CircuitBreaker.restore(BreakerSnapshot(state="ajar"), 3, COOLDOWN, clock)
