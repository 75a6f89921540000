"""The real daemon as a subprocess: schedule lag on a shared tick, scrape cost, RSS, start time.

    .venv/bin/python -m tests.bench.bench_daemon [--agents 1000] [--ticks 3]

Schedule lag needs every agent due at the same instant. The scheduler puts interval ticks on
a grid anchored at the epoch (every multiple of 5 s for ``every: 5s``), so a fleet on one
interval shares its ticks (``bench_interval_spread`` checks that on a naive fleet). The first
tick after a spawn may still come while the daemon starts, so the benchmark makes the first
fire a known one: it waits for a tick T0 of the grid, writes each agent's state file with
``last_planned_fire = T0 - 5 s`` and spawns the daemon, whose missed-fire catch-up fires T0 for
every agent at start (excluded from the results); every later fire is at T0 + 5 s * k. After
the run the state files are read back to check that each agent's last planned fire is one of
those instants.

Each run's ``lag_s`` (planned fire -> run start, after the global concurrency slot) comes from
its ``run.finished`` line on stdout. The first ``--ticks`` ticks run idle; then a client
scrapes ``/metrics`` every second, phase-aligned so that one scrape starts on each tick (the
worst case), for ``--ticks`` more ticks. Right after the last tick, ``/metrics`` is scraped
``--scrapes`` times back to back, in the quiet gap before the next tick.

Start and idle memory: ``--starts`` daemons with 100 agents on a one-hour interval, each timed
from spawn to its ``daemon.ready`` line, then left idle for ``--idle`` seconds before reading
VmRSS from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from supervisor.state.base import AgentState
from supervisor.state.jsonfile import encode_state
from tests.bench._common import DaemonProcess, Spread, quantile, scrape, write_fleet_config

EVERY_S = 5


@dataclass
class TickResult:
    """What one daemon run with ``agents`` agents on a shared tick measured."""

    agents: int
    max_concurrent_runs: int
    every_s: int
    idle_ticks: int
    ready_s_wall: float = 0.0
    ready_s_field: float = 0.0
    #: lag_s of every run of the catch-up fire at start (tick 0), not in the results
    catchup_lags: list[float] = field(default_factory=list)
    #: seconds from T0 to the catch-up tick's last line; past ``every_s`` it overlapped tick 1
    catchup_span: float = 0.0
    #: lag_s of every run, per measured tick (ticks 1..), in log order
    lags: list[list[float]] = field(default_factory=list)
    #: seconds from the tick to its last run.finished line read, per measured tick
    tick_span: list[float] = field(default_factory=list)
    #: distinct last planned fire times found in the state files after the run
    distinct_planned: int = 0
    #: whether every agent's last planned fire is exactly T0 + every_s * k
    planned_matches_tick: bool = False
    #: client-side times of the 1/s scrapes during the scraped ticks
    concurrent_scrapes: list[float] = field(default_factory=list)
    #: back-to-back scrapes after the runs: (seconds, body bytes)
    scrapes: list[tuple[float, int]] = field(default_factory=list)
    scrape_window_clean: bool = True
    outcomes: dict[str, int] = field(default_factory=dict)
    #: fires not run, by outcome (``skipped_overlap``: the agent's previous run still going)
    skipped: dict[str, int] = field(default_factory=dict)
    rss_kib_after: int = 0

    @property
    def first_tick_overlapped(self) -> bool:
        """Whether the catch-up tick was still running when tick 1 was due."""
        return self.catchup_span > self.every_s

    def lag_phase(self, scraped: bool) -> list[float]:
        """Pooled lags of the idle (or scraped) ticks; tick 1 left out if it overlapped."""
        first = 1 if self.first_tick_overlapped else 0
        if scraped:
            ticks = self.lags[max(first, self.idle_ticks) :]
        else:
            ticks = self.lags[first : self.idle_ticks]
        return [x for t in ticks for x in t]


class _TickCollector:
    """Groups ``run.finished`` lines into ticks (the k-th run of every agent is tick k)."""

    def __init__(self, agents: int) -> None:
        self.agents = agents
        self.per_agent: dict[str, int] = {}
        self.lags: list[list[float]] = []
        self.last_seen: list[float] = []
        self.done = 0
        self.outcomes: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.cond = threading.Condition()

    def on_line(self, doc: dict[str, Any], received: float) -> None:
        if doc.get("event") == "run.skipped":
            with self.cond:
                self.skipped[doc["outcome"]] = self.skipped.get(doc["outcome"], 0) + 1
            return
        if doc.get("event") != "run.finished":
            return
        agent = doc["agent"]
        k = self.per_agent.get(agent, 0)
        self.per_agent[agent] = k + 1
        with self.cond:
            while len(self.lags) <= k:
                self.lags.append([])
                self.last_seen.append(0.0)
            self.lags[k].append(float(doc["lag_s"]))
            self.last_seen[k] = time.time()
            self.outcomes[doc["outcome"]] = self.outcomes.get(doc["outcome"], 0) + 1
            if len(self.lags[k]) == self.agents:
                self.done += 1
                self.cond.notify_all()

    def wait_ticks(self, n: int, timeout: float) -> None:
        """Return once ``n`` ticks (catch-up included) are complete. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.done < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    runs = [len(t) for t in self.lags]
                    raise TimeoutError(f"{n} ticks not complete in {timeout} s (runs: {runs})")
                self.cond.wait(left)


class _AlignedScraper(threading.Thread):
    """GETs /metrics once a second, each scrape starting on a whole second after ``anchor``."""

    def __init__(self, port: int, anchor_wall: float) -> None:
        super().__init__(name="scraper", daemon=True)
        self.port = port
        self.anchor = anchor_wall
        self.times: list[float] = []
        self.errors: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            wait = (self.anchor - time.time()) % 1.0
            if self.stop_event.wait(wait):
                return
            try:
                took, _ = scrape(self.port)
                self.times.append(took)
            except (OSError, RuntimeError) as exc:
                self.errors.append(str(exc))


def wait_for_tick(every_s: float) -> datetime:
    """Sleep until just past the next multiple of ``every_s`` since the epoch; return it."""
    now = time.time()
    tick = (now // every_s + 1) * every_s
    time.sleep(tick - now + 0.01)  # the benchmark's own pacing, not a poll
    return datetime.fromtimestamp(tick, UTC)


def _align_fleet(state_dir: Path, agents: int, t0: datetime, every_s: int) -> None:
    """State files whose last planned fire is one interval before ``t0``, for every agent."""
    state_dir.mkdir(parents=True, exist_ok=True)
    last = t0 - timedelta(seconds=every_s)
    for i in range(agents):
        name = f"agent-{i:04d}"
        raw = encode_state(AgentState(agent=name, last_planned_fire=last))
        (state_dir / f"{name}.json").write_bytes(raw)


def _last_planned(state_dir: Path) -> list[datetime]:
    out = []
    for path in sorted(state_dir.glob("agent-*.json")):
        doc = orjson.loads(path.read_bytes())
        if doc.get("last_run") and doc["last_run"].get("planned_at"):
            out.append(datetime.fromisoformat(doc["last_run"]["planned_at"]))
    return out


def bench_tick_lag(
    *,
    agents: int = 1000,
    idle_ticks: int = 3,
    scraped_ticks: int = 3,
    scrapes: int = 30,
    max_concurrent_runs: int = 1000,
    every_s: int = EVERY_S,
) -> TickResult:
    """Run the daemon with ``agents`` agents on one tick; see the module docstring."""
    result = TickResult(agents, max_concurrent_runs, every_s, idle_ticks)
    collector = _TickCollector(agents)
    measured = idle_ticks + scraped_ticks
    with tempfile.TemporaryDirectory(prefix="bench-tick-") as tmp:
        state_dir = Path(tmp) / "state"
        config = write_fleet_config(
            Path(tmp),
            agents=agents,
            schedule=f"{{every: {every_s}s}}",
            max_concurrent_runs=max_concurrent_runs,
            state_dir=state_dir,
        )
        t0 = wait_for_tick(every_s)
        _align_fleet(state_dir, agents, t0, every_s)
        daemon = DaemonProcess(config, on_line=collector.on_line)
        scraper: _AlignedScraper | None = None
        try:
            daemon.start()
            port = daemon.metrics_port(60)
            ready, seen = daemon.wait_event("daemon.ready", 60)
            result.ready_s_wall = seen - daemon.spawned_at
            result.ready_s_field = float(ready["ready_s"])
            # A tick should be over well within one interval; allow far more.
            per_tick = every_s + 30
            collector.wait_ticks(1 + idle_ticks, per_tick * (idle_ticks + 2))
            if scraped_ticks:
                scraper = _AlignedScraper(port, t0.timestamp())
                scraper.start()
                collector.wait_ticks(1 + measured, per_tick * (scraped_ticks + 1))
                scraper.stop_event.set()
                scraper.join(15)
                result.concurrent_scrapes = scraper.times
                if scraper.errors:
                    raise RuntimeError(f"scrape errors: {scraper.errors[:3]}")
            # The back-to-back scrapes, in the gap before the next tick.
            next_tick = t0.timestamp() + every_s * (measured + 1)
            scrape(port)  # warm-up: first-call imports and caches in the daemon
            for _ in range(scrapes):
                result.scrapes.append(scrape(port))
            result.scrape_window_clean = time.time() < next_tick
            result.rss_kib_after = daemon.rss_kib()
        finally:
            if scraper is not None:
                scraper.stop_event.set()
            status = daemon.stop()
        if status != 0:
            raise RuntimeError(f"daemon exited with status {status}: {daemon.stderr_tail}")
        planned = _last_planned(state_dir)
        result.distinct_planned = len(set(planned))
        # Every last planned fire must sit on the grid T0 + every_s * k (which k depends on
        # how many fires were skipped for overlap).
        offsets = [(p - t0).total_seconds() / every_s for p in planned]
        result.planned_matches_tick = len(planned) == agents and all(
            abs(x - round(x)) < 1e-6 for x in offsets
        )
    with collector.cond:
        result.catchup_lags = list(collector.lags[0])
        result.catchup_span = collector.last_seen[0] - t0.timestamp()
        for k in range(1, measured + 1):
            result.lags.append(list(collector.lags[k]))
            result.tick_span.append(collector.last_seen[k] - (t0.timestamp() + every_s * k))
        result.outcomes = dict(collector.outcomes)
        result.skipped = dict(collector.skipped)
    return result


@dataclass
class SpreadResult:
    """A naive interval fleet (no alignment): how far apart one tick's planned fires are."""

    agents: int
    spread_s: float
    distinct: int
    lags: list[float]


def bench_interval_spread(*, agents: int = 1000, every_s: int = EVERY_S) -> SpreadResult:
    """Start a fleet all on ``every: 5s`` with no state, let one tick run, read planned times."""
    collector = _TickCollector(agents)
    with tempfile.TemporaryDirectory(prefix="bench-spread-") as tmp:
        state_dir = Path(tmp) / "state"
        config = write_fleet_config(
            Path(tmp), agents=agents, schedule=f"{{every: {every_s}s}}",
            max_concurrent_runs=1000, state_dir=state_dir,
        )  # fmt: skip
        daemon = DaemonProcess(config, on_line=collector.on_line)
        try:
            daemon.start()
            daemon.wait_event("daemon.ready", 60)
            collector.wait_ticks(1, every_s + 30)
        finally:
            status = daemon.stop()
        if status != 0:
            raise RuntimeError(f"daemon exited with status {status}: {daemon.stderr_tail}")
        planned = _last_planned(state_dir)
    stamps = [p.timestamp() for p in planned]
    return SpreadResult(agents, max(stamps) - min(stamps), len(set(planned)), collector.lags[0])


@dataclass
class StartResult:
    """Spawn-to-ready times and idle RSS of ``starts`` daemons with ``agents`` agents."""

    agents: int
    idle_s: float
    ready_wall: list[float] = field(default_factory=list)
    ready_field: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)


def bench_start(*, agents: int = 100, starts: int = 5, idle_s: float = 3.0) -> StartResult:
    """Start the daemon ``starts`` times; time spawn -> ``daemon.ready``; RSS after ``idle_s``."""
    result = StartResult(agents, idle_s)
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        for i in range(-1, starts):  # start -1 warms the page cache and the bytecode cache
            config = write_fleet_config(
                Path(tmp),
                agents=agents,
                schedule="{every: 1h}",
                state_dir=Path(tmp) / f"state-{i}",
                name=f"start-{i}.yaml",
            )
            daemon = DaemonProcess(config)
            try:
                daemon.start()
                ready, seen = daemon.wait_event("daemon.ready", 60)
                if i < 0:
                    continue
                result.ready_wall.append(seen - daemon.spawned_at)
                result.ready_field.append(float(ready["ready_s"]))
                if idle_s > 0:
                    # Idle on purpose: nothing is due for an hour. Not a poll.
                    time.sleep(idle_s)
                    result.rss_kib.append(daemon.rss_kib())
            finally:
                status = daemon.stop()
            if status not in (0, None):
                raise RuntimeError(f"daemon exited with status {status}: {daemon.stderr_tail}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--ticks", type=int, default=3)
    parser.add_argument("--scrapes", type=int, default=30)
    parser.add_argument("--max-concurrent-runs", type=int, default=1000)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--idle", type=float, default=3.0)
    args = parser.parse_args()
    sp = bench_interval_spread(agents=args.agents)
    print(
        f"naive interval fleet: planned spread {sp.spread_s * 1e3:.0f} ms over "
        f"{sp.distinct} distinct instants; lag p99 {quantile(sp.lags, 0.99) * 1e3:.0f} ms"
    )
    r = bench_tick_lag(
        agents=args.agents,
        idle_ticks=args.ticks,
        scraped_ticks=args.ticks,
        scrapes=args.scrapes,
        max_concurrent_runs=args.max_concurrent_runs,
    )
    print(f"ready: {r.ready_s_wall:.3f} s wall, ready_s {r.ready_s_field}")
    print(
        f"aligned: {r.distinct_planned} distinct last planned fire(s), "
        f"on the tick: {r.planned_matches_tick}; catch-up tick lag p99 "
        f"{quantile(r.catchup_lags, 0.99) * 1e3:.0f} ms"
    )
    for k, lags in enumerate(r.lags):
        phase = "idle" if k < r.idle_ticks else "scraped"
        print(
            f"tick {k + 1} ({phase}): n={len(lags)} lag p50 {quantile(lags, 0.5) * 1e3:.1f} ms "
            f"p99 {quantile(lags, 0.99) * 1e3:.1f} ms max {max(lags) * 1e3:.1f} ms; "
            f"last line {r.tick_span[k] * 1e3:.0f} ms after the tick"
        )
    print(
        f"outcomes {r.outcomes}; "
        f"concurrent scrapes {Spread.of(r.concurrent_scrapes).fmt(1, 1e3)} ms"
    )
    times = [t for t, _ in r.scrapes]
    print(
        f"scrapes: {Spread.of(times).fmt(1, 1e3)} ms, size {r.scrapes[-1][1]:,} B, "
        f"clean window {r.scrape_window_clean}; RSS after {r.rss_kib_after / 1024:.1f} MiB"
    )
    s = bench_start(starts=args.starts, idle_s=args.idle)
    print(
        f"start (100 agents): wall {Spread.of(s.ready_wall).fmt(3)} s, ready_s "
        f"{Spread.of(s.ready_field).fmt(3)} s, RSS {Spread.of(s.rss_kib).fmt(1, 1 / 1024)} MiB"
    )


if __name__ == "__main__":
    main()
