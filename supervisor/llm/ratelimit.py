"""Client-side rate limits per provider, and the provider's own "come back later".

    TokenBucket    capacity per minute, refilled continuously, starts full
    RateLimiter    requests per minute and tokens per minute of one provider (0 = unlimited)
    ProviderGate   a Retry-After deadline shared by every caller of one provider

Waiting happens on the injected clock, so tests never sleep. A caller that would have to wait
longer than it is willing to is refused at once with ``CallRefused`` (the ladder then tries
the next tier) rather than parked behind a wait it cannot afford.

Fairness: a caller takes its share the moment it is admitted, even when it must wait for it,
so the bucket goes into debt and each later caller sees the debt and waits longer. Callers
are therefore served in arrival order and a stream of small requests cannot starve a large
one.
"""

from __future__ import annotations

import math

from supervisor.clock import Clock, Duration, seconds
from supervisor.errors import CallRefused

__all__ = ["ProviderGate", "RateLimiter", "TokenBucket"]


class TokenBucket:
    """Up to ``capacity_per_minute`` units, refilled at ``capacity_per_minute / 60`` per second.

    The level may go negative: ``take`` always succeeds and leaves a debt that the next
    ``wait_time`` includes. Raises ``ValueError`` for a capacity that is not finite and > 0.
    """

    __slots__ = ("_clock", "_level", "_rate", "_stamp", "capacity")

    def __init__(self, capacity_per_minute: float, clock: Clock) -> None:
        if not capacity_per_minute > 0 or math.isinf(capacity_per_minute):
            raise ValueError(f"capacity must be a finite number > 0, got {capacity_per_minute!r}")
        self.capacity = float(capacity_per_minute)
        self._rate = self.capacity / 60.0
        self._clock = clock
        self._level = self.capacity
        self._stamp = clock.monotonic()

    @property
    def level(self) -> float:
        """Units available now (negative while in debt)."""
        self._refill()
        return self._level

    def wait_time(self, amount: float) -> float:
        """Seconds until ``amount`` units are available (0 if they are now).

        An amount above the capacity waits for a full bucket: it could never fit otherwise.
        """
        self._refill()
        deficit = min(amount, self.capacity) - self._level
        return max(0.0, deficit / self._rate)

    def take(self, amount: float) -> None:
        """Remove ``amount`` units, going into debt if there are not enough."""
        self._refill()
        self._level -= amount

    def give_back(self, amount: float) -> None:
        """Return ``amount`` units (a cancelled wait, an over-estimate), up to the capacity."""
        self._refill()
        self._level = min(self.capacity, self._level + amount)

    def _refill(self) -> None:
        now = self._clock.monotonic()
        elapsed = now - self._stamp
        if elapsed > 0:
            self._level = min(self.capacity, self._level + elapsed * self._rate)
            self._stamp = now


class RateLimiter:
    """Requests and tokens per minute for one provider; 0 means no limit on that measure.

    Raises ``ValueError`` for a negative limit.
    """

    __slots__ = ("_clock", "_requests", "_tokens")

    def __init__(self, rpm: int, tpm: int, clock: Clock) -> None:
        if rpm < 0 or tpm < 0:
            raise ValueError(f"rpm and tpm must be >= 0, got {rpm} and {tpm}")
        self._clock = clock
        self._requests = TokenBucket(rpm, clock) if rpm else None
        self._tokens = TokenBucket(tpm, clock) if tpm else None

    def wait_time(self, tokens: int) -> float:
        """Seconds a request of ``tokens`` would have to wait now."""
        wait = 0.0
        if self._requests is not None:
            wait = self._requests.wait_time(1)
        if self._tokens is not None:
            wait = max(wait, self._tokens.wait_time(tokens))
        return wait

    async def acquire(self, tokens: int, *, max_wait: Duration) -> float:
        """Admit one request of ``tokens``; return the seconds it waited.

        Raises ``CallRefused("rate_limited")`` without waiting or taking anything when the
        wait would exceed ``max_wait``. A caller cancelled while waiting gives its share back.
        """
        limit = seconds(max_wait)
        wait = self.wait_time(tokens)
        if wait > limit:
            raise CallRefused(
                "rate_limited",
                f"rate limit needs a wait of {wait:.1f}s for {tokens} tokens, "
                f"more than the {limit:g}s allowed",
            )
        # Admission and taking happen with no await in between: concurrent callers each see
        # the debt of those admitted before them.
        self._take(1, tokens)
        if wait <= 0:
            return 0.0
        try:
            await self._clock.sleep(wait)
        except BaseException:
            self._give_back(1, tokens)
            raise
        return wait

    def adjust(self, tokens: int) -> None:
        """Correct the token count after the fact: positive takes more, negative returns some."""
        if self._tokens is None or tokens == 0:
            return
        if tokens > 0:
            self._tokens.take(tokens)
        else:
            self._tokens.give_back(-tokens)

    def _take(self, requests: int, tokens: int) -> None:
        if self._requests is not None:
            self._requests.take(requests)
        if self._tokens is not None:
            self._tokens.take(tokens)

    def _give_back(self, requests: int, tokens: int) -> None:
        if self._requests is not None:
            self._requests.give_back(requests)
        if self._tokens is not None:
            self._tokens.give_back(tokens)


class ProviderGate:
    """The provider said "retry after N seconds": every caller of it waits, not just one.

    A deadline on the clock's monotonic time; ``block_for`` only ever extends it.
    """

    __slots__ = ("_clock", "_until")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._until = -math.inf

    @property
    def blocked_until(self) -> float | None:
        """The deadline in ``clock.monotonic()`` time, or None when calls may go now."""
        return self._until if self._until > self._clock.monotonic() else None

    def remaining(self) -> float:
        """Seconds until calls may go (0 when they may go now)."""
        return max(0.0, self._until - self._clock.monotonic())

    def block_for(self, delay: Duration) -> None:
        """Hold every caller for ``delay`` from now, unless already held longer.

        Non-positive and NaN delays are ignored.
        """
        span = seconds(delay)
        if not span > 0:
            return
        self._until = max(self._until, self._clock.monotonic() + span)

    async def wait(self, max_wait: Duration) -> float:
        """Sleep until the deadline has passed; return the seconds waited.

        Raises ``CallRefused("retry_after")`` without sleeping (further) when the deadline is
        further away than ``max_wait`` allows, counting what was already waited.
        """
        limit = seconds(max_wait)
        start = self._clock.monotonic()
        while True:
            now = self._clock.monotonic()
            remaining = self._until - now
            if remaining <= 0:
                return now - start
            if (now - start) + remaining > limit:
                raise CallRefused(
                    "retry_after",
                    f"provider asked to retry after {remaining:.1f}s more, "
                    f"longer than the {limit:g}s allowed",
                )
            # The deadline may be extended while we sleep: look again after waking.
            await self._clock.sleep(remaining)
