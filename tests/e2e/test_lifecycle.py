"""Signals: SIGTERM drains and commits, SIGHUP applies a valid config and rejects a bad one."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.e2e.conftest import fleet_config

pytestmark = pytest.mark.e2e


def test_sigterm_cancels_long_run_commits_state_and_exits_zero(daemon_factory, tmp_path) -> None:
    """SIGTERM during a long run: outcome cancelled, state committed, exit 0 within the grace."""
    d = daemon_factory(
        fleet_config(
            """
agents:
  - {name: slow, run: "fleet_agents:slow", schedule: every 0.5s, guards: {timeout: 60s}}
""",
            shutdown_grace="1s",
        )
    ).ready()
    # Let the run make progress, then stop the daemon.
    deadline = time.monotonic() + 10
    state_file = tmp_path / "state" / "slow.json"
    while time.monotonic() < deadline and not d.sample("agent_supervisor_runs_in_flight"):
        time.sleep(0.05)
    time.sleep(0.5)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    code = d.wait(timeout=15)
    took = time.monotonic() - t0
    assert code == 0, d.stderr
    assert took < 1.0 + 3.0, took  # the grace, plus process teardown
    finished = d.runs("slow")
    assert finished[-1]["outcome"] == "cancelled"
    state = json.loads(state_file.read_text())
    assert state["last_run"]["outcome"] == "cancelled"
    assert state["data"]["progress"] >= 1
    assert state["last_run"]["partial"]["progress"] == state["data"]["progress"]
    assert any(x.get("event") == "daemon.cancelling_runs" for x in d.lines)


def test_sigterm_waits_for_short_runs_to_finish(daemon_factory) -> None:
    """Runs that end within the grace finish normally; nothing is cancelled."""
    d = daemon_factory(
        fleet_config(
            """
agents:
  - {name: ok, run: "fleet_agents:ok", schedule: every 0.2s}
""",
            shutdown_grace="5s",
        )
    ).ready()
    d.event("run.finished", agent="ok")
    d.signal(signal.SIGINT)
    assert d.wait(timeout=15) == 0
    assert all(x["outcome"] == "success" for x in d.runs("ok"))
    assert not any(x.get("event") == "daemon.cancelling_runs" for x in d.lines)


def test_sighup_adds_and_removes_agents_without_restart(daemon_factory, tmp_path) -> None:
    """A valid changed config is applied in place: same process, new agent runs, old one stops."""
    d = daemon_factory(
        fleet_config(
            """
agents:
  - {name: first, run: "fleet_agents:ok", schedule: every 0.2s}
"""
        )
    ).ready()
    d.event("run.finished", agent="first")
    pid = d.proc.pid
    (tmp_path / "config.yaml").write_text(
        fleet_config(
            """
agents:
  - {name: second, run: "fleet_agents:ok", schedule: every 0.2s}
"""
        )
    )
    d.signal(signal.SIGHUP)
    reloaded = d.event("config.reloaded")[0]
    assert reloaded["added"] == ["second"] and reloaded["removed"] == ["first"]
    d.event("run.finished", agent="second")
    n_first = len(d.runs("first"))
    d.event("run.finished", agent="second", count=4)
    assert len(d.runs("first")) <= n_first + 1  # at most one run that was already in flight
    assert d.proc.pid == pid and d.proc.poll() is None
    assert d.sample("agent_supervisor_config_reloads_total", result="success") == 1


def test_sighup_with_invalid_config_keeps_old_schedule(daemon_factory, tmp_path) -> None:
    """A bad file on reload: the old agents keep running and the error names file:line."""
    good = fleet_config(
        """
agents:
  - {name: steady, run: "fleet_agents:ok", schedule: every 0.2s}
"""
    )
    d = daemon_factory(good).ready()
    d.event("run.finished", agent="steady")
    bad = good.replace("every 0.2s", "'*/70 * * * *'")
    (tmp_path / "config.yaml").write_text(bad)
    line_no = bad.splitlines().index(next(line for line in bad.splitlines() if "*/70" in line)) + 1
    d.signal(signal.SIGHUP)
    failed = d.event("config.reload_failed")[0]
    assert f"config.yaml:{line_no}: agents[0].schedule" in failed["problem"]
    assert "*/70" in failed["problem"]
    before = len(d.runs("steady"))
    d.event("run.finished", agent="steady", count=before + 3)
    assert d.sample("agent_supervisor_config_reloads_total", result="failure") == 1
    assert d.sample("agent_supervisor_config_last_reload_success") == 0


def test_metrics_port_in_use_exits_1_with_a_json_line(daemon_factory) -> None:
    """A taken metrics port: one JSON error line naming the address, exit 1, no traceback."""
    import socket as socketlib

    taken = socketlib.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        d = daemon_factory(fleet_config("agents: []\n", metrics={"listen": f"127.0.0.1:{port}"}))
        assert d.wait(15) == 1
        failed = d.event("metrics.bind_failed")[0]
        assert failed["listen"] == f"127.0.0.1:{port}"
        assert b"Traceback" not in d.stderr
    finally:
        taken.close()
