"""The Metrics object: what each method records, forgetting agents, and the exposition."""

from __future__ import annotations

import math
import re
import sys
import threading
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.metrics import (
    CONTENT_TYPE,
    LAG_BUCKETS,
    CircuitCode,
    Metrics,
    describe,
)
from supervisor.outcome import Outcome, RunRecord

P = "agent_supervisor_"
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry, build_version="1.2.3", start_time=START)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(P + name, labels)


def run(
    metrics: Metrics,
    agent: str = "a",
    outcome: Outcome = Outcome.SUCCESS,
    *,
    duration_s: float = 2.0,
    steps: int = 3,
    attempts: int = 1,
    lag_s: float | None = 0.004,
    finished_ts: float = START + 60,
) -> None:
    metrics.observe_run(
        agent,
        outcome,
        duration_s=duration_s,
        steps=steps,
        attempts=attempts,
        lag_s=lag_s,
        finished_ts=finished_ts,
    )


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def populate(metrics: Metrics, agents: int) -> None:
    """Give every agent every per-agent series, with four outcomes each."""
    for i in range(agents):
        agent = f"agent-{i:04d}"
        for n, outcome in enumerate((Outcome.SUCCESS, Outcome.FAILURE, Outcome.TIMEOUT)):
            metrics.run_started(agent)
            run(
                metrics,
                agent,
                outcome,
                duration_s=0.5 + i % 97 + n / 7,
                finished_ts=START + i + n / 3,
            )
            metrics.run_ended(agent)
        metrics.record_skip(agent, Outcome.SKIPPED_OVERLAP, 0.01)
        metrics.retry(agent)
        metrics.set_circuit(agent, i % 3)
        metrics.state_error(agent, "load")
        metrics.state_error(agent, "commit")


# -- runs ---------------------------------------------------------------------------------------


def test_observe_run_counts_the_run_under_its_outcome(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """A finished run adds one to runs_total for its agent and outcome."""
    run(metrics, "a", Outcome.TIMEOUT)
    assert value(registry, "runs_total", agent="a", outcome="timeout") == 1
    assert value(registry, "runs_total", agent="a", outcome="success") == 0


def test_observe_run_feeds_histograms_and_the_agent_summary(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """Duration, steps, lag and attempts land in their families; histograms have no agent label."""
    run(metrics, "a", duration_s=2.0, steps=3, attempts=2, lag_s=0.004)
    run(metrics, "b", Outcome.FAILURE, duration_s=0.3, steps=40, attempts=1, lag_s=0.02)

    assert value(registry, "run_duration_seconds_count", outcome="success") == 1
    assert value(registry, "run_duration_seconds_bucket", outcome="failure", le="0.5") == 1
    assert value(registry, "run_steps_count") == 2
    assert value(registry, "run_steps_bucket", le="5.0") == 1
    assert value(registry, "schedule_lag_seconds_bucket", le="0.005") == 1
    assert value(registry, "agent_run_duration_seconds_sum", agent="a") == 2.0
    assert value(registry, "agent_run_duration_seconds_count", agent="a") == 1
    assert value(registry, "run_attempts_total", agent="a") == 2


def test_manual_trigger_has_no_lag_to_observe(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """A run with lag_s=None leaves the schedule lag histogram alone."""
    run(metrics, lag_s=None)
    assert value(registry, "schedule_lag_seconds_count") == 0


@pytest.mark.parametrize(
    ("outcome", "last_success"),
    [(Outcome.SUCCESS, START + 60), (Outcome.FAILURE, None), (Outcome.CANCELLED, None)],
    ids=["success-moves-it", "failure-does-not", "cancelled-does-not"],
)
def test_last_success_moves_only_on_success(
    metrics: Metrics, registry: CollectorRegistry, outcome: Outcome, last_success: float | None
) -> None:
    """last_run moves on every run; last_success only on a successful one."""
    run(metrics, "a", outcome, finished_ts=START + 60)
    assert value(registry, "last_run_timestamp_seconds", agent="a") == START + 60
    assert value(registry, "last_success_timestamp_seconds", agent="a") == last_success


def test_record_skip_counts_the_fire_and_its_lag_only(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """A skipped fire is counted and its lag observed, but no duration, step or attempt is."""
    metrics.record_skip("a", Outcome.SKIPPED_PAUSED, lag_s=0.002)

    assert value(registry, "runs_total", agent="a", outcome="skipped_paused") == 1
    assert value(registry, "schedule_lag_seconds_count") == 1
    assert value(registry, "run_steps_count") == 0
    assert value(registry, "agent_run_duration_seconds_count", agent="a") == 0
    assert value(registry, "run_attempts_total", agent="a") == 0
    assert value(registry, "last_run_timestamp_seconds", agent="a") is None
    # skipped outcomes get no duration histogram at all: nothing ran to be timed
    assert value(registry, "run_duration_seconds_count", outcome="skipped_paused") is None


def test_observe_run_refuses_a_skip_and_record_skip_a_run(metrics: Metrics) -> None:
    """Each method accepts only its own kind of outcome, and no unknown one."""
    with pytest.raises(ValueError, match="record_skip"):
        run(metrics, "a", Outcome.SKIPPED_OVERLAP)
    with pytest.raises(ValueError, match="observe_run"):
        metrics.record_skip("a", Outcome.SUCCESS)
    with pytest.raises(ValueError):
        metrics.record_skip("a", "exploded")


def test_observe_record_routes_runs_and_skips(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """A RunRecord is recorded as a run or a skip; a manual trigger's lag is ignored."""
    at = datetime(2026, 1, 1, tzinfo=UTC)

    def record(outcome: Outcome, planned_at: datetime | None) -> RunRecord:
        return RunRecord(
            agent="a",
            run_id="r1",
            outcome=outcome,
            planned_at=planned_at,
            started_at=at,
            finished_at=at + timedelta(seconds=2),
            duration_s=2.0,
            lag_s=0.5,
            steps=4,
            attempts=1,
        )

    metrics.observe_record(record(Outcome.SUCCESS, planned_at=None))
    metrics.observe_record(record(Outcome.SKIPPED_CIRCUIT_OPEN, planned_at=at))

    assert value(registry, "runs_total", agent="a", outcome="success") == 1
    assert value(registry, "runs_total", agent="a", outcome="skipped_circuit_open") == 1
    assert value(registry, "last_success_timestamp_seconds", agent="a") == at.timestamp() + 2
    assert value(registry, "schedule_lag_seconds_count") == 1  # the skip's, not the manual run's


# -- in flight ------------------------------------------------------------------------------


def test_overlapping_runs_keep_the_agent_running_until_the_last_ends(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """agent_running is 0/1 per agent while runs_in_flight counts every run."""
    metrics.run_started("a")
    metrics.run_started("a")
    assert value(registry, "runs_in_flight") == 2
    assert value(registry, "agent_running", agent="a") == 1

    metrics.run_ended("a")
    assert value(registry, "agent_running", agent="a") == 1
    metrics.run_ended("a")
    assert value(registry, "agent_running", agent="a") == 0
    assert value(registry, "runs_in_flight") == 0


def test_unmatched_run_ended_moves_nothing(metrics: Metrics, registry: CollectorRegistry) -> None:
    """A run_ended without its run_started cannot drive the gauges negative."""
    metrics.run_ended("a")
    metrics.add_agent("b")
    metrics.run_ended("b")
    assert value(registry, "runs_in_flight") == 0
    assert value(registry, "agent_running", agent="b") == 0


def test_running_ends_the_run_when_the_block_raises(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """The running() context manager calls run_ended however the block exits."""
    with pytest.raises(RuntimeError), metrics.running("a"):
        assert value(registry, "agent_running", agent="a") == 1
        raise RuntimeError("boom")
    assert value(registry, "agent_running", agent="a") == 0
    assert value(registry, "runs_in_flight") == 0


# -- guards, state, config -------------------------------------------------------------------


@pytest.mark.parametrize("code", list(CircuitCode), ids=[c.name.lower() for c in CircuitCode])
def test_set_circuit_exposes_the_code(
    metrics: Metrics, registry: CollectorRegistry, code: CircuitCode
) -> None:
    """circuit_state is 0 closed, 1 half-open, 2 open."""
    metrics.set_circuit("a", code)
    assert value(registry, "circuit_state", agent="a") == int(code)


def test_set_circuit_refuses_an_unknown_code(metrics: Metrics) -> None:
    """A code outside 0-2 is a bug in the caller, not a new state."""
    with pytest.raises(ValueError):
        metrics.set_circuit("a", 3)


def test_state_errors_and_retries_are_counted_per_agent(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """state_error counts by op; retry counts run-level retries; both start at zero."""
    metrics.state_error("a", "commit")
    metrics.state_error("a", "commit")
    metrics.retry("a")

    assert value(registry, "state_errors_total", agent="a", op="commit") == 2
    assert value(registry, "state_errors_total", agent="a", op="load") == 0
    assert value(registry, "retries_total", agent="a") == 1
    with pytest.raises(ValueError, match="state op"):
        metrics.state_error("a", "delete")  # type: ignore[arg-type]


def test_config_reload_records_result_and_time(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """The startup load reads as a success at start time; a rejected reload flips it to 0."""
    assert value(registry, "config_last_reload_success") == 1
    assert value(registry, "config_last_reload_timestamp_seconds") == START
    assert value(registry, "config_reloads_total", result="failure") == 0

    metrics.config_reload(False, START + 10)
    assert value(registry, "config_last_reload_success") == 0
    assert value(registry, "config_last_reload_timestamp_seconds") == START + 10
    assert value(registry, "config_reloads_total", result="failure") == 1

    metrics.config_reload(True, START + 20)
    assert value(registry, "config_last_reload_success") == 1
    assert value(registry, "config_reloads_total", result="success") == 1


def test_agent_counts_build_info_and_start_time(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """The process-level gauges say how many agents, which build and since when."""
    metrics.set_agent_counts(configured=5, enabled=4, paused=1)
    assert value(registry, "agents", state="configured") == 5
    assert value(registry, "agents", state="enabled") == 4
    assert value(registry, "agents", state="paused") == 1
    python = ".".join(str(n) for n in sys.version_info[:3])
    assert value(registry, "build_info", version="1.2.3", python=python) == 1
    assert value(registry, "start_time_seconds") == START


# -- agents come and go -------------------------------------------------------------------------


def test_add_agent_initialises_series_and_seeds_timestamps(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """An added agent shows zeros before its first run, and the timestamps from its state."""
    metrics.add_agent("a", last_run_ts=START - 5, last_success_ts=START - 50)
    assert value(registry, "runs_total", agent="a", outcome="failure") == 0
    assert value(registry, "run_attempts_total", agent="a") == 0
    assert value(registry, "agent_running", agent="a") == 0
    assert value(registry, "circuit_state", agent="a") == 0
    assert value(registry, "last_run_timestamp_seconds", agent="a") == START - 5
    assert value(registry, "last_success_timestamp_seconds", agent="a") == START - 50


def test_forget_agent_removes_every_series_of_that_agent(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """After forget_agent no sample carries the agent; other agents are untouched."""
    populate(metrics, 2)
    metrics.forget_agent("agent-0000")
    metrics.forget_agent("never-configured")

    body, _ = metrics.render()
    assert b'"agent-0000"' not in body
    assert not [s for s in generate_latest(registry).splitlines() if b'"agent-0000"' in s]
    assert value(registry, "runs_total", agent="agent-0001", outcome="success") == 1


def test_forget_agent_waits_for_the_run_in_flight(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """A run in flight when its agent is removed is still counted, then the series go."""
    metrics.run_started("a")
    metrics.forget_agent("a")
    run(metrics, "a")
    assert value(registry, "runs_total", agent="a", outcome="success") == 1

    metrics.run_ended("a")
    assert value(registry, "runs_total", agent="a", outcome="success") is None
    assert value(registry, "runs_in_flight") == 0


def test_late_updates_for_a_forgotten_agent_do_not_revive_it(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """Run ended before its outcome is observed: the outcome is dropped, no zombie series."""
    metrics.run_started("a")
    metrics.forget_agent("a")
    metrics.run_ended("a")
    run(metrics, "a")
    metrics.set_circuit("a", CircuitCode.OPEN)
    metrics.record_skip("a", Outcome.SKIPPED_PAUSED)

    assert b'"a"' not in metrics.render()[0]
    assert value(registry, "runs_in_flight") == 0
    assert (
        value(registry, "run_duration_seconds_count", outcome="success") == 1
    )  # global still counts


def test_add_agent_brings_a_forgotten_agent_back(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """An agent removed by one reload and restored by the next is tracked again, from zero."""
    run(metrics, "a")
    metrics.forget_agent("a")
    metrics.add_agent("a")
    run(metrics, "a")
    assert value(registry, "runs_total", agent="a", outcome="success") == 1


# -- exposition -------------------------------------------------------------------------------


def test_render_agrees_with_the_registry(metrics: Metrics, registry: CollectorRegistry) -> None:
    """The fast text path exposes the same samples as prometheus-client's own exporter."""
    populate(metrics, 3)
    metrics.run_started("agent-0001")
    body, content_type = metrics.render()

    fast, slow = samples(body), samples(generate_latest(registry))
    assert fast.keys() == slow.keys()
    for key, expected in slow.items():
        assert fast[key] == pytest.approx(expected, abs=1e-3), key
    assert content_type == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_render_escapes_awkward_agent_names(metrics: Metrics) -> None:
    """Quotes, backslashes and newlines in an agent name survive the round trip."""
    name = 'we"ird\\na\nme'
    run(metrics, name)
    assert (
        samples(metrics.render()[0])[(P + "runs_total", (("agent", name), ("outcome", "success")))]
        == 1
    )


def test_render_spells_non_finite_values_the_prometheus_way(metrics: Metrics) -> None:
    """An infinite duration sum is written +Inf, which Prometheus parses."""
    run(metrics, "a", duration_s=math.inf)
    body, _ = metrics.render()
    assert b'agent_supervisor_agent_run_duration_seconds_sum{agent="a"} +Inf\n' in body


def test_no_created_series_are_exposed(metrics: Metrics) -> None:
    """_created samples are disabled: they would double the line count."""
    run(metrics)
    metrics.config_reload(True, START)
    assert b"_created" not in metrics.render()[0]


def test_render_in_a_thread_while_agents_change(metrics: Metrics) -> None:
    """Scrapes from a worker thread never trip over agents being added, run and forgotten."""
    errors: list[BaseException] = []
    done = threading.Event()

    def scrape() -> None:
        try:
            while not done.is_set():
                metrics.render()
        except BaseException as exc:  # pragma: no cover - only on failure
            errors.append(exc)

    scraper = threading.Thread(target=scrape)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads constantly, so a race shows up at once
    scraper.start()
    try:
        for i in range(20_000):
            agent = f"agent-{i % 50}"
            run(metrics, agent, Outcome.FAILURE if i % 7 else Outcome.TIMEOUT)
            if i % 3 == 0:
                metrics.forget_agent(agent)
    finally:
        done.set()
        scraper.join(timeout=10)
        sys.setswitchinterval(interval)
    assert not scraper.is_alive()
    assert errors == []


def test_exposition_of_1000_full_agents_is_under_1_mib(metrics: Metrics) -> None:
    """1,000 agents with every per-agent series populated fit in one MiB."""
    populate(metrics, 1000)
    body, _ = metrics.render()
    assert body.count(b'outcome="skipped_overlap"') == 1000
    assert len(body) < 2**20


def test_default_registry_is_fresh_and_has_process_metrics() -> None:
    """Metrics() makes its own registry, so two instances never collide."""
    first, second = Metrics(), Metrics()
    assert first.registry is not second.registry
    if sys.platform == "linux":
        assert b"process_resident_memory_bytes" in first.render()[0]


def test_one_registry_cannot_hold_two_metrics_objects(registry: CollectorRegistry) -> None:
    """A second Metrics on the same registry is refused instead of double-counting."""
    Metrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(registry)


# -- the documented interface ------------------------------------------------------------------


def test_describe_lists_exactly_the_exposed_families(metrics: Metrics) -> None:
    """Every family on the wire is in describe() and vice versa, with its type and labels
    (the cluster families are registered by a node of a cluster only)."""
    from supervisor.cluster.metrics import ClusterMetrics

    populate(metrics, 1)
    cluster = ClusterMetrics(metrics)
    cluster.joined("node-a", "0123456789abcdef")
    cluster.claim("won", 0.001)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render()[0].decode())}
    docs = {d.name.removesuffix("_total") if d.type == "counter" else d.name: d for d in describe()}
    assert families.keys() == docs.keys()
    for name, doc in docs.items():
        assert families[name].type == doc.type, name
        labels = {k for s in families[name].samples for k in s.labels} - {"le"}
        # A labelled family with no child yet exposes no sample: its labels are unseen.
        assert labels in (set(doc.labels), set()), name


def test_metric_names_follow_prometheus_conventions() -> None:
    """Prefixed, counters end in _total, only base units, labels from bounded sets."""
    bounded = {
        "code",
        "event",
        "flag",
        "detector",
        "action",
        "agent",
        "outcome",
        "op",
        "result",
        "state",
        "version",
        "python",
        "provider",
        "model",
        "status",
        "kind",
        "alias",
        "tier",
        "reason",
        "window",
        # cluster mode: one series per node of the cluster, on one family only
        "node",
        "config_hash",
    }
    for doc in describe():
        assert re.fullmatch(r"agent_supervisor_[a-z_]+", doc.name), doc.name
        assert doc.name.endswith("_total") == (doc.type == "counter"), doc.name
        assert not re.search(r"_(milliseconds|ms|minutes|hours|kilobytes|mb)(_|$)", doc.name)
        assert set(doc.labels) <= bounded, doc.name
        assert doc.help.endswith("."), doc.name
    assert next(d for d in describe() if d.name.endswith("lag_seconds")).buckets == LAG_BUCKETS
