"""Where the schedule lag of a shared tick goes: the daemon's fire path in process, instrumented.

    .venv/bin/python -m tests.bench.bench_burst [--agents 1000] [--ticks 3]

The same pieces the daemon wires together (``supervisor.scheduler.Scheduler`` on APScheduler,
``Runner`` with the real ``JsonFileStore`` and a ``TraceStore``, real ``Metrics``, JSON log
lines rendered to ``/dev/null``), with ``on_fire`` doing what ``Daemon._on_fire`` does (start
a task running ``Runner.fire``) plus timestamps, and the daemon's garbage-collector settings
once the fleet is loaded (``gc.freeze()`` and a first threshold of 100,000). The first fire is a catch-up at start, as in ``bench_daemon`` (each
agent's last planned fire one interval before a tick T0 of the grid); ticks after it are
measured. For every run it records, in seconds after the planned fire:

- hand-off: when APScheduler handed the fire to ``on_fire`` (scheduler cost only);
- task start: when the run's task first ran (hand-off of *all* due jobs + task spawning + GC);
- lag: the runner's ``lag_s`` (run start, after the global concurrency slot);

and the time the cyclic garbage collector spent during each tick, by generation.

``--variants`` also runs the harness with Python's default collector settings, interleaved,
to show what the daemon's are worth.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.lowlevel
from prometheus_client import CollectorRegistry

from supervisor.clock import SystemClock
from supervisor.config import load_config
from supervisor.guards.breaker import CircuitBreaker
from supervisor.logging import configure_logging
from supervisor.metrics import Metrics
from supervisor.runner import AgentSlot, Runner
from supervisor.scheduler import Scheduler
from supervisor.state import JsonFileStore
from supervisor.traces import TraceStore
from tests.bench._common import Spread, quantile, write_fleet_config
from tests.bench.bench_daemon import _align_fleet, wait_for_tick


@dataclass
class BurstTick:
    handoff: list[float] = field(default_factory=list)
    task_start: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    #: seconds spent in gc per generation while the tick was being processed
    gc_s: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    gc_max_pause: float = 0.0


#: the variants of ``--variants``: (name, the daemon's collector settings once loaded)
VARIANTS = (
    ("as the daemon runs it", True),
    ("default collector settings", False),
)
#: what ``Daemon._start`` sets once the fleet is loaded (besides ``gc.freeze()``)
DAEMON_GC_THRESHOLD = (100_000, 10, 10)


@dataclass
class BurstResult:
    agents: int
    every_s: int
    variant: str = VARIANTS[0][0]
    ticks: list[BurstTick] = field(default_factory=list)

    def all(self, attr: str) -> list[float]:
        return [x for t in self.ticks for x in getattr(t, attr)]


class _GcClock:
    """Adds up the time the cyclic GC runs, per generation, into ``target`` when set."""

    def __init__(self) -> None:
        self.target: BurstTick | None = None
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self.target is not None:
            took = time.perf_counter() - self._t0
            self.target.gc_s[info["generation"]] += took
            self.target.gc_max_pause = max(self.target.gc_max_pause, took)


async def _burst(
    agents: int, ticks: int, every_s: int, variant: tuple[str, bool], devnull: BinaryIO
) -> BurstResult:
    name, freeze = variant
    result = BurstResult(agents, every_s, name)
    clock = SystemClock()
    gc_clock = _GcClock()
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp:
        state_dir = Path(tmp) / "state"
        config = load_config(
            write_fleet_config(
                Path(tmp), agents=agents, schedule=f"{{every: {every_s}s}}", state_dir=state_dir
            )
        )
        configure_logging("info", stream=devnull)
        # T0 must not be in the future when the agents are added, or there is no catch-up.
        t0 = wait_for_tick(every_s)
        _align_fleet(state_dir, agents, t0, every_s)
        store = JsonFileStore(state_dir)
        await store.open()
        runner = Runner(
            store=store,
            metrics=Metrics(CollectorRegistry()),
            clock=clock,
            max_concurrent=1000,
            traces=TraceStore(Path(tmp) / "traces"),
        )
        slots: dict[str, AgentSlot] = {}
        # tick 0 is the catch-up fire of T0 at start; measured ticks are 1..ticks
        per_tick = [BurstTick() for _ in range(ticks + 1)]
        planned_index = {t0 + timedelta(seconds=every_s * k): k for k in range(ticks + 1)}
        finished = [0] * (ticks + 1)
        all_done = anyio.Event()
        off_tick: list[datetime] = []
        last_tick = max(planned_index)

        async with anyio.create_task_group() as tg:

            async def fire(slot: AgentSlot, planned: datetime, tick: BurstTick, k: int) -> None:
                tick.task_start.append(time.time() - planned.timestamp())
                record = await runner.fire(slot, planned)
                if record is None:
                    raise RuntimeError(f"{slot.name} did not run")
                tick.lag.append(record.lag_s)
                tick.done.append(time.time() - planned.timestamp())
                finished[k] += 1
                if finished[k] == agents:
                    gc_clock.target = None
                    if k == ticks:
                        all_done.set()

            def on_fire(agent: str, planned: datetime) -> None:
                k = planned_index.get(planned)
                if k is None:
                    # Past the last measured tick (a slow tick let the next one come): ignored.
                    if planned < last_tick:
                        off_tick.append(planned)
                    return
                tick = per_tick[k]
                gc_clock.target = tick
                tick.handoff.append(time.time() - planned.timestamp())
                tg.start_soon(fire, slots[agent], planned, tick, k)

            scheduler = Scheduler(on_fire)
            for name, spec in config.agents.items():
                g = spec.guards
                slot = AgentSlot(
                    spec, CircuitBreaker(g.circuit_failures, g.circuit_cooldown, clock)
                )
                slots[name] = slot
                state = await runner.ensure_state(slot)
                assert state is not None
                scheduler.add(name, spec.config.schedule, last_planned=state.last_planned_fire)
            default_threshold = gc.get_threshold()
            if freeze:  # as Daemon._start does once the fleet is loaded
                gc.freeze()
                gc.set_threshold(*DAEMON_GC_THRESHOLD)
            gc.callbacks.append(gc_clock)
            try:
                with anyio.fail_after(every_s * (ticks + 1) + 60):
                    scheduler.start()
                    await all_done.wait()
            finally:
                gc.callbacks.remove(gc_clock)
                gc.unfreeze()
                gc.set_threshold(*default_threshold)
                scheduler.shutdown()
                tg.cancel_scope.cancel()
        await store.close()
        if off_tick:
            raise RuntimeError(f"{len(off_tick)} fires off the aligned ticks, e.g. {off_tick[0]}")
    result.ticks = per_tick[1:]
    return result


def bench_burst(
    *, agents: int = 1000, ticks: int = 3, every_s: int = 3, variant: str = "as is"
) -> BurstResult:
    """See the module docstring. Raises KeyError for an unknown variant."""
    spec = {v[0]: v for v in VARIANTS}[variant]
    # Log lines are rendered, then dropped.
    with open(os.devnull, "wb") as devnull:
        return anyio.run(_burst, agents, ticks, every_s, spec, devnull, backend="asyncio")


def bench_variants(
    *, agents: int = 1000, ticks: int = 1, every_s: int = 4, passes: int = 2
) -> list[list[BurstResult]]:
    """``passes`` rounds of every variant of ``VARIANTS`` in turn; one list per variant.

    One process throughout (``gc.freeze`` is undone after each run); rounds interleave the
    variants so that machine noise hits them alike.
    """
    out: list[list[BurstResult]] = [[] for _ in VARIANTS]
    for _ in range(passes):
        for i, v in enumerate(VARIANTS):
            out[i].append(bench_burst(agents=agents, ticks=ticks, every_s=every_s, variant=v[0]))
    return out


def merge(runs: list[BurstResult]) -> BurstResult:
    """The ticks of several runs of one variant as one result."""
    first = runs[0]
    return BurstResult(
        first.agents, first.every_s, first.variant, [t for r in runs for t in r.ticks]
    )


def summary(r: BurstResult) -> dict[str, float]:
    """Pooled p50/p99 of lag and task start, the last hand-off, and GC per tick."""
    lag, start = r.all("lag"), r.all("task_start")
    return {
        "lag_p50": quantile(lag, 0.5),
        "lag_p99": quantile(lag, 0.99),
        "start_p99": quantile(start, 0.99),
        "handoff_max": max(r.all("handoff")),
        "gc_tick": Spread.of(sum(t.gc_s) for t in r.ticks).median,
        "gc2_tick": Spread.of(t.gc_s[2] for t in r.ticks).median,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--ticks", type=int, default=3)
    parser.add_argument(
        "--variants", action="store_true", help="also run with the default collector settings"
    )
    args = parser.parse_args()
    if args.variants:
        for runs in bench_variants(agents=args.agents):
            r = merge(runs)
            m = summary(r)
            print(
                f"{r.variant:30} lag p50 {m['lag_p50'] * 1e3:4.0f} p99 {m['lag_p99'] * 1e3:4.0f} | "
                f"task start p99 {m['start_p99'] * 1e3:4.0f} | last hand-off "
                f"{m['handoff_max'] * 1e3:4.0f} | gc/tick {m['gc_tick'] * 1e3:3.0f} "
                f"(gen2 {m['gc2_tick'] * 1e3:3.0f}) ms"
            )
        return
    r = bench_burst(agents=args.agents, ticks=args.ticks)
    for k, t in enumerate(r.ticks, 1):
        cols = []
        for name in ("handoff", "task_start", "lag", "done"):
            v = getattr(t, name)
            cols.append(
                f"{name} p50 {quantile(v, 0.5) * 1e3:.0f} p99 {quantile(v, 0.99) * 1e3:.0f}"
            )
        gcs = "/".join(f"{x * 1e3:.0f}" for x in t.gc_s)
        print(f"tick {k}: " + " | ".join(cols) + f" ms | gc gen0/1/2 {gcs} ms")


if __name__ == "__main__":
    main()
