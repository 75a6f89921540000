"""Test helpers shipped with the package, for our own tests and for agent authors.

``FakeClock`` replaces the real clock: time moves only when a test advances it or when code
sleeps on it (the sleep returns at once and moves the clock, like trio's autojump clock), so
retry backoff, breaker cool-downs and budget windows are tested without real sleeps.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio.lowlevel

from supervisor.clock import Duration, seconds


class FakeClock:
    """A clock that moves only when told to, or when something sleeps on it."""

    def __init__(self, start: datetime | None = None) -> None:
        self._start = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._offset = 0.0
        #: every delay passed to ``sleep``, in order
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._offset)

    def monotonic(self) -> float:
        return 1000.0 + self._offset

    def advance(self, delay: Duration) -> None:
        """Move time forward by ``delay``."""
        step = seconds(delay)
        if step < 0:
            raise ValueError("a clock cannot go backwards")
        self._offset += step

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.advance(max(0.0, delay))
        await anyio.lowlevel.checkpoint()
