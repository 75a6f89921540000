"""Measure the cost of one durable ``ctx.effect`` (not a test).

    python -m tests.effects.bench_effects [--effects 2000] [--dir /var/tmp]

Each effect is the full path: policy, ledger lookup, durable intent (append + fdatasync),
``fn`` (returns at once), durable result (append + fdatasync). Reported: microseconds per
effect, effects per second, and syncs per effect, for the JSON-lines ledger run
sequentially, 8 tasks on 8 agents, and 8 tasks on one agent (whose appends serialise), plus
the memory ledger (the service's own overhead) and the duplicate path (a done key).
Put ``--dir`` on the disk the daemon's state directory will use: fsync cost is the disk's.
Logging is the daemon's real JSON logging (one line per effect), written to /dev/null.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import anyio

from supervisor.clock import SystemClock
from supervisor.context import RunContext
from supervisor.effects import EffectLedger, EffectsService, JsonlLedger, MemoryLedger
from supervisor.guards.steps import StepCounter
from supervisor.logging import configure_logging


def _ctx(service: EffectsService, agent: str) -> RunContext:
    return RunContext(
        agent=agent,
        run_id="bench",
        state={},
        steps=StepCounter(None),
        clock=SystemClock(),
        log=None,
        services={"effects": service},
        config=SimpleNamespace(effects=None),
    )


async def _fn(ik: str) -> dict[str, str]:
    return {"id": ik[:8]}


async def _run(ledger: EffectLedger, effects: int, tasks: int, agents: int) -> float:
    """Seconds to perform ``effects`` effects split over ``tasks`` tasks and ``agents``."""
    await ledger.open()
    service = EffectsService(ledger, SystemClock())
    per_task = effects // tasks

    async def worker(t: int) -> None:
        ctx = _ctx(service, f"agent{t % agents}")
        for i in range(per_task):
            await ctx.effect("post", f"t{t}-k{i}", _fn)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for t in range(tasks):
            tg.start_soon(worker, t)
    took = time.perf_counter() - start
    await ledger.close()
    return took


async def _duplicates(effects: int) -> float:
    ledger = MemoryLedger()
    await ledger.open()
    service = EffectsService(ledger, SystemClock())
    ctx = _ctx(service, "agent0")
    await ctx.effect("post", "same", _fn)
    start = time.perf_counter()
    for _ in range(effects):
        await ctx.effect("post", "same", _fn)
    return time.perf_counter() - start


def _row(name: str, effects: int, took: float, syncs: int | None) -> str:
    per = took / effects * 1e6
    sync = f"{syncs / effects:.2f}" if syncs is not None else "-"
    return f"| {name} | {effects} | {per:,.0f} | {effects / took:,.0f} | {sync} |"


async def main(effects: int, base: Path | None) -> None:
    print("| ledger / concurrency | effects | µs per effect | effects/s | syncs per effect |")
    print("|---|---|---|---|---|")
    for name, tasks, agents in (
        ("jsonl, sequential", 1, 1),
        ("jsonl, 8 tasks on 8 agents", 8, 8),
        ("jsonl, 8 tasks on 1 agent", 8, 1),
    ):
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            ledger = JsonlLedger(Path(tmp) / "effects")
            took = await _run(ledger, effects, tasks, agents)
            print(_row(name, effects, took, ledger.fsyncs), flush=True)
    took = await _run(MemoryLedger(), effects, 1, 1)
    print(_row("memory (service overhead), sequential", effects, took, None))
    took = await _duplicates(effects)
    print(_row("duplicate of a done key (memory)", effects, took, 0))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--effects", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=None, help="where to put the ledger")
    args = parser.parse_args()
    with open(os.devnull, "wb") as devnull:
        configure_logging(stream=devnull)
        anyio.run(main, args.effects, args.dir)
