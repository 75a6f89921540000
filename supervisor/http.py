"""``ctx.http``: the agent's own HTTP client, limited to the hosts its config allows.

Every request is checked against the agent's ``http.allow_hosts`` before any connection is
made (redirects are not followed, so a redirect cannot leave the allow list), gets per-phase
timeouts, is retried (exponential backoff with full jitter) only for idempotent methods and
transient failures, carries ``Idempotency-Key`` when made inside ``ctx.effect``, passes the
loop guard, and is logged as one JSON line (method, host, path, status, duration; bodies
only when enabled, redacted by the logging layer).
"""

from __future__ import annotations

import fnmatch
import random
import time
from typing import Any

import httpx2

from supervisor.clock import Clock
from supervisor.effects.calls import current_effect
from supervisor.errors import CallRefused
from supervisor.guards.loops import fingerprint
from supervisor.guards.retry import RetryPolicy
from supervisor.logging import get_logger

_log = get_logger()

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class EgressDenied(CallRefused):
    """The host is not in the agent's ``http.allow_hosts``; nothing was sent."""


def host_allowed(host: str, patterns: list[str]) -> bool:
    """Whether ``host`` matches one of ``patterns`` (case-insensitive, ``*`` wildcards)."""
    host = host.lower().rstrip(".")
    return any(fnmatch.fnmatchcase(host, p.lower()) for p in patterns)


class HttpService:
    """One shared connection pool for every agent; ``for_run`` gives each run its view."""

    def __init__(self, clock: Clock, metrics: Any = None, max_connections: int = 100) -> None:
        self.clock = clock
        self.metrics = metrics
        self.client = httpx2.AsyncClient(
            follow_redirects=False,
            limits=httpx2.Limits(max_connections=max_connections),
        )
        self.rng = random.Random()

    def for_run(self, ctx: Any) -> AgentHTTP:
        return AgentHTTP(self, ctx)

    async def aclose(self) -> None:
        await self.client.aclose()


class AgentHTTP:
    """``ctx.http`` for one run."""

    def __init__(self, service: HttpService, ctx: Any) -> None:
        self._svc = service
        self._ctx = ctx
        cfg = getattr(ctx.config, "http", None)
        self.allow_hosts: list[str] = list(cfg.allow_hosts) if cfg else []
        self.timeout = httpx2.Timeout(
            cfg.timeout if cfg else 30.0, connect=cfg.connect_timeout if cfg else 5.0
        )
        self.retries = cfg.retries if cfg else 2
        self.log_bodies = bool(cfg and cfg.log_bodies)

    async def get(self, url: str, **kwargs: Any) -> httpx2.Response:
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> httpx2.Response:
        return await self.request("POST", url, **kwargs)

    async def put(self, url: str, **kwargs: Any) -> httpx2.Response:
        return await self.request("PUT", url, **kwargs)

    async def delete(self, url: str, **kwargs: Any) -> httpx2.Response:
        return await self.request("DELETE", url, **kwargs)

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx2.Response:
        """Send one request (with retries for idempotent methods).

        Raises ``EgressDenied`` before any connection when the host is not allowed,
        ``LoopDetected`` when the same call repeats too often, and httpx2's errors when the
        request finally fails.
        """
        method = method.upper()
        request = self._svc.client.build_request(method, url, timeout=self.timeout, **kwargs)
        host = request.url.host
        if not host_allowed(host, self.allow_hosts):
            if self._svc.metrics is not None:
                self._svc.metrics.http_refused(self._ctx.agent)
            _log.warning("http.refused", method=method, host=host, rule="http.allow_hosts")
            raise EgressDenied(
                "egress",
                f"agent {self._ctx.agent!r}: host {host!r} is not in http.allow_hosts "
                f"({', '.join(self.allow_hosts) or 'empty'})",
            )
        effect = current_effect()
        if effect is not None and effect.idempotency_header:
            request.headers.setdefault("Idempotency-Key", effect.idempotency_key)
        fp = fingerprint(method, str(request.url), request.content)
        self._ctx.call_started("http", fp)
        response: httpx2.Response | None = None
        try:
            response = await self._send(method, request)
            return response
        finally:
            answer = (
                fingerprint(response.status_code, response.content)
                if response is not None
                else None
            )
            self._ctx.call_finished("http", fp, answer, failed=response is None)

    async def _send(self, method: str, request: httpx2.Request) -> httpx2.Response:
        retry = method in IDEMPOTENT and self.retries > 0
        policy = RetryPolicy(max_attempts=self.retries + 1, base_delay=0.5, max_delay=10.0)
        attempt = 0
        while True:
            attempt += 1
            t0 = time.perf_counter()
            try:
                response = await self._svc.client.send(request)
                await response.aread()
            except httpx2.TransportError as exc:
                self._log(request, attempt, None, time.perf_counter() - t0, type(exc).__name__)
                delay = policy.next_delay(attempt, 0.0, rng=self._svc.rng) if retry else None
                if delay is None:
                    raise
            else:
                self._log(request, attempt, response, time.perf_counter() - t0, None)
                if self._svc.metrics is not None:
                    self._svc.metrics.http_request(self._ctx.agent, response.status_code)
                if not (retry and response.status_code in TRANSIENT_STATUS):
                    return response
                delay = policy.next_delay(attempt, 0.0, rng=self._svc.rng)
                if delay is None:
                    return response
            self._ctx.touch("http.backoff", request.url.host, grace=delay)
            await self._svc.clock.sleep(delay)

    def _log(
        self,
        request: httpx2.Request,
        attempt: int,
        response: httpx2.Response | None,
        took: float,
        error: str | None,
    ) -> None:
        fields: dict[str, Any] = {
            "method": request.method,
            "host": request.url.host,
            "path": request.url.path,
            "status": response.status_code if response is not None else None,
            "attempt": attempt,
            "duration_s": round(took, 6),
        }
        if error:
            fields["error"] = error
        if self.log_bodies:
            fields["request_body"] = request.content[:2000].decode(errors="replace")
            if response is not None:
                fields["response_body"] = response.content[:2000].decode(errors="replace")
        self._ctx.trace_event("http.call", **{k: v for k, v in fields.items() if "body" not in k})
        _log.info("http.call", **fields)
