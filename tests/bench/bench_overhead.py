"""Per-run cost: the supervisor over bare APScheduler (in process) and over cron (a process a run).

    .venv/bin/python -m tests.bench.bench_overhead [--runs 2000] [--rounds 5] [--spawns 20]

In process, one asyncio loop, one running ``AsyncIOScheduler`` (APScheduler 3.11), jobs fired
back to back: add a job due now, wait for APScheduler's ``EVENT_JOB_EXECUTED``, repeat. The
variants differ only in what the job's coroutine does:

- ``aps``: nothing (the baseline);
- ``aps+fire[json]``: ``Runner.fire()`` of a no-op agent as the daemon runs it by default: the
  real ``JsonFileStore`` (record appended to the journal, one ``fdatasync`` in a worker thread,
  the state file written behind), a ``TraceStore`` (the run's trace queued for its writer
  thread), the default loop guards, real ``Metrics``, and the ``run.finished`` JSON line
  rendered to ``/dev/null``;
- ``aps+fire[json, no traces]``: the same without the ``TraceStore``;
- ``aps+fire[json, no flush]``: the same as ``json`` with ``os.fdatasync`` and ``os.fsync``
  replaced by no-ops for the round, to split the flush from the rest of the commit;
- ``aps+fire[memory]``: the ``MemoryStore`` (same encoding and checks, no file, no worker
  thread), no traces: the supervisor's own code;
- ``aps+fire[memory, no loop guards]``: the same with every loop and stall detector off.

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
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import anyio.to_thread
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from prometheus_client import CollectorRegistry

from supervisor.clock import SystemClock
from supervisor.config import load_config
from supervisor.guards.breaker import CircuitBreaker
from supervisor.guards.loops import LoopPolicy
from supervisor.logging import configure_logging
from supervisor.metrics import Metrics
from supervisor.runner import AgentSlot, Runner
from supervisor.state import JsonFileStore, MemoryStore, StateStore
from supervisor.state.base import AgentState
from supervisor.state.jsonfile import encode_state
from supervisor.traces import TraceStore
from tests.bench._common import (
    NOOP_MODULE,
    NOOP_SUPERVISOR_MODULE,
    PYTHON,
    REPO,
    Spread,
    daemon_env,
    write_agent_modules,
)

BASELINE = "aps"
VARIANTS = (
    "aps",
    "aps+fire[json]",
    "aps+fire[json, no traces]",
    "aps+fire[json, no flush]",
    "aps+fire[memory]",
    "aps+fire[memory, no loop guards]",
)
NO_FLUSH = "aps+fire[json, no flush]"


async def _noop() -> None:
    return None


@dataclass
class OverheadResult:
    """Per-run seconds of each variant, one value per round."""

    runs: int
    rounds: int
    per_run: dict[str, list[float]] = field(default_factory=dict)
    #: runs per round actually used, per variant (capped by the time budget of a round)
    runs_used: dict[str, int] = field(default_factory=dict)

    def spread(self, variant: str) -> Spread:
        return Spread.of(self.per_run[variant])

    def ratio(self, variant: str, base: str = BASELINE) -> Spread:
        return Spread.of(
            v / b for v, b in zip(self.per_run[variant], self.per_run[base], strict=True)
        )

    def diff(self, variant: str, base: str = BASELINE) -> Spread:
        return Spread.of(
            v - b for v, b in zip(self.per_run[variant], self.per_run[base], strict=True)
        )


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


async def _overhead(
    runs: int, rounds: int, round_budget_s: float, devnull: BinaryIO
) -> OverheadResult:
    result = OverheadResult(runs, rounds, {v: [] for v in VARIANTS})
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        config = load_config(_write_config(Path(tmp)))
        spec = config.agents["bench-noop"]
        configure_logging("info", stream=devnull)
        clock = SystemClock()

        async def make(
            store: StateStore, *, traces: bool = False, loops: bool = True
        ) -> Callable[[], Awaitable[Any]]:
            await store.open()
            trace_store = TraceStore(Path(tmp) / f"traces-{id(store)}") if traces else None
            runner = Runner(
                store=store, metrics=Metrics(CollectorRegistry()), clock=clock, traces=trace_store
            )
            g = spec.guards
            run_spec = (
                spec if loops else replace(spec, guards=replace(g, loops=LoopPolicy.disabled()))
            )
            slot = AgentSlot(
                run_spec, CircuitBreaker(g.circuit_failures, g.circuit_cooldown, clock)
            )
            await runner.ensure_state(slot)

            async def fire() -> None:
                record = await runner.fire(slot, clock.now())
                if record is None or record.outcome.value != "success":
                    raise RuntimeError(f"bench run did not succeed: {record}")

            async def settle() -> None:
                # Outside the timed rounds: finish this variant's background writes (files
                # behind the journal, traces) so that they do not run during the next one's.
                if isinstance(store, JsonFileStore):
                    await store.checkpoint()
                if trace_store is not None:
                    await trace_store.flush()

            settles.append(settle)
            return fire

        settles: list[Callable[[], Awaitable[None]]] = []
        jobs: dict[str, Callable[[], Awaitable[Any]]] = {
            "aps": _noop,
            "aps+fire[json]": await make(JsonFileStore(Path(tmp) / "state-json"), traces=True),
            "aps+fire[json, no traces]": await make(JsonFileStore(Path(tmp) / "state-nt")),
            NO_FLUSH: await make(JsonFileStore(Path(tmp) / "state-noflush"), traces=True),
            "aps+fire[memory]": await make(MemoryStore()),
            "aps+fire[memory, no loop guards]": await make(MemoryStore(), loops=False),
        }
        b2b = _BackToBack()
        b2b.start()
        real_fsync, real_fdatasync = os.fsync, os.fdatasync
        try:
            for variant, job in jobs.items():  # warm-up: imports, first file, caches
                warm = await b2b.time(job, max(20, runs // 20))
                # A slow disk must not stretch the command: cap a round's time, not its count.
                result.runs_used[variant] = max(50, min(runs, int(round_budget_s / warm)))
            for _ in range(rounds):
                for variant, job in jobs.items():
                    if variant == NO_FLUSH:
                        # The bench's own switch, restored below.
                        os.fsync = os.fdatasync = lambda fd: None
                    try:
                        n = result.runs_used[variant]
                        result.per_run[variant].append(await b2b.time(job, n))
                    finally:
                        os.fsync, os.fdatasync = real_fsync, real_fdatasync
                    for settle in settles:
                        await settle()
        finally:
            os.fsync, os.fdatasync = real_fsync, real_fdatasync
            b2b.stop()
        if b2b.errors:
            raise RuntimeError(f"{b2b.errors} bench jobs raised")
    return result


def bench_overhead(
    *, runs: int = 2000, rounds: int = 5, round_budget_s: float = 1.5
) -> OverheadResult:
    """Section 1: see the module docstring.

    Each variant runs up to ``runs`` fires per round, fewer when they would take longer than
    ``round_budget_s`` (estimated from the warm-up).
    """
    # The run.finished lines are rendered, then dropped.
    with open(os.devnull, "wb") as devnull:
        return asyncio.run(_overhead(runs, rounds, round_budget_s, devnull))


# -- commit protocols on this filesystem -------------------------------------------------------

COMMIT_PROTOCOLS = (
    "temp + fsync + rename + dir fsync (the state files' commit before the journal)",
    "temp + fsync + rename (no dir fsync)",
    "temp + rename (no fsync)",
    "append to a journal + fdatasync",
    "in-place slot pwrite + fdatasync",
)


def bench_commit_io(
    *, records: int = 500, size: int = 700, rounds: int = 3, round_budget_s: float = 0.5
) -> dict[str, list[float]]:
    """Seconds per durable write of a ``size``-byte record, by protocol, in a temp dir.

    Plain ``os`` calls in the calling thread: this measures the filesystem, not our code, to
    show what a commit protocol with one flush instead of two (plus a create and a rename)
    would cost here. Rounds interleave the protocols; each does up to ``records`` writes,
    fewer when they would take longer than ``round_budget_s``.
    """
    raw = b"x" * size
    out: dict[str, list[float]] = {name: [] for name in COMMIT_PROTOCOLS}
    with tempfile.TemporaryDirectory(prefix="bench-io-") as tmp:
        d = Path(tmp)
        target = d / "agent.json"
        target.write_bytes(raw)
        journal = os.open(d / "journal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        slots = os.open(d / "slots", os.O_RDWR | os.O_CREAT, 0o640)
        os.pwrite(slots, b"\0" * 8192, 0)
        os.fsync(slots)

        def replace(n: int, fsync_file: bool, fsync_dir: bool) -> None:
            temp = d / f".agent.json.{n}.tmp"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            os.write(fd, raw)
            if fsync_file:
                os.fsync(fd)
            os.close(fd)
            os.replace(temp, target)
            if fsync_dir:
                dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
                os.fsync(dfd)
                os.close(dfd)

        def append(n: int) -> None:
            os.write(journal, raw)
            os.fdatasync(journal)

        def slot(n: int) -> None:
            os.pwrite(slots, raw, (n % 2) * 4096)
            os.fdatasync(slots)

        ops: dict[str, Callable[[int], None]] = {
            COMMIT_PROTOCOLS[0]: lambda n: replace(n, True, True),
            COMMIT_PROTOCOLS[1]: lambda n: replace(n, True, False),
            COMMIT_PROTOCOLS[2]: lambda n: replace(n, False, False),
            COMMIT_PROTOCOLS[3]: append,
            COMMIT_PROTOCOLS[4]: slot,
        }
        try:
            count: dict[str, int] = {}
            for name, op in ops.items():  # warm-up, and a count that fits the time budget
                start = time.perf_counter()
                for n in range(20):
                    op(n)
                each = (time.perf_counter() - start) / 20
                count[name] = max(50, min(records, int(round_budget_s / each)))
            for _ in range(rounds):
                for name, op in ops.items():
                    start = time.perf_counter()
                    for n in range(count[name]):
                        op(n)
                    out[name].append((time.perf_counter() - start) / count[name])
        finally:
            os.close(journal)
            os.close(slots)
    return out


COMMIT_BURST = (
    "JsonFileStore.commit (journal, group commit), all agents at once",
    "the same, fdatasync a no-op",
    "per-file protocol (temp + fsync + rename + dir fsync), 40 threads",
)


def _per_file_commit(directory: Path, name: str, raw: bytes) -> None:
    """The state files' commit before the journal: temp, fsync, rename, directory fsync."""
    temp = directory / f".{name}.json.{os.urandom(8).hex()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, directory / f"{name}.json")
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def bench_commit_burst(*, agents: int = 1000, rounds: int = 2) -> dict[str, list[float]]:
    """Seconds for ``agents`` agents to commit at once (a shared tick), by protocol.

    The real ``JsonFileStore`` (every agent committed once before, as after the first tick),
    the same with ``fdatasync`` a no-op, and the per-file protocol the store used before the
    journal, one commit per worker thread (anyio's default limit of 40 threads).
    """
    out: dict[str, list[float]] = {name: [] for name in COMMIT_BURST}

    async def burst(
        commit: Callable[[AgentState], Awaitable[Any]], states: list[AgentState]
    ) -> float:
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for state in states:
                tg.start_soon(commit, state)
        return time.perf_counter() - start

    async def run_round(directory: Path) -> None:
        store = JsonFileStore(directory / "state")
        await store.open()
        states = [AgentState(agent=f"agent-{i:04d}", totals={"success": 1}) for i in range(agents)]
        await burst(store.commit, states)
        await store.checkpoint()  # the files exist, the journal is empty
        out[COMMIT_BURST[0]].append(await burst(store.commit, states))
        real = os.fdatasync
        os.fdatasync = lambda fd: None  # the bench's own switch, restored below
        try:
            out[COMMIT_BURST[1]].append(await burst(store.commit, states))
        finally:
            os.fdatasync = real
        await store.close()
        files = directory / "files"
        files.mkdir()
        raws = {s.agent: encode_state(s) for s in states}

        async def per_file(state: AgentState) -> None:
            await anyio.to_thread.run_sync(_per_file_commit, files, state.agent, raws[state.agent])

        await burst(per_file, states)  # creates the files
        out[COMMIT_BURST[2]].append(await burst(per_file, states))

    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="bench-burst-io-") as tmp:
            anyio.run(run_round, Path(tmp), backend="asyncio")
    return out


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
        env = daemon_env()
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
        for argv in flavours.values():  # warm-up: page cache, .pyc files
            subprocess.run(argv, cwd=REPO, env=env, check=True, timeout=60, capture_output=True)
        for _ in range(spawns):  # interleaved, like the in-process rounds
            for name, argv in flavours.items():
                start = time.perf_counter()
                subprocess.run(argv, cwd=REPO, env=env, check=True, timeout=60, capture_output=True)
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
    for name, times in bench_commit_io().items():
        print(f"{name:56} {Spread.of(times).fmt(1, 1e6)} µs")
    c = bench_cron(spawns=args.spawns)
    sup = Spread.of(r.per_run["aps+fire[json]"]).median
    for name, times in c.per_run.items():
        s = Spread.of(times)
        print(f"{name:40} {s.fmt(1, 1e3)} ms/run  x{s.median / sup:.0f} the supervisor's run")


if __name__ == "__main__":
    main()
