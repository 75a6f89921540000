"""Fixtures for the reference agents' tests.

Each agent runs under the real runner (``run_agent``) with a fake clock and an in-memory
store, and the real services at the boundaries: the effects service on an in-memory ledger,
``ctx.http``, and ``ctx.llm`` against the loopback fake LLM server. Other HTTP peers (checked
endpoints, webhooks, APIs, Prometheus) are a small loopback web server in a thread.
"""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from prometheus_client import CollectorRegistry

from supervisor.effects import EffectsConfig, EffectsService, MemoryLedger
from supervisor.http import HttpService
from supervisor.llm.client import LLMService
from supervisor.llm.config import LLMConfig
from supervisor.llm.fakeserver import FakeLLMServer
from supervisor.metrics import Metrics
from supervisor.outcome import RunRecord
from supervisor.state.base import AgentState
from supervisor.testing import FakeClock, MemoryStore, run_agent

#: the fake clock's start: a Monday morning
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Request:
    """One request the web server received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class Route:
    status: int = 200
    body: str | bytes = ""
    content_type: str = "text/plain"
    #: called with the request before answering (e.g. to move the fake clock)
    on_request: Callable[[Request], None] | None = None
    #: close the connection without answering (the request may have been acted on)
    drop: bool = False


class Web:
    """A loopback HTTP/1.1 server answering scripted routes and recording every request."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.requests: list[Request] = []
        web = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("content-length") or 0)
                req = Request(
                    self.command,
                    parts.path,
                    parse_qs(parts.query),
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                )
                web.requests.append(req)
                route = web.routes.get((self.command, parts.path), Route(404, "not found"))
                if route.on_request is not None:
                    route.on_request(req)
                if route.drop:
                    self.close_connection = True
                    return
                body = route.body.encode() if isinstance(route.body, str) else route.body
                self.send_response(route.status)
                self.send_header("content-type", route.content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _serve  # the names http.server calls

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def route(
        self, method: str, path: str, status: int = 200, body: str | bytes = "", **kw: Any
    ) -> None:
        self.routes[(method, path)] = Route(status, body, **kw)

    def received(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if (r.method, r.path) == (method, path)]


@pytest.fixture
def web() -> Iterator[Web]:
    """A started loopback web server."""
    w = Web()
    w.thread.start()
    yield w
    w.server.shutdown()
    w.server.server_close()
    w.thread.join(5)


@pytest.fixture
def fake_llm() -> Iterator[FakeLLMServer]:
    """The loopback LLM server (OpenAI wire); the test fails if the server hit a bug."""
    with FakeLLMServer() as srv:
        yield srv
    assert srv.errors == []


def llm_config(base_url: str, *, aliases: dict[str, list[str]] | None = None) -> LLMConfig:
    """One provider ``fake`` at ``base_url`` with a priced model ``m1``; aliases ``smart``
    and ``fast`` are ``[fake/m1]``. No call-level retry, so a failing tier fails at once."""
    return LLMConfig.model_validate(
        {
            "providers": {
                "fake": {
                    "base_url": base_url,
                    "retry": {"attempts": 1},
                    "timeouts": {"connect": 2, "read": 5, "write": 2, "pool": 2},
                }
            },
            "models": {"fake/m1": {"price": {"input": 1.0, "output": 2.0}}},
            "aliases": aliases or {"smart": ["fake/m1"], "fast": ["fake/m1"]},
        }
    )


@dataclass
class Harness:
    """Everything an agent under test runs with; runs share its store, ledger and clock."""

    clock: FakeClock
    store: MemoryStore
    ledger: MemoryLedger
    effects: EffectsService
    http: HttpService
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    llm: LLMService | None = None

    async def use_llm(self, base_url: str) -> LLMService:
        """Plug ``ctx.llm`` in, on a provider at ``base_url``."""
        self.llm = LLMService(
            llm_config(base_url),
            {},
            store=self.store,
            clock=self.clock,
            metrics=Metrics(self.registry),
            rng=random.Random(1),
        )
        await self.llm.start()
        return self.llm

    def services(self) -> dict[str, Any]:
        found: dict[str, Any] = {"effects": self.effects, "http": self.http}
        if self.llm is not None:
            found["llm"] = self.llm
        return found

    async def run(
        self, fn: Any, params: Any, *, name: str, **options: Any
    ) -> tuple[RunRecord, AgentState]:
        """One run of ``fn`` as agent ``name`` (its state carries over between runs)."""
        return await run_agent(
            fn,
            params,
            name=name,
            store=self.store,
            clock=self.clock,
            services=self.services(),
            **options,
        )

    async def restart(self, *, lose_state: str | None = None) -> None:
        """A crash and restart: the ledger replays what was durable; with ``lose_state``,
        that agent's last commit is lost too (it died before committing)."""
        self.ledger = self.ledger.restarted()
        await self.ledger.open()
        self.effects = EffectsService(self.ledger, self.clock, config=self.effects.config)
        if lose_state is not None:
            self.store = MemoryStore()

    def answers(self, agent: str, tier: str, alias: str = "smart") -> float:
        """``llm_answers_total`` of ``agent`` for ``tier``."""
        labels = {"agent": agent, "alias": alias, "tier": tier}
        value = self.registry.get_sample_value("agent_supervisor_llm_answers_total", labels)
        return value or 0.0


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """A fresh harness: fake clock at ``START``, empty store and ledger, no LLM."""
    clock = FakeClock(START)
    ledger = MemoryLedger(clock=clock)
    await ledger.open()
    h = Harness(
        clock,
        MemoryStore(),
        ledger,
        EffectsService(ledger, clock, config=EffectsConfig()),
        HttpService(clock),
    )
    yield h
    await h.http.aclose()
    if h.llm is not None:
        await h.llm.aclose()
    await h.ledger.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use a loopback server talk to a real server: mark them."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "fake_llm" in names or "web" in names:
            item.add_marker(pytest.mark.integration)
