"""load_config: broken files are rejected with file:line and key path; good ones load frozen."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest

from supervisor.config import AgentSpec, LoadedConfig, load_config
from supervisor.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(autouse=True)
def _isolated_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_config puts agent_paths on sys.path; give each test its own copy."""
    monkeypatch.setattr(sys, "path", [*sys.path])


def write(directory: Path, text: str, name: str = "config.yaml") -> Path:
    """Write a config file; ``FIXTURES`` in the text becomes the relative path to the agents."""
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(FIXTURES, path.parent)
    path.write_text(textwrap.dedent(text).replace("FIXTURES", rel))
    return path


def problems_of(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    """The problems load_config reports for ``path``, as the operator reads them."""
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={} if environ is None else environ)
    return [str(p) for p in info.value.problems]


def case(
    id: str,
    text: str,
    line: int,
    path: str,
    phrase: str,
    *,
    env: dict[str, str] | None = None,
    count: int = 1,
) -> Any:
    return pytest.param(text, line, path, phrase, env or {}, count, id=id)


# Each row: the file, then the line, key path and a phrase of the one problem it must yield.
# Rows that import an agent list FIXTURES in agent_paths, as a deployment would.
BROKEN = [
    # -- YAML itself ------------------------------------------------------------------------
    case(
        "yaml-syntax-unclosed-flow-sequence",
        """\
        state_dir: /srv/state
        agents: [
          - name: a
        """,
        3, "", "invalid YAML",
    ),
    case(
        "yaml-tab-indent",
        "state_dir: /srv/state\nmetrics:\n\tlisten: 127.0.0.1:9464\n",
        3, "", "invalid YAML",
    ),
    case(
        "yaml-bad-indent",
        """\
        metrics:
            enabled: true
          listen: 127.0.0.1:9464
        """,
        3, "", "invalid YAML",
    ),
    case(
        "yaml-merge-key",
        """\
        base: &base
          timeout: 1m
        defaults:
          guards:
            <<: *base
        """,
        5, "", "merge keys (<<) are not supported",
    ),
    case(
        "yaml-recursive-alias",
        """\
        state_dir: /srv/state
        agent_paths: &loop [*loop]
        """,
        2, "", "recursive aliases are not supported",
    ),
    case(
        "yaml-two-documents",
        """\
        state_dir: /srv/state
        ---
        log_level: info
        """,
        2, "", "invalid YAML",
    ),
    case(
        "duplicate-yaml-key",
        """\
        state_dir: /srv/state
        log_level: info
        state_dir: /srv/other
        """,
        3, "state_dir", "duplicate key",
    ),
    case(
        "duplicate-yaml-key-in-agent",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:plain
            schedule: every 1m
            schedule: every 2m
        """,
        6, "agents[0].schedule", "duplicate key",
    ),
    case("top-level-list", "- state_dir: /srv\n- log_level: info\n", 1, "", "the top level must be a mapping"),
    case("top-level-scalar", "# a comment\nhello\n", 2, "", "the top level must be a mapping"),
    # -- unknown keys and wrong types -------------------------------------------------------
    case(
        "unknown-top-level-key",
        """\
        state_dir: /srv/state
        logging: debug
        """,
        2, "logging", "unknown key",
    ),
    case(
        "unknown-agent-key",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:plain
            schedule: every 1m
            retries: 3
        """,
        6, "agents[0].retries", "unknown key",
    ),
    case(
        "unknown-guards-key",
        """\
        defaults:
          guards:
            timeout: 1m
            max_tokens: 5000
        """,
        4, "defaults.guards.max_tokens", "unknown key",
    ),
    case(
        "unknown-retry-key",
        """\
        defaults:
          guards:
            retry:
              attempts: 3
              backoff: exponential
        """,
        5, "defaults.guards.retry.backoff", "unknown key",
    ),
    case("max-concurrent-runs-wrong-type", "max_concurrent_runs: many\n", 1, "max_concurrent_runs", "valid integer"),
    case("max-concurrent-runs-zero", "max_concurrent_runs: 0\n", 1, "max_concurrent_runs", "greater than or equal to 1"),
    case("log-level-unknown", "log_level: verbose\n", 1, "log_level", "'debug', 'info', 'warning' or 'error'"),
    case("agents-not-a-list", "agents:\n  name: a\n", 1, "agents", "valid list"),
    case("misfire-grace-bad-duration", "misfire_grace: soon\n", 1, "misfire_grace", "invalid duration 'soon'"),
    case("shutdown-grace-boolean", "shutdown_grace: yes\n", 1, "shutdown_grace", "not a boolean"),
    # -- schedules --------------------------------------------------------------------------
    case(
        "cron-step-too-high",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:plain
            schedule: every 1m
          - name: b
            run: cfg_agents:plain
            schedule: every 1m
          - name: c
            run: cfg_agents:plain
            schedule: "*/70 * * * *"
        """,
        11, "agents[2].schedule", "invalid cron expression '*/70 * * * *'",
    ),
    case(
        "cron-wrong-field-count",
        """\
        agents:
          - name: a
            run: cfg_agents:plain
            schedule:
              cron: "* * * *"
        """,
        4, "agents[0].schedule", "Wrong number of fields; got 4, expected 5",
    ),
    case(
        "cron-bad-month-name",
        """\
        agents:
          - name: a
            run: cfg_agents:plain
            schedule:
              cron: "0 0 1 foo *"
        """,
        4, "agents[0].schedule", 'Invalid month name "foo"',
    ),
    case(
        "cron-never-fires",
        """\
        agents:
          - name: a
            run: cfg_agents:plain
            schedule: "0 0 31 2 *"
        """,
        4, "agents[0].schedule", "cron expression '0 0 31 2 *' never fires",
    ),
    case(
        "cron-weekday-step",
        """\
        agents:
          - name: a
            run: cfg_agents:plain
            schedule: "0 9 * * */2"
        """,
        4, "agents[0].schedule", "day-of-week step '*/2' is ambiguous",
    ),
    case(
        "schedule-both-cron-and-every",
        """\
        agents:
          - name: a
            run: cfg_agents:plain
            schedule:
              cron: "* * * * *"
              every: 1m
        """,
        4, "agents[0].schedule", "give exactly one of 'cron' or 'every'",
    ),
    case(
        "schedule-neither-cron-nor-every",
        """\
        agents:
          - name: a
            run: cfg_agents:plain
            schedule:
              timezone: UTC
        """,
        4, "agents[0].schedule", "give exactly one of 'cron' or 'every'",
    ),
    case(
        "schedule-missing",
        """\
        agents:
          - name: a
            run: cfg_agents:plain
        """,
        2, "agents[0].schedule", "required key is missing",
    ),
    case(
        "interval-bad-duration-string",
        """\
        agents:
          - name: a
            run: cfg_agents:plain
            schedule: every 5 minutes
        """,
        4, "agents[0].schedule.every", "invalid duration '5 minutes'",
    ),
    case(
        "interval-zero",
        """\
        agents:
          - name: a
            run: cfg_agents:plain
            schedule:
              every: 0s
        """,
        5, "agents[0].schedule.every", "greater than 0",
    ),
    case(
        "interval-negative",
        """\
        agents:
          - name: a
            run: cfg_agents:plain
            schedule:
              every: -5m
        """,
        5, "agents[0].schedule.every", "greater than 0",
    ),
    case(
        "jitter-negative",
        """\
        agents:
          - name: a
            run: cfg_agents:plain
            schedule:
              every: 1m
              jitter: -1s
        """,
        6, "agents[0].schedule.jitter", "greater than or equal to 0",
    ),
    case(
        "schedule-unknown-timezone",
        """\
        agents:
          - name: a
            run: cfg_agents:plain
            schedule:
              cron: "0 9 * * *"
              timezone: Mars/Olympus_Mons
        """,
        4, "agents[0].schedule", "unknown timezone 'Mars/Olympus_Mons'",
    ),
    case(
        "global-unknown-timezone",
        """\
        state_dir: /srv/state
        timezone: Europe/Atlantis
        """,
        2, "timezone", "unknown timezone 'Europe/Atlantis'",
    ),
    # -- agent names and imports ------------------------------------------------------------
    case(
        "agent-name-with-slash",
        """\
        agents:
          - name: ops/report
            run: cfg_agents:plain
            schedule: every 1m
        """,
        2, "agents[0].name", "should match pattern",
    ),
    case(
        "duplicate-agent-names",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: report
            run: cfg_agents:plain
            schedule: every 1m
          - name: report
            run: cfg_agents:ctx_only
            schedule: every 2m
        """,
        6, "agents[1].name", "duplicate agent name 'report'",
    ),
    case(
        "run-bad-reference-format",
        """\
        agents:
          - name: a
            run: cfg_agents.plain
            schedule: every 1m
        """,
        3, "agents[0].run", "should match pattern",
    ),
    case(
        "run-unknown-module",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_no_such_module:plain
            schedule: every 1m
        """,
        4, "agents[0].run", "cannot import agent module 'cfg_no_such_module'",
    ),
    case(
        "run-missing-attribute",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:no_such_agent
            schedule: every 1m
        """,
        4, "agents[0].run", "module 'cfg_agents' has no attribute 'no_such_agent'",
    ),
    case(
        "run-sync-function",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:sync_agent
            schedule: every 1m
        """,
        4, "agents[0].run", "must be an 'async def' function",
    ),
    case(
        "run-not-a-function",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:NOT_A_FUNCTION
            schedule: every 1m
        """,
        4, "agents[0].run", "must be an 'async def' function",
    ),
    case(
        "run-three-params",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:three_args
            schedule: every 1m
        """,
        4, "agents[0].run", "must take (ctx) or (ctx, params), not 3 parameters",
    ),
    case(
        "run-module-raises-at-import",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_broken_import:agent
            schedule: every 1m
        """,
        4, "agents[0].run", "importing agent module 'cfg_broken_import' failed: RuntimeError: boom at import",
    ),
    # -- params against the agent's model ---------------------------------------------------
    case(
        "params-wrong-type",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:report
            schedule: every 1m
            params:
              channel: ops
              limit: lots
        """,
        8, "agents[0].params.limit", "valid integer",
    ),
    case(
        "params-missing-required",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:report
            schedule: every 1m
            params:
              limit: 3
        """,
        6, "agents[0].params.channel", "required key is missing",
    ),
    case(
        "params-missing-required-no-params-key",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:report
            schedule: every 1m
        """,
        3, "agents[0].params.channel", "required key is missing",
    ),
    case(
        "params-extra-key-model-forbids",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:report
            schedule: every 1m
            params:
              channel: ops
              colour: red
        """,
        8, "agents[0].params.colour", "unknown key",
    ),
    case(
        "params-for-agent-taking-only-ctx",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:ctx_only
            schedule: every 1m
            params:
              channel: ops
        """,
        6, "agents[0].params", "cfg_agents:ctx_only takes no params",
    ),
    # -- guards -----------------------------------------------------------------------------
    case(
        "timeout-negative",
        """\
        defaults:
          guards:
            timeout: -1s
        """,
        3, "defaults.guards.timeout", "greater than 0",
    ),
    case(
        "max-steps-zero",
        """\
        agents:
          - name: a
            run: cfg_agents:plain
            schedule: every 1m
            guards:
              max_steps: 0
        """,
        6, "agents[0].guards.max_steps", "greater than or equal to 1",
    ),
    case(
        "retry-attempts-zero",
        """\
        defaults:
          guards:
            retry:
              attempts: 0
        """,
        4, "defaults.guards.retry.attempts", "greater than or equal to 1",
    ),
    case(
        "retry-base-delay-over-max-delay",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:plain
            schedule: every 1m
            guards:
              retry:
                base_delay: 2m
                max_delay: 1m
        """,
        7, "agents[0].guards.retry", "base_delay is larger than max_delay",
    ),
    case(
        "retry-base-delay-over-builtin-max-delay-in-defaults",
        """\
        agent_paths: [FIXTURES]
        defaults:
          guards:
            retry:
              base_delay: 2m
        agents:
          - name: a
            run: cfg_agents:plain
            schedule: every 1m
          - name: b
            run: cfg_agents:plain
            schedule: every 1m
        """,
        4, "defaults.guards.retry", "base_delay is larger than max_delay",
    ),
    case(
        "retry-unknown-transient-class",
        """\
        defaults:
          guards:
            retry:
              transient:
                - TimeoutError
                - nowhere.FlakyError
        """,
        4, "defaults.guards.retry.transient", "cannot import exception class 'nowhere.FlakyError'",
    ),
    case(
        "retry-transient-not-an-exception",
        """\
        defaults:
          guards:
            retry:
              transient: [os.path]
        """,
        4, "defaults.guards.retry.transient", "'os.path' is not an exception class",
    ),
    # -- secrets never in YAML --------------------------------------------------------------
    case(
        "secrets-block",
        """\
        state_dir: /srv/state
        secrets:
          openai: sk-abc123
        """,
        2, "secrets", "secrets are never read from YAML",
    ),
    case(
        "api-key-literal-in-params",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:plain
            schedule: every 1m
            params:
              api_key: sk-abc123
        """,
        7, "agents[0].params.api_key", "looks like a secret",
    ),
    case(
        "password-literal-nested-in-list",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:plain
            schedule: every 1m
            params:
              hosts:
                - url: https://example.test
                  password: hunter2
        """,
        9, "agents[0].params.hosts[0].password", "looks like a secret",
    ),
    case(
        # Also an unknown key, but the secret is reported in its own words.
        "api-key-literal-at-top-level",
        """\
        state_dir: /srv/state
        openai_api_key: sk-abc123
        """,
        2, "openai_api_key", "looks like a secret",
        count=2,
    ),
    # -- metrics and the environment --------------------------------------------------------
    case(
        "metrics-listen-without-port",
        """\
        metrics:
          listen: localhost
        """,
        2, "metrics.listen", "expected host:port, got 'localhost'",
    ),
    case(
        "metrics-listen-port-out-of-range",
        """\
        metrics:
          listen: 127.0.0.1:70000
        """,
        2, "metrics.listen", "expected host:port, got '127.0.0.1:70000'",
    ),
    case(
        "env-override-invalid-value",
        """\
        state_dir: /srv/state
        max_concurrent_runs: 4
        """,
        2, "max_concurrent_runs", "(from environment AGENT_SUPERVISOR_MAX_CONCURRENT_RUNS)",
        env={"AGENT_SUPERVISOR_MAX_CONCURRENT_RUNS": "0"},
    ),
    case(
        "env-override-nested-invalid-value",
        """\
        metrics:
          listen: 127.0.0.1:9464
        """,
        2, "metrics.listen", "expected host:port, got 'nowhere' (from environment AGENT_SUPERVISOR_METRICS__LISTEN)",
        env={"AGENT_SUPERVISOR_METRICS__LISTEN": "nowhere"},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("text", "line", "path", "phrase", "env", "count"), BROKEN)
def test_broken_config_is_rejected_with_file_line_and_path(
    tmp_path: Path,
    text: str,
    line: int,
    path: str,
    phrase: str,
    env: dict[str, str],
    count: int,
) -> None:
    """Each broken file yields its problem at the exact file:line and key path."""
    config = write(tmp_path, text)
    problems = problems_of(config, env)
    where = f"{config}:{line}: {path}: " if path else f"{config}:{line}: "
    assert [p for p in problems if p.startswith(where) and phrase in p], problems
    assert len(problems) == count, problems


def test_broken_table_is_large_enough() -> None:
    """The table covers at least 25 distinct broken configs."""
    assert len(BROKEN) >= 25
    assert len({p.id for p in BROKEN}) == len(BROKEN)


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    """Three independent mistakes in one file yield three problems, in file order."""
    config = write(
        tmp_path,
        """\
        state_dir: /srv/state
        max_concurrent_runs: many
        metrics:
          listen: localhost
        agents:
          - name: a
            run: cfg_agents:plain
            schedule: "*/70 * * * *"
        """,
    )
    problems = problems_of(config)
    assert [p.split(": ")[0:2] for p in problems] == [
        [f"{config}:2", "max_concurrent_runs"],
        [f"{config}:4", "metrics.listen"],
        [f"{config}:8", "agents[0].schedule"],
    ]


def test_problems_from_every_stage_are_reported_together(tmp_path: Path) -> None:
    """A duplicate key, a secret literal and an unknown key are found in one pass."""
    config = write(
        tmp_path,
        """\
        state_dir: /srv/state
        state_dir: /srv/other
        defaults:
          guards:
            bogus: 1
        agents:
          - name: a
            run: cfg_agents:plain
            schedule: every 1m
            params:
              token: abc
        """,
    )
    problems = problems_of(config)
    assert len(problems) == 3, problems
    assert problems[0] == f"{config}:2: state_dir: duplicate key"
    assert problems[1].startswith(f"{config}:11: agents[0].params.token: looks like a secret")
    assert problems[2] == f"{config}:5: defaults.guards.bogus: unknown key"


def test_every_broken_agent_is_reported(tmp_path: Path) -> None:
    """Import problems of several agents are all listed, not just the first."""
    config = write(
        tmp_path,
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:sync_agent
            schedule: every 1m
          - name: b
            run: cfg_agents:missing
            schedule: every 1m
          - name: a
            run: cfg_agents:plain
            schedule: every 1m
        """,
    )
    problems = problems_of(config)
    assert [p.split(": ")[0:2] for p in problems] == [
        [f"{config}:4", "agents[0].run"],
        [f"{config}:7", "agents[1].run"],
        [f"{config}:9", "agents[2].name"],
    ]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param(
            {"AGENT_SUPERVISOR_MAX_CONCURRENT_RUNS": "lots"},
            "max_concurrent_runs: Input should be a valid integer, unable to parse string as an "
            "integer (from environment AGENT_SUPERVISOR_MAX_CONCURRENT_RUNS)",
            id="scalar",
        ),
        pytest.param(
            {"AGENT_SUPERVISOR_DEFAULTS__GUARDS__TIMEOUT": "-1"},
            "defaults.guards.timeout: Input should be greater than 0 "
            "(from environment AGENT_SUPERVISOR_DEFAULTS__GUARDS__TIMEOUT)",
            id="nested",
        ),
        pytest.param(
            {"AGENT_SUPERVISOR_AGENT_PATHS": "/opt/agents"},
            "agent_paths: AGENT_SUPERVISOR_AGENT_PATHS is not valid JSON (Expecting value: line 1 "
            "column 1 (char 0)); give lists and mappings as JSON",
            id="list-not-json",
        ),
        pytest.param(
            {"AGENT_SUPERVISOR_DEFAULTS__GUARDS": "{timeout: 1}"},
            "defaults: AGENT_SUPERVISOR_DEFAULTS__GUARDS is not valid JSON (Expecting property name "
            "enclosed in double quotes: line 1 column 2 (char 1)); give lists and mappings as JSON",
            id="nested-mapping-not-json",
        ),
        pytest.param(
            {"AGENT_SUPERVISOR_AGENTS__0__ENABLED": "false"},
            "agents: Input should be a valid list (from environment AGENT_SUPERVISOR_AGENTS__0__ENABLED)",
            id="list-items-cannot-be-addressed",
        ),
    ],
)
def test_invalid_env_value_names_the_variable(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    """A bad env value for a key absent from the file names the variable and no line."""
    config = write(tmp_path, "state_dir: /srv/state\n")
    assert problems_of(config, env) == [f"{config}: {expected}"]


def test_yaml_mistake_is_not_blamed_on_an_unrelated_env_variable(tmp_path: Path) -> None:
    """A bad value from the file is reported as the file's, even if a sibling key is in env."""
    config = write(tmp_path, "metrics:\n  listen: localhost\n")
    problems = problems_of(config, {"AGENT_SUPERVISOR_METRICS__ENABLED": "false"})
    assert problems == [f"{config}:2: metrics.listen: expected host:port, got 'localhost'"]


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        pytest.param(None, "cannot read: No such file or directory", id="missing-file"),
        pytest.param(b"state_dir: \xff\n", "not UTF-8", id="not-utf-8"),
    ],
)
def test_unreadable_file_is_one_problem_without_a_line(
    tmp_path: Path, content: bytes | None, phrase: str
) -> None:
    """A file that cannot be read or decoded is reported by name, with no line number."""
    config = tmp_path / "config.yaml"
    if content is not None:
        config.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(config, environ={})
    (problem,) = info.value.problems
    assert problem.line is None
    assert str(problem).startswith(f"{config}: {phrase}")


# -- configs that load ----------------------------------------------------------------------


def test_example_config_loads() -> None:
    """config/example.yaml is valid and its agents are imported with typed params."""
    config = load_config(REPO / "config" / "example.yaml", environ={})
    assert list(config.agents) == [
        "heartbeat",
        "heartbeat-cron",
        "monitor",
        "analyst",
        "publisher",
        "digest",
    ]
    beat = config.agent("heartbeat")
    assert beat.fn is not None and beat.fn.__name__ == "heartbeat"
    assert beat.params.report_every == 6
    assert beat.guards.timeout == 10.0
    assert beat.config.schedule.every == 10.0
    cron = config.agent("heartbeat-cron").config.schedule
    assert (cron.cron, cron.timezone) == ("* * * * *", "Europe/Berlin")
    assert config.settings.misfire_grace == 300.0


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    """An empty file is a valid config with every default and no agents."""
    config = load_config(write(tmp_path, ""), environ={})
    assert config.agents == {}
    keys = {"state_dir", "log_level", "timezone", "max_concurrent_runs", "misfire_grace"}
    keys |= {"shutdown_grace", "keep_errors", "agent_paths", "metrics", "agents", "secrets"}
    assert config.settings.model_dump(include=keys) == {
        "state_dir": Path("/var/lib/agent-supervisor"),
        "log_level": "info",
        "timezone": "UTC",
        "max_concurrent_runs": 16,
        "misfire_grace": 300.0,
        "shutdown_grace": 30.0,
        "keep_errors": 20,
        "agent_paths": [],
        "metrics": {"enabled": True, "listen": "127.0.0.1:9464"},
        "agents": [],
        "secrets": {},
    }


INHERIT = """\
agent_paths: [FIXTURES]
defaults:
  guards:
    timeout: 2m
    retry:
      attempts: 5
    circuit:
      cooldown: 1m
agents:
  - name: tuned
    run: cfg_agents:plain
    schedule: every 1m
    guards:
      timeout: 10s
      retry:
        max_delay: 30s
      circuit:
        failures: 2
  - name: plain
    run: cfg_agents:plain
    schedule: every 1m
"""


@pytest.mark.parametrize(
    ("agent", "get", "expected"),
    [
        pytest.param("tuned", lambda g: g.timeout, 10.0, id="agent-override-beats-defaults"),
        pytest.param("plain", lambda g: g.timeout, 120.0, id="defaults-beat-builtin"),
        pytest.param("tuned", lambda g: g.max_steps, 200, id="builtin-when-nobody-sets-it"),
        pytest.param("tuned", lambda g: g.cleanup_grace, 5.0, id="builtin-cleanup-grace"),
        pytest.param("tuned", lambda g: g.retry.max_attempts, 5, id="retry-key-from-defaults"),
        pytest.param("tuned", lambda g: g.retry.max_delay, 30.0, id="retry-key-from-agent"),
        pytest.param("plain", lambda g: g.retry.max_delay, 60.0, id="retry-key-builtin"),
        pytest.param("tuned", lambda g: g.retry.base_delay, 1.0, id="retry-base-delay-builtin"),
        pytest.param("tuned", lambda g: g.circuit_failures, 2, id="circuit-key-from-agent"),
        pytest.param("tuned", lambda g: g.circuit_cooldown, 60.0, id="circuit-key-from-defaults"),
        pytest.param("plain", lambda g: g.circuit_failures, 5, id="circuit-key-builtin"),
    ],
)
def test_guard_inheritance(
    tmp_path: Path, agent: str, get: Callable[[Any], Any], expected: Any
) -> None:
    """Each guard value comes from the agent, else defaults.guards, else the built-in default."""
    config = load_config(write(tmp_path, INHERIT), environ={})
    assert get(config.agent(agent).guards) == expected


def test_transient_exception_classes_are_resolved(tmp_path: Path) -> None:
    """retry.transient names become exception classes, builtins by bare name."""
    config = load_config(
        write(
            tmp_path,
            """\
            agent_paths: [FIXTURES]
            agents:
              - name: a
                run: cfg_agents:plain
                schedule: every 1m
                guards:
                  retry:
                    transient: [TimeoutError, "cfg_agents:FlakyError", httpx2.ConnectError]
            """,
        ),
        environ={},
    )
    names = [c.__name__ for c in config.agent("a").guards.transient]
    assert names == ["TimeoutError", "FlakyError", "ConnectError"]


def test_env_overrides_yaml(tmp_path: Path) -> None:
    """AGENT_SUPERVISOR_<KEY> and nested <A>__<B> variables beat the file, key by key."""
    config = write(
        tmp_path,
        """\
        max_concurrent_runs: 8
        metrics:
          enabled: false
          listen: 127.0.0.1:9464
        """,
    )
    env = {
        "AGENT_SUPERVISOR_MAX_CONCURRENT_RUNS": "3",
        "AGENT_SUPERVISOR_METRICS__LISTEN": "127.0.0.1:0",
    }
    settings = load_config(config, environ=env).settings
    assert settings.max_concurrent_runs == 3
    assert settings.metrics.listen == "127.0.0.1:0"
    assert settings.metrics.enabled is False  # the file's sibling key survives the merge


def test_environ_argument_replaces_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With environ= given, os.environ is not read; without it, it is."""
    monkeypatch.setenv("AGENT_SUPERVISOR_MAX_CONCURRENT_RUNS", "7")
    config = write(tmp_path, "max_concurrent_runs: 8\n")
    assert load_config(config, environ={}).settings.max_concurrent_runs == 8
    assert load_config(config).settings.max_concurrent_runs == 7


def test_secrets_come_from_env(tmp_path: Path) -> None:
    """AGENT_SUPERVISOR_SECRETS__<NAME> becomes secret <name>, masked in reprs."""
    env = {"AGENT_SUPERVISOR_SECRETS__OPENAI_API_KEY": "sk-from-env"}
    config = load_config(write(tmp_path, "state_dir: /srv/state\n"), environ=env)
    assert config.settings.secrets["openai_api_key"].get_secret_value() == "sk-from-env"
    assert config.secret_values == ("sk-from-env",)
    assert "sk-from-env" not in repr(config)


def test_secrets_come_from_credentials_directory(tmp_path: Path) -> None:
    """Each file in $CREDENTIALS_DIRECTORY is a secret; the environment wins on a clash."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "OPENAI_API_KEY").write_text("sk-from-file\n")
    (creds / "slack_token").write_text("xoxb-file")
    env = {
        "CREDENTIALS_DIRECTORY": str(creds),
        "AGENT_SUPERVISOR_SECRETS__SLACK_TOKEN": "xoxb-env",
    }
    config = load_config(write(tmp_path, "state_dir: /srv/state\n"), environ=env)
    secrets = {k: v.get_secret_value() for k, v in config.settings.secrets.items()}
    assert secrets == {"openai_api_key": "sk-from-file", "slack_token": "xoxb-env"}


@pytest.mark.parametrize(
    ("schedule", "cron", "every"),
    [
        pytest.param('"*/5 * * * *"', "*/5 * * * *", None, id="cron-string"),
        pytest.param("every 30s", None, 30.0, id="every-30s"),
        pytest.param("'@every 1m'", None, 60.0, id="at-every-1m"),
        pytest.param("every 1h30m", None, 5400.0, id="every-compound"),
        pytest.param("{every: 90}", None, 90.0, id="mapping-every-seconds"),
        pytest.param(
            "{cron: '0 9 * * mon-fri', timezone: Europe/Berlin}",
            "0 9 * * mon-fri",
            None,
            id="mapping-cron-tz",
        ),
    ],
)
def test_schedule_forms(
    tmp_path: Path, schedule: str, cron: str | None, every: float | None
) -> None:
    """A schedule is a cron string, an 'every' shorthand or a mapping."""
    config = write(
        tmp_path,
        f"""\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:plain
            schedule: {schedule}
        """,
    )
    sched = load_config(config, environ={}).agent("a").config.schedule
    assert (sched.cron, sched.every) == (cron, every)


def test_agent_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """agent_paths resolve against the config file's directory, not the working directory."""
    config = write(
        tmp_path / "etc" / "agent-supervisor",
        """\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: cfg_agents:report
            schedule: every 1m
            params: {channel: ops}
        """,
    )
    monkeypatch.chdir(tmp_path)
    spec = load_config(config, environ={}).agent("a")
    assert str(FIXTURES) in sys.path
    assert spec.fn is sys.modules["cfg_agents"].report
    assert (spec.params.channel, spec.params.limit) == ("ops", 10)


@pytest.mark.parametrize(
    ("run", "params", "check"),
    [
        pytest.param(
            "cfg_agents:report",
            "{channel: ops, limit: '3'}",
            lambda s: (s.params.limit, s.takes_params) == (3, True),
            id="model-coerces",
        ),
        pytest.param(
            "cfg_agents:loose",
            "{colour: red}",
            lambda s: s.params.channel == "general",
            id="lenient-model-ignores-extra",
        ),
        pytest.param(
            "cfg_agents:plain",
            "{anything: [1, 2]}",
            lambda s: s.params == {"anything": [1, 2]},
            id="untyped-params-stay-a-dict",
        ),
        pytest.param(
            "cfg_agents:ctx_only", "{}", lambda s: s.takes_params is False, id="ctx-only-agent"
        ),
    ],
)
def test_agent_params(
    tmp_path: Path, run: str, params: str, check: Callable[[AgentSpec], bool]
) -> None:
    """Params are validated by the agent's own model, or passed on as a dict."""
    config = write(
        tmp_path,
        f"""\
        agent_paths: [FIXTURES]
        agents:
          - name: a
            run: {run}
            schedule: every 1m
            params: {params}
        """,
    )
    assert check(load_config(config, environ={}).agent("a"))


def test_import_agents_false_skips_imports(tmp_path: Path) -> None:
    """With import_agents=False an unimportable agent still validates (no fn, raw params)."""
    config = write(
        tmp_path,
        """\
        agents:
          - name: a
            run: not_installed.module:agent
            schedule: every 1m
            params: {x: 1}
        """,
    )
    spec = load_config(config, import_agents=False, environ={}).agent("a")
    assert (spec.fn, spec.params, spec.line) == (None, {"x": 1}, 2)


def test_digest_changes_when_the_file_changes(tmp_path: Path) -> None:
    """The digest is the file's SHA-256: stable across loads, different after an edit."""
    config = write(tmp_path, "max_concurrent_runs: 8\n")
    first = load_config(config, environ={}).digest
    assert first == hashlib.sha256(config.read_bytes()).hexdigest()
    assert load_config(config, environ={}).digest == first
    config.write_text("max_concurrent_runs: 9\n")
    assert load_config(config, environ={}).digest != first


def _assign_settings(c: LoadedConfig) -> None:
    c.settings.max_concurrent_runs = 1  # type: ignore[misc]


def _assign_metrics(c: LoadedConfig) -> None:
    c.settings.metrics.listen = "0.0.0.0:1"  # type: ignore[misc]


def _assign_agent(c: LoadedConfig) -> None:
    c.agent("heartbeat").config.enabled = False  # type: ignore[misc]


def _assign_loaded(c: LoadedConfig) -> None:
    c.digest = "x"  # type: ignore[misc]


def _assign_guards(c: LoadedConfig) -> None:
    c.agent("heartbeat").guards.timeout = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("assign", "error"),
    [
        pytest.param(_assign_settings, pydantic.ValidationError, id="settings"),
        pytest.param(_assign_metrics, pydantic.ValidationError, id="nested-section"),
        pytest.param(_assign_agent, pydantic.ValidationError, id="agent-config"),
        pytest.param(_assign_loaded, dataclasses.FrozenInstanceError, id="loaded-config"),
        pytest.param(_assign_guards, dataclasses.FrozenInstanceError, id="resolved-guards"),
    ],
)
def test_config_is_frozen(assign: Callable[[LoadedConfig], None], error: type[Exception]) -> None:
    """Every layer of a loaded config refuses assignment."""
    config = load_config(REPO / "config" / "example.yaml", environ={})
    with pytest.raises(error):
        assign(config)
