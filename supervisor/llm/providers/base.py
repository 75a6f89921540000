"""What every HTTP provider shares: one pooled client, error translation, SSE parsing.

httpx2 errors and HTTP statuses become ``ProviderError`` subclasses here, once::

    httpx2.TimeoutException (connect, read, write, pool)   -> ProviderTimeout
    httpx2.NetworkError, ProtocolError, ProxyError, ...     -> ProviderConnectionError
        (UnsupportedProtocol, InvalidURL, LocalProtocolError are permanent: config or bug)
    httpx2.DecodingError, a body that is not the wire format -> MalformedResponse
    a status outside 2xx (redirects are not followed)       -> ProviderStatusError
        transient: 408, 409, 429, 5xx; permanent: every other status

A stream's idle gap is bounded by the read timeout: httpx2 applies it to every socket read,
so a server that goes quiet mid-stream raises ``ProviderTimeout`` after ``timeouts.read``.

The API key lives only in request headers. Messages built here pass through ``redact``
(which also removes the provider's own key verbatim), and an httpx2 exception whose text
contains the key is not chained, so neither ``str``, ``repr`` nor a traceback shows it.
"""

from __future__ import annotations

import functools
import math
import re
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any

import anyio
import httpx2
import orjson

from supervisor.clock import Clock
from supervisor.errors import (
    MalformedResponse,
    ProviderConnectionError,
    ProviderError,
    ProviderStatusError,
    ProviderTimeout,
)
from supervisor.llm.base import ChatRequest, ChatResponse
from supervisor.llm.config import ProviderConfig

__all__ = [
    "HttpProvider",
    "SSEEvent",
    "as_int",
    "parse_json",
    "parse_retry_after",
    "redact",
    "sse_events",
    "status_error",
    "translate",
]

#: error bodies and exception texts are cut to this many characters in messages
BODY_LIMIT = 300
#: one SSE line longer than this is treated as a malformed stream
MAX_LINE = 8 * 1024 * 1024

#: how long to wait for the end of a stream after its final event
_DRAIN_LIMIT = 1.0

_TRANSIENT_STATUSES = frozenset({408, 409, 429})
_REDACTED = "[redacted]"
# `"api_key": "..."`, `x-api-key: ...`, `token=...`: keep the name, hide the value
_KEY_VALUE = re.compile(
    r"(?i)(\"?\b(?:api[_-]?key|x-api-key|authorization|access[_-]?token|secret|password)\"?"
    r"\s*[:=]\s*\"?)(?:bearer\s+)?[^\s\",}]+"
)
_KEY_LIKE = re.compile(
    r"(?i)\bbearer\s+[^\s\"',;}]+"  # Authorization values
    r"|\b(?:sk|pk|rk)-[A-Za-z0-9_\-]{8,}"  # OpenAI, Anthropic (sk-ant-), OpenRouter (sk-or-)
    r"|\b(?:gsk|xai|key|api)_[A-Za-z0-9]{8,}"  # Groq and similar prefixed keys
    r"|\bAIza[0-9A-Za-z_\-]{20,}"  # Google
    r"|\b[A-Za-z0-9_\-]{40,}"  # any long opaque token
)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with the given secrets and anything that looks like a key replaced."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            # also as repr() shows it, should it hold a control character (a stray newline)
            for form in {secret, secret.encode("unicode_escape").decode(), repr(secret)[1:-1]}:
                text = text.replace(form, _REDACTED)
    text = _KEY_VALUE.sub(lambda m: m.group(1) + _REDACTED, text)
    return _KEY_LIKE.sub(
        lambda m: "Bearer " + _REDACTED if m.group(0).lower().startswith("bearer") else _REDACTED,
        text,
    )


def _excerpt(text: str, secrets: Iterable[str | None], limit: int = BODY_LIMIT) -> str:
    """Redacted, whitespace-collapsed, at most ``limit`` characters."""
    if len(text) > 16 * limit:  # bound the regex work; drop a token the cut may have split
        text = re.sub(r"\S+$", "", text[: 16 * limit])
    text = " ".join(redact(text, secrets).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_retry_after(headers: Mapping[str, str], now: datetime) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP-date).

    An HTTP-date is taken relative to ``now``; the result is never negative. Returns
    ``None`` when neither header is present or parses.
    """
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis.strip())
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return max(0.0, value / 1000)
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
    except ValueError:
        pass
    else:
        return max(0.0, value) if math.isfinite(value) else None
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT; "-0000" parses as naive
        when = when.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def translate(
    exc: Exception, provider: str, *, secrets: Iterable[str | None] = ()
) -> ProviderError:
    """The ``ProviderError`` for an httpx2 exception (see the table in the module doc)."""
    name = type(exc).__name__
    detail = _excerpt(str(exc), secrets)
    text = f"{name}: {detail}" if detail else name
    if isinstance(exc, httpx2.TimeoutException):
        phase = {
            httpx2.ConnectTimeout: "connect",
            httpx2.ReadTimeout: "read",
            httpx2.WriteTimeout: "write",
            httpx2.PoolTimeout: "pool",
        }.get(type(exc), "")
        return ProviderTimeout(provider, f"{phase} timeout: {text}".lstrip())
    if isinstance(exc, httpx2.DecodingError):
        return MalformedResponse(provider, f"undecodable body ({text})")
    if isinstance(exc, httpx2.UnsupportedProtocol | httpx2.InvalidURL | httpx2.LocalProtocolError):
        return ProviderConnectionError(provider, text, transient=False)
    return ProviderConnectionError(provider, text)


def status_error(
    response: httpx2.Response,
    provider: str,
    now: datetime,
    *,
    secrets: Iterable[str | None] = (),
) -> ProviderStatusError:
    """The error for a non-2xx response whose body has been read."""
    status = response.status_code
    transient = status in _TRANSIENT_STATUSES or status >= 500
    try:
        body = response.text
    except (UnicodeDecodeError, LookupError):
        body = ""
    message = f"HTTP {status} {response.reason_phrase}".rstrip()
    excerpt = _excerpt(body, secrets)
    if excerpt:
        message += f": {excerpt}"
    return ProviderStatusError(
        provider,
        message,
        status=status,
        retry_after=parse_retry_after(response.headers, now),
        transient=transient,
    )


def parse_json(data: bytes, provider: str, secrets: Iterable[str | None] = ()) -> Any:
    """Parsed JSON. Raises ``MalformedResponse`` when ``data`` is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        text = data[: 16 * BODY_LIMIT].decode("utf-8", "replace")
        raise MalformedResponse(provider, f"not JSON: {_excerpt(text, secrets)!r}") from None


def as_int(value: Any) -> int | None:
    """A non-negative token count, or None (bools and other types are not counts)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One server-sent event: its ``event:`` name (``message`` by default) and data."""

    event: str
    data: str


async def _lines(response: httpx2.Response, provider: str) -> AsyncGenerator[str, None]:
    # Split on CR, LF and CRLF only, as the SSE spec says. httpx2's aiter_lines() uses
    # str.splitlines(), which also splits on U+2028, U+0085 and friends: characters a model
    # may well emit raw inside a JSON string, which would then cut the data line in two.
    buffer = b""
    pending_cr = False
    async for chunk in response.aiter_bytes():
        if pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        pending_cr = chunk.endswith(b"\r")
        buffer += chunk
        *complete, buffer = re.split(rb"\r\n|\r|\n", buffer)
        for line in complete:
            yield line.decode("utf-8", "replace")
        if len(buffer) > MAX_LINE:
            raise MalformedResponse(provider, f"an SSE line is longer than {MAX_LINE} bytes")
    if buffer:
        yield buffer.decode("utf-8", "replace")


async def sse_events(response: httpx2.Response, provider: str) -> AsyncGenerator[SSEEvent, None]:
    """Server-sent events from a streamed response; comments and ``id:``/``retry:`` skipped.

    Every read waits at most the client's read timeout, which bounds the idle gap.
    """
    event = ""
    data: list[str] = []
    async with aclosing(_lines(response, provider)) as lines:
        async for line in lines:
            if not line:
                if data:
                    yield SSEEvent(event or "message", "\n".join(data))
                event, data = "", []
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
    if data:
        yield SSEEvent(event or "message", "\n".join(data))


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # httpx2's default verification context, built once: loading the CA bundle costs tens
    # of milliseconds per client, and a context is safe to share between clients.
    return httpx2.create_ssl_context()


class HttpProvider:
    """Base for providers over HTTP: subclasses set ``path`` and implement the four hooks.

    Streams when ``request.stream`` or ``config.stream`` is set. ``transport`` is a test
    seam (``httpx2.MockTransport``); production code leaves it unset.
    """

    #: path of the completion endpoint, relative to ``config.base_url``
    path: str

    def __init__(
        self,
        name: str,
        config: ProviderConfig,
        api_key: str | None,
        clock: Clock,
        *,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.config = config
        # a key read from a file often ends with a newline, which no header may contain
        self._api_key = api_key.strip() if api_key else None
        self._clock = clock
        t = config.timeouts
        self._client = httpx2.AsyncClient(
            base_url=config.base_url,
            timeout=httpx2.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool),
            limits=httpx2.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_connections,
            ),
            verify=_ssl_context(),
            http1=True,
            http2=False,
            follow_redirects=False,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, base_url={self.config.base_url!r})"

    # -- hooks for subclasses ----------------------------------------------------------------

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        """Headers that authenticate (and version) every request."""
        raise NotImplementedError

    def build_body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        """The JSON body for ``request``."""
        raise NotImplementedError

    def parse_body(self, data: Any, request: ChatRequest) -> ChatResponse:
        """The answer from a whole JSON body. Raises ``MalformedResponse``."""
        raise NotImplementedError

    async def parse_stream(
        self, events: AsyncIterator[SSEEvent], request: ChatRequest
    ) -> ChatResponse:
        """The answer from a stream of events. Raises ``ProviderError`` subclasses."""
        raise NotImplementedError

    # -- the call ----------------------------------------------------------------------------

    async def complete(self, request: ChatRequest) -> ChatResponse:
        """Send one request (streamed or not) and return the whole answer.

        Raises ``ProviderError`` subclasses only; cancellation propagates unchanged.
        """
        stream = request.stream or self.config.stream
        try:
            content = orjson.dumps(self.build_body(request, stream=stream))
        except TypeError as exc:  # something in request.extra is not JSON
            raise ProviderError(
                self.name, f"request body is not JSON-serialisable: {exc}", transient=False
            ) from None
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream" if stream else "application/json",
            **self.auth_headers(self._api_key),
        }
        if request.idempotency_key and self.config.idempotency_header:
            headers["idempotency-key"] = request.idempotency_key
        try:
            async with self._client.stream(
                "POST", self.path, content=content, headers=headers
            ) as response:
                if not response.is_success:
                    await response.aread()
                    raise status_error(
                        response, self.name, self._clock.now(), secrets=(self._api_key,)
                    )
                content_type = response.headers.get("content-type", "")
                if stream and not content_type.startswith("application/json"):
                    async with aclosing(sse_events(response, self.name)) as events:
                        answer = await self.parse_stream(events, request)
                        await self._drain(events)
                        return answer
                # not streaming, or a server that ignored "stream" and sent one JSON body
                body = await response.aread()
                return self.parse_body(parse_json(body, self.name, (self._api_key,)), request)
        except UnicodeEncodeError:  # httpx2 encodes header values as ASCII
            raise ProviderError(
                self.name, "a request header (API key?) is not ASCII", transient=False
            ) from None
        except (httpx2.HTTPError, httpx2.StreamError, httpx2.InvalidURL) as exc:
            error = translate(exc, self.name, secrets=(self._api_key,))
            if redact(str(exc), (self._api_key,)) != str(exc):
                raise error from None  # the original text holds a key: do not chain it
            raise error from exc

    async def _drain(self, events: AsyncIterator[SSEEvent]) -> None:
        """Read what follows the final event, so the connection goes back to the pool.

        The answer is complete already: a server that keeps the stream open or breaks it now
        only costs the connection, within a short bound.
        """
        with anyio.move_on_after(min(_DRAIN_LIMIT, self.config.timeouts.read)):
            try:
                async for _ in events:
                    pass
            except (httpx2.HTTPError, httpx2.StreamError, ProviderError):
                pass

    async def aclose(self) -> None:
        """Close the HTTP client and its pooled connections."""
        await self._client.aclose()

    async def __aenter__(self) -> HttpProvider:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
