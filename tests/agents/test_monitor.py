"""The monitor: each kind of check, one alert per change of state (never repeated for the
same outage, not even by retries), the triage line, and both alert targets."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSListener
from pydantic import ValidationError

from agents.monitor import MonitorParams, monitor
from supervisor.llm.fakeserver import FakeLLMServer, Fault
from supervisor.outcome import Outcome
from supervisor.testing import FakeClock
from tests.agents.conftest import START, Harness, Web, closed_port

NAME = "monitor"
LOCAL = {"http": {"allow_hosts": ["127.0.0.1"], "retries": 0}}


def alerts(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def tcp(port: int, name: str = "db") -> dict[str, Any]:
    return {"name": name, "type": "tcp", "host": "127.0.0.1", "port": port, "timeout": 2}


def to_file(tmp_path: Path, *checks: dict[str, Any], **extra: Any) -> MonitorParams:
    return MonitorParams.model_validate(
        {"checks": list(checks), "alert_file": tmp_path / "alerts.jsonl", **extra}
    )


@pytest.fixture
def listening() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel's backlog answers them)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


async def test_up_at_first_sight_says_nothing(
    harness: Harness, listening: int, tmp_path: Path
) -> None:
    """A check first seen up sends no alert; its status is kept in state."""
    record, state = await harness.run(monitor, to_file(tmp_path, tcp(listening)), name=NAME)
    assert record.outcome is Outcome.SUCCESS, record.error
    assert record.result == {"db": "up"}
    assert alerts(tmp_path / "alerts.jsonl") == []
    entry = state.data["checks"]["db"]
    assert entry["up"] is True and entry["detail"] == f"tcp 127.0.0.1:{listening}: open"


async def test_one_alert_per_change_of_state(harness: Harness, tmp_path: Path) -> None:
    """Down: one alert, however many runs see it down; up again: one recovery alert;
    down again: a new alert, under a new key."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        p = to_file(tmp_path, tcp(port))
        for _ in range(3):
            record, _ = await harness.run(monitor, p, name=NAME)
            assert record.result == {"db": "down"}
            harness.clock.advance(60)
        (down,) = alerts(tmp_path / "alerts.jsonl")
        assert down["transition"] == "down" and down["key"] == f"db:down:{START.isoformat()}"
        assert "Connection refused" in down["detail"] and down["idempotency_key"]
        assert "nothing listens on the port" in down["cause"]
        assert down["text"].startswith(f"DOWN db since {START.isoformat()}")

        s.listen(8)
        for _ in range(2):
            await harness.run(monitor, p, name=NAME)
            harness.clock.advance(60)
        _, recovered = alerts(tmp_path / "alerts.jsonl")
        assert recovered["transition"] == "recovered"
        assert f"(down since {START.isoformat()})" in recovered["text"]

    await harness.run(monitor, p, name=NAME)
    assert [a["transition"] for a in alerts(tmp_path / "alerts.jsonl")] == [
        "down",
        "recovered",
        "down",
    ]
    assert harness.effects.stats["executed"] == 3


@pytest.mark.parametrize(
    ("route", "check", "detail", "cause"),
    [
        pytest.param(
            {"status": 503}, {}, "HTTP 503, expected 200", "the service runs but fails", id="status"
        ),
        pytest.param(
            {"body": "hello"},
            {"expect_text": "ready"},
            "the body lacks 'ready'",
            "the page changed",
            id="text",
        ),
        pytest.param(
            {"body": "ok"},
            {"max_latency": 1.0},
            "took 3.00s, over 1.0s",
            "the service is slow",
            id="latency",
        ),
    ],
)
async def test_http_check_failures(
    harness: Harness,
    web: Web,
    tmp_path: Path,
    route: dict[str, Any],
    check: dict[str, Any],
    detail: str,
    cause: str,
) -> None:
    """Status, body text and latency each make an HTTP check fail, with a rule-based cause."""
    slow = (lambda _req: harness.clock.advance(3)) if "max_latency" in check else None
    web.route("GET", "/health", on_request=slow, **route)
    p = to_file(tmp_path, {"name": "api", "type": "http", "url": f"{web.url}/health", **check})
    record, _ = await harness.run(monitor, p, name=NAME, agent_config=LOCAL)
    assert record.result == {"api": "down"}, record.error
    (alert,) = alerts(tmp_path / "alerts.jsonl")
    assert detail in alert["detail"] and cause in alert["cause"]


async def test_http_check_up(harness: Harness, web: Web, tmp_path: Path) -> None:
    """The expected status and text, in time: up."""
    web.route("GET", "/metrics", body="agent_supervisor_runs_total 3")
    check = {"name": "m", "type": "http", "url": f"{web.url}/metrics", "expect_text": "runs_total"}
    record, state = await harness.run(
        monitor, to_file(tmp_path, check), name=NAME, agent_config=LOCAL
    )
    assert record.result == {"m": "up"}
    assert state.data["checks"]["m"]["detail"].startswith(f"GET {web.url}/metrics: HTTP 200 in ")


async def test_an_unreachable_http_endpoint_is_down(harness: Harness, tmp_path: Path) -> None:
    """Connection refused is the check's failure, not the run's."""
    url = f"http://127.0.0.1:{closed_port()}/"
    p = to_file(tmp_path, {"name": "api", "type": "http", "url": url})
    record, _ = await harness.run(monitor, p, name=NAME, agent_config=LOCAL)
    assert record.outcome is Outcome.SUCCESS and record.result == {"api": "down"}
    (alert,) = alerts(tmp_path / "alerts.jsonl")
    assert "ConnectError" in alert["detail"] and "nothing listens" in alert["cause"]


async def test_a_host_not_allowed_fails_the_run_clearly(harness: Harness, tmp_path: Path) -> None:
    """A check on a host outside http.allow_hosts is a config error, raised as itself."""
    p = to_file(tmp_path, {"name": "api", "type": "http", "url": "http://example.com/"})
    record, _ = await harness.run(monitor, p, name=NAME, agent_config=LOCAL)
    assert record.outcome is Outcome.FAILURE
    assert record.error_type == "EgressDenied" and "http.allow_hosts" in (record.error or "")


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture
def make_cert(tmp_path: Path) -> Any:
    """A self-signed certificate for 127.0.0.1, valid ``days`` from now."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")

    def make(days: int) -> tuple[Path, Path]:
        cert, key = tmp_path / f"cert{days}.pem", tmp_path / f"key{days}.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-days", str(days), "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        return cert, key

    return make


@asynccontextmanager
async def tls_server(cert: Path, key: Path) -> AsyncIterator[int]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    tcp_listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    listener = TLSListener(tcp_listener, context, standard_compatible=False)

    async def handle(stream: Any) -> None:
        await stream.aclose()

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield tcp_listener.extra(SocketAttribute.local_port)
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("days", "min_days", "trusted", "up", "detail"),
    [
        pytest.param(90, 14, True, True, "certificate valid for 90 more days", id="valid"),
        pytest.param(10, 14, True, False, "certificate expires in 10.0 days", id="expiring"),
        pytest.param(90, 14, False, False, "certificate verify failed", id="untrusted"),
    ],
)
async def test_tls_check(
    harness: Harness,
    make_cert: Any,
    tmp_path: Path,
    days: int,
    min_days: int,
    trusted: bool,
    up: bool,
    detail: str,
) -> None:
    """The handshake must succeed, and the certificate last ``min_days`` more."""
    harness.clock = FakeClock(datetime.now(UTC))  # certificates live in real time
    cert, key = make_cert(days)
    async with tls_server(cert, key) as port:
        check = {
            "name": "site",
            "type": "tls",
            "host": "127.0.0.1",
            "port": port,
            "min_days": min_days,
        }
        if trusted:
            check["ca_file"] = cert
        record, state = await harness.run(monitor, to_file(tmp_path, check), name=NAME)
    assert record.outcome is Outcome.SUCCESS, record.error
    assert state.data["checks"]["site"]["up"] is up
    assert detail in state.data["checks"]["site"]["detail"]


# -- the webhook target -----------------------------------------------------------------------


def to_hook(url: str, *checks: dict[str, Any]) -> MonitorParams:
    return MonitorParams.model_validate({"checks": list(checks), "alert_url": url})


async def test_a_webhook_gets_each_alert_once_with_its_idempotency_key(
    harness: Harness, web: Web
) -> None:
    """The alert is POSTed as JSON with a Slack-compatible text."""
    web.route("POST", "/alerts", body="ok")
    p = to_hook(f"{web.url}/alerts", tcp(closed_port()))
    for _ in range(2):
        record, _ = await harness.run(monitor, p, name=NAME, agent_config=LOCAL)
        assert record.outcome is Outcome.SUCCESS, record.error
    (request,) = web.received("POST", "/alerts")
    body = json.loads(request.body)
    assert body["text"].startswith("DOWN db since") and body["key"].startswith("db:down:")
    assert request.headers["idempotency-key"]


async def test_an_alert_that_could_not_be_sent_goes_out_later_under_the_same_key(
    harness: Harness, web: Web
) -> None:
    """Webhook down: the run fails (transient), the alert stays pending in state; the run
    retry and the next run send it under the key of the original transition, once."""
    port = closed_port()
    web.route("POST", "/alerts", 503, "down")
    p = to_hook(f"{web.url}/alerts", tcp(port))
    record, state = await harness.run(monitor, p, name=NAME, agent_config=LOCAL, retry_attempts=2)
    assert record.outcome is Outcome.FAILURE and record.attempts == 2
    assert record.error_type == "TransientError" and "1 alert(s) not sent" in (record.error or "")
    assert state.data["checks"]["db"]["alerted"] is False
    first = [json.loads(r.body)["key"] for r in web.received("POST", "/alerts")]
    assert first == [f"db:down:{START.isoformat()}"] * 2

    harness.clock.advance(timedelta(minutes=5))
    web.route("POST", "/alerts", 200, "ok")
    record, state = await harness.run(monitor, p, name=NAME, agent_config=LOCAL)
    assert record.outcome is Outcome.SUCCESS, record.error
    keys = [json.loads(r.body)["key"] for r in web.received("POST", "/alerts")]
    assert keys == first + first[:1]
    assert state.data["checks"]["db"]["alerted"] is True
    await harness.run(monitor, p, name=NAME, agent_config=LOCAL)
    assert len(web.received("POST", "/alerts")) == 3


async def test_an_alert_of_unknown_fate_is_held_and_never_sent_twice(
    harness: Harness, web: Web
) -> None:
    """The webhook dropped the connection after reading the alert: it may have gone out.
    The ledger holds it for a human; the monitor goes on and never sends it again."""
    web.route("POST", "/alerts", drop=True)
    p = to_hook(f"{web.url}/alerts", tcp(closed_port()))
    record, _ = await harness.run(monitor, p, name=NAME, agent_config=LOCAL)
    assert record.outcome is Outcome.FAILURE
    web.route("POST", "/alerts", body="ok")
    record, state = await harness.run(monitor, p, name=NAME, agent_config=LOCAL)
    assert record.outcome is Outcome.SUCCESS, record.error
    assert state.data["checks"]["db"]["alerted"] is True
    assert len(web.received("POST", "/alerts")) == 1
    assert harness.effects.stats["held_unknown"] == 1


# -- triage -----------------------------------------------------------------------------------


async def test_the_model_writes_the_likely_cause(
    harness: Harness, fake_llm: FakeLLMServer, tmp_path: Path
) -> None:
    """With triage_alias, a down alert carries the model's one line."""
    await harness.use_llm(fake_llm.openai_base_url)
    fake_llm.reply("m1", "The database service crashed.\nMore words nobody reads.")
    p = to_file(tmp_path, tcp(closed_port()), triage_alias="fast")
    await harness.run(monitor, p, name=NAME)
    (alert,) = alerts(tmp_path / "alerts.jsonl")
    assert alert["cause"] == "The database service crashed."
    assert "<<<UNTRUSTED source=check" in fake_llm.requests[0].body["messages"][1]["content"]


async def test_without_a_model_the_rules_give_the_cause(
    harness: Harness, fake_llm: FakeLLMServer, tmp_path: Path
) -> None:
    """The model fails: the rule-based cause, and the alert still goes out."""
    await harness.use_llm(fake_llm.openai_base_url)
    fake_llm.enqueue(Fault.status(500), Fault.status(500))
    p = to_file(tmp_path, tcp(closed_port()), triage_alias="fast")
    record, _ = await harness.run(monitor, p, name=NAME)
    assert record.outcome is Outcome.SUCCESS, record.error
    (alert,) = alerts(tmp_path / "alerts.jsonl")
    assert "nothing listens on the port" in alert["cause"]
    assert harness.answers(NAME, "rule_based", alias="fast") == 1


async def test_a_refused_model_call_does_not_hold_the_alert_back(
    harness: Harness, fake_llm: FakeLLMServer, tmp_path: Path
) -> None:
    """An alias this agent may not use is refused; the rules answer instead."""
    await harness.use_llm(fake_llm.openai_base_url)
    p = to_file(tmp_path, tcp(closed_port()), triage_alias="smart")
    record, _ = await harness.run(
        monitor, p, name=NAME, agent_config={"llm": {"aliases": ["fast"]}}
    )
    assert record.outcome is Outcome.SUCCESS, record.error
    (alert,) = alerts(tmp_path / "alerts.jsonl")
    assert "nothing listens" in alert["cause"] and fake_llm.count() == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param(
            {"checks": [tcp(1), tcp(2)], "alert_file": "a"},
            "check names must be unique",
            id="dup-names",
        ),
        pytest.param(
            {"checks": [tcp(1)]}, "exactly one of alert_url or alert_file", id="no-target"
        ),
        pytest.param(
            {"checks": [{"name": "x", "type": "ping"}], "alert_file": "a"},
            "does not match any of the expected tags",
            id="bad-type",
        ),
    ],
)
def test_params_are_checked(fields: dict[str, Any], message: str) -> None:
    """Bad checks and targets are config errors, found by `agent-supervisor check`."""
    with pytest.raises(ValidationError, match=message):
        MonitorParams.model_validate(fields)
