"""Time as a seam: every guard and the runner read time through a ``Clock``.

Production code uses ``SystemClock``; tests use ``supervisor.testing.FakeClock``, which only
moves when told to (or when something sleeps on it), so no unit test sleeps for real.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

import anyio

Duration = float | timedelta


def seconds(value: Duration) -> float:
    """Normalise a duration given as seconds or ``timedelta`` to float seconds."""
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


@runtime_checkable
class Clock(Protocol):
    """Wall time (UTC, for records), monotonic time (for deadlines) and sleeping."""

    def now(self) -> datetime:
        """The current UTC time, timezone-aware."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...

    async def sleep(self, delay: float) -> None:
        """Wait ``delay`` seconds (cancellable)."""
        ...


class SystemClock:
    """The real clock."""

    __slots__ = ()

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, delay: float) -> None:
        await anyio.sleep(max(0.0, delay))
