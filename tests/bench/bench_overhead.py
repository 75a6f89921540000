"""Per-run cost: the supervisor over bare APScheduler (in process), and over cron (a process per run).

    .venv/bin/python -m tests.bench.bench_overhead [--runs 2000] [--rounds 5] [--spawns 20]

In process, one asyncio loop, one running ``AsyncIOScheduler`` (APScheduler 3.11), jobs fired
back to back: add a job due now, wait for APScheduler's ``EVENT_JOB_EXECUTED``, repeat. The
variants differ only in what the job's coroutine does:

- ``aps``: nothing (the baseline);
- ``aps+fire[json]``: ``Runner.fire()`` of a no-op agent with the real ``JsonFileStore`` (temp
  file, fsync, rename, directory fsync), real ``Metrics``, and the ``run.finished`` JSON line
  rendered to ``/dev/null``;
- ``aps+fire[json, no fsync]``: the same with ``os.fsync`` replaced by a no-op for the round,
  to split the fsyncs from the rest of the commit;
- ``aps+fire[memory]``: the same with the ``MemoryStore`` (same encoding and validation, no
  file, no worker thread).

Rounds interleave the variants so that machine noise hits them alike; each round yields a
per-run time for each variant and ratios to that round's baseline.

The cron model: the same no-op run as a fresh ``python -c`` process per run, timed from spawn
to exit, in three flavours (nothing imported; the agent module imported and run with
``asyncio.run``; an agent module that imports the supervisor's contract, as real agents do),
plus ``agent-supervisor run-once`` (cron driving the supervisor's own one-shot command).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from prometheus_client import CollectorRegistry

from supervisor.clock import SystemClock
from supervisor.config import load_config
from supervisor.guards.breaker import CircuitBreaker
from supervisor.logging import configure_logging
from supervisor.metrics import Metrics
from supervisor.runner import AgentSlot, Runner
from supervisor.state import JsonFileStore, MemoryStore, StateStore
from tests.bench._common import (
    NOOP_MODULE,
    NOOP_SUPERVISOR_MODULE,
    PYTHON,
    REPO,
    Spread,
    write_agent_modules,
)

BASELINE = "aps"
VARIANTS = ("aps", "aps+fire[json]", "aps+fire[json, no fsync]", "aps+fire[memory]")


async def _noop() -> None:
    return None


@dataclass
class OverheadResult:
    """Per-run seconds of each variant, one value per round."""

    runs: int
    rounds: int
    per_run: dict[str, list[float]] = field(default_factory=dict)

    def spread(self, variant: str) -> Spread:
        return Spread.of(self.per_run[variant])

    def ratio(self, variant: str, base: str = BASELINE) -> Spread:
        return Spread.of(v / b for v, b in zip(self.per_run[variant], self.per_run[base], strict=True))

    def diff(self, variant: str, base: str = BASELINE) -> Spread:
        return Spread.of(v - b for v, b in zip(self.per_run[variant], self.per_run[base], strict=True))


class _BackToBack:
    """Fires jobs one at a time on a running AsyncIOScheduler and times them."""

    def __init__(self) -> None:
        self.sched = AsyncIOScheduler(timezone=UTC)
        self._waiter: asyncio.Future[None] | None = None
        self.errors = 0

    def _on_event(self, event: JobExecutionEvent) -> None:
        if event.exception is not None:
            self.errors += 1
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def start(self) -> None:
        self.sched.add_listener(self._on_event, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
        self.sched.start()

    def stop(self) -> None:
        self.sched.shutdown(wait=False)

    async def time(self, job: Callable[[], Awaitable[Any]], runs: int) -> float:
        """Per-run seconds of ``runs`` fires of ``job``, each awaited before the next."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        for _ in range(runs):
            self._waiter = loop.create_future()
            self.sched.add_job(job, next_run_time=datetime.now(UTC), misfire_grace_time=None)
            await asyncio.wait_for(self._waiter, 30)
        return (time.perf_counter() - start) / runs


def _write_config(directory: Path) -> Path:
    write_agent_modules(directory)
    path = directory / "one.yaml"
    path.write_text(
        f"state_dir: {directory / 'state'}\n"
        "agent_paths: [agents]\n"
        "agents:\n"
        "  - name: bench-noop\n"
        f"    run: {NOOP_MODULE}:noop\n"
        "    schedule: every 1h\n"
    )
    return path


async def _overhead(runs: int, rounds: int) -> OverheadResult:
    result = OverheadResult(runs, rounds, {v: [] for v in VARIANTS})
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp, open(
        os.devnull, "wb"
    ) as devnull:
        config = load_config(_write_config(Path(tmp)))
        spec = config.agents["bench-noop"]
        configure_logging("info", stream=devnull)
        clock = SystemClock()

        async def make(store: StateStore) -> Callable[[], Awaitable[Any]]:
            await store.open()
            runner = Runner(store=store, metrics=Metrics(CollectorRegistry()), clock=clock)
            g = spec.guards
            slot = AgentSlot(spec, CircuitBreaker(g.circuit_failures, g.circuit_cooldown, clock))
            await runner.ensure_state(slot)

            async def fire() -> None:
                record = await runner.fire(slot, clock.now())
                if record is None or record.outcome.value != "success":
                    raise RuntimeError(f"bench run did not succeed: {record}")

            return fire

        jobs: dict[str, Callable[[], Awaitable[Any]]] = {
            "aps": _noop,
            "aps+fire[json]": await make(JsonFileStore(Path(tmp) / "state-json")),
            "aps+fire[json, no fsync]": await make(JsonFileStore(Path(tmp) / "state-nofsync")),
            "aps+fire[memory]": await make(MemoryStore()),
        }
        b2b = _BackToBack()
        b2b.start()
        real_fsync = os.fsync
        try:
            for variant, job in jobs.items():  # warm-up: imports, first file, caches
                await b2b.time(job, max(20, runs // 20))
            for _ in range(rounds):
                for variant, job in jobs.items():
                    if variant == "aps+fire[json, no fsync]":
                        os.fsync = lambda fd: None  # the bench's own switch, restored below
                    try:
                        result.per_run[variant].append(await b2b.time(job, runs))
                    finally:
                        os.fsync = real_fsync
        finally:
            os.fsync = real_fsync
            b2b.stop()
        if b2b.errors:
            raise RuntimeError(f"{b2b.errors} bench jobs raised")
    return result


def bench_overhead(*, runs: int = 2000, rounds: int = 5) -> OverheadResult:
    """Section 1: see the module docstring."""
    return asyncio.run(_overhead(runs, rounds))


# -- the cron model ------------------------------------------------------------------------------

_BARE = """\
async def noop():
    return None
c = noop()
try:
    c.send(None)
except StopIteration:
    pass
"""

_WITH_MODULE = """\
import sys
sys.path.insert(0, {agents!r})
import asyncio
from {module} import noop
asyncio.run(noop(None))
"""


@dataclass
class CronResult:
    """Seconds per spawned run, per flavour."""

    spawns: int
    per_run: dict[str, list[float]] = field(default_factory=dict)


def bench_cron(*, spawns: int = 20) -> CronResult:
    """Section 2: one fresh interpreter per run, timed from spawn to exit."""
    result = CronResult(spawns)
    with tempfile.TemporaryDirectory(prefix="bench-cron-") as tmp:
        agents = write_agent_modules(Path(tmp))
        config = _write_config(Path(tmp))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_SUPERVISOR_")}
        flavours = {
            "python -c, no imports": [PYTHON, "-c", _BARE],
            "python -c, agent module + asyncio.run": [
                PYTHON, "-c", _WITH_MODULE.format(agents=str(agents), module=NOOP_MODULE)
            ],
            "python -c, agent importing supervisor": [
                PYTHON, "-c", _WITH_MODULE.format(agents=str(agents), module=NOOP_SUPERVISOR_MODULE)
            ],
            "agent-supervisor run-once": [
                PYTHON, "-m", "supervisor", "run-once", "bench-noop", "--config", str(config)
            ],
        }  # fmt: skip
        result.per_run = {name: [] for name in flavours}
        for name, argv in flavours.items():  # warm-up: page cache, .pyc files
            subprocess.run(argv, cwd=REPO, env=env, check=True, timeout=60, capture_output=True)
        for _ in range(spawns):  # interleaved, like the in-process rounds
            for name, argv in flavours.items():
                start = time.perf_counter()
                subprocess.run(
                    argv, cwd=REPO, env=env, check=True, timeout=60, capture_output=True
                )
                result.per_run[name].append(time.perf_counter() - start)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--spawns", type=int, default=20)
    args = parser.parse_args()
    r = bench_overhead(runs=args.runs, rounds=args.rounds)
    for v in VARIANTS:
        print(
            f"{v:28} {r.spread(v).fmt(1, 1e6)} µs/run  x{r.ratio(v).fmt(2)}  "
            f"+{r.diff(v).fmt(1, 1e6)} µs"
        )
    c = bench_cron(spawns=args.spawns)
    sup = Spread.of(r.per_run["aps+fire[json]"]).median
    for name, times in c.per_run.items():
        s = Spread.of(times)
        print(f"{name:40} {s.fmt(1, 1e3)} ms/run  x{s.median / sup:.0f} the supervisor's run")


if __name__ == "__main__":
    main()
