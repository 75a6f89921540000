"""The scheduler adapter: triggers, schedule checks, and fires handed off by real APScheduler.

The ``Scheduler`` tests run APScheduler on the test's own asyncio loop. Fires due at start are
processed as soon as the loop turns, so the tests wait on events (bounded by ``fail_after``)
rather than on time, and check "nothing fired" against a sentinel agent that was due in the
same pass. Interval ticks sit on a grid anchored at the epoch; the tests that depend on where
"now" falls on that grid anchor it themselves (``anchor=``), so they do not depend on the
wall clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import anyio
import anyio.lowlevel
import pytest
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from pydantic import ValidationError

from supervisor.config import ScheduleConfig
from supervisor.scheduler import (
    EPOCH,
    Scheduler,
    crontab_weekdays,
    expected_interval,
    make_trigger,
    validate_schedule,
    validate_timezone,
)

GRACE = 300.0


def unchecked(**fields: object) -> ScheduleConfig:
    """A ScheduleConfig built without validation, to hand invalid schedules to the checks."""
    return ScheduleConfig.model_construct(**fields)  # type: ignore[arg-type]


# -- triggers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("after", "expected_utc"),
    [
        (datetime(2026, 1, 10, 12, tzinfo=UTC), datetime(2026, 1, 11, 8, 30, tzinfo=UTC)),
        (datetime(2026, 7, 10, 12, tzinfo=UTC), datetime(2026, 7, 11, 7, 30, tzinfo=UTC)),
    ],
    ids=["winter-cet", "summer-cest"],
)
def test_cron_trigger_fires_in_the_schedules_timezone(
    after: datetime, expected_utc: datetime
) -> None:
    """A cron schedule with a timezone fires at local wall-clock time, across DST."""
    trigger = make_trigger(ScheduleConfig(cron="30 9 * * *", timezone="Europe/Berlin"))

    assert isinstance(trigger, CronTrigger)
    assert trigger.timezone == ZoneInfo("Europe/Berlin")
    assert trigger.get_next_fire_time(None, after) == expected_utc


def test_cron_trigger_without_timezone_uses_the_default() -> None:
    """A cron schedule with no timezone of its own takes the default one given."""
    trigger = make_trigger(ScheduleConfig(cron="0 6 * * *"), default_tz="America/New_York")

    assert trigger.timezone == ZoneInfo("America/New_York")
    nxt = trigger.get_next_fire_time(None, datetime(2026, 1, 10, 12, tzinfo=UTC))
    assert nxt == datetime(2026, 1, 11, 11, tzinfo=UTC)


def test_interval_trigger_fires_every_interval() -> None:
    """An `every` schedule becomes an interval trigger: each fire is the previous plus every."""
    trigger = make_trigger(ScheduleConfig(every="90s"))

    assert isinstance(trigger, IntervalTrigger)
    assert trigger.interval == timedelta(seconds=90)
    prev = datetime(2026, 1, 1, tzinfo=UTC)
    assert trigger.get_next_fire_time(prev, prev) == prev + timedelta(seconds=90)


@pytest.mark.parametrize(
    ("jitter", "expected"), [(0.0, None), (0.5, None), (5.0, 5)], ids=["none", "sub-second", "5s"]
)
def test_jitter_is_passed_on_in_whole_seconds(jitter: float, expected: int | None) -> None:
    """Jitter of a second or more is set on the trigger; less than a second is none."""
    assert make_trigger(ScheduleConfig(cron="* * * * *", jitter=jitter)).jitter == expected
    assert make_trigger(ScheduleConfig(every=60, jitter=jitter)).jitter == expected


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        (unchecked(cron="*/70 * * * *"), "invalid cron expression '*/70 * * * *'"),
        (unchecked(cron="* * *"), "invalid cron expression '* * *'"),
        (unchecked(cron="0 0 30 2 *"), "cron expression '0 0 30 2 *' never fires"),
        (unchecked(cron="0 * * * *", timezone="Mars/Olympus"), "unknown timezone 'Mars/Olympus'"),
        (unchecked(every=60, timezone="Nowhere"), "unknown timezone 'Nowhere'"),
    ],
    ids=["field-out-of-range", "too-few-fields", "february-30th", "cron-bad-tz", "every-bad-tz"],
)
def test_validate_schedule_rejects_what_cannot_fire(schedule: ScheduleConfig, message: str) -> None:
    """validate_schedule raises ValueError naming the problem."""
    with pytest.raises(ValueError, match="^" + message.replace("*", r"\*")):
        validate_schedule(schedule)


@pytest.mark.parametrize(
    "schedule",
    [
        unchecked(cron="*/5 * * * *"),
        unchecked(cron="0 9 * * 1-5", timezone="Asia/Tokyo"),
        unchecked(every=0.5),
    ],
    ids=["cron", "cron-weekdays-tz", "sub-second-interval"],
)
def test_validate_schedule_accepts_valid_schedules(schedule: ScheduleConfig) -> None:
    """A schedule that fires passes validation silently."""
    validate_schedule(schedule)


def test_schedule_config_runs_the_same_checks() -> None:
    """An invalid cron in the config model fails validation with the scheduler's message."""
    with pytest.raises(ValidationError, match="invalid cron expression"):
        ScheduleConfig(cron="*/70 * * * *")


def test_validate_timezone_names_the_unknown_zone() -> None:
    """An unknown zone name is a ValueError; a known one gives the ZoneInfo."""
    assert validate_timezone("Europe/Paris") == ZoneInfo("Europe/Paris")
    with pytest.raises(ValueError, match="unknown timezone 'Europe/Atlantis'"):
        validate_timezone("Europe/Atlantis")


@pytest.mark.parametrize(
    ("schedule", "seconds"),
    [
        (ScheduleConfig(cron="*/5 * * * *"), 300.0),
        (ScheduleConfig(cron="0 * * * *"), 3600.0),
        (ScheduleConfig(cron="0 0 * * *", timezone="Asia/Kolkata"), 86400.0),
        (ScheduleConfig(every=45), 45.0),
        (ScheduleConfig(every="1h30m"), 5400.0),
    ],
    ids=["cron-every-5-min", "cron-hourly", "cron-daily-tz", "every-45s", "every-1h30m"],
)
def test_expected_interval(schedule: ScheduleConfig, seconds: float) -> None:
    """expected_interval is the gap between two fires, for cron and interval alike."""
    assert expected_interval(schedule) == seconds
    assert schedule.expected_interval == seconds


# -- the Scheduler ----------------------------------------------------------------------------


class Recorder:
    """Collects on_fire / on_missed calls; ``wait_for`` returns once an agent was handed off."""

    def __init__(self) -> None:
        self.fired: list[tuple[str, datetime]] = []
        self.missed: list[tuple[str, datetime]] = []
        self._events: dict[str, anyio.Event] = {}

    def _event(self, agent: str) -> anyio.Event:
        return self._events.setdefault(agent, anyio.Event())

    def on_fire(self, agent: str, planned: datetime) -> None:
        self.fired.append((agent, planned))
        self._event(agent).set()

    def on_missed(self, agent: str, planned: datetime) -> None:
        self.missed.append((agent, planned))
        self._event(agent).set()

    async def wait_for(self, agent: str) -> None:
        with anyio.fail_after(5):
            await self._event(agent).wait()


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
async def make_scheduler(rec: Recorder) -> AsyncIterator[Callable[..., Scheduler]]:
    """Build schedulers wired to ``rec``; each is shut down after the test."""
    made: list[Scheduler] = []

    def make(misfire_grace: float = GRACE, anchor: datetime = EPOCH) -> Scheduler:
        s = Scheduler(
            rec.on_fire, misfire_grace=misfire_grace, on_missed=rec.on_missed, anchor=anchor
        )
        made.append(s)
        return s

    yield make
    for s in made:
        s.shutdown()


def now_s() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


async def test_missed_fires_within_grace_are_coalesced_into_one_at_start(
    make_scheduler: Callable[..., Scheduler], rec: Recorder
) -> None:
    """Several fires missed since last_planned, all within grace: ONE fire, the newest."""
    last = now_s() - timedelta(seconds=250)
    s = make_scheduler(anchor=last)
    s.add("a", ScheduleConfig(every=60), last_planned=last)  # missed: -190, -130, -70, -10 s
    s.start()
    await rec.wait_for("a")

    assert rec.fired == [("a", last + timedelta(seconds=240))]
    assert rec.missed == []
    assert s.next_fire("a") == last + timedelta(seconds=300)


@pytest.mark.parametrize(
    ("schedule", "downtime"),
    [
        (ScheduleConfig(cron="* * * * *"), timedelta(hours=1)),
        (ScheduleConfig(every=3600), timedelta(hours=3, minutes=2)),
    ],
    ids=["cron-every-minute-down-1h", "hourly-interval-down-3h"],
)
async def test_newest_missed_fire_within_grace_fires_even_after_a_long_downtime(
    make_scheduler: Callable[..., Scheduler],
    rec: Recorder,
    schedule: ScheduleConfig,
    downtime: timedelta,
) -> None:
    """Older missed fires are past the grace, the newest is not: that one fires, once."""
    start = datetime.now(UTC)
    last = now_s() - downtime
    s = make_scheduler(anchor=last)
    s.add("a", schedule, last_planned=last)
    s.start()
    await rec.wait_for("a")

    [(agent, planned)] = rec.fired
    assert agent == "a"
    assert start - timedelta(seconds=GRACE) <= planned <= datetime.now(UTC)
    if schedule.every is not None:
        assert planned == last + timedelta(hours=3)
    else:
        assert planned.second == 0 and start - planned < timedelta(seconds=60)
    assert rec.missed == []


async def test_last_planned_older_than_grace_does_not_fire_at_start(
    make_scheduler: Callable[..., Scheduler], rec: Recorder
) -> None:
    """When every fire missed since last_planned is older than the grace, none fires."""
    now = now_s()
    # Hourly ticks at now - 10 min, + 50 min, ...: the newest is past the grace.
    s = make_scheduler(anchor=now - timedelta(minutes=10))
    s.add("stale", ScheduleConfig(every=3600), last_planned=now - timedelta(seconds=3600 + 600))
    s.add("sentinel", ScheduleConfig(every=60), last_planned=now - timedelta(seconds=70))
    s.start()
    await rec.wait_for("sentinel")  # the pass that would have fired "stale" is done

    assert [agent for agent, _ in rec.fired] == ["sentinel"]
    assert rec.missed == []
    nxt = s.next_fire("stale")
    assert nxt is not None and nxt > datetime.now(UTC)


async def test_no_missed_fire_means_no_fire_at_start(
    make_scheduler: Callable[..., Scheduler], rec: Recorder
) -> None:
    """A last_planned whose next fire is still ahead does not fire at start."""
    now = now_s()
    s = make_scheduler(anchor=now - timedelta(seconds=10))
    s.add("fresh", ScheduleConfig(every=3600), last_planned=now - timedelta(seconds=10))
    s.add("sentinel", ScheduleConfig(every=60), last_planned=now - timedelta(seconds=70))
    s.start()
    await rec.wait_for("sentinel")

    assert [agent for agent, _ in rec.fired] == ["sentinel"]


async def test_fire_older_than_misfire_grace_goes_to_on_missed(
    make_scheduler: Callable[..., Scheduler], rec: Recorder
) -> None:
    """A fire handed off later than misfire_grace after its planned time is reported missed."""
    last = now_s() - timedelta(seconds=100)
    s = make_scheduler(anchor=last)
    s.add("a", ScheduleConfig(every=60), last_planned=last)  # due 40 s ago, within 300 s
    s.set_misfire_grace(10)  # ...but by hand-off time the grace is 10 s
    s.start()
    await rec.wait_for("a")

    assert rec.missed == [("a", last + timedelta(seconds=60))]
    assert rec.fired == []


async def test_remove_stops_firing(make_scheduler: Callable[..., Scheduler], rec: Recorder) -> None:
    """A removed agent is not fired, has no next fire, and is no longer listed."""
    last = now_s() - timedelta(seconds=70)
    s = make_scheduler(anchor=last)
    s.add("gone", ScheduleConfig(every=60), last_planned=last)
    s.add("kept", ScheduleConfig(every=60), last_planned=last)
    s.remove("gone")
    s.remove("never-added")  # ignored
    s.start()
    await rec.wait_for("kept")

    assert [agent for agent, _ in rec.fired] == ["kept"]
    assert s.agents() == ["kept"]
    assert s.next_fire("gone") is None

    s.remove("kept")
    assert s.agents() == []
    assert s.next_fire("kept") is None


async def test_next_fire_reports_the_next_planned_time(
    make_scheduler: Callable[..., Scheduler],
) -> None:
    """next_fire is the job's next planned time in UTC, None for an unknown agent."""
    s = make_scheduler()
    s.add("hourly", ScheduleConfig(cron="0 * * * *"))
    s.add("berlin", ScheduleConfig(cron="0 9 * * *", timezone="Europe/Berlin"))
    assert s.next_fire("hourly") is None  # not started: not computed yet, and no error
    before = datetime.now(UTC)
    s.start()

    hourly = s.next_fire("hourly")
    assert hourly is not None and hourly.tzinfo == UTC
    assert (hourly.minute, hourly.second, hourly.microsecond) == (0, 0, 0)
    assert before < hourly <= before + timedelta(hours=1, seconds=1)
    berlin = s.next_fire("berlin")
    assert berlin is not None
    assert berlin.astimezone(ZoneInfo("Europe/Berlin")).hour == 9
    assert timedelta(0) < berlin - before <= timedelta(days=1)
    assert s.next_fire("unknown") is None


async def test_add_replaces_an_existing_schedule(
    make_scheduler: Callable[..., Scheduler],
) -> None:
    """Adding an agent again replaces its schedule rather than adding a second one."""
    anchor = now_s()
    s = make_scheduler(anchor=anchor)
    s.add("a", ScheduleConfig(every=3600))
    s.start()
    assert s.next_fire("a") == anchor + timedelta(hours=1)
    s.add("a", ScheduleConfig(every=60))

    assert s.agents() == ["a"]
    assert s.next_fire("a") == anchor + timedelta(seconds=60)
    assert len(s._aps.get_jobs()) == 1  # the hourly job went with its last agent


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("1-5", "mon-fri"),
        ("0", "sun"),
        ("7", "sun"),
        ("0-6", "sun,mon-sat"),
        ("0-7", "*"),
        ("1,3,5", "mon,wed,fri"),
        ("5-7", "fri-sun"),
        ("mon-fri", "mon-fri"),
    ],
    ids=lambda v: str(v),
)
def test_crontab_weekday_numbers_mean_what_crontab_means(field: str, expected: str) -> None:
    """Day-of-week numbers follow crontab (0 and 7 are Sunday), not APScheduler's 0 = Monday."""
    assert crontab_weekdays(field) == expected


def test_numeric_weekday_cron_fires_on_the_crontab_day() -> None:
    """'0 9 * * 1' fires on a Monday (2026-11-23), not on a Tuesday."""
    trigger = make_trigger(ScheduleConfig(cron="0 9 * * 1"))
    nxt = trigger.get_next_fire_time(None, datetime(2026, 11, 21, tzinfo=UTC))
    assert nxt is not None and nxt.weekday() == 0 and nxt.day == 23


# -- shared ticks --------------------------------------------------------------------------------


async def test_interval_ticks_sit_on_the_epoch_grid_whenever_the_scheduler_starts(
    make_scheduler: Callable[..., Scheduler],
) -> None:
    """Two schedulers started apart (a restart) plan the same ticks, multiples of the interval."""
    first = make_scheduler()
    first.add("a", ScheduleConfig(every=7))
    first.start()
    await anyio.lowlevel.checkpoint()  # a turn of the loop between the two "processes"
    second = make_scheduler()
    second.add("a", ScheduleConfig(every=7))
    second.start()

    nxt = first.next_fire("a")
    assert nxt is not None and nxt == second.next_fire("a")
    assert (nxt - EPOCH) % timedelta(seconds=7) == timedelta(0)
    assert nxt - datetime.now(UTC) <= timedelta(seconds=7)


async def test_agents_on_one_schedule_share_a_job_and_fire_on_the_same_tick(
    make_scheduler: Callable[..., Scheduler], rec: Recorder
) -> None:
    """Twenty agents on one interval are one APScheduler job; each fire names the same tick."""
    s = make_scheduler()
    names = [f"agent-{i:02d}" for i in range(20)]
    for name in names:
        s.add(name, ScheduleConfig(every=0.2))
    s.add("jittered", ScheduleConfig(every=60, jitter=5))
    s.add("cron", ScheduleConfig(cron="0 * * * *"))
    s.add("cron-too", ScheduleConfig(cron="0 * * * *"))
    assert len(s._aps.get_jobs()) == 3  # the interval, the jittered agent, the cron
    s.start()
    for name in names:
        await rec.wait_for(name)  # within one interval: a real 0.2 s at most

    first = {planned for agent, planned in rec.fired if agent in names}
    tick = min(first)
    assert [agent for agent, planned in rec.fired if planned == tick] == names
    assert (tick - EPOCH) % timedelta(milliseconds=200) == timedelta(0)


async def test_a_shared_job_outlives_all_but_its_last_agent(
    make_scheduler: Callable[..., Scheduler],
) -> None:
    """Removing one agent of a shared schedule leaves the others scheduled; the last removes it."""
    s = make_scheduler()
    s.add("a", ScheduleConfig(every=60))
    s.add("b", ScheduleConfig(every=60))
    s.start()
    s.remove("a")
    assert s.next_fire("a") is None
    assert s.next_fire("b") is not None
    s.remove("b")
    assert s._aps.get_jobs() == []


async def test_a_fire_is_handed_off_once_per_agent_and_planned_time(
    make_scheduler: Callable[..., Scheduler], rec: Recorder
) -> None:
    """A missed fire handed off at start and the job's tick at that same instant fire once."""
    s = make_scheduler()
    s.add("a", ScheduleConfig(every=60))
    tick = now_s()
    s._hand_off(["a"], tick)  # as the missed fire at start would
    s._hand_off(["a"], tick)  # as the shared job's tick would
    s._hand_off(["a"], tick - timedelta(seconds=60))
    assert rec.fired == [("a", tick)]
