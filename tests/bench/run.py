"""Run every benchmark and rewrite ``docs/performance.md`` with the results.

    .venv/bin/python -m tests.bench            # full
    .venv/bin/python -m tests.bench --quick    # smoke: fewer repeats and ticks

On the reference VM sections 1-6 take about 4 minutes (under a minute with ``--quick``);
section 7 (``bench_llm``) adds its own time on top.

Run from the repository root. Nothing here is a pytest test (no file is named ``test_*``).
Every measurement that can be is a ratio to a baseline taken in the same process or command,
with its median and spread, because the reference machine (2 vCPUs, shared) is noisy.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry

from supervisor.metrics import Metrics
from tests.bench import bench_burst, bench_daemon, bench_llm, bench_overhead
from tests.bench._common import REPO, machine_facts, package_versions
from tests.bench.bench_scrape import populate
from tests.bench.report import LAST_GENERATED, Results, render

DOC = REPO / "docs" / "performance.md"
PACKAGES = (
    "APScheduler", "anyio", "uvicorn", "starlette", "prometheus_client", "structlog",
    "orjson", "pydantic", "pydantic-settings",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Plan:
    """How much of each benchmark to run."""

    runs: int
    rounds: int
    io_records: int
    spawns: int
    idle_ticks: int
    scraped_ticks: int
    scrapes: int
    starts: int
    idle_s: float
    spread_check: bool
    default_limit_ticks: int
    burst: bool
    renders: int
    #: longest a variant's round of section 1 may take (fewer runs on a slow disk)
    round_budget_s: float = 1.5
    #: section 7: calls per variant, mode and round, and rounds
    llm_calls: int = 400
    llm_rounds: int = 5


FULL = Plan(
    runs=1000, rounds=7, io_records=500, spawns=15, idle_ticks=3, scraped_ticks=3, scrapes=30,
    starts=5, idle_s=3.0, spread_check=True, default_limit_ticks=2, burst=True, renders=30,
)  # fmt: skip
QUICK = Plan(
    runs=300, rounds=3, io_records=100, spawns=3, idle_ticks=2, scraped_ticks=2, scrapes=30,
    starts=3, idle_s=1.5, spread_check=False, default_limit_ticks=0, burst=False, renders=10,
    round_budget_s=0.4, llm_calls=150, llm_rounds=2,
)  # fmt: skip


def _render_only(agents: int, renders: int) -> tuple[list[float], int]:
    """``Metrics.render`` in process with every per-agent series populated (the worst case)."""
    metrics = Metrics(CollectorRegistry())
    populate(metrics, agents)
    metrics.render()
    times = []
    body = b""
    for _ in range(renders):
        start = time.perf_counter()
        body, _ = metrics.render()
        times.append(time.perf_counter() - start)
    return times, len(body)


def _tmp_mount() -> str:
    """Filesystem type and options of the mount holding the temp dir (state dirs live there)."""
    tmp = os.path.realpath(tempfile.gettempdir())
    best = ("?", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _dev, mnt, fstype, opts, *_ = line.split()
            if (tmp == mnt or tmp.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype, opts)
    except OSError:
        pass
    return f"{tmp} on {best[0]} ({best[1]}, {best[2]})"


def _step(name: str) -> float:
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    return time.monotonic()


def run(plan: Plan, mode: str) -> Results:
    started = time.monotonic()
    res = Results(
        mode=mode,
        command=f".venv/bin/python -m tests.bench{' --quick' if mode == 'quick' else ''}",
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine_facts(),
        packages=package_versions(PACKAGES),
        tmp_mount=_tmp_mount(),
    )
    t = _step("1. per-run overhead over APScheduler (in process)")
    res.overhead = bench_overhead.bench_overhead(
        runs=plan.runs, rounds=plan.rounds, round_budget_s=plan.round_budget_s
    )
    res.commit_io = bench_overhead.bench_commit_io(records=plan.io_records)
    if plan.burst:
        res.commit_burst = bench_overhead.bench_commit_burst(agents=1000, rounds=2)
    res.durations["1"] = time.monotonic() - t

    t = _step("2. the cron model (a process per run)")
    res.cron = bench_overhead.bench_cron(spawns=plan.spawns)
    res.durations["2"] = time.monotonic() - t

    if plan.spread_check:
        t = _step("3. tick alignment of a naive interval fleet (real daemon)")
        res.spread = bench_daemon.bench_interval_spread(agents=1000)
        res.durations["3-spread"] = time.monotonic() - t

    t = _step("3+4. schedule lag on a shared tick and scrape cost, 1,000 agents (real daemon)")
    res.ticks = bench_daemon.bench_tick_lag(
        agents=1000,
        idle_ticks=plan.idle_ticks,
        scraped_ticks=plan.scraped_ticks,
        scrapes=plan.scrapes,
        max_concurrent_runs=1000,
    )
    res.durations["3"] = time.monotonic() - t

    if plan.default_limit_ticks:
        t = _step("3. the same with the default max_concurrent_runs (16)")
        res.ticks_default = bench_daemon.bench_tick_lag(
            agents=1000,
            idle_ticks=plan.default_limit_ticks,
            scraped_ticks=0,
            scrapes=5,
            max_concurrent_runs=16,
        )
        res.durations["3-default"] = time.monotonic() - t

    if plan.burst:
        t = _step("3. where the lag goes, with and without gc.freeze (in process)")
        res.burst = bench_burst.bench_variants(agents=1000, ticks=1, every_s=4, passes=2)
        res.durations["3-burst"] = time.monotonic() - t

    t = _step("4. render only, every per-agent series populated (in process)")
    res.render_only = _render_only(1000, plan.renders)
    res.durations["4"] = time.monotonic() - t

    t = _step("5+6. start time and idle RSS, 100 agents (real daemon)")
    res.start = bench_daemon.bench_start(agents=100, starts=plan.starts, idle_s=plan.idle_s)
    res.durations["5"] = time.monotonic() - t

    t = _step("7. LLM calls: ctx.llm against raw httpx2 and the SDKs (fake server, loopback)")
    res.llm = bench_llm.bench_llm(calls=plan.llm_calls, rounds=plan.llm_rounds)
    res.durations["7"] = time.monotonic() - t

    res.total_s = time.monotonic() - started
    res.loadavg_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return res


def _hand_written(doc: Path) -> str:
    """The sections after the generated ones in ``doc`` (written by hand), to keep them."""
    try:
        old = doc.read_text()
    except FileNotFoundError:
        return ""
    last = old.find(f"\n{LAST_GENERATED}")
    after = old.find("\n## ", last + 1) if last >= 0 else -1
    return "\n" + old[after + 1 :] if after >= 0 else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and ticks (<1 min)")
    parser.add_argument(
        "--output", type=Path, default=DOC, help=f"where to write the report ({DOC})"
    )
    args = parser.parse_args(argv)
    if Path.cwd().resolve() != REPO:
        print(f"run from the repository root: cd {REPO}", file=sys.stderr)
        return 2
    res = run(QUICK if args.quick else FULL, "quick" if args.quick else "full")
    text = render(res)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    kept = _hand_written(args.output)
    args.output.write_text(text + kept)
    print(text.split("\n## 1.")[0])
    print(f"[bench] wrote {args.output} in {res.total_s:.0f} s", file=sys.stderr)
    return 0
