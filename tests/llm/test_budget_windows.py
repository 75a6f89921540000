"""``supervisor.llm.windows``: the window rules both budget ledgers share."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from supervisor.errors import BudgetExceeded
from supervisor.llm.config import BudgetsConfig, LimitConfig
from supervisor.llm.windows import (
    GLOBAL,
    Window,
    WindowKind,
    check_amounts,
    check_fits,
    is_current,
    limit_of,
    periods,
    report,
    shared_windows,
    to_nanos,
)
from supervisor.testing import FakeClock

DAY, HOUR = "2026-03-01", "2026-03-01T10"
LIMITS = BudgetsConfig(
    per_run=LimitConfig(usd=1.0),
    per_agent_day=LimitConfig(usd=5.0),
    global_hour=LimitConfig(tokens=1000),
    global_day=LimitConfig(usd=50.0, tokens=10_000),
)


def test_periods_are_the_utc_day_and_hour() -> None:
    clock = FakeClock(datetime(2026, 3, 1, 10, 59, 59, tzinfo=UTC))
    assert periods(clock) == (DAY, HOUR)


def test_a_window_is_current_in_its_kinds_period() -> None:
    assert is_current(Window(WindowKind.RUN, "r1", None), DAY, HOUR)
    assert is_current(Window(WindowKind.AGENT_DAY, "alpha", DAY), DAY, HOUR)
    assert not is_current(Window(WindowKind.AGENT_DAY, "alpha", "2026-02-28"), DAY, HOUR)
    assert is_current(Window(WindowKind.GLOBAL_HOUR, GLOBAL, HOUR), DAY, HOUR)
    assert not is_current(Window(WindowKind.GLOBAL_HOUR, GLOBAL, DAY), DAY, HOUR)
    assert is_current(Window(WindowKind.GLOBAL_DAY, GLOBAL, DAY), DAY, HOUR)


def test_shared_windows_take_the_agent_override() -> None:
    made: list[tuple[WindowKind, str, str]] = []

    def window(kind: WindowKind, key: str, period: str) -> Window:
        made.append((kind, key, period))
        return Window(kind, key, period)

    override = LimitConfig(usd=0.5)
    found = shared_windows(window, "alpha", DAY, HOUR, LIMITS, override)
    assert made == [
        (WindowKind.AGENT_DAY, "alpha", DAY),
        (WindowKind.GLOBAL_HOUR, GLOBAL, HOUR),
        (WindowKind.GLOBAL_DAY, GLOBAL, DAY),
    ]
    assert [limit for _, limit in found] == [override, LIMITS.global_hour, LIMITS.global_day]
    plain = shared_windows(window, "alpha", DAY, HOUR, LIMITS, None)
    assert plain[0][1] == LIMITS.per_agent_day


def test_limit_of_prefers_the_limit_last_checked_except_for_global_windows() -> None:
    run = Window(WindowKind.RUN, "r1", None)
    agent = Window(WindowKind.AGENT_DAY, "alpha", DAY)
    hour = Window(WindowKind.GLOBAL_HOUR, GLOBAL, HOUR)
    assert limit_of(LIMITS, run) == LIMITS.per_run
    assert limit_of(LIMITS, agent) == LIMITS.per_agent_day
    override = LimitConfig(usd=0.25)
    for window in (run, agent, hour):
        window.hold(1, 1, override)
    assert limit_of(LIMITS, run) == override
    assert limit_of(LIMITS, agent) == override
    assert limit_of(LIMITS, hour) == LIMITS.global_hour


def test_hold_then_settle_moves_the_reservation_to_spent() -> None:
    window = Window(WindowKind.RUN, "r1", None)
    window.hold(to_nanos(0.3), 300, LIMITS.per_run)
    window.hold(to_nanos(0.2), 200, LIMITS.per_run)
    window.settle(to_nanos(0.3), 300, to_nanos(0.1), 100)
    assert (window.reserved, window.reserved_tokens) == (to_nanos(0.2), 200)
    assert (window.spent, window.spent_tokens) == (to_nanos(0.1), 100)


def test_check_fits_names_the_window_it_would_pass() -> None:
    window = Window(WindowKind.AGENT_DAY, "alpha", DAY, spent=to_nanos(4.5))
    check_fits(window, LIMITS.per_agent_day, to_nanos(0.5), 10, 0.5)
    with pytest.raises(BudgetExceeded, match=r"agent_day budget \(alpha, 2026-03-01\)") as info:
        check_fits(window, LIMITS.per_agent_day, to_nanos(0.6), 10, 0.6)
    assert info.value.limit == 5.0
    tokens = Window(WindowKind.GLOBAL_HOUR, GLOBAL, HOUR, spent_tokens=900)
    with pytest.raises(BudgetExceeded, match="token limit"):
        check_fits(tokens, LIMITS.global_hour, 0, 101, 0.0)


@pytest.mark.parametrize(
    ("usd", "tokens"), [(-0.1, 0), (float("nan"), 0), (float("inf"), 0), (0, -1)]
)
def test_check_amounts_refuses_bad_amounts(usd: float, tokens: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        check_amounts(usd, tokens)


def test_report_lists_global_windows_first_then_agents_then_runs() -> None:
    windows = [
        Window(WindowKind.RUN, "r2", None, spent=to_nanos(0.25), spent_tokens=7),
        Window(WindowKind.AGENT_DAY, "beta", DAY),
        Window(WindowKind.GLOBAL_HOUR, GLOBAL, HOUR),
        Window(WindowKind.RUN, "r1", None),
        Window(WindowKind.AGENT_DAY, "alpha", DAY),
        Window(WindowKind.GLOBAL_DAY, GLOBAL, DAY, reserved=to_nanos(1.5), reserved_tokens=3),
    ]
    statuses = report(windows, LIMITS)
    assert [(s.name, s.key) for s in statuses] == [
        ("global_day", GLOBAL),
        ("global_hour", GLOBAL),
        ("agent_day", "alpha"),
        ("agent_day", "beta"),
        ("run", "r1"),
        ("run", "r2"),
    ]
    day, hour, run = statuses[0], statuses[1], statuses[-1]
    assert (day.reserved_usd, day.reserved_tokens, day.limit_usd, day.limit_tokens) == (
        1.5,
        3,
        50.0,
        10_000,
    )
    assert (hour.limit_usd, hour.limit_tokens, hour.period) == (None, 1000, HOUR)
    assert (run.spent_usd, run.spent_tokens, run.limit_usd, run.period) == (0.25, 7, 1.0, None)
