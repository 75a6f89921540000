"""The digest: runs by outcome, failures, spend, budgets and pending approvals, read from a
real state directory and from the exposition the daemon's metrics produce."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from agents.digest import DigestParams, delta, digest
from supervisor import RunContext
from supervisor.effects import EffectsService, JsonlLedger
from supervisor.llm.base import Usage
from supervisor.metrics import Metrics
from supervisor.outcome import Outcome
from supervisor.state.jsonfile import JsonFileStore
from supervisor.testing import FakeClock, run_agent
from tests.agents.conftest import START, Harness, Web, closed_port

NAME = "digest"


async def worker(ctx: RunContext) -> int:
    ctx.step("work")
    return 1


async def flaky(ctx: RunContext) -> None:
    raise ValueError("the disk is full")


async def poster(ctx: RunContext) -> Any:
    async def post(key: str) -> str:
        return "posted"

    return await ctx.effect("post", "pricing", post, high_risk=True, reason="prices change")


async def fleet_state(tmp_path: Path, clock: FakeClock, runs: dict[str, int]) -> Path:
    """A state directory as the daemon leaves it, after ``runs`` of each test agent."""
    state_dir = tmp_path / "state"
    store = JsonFileStore(state_dir)
    ledger = JsonlLedger(state_dir / "effects", clock=clock)
    await ledger.open()
    effects = EffectsService(ledger, clock)
    agents = {"worker": worker, "flaky": flaky, "poster": poster}
    for name, n in runs.items():
        for _ in range(n):
            await run_agent(
                agents[name], name=name, store=store, clock=clock, services={"effects": effects}
            )
    await ledger.close()
    await store.close()
    return state_dir


def exposition() -> str:
    """What the daemon's /metrics serves after a few runs, LLM calls and budget updates."""
    metrics = Metrics(CollectorRegistry())
    for agent, outcome in [("worker", "success"), ("worker", "success"), ("flaky", "failure")]:
        metrics.observe_run(
            agent, outcome, duration_s=1, steps=1, attempts=1, lag_s=0, finished_ts=0
        )
    metrics.llm_call("analyst", "groq", "llama-3.3", "ok", 0.5, Usage(1000, 200), 0.0125, False)
    metrics.llm_call("analyst", "local", "llama3.2", "ok", 0.5, Usage(10, 2), 0.0005, False)

    def window(name: str, key: str, spent: float, limit: float | None) -> Any:
        return SimpleNamespace(
            name=name,
            key=key,
            spent_usd=spent,
            reserved_usd=0.0,
            spent_tokens=0,
            limit_usd=limit,
            limit_tokens=None,
        )

    metrics.set_budget(
        [
            window("global_day", "", 0.013, 2.0),
            window("per_agent_day", "analyst:2026-03-02", 0.013, 0.5),
        ]
    )
    return metrics.render()[0].decode()


def params(out: Path, **sources: Any) -> DigestParams:
    return DigestParams(out_dir=out, **sources)


def written(out: Path) -> str:
    (path,) = out.glob("*.md")
    return path.read_text()


async def test_reads_runs_failures_and_approvals_from_the_state_dir(
    harness: Harness, tmp_path: Path
) -> None:
    """Runs by agent and outcome, each failure with its error, each pending approval."""
    state_dir = await fleet_state(tmp_path, harness.clock, {"worker": 2, "flaky": 1, "poster": 1})
    record, _ = await harness.run(digest, params(tmp_path / "out", state_dir=state_dir), name=NAME)
    assert record.outcome is Outcome.SUCCESS, record.error
    assert record.result == {"period": "2026-03-02", "runs": 4.0, "failures": 1}
    text = written(tmp_path / "out")
    assert text.startswith("# Fleet digest 2026-03-02\n")
    assert "| agent | awaiting_approval | failure | success | total |" in text
    assert "| flaky | 0 | 1 | 0 | 1 |" in text and "| worker | 0 | 0 | 2 | 2 |" in text
    assert "## Failures (1)" in text and "flaky failure: ValueError: the disk is full" in text
    assert "## Approvals pending (1)" in text
    assert "poster post 'pricing': prices change (`agent-supervisor approve " in text


async def test_reads_spend_and_budgets_from_the_metrics_endpoint(
    harness: Harness, web: Web, tmp_path: Path
) -> None:
    """Spend by agent and model, budget left per window and per agent, runs from counters."""
    web.route("GET", "/metrics", body=exposition())
    p = params(tmp_path / "out", metrics_url=f"{web.url}/metrics")
    record, _ = await harness.run(
        digest, p, name=NAME, agent_config={"http": {"allow_hosts": ["127.0.0.1"]}}
    )
    assert record.outcome is Outcome.SUCCESS, record.error
    text = written(tmp_path / "out")
    assert "| worker | 0 | 2 | 2 |" in text and "| flaky | 1 | 0 | 1 |" in text
    assert "## LLM spend: $0.0130" in text
    assert "- analyst, groq/llama-3.3: $0.0125" in text
    assert "- global_day: $0.0130 spent, $1.9870 left of $2.00" in text
    assert "- analyst today: $0.0130 spent, $0.4870 left of $0.50" in text


async def test_a_wrong_state_dir_is_reported_and_the_runs_come_from_the_metrics(
    harness: Harness, web: Web, tmp_path: Path
) -> None:
    """A state_dir that does not exist is named in the digest; the counters stand in."""
    web.route("GET", "/metrics", body=exposition())
    p = params(tmp_path / "out", metrics_url=f"{web.url}/metrics", state_dir=tmp_path / "nope")
    record, _ = await harness.run(
        digest, p, name=NAME, agent_config={"http": {"allow_hosts": ["127.0.0.1"]}}
    )
    assert record.outcome is Outcome.SUCCESS, record.error
    text = written(tmp_path / "out")
    assert f"- {tmp_path / 'nope'}: no such directory" in text
    assert "| worker | 0 | 2 | 2 |" in text


async def test_the_next_digest_shows_only_what_changed(harness: Harness, tmp_path: Path) -> None:
    """Counters and errors are reported since the previous digest, kept in state."""
    state_dir = await fleet_state(tmp_path, harness.clock, {"worker": 1, "flaky": 1})
    p = params(tmp_path / "out", state_dir=state_dir)
    await harness.run(digest, p, name=NAME)
    harness.clock.advance(timedelta(days=1))
    await fleet_state(tmp_path, harness.clock, {"worker": 3})
    record, _ = await harness.run(digest, p, name=NAME)
    assert record.result == {"period": "2026-03-03", "runs": 3.0, "failures": 0}
    text = (tmp_path / "out" / "digest-2026-03-03.md").read_text()
    assert f"Since {START.isoformat()}." in text
    assert "| worker | 3 | 3 |" in text and "flaky" not in text
    assert "## Failures (0)\n\nNone." in text


def test_a_counter_that_went_down_was_reset() -> None:
    """After a daemon restart a counter starts again from zero: its value is all new."""
    assert delta({"a": 5.0, "b": 2.0, "c": 1.0}, {"a": 3.0, "b": 7.0}) == {
        "a": 2.0,
        "b": 2.0,
        "c": 1.0,
    }


async def test_one_digest_per_period(harness: Harness, tmp_path: Path) -> None:
    """A second run in the same period writes nothing."""
    state_dir = await fleet_state(tmp_path, harness.clock, {"worker": 1})
    p = params(tmp_path / "out", state_dir=state_dir)
    await harness.run(digest, p, name=NAME)
    harness.clock.advance(timedelta(hours=3))
    record, _ = await harness.run(digest, p, name=NAME)
    assert record.result == {"period": "2026-03-02", "skipped": "already sent for this period"}
    assert harness.effects.stats["executed"] == 1


async def test_an_unreadable_state_file_is_reported_not_fatal(
    harness: Harness, tmp_path: Path
) -> None:
    """A state file that does not parse is listed; the digest still goes out."""
    state_dir = await fleet_state(tmp_path, harness.clock, {"worker": 1})
    (state_dir / "broken.json").write_text("{not json")
    record, _ = await harness.run(digest, params(tmp_path / "out", state_dir=state_dir), name=NAME)
    assert record.outcome is Outcome.SUCCESS, record.error
    assert f"## Could not read\n\n- {state_dir / 'broken.json'}: " in written(tmp_path / "out")


async def test_an_unreachable_metrics_endpoint_fails_the_run_and_writes_nothing(
    harness: Harness, tmp_path: Path
) -> None:
    """A transient error in the run record; no digest, and the period is not used up."""
    p = params(tmp_path / "out", metrics_url=f"http://127.0.0.1:{closed_port()}/metrics")
    record, state = await harness.run(
        digest, p, name=NAME, agent_config={"http": {"allow_hosts": ["127.0.0.1"], "retries": 0}}
    )
    assert record.outcome is Outcome.FAILURE
    assert record.error_type == "TransientError" and "ConnectError" in (record.error or "")
    assert not (tmp_path / "out").exists() and "last" not in state.data


async def test_posts_the_digest_to_a_webhook(harness: Harness, web: Web, tmp_path: Path) -> None:
    """The webhook gets a Slack-compatible body, once per period."""
    state_dir = await fleet_state(tmp_path, harness.clock, {"worker": 1})
    web.route("POST", "/hook", body="ok")
    p = DigestParams(state_dir=state_dir, webhook_url=f"{web.url}/hook")
    config = {"http": {"allow_hosts": ["127.0.0.1"]}}
    for _ in range(2):
        record, _ = await harness.run(digest, p, name=NAME, agent_config=config)
        assert record.outcome is Outcome.SUCCESS, record.error
    (request,) = web.received("POST", "/hook")
    assert json.loads(request.body)["text"].startswith("# Fleet digest 2026-03-02")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"out_dir": "o"}, "metrics_url, state_dir or both", id="no-source"),
        pytest.param({"state_dir": "s"}, "out_dir, webhook_url or both", id="no-output"),
    ],
)
def test_params_are_checked(fields: dict[str, Any], message: str) -> None:
    """A digest needs something to read and somewhere to write."""
    with pytest.raises(ValidationError, match=message):
        DigestParams.model_validate(fields)
