"""Several real daemons on one real PostgreSQL: each fire runs once, a dead node's work is
taken over, a paused node cannot commit, a node with another config is reported.

Every node is ``python -m supervisor run`` on the same config file, told apart by the
environment (``AGENT_SUPERVISOR_CLUSTER__NODE``, its own ``STATE_DIR``), as on several
machines. Each test works in a schema of its own. What happened is read from three
independent places and compared: the nodes' ``run.finished`` log lines, the fire claims in
the database, and what the agents themselves counted in their state (or what the effect
target received).
"""

from __future__ import annotations

import itertools
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from supervisor.llm.fakeserver import FakeLLMServer
from tests.cluster.pg import drop_schema, execute, new_schema, require_postgres
from tests.e2e.conftest import E2E_DIR, REPO, Daemon
from tests.e2e.effect_target import running_target

pytestmark = pytest.mark.e2e

FAST = {"lease": "2s", "check_interval": "0.5s", "heartbeat_interval": "0.5s", "node_ttl": "2s"}
KILLS = int(os.environ.get("AGENT_SUPERVISOR_CLUSTER_KILLS", "10"))
CLUSTER_SECONDS = float(os.environ.get("AGENT_SUPERVISOR_CLUSTER_SECONDS", "62"))


class Cluster:
    """Nodes of one cluster (one config file, one schema), started and killed by name."""

    def __init__(self, root: Path, schema: str, url: str) -> None:
        self.root = root
        self.schema = schema
        self.store = f"{url}?schema={schema}"
        self.nodes: dict[str, Daemon] = {}
        self.retired: list[Daemon] = []

    def write(self, doc: dict[str, Any], name: str = "cluster.yaml") -> Path:
        path = self.root / name
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def start(self, node: str, config: Path, **env: str) -> Daemon:
        full = {
            "AGENT_SUPERVISOR_STORE": self.store,
            "AGENT_SUPERVISOR_CLUSTER__NODE": node,
            "AGENT_SUPERVISOR_STATE_DIR": str(self.root / f"state-{node}"),
            **env,
        }
        if node in self.nodes:
            self.retired.append(self.nodes[node])
        d = self.nodes[node] = Daemon(config, full)
        return d

    def all_lines(self) -> list[dict[str, Any]]:
        out = []
        for d in [*self.retired, *self.nodes.values()]:
            out.extend(d.lines)
        return out

    def claims(self, where: str = "TRUE", params: Any = None) -> list[dict[str, Any]]:
        rows = execute(
            self.schema,
            "SELECT agent, planned_at, node, status, outcome, attempt, abandoned_node, "
            f"lease_until, fencing_token FROM {{s}}.fire_claims WHERE {where} "
            "ORDER BY agent, planned_at",
            params,
        )
        keys = (
            "agent planned_at node status outcome attempt abandoned_node lease_until token"
        ).split()
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def state(self, agent: str) -> dict[str, Any]:
        rows = execute(self.schema, "SELECT doc::text FROM {s}.agents WHERE agent = %s", (agent,))
        return orjson.loads(rows[0][0]) if rows else {}

    def stop_all(self) -> None:
        for d in self.nodes.values():
            if d.proc.poll() is None:
                d.signal(signal.SIGTERM)
        for d in self.nodes.values():
            try:
                d.wait(30)
            finally:
                d.stop()
        for d in self.retired:
            d.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    url = require_postgres()
    schema = new_schema()
    c = Cluster(tmp_path, schema, url)
    try:
        yield c
    finally:
        for d in [*c.nodes.values(), *c.retired]:
            d.stop()
        drop_schema(schema)


def base_config(agents: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "agent_paths": [str(E2E_DIR)],
        "metrics": {"listen": "127.0.0.1:0"},
        "shutdown_grace": "5s",
        "max_concurrent_runs": 64,
        "cluster": dict(FAST),
        "defaults": {"guards": {"circuit": {"failures": 1000}}},
        "agents": agents,
        **extra,
    }


def ts(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp()


def grid_gaps(times: list[datetime], every: float) -> list[tuple[datetime, datetime]]:
    """Consecutive planned times further apart than one interval: fires that were lost."""
    step = timedelta(seconds=every)
    return [(a, b) for a, b in itertools.pairwise(times) if b - a != step]


def test_three_nodes_run_every_fire_exactly_once_and_split_the_work(cluster: Cluster) -> None:
    """3 daemons, 50 agents firing every 2 s for over 60 s: every planned fire has exactly
    one claim and one run, no fire runs twice, and every node does a share of the work."""
    agents = [
        {"name": f"a{i:02d}", "run": "cluster_agents:tick", "schedule": "every 2s"}
        for i in range(50)
    ]
    config = cluster.write(base_config(agents))
    nodes = [cluster.start(name, config) for name in ("n1", "n2", "n3")]
    for d in nodes:
        d.ready(30)
    start = datetime.now(UTC)
    time.sleep(CLUSTER_SECONDS)
    end = datetime.now(UTC)
    # Every node's staleness series tell the cluster's truth, not only its own runs: the
    # no-recent-success alert must not fire for an agent another node runs.
    for d in nodes:
        for agent in ("a00", "a25", "a49"):
            last = d.sample("agent_supervisor_last_success_timestamp_seconds", agent=agent)
            assert last is not None and last > end.timestamp() - 5, (agent, last)
    cluster.stop_all()
    for d in nodes:
        assert d.proc.returncode == 0, d.stderr[-2000:]

    claims = cluster.claims()
    window = [c for c in claims if start + timedelta(seconds=2) <= c["planned_at"] <= end]
    by_agent: dict[str, list[datetime]] = defaultdict(list)
    for c in window:
        by_agent[c["agent"]].append(c["planned_at"])
    assert sorted(by_agent) == [a["name"] for a in agents]
    expected = int((end - start).total_seconds() - 2) // 2
    for agent, times in by_agent.items():
        # No fire lost: the claims of each agent tick every 2 s without a gap...
        assert grid_gaps(times, 2.0) == [], agent
        assert len(times) >= expected - 1, (agent, len(times), expected)
    # ...and each ran to success on one node, never abandoned.
    assert {(c["status"], c["outcome"]) for c in window} == {("done", "success")}

    # No fire run twice: one run.finished line per (agent, planned fire) over all nodes.
    finished = Counter(
        (line["agent"], line["planned_at"])
        for line in cluster.all_lines()
        if line.get("event") == "run.finished" and line.get("outcome") == "success"
    )
    assert finished and max(finished.values()) == 1
    successes = Counter(c["agent"] for c in claims if c["outcome"] == "success")
    assert sum(successes.values()) == sum(finished.values())
    # The agents' own count agrees: every fenced commit landed, none twice.
    for agent, n in successes.items():
        assert cluster.state(agent)["data"]["runs"] == n, agent

    # Work split: every node ran a fair share (an even split is a third each).
    per_node = Counter(c["node"] for c in window)
    shares = {node: n / len(window) for node, n in per_node.items()}
    assert set(shares) == {"n1", "n2", "n3"}
    assert min(shares.values()) > 0.10, shares
    skipped = sum(
        1
        for line in cluster.all_lines()
        if line.get("event") == "run.skipped" and line.get("outcome") == "skipped_claimed_elsewhere"
    )
    assert skipped == 0  # logged at debug only: 2 of 3 nodes lose every fire
    print(
        f"\ncluster: {len(window)} fires in {len(by_agent)} agents over "
        f"{(end - start).total_seconds():.0f}s, shares {shares}"
    )


def test_sigkill_mid_run_is_taken_over_with_no_effect_twice_and_no_budget_overshoot(
    cluster: Cluster,
) -> None:
    """SIGKILL a node mid-run, again and again: its claims are found abandoned within the
    lease plus one check interval, survivors rerun them, every schedule keeps running,
    no effect is delivered twice and the cluster-wide LLM budget is never passed."""
    limit = 0.006
    with running_target() as target, FakeLLMServer() as llm:
        agents = [
            {
                "name": f"p{i}",
                "run": "cluster_agents:poster",
                "schedule": "every 2s",
                "params": {"url": target.url, "work": 0.8, "llm": True},
            }
            for i in range(6)
        ]
        provider = {
            "base_url": llm.openai_base_url,
            "api_key": {"secret": "FAKE_LLM_KEY"},
            "retry": {"attempts": 1},
        }
        doc = base_config(
            agents,
            llm={
                "providers": {"primary": provider},
                "models": {"primary/writer-1": {"price": {"input": 10.0, "output": 30.0}}},
                "aliases": {"writer": ["primary/writer-1"]},
                "default_max_tokens": 100,
                "budgets": {"global_day": {"usd": limit}},
            },
        )
        config = cluster.write(doc)
        env = {"AGENT_SUPERVISOR_SECRETS__FAKE_LLM_KEY": "kill-test-key-0001"}
        for name in ("n1", "n2", "n3"):
            cluster.start(name, config, **env)
        for d in cluster.nodes.values():
            d.ready(30)
        started = datetime.now(UTC)
        lease, check = 2.0, 0.5
        detections: list[float] = []
        kills = 0
        for _attempt in range(3 * KILLS):
            if kills == KILLS:
                break
            victim, running = _node_mid_run(cluster, exclude=set())
            d = cluster.nodes[victim]
            d.proc.send_signal(signal.SIGKILL)
            killed_at = time.time()
            d.wait(10)
            # systemd would restart it: the same name, the same state dir.
            cluster.start(victim, config, **env)
            # A run may have finished between the look and the kill: only the claims it still
            # held count (a killed node cannot finish one any more).
            held = [c for c in running if not _finished_by(cluster, victim, c)]
            for claim in held:
                found = _abandoned_line(cluster, victim, claim, timeout=lease + check + 10)
                detections.append(ts(found) - killed_at)
            cluster.nodes[victim].ready(30)
            if held:
                kills += 1
                print(f"kill {kills}: {victim} mid-run of {len(held)} fires")
        assert kills == KILLS, f"only {kills} kills landed mid-run"
        time.sleep(4)  # the last takeovers finish
        ended = datetime.now(UTC)
        cluster.stop_all()

        # Found abandoned within the lease plus one check interval (plus log latency).
        assert len(detections) >= KILLS
        assert max(detections) <= lease + check + 0.5, detections
        print(
            f"\ndetection after SIGKILL: median {statistics.median(detections):.2f}s, "
            f"max {max(detections):.2f}s (lease {lease}s + check {check}s)"
        )
        # No effect delivered twice.
        deliveries = target.deliveries()
        assert deliveries and max(deliveries.values()) == 1, deliveries.most_common(3)
        # Every schedule kept running: no gap in any agent's claims, all of them settled.
        claims = cluster.claims(
            "planned_at BETWEEN %s AND %s",
            (started + timedelta(seconds=2), ended - timedelta(seconds=4)),
        )
        times: dict[str, list[datetime]] = defaultdict(list)
        for c in claims:
            times[c["agent"]].append(c["planned_at"])
        assert sorted(times) == [f"p{i}" for i in range(6)]
        for agent, planned in times.items():
            assert grid_gaps(planned, 2.0) == [], agent
        statuses = Counter((c["status"], c["outcome"]) for c in claims)
        assert {s for s, _ in statuses} <= {"done", "abandoned", "skipped"}, statuses
        taken_over = [c for c in claims if c["attempt"] > 1]
        assert taken_over, "no abandoned fire was run again"
        # The cluster-wide budget held: settled plus reserved never above the limit.
        rows = execute(
            cluster.schema,
            "SELECT (spent + reserved) / 1e9 FROM {s}.budget_windows WHERE kind = 'global_day'",
        )
        assert rows and float(rows[0][0]) <= limit + 1e-9, rows
        refused = [
            line
            for line in cluster.all_lines()
            if line.get("event") == "run.finished" and line.get("outcome") == "budget_exceeded"
        ]
        outcomes = Counter(
            (line.get("outcome"), line.get("error_type"))
            for line in cluster.all_lines()
            if line.get("event") == "run.finished"
        )
        assert refused, f"the budget was never reached: {outcomes}"


def _node_mid_run(
    cluster: Cluster, exclude: set[str], timeout: float = 20.0
) -> tuple[str, list[dict[str, Any]]]:
    """A ready node with a run that started at least 0.2 s ago, and its running claims."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = cluster.claims(
            "status = 'running' AND claimed_at < now() - interval '0.2 seconds'"
        )
        by_node: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for c in running:
            by_node[c["node"]].append(c)
        for node, claims in sorted(by_node.items(), key=lambda kv: -len(kv[1])):
            d = cluster.nodes.get(node)
            if node not in exclude and d is not None and d.proc.poll() is None:
                return node, claims
        time.sleep(0.05)
    raise AssertionError("no node was mid-run")


def _finished_by(cluster: Cluster, node: str, claim: dict[str, Any]) -> bool:
    """True when ``node`` finished ``claim``'s run itself (before it was killed)."""
    row = cluster.claims("agent = %s AND planned_at = %s", (claim["agent"], claim["planned_at"]))[0]
    return (row["status"], row["node"], row["attempt"]) == ("done", node, 1)


def _abandoned_line(
    cluster: Cluster, victim: str, claim: dict[str, Any], timeout: float
) -> dict[str, Any]:
    planned = claim["planned_at"].isoformat()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in cluster.all_lines():
            if (
                line.get("event") == "cluster.claim_abandoned"
                and line.get("abandoned_node") == victim
                and line.get("agent") == claim["agent"]
                and line.get("planned_at") == planned
            ):
                return line
        time.sleep(0.05)
    raise AssertionError(f"the claim of {claim['agent']} at {planned} was never found abandoned")


def test_a_node_paused_past_its_lease_does_not_commit(cluster: Cluster) -> None:
    """SIGSTOP a node mid-run for longer than its lease, then SIGCONT: another node takes
    the fire over; the paused node's run ends lease_lost and its results never land."""
    agents = [
        {
            "name": "slow",
            "run": "cluster_agents:tick",
            "schedule": "every 10s",
            "params": {"work": 3.0},
        }
    ]
    config = cluster.write(base_config(agents))
    n1, n2 = cluster.start("n1", config), cluster.start("n2", config)
    n1.ready(30)
    n2.ready(30)
    victim, running = _node_mid_run(cluster, exclude=set(), timeout=40)
    d = cluster.nodes[victim]
    d.signal(signal.SIGSTOP)
    other = cluster.nodes["n2" if victim == "n1" else "n1"]
    try:
        other.event("cluster.takeover", timeout=15, agent="slow")
        # The takeover's run finishes and commits while the victim is still frozen.
        other.wait_for(
            lambda line: (
                line.get("event") == "run.finished"
                and line.get("trigger") == "takeover"
                and line.get("outcome") == "success"
            ),
            timeout=15,
        )
    finally:
        d.signal(signal.SIGCONT)
    lost = d.wait_for(
        lambda line: (
            line.get("event") == "run.finished"
            and line.get("agent") == "slow"
            and line.get("outcome") == "lease_lost"
        ),
        timeout=15,
    )
    assert lost[0]["planned_at"] == running[0]["planned_at"].isoformat()
    # Of that fire, only the takeover's run landed: the agent counted exactly the runs the
    # claims say succeeded, and the frozen run's result is nowhere.
    state = cluster.state("slow")
    successes = cluster.claims("agent = 'slow' AND outcome = 'success'")
    assert state["data"]["runs"] == len(successes) >= 1
    assert "lease_lost" not in state["totals"]
    claim = cluster.claims("agent = 'slow' AND planned_at = %s", (running[0]["planned_at"],))[0]
    assert (claim["status"], claim["attempt"], claim["node"]) == ("done", 2, other_name(victim))
    # The frozen node came back and keeps working as a member of the cluster.
    assert d.proc.poll() is None
    assert d.sample("agent_supervisor_cluster_lease_lost_total") == 1.0


def other_name(node: str) -> str:
    return "n2" if node == "n1" else "n1"


def test_a_node_with_another_config_is_reported(cluster: Cluster) -> None:
    """Two nodes whose fleets differ: each says so (log line, gauge, status), neither
    merges the other's agents."""
    one = [{"name": "a", "run": "cluster_agents:tick", "schedule": "every 5s"}]
    two = [*one, {"name": "b", "run": "cluster_agents:tick", "schedule": "every 5s"}]
    n1 = cluster.start("n1", cluster.write(base_config(one), "one.yaml"))
    n1.ready(30)
    n2 = cluster.start("n2", cluster.write(base_config(two), "two.yaml"))
    n2.ready(30)
    for d, other in ((n1, "n2"), (n2, "n1")):
        line = d.event("cluster.config_mismatch", timeout=10)[0]
        assert [o["node"] for o in line["others"]] == [other]
        assert d.sample("agent_supervisor_cluster_config_mismatch_nodes") == 1.0
        assert d.sample("agent_supervisor_cluster_live_nodes") == 2.0
    out = subprocess.run(
        [sys.executable, "-m", "supervisor", "status", "--config", str(n1.config)],
        cwd=n1.config.parent,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **_env_of(cluster, "n1")},
    )
    assert out.returncode == 0, out.stderr
    assert "CONFIG MISMATCH: node n2" in out.stdout, out.stdout
    assert "2 live nodes: n1 (this node), n2" in out.stdout, out.stdout
    # n1 never runs b (it is not in its fleet); n2 does.
    assert not n1.runs("b")


def _env_of(cluster: Cluster, node: str) -> dict[str, str]:
    return {
        "AGENT_SUPERVISOR_STORE": cluster.store,
        "AGENT_SUPERVISOR_CLUSTER__NODE": node,
        "AGENT_SUPERVISOR_STATE_DIR": str(cluster.root / f"state-{node}"),
    }


def test_a_second_live_process_with_a_node_name_is_refused(cluster: Cluster) -> None:
    """Two processes must never share a node name (they would fence each other out)."""
    config = cluster.write(base_config([]))
    first = cluster.start("n1", config)
    first.ready(30)
    twin = Daemon(config, _env_of(cluster, "n1") | {"AGENT_SUPERVISOR_STATE_DIR": "other"})
    try:
        assert twin.wait(30) == 1
        twin.event("cluster.node_name_in_use", timeout=1)
    finally:
        twin.stop()
    assert first.proc.poll() is None
