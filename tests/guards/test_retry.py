"""Retry policy: backoff bounds, give-up rules, transient classification and the retry loop."""

from __future__ import annotations

import asyncio
import random

import pytest

from supervisor.errors import (
    BudgetExceeded,
    GuardError,
    MaxStepsExceeded,
    PermanentError,
    RunTimeoutError,
    SupervisorError,
    TransientError,
)
from supervisor.guards.retry import RetryPolicy, is_transient, retry_call
from supervisor.testing import FakeClock


class _RateLimited(TransientError):
    """A transient error subclass, as an LLM provider layer would raise on HTTP 429."""


# --- RetryPolicy -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"max_attempts": 0}, "max_attempts", id="zero-attempts"),
        pytest.param({"max_attempts": True}, "max_attempts", id="bool-attempts"),
        pytest.param({"base_delay": -1.0}, "base_delay", id="negative-base"),
        pytest.param({"max_delay": -0.5}, "max_delay", id="negative-cap"),
        pytest.param({"max_total": -1.0}, "max_total", id="negative-total"),
        pytest.param({"base_delay": float("nan")}, "base_delay", id="nan-base"),
        pytest.param({"max_delay": float("inf")}, "max_delay", id="infinite-cap"),
    ],
)
def test_policy_rejects_invalid_bounds(kwargs: dict[str, object], match: str) -> None:
    """An impossible bound is a ValueError naming the field."""
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_accepts_infinite_total() -> None:
    """An infinite total budget means no time limit."""
    policy = RetryPolicy(max_attempts=3, max_total=float("inf"), jitter=False)
    assert policy.next_delay(2, elapsed=1e9) == 2.0


def test_default_policy_does_not_retry() -> None:
    """The default policy has one attempt, so the first failure gives up."""
    assert RetryPolicy().next_delay(1, elapsed=0.0) is None


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 6, 7, 8, 20, 100])
def test_jittered_backoff_stays_within_bounds(attempt: int) -> None:
    """Full jitter draws every delay from [0, min(cap, base * 2**(attempt-1))]."""
    policy = RetryPolicy(max_attempts=200, base_delay=0.5, max_delay=10.0)
    upper = min(10.0, 0.5 * 2 ** (attempt - 1))
    delays = [policy.backoff(attempt, random.Random(seed)) for seed in range(500)]
    assert all(0.0 <= d <= upper for d in delays)
    # Full jitter spreads over the whole range rather than clustering near the top.
    assert min(delays) < upper * 0.1
    assert max(delays) > upper * 0.9


def test_jittered_backoff_is_reproducible_with_a_seed() -> None:
    """The same seed gives the same delay."""
    policy = RetryPolicy(max_attempts=5)
    assert policy.backoff(3, random.Random(7)) == policy.backoff(3, random.Random(7))


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [
        pytest.param(1, 1.0, id="first"),
        pytest.param(2, 2.0, id="doubles"),
        pytest.param(3, 4.0, id="doubles-again"),
        pytest.param(6, 32.0, id="below-cap"),
        pytest.param(7, 60.0, id="capped"),
        pytest.param(10_000, 60.0, id="huge-attempt-capped"),
    ],
)
def test_backoff_without_jitter_is_exact(attempt: int, expected: float) -> None:
    """Without jitter the delay is base * 2**(attempt-1), capped at max_delay."""
    policy = RetryPolicy(max_attempts=20_000, base_delay=1.0, max_delay=60.0, jitter=False)
    assert policy.backoff(attempt) == expected


def test_backoff_rejects_attempt_zero() -> None:
    """Attempts are numbered from 1."""
    with pytest.raises(ValueError, match="1-based"):
        RetryPolicy(max_attempts=3).backoff(0)


def test_next_delay_stops_at_max_attempts() -> None:
    """After the last allowed attempt fails there is no next delay."""
    policy = RetryPolicy(max_attempts=3, base_delay=1.0, jitter=False)
    assert policy.next_delay(1, elapsed=0.0) == 1.0
    assert policy.next_delay(2, elapsed=1.0) == 2.0
    assert policy.next_delay(3, elapsed=3.0) is None


def test_next_delay_gives_up_past_total_budget() -> None:
    """A delay that would end past max_total gives up; one that ends exactly on it does not."""
    policy = RetryPolicy(max_attempts=10, base_delay=4.0, max_total=10.0, jitter=False)
    assert policy.next_delay(1, elapsed=6.0) == 4.0
    assert policy.next_delay(1, elapsed=6.5) is None


def test_retry_after_is_a_floor_on_the_delay() -> None:
    """A Retry-After longer than the backoff wins, and is not capped by max_delay."""
    policy = RetryPolicy(max_attempts=3, base_delay=1.0, max_delay=5.0, jitter=False)
    assert policy.next_delay(1, elapsed=0.0, retry_after=30.0) == 30.0
    assert policy.next_delay(1, elapsed=0.0, retry_after=0.5) == 1.0


def test_retry_after_beyond_total_budget_gives_up() -> None:
    """A Retry-After that would end past max_total gives up."""
    policy = RetryPolicy(max_attempts=3, base_delay=1.0, max_total=60.0, jitter=False)
    assert policy.next_delay(1, elapsed=10.0, retry_after=120.0) is None


# --- is_transient ------------------------------------------------------------------------


class _Flaky(Exception):
    """A third-party error an agent's config lists as transient."""


class _FlakierStill(_Flaky):
    """A subclass of a listed class."""


@pytest.mark.parametrize(
    ("exc", "extra", "expected"),
    [
        pytest.param(TransientError("x"), (), True, id="transient"),
        pytest.param(_RateLimited("slow down"), (), True, id="transient-subclass"),
        pytest.param(PermanentError("x"), (), False, id="permanent"),
        pytest.param(PermanentError("x"), (PermanentError,), False, id="permanent-even-if-listed"),
        pytest.param(PermanentError("x"), (Exception,), False, id="permanent-even-if-base-listed"),
        pytest.param(RunTimeoutError("t", limit=1, observed=2), (), False, id="timeout-guard"),
        pytest.param(MaxStepsExceeded("s", limit=1, observed=2), (), False, id="max-steps-guard"),
        pytest.param(
            BudgetExceeded("b", limit=1, observed=2),
            (GuardError,),
            False,
            id="guard-even-if-listed",
        ),
        pytest.param(SupervisorError("x"), (), False, id="other-supervisor-error"),
        pytest.param(ValueError("x"), (), False, id="unlisted-builtin"),
        pytest.param(_Flaky("x"), (_Flaky,), True, id="listed-class"),
        pytest.param(_FlakierStill("x"), (_Flaky,), True, id="subclass-of-listed"),
        pytest.param(_Flaky("x"), (KeyError,), False, id="other-class-listed"),
        pytest.param(asyncio.CancelledError(), (BaseException,), False, id="cancellation-never"),
        pytest.param(KeyboardInterrupt(), (BaseException,), False, id="interrupt-never"),
    ],
)
def test_is_transient(
    exc: BaseException, extra: tuple[type[BaseException], ...], expected: bool
) -> None:
    """Transient errors and listed classes retry; permanent, guard and base exceptions never."""
    assert is_transient(exc, extra) is expected


# --- retry_call --------------------------------------------------------------------------


async def test_retry_call_succeeds_on_third_attempt() -> None:
    """Two transient failures then success: result, attempt count, two sleeps and two hooks."""
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=5, base_delay=2.0, jitter=False)
    seen: list[int] = []
    hooks: list[tuple[int, str, float]] = []

    async def fn(attempt: int) -> str:
        seen.append(attempt)
        if attempt < 3:
            raise TransientError(f"flaky {attempt}")
        return "ok"

    result, attempts = await retry_call(
        fn,
        policy,
        clock=clock,
        is_retryable=is_transient,
        on_retry=lambda n, exc, delay: hooks.append((n, str(exc), delay)),
    )
    assert (result, attempts) == ("ok", 3)
    assert seen == [1, 2, 3]
    assert clock.sleeps == [2.0, 4.0]
    assert hooks == [(1, "flaky 1", 2.0), (2, "flaky 2", 4.0)]


async def test_retry_call_jittered_sleeps_use_injected_rng() -> None:
    """With jitter, the sleeps are the seeded draws within their bounds."""
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=3, base_delay=1.0)

    async def fn(attempt: int) -> int:
        if attempt < 3:
            raise TransientError("flaky")
        return attempt

    await retry_call(fn, policy, clock=clock, is_retryable=is_transient, rng=random.Random(1))
    expected = random.Random(1)
    assert clock.sleeps == [expected.uniform(0, 1.0), expected.uniform(0, 2.0)]


async def test_retry_call_does_not_retry_permanent_error() -> None:
    """A PermanentError is raised from the first attempt, with no sleep."""
    clock = FakeClock()
    calls = 0

    async def fn(attempt: int) -> None:
        nonlocal calls
        calls += 1
        raise PermanentError("bad input")

    with pytest.raises(PermanentError, match="bad input"):
        await retry_call(fn, RetryPolicy(max_attempts=5), clock=clock, is_retryable=is_transient)
    assert calls == 1
    assert clock.sleeps == []


async def test_retry_call_reraises_last_error_after_max_attempts() -> None:
    """When attempts run out, the last attempt's exception propagates."""
    clock = FakeClock()

    async def fn(attempt: int) -> None:
        raise TransientError(f"attempt {attempt}")

    policy = RetryPolicy(max_attempts=3, base_delay=1.0, jitter=False)
    with pytest.raises(TransientError, match="attempt 3"):
        await retry_call(fn, policy, clock=clock, is_retryable=is_transient)
    assert clock.sleeps == [1.0, 2.0]


async def test_retry_call_gives_up_on_total_budget_measured_from_first_start() -> None:
    """Time spent inside attempts counts against max_total."""
    clock = FakeClock()

    async def fn(attempt: int) -> None:
        # Each attempt takes 4 s before failing.
        clock.advance(4.0)
        raise TransientError(f"attempt {attempt}")

    policy = RetryPolicy(max_attempts=10, base_delay=1.0, max_total=10.0, jitter=False)
    # 1: fails at 4, sleeps 1 -> 5; 2: fails at 9, 9 + 2 > 10 -> give up.
    with pytest.raises(TransientError, match="attempt 2"):
        await retry_call(fn, policy, clock=clock, is_retryable=is_transient)
    assert clock.sleeps == [1.0]


async def test_retry_call_honours_retry_after() -> None:
    """A TransientError's retry_after is a floor on the delay."""
    clock = FakeClock()

    async def fn(attempt: int) -> str:
        if attempt == 1:
            raise TransientError("rate limited", retry_after=20.0)
        return "ok"

    policy = RetryPolicy(max_attempts=2, base_delay=1.0, jitter=False)
    assert await retry_call(fn, policy, clock=clock, is_retryable=is_transient) == ("ok", 2)
    assert clock.sleeps == [20.0]


async def test_retry_call_gives_up_when_retry_after_passes_budget() -> None:
    """A retry_after beyond the total budget raises at once instead of waiting."""
    clock = FakeClock()

    async def fn(attempt: int) -> None:
        raise _RateLimited("rate limited", retry_after=600.0)

    policy = RetryPolicy(max_attempts=5, max_total=300.0)
    with pytest.raises(_RateLimited):
        await retry_call(fn, policy, clock=clock, is_retryable=is_transient)
    assert clock.sleeps == []


class _ThirdPartyRateLimit(Exception):
    """A library's own rate-limit error with a retry_after attribute."""

    def __init__(self, retry_after: object) -> None:
        super().__init__("429")
        self.retry_after = retry_after


@pytest.mark.parametrize(
    ("retry_after", "expected_sleep"),
    [
        pytest.param(7, 7.0, id="int-honoured"),
        pytest.param(None, 1.0, id="none-ignored"),
        pytest.param("7", 1.0, id="string-ignored"),
        pytest.param(-3.0, 1.0, id="negative-ignored"),
        pytest.param(True, 1.0, id="bool-ignored"),
    ],
)
async def test_retry_call_reads_retry_after_of_listed_classes(
    retry_after: object, expected_sleep: float
) -> None:
    """A listed class's numeric retry_after is honoured; anything else is ignored."""
    clock = FakeClock()

    async def fn(attempt: int) -> str:
        if attempt == 1:
            raise _ThirdPartyRateLimit(retry_after)
        return "ok"

    policy = RetryPolicy(max_attempts=2, base_delay=1.0, jitter=False)
    await retry_call(
        fn,
        policy,
        clock=clock,
        is_retryable=lambda exc: is_transient(exc, (_ThirdPartyRateLimit,)),
    )
    assert clock.sleeps == [expected_sleep]


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(asyncio.CancelledError(), id="cancelled"),
        pytest.param(KeyboardInterrupt(), id="keyboard-interrupt"),
    ],
)
async def test_retry_call_never_retries_cancellation(exc: BaseException) -> None:
    """A BaseException that is not an Exception propagates at once, even if 'retryable'."""
    clock = FakeClock()
    calls = 0

    async def fn(attempt: int) -> None:
        nonlocal calls
        calls += 1
        raise exc

    with pytest.raises(type(exc)):
        await retry_call(
            fn, RetryPolicy(max_attempts=5), clock=clock, is_retryable=lambda _exc: True
        )
    assert calls == 1
    assert clock.sleeps == []


async def test_retry_call_cancelled_during_backoff_stops() -> None:
    """Cancelling the task while it waits between attempts ends the retry loop."""
    calls = 0

    class _BlockingClock(FakeClock):
        """A fake clock whose sleep never returns on its own."""

        async def sleep(self, delay: float) -> None:
            self.sleeps.append(delay)
            await asyncio.Event().wait()

    clock = _BlockingClock()

    async def fn(attempt: int) -> None:
        nonlocal calls
        calls += 1
        raise TransientError("flaky")

    task = asyncio.create_task(
        retry_call(fn, RetryPolicy(max_attempts=5), clock=clock, is_retryable=is_transient)
    )
    for _ in range(100):  # bounded: a few loop turns reach the backoff wait
        if clock.sleeps:
            break
        await asyncio.sleep(0)
    assert clock.sleeps, "retry_call never reached its backoff wait"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1
