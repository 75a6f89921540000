"""Cluster mode, real daemons on one PostgreSQL: fires per second, claim cost, takeover time.

    .venv/bin/python -m tests.bench.bench_cluster            # full (~9 min): print the section
    .venv/bin/python -m tests.bench.bench_cluster --quick    # 1 round, 8 s windows, 2 kills
    .venv/bin/python -m tests.bench.bench_cluster --write    # and put it into docs/performance.md

Every configuration is the real ``python -m supervisor run --config X`` (the end-to-end
tests' ``Daemon`` harness), on the PostgreSQL of the cluster tests
(``AGENT_SUPERVISOR_TEST_PG``, default ``postgresql://postgres@127.0.0.1:5432/test``), each
round in a schema of its own, dropped afterwards.

1. Throughput and claim overhead: a fleet of no-op agents (``cluster_agents:tick``, work 0)
   on ``every 1s`` under 1, 2 and 3 nodes, and as the baseline one daemon on the embedded
   JSON-file store (no ``store:``) with the same fleet; 1 and 3 nodes also with
   ``claim_delay_per_run: 0`` (what the load-spreading delay costs); the configurations
   interleave over the rounds. In a window that starts after every node is ready (and a warm-up): completed
   fires, lost fires (planned fires of the window without a successful run), schedule lag,
   and the CPU time of every daemon process (``/proc/<pid>/stat``) per completed run; the
   claim overhead is that CPU per run minus the baseline's, within the same round.
2. Takeover: 3 nodes, agents working 3 s each on ``every 5s``; a node is SIGKILLed while a
   claim of its is running; the time from the kill to a survivor's
   ``cluster.claim_abandoned``, to its ``cluster.takeover`` and to the rerun's
   ``run.finished`` (less the 3 s of work), against the bound lease + check_interval;
   and, before the first kill, how the nodes split the fires of a few undisturbed ticks.

Every daemon started is killed at the end, on errors too.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import random
import re
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from tests.bench._common import REPO, machine_facts, package_versions, quantile
from tests.e2e.conftest import E2E_DIR, Daemon

DOC = REPO / "docs" / "performance.md"
HEADING = "## Cluster: fire claims in PostgreSQL"
PG_URL = os.environ.get("AGENT_SUPERVISOR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")

LEASE_S, CHECK_S = 2.0, 0.5
CLUSTER = {"lease": "2s", "check_interval": "0.5s", "heartbeat_interval": "0.5s", "node_ttl": "2s"}
#: per node: the PostgreSQL pool holds up to max_concurrent_runs + 4 connections, and the
#: server (max_connections 100) is shared with the test suites: 3 nodes x 20 fit
MAX_RUNS = 16
WARMUP_S = 3.0
TAIL_S = 2.0
#: after the window, how long to wait for its planned fires to run before calling them lost
DRAIN_S = 30.0
#: the fleet of part 1 (fires per second offered); at 200 three nodes plus PostgreSQL fell
#: behind on the 2-vCPU machine while test suites ran next to them
AGENTS = 100
TAKEOVER_AGENTS = 6
TAKEOVER_WORK_S = 3.0
TAKEOVER_EVERY_S = 5
#: ticks of the takeover fleet watched before the first kill
CALM_TICKS = 4

CLK_TCK = os.sysconf("SC_CLK_TCK")

#: every daemon this process started, killed in ``main``'s ``finally``
_STARTED: list[Daemon] = []


def log(msg: str) -> None:
    print(f"[bench_cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- PostgreSQL ----------------------------------------------------------------------------------


def sql(schema: str | None, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run ``statement`` (``{s}``: the quoted schema) on a connection of its own."""
    import psycopg
    from psycopg import sql as pgsql

    text = pgsql.SQL(statement)
    if schema is not None:
        text = text.format(s=pgsql.Identifier(schema))  # type: ignore[assignment]
    with psycopg.connect(PG_URL, autocommit=True, connect_timeout=10) as conn:
        cur = conn.execute(text, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


@contextmanager
def fresh_schema() -> Iterator[str]:
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    try:
        yield schema
    finally:
        try:
            sql(schema, "DROP SCHEMA IF EXISTS {s} CASCADE")
        except Exception as exc:
            log(f"could not drop schema {schema}: {exc}")


def pg_backends(tag: str) -> list[int]:
    """Server processes serving the nodes whose names start with ``tag``."""
    rows = sql(
        None,
        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s",
        (f"agent-supervisor:{tag}-%",),
    )
    return [int(r[0]) for r in rows]


# -- processes and CPU ---------------------------------------------------------------------------


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of ``pid`` in clock ticks; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def machine_busy_ticks() -> int:
    """Busy CPU ticks of the whole machine (all CPUs) since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    # user nice system idle iowait irq softirq steal: all but idle and iowait
    return sum(values) - values[3] - values[4]


def self_ticks() -> int:
    t = os.times()
    return round((t.user + t.system) * CLK_TCK)


def start_daemon(config: Path, env: dict[str, str]) -> Daemon:
    d = Daemon(config, env)
    _STARTED.append(d)
    return d


def stop_daemons(daemons: Sequence[Daemon], timeout: float = 30.0) -> list[int | None]:
    """SIGTERM each live daemon, wait, then SIGKILL what is left; the exit codes."""
    for d in daemons:
        if d.proc.poll() is None:
            d.signal(signal.SIGTERM)
    codes: list[int | None] = []
    for d in daemons:
        try:
            codes.append(d.wait(timeout))
        except Exception:
            codes.append(None)
        finally:
            d.stop()
    return codes


def kill_everything() -> None:
    for d in _STARTED:
        with suppress(Exception):
            d.stop()


def ts(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp()


def sleep_until(t: float) -> None:
    while (left := t - time.time()) > 0:
        time.sleep(min(left, 0.5))


# -- configs -------------------------------------------------------------------------------------


def write_config(
    path: Path,
    agents: list[dict[str, Any]],
    *,
    clustered: bool,
    claim_delay: bool = True,
    max_runs: int = MAX_RUNS,
) -> Path:
    doc: dict[str, Any] = {
        "agent_paths": [str(E2E_DIR)],
        "log_level": "info",
        "metrics": {"listen": "127.0.0.1:0"},
        "shutdown_grace": "5s",
        "max_concurrent_runs": max_runs,
        "defaults": {"guards": {"circuit": {"failures": 1000}}},
    }
    if clustered:  # ``cluster:`` without ``store:`` is refused
        doc["cluster"] = dict(CLUSTER)
        if not claim_delay:
            doc["cluster"]["claim_delay_per_run"] = 0
    doc["agents"] = agents
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def node_env(root: Path, schema: str, node: str) -> dict[str, str]:
    return {
        "AGENT_SUPERVISOR_STORE": f"{PG_URL}?schema={schema}",
        "AGENT_SUPERVISOR_CLUSTER__NODE": node,
        "AGENT_SUPERVISOR_STATE_DIR": str(root / f"state-{node}"),
    }


# -- 1. throughput and claim overhead ------------------------------------------------------------


@dataclass
class FleetRound:
    """One configuration in one round."""

    nodes: int  #: 0: the baseline, one daemon on the JSON-file store
    window_s: float
    #: False: ``claim_delay_per_run: 0`` (no load-spreading wait before a claim)
    claim_delay: bool = True
    expected: int = 0
    completed: int = 0
    lost: int = 0
    duplicates: int = 0
    not_success: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    lags: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    pg_cpu_s: float | None = None
    other_cores: float = 0.0
    claim_sum: float = 0.0
    claim_count: float = 0.0
    claim_results: Counter[str] = field(default_factory=Counter)
    won: Counter[str] = field(default_factory=Counter)
    claim_statuses: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    shutdown_warnings: Counter[str] = field(default_factory=Counter)
    #: seconds after the window's end until its last planned fire had run
    drained_s: float = 0.0
    exit_codes: list[int | None] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.nodes == 0:
            return "baseline: 1 daemon, JSON-file store"
        text = f"cluster: {self.nodes} node{'s' if self.nodes > 1 else ''}"
        return text if self.claim_delay else text + ", `claim_delay_per_run: 0`"

    @property
    def key(self) -> tuple[int, bool]:
        return (self.nodes, not self.claim_delay)

    @property
    def rate(self) -> float:
        return self.completed / self.window_s

    @property
    def cpu_per_run(self) -> float:
        return self.cpu_s / self.completed if self.completed else float("nan")

    @property
    def pg_per_run(self) -> float:
        if self.pg_cpu_s is None or not self.completed:
            return float("nan")
        return self.pg_cpu_s / self.completed

    @property
    def claim_rtt(self) -> float:
        return self.claim_sum / self.claim_count if self.claim_count else float("nan")


def fleet_agents(n: int) -> list[dict[str, Any]]:
    return [
        {
            "name": f"a{i:03d}",
            "run": "cluster_agents:tick",
            "schedule": "every 1s",
            "params": {"work": 0},
        }
        for i in range(n)
    ]


def run_fleet(nodes: int, agents: int, window: float, *, claim_delay: bool = True) -> FleetRound:
    """Start the configuration, measure one window, stop it; the numbers."""
    result = FleetRound(nodes=nodes, window_s=window, claim_delay=claim_delay)
    tag = f"bench{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp, fresh_schema() as schema:
        root = Path(tmp)
        config = write_config(
            root / "fleet.yaml", fleet_agents(agents), clustered=nodes > 0, claim_delay=claim_delay
        )
        if nodes:
            envs = [node_env(root, schema, f"{tag}-n{i + 1}") for i in range(nodes)]
        else:
            envs = [{"AGENT_SUPERVISOR_STATE_DIR": str(root / "state")}]
        daemons = [start_daemon(config, env) for env in envs]
        try:
            for d in daemons:
                d.ready(60)
            t0 = math.floor(time.time() + WARMUP_S) + 0.5
            t1 = t0 + window
            sleep_until(t0)
            cpu0 = [cpu_ticks(d.proc.pid) for d in daemons]
            busy0, me0 = machine_busy_ticks(), self_ticks()
            pg0 = {pid: cpu_ticks(pid) for pid in pg_backends(tag)} if nodes else {}
            sleep_until(t1)
            cpu1 = [cpu_ticks(d.proc.pid) for d in daemons]
            busy1, me1 = machine_busy_ticks(), self_ticks()
            pg1 = {pid: cpu_ticks(pid) for pid in pg_backends(tag)} if nodes else {}
            result.drained_s = _drain(daemons, agents, t0, t1)
            if nodes:
                for d in daemons:
                    samples = d.samples()
                    for (name, labels), value in samples.items():
                        if name == "agent_supervisor_cluster_claim_seconds_sum":
                            result.claim_sum += value
                        elif name == "agent_supervisor_cluster_claim_seconds_count":
                            result.claim_count += value
                        elif name == "agent_supervisor_cluster_claims_total":
                            result.claim_results[dict(labels)["result"]] += int(value)
        finally:
            stop_at = time.time()
            result.exit_codes = stop_daemons(daemons)
        if any(c is None for c in cpu0 + cpu1):
            raise RuntimeError("a daemon exited during the window")
        result.cpu_s = sum(b - a for a, b in zip(cpu0, cpu1, strict=True)) / CLK_TCK  # type: ignore[operator]
        if nodes:
            result.pg_cpu_s = (
                sum((v or 0) - (pg0.get(pid) or 0) for pid, v in pg1.items()) / CLK_TCK
            )
        others = (busy1 - busy0) - (me1 - me0) - result.cpu_s * CLK_TCK
        others -= (result.pg_cpu_s or 0.0) * CLK_TCK
        result.other_cores = others / CLK_TCK / window
        _count_lines(result, daemons, agents, t0, t1, stop_at)
        if nodes:
            rows = sql(
                schema,
                "SELECT node, status, coalesce(outcome, ''), count(*) FROM {s}.fire_claims "
                "WHERE planned_at > to_timestamp(%s) AND planned_at < to_timestamp(%s) "
                "GROUP BY 1, 2, 3",
                (t0, t1),
            )
            for node, status, outcome, n in rows:
                result.claim_statuses[f"{status}/{outcome}"] += n
                if status == "done" and outcome == "success":
                    result.won[node.removeprefix(f"{tag}-")] += n
    return result


def _planned(t0: float, t1: float) -> list[int]:
    """The whole seconds (the ticks of ``every 1s``) strictly inside the window."""
    return [s for s in range(math.ceil(t0), math.floor(t1) + 1) if t0 < s < t1]


def _drain(daemons: Sequence[Daemon], agents: int, t0: float, t1: float) -> float:
    """Wait (at least TAIL_S, at most DRAIN_S) until every planned fire of the window ran
    successfully; the seconds from the window's end until it had (0.25 s steps; NaN: never)."""
    want = agents * len(_planned(t0, t1))
    drained = float("nan")
    while True:
        time.sleep(0.25)
        now = time.time()
        done = set()
        for d in daemons:
            for line in list(d.lines):
                if line.get("event") == "run.finished" and line.get("outcome") == "success":
                    at = datetime.fromisoformat(line["planned_at"]).timestamp()
                    if t0 < at < t1:
                        done.add((line["agent"], round(at)))
        if len(done) >= want and math.isnan(drained):
            drained = now - t1
        if not math.isnan(drained) and now >= t1 + TAIL_S:
            return drained
        if now > t1 + DRAIN_S:
            return drained


def _count_lines(
    result: FleetRound,
    daemons: Sequence[Daemon],
    agents: int,
    t0: float,
    t1: float,
    stop_at: float,
) -> None:
    planned_window = _planned(t0, t1)
    result.expected = agents * len(planned_window)
    found: Counter[tuple[str, int]] = Counter()
    for d in daemons:
        for line in list(d.lines):
            event = line.get("event")
            if event == "run.finished":
                planned = line.get("planned_at")
                at = datetime.fromisoformat(planned).timestamp() if planned else None
                in_plan = at is not None and t0 < at < t1
                if line.get("outcome") == "success":
                    if t0 <= ts(line) < t1:
                        result.completed += 1
                    if in_plan:
                        assert at is not None
                        found[(line["agent"], round(at))] += 1
                        result.lags.append(float(line["lag_s"]))
                elif in_plan:
                    result.not_success[str(line.get("outcome"))] += 1
            elif event == "run.skipped":
                if t0 <= ts(line) < t1:
                    result.skipped[str(line.get("outcome"))] += 1
            elif line.get("level") in ("warning", "error", "critical"):
                late = ts(line) >= stop_at
                (result.shutdown_warnings if late else result.warnings)[str(event)[:100]] += 1
    names = [a["name"] for a in fleet_agents(agents)]
    result.lost = sum(1 for a in names for s in planned_window if (a, s) not in found)
    result.duplicates = sum(n - 1 for n in found.values() if n > 1)


# -- 2. takeover after SIGKILL ---------------------------------------------------------------------


@dataclass
class Kill:
    kill: int
    victim: str
    agent: str
    lease_left_s: float
    detected_s: float
    detected_by: str
    takeover_s: float
    finished_s: float
    restart_ready_s: float = float("nan")


def running_claims(schema: str) -> list[tuple[str, str, datetime, float]]:
    """(node, agent, planned_at, lease left in s) of runs claimed at least 0.2 s ago
    (0.2 s: the run has started, not only been claimed)."""
    rows = sql(
        schema,
        "SELECT node, agent, planned_at, extract(epoch FROM lease_until - now()) "
        "FROM {s}.fire_claims WHERE status = 'running' "
        "AND claimed_at < now() - interval '0.2 seconds'",
    )
    return [(r[0], r[1], r[2], float(r[3])) for r in rows]


def find_line(
    daemons: Sequence[Daemon], timeout: float, **match: Any
) -> tuple[dict[str, Any], Daemon]:
    deadline = time.monotonic() + timeout
    while True:
        for d in daemons:
            for line in list(d.lines):
                if all(line.get(k) == v for k, v in match.items()):
                    return line, d
        if time.monotonic() > deadline:
            raise RuntimeError(f"no log line {match} within {timeout} s")
        time.sleep(0.05)


def run_takeovers(kills: int) -> tuple[list[Kill], dict[str, Any]]:
    tag = f"bench{uuid.uuid4().hex[:6]}"
    out: list[Kill] = []
    facts: dict[str, Any] = {}
    agents = [
        {
            "name": f"w{i}",
            "run": "cluster_agents:tick",
            "schedule": f"every {TAKEOVER_EVERY_S}s",
            "params": {"work": TAKEOVER_WORK_S},
        }
        for i in range(TAKEOVER_AGENTS)
    ]
    with tempfile.TemporaryDirectory(prefix="bench-takeover-") as tmp, fresh_schema() as schema:
        root = Path(tmp)
        config = write_config(root / "takeover.yaml", agents, clustered=True)
        names = [f"{tag}-n{i + 1}" for i in range(3)]
        nodes = {n: start_daemon(config, node_env(root, schema, n)) for n in names}
        every: list[Daemon] = list(nodes.values())
        killed: Counter[str] = Counter()
        rng = random.Random(7)
        try:
            for d in nodes.values():
                d.ready(60)
            # a few undisturbed ticks first: how the 3 nodes split a small tick's fires
            calm_from = time.time()
            time.sleep(CALM_TICKS * TAKEOVER_EVERY_S + TAKEOVER_WORK_S + 0.5)
            calm_to = time.time() - TAKEOVER_WORK_S - 0.5
            while len({x.kill for x in out}) < kills:
                k = len({x.kill for x in out})
                victim, claims = _pick_victim(schema, nodes, killed)
                # land anywhere in the lease's renewal cycle (renewed every lease/3)
                time.sleep(rng.uniform(0, LEASE_S / 3))
                claims = [c for c in running_claims(schema) if c[0] == victim]
                if not claims:
                    continue  # finished meanwhile: pick again
                d = nodes[victim]
                d.proc.send_signal(signal.SIGKILL)
                killed_at = time.time()
                d.wait(10)
                killed[victim] += 1
                survivors = [nodes[n] for n in names if n != victim]
                for _, agent, planned_at, lease_left in claims:
                    planned = planned_at.isoformat()
                    found, by = find_line(
                        survivors,
                        LEASE_S + CHECK_S + 15,
                        event="cluster.claim_abandoned",
                        agent=agent,
                        planned_at=planned,
                    )
                    taken, _ = find_line(
                        survivors, 15, event="cluster.takeover", agent=agent, planned_at=planned
                    )
                    done, _ = find_line(
                        survivors,
                        TAKEOVER_WORK_S + 15,
                        event="run.finished",
                        agent=agent,
                        planned_at=planned,
                        trigger="takeover",
                    )
                    out.append(
                        Kill(
                            kill=k + 1,
                            victim=victim.removeprefix(f"{tag}-"),
                            agent=agent,
                            lease_left_s=lease_left,
                            detected_s=ts(found) - killed_at,
                            detected_by=next(
                                n.removeprefix(f"{tag}-") for n in names if nodes[n] is by
                            ),
                            takeover_s=ts(taken) - killed_at,
                            finished_s=ts(done) - killed_at - TAKEOVER_WORK_S,
                        )
                    )
                # systemd would restart it: the same name, the same state dir
                restarted = time.monotonic()
                nodes[victim] = start_daemon(config, node_env(root, schema, victim))
                every.append(nodes[victim])
                nodes[victim].ready(60)
                for kill in out[len(out) - len(claims) :]:
                    kill.restart_ready_s = time.monotonic() - restarted
                log(
                    f"kill {k + 1}/{kills}: {victim} with {len(claims)} running claim(s), "
                    + ", ".join(f"detected {x.detected_s:.2f}s" for x in out[-len(claims) :])
                )
        finally:
            codes = stop_daemons(list(nodes.values()))
            for d in every:
                d.stop()
        facts["exit_codes"] = codes
        rows = sql(
            schema,
            "SELECT status, coalesce(outcome, ''), attempt, count(*) FROM {s}.fire_claims "
            "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        )
        facts["claims"] = {f"{s}/{o}/{a}": n for s, o, a, n in rows}
        rows = sql(
            schema, "SELECT agent, planned_at, status, outcome, attempt FROM {s}.fire_claims"
        )
        fires = {(a, p): (st, o, att) for a, p, st, o, att in rows}
        taken = [(a, p) for (a, p), (_, _, att) in fires.items() if att > 1]
        step = timedelta(seconds=TAKEOVER_EVERY_S)
        facts["taken_over"] = len(taken)
        facts["next_skipped"] = sum(
            1 for a, p in taken if fires.get((a, p + step), ("",))[0] == "skipped"
        )
        # who won each undisturbed tick's fires
        rows = sql(
            schema,
            "SELECT planned_at, node "
            "FROM {s}.fire_claims WHERE status <> 'skipped' "
            "AND planned_at > to_timestamp(%s) AND planned_at < to_timestamp(%s)",
            (calm_from, calm_to),
        )
        ticks: dict[datetime, Counter[str]] = defaultdict(Counter)
        for planned_at, node in rows:
            ticks[planned_at][node.removeprefix(f"{tag}-")] += 1
        full = [t for t in ticks.values() if sum(t.values()) == TAKEOVER_AGENTS]
        facts["ticks"] = len(full)
        facts["ticks_one_node"] = sum(1 for t in full if len(t) == 1)
        facts["tick_max_share"] = [max(t.values()) for t in full]
        facts["tick_wins"] = dict(sum((Counter(t) for t in full), Counter()))
        lines = [line for d in every for line in d.lines]
        facts["lease_lost"] = sum(
            1
            for line in lines
            if line.get("event") == "run.finished" and line.get("outcome") == "lease_lost"
        )
        facts["overlap_skips"] = sum(
            1
            for line in lines
            if line.get("event") == "run.skipped" and line.get("outcome") == "skipped_overlap"
        )
    return out, facts


def _pick_victim(
    schema: str, nodes: dict[str, Daemon], killed: Counter[str], timeout: float = 30.0
) -> tuple[str, list[tuple[str, str, datetime, float]]]:
    """A live node with a run claimed at least 0.2 s ago (the least killed first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        by_node: dict[str, list[tuple[str, str, datetime, float]]] = defaultdict(list)
        for claim in running_claims(schema):
            if claim[0] in nodes and nodes[claim[0]].proc.poll() is None:
                by_node[claim[0]].append(claim)
        if by_node:
            victim = min(by_node, key=lambda n: (killed[n], -len(by_node[n]), n))
            return victim, by_node[victim]
        time.sleep(0.05)
    raise RuntimeError("no node was mid-run")


# -- report --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stat:
    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        v = [x for x in values if not math.isnan(x)]
        if not v:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        if len(v) > 5:  # p10-p90 when there are enough values, min-max otherwise
            return cls(statistics.median(v), quantile(v, 0.1), quantile(v, 0.9), len(v))
        return cls(statistics.median(v), min(v), max(v), len(v))

    def fmt(self, digits: int = 2, scale: float = 1.0, unit: str = "") -> str:
        if self.n == 0:
            return "–"
        m, lo, hi = (f"{x * scale:,.{digits}f}" for x in (self.median, self.lo, self.hi))
        return f"{m}{unit} ({lo}–{hi})" if self.n > 1 else f"{m}{unit}"


def spread_name(n: int) -> str:
    return "p10–p90" if n > 5 else "min–max"


Key = tuple[int, bool]


def section(
    rounds: list[list[FleetRound]],
    kills: list[Kill],
    facts: dict[str, Any],
    *,
    agents: int,
    window: float,
    mode: str,
    command: str,
    started: datetime,
    took_s: float,
    machine: dict[str, str],
    pg: dict[str, str],
    load_end: str,
) -> str:
    n_rounds = len(rounds)
    by_key: dict[Key, list[FleetRound]] = defaultdict(list)
    for rnd in rounds:
        for r in rnd:
            by_key[r.key].append(r)
    keys = sorted(by_key)

    def per_round(key: Key, fn: Any) -> Stat:
        """``fn(this, baseline)`` within each round, over the rounds."""
        out = []
        for rnd in rounds:
            base = next(r for r in rnd if r.nodes == 0)
            this = next(r for r in rnd if r.key == key)
            out.append(fn(this, base))
        return Stat.of(out)

    versions = package_versions(["psycopg", "psycopg-pool"])
    lines = [
        HEADING,
        "",
        "Not produced by `python -m tests.bench` (which keeps this section); command:",
        "",
        "```sh",
        command,
        "```",
        "",
        f"- Run: {started:%Y-%m-%d %H:%M} UTC, mode `{mode}`, {took_s:.0f} s in all.",
        *(f"- {k}: {v}" for k, v in machine.items()),
        f"- loadavg at the end: {load_end}",
        f"- PostgreSQL {pg['version']} on the same machine (127.0.0.1, loopback TCP), "
        f"`synchronous_commit` {pg['synchronous_commit']}, `fsync` {pg['fsync']}, "
        f"`max_connections` {pg['max_connections']}; psycopg {versions['psycopg']}, "
        f"psycopg-pool {versions['psycopg-pool']}.",
        "",
        "Every node is the real `python -m supervisor run --config X` with the same config "
        "file, told apart by `AGENT_SUPERVISOR_CLUSTER__NODE` and its own "
        "`AGENT_SUPERVISOR_STATE_DIR`, on `AGENT_SUPERVISOR_STORE="
        "postgresql://…/test?schema=<fresh>` (a new schema per round, dropped after it). "
        "Cluster settings: `lease: 2s, check_interval: 0.5s, heartbeat_interval: 0.5s, "
        "node_ttl: 2s` (the end-to-end tests' values; the defaults are 30 s / 5 s / 5 s / "
        "30 s), `claim_delay_per_run` and `claim_delay_max` at their defaults (a node waits "
        "20 ms per run it has in flight before it claims, at most 0.5 s) except where a row "
        f"says otherwise, `max_concurrent_runs: {MAX_RUNS}` on every daemon, the baseline "
        "included (a node's pool holds up to that + 4 connections, and the server's "
        f"{pg['max_connections']} are shared with the test suites). Every node schedules every "
        "agent and tries to claim every fire (`INSERT … ON CONFLICT DO NOTHING`); the winner "
        "runs it and commits the agent's state and the claim's end in one fenced transaction.",
        "",
        "### Throughput and claim overhead",
        "",
        f"{agents} no-op agents (`cluster_agents:tick`, `work: 0`: one step, one state "
        f"counter) on `every 1s`: {agents} fires per second offered, all due on the same "
        f"tick. All nodes start together; the {window:.0f} s window starts "
        f"{WARMUP_S:.0f}–{WARMUP_S + 1:.0f} s after the last `daemon.ready`, half a second "
        "after a tick. **Baseline**: one daemon on the embedded JSON-file store (no `store:`, "
        "no `cluster:`), same fleet, same settings. The configurations interleave: "
        f"{n_rounds} round{'s' if n_rounds > 1 else ''}, each running all {len(keys)} in "
        "turn (rotated). Median "
        f"({spread_name(n_rounds)}) over the rounds; ratios and differences are taken within "
        "a round.",
        "",
        "- *completed/s*: successful `run.finished` lines logged in the window ÷ the window.",
        "- *lost*: planned fires of the window (each agent, each whole second) with no "
        "successful run on any node; *twice*: a planned fire with more than one successful "
        "run (each round's count, joined with +).",
        "- *lag*: `lag_s` of those runs (planned fire → run start; in a cluster that includes "
        "the wait for a global slot, the claim delay, the claim and the state read from "
        "PostgreSQL).",
        "- *CPU/run*: user + system CPU of all daemon processes over the window "
        "(`/proc/<pid>/stat`) ÷ completed runs; *claim overhead* = CPU/run of the cluster − "
        "CPU/run of the baseline in the same round. Every node's CPU counts: the losers' "
        "claims, heartbeats and lease checks included.",
        "- *PostgreSQL/run*: CPU of the server processes serving the nodes' connections "
        "(found in `pg_stat_activity` by `application_name`; WAL writer and checkpointer not "
        "counted) ÷ completed runs. Not part of CPU/run.",
        "- *claim time*: mean of the nodes' `agent_supervisor_cluster_claim_seconds` "
        "(sum ÷ count over all nodes, read at the end): every node's claim of every fire, won "
        "or lost, from after the claim delay to the answer, the wait for a pooled connection "
        "included.",
        "",
        "| configuration | completed/s | lost | twice | lag p50 | lag p99 | CPU/run "
        "| × baseline | claim overhead/run | PostgreSQL/run | claim time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        rs = by_key[key]
        rate = Stat.of([r.rate for r in rs]).fmt(1)
        lost = "+".join(str(r.lost) for r in rs)
        twice = "+".join(str(r.duplicates) for r in rs)
        p50 = Stat.of([quantile(r.lags, 0.5) for r in rs]).fmt(0, 1e3, " ms")
        p99 = Stat.of([quantile(r.lags, 0.99) for r in rs]).fmt(0, 1e3, " ms")
        cpu = Stat.of([r.cpu_per_run for r in rs]).fmt(2, 1e3, " ms")
        ratio = over = pgc = rtt = "–"
        if key[0]:
            ratio = per_round(key, lambda t, b: t.cpu_per_run / b.cpu_per_run).fmt(2, unit="×")
            over = per_round(key, lambda t, b: t.cpu_per_run - b.cpu_per_run).fmt(2, 1e3, " ms")
            pgc = Stat.of([r.pg_per_run for r in rs]).fmt(2, 1e3, " ms")
            rtt = Stat.of([r.claim_rtt for r in rs]).fmt(2, 1e3, " ms")
        lines.append(
            f"| {rs[0].label} | {rate} | {lost} | {twice} | {p50} | {p99} | {cpu} | {ratio} | "
            f"{over} | {pgc} | {rtt} |"
        )
    lines += [
        "",
        "All rounds together: the fires each node won (`fire_claims` rows of the window, done "
        "and successful), the claims the nodes tried by result (`cluster_claims_total` at the "
        "end, whole run), other outcomes in the window (log lines and claim rows), warning "
        "lines of the whole run and exit codes other than 0, "
        "how long after the window's end its last planned fire had run (each round; the "
        f"benchmark waits up to {DRAIN_S:.0f} s before counting the rest as lost), and the CPU load on the machine besides the daemons, their PostgreSQL backends and "
        "this benchmark (`/proc/stat`; the machine is shared).",
        "",
        "| configuration | won per node | claims tried | other outcomes, warnings | last fire "
        "of the window ran | other load |",
        "|---|---|---|---|---|---|",
    ]
    for key in keys:
        rs = by_key[key]
        won: Counter[str] = Counter()
        results: Counter[str] = Counter()
        other: Counter[str] = Counter()
        for r in rs:
            won.update(r.won)
            results.update(r.claim_results)
            other.update({f"run.finished {k}": v for k, v in r.not_success.items()})
            other.update({f"run.skipped {k}": v for k, v in r.skipped.items()})
            other.update({f"`{k}`": v for k, v in r.warnings.items()})
            other.update({f"`{k}` at shutdown": v for k, v in r.shutdown_warnings.items()})
            other.update(
                {f"claim {k}": v for k, v in r.claim_statuses.items() if k != "done/success"}
            )
            other.update(f"exit code {c}" for c in r.exit_codes if c != 0)
        total = sum(won.values())
        shares = ", ".join(f"{n} {v / total:.0%}" for n, v in sorted(won.items())) or "–"
        res = ", ".join(f"{k} {v:,}" for k, v in sorted(results.items()) if v) or "–"
        oth = ", ".join(f"{k} {v:,}" for k, v in sorted(other.items())) or "none"
        busy = Stat.of([r.other_cores for r in rs]).fmt(2, unit=" cores")
        drained = " / ".join(
            "never" if math.isnan(r.drained_s) else f"{r.drained_s:.2f} s" for r in rs
        )
        lines.append(f"| {rs[0].label} | {shares} | {res} | {oth} | {drained} | {busy} |")
    lines += ["", *_throughput_reading(by_key, per_round, agents), ""]
    lines += _takeover_section(kills, facts)
    return "\n".join(lines) + "\n"


def _throughput_reading(
    by_key: dict[Key, list[FleetRound]], per_round: Any, agents: int
) -> list[str]:
    def med(key: Key, fn: Any) -> float:
        return Stat.of([fn(r) for r in by_key.get(key, [])]).median

    def p50(r: FleetRound) -> float:
        return quantile(r.lags, 0.5)

    def cpu(r: FleetRound) -> float:
        return r.cpu_per_run

    base_key, one, two, three = (0, False), (1, False), (2, False), (3, False)
    one_nd, three_nd = (1, True), (3, True)
    lost = sum(r.lost for rs in by_key.values() for r in rs)
    twice = sum(r.duplicates for rs in by_key.values() for r in rs)
    slow = [rs[0].label for rs in by_key.values() if any(not r.drained_s <= 1.0 for r in rs)]
    kept = (
        f"Every configuration kept up with the {agents} fires/s offered (each window's last "
        "fires had run within a second of its end: no backlog)"
        if not slow
        else f"**Not every configuration kept up with the {agents} fires/s offered: "
        f"{'; '.join(slow)} still had fires of the window to run more than a second after "
        "it ended**"
    )
    fires = (
        "no fire was lost and none ran twice"
        if lost == 0 and twice == 0
        else f"**{lost} fire(s) lost and {twice} run twice** (see the table)"
    )
    ms = 1e3
    base = med(base_key, cpu)
    slope = (med(three, cpu) - med(one, cpu)) / 2
    pg3 = med(three, lambda r: r.pg_per_run)
    total3 = med(three, cpu) + pg3
    out = [
        f"**Reading.** {kept}, and {fires}.",
        "",
        f"- **CPU.** The baseline spends {base * ms:.2f} ms per run, its journal commit "
        f"included. On one cluster node a run costs {med(one, cpu) * ms:.2f} ms of the "
        "daemon's CPU (the claim, the state read from PostgreSQL, the fenced commit, the "
        "lease and heartbeat work), and every further node adds about "
        f"{slope * ms:.2f} ms per fire ({med(two, cpu) * ms:.2f} ms with 2 nodes, "
        f"{med(three, cpu) * ms:.2f} ms with 3): every node schedules every fire and tries "
        "to claim it (one `INSERT ... ON CONFLICT DO NOTHING`, won or lost). PostgreSQL adds "
        f"{med(one, lambda r: r.pg_per_run) * ms:.2f} ms per run at 1 node, {pg3 * ms:.2f} ms "
        f"at 3; all together a fire costs {total3 * ms:.2f} ms of CPU on a 3-node cluster, "
        f"{total3 / base:.1f}× the baseline. Nodes and database share the same 2 vCPUs "
        "here, so this is what the protocol costs, not what scaling out gains: on separate "
        "machines each node pays for every fire on its own CPU.",
    ]
    lag_base, lag_one, lag_one_nd = med(base_key, p50), med(one, p50), med(one_nd, p50)
    lag_three, lag_three_nd = med(three, p50), med(three_nd, p50)
    delay_cost = lag_one - lag_one_nd
    delay_text = (
        f"without the claim delay it is {lag_one_nd * ms:.0f} ms, so a lone node loses "
        f"about {delay_cost * ms:.0f} ms to waiting before its claims (for nobody: there is no "
        "other node to leave the fire to), and the claim delay also costs CPU here "
        f"({med(one, cpu) * ms:.2f} ms vs {med(one_nd, cpu) * ms:.2f} ms per run; not broken "
        "down by this benchmark)"
        if delay_cost > 0.02
        else f"without the claim delay it is {lag_one_nd * ms:.0f} ms (about the same)"
    )

    def p99(r: FleetRound) -> float:
        return quantile(r.lags, 0.99)

    def arrow(fn: Any, digits: int = 0) -> str:
        return " → ".join(f"{med(k, fn) * ms:.{digits}f}" for k in (one, two, three))

    grows = lag_three > 1.25 * lag_one
    out.append(
        f"- **Lag.** p50 goes from {lag_base * ms:.0f} ms on the baseline to "
        f"{lag_one * ms:.0f} ms on one node; {delay_text}. Most of the difference to the "
        "baseline is the run's way through the database while it holds one of the "
        f"{MAX_RUNS} global slots (claim, state read, fenced commit): the {agents} fires of a "
        "tick queue for those slots. "
        + (
            f"**Lag grows with nodes**: p50 {arrow(p50)} ms for 1 → 2 → 3 nodes (p99 "
            f"{arrow(p99)} ms), although each node runs only its share of the tick: every "
            "node still takes a global slot and sends a claim for every fire, won or lost, "
            "and all of them share the same 2 vCPUs"
            if grows
            else f"Lag does not grow with nodes: p50 {arrow(p50)} ms for 1 → 2 → 3 nodes (p99 "
            f"{arrow(p99)} ms)"
        )
        + f"; with 3 nodes and no claim delay p50 is {lag_three_nd * ms:.0f} ms."
    )
    out.append(
        f"- **Claim time**: {arrow(lambda r: r.claim_rtt, 1)} ms for 1 → 2 → 3 nodes, "
        f"{med(three_nd, lambda r: r.claim_rtt) * ms:.1f} ms with 3 nodes and no claim delay. "
        "It is the whole claim call: the wait for one of the node's pooled connections, "
        "then the one statement, won or lost; it is longest where a "
        "tick's claims go out with no delay between them, all at once."
    )
    shares = []
    for key in (two, three, three_nd):
        won: Counter[str] = Counter()
        for r in by_key.get(key, []):
            won.update(r.won)
        if won:
            top = max(won.values()) / sum(won.values())
            shares.append(f"{by_key[key][0].label} {top:.0%}")
    out.append(
        "- **Split.** The largest share of the fires one node won: "
        + ", ".join(shares)
        + " (an even split is 50% and 33%)."
    )
    return out


def _takeover_section(kills: list[Kill], facts: dict[str, Any]) -> list[str]:
    bound = LEASE_S + CHECK_S
    det = Stat.of([k.detected_s for k in kills])
    lines = [
        "### Takeover after SIGKILL",
        "",
        f"3 nodes, {TAKEOVER_AGENTS} agents `cluster_agents:tick` with `work: "
        f"{TAKEOVER_WORK_S:.0f}` (3 s per run) on `every {TAKEOVER_EVERY_S}s`, the settings "
        "above (lease 2 s, renewed every lease/3; lease check every 0.5 s on each node; "
        "takeover policy `rerun`, `max_takeovers: 1`). The benchmark finds a node with a claim "
        "`running` for at least 0.2 s (`fire_claims`), waits a random 0–0.67 s more (so the "
        "kill lands anywhere in the lease's renewal cycle), reads the lease left on each of "
        "that node's running claims and sends it SIGKILL. Times are from the kill to the log "
        "lines' `ts` on "
        "the survivors: the `cluster.claim_abandoned` line (*detection*), the "
        "`cluster.takeover` line (the rerun's claim, *takeover*), and the rerun's "
        "`run.finished` (`trigger: takeover`) less the agent's 3 s of work. After the "
        "takeover's run finished the killed node is restarted (same name, same state dir) and "
        f"waited for (`daemon.ready`) before the next kill. {len({k.kill for k in kills})} "
        f"kills, {len(kills)} claims taken over (every running claim of a killed node "
        f"counts); median ({spread_name(len(kills))}) and max.",
        "",
        "| from the SIGKILL to | median | max | bound |",
        "|---|---|---|---|",
    ]

    def row(label: str, values: list[float], bound_text: str) -> str:
        s = Stat.of(values)
        return f"| {label} | {s.fmt(2, unit=' s')} | {max(values, default=float('nan')):.2f} s | {bound_text} |"

    lines += [
        row(
            "(lease left on the claim at the kill, from the database)",
            [k.lease_left_s for k in kills],
            f"between {LEASE_S * 2 / 3:.2f} and {LEASE_S:.2f} s",
        ),
        row(
            "detection: `cluster.claim_abandoned` on a survivor",
            [k.detected_s for k in kills],
            f"lease + check_interval = {bound:.1f} s",
        ),
        row(
            "takeover: `cluster.takeover` (the rerun claimed)",
            [k.takeover_s for k in kills],
            f"{bound:.1f} s",
        ),
        row(
            "the rerun's `run.finished` − 3 s of work",
            [k.finished_s for k in kills],
            "–",
        ),
        row(
            "(detection − lease left: waiting for the next lease check)",
            [k.detected_s - k.lease_left_s for k in kills],
            f"check_interval = {CHECK_S:.1f} s",
        ),
        row(
            "(restart of the killed node → its `daemon.ready`)",
            [k.restart_ready_s for k in kills],
            "– (its old heartbeat is past node_ttl by then: no wait)",
        ),
    ]
    over = [k for k in kills if k.detected_s > bound]
    lines += [
        "",
        "| kill | node | agent | lease left | detected | by | takeover | finished − 3 s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {k.kill} | {k.victim} | {k.agent} | {k.lease_left_s:.2f} s | {k.detected_s:.2f} s "
        f"| {k.detected_by} | {k.takeover_s:.2f} s | {k.finished_s:.2f} s |"
        for k in kills
    ]
    claims = ", ".join(f"{k} {v}" for k, v in facts.get("claims", {}).items())
    lines += [
        "",
        f"**Reading.** Detection took {det.median:.2f} s (median), at most "
        f"{max(k.detected_s for k in kills):.2f} s, against the bound lease + check_interval "
        f"= {bound:.1f} s: "
        + (
            "within it every time."
            if not over
            else f"**over it {len(over)} time(s)** (the log line's latency is in it too)."
        )
        + " A killed node's lease still has between 2/3 of the lease and all of it to run "
        "(it is renewed every lease/3), and the next lease check on a survivor comes up to "
        "one check interval later: detection is that wait, not a timeout of its own. The "
        "rerun is claimed "
        f"{Stat.of([k.takeover_s - k.detected_s for k in kills]).median * 1e3:.0f} ms after "
        "the detection (median) and ends "
        f"{Stat.of([k.finished_s - k.takeover_s for k in kills]).median * 1e3:.0f} ms after its "
        "3 s of work.",
        "",
        f"`fire_claims` at the end (status/outcome/attempt: rows): {claims}. Runs that ended "
        f"`lease_lost`: {facts.get('lease_lost', 0)}. Of the {facts.get('taken_over', 0)} "
        f"fires taken over, {facts.get('next_skipped', 0)} cost the agent its next fire: 5 s "
        "after the killed fire the rerun (started about 2 s late, working 3 s) still held the "
        "agent's one run slot, so the next fire was claimed as `skipped_overlap` "
        f"({facts.get('overlap_skips', 0)} such skips in all). Exit codes of the nodes at the "
        f"end: {facts.get('exit_codes')}.",
        "",
        *_tick_split(facts),
    ]
    return lines


def _tick_split(facts: dict[str, Any]) -> list[str]:
    """Who won the fires of each tick of the takeover fleet."""
    n = facts.get("ticks", 0)
    if not n:
        return []
    one = facts["ticks_one_node"]
    shares = Counter(facts["tick_max_share"])
    wins = ", ".join(f"{k} {v}" for k, v in sorted(facts["tick_wins"].items()))
    dist = ", ".join(f"{k} of {TAKEOVER_AGENTS}: {v}" for k, v in sorted(shares.items()))
    return [
        f"**How a small tick splits.** Before the first kill the 3 nodes ran {n} ticks "
        f"undisturbed; {one} of them were won entirely by one node (the most fires one node "
        f"won in a tick: {dist}; fires won per node: {wins}). Every claim waits a random part of "
        "one claim-delay step (plus a step per run in flight), so between idle nodes each "
        "fire is a race of its own; without it, the node whose claims reach the database "
        "first wins the whole tick.",
        "",
    ]


def write(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else "# Performance\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    doc = pattern.sub(text + "\n", doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + text
    DOC.write_text(doc.rstrip() + "\n")


# -- main ----------------------------------------------------------------------------------------


def _on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 round, 8 s windows, 2 kills")
    parser.add_argument("--write", action="store_true", help="write the section into the doc")
    parser.add_argument("--agents", type=int, default=AGENTS)
    parser.add_argument("--window", type=float, help="seconds per window (20; 8 with --quick)")
    parser.add_argument("--rounds", type=int, help="rounds (3; 1 with --quick)")
    parser.add_argument("--kills", type=int, help="SIGKILLs (5; 2 with --quick)")
    parser.add_argument("--raw", type=Path, help="also save the measurements (pickle) here")
    parser.add_argument(
        "--render", type=Path, help="measure nothing: render the section from a --raw file"
    )
    args = parser.parse_args()
    if args.render is not None:
        text = section(**pickle.loads(args.render.read_bytes()))
        print(text)
        if args.write:
            write(text)
        return
    window = args.window or (8.0 if args.quick else 20.0)
    n_rounds = args.rounds or (1 if args.quick else 3)
    n_kills = args.kills or (2 if args.quick else 5)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    command = ".venv/bin/python -m tests.bench.bench_cluster" + (" --quick" if args.quick else "")
    if args.agents != AGENTS or args.window or args.rounds or args.kills:
        command += " " + " ".join(
            f"--{k} {v:g}" if isinstance(v, float) else f"--{k} {v}"
            for k, v in (
                ("agents", args.agents if args.agents != AGENTS else None),
                ("window", args.window),
                ("rounds", args.rounds),
                ("kills", args.kills),
            )
            if v is not None
        )
    command += " --write"

    try:
        version, sync, fsync, maxconn = (
            sql(None, f"SHOW {name}")[0][0]
            for name in ("server_version", "synchronous_commit", "fsync", "max_connections")
        )
    except Exception as exc:
        raise SystemExit(f"PostgreSQL at {PG_URL} is not usable: {exc}") from exc
    pg = {
        "version": version.split()[0],
        "synchronous_commit": sync,
        "fsync": fsync,
        "max_connections": maxconn,
    }
    machine = machine_facts()
    started = datetime.now(UTC)
    t_start = time.monotonic()
    configs = [(0, True), (1, True), (2, True), (3, True), (1, False), (3, False)]
    rounds: list[list[FleetRound]] = []
    try:
        for r in range(n_rounds):
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            rnd = []
            for nodes, delay in order:
                res = run_fleet(nodes, args.agents, window, claim_delay=delay)
                log(
                    f"round {r + 1}/{n_rounds} {res.label}: {res.rate:.1f}/s, lost {res.lost}, "
                    f"twice {res.duplicates}, lag p50 {quantile(res.lags, 0.5) * 1e3:.0f} ms "
                    f"p99 {quantile(res.lags, 0.99) * 1e3:.0f} ms, CPU/run "
                    f"{res.cpu_per_run * 1e3:.2f} ms, PG/run {res.pg_per_run * 1e3:.2f} ms, "
                    f"claim rtt {res.claim_rtt * 1e3:.2f} ms, won {dict(res.won)}, "
                    f"others {res.other_cores:.2f} cores, exit {res.exit_codes}"
                )
                rnd.append(res)
            rounds.append(rnd)
        kills, facts = run_takeovers(n_kills)
    finally:
        kill_everything()
    data = {
        "rounds": rounds,
        "kills": kills,
        "facts": facts,
        "agents": args.agents,
        "window": window,
        "mode": "quick" if args.quick else "full",
        "command": command,
        "started": started,
        "took_s": time.monotonic() - t_start,
        "machine": machine,
        "pg": pg,
        "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    if args.raw is not None:
        args.raw.write_bytes(pickle.dumps(data))
    text = section(**data)
    print(text)
    if args.write:
        write(text)


if __name__ == "__main__":
    main()
