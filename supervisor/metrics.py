"""Every Prometheus metric of the supervisor, held by one ``Metrics`` object.

Callers never touch prometheus objects: they call ``observe_run``, ``record_skip``,
``run_started`` and friends, and the HTTP server calls ``render``. ``METRIC_DOCS`` (and
``describe()``) lists every family with its type, labels and help, so the metrics reference
in ``docs/`` can be generated from this module and cannot drift from it.

Cost is the design constraint: a scrape of 1,000 agents must take under 100 ms and stay under
1 MiB. Measured while designing this, with prometheus-client 0.26: per-agent histograms made
one scrape 1.3 s and 8.9 MiB; global histograms with plain per-agent metric objects still took
110 ms (0.84 MiB), nearly all of it in ``generate_latest`` formatting ~13,000 per-agent samples
one at a time. So (``tests/bench/bench_scrape.py`` measures the result):

- histograms carry no ``agent`` label (``outcome`` at most) and a modest bucket set;
- per agent there are only cheap series (counters, gauges, a sum/count pair), kept as plain
  numbers in ``_AgentTable``, which writes their exposition text itself (~8 ms) and also
  acts as a prometheus ``Collector`` so ``registry.get_sample_value`` and any other exporter
  still see them;
- the ``_created`` series are disabled (they would double the per-family line count).

Skipped fires (overlap, paused, circuit open) count in ``runs_total`` under their own outcome
and their schedule lag is observed (it measures the scheduler, not the agent), but they touch
no duration, step or attempt series and do not move ``last_run_timestamp_seconds``: the
agent's code never ran.
"""

from __future__ import annotations

import math
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal, NamedTuple

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from supervisor.outcome import Outcome, RunRecord

#: The classic text format: every Prometheus version parses it, and our names need no escaping.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0)
STEPS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)

StateOp = Literal["load", "commit"]
MetricType = Literal["counter", "gauge", "histogram", "summary"]


class CircuitCode(IntEnum):
    """The value of ``agent_supervisor_circuit_state``."""

    #: runs are admitted
    CLOSED = 0
    #: the cool-down is over; one trial run is let through
    HALF_OPEN = 1
    #: runs are skipped until the cool-down ends
    OPEN = 2


@dataclass(frozen=True, slots=True)
class MetricDoc:
    """One metric family as exposed: the source of its help text and of the reference doc."""

    name: str
    type: MetricType
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()


_P = "agent_supervisor_"
CLAIM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
LLM_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

METRIC_DOCS: tuple[MetricDoc, ...] = (
    MetricDoc(_P + "runs_total", "counter", ("agent", "outcome"),
              "Fires of an agent, by outcome (skipped fires included)."),
    MetricDoc(_P + "run_duration_seconds", "histogram", ("outcome",),
              "Wall time of runs whose code ran, all agents together.", DURATION_BUCKETS),
    MetricDoc(_P + "agent_run_duration_seconds", "summary", ("agent",),
              "Wall time of an agent's runs (sum and count; no quantiles)."),
    MetricDoc(_P + "run_steps", "histogram", (),
              "Steps taken per run, all agents together.", STEPS_BUCKETS),
    MetricDoc(_P + "run_attempts_total", "counter", ("agent",),
              "Attempts of an agent's runs, retries included."),
    MetricDoc(_P + "retries_total", "counter", ("agent",),
              "Run-level retries of an agent."),
    MetricDoc(_P + "runs_in_flight", "gauge", (),
              "Runs in progress, all agents together."),
    MetricDoc(_P + "agent_running", "gauge", ("agent",),
              "1 while the agent has a run in progress, else 0."),
    MetricDoc(_P + "last_success_timestamp_seconds", "gauge", ("agent",),
              "Unix time the agent's last successful run finished; absent until one is known."),
    MetricDoc(_P + "last_run_timestamp_seconds", "gauge", ("agent",),
              "Unix time the agent's last run finished, any outcome; absent until one is known."),
    MetricDoc(_P + "schedule_lag_seconds", "histogram", (),
              "Delay from a fire's planned time to the start of its run (after any wait for a "
              "global slot), or to its skip.",
              LAG_BUCKETS),
    MetricDoc(_P + "agent_expected_interval_seconds", "gauge", ("agent",),
              "Seconds between two scheduled fires of the agent: alert when "
              "time() - last_success_timestamp_seconds exceeds twice this."),
    MetricDoc(_P + "circuit_state", "gauge", ("agent",),
              "The agent's circuit breaker: 0 closed, 1 half-open, 2 open."),
    MetricDoc(_P + "state_errors_total", "counter", ("agent", "op"),
              "Failed state store operations of an agent, by op (load or commit)."),
    MetricDoc(_P + "config_reloads_total", "counter", ("result",),
              "Config reloads, by result (success or failure); the startup load is not one."),
    MetricDoc(_P + "config_last_reload_success", "gauge", (),
              "1 if the last config load or reload was applied, 0 if it was rejected."),
    MetricDoc(_P + "config_last_reload_timestamp_seconds", "gauge", (),
              "Unix time of the last config load or reload attempt, whatever its result."),
    MetricDoc(_P + "agents", "gauge", ("state",),
              "Agents in the running config, by state (configured, enabled, paused)."),
    MetricDoc(_P + "build_info", "gauge", ("version", "python"),
              "Always 1; the labels say which build is running."),
    MetricDoc(_P + "start_time_seconds", "gauge", (),
              "Unix time the supervisor started."),
    MetricDoc(_P + "loop_detections_total", "counter", ("agent", "detector", "action"),
              "Loop and stall detections, by detector (repeat, no_progress, stall) and action "
              "(stopped: the run ended; warned: warn-only, the run went on)."),
    MetricDoc(_P + "effects_total", "counter", ("agent", "kind", "event"),
              "Side effects by what happened: executed, duplicate_prevented, held_unknown, "
              "approval_requested, approved, rejected, expired, rolled_back, and more (see "
              "docs/effects.md)."),
    MetricDoc(_P + "effect_refusals_total", "counter", ("agent", "kind", "reason"),
              "Side effects refused or rejected, by reason (not_allowed, invalid_params, "
              "rate_limited, params_changed, rejected, approval_expired, output_invalid, ...)."),
    MetricDoc(_P + "effect_approvals_pending", "gauge", (),
              "Approval requests waiting for a human."),
    MetricDoc(_P + "effect_approval_oldest_pending_seconds", "gauge", (),
              "Age of the oldest approval request still waiting; 0 when none waits."),
    MetricDoc(_P + "effects_unknown", "gauge", (),
              "Effects whose outcome is unknown (interrupted mid-call) and held for a human."),
    MetricDoc(_P + "untrusted_flags_total", "counter", ("agent", "flag"),
              "Injection-like phrasing found by ctx.untrusted(), by flag."),
    MetricDoc(_P + "http_requests_total", "counter", ("agent", "code"),
              "Requests sent by ctx.http, by status class (2xx, 3xx, 4xx, 5xx)."),
    MetricDoc(_P + "http_refused_total", "counter", ("agent",),
              "ctx.http requests refused before any connection: host not in http.allow_hosts."),
    MetricDoc(_P + "llm_requests_total", "counter", ("agent", "provider", "model", "status"),
              "LLM call attempts, by status (ok, cache_hit, http_<code>, timeout, connection, "
              "malformed)."),
    MetricDoc(_P + "llm_request_duration_seconds", "histogram", ("provider", "model"),
              "Latency of LLM call attempts that reached the provider.", LLM_LATENCY_BUCKETS),
    MetricDoc(_P + "llm_tokens_total", "counter", ("agent", "provider", "model", "kind"),
              "Tokens reported by providers, by kind (input, output, cached_input, reasoning)."),
    MetricDoc(_P + "llm_cost_usd_total", "counter", ("agent", "provider", "model"),
              "Settled LLM spend in US dollars (the worst case where usage was missing)."),
    MetricDoc(_P + "llm_retries_total", "counter", ("provider", "model"),
              "Call-level retries of transient provider errors."),
    MetricDoc(_P + "llm_answers_total", "counter", ("agent", "alias", "tier"),
              "Answers of ctx.llm.complete by the tier that gave them: 0 is the alias's first "
              "model, 1.. the fallbacks, rule_based and raw the degraded answers."),
    MetricDoc(_P + "llm_refused_total", "counter", ("agent", "reason"),
              "LLM calls or tiers refused before any traffic, by reason (budget, unpriced, "
              "circuit_open, rate_limited, retry_after, context, alias_not_allowed, "
              "unknown_alias)."),
    MetricDoc(_P + "llm_circuit_state", "gauge", ("provider", "model"),
              "Circuit breaker per provider/model: 0 closed, 1 half-open, 2 open."),
    MetricDoc(_P + "llm_cache_requests_total", "counter", ("result",),
              "Response cache lookups, by result (hit, miss)."),
    MetricDoc(_P + "llm_budget_spent_usd", "gauge", ("window",),
              "Spend (settled plus reserved) in the current global window (global_hour, "
              "global_day)."),
    MetricDoc(_P + "llm_budget_limit_usd", "gauge", ("window",),
              "The configured USD limit of a global window; absent when unlimited."),
    MetricDoc(_P + "llm_budget_spent_tokens", "gauge", ("window",),
              "Tokens (settled plus reserved) in the current global window."),
    MetricDoc(_P + "llm_budget_limit_tokens", "gauge", ("window",),
              "The configured token limit of a global window; absent when unlimited."),
    MetricDoc(_P + "llm_agent_spent_today_usd", "gauge", ("agent",),
              "An agent's LLM spend (settled plus reserved) in the current UTC day."),
    MetricDoc(_P + "llm_agent_budget_limit_usd", "gauge", ("agent",),
              "An agent's daily USD limit; absent when unlimited."),
    # Cluster mode only (``store: postgresql://``): absent on a single node.
    MetricDoc(_P + "cluster_node_info", "gauge", ("node", "config_hash"),
              "1 for this node, named as in the cluster, with its fleet digest."),
    MetricDoc(_P + "cluster_claims_total", "counter", ("result",),
              "Fires this node tried to claim, by result: won, elsewhere (another node won), "
              "overlap (every run slot of the agent was busy), failed (database error)."),
    MetricDoc(_P + "cluster_claim_seconds", "histogram", (),
              "Round trip of one fire claim to the database.", CLAIM_BUCKETS),
    MetricDoc(_P + "cluster_abandoned_total", "counter", (),
              "Claims whose lease ran out (dead, paused or cut-off node) found by this node."),
    MetricDoc(_P + "cluster_takeovers_total", "counter", (),
              "Abandoned fires this node took over and ran again (takeover: rerun)."),
    MetricDoc(_P + "cluster_lease_lost_total", "counter", (),
              "Runs on this node that lost their lease: stopped, results not committed."),
    MetricDoc(_P + "cluster_errors_total", "counter", ("op",),
              "Database errors of the cluster protocol, by operation (heartbeat, check)."),
    MetricDoc(_P + "cluster_live_nodes", "gauge", (),
              "Nodes with a fresh heartbeat, this one included."),
    MetricDoc(_P + "cluster_config_mismatch_nodes", "gauge", (),
              "Live nodes whose fleet digest differs from this node's (must be 0)."),
)  # fmt: skip

_DOCS = {d.name: d for d in METRIC_DOCS}


def describe() -> list[MetricDoc]:
    """Every metric family the supervisor exposes, in the order the reference lists them."""
    return list(METRIC_DOCS)


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _num(value: float) -> str:
    # repr() is what Prometheus parses and far cheaper than prometheus-client's
    # floatToGoString; only inf and nan are spelled differently. Rounding to the
    # millisecond (all a duration sum or a timestamp carries) saves ~25 kB per 1,000 agents.
    if math.isfinite(value):
        return repr(round(value, 3))
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


class _Row(NamedTuple):
    """One agent's numbers as a scrape saw them: copied under the lock, rendered outside it."""

    agent: str
    label: str
    runs: tuple[tuple[str, int], ...]
    duration_sum: float
    duration_count: int
    attempts: int
    retries: int
    running: int
    last_success: float | None
    last_run: float | None
    circuit: int
    load_errors: int
    commit_errors: int
    expected_interval: float | None


class _AgentSeries:
    """The live per-agent numbers, mutated under ``_AgentTable.lock``."""

    __slots__ = (
        "agent",
        "attempts",
        "circuit",
        "commit_errors",
        "duration_count",
        "duration_sum",
        "expected_interval",
        "label",
        "last_run",
        "last_success",
        "load_errors",
        "retired",
        "retries",
        "runs",
    )

    def __init__(self, agent: str) -> None:
        self.agent = agent
        #: the label set's opening, escaped once: ``{agent="name"``
        self.label = '{agent="' + _escape(agent) + '"'
        # success and failure exist from the start so the first failure shows in rate()
        self.runs: dict[str, int] = {Outcome.SUCCESS.value: 0, Outcome.FAILURE.value: 0}
        self.duration_sum = 0.0
        self.duration_count = 0
        self.attempts = 0
        self.retries = 0
        self.circuit = 0
        self.load_errors = 0
        self.commit_errors = 0
        self.last_success: float | None = None
        self.last_run: float | None = None
        self.expected_interval: float | None = None
        #: forgotten while a run was in flight: dropped when that run ends
        self.retired = False

    def row(self, running: bool) -> _Row:
        return _Row(
            self.agent,
            self.label,
            tuple(self.runs.items()),
            self.duration_sum,
            self.duration_count,
            self.attempts,
            self.retries,
            1 if running else 0,
            self.last_success,
            self.last_run,
            self.circuit,
            self.load_errors,
            self.commit_errors,
            self.expected_interval,
        )


_ONE_PER_AGENT: tuple[tuple[str, Callable[[_Row], float | None]], ...] = (
    ("run_attempts_total", lambda r: r.attempts),
    ("retries_total", lambda r: r.retries),
    ("agent_running", lambda r: r.running),
    ("last_success_timestamp_seconds", lambda r: r.last_success),
    ("last_run_timestamp_seconds", lambda r: r.last_run),
    ("circuit_state", lambda r: r.circuit),
    ("agent_expected_interval_seconds", lambda r: r.expected_interval),
)
_AGENT_FAMILIES = (
    "runs_total",
    "agent_run_duration_seconds",
    *(short for short, _ in _ONE_PER_AGENT),
    "state_errors_total",
)


def _header(short: str) -> str:
    doc = _DOCS[_P + short]
    return f"# HELP {doc.name} {doc.help}\n# TYPE {doc.name} {doc.type}\n"


def _family(short: str) -> CounterMetricFamily | GaugeMetricFamily:
    doc = _DOCS[_P + short]
    cls = CounterMetricFamily if doc.type == "counter" else GaugeMetricFamily
    return cls(doc.name, doc.help, labels=doc.labels)


def _summary(short: str) -> SummaryMetricFamily:
    doc = _DOCS[_P + short]
    return SummaryMetricFamily(doc.name, doc.help, labels=doc.labels)


class _AgentTable:
    """Per-agent series as plain numbers, rendered straight to exposition text.

    Writes happen on the event loop, scrapes may run in a worker thread: the lock guards
    both, and a scrape holds it only to copy the numbers (~0.5 ms for 1,000 agents).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.agents: dict[str, _AgentSeries] = {}
        #: runs in flight per agent; kept apart from the series so that forgetting an agent
        #: mid-run cannot unbalance run_started/run_ended
        self.in_flight: dict[str, int] = {}
        #: agents removed by forget_agent: late updates for them must not revive their series
        self.forgotten: set[str] = set()
        # render() asks the registry for everything but us; this flag, per thread so
        # concurrent scrapes do not interfere, makes collect() yield nothing meanwhile.
        self._local = threading.local()

    def series(self, agent: str) -> _AgentSeries:
        """The agent's series, created on first use; call with ``lock`` held.

        A forgotten agent gets a detached series: the update is accepted and dropped.
        """
        found = self.agents.get(agent)
        if found is None:
            found = _AgentSeries(agent)
            if agent not in self.forgotten:
                self.agents[agent] = found
        return found

    def snapshot(self) -> list[_Row]:
        with self.lock:
            running = self.in_flight
            return [s.row(s.agent in running) for s in self.agents.values()]

    @contextmanager
    def muted(self) -> Iterator[None]:
        self._local.muted = True
        try:
            yield
        finally:
            self._local.muted = False

    def render(self) -> str:
        rows = self.snapshot()
        out: list[str] = []
        add = out.append
        add(_header("runs_total"))
        name = _P + "runs_total"
        for r in rows:
            for outcome, n in r.runs:
                add(f'{name}{r.label},outcome="{outcome}"}} {n}\n')
        add(_header("agent_run_duration_seconds"))
        name = _P + "agent_run_duration_seconds"
        add("".join(f"{name}_sum{r.label}}} {_num(r.duration_sum)}\n" for r in rows))
        add("".join(f"{name}_count{r.label}}} {r.duration_count}\n" for r in rows))
        for short, value in _ONE_PER_AGENT:
            add(_header(short))
            name = _P + short
            add(
                "".join(
                    f"{name}{r.label}}} {_num(v)}\n" for r in rows if (v := value(r)) is not None
                )
            )
        add(_header("state_errors_total"))
        name = _P + "state_errors_total"
        for r in rows:
            add(f'{name}{r.label},op="load"}} {r.load_errors}\n')
            add(f'{name}{r.label},op="commit"}} {r.commit_errors}\n')
        return "".join(out)

    # -- the prometheus Collector protocol --------------------------------------------------

    def describe(self) -> list[Metric]:
        return [
            _summary(short) if short == "agent_run_duration_seconds" else _family(short)
            for short in _AGENT_FAMILIES
        ]

    def collect(self) -> Iterator[Metric]:
        if getattr(self._local, "muted", False):
            return
        rows = self.snapshot()
        runs = _family("runs_total")
        duration = _summary("agent_run_duration_seconds")
        errors = _family("state_errors_total")
        for r in rows:
            for outcome, n in r.runs:
                runs.add_metric([r.agent, outcome], n)
            duration.add_metric([r.agent], r.duration_count, r.duration_sum)
            errors.add_metric([r.agent, "load"], r.load_errors)
            errors.add_metric([r.agent, "commit"], r.commit_errors)
        yield runs
        yield duration
        for short, value in _ONE_PER_AGENT:
            family = _family(short)
            for r in rows:
                v = value(r)
                if v is not None:
                    family.add_metric([r.agent], v)
            yield family
        yield errors


def _build_version() -> str:
    try:
        return version("agent-supervisor")
    except PackageNotFoundError:  # running from a source tree
        return "unknown"


class Metrics:
    """All metrics of one supervisor process.

    ``registry`` defaults to a fresh one (with the standard ``process_*`` metrics); tests
    pass their own and read samples back with ``registry.get_sample_value``. Methods are
    cheap, never raise for a valid call, and are safe to call while another thread renders.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        build_version: str | None = None,
        start_time: float | None = None,
    ) -> None:
        # Process-wide switch: _created doubles the series of every counter/histogram.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
        self.registry = registry
        self._agents = _AgentTable()
        registry.register(self._agents)

        def histogram(short: str) -> Histogram:
            doc = _DOCS[_P + short]
            return Histogram(doc.name, doc.help, doc.labels, registry=registry, buckets=doc.buckets)

        def gauge(short: str) -> Gauge:
            doc = _DOCS[_P + short]
            return Gauge(doc.name, doc.help, doc.labels, registry=registry)

        self._duration = histogram("run_duration_seconds")
        self._steps = histogram("run_steps")
        self._lag = histogram("schedule_lag_seconds")
        self._in_flight = gauge("runs_in_flight")
        doc = _DOCS[_P + "config_reloads_total"]
        self._reloads = Counter(doc.name, doc.help, doc.labels, registry=registry)
        self._reload_ok = gauge("config_last_reload_success")
        self._reload_ts = gauge("config_last_reload_timestamp_seconds")
        self._agent_counts = gauge("agents")

        def counter(short: str) -> Counter:
            doc = _DOCS[_P + short]
            return Counter(doc.name, doc.help, doc.labels, registry=registry)

        self._loops = counter("loop_detections_total")
        self._effects = counter("effects_total")
        self._http = counter("http_requests_total")
        self._http_refused = counter("http_refused_total")
        self._effect_refusals = counter("effect_refusals_total")
        self._approvals_pending = gauge("effect_approvals_pending")
        self._approval_age = gauge("effect_approval_oldest_pending_seconds")
        self._effects_unknown = gauge("effects_unknown")
        self._untrusted = counter("untrusted_flags_total")
        self._llm_requests = counter("llm_requests_total")
        self._llm_latency = histogram("llm_request_duration_seconds")
        self._llm_tokens = counter("llm_tokens_total")
        self._llm_cost = counter("llm_cost_usd_total")
        self._llm_retries = counter("llm_retries_total")
        self._llm_answers = counter("llm_answers_total")
        self._llm_refused = counter("llm_refused_total")
        self._llm_circuit = gauge("llm_circuit_state")
        self._llm_cache = counter("llm_cache_requests_total")
        self._budget_usd = gauge("llm_budget_spent_usd")
        self._budget_limit_usd = gauge("llm_budget_limit_usd")
        self._budget_tokens = gauge("llm_budget_spent_tokens")
        self._budget_limit_tokens = gauge("llm_budget_limit_tokens")
        self._agent_spent = gauge("llm_agent_spent_today_usd")
        self._agent_limit = gauge("llm_agent_budget_limit_usd")
        build_info = gauge("build_info")
        started = gauge("start_time_seconds")

        now = time.time() if start_time is None else start_time
        for outcome in Outcome:
            if not outcome.skipped:
                self._duration.labels(outcome.value)
        for result in ("success", "failure"):
            self._reloads.labels(result)
        self.set_agent_counts(configured=0, enabled=0, paused=0)
        build_info.labels(build_version or _build_version(), platform.python_version()).set(1)
        started.set(now)
        # The config in use was loaded at startup: the "last load" until a reload says otherwise.
        self._reload_ok.set(1)
        self._reload_ts.set(now)

    # -- agents -------------------------------------------------------------------------------

    def add_agent(
        self,
        agent: str,
        *,
        last_run_ts: float | None = None,
        last_success_ts: float | None = None,
    ) -> None:
        """Create the agent's series at zero, seeding the timestamps from persisted state.

        Optional (every method creates the series on first use), but an agent added here
        shows in dashboards before its first run, and its staleness alerts survive restarts.
        """
        with self._agents.lock:
            self._agents.forgotten.discard(agent)
            series = self._agents.series(agent)
            series.retired = False
            if last_run_ts is not None:
                series.last_run = last_run_ts
            if last_success_ts is not None:
                series.last_success = last_success_ts

    def seen_elsewhere(
        self, agent: str, *, last_run_ts: float | None, last_success_ts: float | None
    ) -> None:
        """Cluster mode: the agent ran on another node; move its timestamps forward (never
        back), so that every node's staleness series tell the cluster's truth."""
        with self._agents.lock:
            series = self._agents.agents.get(agent)
            if series is None or series.retired:
                return
            if last_run_ts is not None and (series.last_run or 0) < last_run_ts:
                series.last_run = last_run_ts
            if last_success_ts is not None and (series.last_success or 0) < last_success_ts:
                series.last_success = last_success_ts

    def set_expected_interval(self, agent: str, seconds: float) -> None:
        """How often ``agent`` is scheduled to fire (0 or less: unknown, not exported)."""
        with self._agents.lock:
            self._agents.series(agent).expected_interval = seconds if seconds > 0 else None

    def forget_agent(self, agent: str) -> None:
        """Remove every series labelled with ``agent`` (it left the config).

        A run still in flight keeps the series until its ``run_ended``, so an outcome
        observed before that still counts; later updates are dropped, so the series never
        come back unless ``add_agent`` is called again. Unknown agents are ignored.
        """
        with self._agents.lock:
            self._agents.forgotten.add(agent)
            series = self._agents.agents.get(agent)
            if series is None:
                return
            if agent in self._agents.in_flight:
                series.retired = True
            else:
                del self._agents.agents[agent]

    def set_agent_counts(self, *, configured: int, enabled: int, paused: int) -> None:
        """Set how many agents the running config has, and how many are enabled or paused."""
        self._agent_counts.labels("configured").set(configured)
        self._agent_counts.labels("enabled").set(enabled)
        self._agent_counts.labels("paused").set(paused)

    # -- runs -----------------------------------------------------------------------------------

    def run_started(self, agent: str) -> None:
        """A run of ``agent`` was admitted and is about to execute."""
        with self._agents.lock:
            self._agents.series(agent)
            in_flight = self._agents.in_flight
            in_flight[agent] = in_flight.get(agent, 0) + 1
        self._in_flight.inc()

    def run_ended(self, agent: str) -> None:
        """The run announced by ``run_started`` is over (call it even when the run raised)."""
        with self._agents.lock:
            in_flight = self._agents.in_flight
            count = in_flight.get(agent, 0)
            if not count:
                return  # unmatched: moving the gauges would only make them lie
            # Runs of one agent may overlap when its config allows it: the agent is
            # "running" until the last one ends.
            if count > 1:
                in_flight[agent] = count - 1
            else:
                del in_flight[agent]
                series = self._agents.agents.get(agent)
                if series is not None and series.retired:
                    del self._agents.agents[agent]
        self._in_flight.dec()

    @contextmanager
    def running(self, agent: str) -> Iterator[None]:
        """``run_started`` on entry and ``run_ended`` on exit, however the block exits."""
        self.run_started(agent)
        try:
            yield
        finally:
            self.run_ended(agent)

    def observe_run(
        self,
        agent: str,
        outcome: Outcome | str,
        *,
        duration_s: float,
        steps: int,
        attempts: int,
        lag_s: float | None,
        finished_ts: float,
    ) -> None:
        """Record a run whose code ran. ``lag_s`` is None for manual triggers.

        Raises ValueError for an unknown or skipped outcome (use ``record_skip``).
        """
        outcome = Outcome(outcome)
        if outcome.skipped:
            raise ValueError(f"{outcome.value} is a skip: use record_skip")
        duration_s = max(0.0, duration_s)
        self._duration.labels(outcome.value).observe(duration_s)
        self._steps.observe(steps)
        if lag_s is not None:
            self._lag.observe(max(0.0, lag_s))
        with self._agents.lock:
            series = self._agents.series(agent)
            series.runs[outcome.value] = series.runs.get(outcome.value, 0) + 1
            series.duration_sum += duration_s
            series.duration_count += 1
            series.attempts += attempts
            series.last_run = finished_ts
            if outcome is Outcome.SUCCESS:
                series.last_success = finished_ts

    def record_skip(self, agent: str, outcome: Outcome | str, lag_s: float | None = None) -> None:
        """Record a fire that was not run: counted in ``runs_total``, its lag observed.

        Raises ValueError unless ``outcome`` is one of the ``skipped_*`` outcomes.
        """
        outcome = Outcome(outcome)
        if not outcome.skipped:
            raise ValueError(f"{outcome.value} is not a skip: use observe_run")
        if lag_s is not None:
            self._lag.observe(max(0.0, lag_s))
        with self._agents.lock:
            series = self._agents.series(agent)
            series.runs[outcome.value] = series.runs.get(outcome.value, 0) + 1

    def observe_record(self, record: RunRecord) -> None:
        """Record a finished fire from its ``RunRecord`` (``observe_run`` or ``record_skip``)."""
        # planned_at is None for manual triggers: there was no schedule to lag behind.
        lag = record.lag_s if record.planned_at is not None else None
        if record.outcome.skipped:
            self.record_skip(record.agent, record.outcome, lag)
            return
        self.observe_run(
            record.agent,
            record.outcome,
            duration_s=record.duration_s,
            steps=record.steps,
            attempts=record.attempts,
            lag_s=lag,
            finished_ts=record.finished_at.timestamp(),
        )

    def retry(self, agent: str) -> None:
        """A run of ``agent`` is being retried (run-level retry, not a call-level one)."""
        with self._agents.lock:
            self._agents.series(agent).retries += 1

    # -- guards and state ---------------------------------------------------------------------

    def set_circuit(self, agent: str, code: CircuitCode | int) -> None:
        """Set the agent's circuit breaker state. Raises ValueError for a code not 0-2."""
        value = CircuitCode(code).value
        with self._agents.lock:
            self._agents.series(agent).circuit = value

    def state_error(self, agent: str, op: StateOp) -> None:
        """A state store ``load`` or ``commit`` of ``agent`` failed; ValueError for other ops."""
        if op not in ("load", "commit"):
            raise ValueError(f"unknown state op {op!r}")
        with self._agents.lock:
            series = self._agents.series(agent)
            if op == "load":
                series.load_errors += 1
            else:
                series.commit_errors += 1

    # -- config ---------------------------------------------------------------------------------

    def config_reload(self, ok: bool, ts: float) -> None:
        """A config reload was applied (``ok``) or rejected, at Unix time ``ts``."""
        self._reloads.labels("success" if ok else "failure").inc()
        self._reload_ok.set(1 if ok else 0)
        self._reload_ts.set(ts)

    def http_request(self, agent: str, status: int) -> None:
        self._http.labels(agent, f"{status // 100}xx").inc()

    def http_refused(self, agent: str) -> None:
        self._http_refused.labels(agent).inc()

    def effect_event(self, agent: str, kind: str, event: str) -> None:
        """Something happened to a side effect of ``agent`` (see ``effects_total``)."""
        self._effects.labels(agent, kind, event).inc()

    def effect_refused(self, agent: str, kind: str, reason: str) -> None:
        """A side effect was refused or rejected, by reason."""
        self._effect_refusals.labels(agent, kind, reason).inc()

    def set_approvals(self, pending: int, oldest_age_s: float, unknown: int) -> None:
        """Approval requests waiting, the oldest one's age, and effects held as unknown."""
        self._approvals_pending.set(pending)
        self._approval_age.set(max(0.0, oldest_age_s))
        self._effects_unknown.set(unknown)

    def untrusted_flag(self, agent: str, flag: str) -> None:
        self._untrusted.labels(agent, flag).inc()

    def loop_detection(self, agent: str, detector: str, enforced: bool) -> None:
        """A loop or stall detector fired for ``agent`` (stopped the run, or only warned)."""
        self._loops.labels(agent, detector, "stopped" if enforced else "warned").inc()

    # -- LLM calls ------------------------------------------------------------------------------

    def llm_call(
        self,
        agent: str,
        provider: str,
        model: str,
        status: str,
        duration_s: float,
        usage: Any,
        cost_usd: float,
        cached: bool,
    ) -> None:
        """One LLM call attempt (or cache hit) and what it cost."""
        self._llm_requests.labels(agent, provider, model, status).inc()
        if not cached:
            self._llm_latency.labels(provider, model).observe(max(0.0, duration_s))
        if usage is not None and not cached:  # a cache hit reached no provider
            tokens = self._llm_tokens
            tokens.labels(agent, provider, model, "input").inc(usage.input_tokens)
            tokens.labels(agent, provider, model, "output").inc(usage.output_tokens)
            if usage.cached_input_tokens:
                tokens.labels(agent, provider, model, "cached_input").inc(usage.cached_input_tokens)
            if usage.reasoning_tokens:
                tokens.labels(agent, provider, model, "reasoning").inc(usage.reasoning_tokens)
        if cost_usd > 0:
            self._llm_cost.labels(agent, provider, model).inc(cost_usd)

    def llm_retry(self, provider: str, model: str) -> None:
        self._llm_retries.labels(provider, model).inc()

    def llm_answered(self, agent: str, alias: str, tier: str) -> None:
        self._llm_answers.labels(agent, alias, tier).inc()

    def llm_refused(self, agent: str, reason: str) -> None:
        self._llm_refused.labels(agent, reason).inc()

    def llm_circuit(self, provider: str, model: str, code: int) -> None:
        self._llm_circuit.labels(provider, model).set(CircuitCode(code).value)

    def llm_cache(self, hit: bool) -> None:
        self._llm_cache.labels("hit" if hit else "miss").inc()

    def set_budget(self, windows: Iterable[Any]) -> None:
        """Publish budget windows (``BudgetLedger.snapshot()`` entries)."""
        for w in windows:
            spent_usd = w.spent_usd + w.reserved_usd
            if w.name in ("global_hour", "global_day"):
                self._budget_usd.labels(w.name).set(spent_usd)
                self._budget_tokens.labels(w.name).set(w.spent_tokens)
                if w.limit_usd is not None:
                    self._budget_limit_usd.labels(w.name).set(w.limit_usd)
                if w.limit_tokens is not None:
                    self._budget_limit_tokens.labels(w.name).set(w.limit_tokens)
            elif w.name in ("agent_day", "per_agent_day"):
                agent = str(w.key).split(":", 1)[0]
                self._agent_spent.labels(agent).set(spent_usd)
                if w.limit_usd is not None:
                    self._agent_limit.labels(agent).set(w.limit_usd)

    # -- exposition -----------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The registry in the Prometheus text format: ``(body, content_type)``."""
        with self._agents.muted():
            head = generate_latest(self.registry)
        return head + self._agents.render().encode(), CONTENT_TYPE
