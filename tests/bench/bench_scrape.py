"""How long one scrape of ``Metrics.render`` takes, and how big it is, with a full fleet.

Every per-agent series is populated (the worst case for size): each agent has run with a few
outcomes, been retried, had both state ops fail, and has a circuit state and timestamps.

    .venv/bin/python tests/bench/bench_scrape.py [--agents 1000] [--renders 30]

The budget is 100 ms and 1 MiB per scrape at 1,000 agents.
"""

from __future__ import annotations

import argparse
import statistics
import time

from prometheus_client import CollectorRegistry

from supervisor.metrics import Metrics
from supervisor.outcome import Outcome

OUTCOMES = (Outcome.SUCCESS, Outcome.FAILURE, Outcome.TIMEOUT)


def populate(metrics: Metrics, agents: int) -> None:
    """Give ``agents`` agents every per-agent series the supervisor can expose."""
    now = time.time()
    for i in range(agents):
        agent = f"agent-{i:04d}"
        metrics.add_agent(agent)
        for n, outcome in enumerate(OUTCOMES):
            metrics.run_started(agent)
            metrics.observe_run(
                agent,
                outcome,
                duration_s=0.5 + i % 97 + n / 7,
                steps=1 + i % 40,
                attempts=2,
                lag_s=0.003,
                finished_ts=now + n / 3,
            )
            metrics.run_ended(agent)
        metrics.record_skip(agent, Outcome.SKIPPED_OVERLAP, 0.01)
        metrics.retry(agent)
        metrics.set_circuit(agent, i % 3)
        metrics.state_error(agent, "load")
        metrics.state_error(agent, "commit")
    metrics.set_agent_counts(configured=agents, enabled=agents, paused=0)


def main() -> None:
    """Populate, render ``--renders`` times, print median/p90 time and body size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--renders", type=int, default=30)
    args = parser.parse_args()

    metrics = Metrics(CollectorRegistry())
    populate(metrics, args.agents)
    metrics.render()  # warm-up: first-call imports and caches
    times = []
    body = b""
    for _ in range(args.renders):
        start = time.perf_counter()
        body, _ = metrics.render()
        times.append(time.perf_counter() - start)
    times.sort()
    lines = body.count(b"\n")
    p90 = times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
    print(
        f"{args.agents} agents, {args.renders} renders: "
        f"median {statistics.median(times) * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms, "
        f"size {len(body):,} bytes ({len(body) / 2**20:.2f} MiB), "
        f"{lines:,} lines"
    )


if __name__ == "__main__":
    main()
