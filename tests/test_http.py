"""ctx.http: egress allow list before any connection, retries for idempotent methods only,
Idempotency-Key inside effects, one log line per call."""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO

import orjson
import pytest
from prometheus_client import CollectorRegistry

from supervisor import RunContext
from supervisor.http import EgressDenied, HttpService, host_allowed
from supervisor.llm.fakeserver import FakeLLMServer
from supervisor.logging import configure_logging
from supervisor.metrics import Metrics
from supervisor.outcome import Outcome
from supervisor.testing import FakeClock, run_agent


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


def _service() -> tuple[HttpService, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return HttpService(FakeClock(), metrics), metrics


@pytest.mark.parametrize(
    ("host", "patterns", "allowed"),
    [
        ("api.example.com", ["api.example.com"], True),
        ("API.example.com.", ["api.example.com"], True),
        ("x.example.com", ["*.example.com"], True),
        ("example.com", ["*.example.com"], False),
        ("evil.com", ["api.example.com"], False),
        ("anything", [], False),
    ],
    ids=["exact", "case-and-dot", "wildcard", "wildcard-not-apex", "other-host", "empty-list"],
)
def test_host_allow_list(host: str, patterns: list[str], allowed: bool) -> None:
    """Hosts match exactly or by wildcard, case-insensitively; an empty list allows nothing."""
    assert host_allowed(host, patterns) is allowed


async def test_host_outside_the_allow_list_fails_before_any_connection(
    server: FakeLLMServer,
) -> None:
    """A disallowed host raises EgressDenied naming agent and rule; the server sees nothing."""
    http, metrics = _service()

    async def agent(ctx: RunContext) -> None:
        await ctx.http.get(server.base_url + "/v1/models")

    record, _ = await run_agent(
        agent, services={"http": http}, agent_config={"http": {"allow_hosts": ["example.org"]}}
    )
    await http.aclose()
    assert record.outcome is Outcome.FAILURE
    assert "http.allow_hosts" in (record.error or "") and "agent-under-test" in (record.error or "")
    assert server.count() == 0
    assert (
        metrics.registry.get_sample_value(
            "agent_supervisor_http_refused_total", {"agent": "agent-under-test"}
        )
        == 1
    )
    assert issubclass(EgressDenied, Exception)


async def test_get_is_retried_on_connection_errors_post_is_not() -> None:
    """A refused connection: GET is retried (1 + 2 attempts), POST is tried once."""
    import socket

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    out = BytesIO()
    configure_logging("info", stream=out)
    http, _ = _service()
    allow = {"http": {"allow_hosts": ["127.0.0.1"], "retries": 2}}

    async def get(ctx: RunContext) -> None:
        await ctx.http.get(f"http://127.0.0.1:{port}/x")

    async def post(ctx: RunContext) -> None:
        await ctx.http.post(f"http://127.0.0.1:{port}/x", json={})

    for fn in (get, post):
        record, _ = await run_agent(fn, services={"http": http}, agent_config=allow)
        assert record.outcome is Outcome.FAILURE and "ConnectError" in (record.error or "")
    await http.aclose()
    calls = [orjson.loads(x) for x in out.getvalue().splitlines()]
    methods = [c["method"] for c in calls if c.get("event") == "http.call"]
    assert methods.count("GET") == 3 and methods.count("POST") == 1


async def test_one_log_line_per_call_without_bodies_by_default(server: FakeLLMServer) -> None:
    """Each call logs method, host, path, status and duration; no bodies unless enabled."""
    out = BytesIO()
    configure_logging("info", stream=out)
    http, _ = _service()

    async def agent(ctx: RunContext) -> None:
        await ctx.http.post(
            server.base_url + "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "secret-ish body"}]},
        )

    await run_agent(
        agent, services={"http": http}, agent_config={"http": {"allow_hosts": ["127.0.0.1"]}}
    )
    await http.aclose()
    lines = [orjson.loads(x) for x in out.getvalue().splitlines()]
    calls = [x for x in lines if x.get("event") == "http.call"]
    assert len(calls) == 1
    call = calls[0]
    assert call["method"] == "POST" and call["host"] == "127.0.0.1"
    assert call["path"] == "/v1/chat/completions" and call["status"] == 200
    assert "request_body" not in call and b"secret-ish body" not in out.getvalue()
