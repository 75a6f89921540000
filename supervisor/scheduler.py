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


def make_trigger(schedule: ScheduleConfig, default_tz: str = "UTC") -> Any:
    """Build the APScheduler trigger for a schedule. Raises ``ValueError`` when invalid."""
    tz = validate_timezone(schedule.timezone or default_tz)
    jitter = int(schedule.jitter) if schedule.jitter >= 1 else None
    if schedule.cron is not None:
        try:
            trigger = CronTrigger.from_crontab(schedule.cron, timezone=tz)
        except ValueError as exc:
            raise ValueError(f"invalid cron expression {schedule.cron!r}: {exc}") from None
        trigger.jitter = jitter  # from_crontab takes no jitter argument
        return trigger
    assert schedule.every is not None
    return IntervalTrigger(seconds=schedule.every, timezone=tz, jitter=jitter)


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
    ) -> None:
        self._default_tz = timezone
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
        trigger = make_trigger(schedule, self._default_tz)
        kwargs: dict[str, Any] = {}
        now = datetime.now(UTC)
        if last_planned is not None:
            missed = trigger.get_next_fire_time(last_planned, now)
            if missed is not None and missed <= now:
                if (now - missed).total_seconds() <= self._misfire_grace:
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
        job = self._aps.get_job(agent)
        return job.next_run_time.astimezone(UTC) if job and job.next_run_time else None


async def _never_called() -> None:  # the hand-off executor never calls job functions
    raise AssertionError("job function called")
