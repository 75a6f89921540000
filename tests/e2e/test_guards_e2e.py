"""The real daemon runs agents that misbehave on purpose; every guard ends them as documented.

Outcomes are read from both the log lines and the metrics endpoint.
"""

from __future__ import annotations

from datetime import datetime

import pytest

from tests.e2e.conftest import fleet_config

pytestmark = pytest.mark.e2e

FLEET = """
defaults:
  guards:
    timeout: 1s
    cleanup_grace: 0.5s
    max_steps: 25
    retry: {attempts: 3, base_delay: 0.05, max_delay: 0.1}
    circuit: {failures: 3, cooldown: 2s}
agents:
  - {name: hang, run: "fleet_agents:hang", schedule: every 1s, guards: {circuit: {failures: 0}}}
  - {name: spin, run: "fleet_agents:spin", schedule: every 1s, guards: {circuit: {failures: 0}}}
  - {name: flaky, run: "fleet_agents:flaky", schedule: every 1s}
  - {name: broken, run: "fleet_agents:broken", schedule: every 0.25s}
"""


def _ts(line: dict) -> datetime:
    return datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))


def test_misbehaving_fleet_outcomes(daemon_factory) -> None:
    """hang -> timeout within timeout+grace, spin -> max_steps at exactly 25, flaky -> success
    after 3 attempts, broken -> circuit opens after 3 failures, skips, then one trial."""
    d = daemon_factory(fleet_config(FLEET)).ready()

    hang = d.event("run.finished", timeout=15, agent="hang")[0]
    assert hang["outcome"] == "timeout"
    assert 1.0 <= hang["duration_s"] <= 1.5 + 0.25
    assert hang["partial"] == {"waited": True}

    spin = d.event("run.finished", agent="spin")[0]
    assert spin["outcome"] == "max_steps"
    assert spin["steps"] == 25
    assert spin["partial"] == {"spun": 25}

    flaky = d.event("run.finished", agent="flaky")[0]
    assert flaky["outcome"] == "success"
    assert flaky["attempts"] == 3
    assert (
        len(
            d.wait_for(
                lambda x: x.get("event") == "run.retry" and x.get("agent") == "flaky", count=2
            )
        )
        >= 2
    )

    # broken: 3 failures open the circuit; fires are skipped; after 2 s one trial runs.
    trial = d.event("run.finished", timeout=15, count=4, agent="broken")
    failures = [x for x in trial if x["outcome"] == "failure"]
    assert len(failures) == 4
    third, fourth = failures[2], failures[3]
    skipped = [
        x
        for x in d.lines
        if x.get("event") == "run.skipped"
        and x.get("agent") == "broken"
        and _ts(third) < _ts(x) < _ts(fourth)
    ]
    assert skipped and all(x["outcome"] == "skipped_circuit_open" for x in skipped)
    gap = (_ts(fourth) - _ts(third)).total_seconds()
    assert 1.95 <= gap <= 2.0 + 1.0, gap  # commit times jitter the log timestamps
    # The trial failed: the circuit is open again, so the next fires are skipped again.
    d.wait_for(
        lambda x: (
            x.get("event") == "run.skipped" and x.get("agent") == "broken" and _ts(x) > _ts(fourth)
        )
    )

    # The same outcomes, read from the metrics endpoint.
    runs = "agent_supervisor_runs_total"
    assert d.sample(runs, agent="hang", outcome="timeout") >= 1
    assert d.sample(runs, agent="spin", outcome="max_steps") >= 1
    assert d.sample(runs, agent="flaky", outcome="success") >= 1
    assert d.sample(runs, agent="broken", outcome="failure") >= 4
    assert d.sample(runs, agent="broken", outcome="skipped_circuit_open") >= 1
    assert d.sample("agent_supervisor_circuit_state", agent="broken") == 2
    assert d.sample("agent_supervisor_retries_total", agent="flaky") >= 2
    assert d.sample("agent_supervisor_last_success_timestamp_seconds", agent="flaky") > 0


def test_overlapping_fire_is_skipped_and_counted(daemon_factory) -> None:
    """A fire while the previous run still goes is skipped_overlap, in log and metrics."""
    d = daemon_factory(
        fleet_config(
            """
agents:
  - {name: slow, run: "fleet_agents:slow", schedule: every 0.3s, guards: {timeout: 1s}}
"""
        )
    ).ready()
    d.event("run.skipped", agent="slow", outcome="skipped_overlap")
    assert d.sample("agent_supervisor_runs_total", agent="slow", outcome="skipped_overlap") >= 1
