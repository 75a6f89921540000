"""Cluster config: ``store:`` and ``cluster:`` validated with file:line, per-agent takeover,
and the fleet digest the nodes compare (the same fleet, whatever differs per node)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from supervisor.config import LoadedConfig, load_config
from supervisor.errors import ConfigError, ConfigProblem

BASE = """\
state_dir: /var/lib/agent-supervisor
log_level: info
store: postgresql://sup@db.example:5432/sup?schema=fleet
metrics:
  listen: 127.0.0.1:9464
cluster:
  node: node-a
  lease: 30s
agents:
  - name: alpha
    run: agents.alpha:run
    schedule: "*/5 * * * *"
    takeover: next
  - name: beta
    run: agents.beta:run
    schedule: every 1h
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(path: Path, environ: dict[str, str] | None = None) -> LoadedConfig:
    return load_config(path, import_agents=False, environ=environ or {})


def problems(path: Path, environ: dict[str, str] | None = None) -> list[ConfigProblem]:
    """The problems ``load_config`` reports for ``path``."""
    with pytest.raises(ConfigError) as info:
        load(path, environ)
    return info.value.problems


# -- store ----------------------------------------------------------------------------------


def test_a_password_in_the_store_url_of_the_file_is_refused(tmp_path: Path) -> None:
    """store: with a password in the file: refused at file:line, key store, without echoing
    the password."""
    path = write(
        tmp_path,
        """\
        log_level: info

        store: postgresql://sup:hunter2@db.example:5432/sup
        """,
    )
    (problem,) = problems(path)
    assert (problem.file, problem.line, problem.path) == (str(path), 3, "store")
    assert str(problem).startswith(f"{path}:3: store: the URL holds a password")
    assert "AGENT_SUPERVISOR_STORE" in problem.message
    assert "hunter2" not in str(problem)


def test_a_password_in_the_store_url_of_the_file_is_refused_even_when_env_overrides_it(
    tmp_path: Path,
) -> None:
    """The file itself must not hold the password, whatever the environment says."""
    path = write(tmp_path, "store: postgresql://sup:hunter2@db/sup\n")
    (problem,) = problems(path, {"AGENT_SUPERVISOR_STORE": "postgresql://sup@db/sup"})
    assert (problem.line, problem.path) == (1, "store")


@pytest.mark.parametrize(
    "yaml",
    [pytest.param("", id="no_store_in_file"), pytest.param(BASE, id="store_in_file")],
)
def test_a_store_url_with_a_password_from_the_environment_is_accepted(
    tmp_path: Path, yaml: str
) -> None:
    """AGENT_SUPERVISOR_STORE may carry the password (it overrides the file's store); the
    password is among the secret values the log redactor hides."""
    path = write(tmp_path, yaml or "log_level: info\n")
    url = "postgresql://sup:hunter2@db.example:5432/sup?schema=fleet"
    config = load(path, {"AGENT_SUPERVISOR_STORE": url})
    assert config.settings.store == url
    assert config.settings.clustered
    assert "hunter2" in config.secret_values


def test_a_store_without_a_password_adds_no_secret_value(tmp_path: Path) -> None:
    """A store URL without a password (PGPASSWORD, ~/.pgpass) leaves secret_values alone."""
    config = load(write(tmp_path, BASE))
    assert config.settings.clustered
    assert config.secret_values == ()


@pytest.mark.parametrize(
    ("url", "phrase"),
    [
        pytest.param("mysql://sup@db/sup", "expected a postgresql:// URL", id="mysql"),
        pytest.param("sqlite:///var/lib/x.db", "got 'sqlite'", id="sqlite"),
        pytest.param("/var/lib/agent-supervisor", "expected a postgresql:// URL", id="a_path"),
        pytest.param("postgresql://sup@db/sup?schema=1fleet", "invalid schema name", id="digit"),
        pytest.param("postgresql://sup@db/sup?schema=my-fleet", "'my-fleet'", id="dash"),
        pytest.param(f"postgresql://sup@db/sup?schema={'s' * 64}", "1-63", id="too_long"),
        pytest.param("postgresql://sup@db/sup?schema=a;drop", "invalid schema", id="semicolon"),
    ],
)
def test_a_bad_store_url_is_refused(tmp_path: Path, url: str, phrase: str) -> None:
    """Only postgresql:// (or postgres://) URLs, with a plain SQL identifier as schema."""
    path = write(tmp_path, f"log_level: info\nstore: {url!r}\n")
    (problem,) = problems(path)
    assert (problem.line, problem.path) == (2, "store")
    assert phrase in problem.message


def test_a_bad_store_url_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    """The same check on AGENT_SUPERVISOR_STORE says where the value came from."""
    path = write(tmp_path, "log_level: info\n")
    (problem,) = problems(path, {"AGENT_SUPERVISOR_STORE": "mysql://sup@db/sup"})
    assert problem.path == "store"
    assert "(from environment AGENT_SUPERVISOR_STORE)" in problem.message


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("postgresql://sup@db.example:5432/sup", id="postgresql"),
        pytest.param("postgres://sup@db/sup", id="postgres"),
        pytest.param("postgresql://sup@db/sup?schema=fleet_2", id="schema"),
        pytest.param("postgresql:///sup?host=/run/postgresql", id="unix_socket"),
    ],
)
def test_a_good_store_url_is_accepted(tmp_path: Path, url: str) -> None:
    """postgresql:// and postgres:// URLs, with or without a schema, turn on cluster mode."""
    config = load(write(tmp_path, f"store: {url!r}\n"))
    assert config.settings.store == url and config.settings.clustered


def test_no_store_is_the_embedded_json_default(tmp_path: Path) -> None:
    """Without store: the daemon keeps JSON files in state_dir and is no cluster node."""
    config = load(write(tmp_path, "log_level: info\n"))
    assert config.settings.store == "" and not config.settings.clustered


def test_a_password_in_the_store_url_query_is_refused(tmp_path: Path) -> None:
    """libpq reads ``?password=`` as the password too: in the file it is refused as well."""
    path = write(tmp_path, "store: postgresql://sup@db/sup?password=hunter2\n")
    (problem,) = problems(path)
    assert (problem.line, problem.path) == (1, "store")


# -- cluster --------------------------------------------------------------------------------


def test_cluster_without_a_store_is_refused(tmp_path: Path) -> None:
    """cluster: with no postgresql:// store: the nodes would share nothing."""
    path = write(
        tmp_path,
        """\
        log_level: info
        cluster:
          node: node-a
        """,
    )
    (problem,) = problems(path)
    assert problem.line is not None
    assert "cluster: is set but store: is not a postgresql:// URL" in problem.message


def test_cluster_with_the_store_from_the_environment_is_accepted(tmp_path: Path) -> None:
    """The store may come from the environment alone (it holds the password)."""
    path = write(tmp_path, "cluster:\n  node: node-a\n")
    config = load(path, {"AGENT_SUPERVISOR_STORE": "postgresql://sup:pw@db/sup"})
    assert config.settings.cluster.node == "node-a" and config.settings.clustered


@pytest.mark.parametrize(
    ("cluster", "phrase"),
    [
        pytest.param(
            "heartbeat_interval: 20s\n  node_ttl: 30s",
            "node_ttl must be at least twice heartbeat_interval",
            id="node_ttl_under_two_heartbeats",
        ),
        pytest.param(
            "lease: 10s\n  check_interval: 20s",
            "check_interval must not be longer than lease",
            id="check_interval_over_lease",
        ),
        pytest.param(
            "lease: 60s\n  node_ttl: 30s",
            "node_ttl must be at least lease",
            id="node_ttl_under_lease",
        ),
        pytest.param("lease: 0.5s", "greater than or equal to 1", id="lease_under_1s"),
        pytest.param("node: -a", "should match pattern", id="bad_node_name"),
        pytest.param("takeover: later", "'rerun' or 'next'", id="bad_default_takeover"),
        pytest.param("max_takeovers: 11", "less than or equal to 10", id="too_many_takeovers"),
        pytest.param("keep_claims: 10m", "greater than or equal to 3600", id="keep_claims"),
        pytest.param("leases: 30s", "unknown key", id="unknown_key"),
    ],
)
def test_bad_cluster_settings_are_refused(tmp_path: Path, cluster: str, phrase: str) -> None:
    """The cluster's durations must fit together and each key has its range; each problem
    points into cluster:."""
    path = write(tmp_path, f"store: postgresql://sup@db/sup\ncluster:\n  {cluster}\n")
    (problem,) = problems(path)
    assert problem.path.startswith("cluster")
    assert problem.line is not None and problem.line >= 2
    assert phrase in problem.message


def test_cluster_timings_at_their_limits_are_accepted(tmp_path: Path) -> None:
    """node_ttl exactly twice the heartbeat and equal to the lease, check_interval equal to
    the lease: accepted; the durations are normalised to seconds."""
    path = write(
        tmp_path,
        """\
        store: postgresql://sup@db/sup
        cluster:
          lease: 20s
          check_interval: 20s
          heartbeat_interval: 10s
          node_ttl: 20s
        """,
    )
    cluster = load(path).settings.cluster
    assert (cluster.lease, cluster.check_interval, cluster.heartbeat_interval) == (20, 20, 10)
    assert cluster.node_ttl == 20


# -- per-agent takeover ---------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["rerun", "next"])
def test_an_agents_takeover_policy_is_accepted(tmp_path: Path, policy: str) -> None:
    """agents[].takeover: rerun or next; unset, the agent follows cluster.takeover."""
    text = BASE.replace("takeover: next", f"takeover: {policy}")
    config = load(write(tmp_path, text))
    assert config.agent("alpha").config.takeover == policy
    assert config.agent("beta").config.takeover is None
    assert config.settings.cluster.takeover == "rerun"


def test_a_bad_takeover_policy_is_refused_at_its_line(tmp_path: Path) -> None:
    """agents[0].takeover: later is refused at its own line and key path."""
    path = write(tmp_path, BASE.replace("takeover: next", "takeover: later"))
    (problem,) = problems(path)
    assert (problem.line, problem.path) == (13, "agents[0].takeover")
    assert "'rerun' or 'next'" in problem.message


# -- the fleet digest -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "same_fleet"),
    [
        # what differs per node by design: the same fleet
        pytest.param("node: node-a", "node: node-b", True, id="cluster_node"),
        pytest.param("listen: 127.0.0.1:9464", "listen: 0.0.0.0:9100", True, id="metrics_listen"),
        pytest.param(
            "state_dir: /var/lib/agent-supervisor", "state_dir: /srv/b", True, id="state_dir"
        ),
        pytest.param("log_level: info", "log_level: debug", True, id="log_level"),
        pytest.param("sup@db.example:5432", "other@db2.example:5433", True, id="store_url"),
        # an agent's schedule, function or takeover policy, or the lease: another fleet
        pytest.param('"*/5 * * * *"', '"*/10 * * * *"', False, id="schedule"),
        pytest.param("every 1h", "every 2h", False, id="interval"),
        pytest.param("takeover: next", "takeover: rerun", False, id="agent_takeover"),
        pytest.param("lease: 30s", "lease: 20s", False, id="cluster_lease"),
        pytest.param("agents.beta:run", "agents.gamma:run", False, id="agent_function"),
    ],
)
def test_the_fleet_digest_tells_fleets_apart_not_nodes(
    tmp_path: Path, old: str, new: str, same_fleet: bool
) -> None:
    """Two configs whose files differ: the same fleet digest exactly when what differs is
    per node."""
    assert old in BASE
    one = load(write(tmp_path, BASE, "a.yaml"))
    two = load(write(tmp_path, BASE.replace(old, new), "b.yaml"))
    assert one.digest != two.digest
    assert (one.fleet_digest == two.fleet_digest) is same_fleet


def test_the_fleet_digest_ignores_the_node_name_from_the_environment(tmp_path: Path) -> None:
    """AGENT_SUPERVISOR_CLUSTER__NODE names a node without changing its fleet (and keeps
    the file's other cluster settings)."""
    path = write(tmp_path, BASE)
    one = load(path)
    two = load(path, {"AGENT_SUPERVISOR_CLUSTER__NODE": "node-b"})
    assert two.settings.cluster.node == "node-b"
    assert two.settings.cluster.lease == one.settings.cluster.lease == 30
    assert one.fleet_digest == two.fleet_digest


def test_the_fleet_digest_is_stable_and_short(tmp_path: Path) -> None:
    """The same file loaded twice gives the same 16 hex digits."""
    path = write(tmp_path, BASE)
    digest = load(path).fleet_digest
    assert digest == load(path).fleet_digest
    assert len(digest) == 16 and int(digest, 16) >= 0
