"""``ctx.llm`` in the real daemon, against a fake LLM server the test starts on loopback.

The daemon is a subprocess (``python -m supervisor run``); its API key comes from the
environment (``AGENT_SUPERVISOR_SECRETS__<NAME>``), as in production. What it spent is read
from its /metrics endpoint and from the budget ledger it keeps in the state dir.
"""

from __future__ import annotations

import signal
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from supervisor.llm.fakeserver import FakeLLMServer, Fault
from tests.e2e.conftest import Daemon, fleet_config

pytestmark = pytest.mark.e2e

KEY = "e2e-Distinct-LLM-Key-4471"
ENV = {"AGENT_SUPERVISOR_SECRETS__FAKE_LLM_KEY": KEY}
PRICE = {"input": 10.0, "output": 30.0}  # USD per 1M tokens
COST = "agent_supervisor_llm_cost_usd_total"
EPS = 1e-9  # float sums of per-call costs, against limits kept in nano-dollars


@pytest.fixture
def llm_server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv
    assert srv.errors == []


def llm_section(srv: FakeLLMServer, *, chain: list[str], **extra: Any) -> dict[str, Any]:
    """Providers ``primary`` and ``backup`` on the fake server; alias ``writer`` = ``chain``."""
    provider = {
        "base_url": srv.openai_base_url,
        "api_key": {"secret": "FAKE_LLM_KEY"},
        "retry": {"attempts": 2, "base_delay": 0.01, "max_delay": 0.05},
    }
    return {
        "providers": {"primary": provider, "backup": provider},
        "models": {
            "primary/writer-1": {"price": PRICE},
            "backup/writer-2": {"price": PRICE},
        },
        "aliases": {"writer": chain},
        "default_max_tokens": 100,
        **extra,
    }


def config(srv: FakeLLMServer, agents: str, *, chain: list[str], **llm: Any) -> str:
    return fleet_config(agents, llm=llm_section(srv, chain=chain, **llm))


def ledger(d: Daemon) -> dict[str, Any]:
    """The budget ledger document the daemon keeps in its state dir."""
    raw = (d.config.parent / "state" / "_budget.json").read_bytes()
    doc: dict[str, Any] = orjson.loads(raw)
    return doc


def spend_by_run(d: Daemon, agent: str) -> dict[str, float]:
    """USD charged per run of ``agent``, summed from its ``llm.call`` log lines."""
    out: dict[str, float] = defaultdict(float)
    for line in list(d.lines):
        if line.get("event") == "llm.call" and line.get("agent") == agent:
            out[line["run_id"]] += line["cost_usd"]
    return dict(out)


RUNAWAY = """
agents:
  - name: tight
    run: "llm_agents:runaway"
    schedule: every 1s
    guards: {circuit: {failures: 0}}  # keep firing after budget_exceeded runs
    llm: {per_run: {usd: 0.01}, per_agent_day: {usd: 0.025}}
  - name: bounded
    run: "llm_agents:runaway"
    schedule: every 1s
    guards: {max_steps: 30}
    llm: {per_run: {usd: 1.0}}
"""


def test_runaway_agents_are_stopped_by_budget_or_steps(daemon_factory, llm_server) -> None:
    """An agent calling the model in an endless loop is stopped by whichever of budget or
    steps comes first, and the bill is at most the configured limit: per run, per agent
    and day (from the log lines, /metrics and the ledger file)."""
    d = daemon_factory(
        config(
            llm_server,
            RUNAWAY,
            chain=["primary/writer-1"],
            budgets={"global_day": {"usd": 0.5}},
        ),
        env=ENV,
    ).ready()

    # tight: the per-run budget ends each run; the daily one ends the agent's day.
    runs = d.event("run.finished", timeout=20, count=6, agent="tight")[:6]
    assert [r["outcome"] for r in runs] == ["budget_exceeded"] * 6
    assert all(r["error_type"] == "BudgetExceeded" for r in runs)
    assert runs[0]["steps"] < 200 and runs[0]["partial"]["posts"] >= 5
    assert "per_run" not in runs[0]["error"] and "run budget (" in runs[0]["error"]
    # About 0.007 a run against 0.025 a day: by the sixth run the day's budget is gone and
    # the first call is refused before any traffic.
    assert runs[5]["steps"] == 1 and "agent_day budget (tight" in runs[5]["error"]
    per_run = spend_by_run(d, "tight")
    assert per_run and max(per_run.values()) <= 0.01 + EPS

    # bounded: 30 calls (30 steps) cost far less than its budget: max_steps ends it.
    bounded = d.event("run.finished", timeout=20, agent="bounded")[0]
    assert (bounded["outcome"], bounded["steps"]) == ("max_steps", 30)
    assert spend_by_run(d, "bounded")[bounded["run_id"]] <= 1.0

    labels = {"provider": "primary", "model": "writer-1"}
    tight_bill = d.sample(COST, agent="tight", **labels)
    assert tight_bill is not None and 0.01 < tight_bill <= 0.025 + EPS
    assert sum(per_run.values()) == pytest.approx(tight_bill)
    doc = ledger(d)
    assert 0.01 < doc["agent_day"]["tight"]["usd"] <= 0.025
    assert doc["global_day"]["usd"] <= 0.5
    assert d.sample("agent_supervisor_runs_total", agent="tight", outcome="budget_exceeded") >= 6
    assert d.sample("agent_supervisor_runs_total", agent="bounded", outcome="max_steps") >= 1
    assert d.sample("agent_supervisor_llm_refused_total", agent="tight", reason="budget") >= 6

    # The key went to the provider and nowhere into the logs.
    assert llm_server.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert not any(KEY.encode() in raw for raw in d.raw)


LADDER = """
agents:
  - {name: ladder, run: "llm_agents:ask", schedule: every 1s}
"""


def test_provider_down_makes_the_run_succeed_on_the_second_model(
    daemon_factory, llm_server
) -> None:
    """The first provider answers 503 to everything: the run succeeds on the second one,
    the log says llm.fallback and the metrics count an answer of tier 1."""
    llm_server.script("writer-1", [Fault.status(503)] * 1000)
    d = daemon_factory(
        config(llm_server, LADDER, chain=["primary/writer-1", "backup/writer-2"]), env=ENV
    ).ready()

    run = d.event("run.finished", timeout=15, agent="ladder")[0]
    assert run["outcome"] == "success"
    assert run["result"] == {
        "tier": "1",
        "provider": "backup",
        "model": "writer-2",
        "degraded": True,
        "text": "echo: one line, please",
    }
    hop = d.event("llm.fallback", agent="ladder")[0]
    assert (hop["failed"], hop["reason"], hop["run_id"]) == (
        "primary/writer-1",
        "http_503",
        run["run_id"],
    )
    answers = "agent_supervisor_llm_answers_total"
    assert d.sample(answers, agent="ladder", alias="writer", tier="1") >= 1
    assert d.sample(answers, agent="ladder", alias="writer", tier="0") is None
    assert llm_server.count(model="writer-1") >= 2  # both attempts of the first tier were made


SPENDER = """
agents:
  - {name: spender, run: "llm_agents:runaway", schedule: every 1s}
"""


def test_restart_keeps_the_days_spend(daemon_factory, llm_server, tmp_path: Path) -> None:
    """The day's spend survives SIGTERM and a restart: the budget gauge shows it at once and
    the next call is refused without reaching the provider."""
    text = config(
        llm_server, SPENDER, chain=["primary/writer-1"], budgets={"global_day": {"usd": 0.01}}
    )
    first = daemon_factory(text, env=ENV).ready()
    run = first.event("run.finished", timeout=15, agent="spender")[0]
    assert run["outcome"] == "budget_exceeded"
    first.signal(signal.SIGTERM)
    assert first.wait(20) == 0
    spent = ledger(first)["global_day"]["usd"]
    requests = llm_server.count()
    assert 0 < spent <= 0.01
    assert requests == run["steps"] - 1  # the last step was the refused call

    second = daemon_factory(text, env=ENV).ready()
    gauge = second.sample("agent_supervisor_llm_budget_spent_usd", window="global_day")
    assert gauge == pytest.approx(spent)
    again = second.event("run.finished", timeout=15, agent="spender")[0]
    assert again["outcome"] == "budget_exceeded" and again["steps"] == 1
    assert "global_day budget" in again["error"]
    assert llm_server.count() == requests  # refused before any traffic
    assert ledger(second)["global_day"]["usd"] == pytest.approx(spent)
    assert (tmp_path / "state" / "_budget.json").is_file()  # fleet_config's state_dir
