"""The scheduling engine behind a thin adapter: the only module that imports APScheduler.

APScheduler 3.11 computes fire times and wakes us up; everything else (overlap, pause,
circuit, concurrency, misfire policy) is decided by the daemon, so the engine can be swapped
without touching the runner. A custom executor hands each due fire to ``on_fire(agent,
planned_time)`` instead of running anything itself.

Missed fires after downtime: APScheduler's memory job store forgets everything on restart, so
the daemon passes each agent's last planned fire time (kept in its state) to ``add``; a fire
missed since then that is at most ``misfire_grace`` old is fired once at start (coalesced).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.executors.base import BaseExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

if TYPE_CHECKING:
    from supervisor.config import ScheduleConfig

OnFire = Callable[[str, datetime], None]
_EXECUTOR = "supervisor"


def validate_timezone(name: str) -> ZoneInfo:
    """Raises ``ValueError`` for an unknown timezone name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r}") from None


_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def crontab_weekdays(field: str) -> str:
    """Translate crontab day-of-week numbers (0 or 7 = Sunday) into names.

    APScheduler 3 reads numbers with 0 = Monday, so ``1-5`` would mean Tuesday to Saturday;
    names mean the same to both. Raises ``ValueError`` for a step on numbered days.
    """
    out = []
    for item in field.split(","):
        base, slash, _ = item.partition("/")
        numeric = any(part.isdigit() for part in base.split("-"))
        if slash and (numeric or base == "*"):
            raise ValueError(
                f"day-of-week step {item!r} is ambiguous; list the days by name (mon,wed,fri)"
            )
        if not numeric:
            out.append(item)
            continue
        lo, _, hi = base.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or int(lo) > 7 or int(hi or 0) > 7:
            raise ValueError(f"day-of-week {item!r}: days are 0-7 (0 and 7 are Sunday) or names")
        a, b = int(lo), int(hi) if hi else None
        if b is None:
            out.append(_DAYS[a])
        elif a > b:
            raise ValueError(f"day-of-week range {item!r} runs backwards")
        elif a == 0 and b == 7:
            out.append("*")
        elif a == 0:  # Sunday first: APScheduler's week starts on Monday
            out.append("sun" if b == 0 else f"sun,mon-{_DAYS[b]}")
        else:
            out.append(_DAYS[a] if a == b else f"{_DAYS[a]}-{_DAYS[b]}")
    return ",".join(out)


def make_trigger(schedule: ScheduleConfig, default_tz: str = "UTC", scale: float = 1.0) -> Any:
    """Build the APScheduler trigger for a schedule. Raises ``ValueError`` when invalid."""
    tz = validate_timezone(schedule.timezone or default_tz)
    jitter = int(schedule.jitter) if schedule.jitter >= 1 else None
    if schedule.cron is not None:
        try:
            fields = schedule.cron.split()
            if len(fields) == 5:
                fields[4] = crontab_weekdays(fields[4])
            trigger = CronTrigger.from_crontab(" ".join(fields), timezone=tz)
        except ValueError as exc:
            raise ValueError(f"invalid cron expression {schedule.cron!r}: {exc}") from None
        trigger.jitter = jitter  # from_crontab takes no jitter argument
        return trigger
    assert schedule.every is not None
    return IntervalTrigger(seconds=schedule.every * scale, timezone=tz, jitter=jitter)


def validate_schedule(schedule: ScheduleConfig) -> None:
    """Raises ``ValueError`` when the schedule is invalid or never fires."""
    trigger = make_trigger(schedule)
    if trigger.get_next_fire_time(None, datetime.now(UTC)) is None:
        raise ValueError(f"cron expression {schedule.cron!r} never fires")


def expected_interval(schedule: ScheduleConfig, default_tz: str = "UTC") -> float:
    """Seconds between two consecutive fires (from now)."""
    if schedule.every is not None:
        return schedule.every
    trigger = make_trigger(schedule, default_tz)
    now = datetime.now(UTC)
    first = trigger.get_next_fire_time(None, now)
    second = trigger.get_next_fire_time(first, first + timedelta(microseconds=1))
    return (second - first).total_seconds() if first and second else 0.0


class _HandOffExecutor(BaseExecutor):  # type: ignore[misc]
    """Hands due fires to the daemon; the daemon does its own overlap accounting."""

    def __init__(self, on_fire: OnFire, misfire_grace: float, on_missed: OnFire) -> None:
        super().__init__()
        self._on_fire = on_fire
        self._on_missed = on_missed
        self.misfire_grace = misfire_grace

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        # coalesce=True: only the newest of the due times is passed on.
        planned = run_times[-1].astimezone(UTC)
        try:
            if (datetime.now(UTC) - planned).total_seconds() > self.misfire_grace:
                self._on_missed(job.id, planned)
            else:
                self._on_fire(job.id, planned)
        finally:
            self._run_job_success(job.id, [])


class Scheduler:
    """Fires agents on their schedules; calls ``on_fire(agent, planned_utc)`` in the loop."""

    def __init__(
        self,
        on_fire: OnFire,
        *,
        timezone: str = "UTC",
        misfire_grace: float = 300.0,
        on_missed: OnFire | None = None,
        scale: float = 1.0,
    ) -> None:
        self._default_tz = timezone
        self._scale = scale
        self._misfire_grace = misfire_grace
        self._executor = _HandOffExecutor(on_fire, misfire_grace, on_missed or (lambda a, t: None))
        self._aps = AsyncIOScheduler(timezone=validate_timezone(timezone))
        self._aps.add_executor(self._executor, _EXECUTOR)
        self._schedules: dict[str, ScheduleConfig] = {}

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start firing; must be called from inside the running event loop."""
        self._aps._eventloop = loop or asyncio.get_running_loop()
        self._aps.start()

    def shutdown(self) -> None:
        """Stop firing. Runs already handed off are not affected."""
        if self._aps.running:
            self._aps.shutdown(wait=False)

    def set_misfire_grace(self, value: float) -> None:
        self._misfire_grace = value
        self._executor.misfire_grace = value

    def add(
        self, agent: str, schedule: ScheduleConfig, *, last_planned: datetime | None = None
    ) -> None:
        """Schedule ``agent`` (replacing any previous schedule of it).

        With ``last_planned`` (the last fire time before a restart), a fire missed since then
        that is within ``misfire_grace`` is due at once.
        """
        trigger = make_trigger(schedule, self._default_tz, self._scale)
        kwargs: dict[str, Any] = {}
        if last_planned is not None:
            missed = _first_missed(trigger, last_planned, self._misfire_grace)
            if missed is not None:
                # APScheduler then coalesces every fire due since into one, the newest.
                kwargs["next_run_time"] = missed
        self._aps.add_job(
            _never_called,
            trigger=trigger,
            id=agent,
            name=agent,
            executor=_EXECUTOR,
            coalesce=True,
            max_instances=1_000_000,
            misfire_grace_time=None,
            replace_existing=True,
            **kwargs,
        )
        self._schedules[agent] = schedule

    def remove(self, agent: str) -> None:
        """Stop scheduling ``agent``; unknown names are ignored."""
        if self._schedules.pop(agent, None) is not None:
            self._aps.remove_job(agent)

    def agents(self) -> list[str]:
        return list(self._schedules)

    def next_fire(self, agent: str) -> datetime | None:
        """The agent's next planned fire (UTC); None if unscheduled or not started yet."""
        job = self._aps.get_job(agent)
        # A job added before start() has no next_run_time attribute until the start.
        nxt = getattr(job, "next_run_time", None)
        return nxt.astimezone(UTC) if nxt is not None else None


def _first_missed(trigger: Any, last_planned: datetime, grace: float) -> datetime | None:
    """The first fire after ``last_planned`` that is already due and at most ``grace`` old.

    Fires older than ``grace`` are skipped without walking them one by one: after a long
    downtime the newest missed fire may be recent even though the first one is not.
    """
    now = datetime.now(UTC)
    horizon = now - timedelta(seconds=grace)
    prev = last_planned
    if prev < horizon:
        if isinstance(trigger, IntervalTrigger):
            # Interval fires continue the chain last_planned + k * interval.
            step = trigger.interval_length
            prev += timedelta(seconds=step * math.ceil((horizon - prev).total_seconds() / step - 1))
        else:
            prev = horizon - timedelta(microseconds=1)
    missed = trigger.get_next_fire_time(prev, now)
    return missed if missed is not None and horizon <= missed <= now else None


async def _never_called() -> None:  # the hand-off executor never calls job functions
    raise AssertionError("job function called")
