"""The metrics/health HTTP server, served for real on a loopback port."""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import httpx2
import pytest
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp

from supervisor.metrics import CONTENT_TYPE, Metrics
from supervisor.outcome import Outcome
from supervisor.server import bind_tcp, create_app, serve_http

pytestmark = pytest.mark.integration

LIMIT_S = 10


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@asynccontextmanager
async def serving(app: ASGIApp) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1, port 0, for the block; yield its base URL, then stop it."""
    sock = bind_tcp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    shutdown = anyio.Event()
    with anyio.fail_after(LIMIT_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: serve_http(app, sock, shutdown=shutdown, grace_s=1))
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                shutdown.set()
    assert sock.fileno() == -1  # a clean stop closes the socket


async def get(url: str) -> httpx2.Response:
    with anyio.fail_after(LIMIT_S):
        async with httpx2.AsyncClient() as client:
            return await client.get(url)


async def test_metrics_endpoint_serves_the_exposition(metrics: Metrics) -> None:
    """GET /metrics answers 200 with the text format and the recorded samples."""
    metrics.observe_run(
        "digest",
        Outcome.SUCCESS,
        duration_s=1.5,
        steps=2,
        attempts=1,
        lag_s=0.01,
        finished_ts=1_767_225_600.0,
    )
    async with serving(create_app(metrics)) as base:
        response = await get(base + "/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    assert 'agent_supervisor_runs_total{agent="digest",outcome="success"} 1\n' in response.text
    assert response.content == metrics.render()[0]


@pytest.mark.parametrize(
    ("health", "status", "body"),
    [
        (None, 200, {"status": "ok"}),
        (lambda: True, 200, {"status": "ok"}),
        (lambda: False, 503, {"status": "unavailable"}),
    ],
    ids=["no-check", "ready", "not-ready"],
)
async def test_healthz_reports_readiness(
    metrics: Metrics, health: Callable[[], bool] | None, status: int, body: dict[str, str]
) -> None:
    """GET /healthz is 200 when the health check passes (or there is none), else 503."""
    async with serving(create_app(metrics, health=health)) as base:
        response = await get(base + "/healthz")
    assert response.status_code == status
    assert response.json() == body


async def test_unknown_path_and_method_are_refused(metrics: Metrics) -> None:
    """Only the two GET routes exist."""
    async with serving(create_app(metrics)) as base:
        assert (await get(base + "/")).status_code == 404
        with anyio.fail_after(LIMIT_S):
            async with httpx2.AsyncClient() as client:
                assert (await client.post(base + "/metrics")).status_code == 405


async def test_shutdown_stops_accepting_connections(metrics: Metrics) -> None:
    """After the shutdown event the port refuses connections."""
    async with serving(create_app(metrics)) as base:
        assert (await get(base + "/healthz")).status_code == 200
    with pytest.raises(httpx2.ConnectError):
        await get(base + "/healthz")


async def test_cancelling_the_server_closes_its_socket(metrics: Metrics) -> None:
    """A cancelled serve_http does not leave the listener open."""
    sock = bind_tcp("127.0.0.1", 0)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with anyio.fail_after(LIMIT_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: serve_http(create_app(metrics), sock, shutdown=anyio.Event()))
            assert (await get(base + "/healthz")).status_code == 200
            tg.cancel_scope.cancel()
    assert sock.fileno() == -1


async def test_serving_leaves_signal_handlers_to_the_daemon(metrics: Metrics) -> None:
    """uvicorn installs no SIGINT/SIGTERM handler while it serves."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    async with serving(create_app(metrics)) as base:
        await get(base + "/healthz")
        during = {sig: signal.getsignal(sig) for sig in before}
    assert during == before


async def test_uvicorn_logs_nothing_for_a_normal_life(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    """Start, requests and stop produce no uvicorn log records (no banner, no access log)."""
    caplog.set_level(logging.DEBUG)
    async with serving(create_app(metrics)) as base:
        await get(base + "/metrics")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("uvicorn")] == []


def test_bind_tcp_picks_a_free_port_and_reports_a_taken_one() -> None:
    """Port 0 yields a real port; binding a port already listening raises OSError."""
    with bind_tcp("127.0.0.1", 0) as first:
        host, port = first.getsockname()
        assert (host, first.type) == ("127.0.0.1", socket.SOCK_STREAM)
        assert port > 0
        with pytest.raises(OSError):
            bind_tcp("127.0.0.1", port)


async def test_metrics_are_gzipped_when_the_scraper_asks(metrics: Metrics) -> None:
    """Accept-Encoding gzip gets a gzip body (same exposition); identity gets plain text."""
    for i in range(200):
        metrics.add_agent(f"agent-{i:04d}", last_run_ts=1.0, last_success_ts=1.0)
    async with serving(create_app(metrics)) as base:
        with anyio.fail_after(LIMIT_S):
            async with httpx2.AsyncClient() as client:
                zipped = await client.get(base + "/metrics", headers={"accept-encoding": "gzip"})
                plain = await client.get(base + "/metrics", headers={"accept-encoding": "identity"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert "content-encoding" not in plain.headers
    assert zipped.content == plain.content == metrics.render()[0]
    assert zipped.num_bytes_downloaded * 5 < plain.num_bytes_downloaded
