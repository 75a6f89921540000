"""The scheduling engine behind a thin adapter: the only module that imports APScheduler.

APScheduler 3.11 computes fire times and wakes us up; everything else (overlap, pause,
circuit, concurrency, misfire policy) is decided by the daemon, so the engine can be swapped
without touching the runner. A custom executor hands each due fire to ``on_fire(agent,
planned_time)`` instead of running anything itself.

Agents on the same schedule share one APScheduler job that fans out to them (see
``Scheduler``), and interval schedules tick on a grid fixed by the epoch rather than by when
the trigger was made, so a fleet on ``every: 5s`` shares its ticks, across restarts too.

Missed fires after downtime: APScheduler's memory job store forgets everything on restart, so
the daemon passes each agent's last planned fire time (kept in its state) to ``add``; the
newest fire missed since then, if at most ``misfire_grace`` old, is fired once at start.
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


#: interval schedules tick at ``anchor + k * interval``; by default the anchor is the epoch
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def make_trigger(
    schedule: ScheduleConfig,
    default_tz: str = "UTC",
    scale: float = 1.0,
    anchor: datetime = EPOCH,
) -> Any:
    """Build the APScheduler trigger for a schedule. Raises ``ValueError`` when invalid.

    An interval ticks at ``anchor + k * interval`` (the epoch by default), so every agent on
    the same interval shares its ticks, across restarts too.
    """
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
    interval = _interval(schedule, scale)
    return IntervalTrigger(
        seconds=interval.total_seconds(),
        timezone=tz,
        jitter=jitter,
        start_date=_tick_at_or_before(datetime.now(UTC), interval, anchor),
    )


def _interval(schedule: ScheduleConfig, scale: float) -> timedelta:
    assert schedule.every is not None
    # Whole microseconds, so that tick arithmetic below is exact integer arithmetic.
    return timedelta(microseconds=max(1, round(schedule.every * scale * 1e6)))


def _tick_at_or_before(when: datetime, interval: timedelta, anchor: datetime) -> datetime:
    return anchor + interval * ((when - anchor) // interval)


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
    """Hands a due job's fire to the scheduler, which fans it out to the job's agents."""

    def __init__(self, hand_off: Callable[[str, datetime], None]) -> None:
        super().__init__()
        self._hand_off = hand_off

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        # coalesce=True: only the newest of the due times is passed on.
        try:
            self._hand_off(job.id, run_times[-1].astimezone(UTC))
        finally:
            self._run_job_success(job.id, [])


class Scheduler:
    """Fires agents on their schedules; calls ``on_fire(agent, planned_utc)`` in the loop.

    Agents on the same schedule share one APScheduler job, which fans out to all of them when
    it is due: the work APScheduler does per tick grows with the number of distinct schedules,
    not of agents. A schedule with jitter gets a job per agent (each draws its own delay).
    Interval ticks are aligned to ``anchor`` (see ``make_trigger``). A missed fire found at
    ``add`` is handed off on its own, at the next turn of the event loop once started; a fire
    is never handed off twice for the same agent and planned time.
    """

    def __init__(
        self,
        on_fire: OnFire,
        *,
        timezone: str = "UTC",
        misfire_grace: float = 300.0,
        on_missed: OnFire | None = None,
        scale: float = 1.0,
        anchor: datetime = EPOCH,
    ) -> None:
        self._default_tz = timezone
        self._scale = scale
        self._anchor = anchor
        self._misfire_grace = misfire_grace
        self._on_fire = on_fire
        self._on_missed = on_missed or (lambda a, t: None)
        self._aps = AsyncIOScheduler(timezone=validate_timezone(timezone))
        self._aps.add_executor(_HandOffExecutor(self._fan_out), _EXECUTOR)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._schedules: dict[str, ScheduleConfig] = {}
        #: agent -> the id of the job that fires it; job id -> its agents, in order added
        self._job_of: dict[str, str] = {}
        self._members: dict[str, dict[str, None]] = {}
        #: missed fires found by ``add``, waiting to be handed off
        self._missed: dict[str, datetime] = {}
        self._missed_pending = False
        #: the last planned time handed off per agent
        self._handed: dict[str, datetime] = {}

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start firing; must be called from inside the running event loop."""
        self._loop = self._aps._eventloop = loop or asyncio.get_running_loop()
        self._aps.start()
        self._schedule_missed()

    def shutdown(self) -> None:
        """Stop firing. Runs already handed off are not affected."""
        self._missed.clear()
        if self._aps.running:
            self._aps.shutdown(wait=False)

    def set_misfire_grace(self, value: float) -> None:
        self._misfire_grace = value

    def add(
        self, agent: str, schedule: ScheduleConfig, *, last_planned: datetime | None = None
    ) -> None:
        """Schedule ``agent`` (replacing any previous schedule of it).

        With ``last_planned`` (the last fire time before a restart), the newest fire missed
        since then is handed off at once if it is at most ``misfire_grace`` old. Raises
        ``ValueError`` for an invalid schedule.
        """
        trigger = make_trigger(schedule, self._default_tz, self._scale, self._anchor)
        self._detach(agent)
        if schedule.jitter >= 1:
            job = f"agent:{agent}"  # its own job: the jitter is drawn per fire and per job
        elif schedule.cron is not None:
            job = f"cron:{schedule.cron}|{schedule.timezone or self._default_tz}"
        else:
            # Interval ticks do not depend on the timezone, so it is not part of the key.
            job = f"every:{_interval(schedule, self._scale).total_seconds()}s"
        members = self._members.get(job)
        if members is None:
            members = self._members[job] = {}
            self._aps.add_job(
                _never_called,
                trigger=trigger,
                id=job,
                name=job,
                executor=_EXECUTOR,
                coalesce=True,
                max_instances=1_000_000,
                misfire_grace_time=None,
            )
        members[agent] = None
        self._job_of[agent] = job
        self._schedules[agent] = schedule
        if last_planned is not None:
            missed = _newest_missed(trigger, last_planned, self._misfire_grace)
            if missed is not None:
                self._missed[agent] = missed
                self._schedule_missed()

    def remove(self, agent: str) -> None:
        """Stop scheduling ``agent``; unknown names are ignored."""
        self._detach(agent)
        self._handed.pop(agent, None)

    def _detach(self, agent: str) -> None:
        if self._schedules.pop(agent, None) is None:
            return
        self._missed.pop(agent, None)
        job = self._job_of.pop(agent)
        members = self._members[job]
        del members[agent]
        if not members:
            del self._members[job]
            self._aps.remove_job(job)

    def agents(self) -> list[str]:
        return list(self._schedules)

    def next_fire(self, agent: str) -> datetime | None:
        """The agent's next planned fire (UTC); None if unscheduled or not started yet."""
        job_id = self._job_of.get(agent)
        if job_id is None:
            return None
        # A job added before start() has no next_run_time attribute until the start.
        job_next: datetime | None = getattr(self._aps.get_job(job_id), "next_run_time", None)
        if job_next is None:
            return None
        nxt = job_next.astimezone(UTC)
        missed = self._missed.get(agent)
        return min(nxt, missed) if missed is not None else nxt

    # -- hand-off -----------------------------------------------------------------------------

    def _fan_out(self, job: str, planned: datetime) -> None:
        members = self._members.get(job)
        if members:
            self._hand_off(list(members), planned)

    def _hand_off(self, agents: list[str], planned: datetime) -> None:
        late = (datetime.now(UTC) - planned).total_seconds() > self._misfire_grace
        handed = self._handed
        for agent in agents:
            last = handed.get(agent)
            if last is not None and last >= planned:
                continue  # already handed off (a missed fire on the tick itself)
            handed[agent] = planned
            (self._on_missed if late else self._on_fire)(agent, planned)

    def _schedule_missed(self) -> None:
        if self._missed and not self._missed_pending and self._aps.running:
            assert self._loop is not None
            self._missed_pending = True
            self._loop.call_soon(self._hand_off_missed)

    def _hand_off_missed(self) -> None:
        self._missed_pending = False
        missed, self._missed = self._missed, {}
        for agent, planned in missed.items():
            if agent in self._schedules:
                self._hand_off([agent], planned)


def _newest_missed(trigger: Any, last_planned: datetime, grace: float) -> datetime | None:
    """The newest fire after ``last_planned`` that is already due, if at most ``grace`` old.

    Older missed fires are coalesced into it (and not walked one by one after a long
    downtime); when the newest is older than ``grace`` there is none.
    """
    now = datetime.now(UTC)
    horizon = now - timedelta(seconds=grace)
    if isinstance(trigger, IntervalTrigger):
        tick = _tick_at_or_before(now, trigger.interval, trigger.start_date)
        return tick if tick > last_planned and tick >= horizon else None
    newest: datetime | None = None
    prev = max(last_planned, horizon - timedelta(microseconds=1))
    while True:
        nxt = trigger.get_next_fire_time(prev, now)
        if nxt is None or nxt > now:
            return newest
        newest = prev = nxt


async def _never_called() -> None:  # the hand-off executor never calls job functions
    raise AssertionError("job function called")
