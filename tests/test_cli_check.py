"""``agent-supervisor check``: validate a config like ``nginx -t``, for humans and scripts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from supervisor.cli import main

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
NEXT = r"next \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"

GOOD = """\
agent_paths: [FIXTURES]
agents:
  - name: report
    run: cfg_agents:report
    schedule: every 5m
    params: {channel: ops}
  - name: nightly
    run: cfg_agents:ctx_only
    enabled: false
    schedule:
      cron: "30 2 * * *"
      timezone: Europe/Berlin
"""

BAD = """\
agent_paths: [FIXTURES]
max_concurrent_runs: many
agents:
  - name: report
    run: cfg_agents:report
    schedule: "*/70 * * * *"
    params:
      api_key: sk-abc123
"""


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    """check reads the real environment: clear ours; undo load_config's sys.path edits."""
    for key in list(os.environ):
        if key.startswith("AGENT_SUPERVISOR_") or key == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(key)
    monkeypatch.setattr(sys, "path", [*sys.path])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text.replace("FIXTURES", os.path.relpath(FIXTURES, tmp_path)))
    return path


def test_good_config_exits_0_with_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A valid file exits 0 and lists every agent with its schedule and next fire."""
    path = write(tmp_path, GOOD)
    assert main(["check", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == f"{path}: config is valid: 2 agents (1 enabled)"
    assert re.fullmatch(rf"  report   every 5m\s+{NEXT}", lines[1]), lines[1]
    assert re.fullmatch(rf"  nightly  cron 30 2 \* \* \*\s+{NEXT}  \(disabled\)", lines[2]), lines[
        2
    ]
    assert len(lines) == 3


def test_bad_config_exits_1_listing_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid file exits 1 and prints each problem as file:line: path: message on stderr."""
    path = write(tmp_path, BAD)
    assert main(["check", "--config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 4, err
    assert lines[0].startswith(f"{path}:8: agents[0].params.api_key: looks like a secret")
    assert lines[1] == (
        f"{path}:2: max_concurrent_runs: Input should be a valid integer, "
        "unable to parse string as an integer"
    )
    assert lines[2].startswith(
        f"{path}:6: agents[0].schedule: invalid cron expression '*/70 * * * *'"
    )
    assert lines[3] == f"{path}: 3 problems; config test failed"


def test_one_problem_is_singular(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The closing line counts problems in the right grammatical number."""
    path = write(tmp_path, "logging: debug\n")
    assert main(["check", "--config", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{path}:1: logging: unknown key",
        f"{path}: 1 problem; config test failed",
    ]


def test_missing_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config file that does not exist is a problem, not a traceback."""
    path = tmp_path / "absent.yaml"
    assert main(["check", "--config", str(path)]) == 1
    assert capsys.readouterr().err.splitlines()[0] == (
        f"{path}: cannot read: No such file or directory"
    )


def test_json_lists_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json on a bad file prints one JSON object with every problem, fields separate."""
    path = write(tmp_path, BAD)
    assert main(["check", "--config", str(path), "--json"]) == 1
    out, err = capsys.readouterr()
    assert err == ""
    doc = orjson.loads(out)
    assert doc["ok"] is False
    where = [(p["file"], p["line"], p["path"]) for p in doc["problems"]]
    assert where == [
        (str(path), 8, "agents[0].params.api_key"),
        (str(path), 2, "max_concurrent_runs"),
        (str(path), 6, "agents[0].schedule"),
    ]
    assert doc["problems"][2]["message"].startswith("invalid cron expression '*/70 * * * *'")


def test_json_lists_agents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json on a good file prints ok and one row per agent."""
    path = write(tmp_path, GOOD)
    assert main(["check", "--config", str(path), "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["ok"] is True
    rows = [{k: v for k, v in row.items() if k != "next_fire"} for row in doc["agents"]]
    assert rows == [
        {"name": "report", "run": "cfg_agents:report", "schedule": "every 5m", "enabled": True},
        {
            "name": "nightly",
            "run": "cfg_agents:ctx_only",
            "schedule": "cron 30 2 * * *",
            "enabled": False,
        },
    ]
    assert all(re.fullmatch(NEXT[5:], row["next_fire"]) for row in doc["agents"])


def test_config_path_defaults_to_env_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --config, check reads $AGENT_SUPERVISOR_CONFIG."""
    path = write(tmp_path, GOOD)
    monkeypatch.setenv("AGENT_SUPERVISOR_CONFIG", str(path))
    assert main(["check"]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: config is valid")


def test_env_override_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """check validates the config as the daemon would see it, environment included."""
    path = write(tmp_path, GOOD)
    monkeypatch.setenv("AGENT_SUPERVISOR_METRICS__LISTEN", "nowhere")
    assert main(["check", "--config", str(path)]) == 1
    assert capsys.readouterr().err.splitlines()[0] == (
        f"{path}: metrics.listen: expected host:port, got 'nowhere' "
        "(from environment AGENT_SUPERVISOR_METRICS__LISTEN)"
    )


def test_python_m_supervisor_checks_the_example_config() -> None:
    """`python -m supervisor check` on config/example.yaml exits 0 in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_SUPERVISOR_")}
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor", "check", "--config", "config/example.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("config/example.yaml: config is valid: 6 agents (6 enabled)\n")
