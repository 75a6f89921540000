"""Where the schedule lag of a shared tick goes: the daemon's fire path in process, instrumented.

    .venv/bin/python -m tests.bench.bench_burst [--agents 1000] [--ticks 3]

The same pieces the daemon wires together (``supervisor.scheduler.Scheduler`` on APScheduler,
``Runner`` with the real ``JsonFileStore``, real ``Metrics``, JSON log lines rendered to
``/dev/null``), with ``on_fire`` doing what ``Daemon._on_fire`` does (start a task running
``Runner.fire``) plus timestamps. The fleet is aligned on one tick as in ``bench_daemon``
(each agent's last planned fire set one interval before T0). For every run it records, in
seconds after the planned fire:

- hand-off: when APScheduler handed the fire to ``on_fire`` (scheduler cost only);
- task start: when the run's task first ran (hand-off of *all* due jobs + task spawning + GC);
- lag: the runner's ``lag_s`` (run start, after the global concurrency slot);

and the time the cyclic garbage collector spent during each tick, by generation.

``--what-if`` also runs the same harness with prototypes of the fixes proposed in
``docs/performance.md``, applied by the benchmark to its own instances (nothing in
``supervisor/`` changes): a checkpoint before each run's commit, ``gc.freeze()`` once the
fleet is loaded, one APScheduler job for the whole fleet fanning out in ``on_fire``, and all
three together.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

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
from tests.bench._common import Spread, quantile, write_fleet_config
from tests.bench.bench_daemon import _align_fleet


@dataclass
class BurstTick:
    handoff: list[float] = field(default_factory=list)
    task_start: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    #: seconds spent in gc per generation while the tick was being processed
    gc_s: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    gc_max_pause: float = 0.0


#: the variants of ``--what-if``: (name, yield before commit, gc.freeze, one job for the fleet)
VARIANTS = (
    ("as is", False, False, False),
    ("checkpoint before commit", True, False, False),
    ("gc.freeze() after load", False, True, False),
    ("one APScheduler job, fan-out", False, False, True),
    ("all three", True, True, True),
)
_FLEET_JOB = "__fleet__"


@dataclass
class BurstResult:
    agents: int
    every_s: int
    variant: str = "as is"
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


def _checkpoint_before_commit(runner: Runner) -> None:
    """Prototype: yield to the loop before a run's commit phase (instance patch, bench only)."""
    commit = runner._commit

    async def patched(*args: Any) -> Any:
        await anyio.lowlevel.checkpoint()
        return await commit(*args)

    runner._commit = patched  # type: ignore[method-assign,assignment]


async def _burst(
    agents: int, ticks: int, every_s: int, variant: tuple[str, bool, bool, bool], devnull: BinaryIO
) -> BurstResult:
    name, checkpoint, freeze, fan_out = variant
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
        t0 = datetime.now(UTC).replace(microsecond=0)
        _align_fleet(state_dir, agents, t0, every_s)
        store = JsonFileStore(state_dir)
        await store.open()
        runner = Runner(
            store=store, metrics=Metrics(CollectorRegistry()), clock=clock, max_concurrent=1000
        )
        if checkpoint:
            _checkpoint_before_commit(runner)
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
                for each in slots if agent == _FLEET_JOB else (agent,):
                    tick.handoff.append(time.time() - planned.timestamp())
                    tg.start_soon(fire, slots[each], planned, tick, k)

            scheduler = Scheduler(on_fire)
            for name, spec in config.agents.items():
                g = spec.guards
                slot = AgentSlot(
                    spec, CircuitBreaker(g.circuit_failures, g.circuit_cooldown, clock)
                )
                slots[name] = slot
                state = await runner.ensure_state(slot)
                assert state is not None
                if not fan_out:
                    scheduler.add(name, spec.config.schedule, last_planned=state.last_planned_fire)
            if fan_out:
                last = t0 - timedelta(seconds=every_s)
                scheduler.add(_FLEET_JOB, spec.config.schedule, last_planned=last)
            if freeze:
                gc.collect()
                gc.freeze()
            gc.callbacks.append(gc_clock)
            try:
                with anyio.fail_after(every_s * (ticks + 1) + 60):
                    scheduler.start()
                    await all_done.wait()
            finally:
                gc.callbacks.remove(gc_clock)
                gc.unfreeze()
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


def bench_what_if(
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
    parser.add_argument("--what-if", action="store_true", help="also run the fix prototypes")
    args = parser.parse_args()
    if args.what_if:
        for runs in bench_what_if(agents=args.agents):
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
