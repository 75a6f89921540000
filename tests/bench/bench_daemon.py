"""The real daemon as a subprocess: schedule lag on a shared tick, scrape cost, RSS, start time.

    .venv/bin/python -m tests.bench.bench_daemon [--agents 1000] [--ticks 3]

Schedule lag: ``--agents`` no-op agents, all ``every: 5s``. APScheduler's interval trigger
starts at "creation time + interval", and the daemon creates every trigger in one loop at
start, so all agents share one tick up to the time that loop takes; the benchmark measures
that spread (planned times of one tick, max - min) and reports it next to the lag. Each run's
``lag_s`` (planned fire -> run start, after the global concurrency slot) is read from its
``run.finished`` line on stdout. The first ``--ticks`` ticks run idle; then a client scrapes
``/metrics`` every second, phase-aligned so that a scrape starts on each tick (the worst
case), for ``--ticks`` more ticks. Right after the last tick, ``/metrics`` is scraped
``--scrapes`` times back to back in the quiet gap before the next tick.

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
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.bench._common import DaemonProcess, Spread, quantile, scrape, write_fleet_config

EVERY_S = 5


@dataclass
class TickResult:
    """What one daemon run with ``agents`` agents on a shared tick measured."""

    agents: int
    max_concurrent_runs: int
    every_s: int
    ready_s_wall: float = 0.0
    ready_s_field: float = 0.0
    #: lag_s of every run, per tick, in log order
    lags: list[list[float]] = field(default_factory=list)
    #: max - min planned time within each tick, seconds
    planned_spread: list[float] = field(default_factory=list)
    #: last run finished - first planned, per tick, seconds
    tick_span: list[float] = field(default_factory=list)
    idle_ticks: int = 0
    #: client-side times of the 1/s scrapes during the scraped ticks
    concurrent_scrapes: list[float] = field(default_factory=list)
    #: back-to-back scrapes after the runs: (seconds, body bytes)
    scrapes: list[tuple[float, int]] = field(default_factory=list)
    scrape_window_clean: bool = True
    outcomes: dict[str, int] = field(default_factory=dict)
    rss_kib_after: int = 0

    def lag_phase(self, scraped: bool) -> list[float]:
        ticks = self.lags[self.idle_ticks :] if scraped else self.lags[: self.idle_ticks]
        return [x for t in ticks for x in t]


def _parse_ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


class _TickCollector:
    """Groups ``run.finished`` lines into ticks (the k-th run of every agent is tick k)."""

    def __init__(self, agents: int) -> None:
        self.agents = agents
        self.per_agent: dict[str, int] = {}
        self.lags: list[list[float]] = []
        self.planned: list[list[float]] = []
        self.finished: list[list[float]] = []
        self.done_at: list[float] = []
        self.outcomes: dict[str, int] = {}
        self.cond = threading.Condition()

    def on_line(self, doc: dict[str, Any], received: float) -> None:
        if doc.get("event") != "run.finished":
            return
        agent = doc["agent"]
        k = self.per_agent.get(agent, 0)
        self.per_agent[agent] = k + 1
        finished = _parse_ts(doc["ts"])
        lag = float(doc["lag_s"])
        with self.cond:
            while len(self.lags) <= k:
                self.lags.append([])
                self.planned.append([])
                self.finished.append([])
            self.lags[k].append(lag)
            self.planned[k].append(finished - float(doc["duration_s"]) - lag)
            self.finished[k].append(finished)
            self.outcomes[doc["outcome"]] = self.outcomes.get(doc["outcome"], 0) + 1
            if len(self.lags[k]) == self.agents:
                self.done_at.append(received)
                self.cond.notify_all()

    def wait_ticks(self, n: int, timeout: float) -> None:
        """Return once ``n`` ticks are complete. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.done_at) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    done = [len(t) for t in self.lags]
                    raise TimeoutError(f"{n} ticks not complete in {timeout} s (runs: {done})")
                self.cond.wait(left)

    def tick_planned_wall(self, k: int) -> float:
        with self.cond:
            return min(self.planned[k])


class _AlignedScraper(threading.Thread):
    """GETs /metrics once a second, starting each scrape on a whole second after ``anchor``."""

    def __init__(self, port: int, anchor_wall: float) -> None:
        super().__init__(name="scraper", daemon=True)
        self.port = port
        self.anchor = anchor_wall
        self.times: list[float] = []
        self.errors: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            now = time.time()
            # next whole second after the anchor (the tick's planned time)
            wait = (self.anchor - now) % 1.0
            if self.stop_event.wait(wait):
                return
            try:
                took, _ = scrape(self.port)
                self.times.append(took)
            except (OSError, RuntimeError) as exc:
                self.errors.append(str(exc))


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
    result = TickResult(agents, max_concurrent_runs, every_s, idle_ticks=idle_ticks)
    collector = _TickCollector(agents)
    total_ticks = idle_ticks + scraped_ticks
    with tempfile.TemporaryDirectory(prefix="bench-tick-") as tmp:
        config = write_fleet_config(
            Path(tmp),
            agents=agents,
            schedule=f"{{every: {every_s}s}}",
            max_concurrent_runs=max_concurrent_runs,
        )
        daemon = DaemonProcess(config, on_line=collector.on_line)
        scraper: _AlignedScraper | None = None
        try:
            daemon.start()
            port = daemon.metrics_port(60)
            ready, seen = daemon.wait_event("daemon.ready", 60)
            result.ready_s_wall = seen - daemon.spawned_at
            result.ready_s_field = float(ready["ready_s"])
            # every tick should complete well within one interval; allow a lot more
            per_tick = every_s + 30
            collector.wait_ticks(idle_ticks, per_tick * (idle_ticks + 1))
            if scraped_ticks:
                anchor = collector.tick_planned_wall(idle_ticks - 1) if idle_ticks else time.time()
                scraper = _AlignedScraper(port, anchor)
                scraper.start()
                collector.wait_ticks(total_ticks, per_tick * (scraped_ticks + 1))
                scraper.stop_event.set()
                scraper.join(15)
                result.concurrent_scrapes = scraper.times
                if scraper.errors:
                    raise RuntimeError(f"scrape errors: {scraper.errors[:3]}")
            # The back-to-back scrapes, in the gap before the next tick.
            next_tick = collector.tick_planned_wall(total_ticks - 1) + every_s
            scrape(port)  # warm-up: first-call imports and caches in the daemon
            for _ in range(scrapes):
                result.scrapes.append(scrape(port))
            result.scrape_window_clean = time.time() < next_tick
            result.rss_kib_after = daemon.rss_kib()
        finally:
            if scraper is not None:
                scraper.stop_event.set()
            daemon.stop()
    with collector.cond:
        for k in range(total_ticks):
            result.lags.append(list(collector.lags[k]))
            result.planned_spread.append(max(collector.planned[k]) - min(collector.planned[k]))
            result.tick_span.append(max(collector.finished[k]) - min(collector.planned[k]))
        result.outcomes = dict(collector.outcomes)
    return result


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
        for i in range(starts):
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
    r = bench_tick_lag(
        agents=args.agents,
        idle_ticks=args.ticks,
        scraped_ticks=args.ticks,
        scrapes=args.scrapes,
        max_concurrent_runs=args.max_concurrent_runs,
    )
    print(f"ready: {r.ready_s_wall:.3f} s wall, ready_s {r.ready_s_field}")
    for k, lags in enumerate(r.lags):
        phase = "idle" if k < r.idle_ticks else "scraped"
        print(
            f"tick {k} ({phase}): n={len(lags)} lag p50 {quantile(lags, 0.5) * 1e3:.1f} ms "
            f"p99 {quantile(lags, 0.99) * 1e3:.1f} ms max {max(lags) * 1e3:.1f} ms; "
            f"planned spread {r.planned_spread[k] * 1e3:.1f} ms, span {r.tick_span[k] * 1e3:.0f} ms"
        )
    print(f"outcomes {r.outcomes}; concurrent scrapes {Spread.of(r.concurrent_scrapes).fmt(1, 1e3)} ms")
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
