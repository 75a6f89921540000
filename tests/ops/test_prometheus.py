"""deploy/: the alert rules and the dashboard, proven against a real Prometheus.

Static checks first (every alert has a unit test that makes it fire, the dashboard's shape),
then ``promtool`` (check rules, test rules, check config), then the real thing: the daemon
runs a fleet of misbehaving agents (a hanging one, a broken one, a flaky one, one that calls
a fake LLM until its budget is nearly gone...) and Debian's Prometheus scrapes it every second
with ``deploy/prometheus.yml``'s job and ``deploy/alerts.yml``'s rules. Every expression of
every dashboard panel and every alert rule must return data there (no panel is silently
empty), ``promtool check metrics`` must be clean on the daemon's exposition, and the "no
success in 2 intervals" alert must fire for the agent that hangs.

Without ``promtool``/``prometheus`` (Debian package ``prometheus``) the tests that need them
skip locally and fail under ``CI=true``.
"""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from supervisor.llm.fakeserver import FakeLLMServer, Fault
from tests.e2e.conftest import E2E_DIR, Daemon, fleet_config
from tests.ops.conftest import OPS_DIR, REPO, need, run

DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "alerts.yml"
ALERT_TESTS = DEPLOY / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
PROMETHEUS_YML = DEPLOY / "prometheus.yml"
ALERTS_DOC = REPO / "docs" / "alerts.md"
JOB = "agent-supervisor"

#: what Grafana would put in for the dashboard's variables: every instance and agent, and a
#: rate window of several 1 s scrapes (Grafana's $__rate_interval is at least 4 scrapes)
VARIABLES = {
    "$__rate_interval": "15s",
    "$job": JOB,
    "$instance": ".*",
    "$agent": ".*",
}

#: how each alert is proven against the live fleet below. "fires": the fleet makes the
#: condition true, so the rule's expression itself must return series. Otherwise the
#: condition needs what a short test cannot give (an approval waiting for an hour), so the
#: series the expression is built from must exist and the expression must evaluate.
LIVE_ALERT_CHECKS: dict[str, str | list[str]] = {
    # a second target in the scrape config is a port nobody listens on: up == 0
    "AgentSupervisorDown": "fires",
    # `broken` fails every run until its circuit opens, slowly enough (6 failures 2 s apart)
    # for Prometheus to see the counter grow: increase() needs the rise, not only the total
    "AgentFailing": "fires",
    # `hang` never succeeds, `stuck` succeeded once then hangs
    "AgentNoRecentSuccess": "fires",
    "AgentCircuitOpen": "fires",
    # `asker` spends until the global hour's budget (and its own day's) is above 80%
    "LLMBudgetNearlySpent": "fires",
    "AgentLLMBudgetNearlySpent": "fires",
    # the gauge exists from the start (0 while nothing waits); an hour is too long to wait
    "ApprovalsPendingTooLong": [
        f'agent_supervisor_effect_approval_oldest_pending_seconds{{job="{JOB}"}}'
    ],
    # the fixture sends a broken config and SIGHUP
    "ConfigReloadFailed": "fires",
}

PRICE = {"input": 10.0, "output": 30.0}  # USD per 1M tokens
#: the budget the asker exhausts: each call costs about 0.00064 (4 tokens in, 20 out) and
#: reserves about as much, so calls stop above 85% of it, after some 16 calls (8 s)
BUDGET_USD = 0.012

FLEET = """
agents:
  - name: good
    run: "fleet_agents:ok"
    schedule: every 4s
  - name: broken
    run: "fleet_agents:broken"
    schedule: every 2s
    guards: {retry: {attempts: 1}, circuit: {failures: 6, cooldown: 1h}}
  - name: hang
    run: "fleet_agents:hang"
    schedule: every 2s
    guards: {timeout: 1h}
  - name: stuck
    run: "ops_agents:succeed_then_hang"
    schedule: every 2s
    guards: {timeout: 1h}
  - name: flaky
    run: "fleet_agents:flaky"
    schedule: every 2s
    guards: {retry: {attempts: 3, base_delay: 0.01s, max_delay: 0.05s}}
  - name: asker
    run: "llm_agents:ask"
    schedule: every 0.5s
    llm: {per_agent_day: {usd: %(budget)s}}
"""


# -- the files ------------------------------------------------------------------------------


def alert_rules() -> dict[str, dict[str, Any]]:
    """Alert name -> its rule, from deploy/alerts.yml."""
    doc = yaml.safe_load(ALERTS.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for p in doc["panels"]:
        yield p
        yield from p.get("panels", [])


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    return [(p["title"], t["expr"]) for p in panels(dashboard()) for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    """Put in the values Grafana would; fails on a variable the test does not know."""
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace("${" + name[1:] + "}", VARIABLES[name]).replace(name, VARIABLES[name])
    assert "$" not in expr, f"unknown variable in {expr!r}"
    return expr


# -- static checks --------------------------------------------------------------------------


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    """deploy/alerts_test.yml has, for every alert, a case where it fires."""
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired == set(alert_rules())


def test_every_alert_says_what_to_do() -> None:
    """Each alert has a severity, summary, description and a runbook_url whose section
    exists in docs/alerts.md."""
    doc = ALERTS_DOC.read_text()
    anchors = {
        re.sub(r"[^a-z0-9-]", "", h.strip().lower().replace(" ", "-"))
        for h in re.findall(r"^#+ (.+)$", doc, re.M)
    }
    for name, rule in alert_rules().items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "docs/alerts.md" and anchor in anchors, (name, notes["runbook_url"])


def test_live_checks_cover_every_alert() -> None:
    """The live test below knows how to prove every alert (a new alert needs an entry)."""
    assert set(LIVE_ALERT_CHECKS) == set(alert_rules())


def test_dashboard_variables_and_rate_windows() -> None:
    """A datasource variable used by every query, job/instance/agent variables, and rate
    windows that are always $__rate_interval."""
    doc = dashboard()
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance", "agent"} <= set(variables)
    assert variables["agent"]["includeAll"] and variables["agent"]["allValue"] == ".*"
    queries = dashboard_queries()
    assert len(queries) >= 15
    for p in panels(doc):
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            windows = re.findall(r"\[([^\]]+)\]", t["expr"])
            assert all(w == "$__rate_interval" for w in windows), (p["title"], windows)
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"] for p in panels(doc)).lower()
    for wanted in (
        "runs by outcome",
        "p50 / p95",
        "schedule lag",
        "spend rate ($/h) by agent and model",
        "tokens",
        "errors by type",
        "retries and fallbacks by tier",
        "budget remaining per window",
        "approvals pending",
        "time since last success",
    ):
        assert wanted in titles, wanted


# -- promtool -------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    """`promtool check rules deploy/alerts.yml` passes without warnings."""
    promtool = need("promtool", "prometheus")
    r = run([promtool, "check", "rules", str(ALERTS)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout and "WARNING" not in (r.stdout + r.stderr).upper()


def test_promtool_test_rules() -> None:
    """`promtool test rules deploy/alerts_test.yml` passes."""
    promtool = need("promtool", "prometheus")
    r = run([promtool, "test", "rules", str(ALERT_TESTS)], cwd=DEPLOY)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_check_config() -> None:
    """deploy/prometheus.yml is a valid Prometheus config (with its rule file)."""
    promtool = need("promtool", "prometheus")
    r = run([promtool, "check", "config", str(PROMETHEUS_YML)], cwd=DEPLOY)
    assert r.returncode == 0, r.stdout + r.stderr


# -- the live stack -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Stack:
    daemon: Daemon
    url: str
    prometheus: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: Any) -> Any:
        r = httpx2.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        doc = r.json()
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now (raises on a PromQL error)."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result


def finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


def start_prometheus(tmp: Path, targets: list[str]) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Debian's Prometheus on loopback with deploy/prometheus.yml's job and deploy/alerts.yml,
    scraping ``targets`` and evaluating rules every second. Returns (process, URL, log)."""
    prom_config = yaml.safe_load(PROMETHEUS_YML.read_text())
    prom_config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    prom_config["rule_files"] = [str(ALERTS)]
    (job,) = prom_config["scrape_configs"]
    assert job["job_name"] == JOB
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["static_configs"] = [{"targets": targets}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(prom_config))
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                need("prometheus", "prometheus"),
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx2.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return proc, url, log
        except httpx2.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"Prometheus did not become ready:\n{log.read_text()}")
        time.sleep(0.2)


def llm_section(llm: FakeLLMServer) -> dict[str, Any]:
    provider = {
        "base_url": llm.openai_base_url,
        "api_key": {"secret": "FAKE_LLM_KEY"},
        "retry": {"attempts": 2, "base_delay": 0.01, "max_delay": 0.05},
    }
    return {
        "providers": {"primary": provider, "backup": provider},
        "models": {"primary/writer-1": {"price": PRICE}, "backup/writer-2": {"price": PRICE}},
        "aliases": {"writer": ["primary/writer-1", "backup/writer-2"]},
        "default_max_tokens": 20,
        "budgets": {"global_hour": {"usd": BUDGET_USD}, "global_day": {"usd": 1.0}},
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A real Prometheus scraping the daemon (with the misbehaving fleet and a fake LLM)
    from its first second, and a target nobody listens on."""
    need("prometheus", "prometheus")
    tmp = tmp_path_factory.mktemp("prometheus-stack")
    metrics_port = free_port()
    # Prometheus first: counters are seen from zero, as in production where it has history
    # (a rate needs two samples of the failures, not only their final count).
    prometheus, url, log = start_prometheus(
        tmp, [f"127.0.0.1:{metrics_port}", f"127.0.0.1:{free_port()}"]
    )
    try:
        with FakeLLMServer() as llm:
            # Long answers, cut at max_tokens: every call costs about the same, ~0.00064 USD.
            llm.reply(None, "x" * 400)
            # The first model fails twice per call (2 attempts) for two calls: tier 1
            # answers, and call-level retries and http_500 statuses show.
            llm.enqueue(*[Fault.status(500)] * 4, model="writer-1")
            config_text = fleet_config(
                FLEET % {"budget": BUDGET_USD},
                agent_paths=[str(E2E_DIR), str(OPS_DIR)],
                metrics={"listen": f"127.0.0.1:{metrics_port}"},
                llm=llm_section(llm),
            )
            config = tmp / "config.yaml"
            config.write_text(config_text)
            daemon = Daemon(config, {"AGENT_SUPERVISOR_SECRETS__FAKE_LLM_KEY": "ops-test-key"})
            try:
                daemon.ready()
                # A rejected reload: the daemon keeps the config above, the gauge says 0.
                config.write_text("agents: [\n")
                daemon.signal(signal.SIGHUP)
                daemon.event("config.reload_failed")
                config.write_text(config_text)
                yield Stack(daemon, url, prometheus, log)
            finally:
                daemon.stop()
    finally:
        prometheus.terminate()
        try:
            prometheus.wait(10)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait(5)


def wait_all(stack: Stack, checks: dict[str, Callable[[], bool]], timeout: float = 90) -> None:
    pending = dict(checks)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        assert stack.prometheus.poll() is None, stack.log.read_text()
        for name, check in list(pending.items()):
            if check():
                del pending[name]
        if pending:
            # Prometheus scrapes and evaluates every second: there is nothing to wait on
            # but time passing.
            time.sleep(0.5)
    assert not pending, f"no data within {timeout}s for:\n" + "\n".join(sorted(pending))


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_exposition_passes_promtool_check_metrics(stack: Stack) -> None:
    """`promtool check metrics` is clean on the daemon's real /metrics, with every kind of
    series present (LLM calls, fallbacks, budgets, an open circuit)."""
    promtool = need("promtool", "prometheus")
    wait_all(
        stack,
        {
            "llm cost": lambda: bool(stack.query("agent_supervisor_llm_cost_usd_total")),
            "tier 1": lambda: bool(stack.query('agent_supervisor_llm_answers_total{tier="1"}')),
            "open circuit": lambda: bool(stack.query("agent_supervisor_circuit_state == 2")),
        },
    )
    text = stack.daemon.metrics_text()
    r = run([promtool, "check", "metrics"], input=text)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_every_dashboard_expression_returns_data(stack: Stack) -> None:
    """Every target of every panel returns at least one finite sample: no panel is empty."""
    queries = {f"{title}: {expr}": substitute(expr) for title, expr in dashboard_queries()}
    wait_all(
        stack, {name: (lambda e=expr: finite(stack.query(e))) for name, expr in queries.items()}
    )


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_dashboard_variables_have_values(stack: Stack) -> None:
    """The job, instance and agent variables' label_values() queries list something."""
    checks = {}
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+), *(\w+)\)", var["query"]["query"])
        assert m is not None, var["query"]
        match, label = substitute(m.group(1)), m.group(2)
        checks[var["name"]] = lambda match=match, label=label: bool(
            stack.api(f"label/{label}/values", **{"match[]": match})
        )
    wait_all(stack, checks)
    agents = stack.api("label/agent/values", **{"match[]": "agent_supervisor_runs_total"})
    assert {"good", "broken", "hang", "stuck", "flaky", "asker"} <= set(agents)


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_every_alert_expression_returns_data(stack: Stack) -> None:
    """Each alert rule's expression returns series in the live fleet, or, for a condition a
    short test cannot produce, evaluates cleanly over series that exist."""
    rules = alert_rules()
    checks: dict[str, Callable[[], bool]] = {}
    for name, how in LIVE_ALERT_CHECKS.items():
        expr = rules[name]["expr"]
        if how == "fires":
            checks[name] = lambda e=expr: bool(stack.query(e))
        else:
            stack.query(expr)  # a PromQL error raises here
            for underlying in how:
                checks[f"{name}: {underlying}"] = lambda e=underlying: finite(stack.query(e))
    wait_all(stack, checks)


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_no_recent_success_fires_for_a_hanging_agent(stack: Stack) -> None:
    """AgentNoRecentSuccess reaches `firing` for the agent that hangs from its first run and
    for the one that hangs after a success, and never even goes pending for the healthy one."""
    firing = 'ALERTS{alertname="AgentNoRecentSuccess", alertstate="firing", agent="%s"}'
    wait_all(
        stack,
        {agent: (lambda a=agent: bool(stack.query(firing % a))) for agent in ("hang", "stuck")},
    )
    good = stack.query('max_over_time(ALERTS{alertname="AgentNoRecentSuccess", agent="good"}[10m])')
    assert good == []
