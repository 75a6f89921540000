"""Run-level retry: which failures are worth another attempt, and how long to wait first.

Retries are opt-in per exception type (``TransientError``, plus any classes the agent's config
lists) and bounded twice: by a number of attempts and by a total time budget measured from the
start of the first attempt. Delays grow exponentially up to a cap, with full jitter so that
agents failing together do not retry together.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from supervisor.clock import Clock
from supervisor.errors import GuardError, PermanentError, TransientError
from supervisor.guards.base import check_non_negative

T = TypeVar("T")

# One shared generator for callers that do not inject their own; tests pass a seeded one.
_RNG = random.Random()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to retry. Raises ``ValueError`` on an invalid bound."""

    #: attempts in total, the first included; 1 means no retry
    max_attempts: int = 1
    #: upper bound of the delay after the first failed attempt, in seconds
    base_delay: float = 1.0
    #: cap of any one delay, in seconds
    max_delay: float = 60.0
    #: time budget across all attempts, from the start of the first one, in seconds
    max_total: float = 300.0
    #: draw each delay uniformly from [0, upper] (full jitter) instead of using upper itself
    jitter: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ValueError(f"max_attempts must be an int, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        check_non_negative("base_delay", self.base_delay)
        check_non_negative("max_delay", self.max_delay)
        # An infinite budget is a meaningful "no time limit"; an infinite delay is not.
        check_non_negative("max_total", self.max_total, finite=False)

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay after failed attempt number ``attempt`` (1-based), before the time budget.

        Raises ``ValueError`` when ``attempt`` < 1.
        """
        if attempt < 1:
            raise ValueError(f"attempt is 1-based, got {attempt}")
        try:
            raw = math.ldexp(self.base_delay, attempt - 1)
        except OverflowError:
            # base * 2**(attempt-1) left the float range: it is past any finite cap.
            raw = math.inf
        upper = min(self.max_delay, raw)
        if not self.jitter:
            return upper
        return (rng if rng is not None else _RNG).uniform(0.0, upper)

    def next_delay(
        self,
        attempt: int,
        elapsed: float,
        retry_after: float | None = None,
        rng: random.Random | None = None,
    ) -> float | None:
        """The delay before the attempt after ``attempt``, or None to give up.

        ``elapsed`` is the time since the first attempt started. A ``retry_after`` (a server's
        Retry-After, in seconds) is a floor on the delay, not capped by ``max_delay``; the
        total budget still applies to it. Raises ``ValueError`` when ``attempt`` < 1.
        """
        if attempt < 1:
            raise ValueError(f"attempt is 1-based, got {attempt}")
        if attempt >= self.max_attempts:
            return None
        delay = self.backoff(attempt, rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        if elapsed + delay > self.max_total:
            return None
        return delay


def is_transient(exc: BaseException, extra: tuple[type[BaseException], ...] = ()) -> bool:
    """True when ``exc`` is worth retrying: a ``TransientError`` or an instance of ``extra``.

    Never true for a ``PermanentError`` or a ``GuardError`` (a guard that stopped a run would
    stop the retry too), nor for a ``BaseException`` that is not an ``Exception``
    (cancellation, interrupts), whatever ``extra`` lists.
    """
    if not isinstance(exc, Exception) or isinstance(exc, PermanentError | GuardError):
        return False
    if isinstance(exc, TransientError):
        return True
    return bool(extra) and isinstance(exc, extra)


def _retry_after_of(exc: Exception) -> float | None:
    """A numeric ``retry_after`` attribute (seconds) on the exception, if it carries one."""
    value = getattr(exc, "retry_after", None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value >= 0 else None


async def retry_call(
    fn: Callable[[int], Awaitable[T]],
    policy: RetryPolicy,
    *,
    clock: Clock,
    is_retryable: Callable[[Exception], bool],
    on_retry: Callable[[int, Exception, float], None] | None = None,
    rng: random.Random | None = None,
) -> tuple[T, int]:
    """Await ``fn(attempt)`` until it succeeds; return ``(result, attempts)``.

    A failure is retried when ``is_retryable`` says so and ``policy`` still allows another
    attempt; ``on_retry(attempt, exc, delay)`` runs before each wait on ``clock``. A
    ``TransientError.retry_after`` (or any exception's numeric ``retry_after`` attribute, so
    listed third-party classes work too) sets a floor on the delay. Raises the last
    exception when giving up, and lets cancellation (any ``BaseException`` that is not an
    ``Exception``) through at once, never retried.
    """
    started = clock.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            result = await fn(attempt)
        except Exception as exc:
            if not is_retryable(exc):
                raise
            delay = policy.next_delay(
                attempt,
                clock.monotonic() - started,
                retry_after=_retry_after_of(exc),
                rng=rng,
            )
            if delay is None:
                raise
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            await clock.sleep(delay)
        else:
            return result, attempt
