"""The spend windows both budget ledgers count in, and the rules they share.

``BudgetLedger`` (``budget.py``) keeps its windows in the state store, ``PgBudgetLedger``
(``budget_pg.py``) keeps the shared ones as PostgreSQL rows; both use this module for what a
window is, which limit applies to it, whether a call's worst case fits it, which period is
current and how a window is reported.

Money is counted in integer nano-dollars so that sums are exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC
from enum import StrEnum

from supervisor.clock import Clock
from supervisor.errors import BudgetExceeded
from supervisor.llm.config import BudgetsConfig, LimitConfig

__all__ = [
    "DAY",
    "GLOBAL",
    "HOUR",
    "NANO",
    "Window",
    "WindowKind",
    "WindowStatus",
    "check_amounts",
    "check_fits",
    "is_current",
    "limit_of",
    "periods",
    "report",
    "shared_windows",
    "to_nanos",
]

#: nano-dollars per dollar
NANO = 1_000_000_000
#: the key of the global windows
GLOBAL = "global"
#: ``strftime`` formats of a day and an hour period (UTC)
DAY, HOUR = "%Y-%m-%d", "%Y-%m-%dT%H"


class WindowKind(StrEnum):
    """The spend windows a call is counted in."""

    #: one run, in memory only (a run does not survive a restart)
    RUN = "run"
    #: one agent, one UTC day
    AGENT_DAY = "agent_day"
    #: every agent, one UTC hour
    GLOBAL_HOUR = "global_hour"
    #: every agent, one UTC day
    GLOBAL_DAY = "global_day"


@dataclass(frozen=True, slots=True)
class WindowStatus:
    """One window as ``snapshot()`` reports it (for metrics and ``status``)."""

    #: the window kind (``WindowKind`` value)
    name: str
    #: the run id, the agent name, or ``"global"``
    key: str
    spent_usd: float
    reserved_usd: float
    limit_usd: float | None
    spent_tokens: int
    limit_tokens: int | None
    reserved_tokens: int = 0
    #: the UTC day (``2026-01-31``) or hour (``2026-01-31T13``); None for a run window
    period: str | None = None


@dataclass(slots=True, eq=False)
class Window:
    """One window's counters (nano-dollars and tokens), spent and held by reservations."""

    kind: WindowKind
    key: str
    period: str | None
    spent: int = 0  # nano-dollars
    spent_tokens: int = 0
    reserved: int = 0
    reserved_tokens: int = 0
    #: the limit the last reservation was checked against (per-agent overrides vary)
    limit: LimitConfig | None = None

    def hold(self, nanos: int, tokens: int, limit: LimitConfig) -> None:
        """Add a reservation of ``nanos`` and ``tokens`` checked against ``limit``."""
        self.reserved += nanos
        self.reserved_tokens += tokens
        self.limit = limit

    def settle(self, held: int, held_tokens: int, nanos: int, tokens: int) -> None:
        """Replace a reservation (``held``, ``held_tokens``) by what was spent."""
        self.reserved -= held
        self.reserved_tokens -= held_tokens
        self.spent += nanos
        self.spent_tokens += tokens


def to_nanos(usd: float) -> int:
    """``usd`` in integer nano-dollars."""
    return round(usd * NANO)


def check_amounts(usd: float, tokens: int) -> None:
    """Raise ``ValueError`` for a negative or non-finite amount."""
    if not usd >= 0 or math.isinf(usd):
        raise ValueError(f"usd must be a finite number >= 0, got {usd!r}")
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens!r}")


def check_fits(window: Window, limit: LimitConfig, nanos: int, tokens: int, usd: float) -> None:
    """Raise ``BudgetExceeded`` when this call's worst case does not fit ``window``."""
    scope = window.key if window.period is None else f"{window.key}, {window.period}"
    where = f"{window.kind.value} budget ({scope})"
    if limit.usd is not None:
        observed = window.spent + window.reserved + nanos
        if observed > to_nanos(limit.usd):
            raise BudgetExceeded(
                f"{where}: this call's worst case of ${usd:.6f} does not fit the USD limit",
                limit=limit.usd,
                observed=observed / NANO,
            )
    if limit.tokens is not None:
        observed_tokens = window.spent_tokens + window.reserved_tokens + tokens
        if observed_tokens > limit.tokens:
            raise BudgetExceeded(
                f"{where}: this call's worst case of {tokens} tokens does not fit the token limit",
                limit=limit.tokens,
                observed=observed_tokens,
            )


def periods(clock: Clock) -> tuple[str, str]:
    """The current UTC day and hour by ``clock``: ``("2026-01-31", "2026-01-31T13")``."""
    now = clock.now().astimezone(UTC)
    return now.strftime(DAY), now.strftime(HOUR)


def is_current(window: Window, day: str, hour: str) -> bool:
    """True when ``window`` belongs to ``day`` / ``hour`` (its kind's period); a run window
    always does."""
    return window.kind is WindowKind.RUN or window.period == (
        hour if window.kind is WindowKind.GLOBAL_HOUR else day
    )


def shared_windows(
    window: Callable[[WindowKind, str, str], Window],
    agent: str,
    day: str,
    hour: str,
    limits: BudgetsConfig,
    agent_day_limit: LimitConfig | None,
) -> list[tuple[Window, LimitConfig]]:
    """A call's agent and global windows (``window`` finds or makes one), most specific
    first, each with the limit that applies; ``agent_day_limit`` replaces ``per_agent_day``."""
    return [
        (
            window(WindowKind.AGENT_DAY, agent, day),
            agent_day_limit if agent_day_limit is not None else limits.per_agent_day,
        ),
        (window(WindowKind.GLOBAL_HOUR, GLOBAL, hour), limits.global_hour),
        (window(WindowKind.GLOBAL_DAY, GLOBAL, day), limits.global_day),
    ]


def limit_of(limits: BudgetsConfig, window: Window) -> LimitConfig | None:
    """The limit ``window`` is reported against: the configured one of a global window, the
    one its last reservation was checked against otherwise (per-agent overrides vary)."""
    if window.kind is WindowKind.GLOBAL_HOUR:
        return limits.global_hour
    if window.kind is WindowKind.GLOBAL_DAY:
        return limits.global_day
    if window.limit is not None:
        return window.limit
    return limits.per_run if window.kind is WindowKind.RUN else limits.per_agent_day


def report(windows: Iterable[Window], limits: BudgetsConfig) -> list[WindowStatus]:
    """``windows`` as ``snapshot()`` lists them: global day, global hour, agents, runs, each
    kind by key."""
    order = list(WindowKind)[::-1]  # global_day, global_hour, agent_day, run
    return [
        _status(window, limit_of(limits, window))
        for window in sorted(windows, key=lambda w: (order.index(w.kind), w.key))
    ]


def _status(window: Window, limit: LimitConfig | None) -> WindowStatus:
    return WindowStatus(
        name=window.kind.value,
        key=window.key,
        spent_usd=window.spent / NANO,
        reserved_usd=window.reserved / NANO,
        limit_usd=limit.usd if limit else None,
        spent_tokens=window.spent_tokens,
        limit_tokens=limit.tokens if limit else None,
        reserved_tokens=window.reserved_tokens,
        period=window.period,
    )
