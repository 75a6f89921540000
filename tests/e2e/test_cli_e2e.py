"""Every control CLI command against the running daemon, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, fleet_config

pytestmark = pytest.mark.e2e


def cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args, "--config", str(config)],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )


FLEET = """
agents:
  - {name: steady, run: "fleet_agents:ok", schedule: every 60s}
  - {name: flaky, run: "fleet_agents:flaky", schedule: every 60s,
     guards: {retry: {attempts: 3, base_delay: 0.01, max_delay: 0.02}}}
"""


def test_every_command_against_the_running_daemon(daemon_factory, tmp_path) -> None:
    """status, trigger --wait, runs, trace, pause, resume, state, reload, approvals: each
    answers from the live daemon, in human form and with --json."""
    d = daemon_factory(fleet_config(FLEET)).ready()
    config = tmp_path / "config.yaml"

    status = cli(config, "status")
    assert status.returncode == 0, status.stderr
    assert "steady" in status.stdout and "flaky" in status.stdout and "CIRCUIT" in status.stdout

    trig = cli(config, "trigger", "flaky", "--wait")
    assert trig.returncode == 0, trig.stderr
    assert "flaky run" in trig.stdout and "success" in trig.stdout
    d.event("run.finished", agent="flaky", trigger="manual")

    runs = json.loads(cli(config, "runs", "flaky", "--json").stdout)
    assert runs[0]["outcome"] == "success" and runs[0]["attempts"] == 3
    human_runs = cli(config, "runs", "flaky")
    assert runs[0]["run_id"] in human_runs.stdout

    trace = json.loads(cli(config, "trace", runs[0]["run_id"], "--json").stdout)
    kinds = [e["kind"] for e in trace["events"]]
    assert kinds.count("attempt") == 3 and "retry" in kinds and "step" in kinds
    assert "attempt" in cli(config, "trace", runs[0]["run_id"]).stdout

    assert cli(config, "pause", "steady").returncode == 0
    state = json.loads(cli(config, "state", "steady", "--json").stdout)
    assert state["paused"] is True
    paused = json.loads(cli(config, "status", "--json").stdout)
    assert next(a for a in paused["agents"] if a["agent"] == "steady")["paused"] is True
    assert cli(config, "resume", "steady").returncode == 0
    assert json.loads(cli(config, "state", "steady", "--json").stdout)["paused"] is False

    reload = cli(config, "reload")
    assert reload.returncode == 0 and json.loads(reload.stdout) == {"reloaded": True}
    d.event("config.reloaded")

    approvals = cli(config, "approvals")
    assert approvals.returncode == 0 and "no approval requests pending" in approvals.stdout


def test_errors_are_clear_and_exit_non_zero(daemon_factory, tmp_path) -> None:
    """Unknown agent, unknown run, a rejected reload (with file:line), and the daemon down."""
    d = daemon_factory(fleet_config(FLEET)).ready()
    config = tmp_path / "config.yaml"

    unknown = cli(config, "runs", "nope")
    assert unknown.returncode == 1 and "unknown agent 'nope'" in unknown.stderr
    assert cli(config, "trace", "no-such-run").returncode == 1

    good = config.read_text()
    config.write_text(good.replace("every 60s", "'*/70 * * * *'", 1))
    bad = cli(config, "reload", "--socket", str(tmp_path / "state" / "control.sock"))
    assert bad.returncode == 1
    assert "config.yaml:" in bad.stderr and "invalid cron expression" in bad.stderr
    config.write_text(good)

    d.signal(__import__("signal").SIGTERM)
    assert d.wait(20) == 0
    down = cli(config, "status")
    assert down.returncode == 1 and "the daemon is not running" in down.stderr
