"""OpenAI and Anthropic providers: wire formats, error translation, timeouts, secrecy.

Tests that take ``fake_llm`` talk to a real HTTP server on loopback (marked integration by
the conftest); the rest use ``httpx2.MockTransport`` or no network at all.
"""

from __future__ import annotations

import socket
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import anyio
import httpx2
import orjson
import pytest

from supervisor.errors import (
    MalformedResponse,
    ProviderConnectionError,
    ProviderError,
    ProviderStatusError,
    ProviderTimeout,
)
from supervisor.llm.base import ChatRequest, ChatResponse, Message, Provider, Usage
from supervisor.llm.config import ProviderConfig, TimeoutsConfig
from supervisor.llm.fakeserver import ANTHROPIC_PATH, OPENAI_PATH, FakeLLMServer, Fault
from supervisor.llm.providers import (
    AnthropicProvider,
    HttpProvider,
    OpenAIProvider,
    build_provider,
)
from supervisor.llm.providers.base import (
    parse_retry_after,
    redact,
    sse_events,
    status_error,
    translate,
)
from supervisor.testing import FakeClock

KEY = "sk-test-ZQX9distinctive0key0value7781"
NOW = datetime(2026, 1, 1, tzinfo=UTC)

WIRES = [("openai", False), ("openai", True), ("anthropic", False), ("anthropic", True)]
WIRE_IDS = ["openai-json", "openai-sse", "anthropic-json", "anthropic-sse"]


def config(kind: str, base_url: str, *, read: float = 5.0, **kw: Any) -> ProviderConfig:
    timeouts = TimeoutsConfig(connect=2.0, read=read, write=2.0, pool=2.0)
    return ProviderConfig(kind=kind, base_url=base_url, timeouts=timeouts, **kw)


def chat(text: str = "hello there", **kw: Any) -> ChatRequest:
    messages = (Message("system", "be brief"), Message("user", text))
    return ChatRequest(model=kw.pop("model", "m1"), messages=messages, max_tokens=100, **kw)


def assert_no_key(exc: BaseException) -> None:
    """Neither the error nor anything a traceback would print shows the key."""
    assert KEY not in str(exc)
    assert KEY not in repr(exc)
    assert KEY not in "".join(traceback.format_exception(exc))


class Wire:
    def __init__(self, kind: str, stream: bool, srv: FakeLLMServer) -> None:
        self.kind, self.stream, self.srv = kind, stream, srv
        self.path = OPENAI_PATH if kind == "openai" else ANTHROPIC_PATH
        self.base_url = srv.openai_base_url if kind == "openai" else srv.anthropic_base_url
        self.made: list[HttpProvider] = []

    def provider(self, *, read: float = 5.0, api_key: str | None = KEY, **kw: Any) -> Provider:
        cfg = config(self.kind, self.base_url, read=read, stream=self.stream, **kw)
        provider = build_provider(self.kind, cfg, api_key, FakeClock(NOW))
        assert isinstance(provider, HttpProvider)
        self.made.append(provider)
        return provider


@pytest.fixture(params=WIRES, ids=WIRE_IDS)
async def wire(request: pytest.FixtureRequest, fake_llm: FakeLLMServer) -> AsyncIterator[Wire]:
    """Each provider kind, streamed and not, against the fake server."""
    kind, stream = request.param
    w = Wire(kind, stream, fake_llm)
    yield w
    for provider in w.made:
        await provider.aclose()


async def fails(provider: Provider, request: ChatRequest | None = None) -> ProviderError:
    """The ProviderError one call raises (within a bound), checked for key leaks."""
    with anyio.fail_after(5), pytest.raises(ProviderError) as info:
        await provider.complete(request or chat())
    assert_no_key(info.value)
    return info.value


# -- happy paths ------------------------------------------------------------------------------


async def test_happy_path_returns_text_and_usage(wire: Wire) -> None:
    """A normal answer carries the reply text, the model, a finish reason and usage."""
    response = await wire.provider().complete(chat("hello there"))
    # prompt "be brief" + "hello there" = 19 chars -> 5 tokens; "echo: hello there" -> 5
    assert response == ChatResponse(
        text="echo: hello there",
        model="m1",
        usage=Usage(input_tokens=5, output_tokens=5),
        finish_reason="stop" if wire.kind == "openai" else "end_turn",
        response_id=response.response_id,
    )
    assert response.response_id


async def test_cached_and_reasoning_tokens_map_to_usage(wire: Wire) -> None:
    """Cached tokens count inside input_tokens on both wires (Anthropic's are added back)."""
    wire.srv.usage_override(
        input_tokens=1000, output_tokens=50, cached_tokens=800, reasoning_tokens=20
    )
    response = await wire.provider().complete(chat())
    reasoning = 20 if wire.kind == "openai" else 0  # Anthropic does not report it
    assert response.usage == Usage(1000, 50, cached_input_tokens=800, reasoning_tokens=reasoning)


async def test_stream_keeps_unicode_line_separators(wire: Wire) -> None:
    """U+2028, U+0085 and form feeds inside a streamed JSON string do not split lines."""
    text = "a\u2028b\u2029c\x85d\x0ce\x1cf ünïcode"
    wire.srv.reply("m1", text)
    response = await wire.provider().complete(chat())
    assert response.text == text


async def test_reply_cut_at_max_tokens_reports_length(wire: Wire) -> None:
    """A reply longer than max_tokens is cut and the finish reason says so."""
    wire.srv.reply("m1", "x" * 1000)
    response = await wire.provider().complete(chat())
    assert response.text == "x" * 400
    assert response.finish_reason == ("length" if wire.kind == "openai" else "max_tokens")


async def test_no_usage_gives_none(wire: Wire) -> None:
    """A valid answer without usage returns usage None, not zero."""
    wire.srv.enqueue(Fault.no_usage())
    response = await wire.provider().complete(chat())
    assert response.text == "echo: hello there"
    assert response.usage is None


# -- HTTP statuses ----------------------------------------------------------------------------


async def test_429_retry_after_seconds(wire: Wire) -> None:
    """429 with Retry-After in seconds is transient and carries the wait."""
    wire.srv.enqueue(Fault.status(429, retry_after=7))
    error = await fails(wire.provider())
    assert isinstance(error, ProviderStatusError)
    assert (error.status, error.transient, error.retry_after) == (429, True, 7.0)


async def test_429_retry_after_http_date(wire: Wire) -> None:
    """Retry-After as an HTTP-date is taken relative to the injected clock's now."""
    wire.srv.enqueue(
        Fault.status(429, retry_after=format_datetime(NOW + timedelta(seconds=30), usegmt=True))
    )
    error = await fails(wire.provider())
    assert isinstance(error, ProviderStatusError)
    assert error.transient
    assert error.retry_after == pytest.approx(30.0)


async def test_retry_after_ms_header_wins(wire: Wire) -> None:
    """retry-after-ms (OpenAI) is more precise than Retry-After and is preferred."""
    wire.srv.enqueue(Fault.status(429, retry_after=2, headers={"retry-after-ms": "1500"}))
    error = await fails(wire.provider())
    assert error.retry_after == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("code", "transient"),
    [
        (408, True),
        (409, True),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (529, True),
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (422, False),
    ],
    ids=lambda v: str(v),
)
async def test_status_transient_or_permanent(wire: Wire, code: int, transient: bool) -> None:
    """408, 409, 429 and 5xx are transient; other 4xx are permanent."""
    wire.srv.enqueue(Fault.status(code))
    error = await fails(wire.provider())
    assert isinstance(error, ProviderStatusError)
    assert (error.status, error.transient, error.retry_after) == (code, transient, None)
    assert f"HTTP {code}" in str(error)
    assert "fake error" in str(error)  # the body is in the message


async def test_error_body_echoing_the_key_is_redacted(wire: Wire) -> None:
    """A 401 body that quotes the key (as OpenAI's does, partly) never reaches the message."""
    body = orjson.dumps({"error": {"message": f"Incorrect API key provided: {KEY}."}}).decode()
    wire.srv.enqueue(Fault.status(401, body=body))
    error = await fails(wire.provider())
    assert "[redacted]" in str(error)


async def test_long_error_body_is_truncated(wire: Wire) -> None:
    """Error bodies are cut to about 300 characters."""
    wire.srv.enqueue(Fault.status(500, body="boom " * 1000))
    error = await fails(wire.provider())
    assert len(str(error)) < 400


# -- connection faults and timeouts -----------------------------------------------------------


@pytest.mark.parametrize("before", [False, True], ids=["after-request", "before-request"])
async def test_reset_is_connection_error(wire: Wire, before: bool) -> None:
    """A TCP reset becomes a transient ProviderConnectionError."""
    wire.srv.enqueue(Fault.reset(before_request=before))
    error = await fails(wire.provider())
    assert isinstance(error, ProviderConnectionError)
    assert error.transient


async def test_reset_then_next_call_succeeds(wire: Wire) -> None:
    """After a reset the pool opens a new connection for the next call."""
    provider = wire.provider()
    await provider.complete(chat())
    wire.srv.enqueue(Fault.reset())
    await fails(provider)
    assert (await provider.complete(chat())).text == "echo: hello there"


async def test_connection_refused_is_connection_error(wire: Wire) -> None:
    """Nothing listening: ProviderConnectionError, transient."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(wire.kind, f"http://127.0.0.1:{port}", stream=wire.stream)
    provider = build_provider(wire.kind, cfg, KEY, FakeClock(NOW))
    try:
        error = await fails(provider)
    finally:
        await provider.aclose()
    assert isinstance(error, ProviderConnectionError)
    assert error.transient


async def test_stall_longer_than_read_timeout_times_out(wire: Wire) -> None:
    """A server that reads the request and says nothing trips the read timeout."""
    wire.srv.enqueue(Fault.stall(10))
    started = time.monotonic()
    error = await fails(wire.provider(read=0.2))
    elapsed = time.monotonic() - started
    assert isinstance(error, ProviderTimeout)
    assert error.transient
    assert "read timeout" in str(error)
    assert 0.15 < elapsed < 3


async def test_slow_body_with_short_gaps_succeeds(wire: Wire) -> None:
    """Gaps below the read timeout are fine even when the whole body takes longer."""
    wire.srv.enqueue(Fault.slow_body(chunk_delay=0.05, chunks=13))
    started = time.monotonic()
    with anyio.fail_after(5):
        response = await wire.provider(read=0.5).complete(chat())
    assert response.text == "echo: hello there"
    assert time.monotonic() - started > 0.5  # longer than the read timeout in total


async def test_slow_body_with_a_long_gap_times_out(wire: Wire) -> None:
    """A gap above the read timeout in the middle of the body is a ProviderTimeout."""
    wire.srv.enqueue(Fault.slow_body(chunk_delay=1.0, chunks=3))
    error = await fails(wire.provider(read=0.2))
    assert isinstance(error, ProviderTimeout)


# -- malformed bodies -------------------------------------------------------------------------


async def test_invalid_json_is_malformed(wire: Wire) -> None:
    """A 200 whose body (or stream event) is not JSON is a transient MalformedResponse."""
    wire.srv.enqueue(Fault.malformed())
    error = await fails(wire.provider())
    assert isinstance(error, MalformedResponse)
    assert error.transient


async def test_wrong_shape_is_malformed(wire: Wire) -> None:
    """Valid JSON without choices/content (or a stream without its end) is malformed."""
    body = "data: {}\n\n" if wire.stream else '{"unexpected": true}'
    wire.srv.enqueue(Fault.malformed(body=body))
    error = await fails(wire.provider())
    assert isinstance(error, MalformedResponse)


async def test_malformed_body_quoting_the_key_is_redacted(wire: Wire) -> None:
    """The excerpt of a non-JSON body in the message is redacted too."""
    body = f"data: oops {KEY}\n\n" if wire.stream else f"oops {KEY}"
    wire.srv.enqueue(Fault.malformed(body=body))
    error = await fails(wire.provider())
    assert isinstance(error, MalformedResponse)


# -- what goes on the wire --------------------------------------------------------------------


async def test_openai_request_body_and_headers(fake_llm: FakeLLMServer) -> None:
    """OpenAI: bearer auth, every field, JSON mode, stream options, extra merged on top."""
    cfg = config("openai", fake_llm.openai_base_url, stream=True, idempotency_header=True)
    async with OpenAIProvider("groq", cfg, KEY, FakeClock(NOW)) as provider:
        request = chat(
            temperature=0.2,
            json_mode=True,
            idempotency_key="run-1/step-2",
            extra={"seed": 7, "stream": False},
        )
        await provider.complete(request)
    (recorded,) = fake_llm.requests
    assert (recorded.method, recorded.path) == ("POST", OPENAI_PATH)
    assert recorded.headers["authorization"] == f"Bearer {KEY}"
    assert recorded.headers["idempotency-key"] == "run-1/step-2"
    assert recorded.headers["content-type"] == "application/json"
    assert recorded.body == {
        "model": "m1",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there"},
        ],
        "max_tokens": 100,
        "temperature": 0.2,
        "response_format": {"type": "json_object"},
        "stream": True,  # extra cannot turn streaming off under the parser's feet
        "stream_options": {"include_usage": True},
        "seed": 7,
    }


async def test_openai_non_streaming_body_is_minimal(fake_llm: FakeLLMServer) -> None:
    """No temperature, response_format or stream fields unless asked for."""
    async with OpenAIProvider(
        "o", config("openai", fake_llm.openai_base_url), KEY, FakeClock(NOW)
    ) as p:
        await p.complete(chat(extra={"max_completion_tokens": 50}))
    (recorded,) = fake_llm.requests
    assert recorded.body == {
        "model": "m1",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there"},
        ],
        "max_completion_tokens": 50,  # replaces max_tokens for newer OpenAI models
    }


async def test_anthropic_request_body_and_headers(fake_llm: FakeLLMServer) -> None:
    """Anthropic: x-api-key and version headers, system messages joined into ``system``."""
    cfg = config("anthropic", fake_llm.anthropic_base_url, idempotency_header=True)
    messages = (
        Message("system", "rule one"),
        Message("user", "hi"),
        Message("assistant", "hello"),
        Message("system", "rule two"),
        Message("tool", "42"),
    )
    request = ChatRequest(
        "claude",
        messages,
        64,
        temperature=0.0,
        json_mode=True,
        idempotency_key="k1",
        extra={"top_k": 5},
    )
    async with AnthropicProvider("anthropic", cfg, KEY, FakeClock(NOW)) as provider:
        await provider.complete(request)
    (recorded,) = fake_llm.requests
    assert recorded.path == ANTHROPIC_PATH
    assert recorded.headers["x-api-key"] == KEY
    assert recorded.headers["anthropic-version"] == "2023-06-01"
    assert recorded.headers["idempotency-key"] == "k1"
    assert "authorization" not in recorded.headers
    assert recorded.body == {
        "model": "claude",
        "max_tokens": 64,
        "system": "rule one\n\nrule two",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "42"},
        ],
        "temperature": 0.0,
        "top_k": 5,
    }


async def test_idempotency_key_only_when_enabled(wire: Wire) -> None:
    """The Idempotency-Key header is sent only when the provider config enables it."""
    await wire.provider().complete(chat(idempotency_key="abc"))
    await wire.provider(idempotency_header=True).complete(chat(idempotency_key="abc"))
    await wire.provider(idempotency_header=True).complete(chat())
    keys = [r.headers.get("idempotency-key") for r in wire.srv.requests]
    assert keys == [None, "abc", None]


async def test_no_key_sends_no_auth_header(wire: Wire) -> None:
    """A provider without a key (a local server) sends no credentials."""
    await wire.provider(api_key=None).complete(chat())
    (recorded,) = wire.srv.requests
    assert "authorization" not in recorded.headers
    assert "x-api-key" not in recorded.headers


async def test_key_read_from_a_file_is_stripped(wire: Wire) -> None:
    """A trailing newline on the key (as read from a credentials file) is dropped."""
    await wire.provider(api_key=KEY + "\n").complete(chat())
    (recorded,) = wire.srv.requests
    sent = recorded.headers.get("authorization") or recorded.headers["x-api-key"]
    assert sent.endswith(KEY)


async def test_anthropic_base_url_with_v1_suffix(fake_llm: FakeLLMServer) -> None:
    """``https://api.anthropic.com/v1`` as base_url does not double the /v1."""
    cfg = config("anthropic", fake_llm.anthropic_base_url + "/v1")
    async with AnthropicProvider("a", cfg, KEY, FakeClock(NOW)) as provider:
        await provider.complete(chat())
    assert fake_llm.count(ANTHROPIC_PATH) == 1


async def test_provider_repr_hides_key(wire: Wire) -> None:
    """Neither repr nor str of a provider shows its key."""
    provider = wire.provider()
    assert KEY not in repr(provider)
    assert KEY not in str(provider)
    assert wire.base_url in repr(provider)


@pytest.mark.parametrize(
    "bad_key", ["sk-bad\n" + KEY, "sk-bäd-" + KEY], ids=["newline", "non-ascii"]
)
async def test_key_no_header_may_carry_never_leaks(wire: Wire, bad_key: str) -> None:
    """A key no header may carry fails permanently before sending, without showing the key."""
    error = await fails(wire.provider(api_key=bad_key))
    assert not error.transient
    assert wire.srv.count() == 0


# -- pure functions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "5"}, 5.0),
        ({"retry-after": " 1.5 "}, 1.5),
        ({"retry-after": "-3"}, 0.0),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "Thu, 01 Jan 2026 00:00:30 GMT"}, 30.0),
        ({"retry-after": "Thu, 01 Jan 2026 00:00:30 -0000"}, 30.0),
        ({"retry-after": "Wed, 31 Dec 2025 23:59:00 GMT"}, 0.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after-ms": "bogus", "retry-after": "9"}, 9.0),
        ({}, None),
    ],
    ids=[
        "int",
        "float",
        "negative",
        "nan",
        "inf",
        "garbage",
        "date",
        "date-0000",
        "past-date",
        "ms",
        "ms-wins",
        "bad-ms",
        "none",
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    """Retry-After in both forms, retry-after-ms, clamped at zero, None when unusable."""
    assert parse_retry_after(httpx2.Headers(headers), NOW) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Incorrect API key provided: sk-proj-abcdefghijklmnop",
        "authorization: Bearer abc.def.ghi",
        '{"api_key": "hunter2hunter2"}',
        "x-api-key=sk-ant-api03-aaaaaaaaaaaaaaaa",
        "token gsk_0123456789abcdef was revoked",
        "opaque " + "a1B2" * 12,
    ],
    ids=["openai", "bearer", "json-field", "header-form", "groq", "long-token"],
)
def test_redact_hides_key_like_strings(text: str) -> None:
    """Anything that looks like a credential is replaced by [redacted]."""
    out = redact(text)
    assert "[redacted]" in out
    for secret in (
        "abcdefghijklmnop",
        "abc.def.ghi",
        "hunter2",
        "aaaaaaaa",
        "0123456789abcdef",
        "a1B2a1B2a1B2",
    ):
        assert secret not in out


def test_redact_keeps_ordinary_text_and_removes_given_secrets() -> None:
    """Plain error text survives; an exact secret is removed even if it looks harmless."""
    assert redact("model gpt-4o-mini does not exist (request req_123)") == (
        "model gpt-4o-mini does not exist (request req_123)"
    )
    assert redact("the word plainsecret appears", ["plainsecret"]) == "the word [redacted] appears"


def test_status_error_message_and_retry_after() -> None:
    """status_error builds the message from status, reason and a bounded, redacted body."""
    response = httpx2.Response(
        503,
        headers={"retry-after": "12"},
        content=b'{"error": "overloaded, key sk-abcdefghijklmnopq"}' + b" pad" * 500,
    )
    error = status_error(response, "p", NOW)
    assert str(error).startswith("p: HTTP 503 Service Unavailable: {")
    assert "sk-abcdefghijklmnopq" not in str(error)
    assert len(str(error)) <= 340
    assert (error.status, error.retry_after, error.transient) == (503, 12.0, True)


@pytest.mark.parametrize(
    ("exc", "cls", "transient"),
    [
        (httpx2.ConnectTimeout("t"), ProviderTimeout, True),
        (httpx2.ReadTimeout("t"), ProviderTimeout, True),
        (httpx2.WriteTimeout("t"), ProviderTimeout, True),
        (httpx2.PoolTimeout("t"), ProviderTimeout, True),
        (httpx2.ConnectError("refused"), ProviderConnectionError, True),
        (httpx2.ReadError("reset"), ProviderConnectionError, True),
        (httpx2.WriteError("pipe"), ProviderConnectionError, True),
        (httpx2.RemoteProtocolError("peer closed"), ProviderConnectionError, True),
        (httpx2.ProxyError("proxy"), ProviderConnectionError, True),
        (httpx2.LocalProtocolError("bad header"), ProviderConnectionError, False),
        (httpx2.UnsupportedProtocol("ftp"), ProviderConnectionError, False),
        (httpx2.DecodingError("gzip"), MalformedResponse, True),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None,
)
def test_translate_maps_httpx_errors(
    exc: Exception, cls: type[ProviderError], transient: bool
) -> None:
    """Each httpx2 error class becomes the matching ProviderError, with its transience."""
    error = translate(exc, "p")
    assert type(error) is cls
    assert error.transient is transient
    assert error.provider == "p"


class Chunks(httpx2.AsyncByteStream):
    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = list(chunks)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


async def test_sse_parser_handles_every_line_ending_and_split() -> None:
    """CR, LF, CRLF split across reads, comments, multi-line data and a split UTF-8 char."""
    chunks = [
        b"data: a\r",
        b"\ndata: b\r\n\r",
        b'\n: comment\n\nevent: x\nid: 1\ndata: {"t": "\xe2\x80',
        b'\xa8"}\n\ndata:no-space\r\rdata: tail',
    ]
    response = httpx2.Response(200, stream=Chunks(chunks))
    events = [(e.event, e.data) async for e in sse_events(response, "p")]
    assert events == [
        ("message", "a\nb"),
        ("x", '{"t": "\u2028"}'),
        ("message", "no-space"),
        ("message", "tail"),
    ]


# -- MockTransport: streams and shapes the fake server does not produce -------------------------


def mock_provider(
    kind: str, handler: Callable[[httpx2.Request], httpx2.Response], *, stream: bool = True
) -> Provider:
    base = "https://api.example.com/v1" if kind == "openai" else "https://api.example.com"
    return build_provider(
        kind,
        config(kind, base, stream=stream),
        KEY,
        FakeClock(NOW),
        transport=httpx2.MockTransport(handler),
    )


def sse(*events: str) -> Callable[[httpx2.Request], httpx2.Response]:
    body = "".join(events).encode()
    return lambda request: httpx2.Response(
        200, headers={"content-type": "text/event-stream"}, content=body
    )


async def test_anthropic_stream_error_event_is_transient_status() -> None:
    """An ``error`` event mid-stream (overloaded) becomes a transient status error."""
    handler = sse(
        'event: message_start\ndata: {"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 1, "output_tokens": 1}}}\n\n',
        'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n',
    )
    provider = mock_provider("anthropic", handler)
    error = await fails(provider)
    await provider.aclose()
    assert isinstance(error, ProviderStatusError)
    assert (error.status, error.transient) == (529, True)


async def test_anthropic_stream_without_message_stop_is_malformed() -> None:
    """A stream that ends cleanly but early is malformed, not a short answer."""
    handler = sse(
        'event: message_start\ndata: {"type": "message_start", "message": {"id": "m"}}\n\n',
        'event: content_block_delta\ndata: {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hal"}}\n\n',
    )
    provider = mock_provider("anthropic", handler)
    assert isinstance(await fails(provider), MalformedResponse)
    await provider.aclose()


async def test_anthropic_usage_counts_cache_reads_and_writes_as_input() -> None:
    """input_tokens = uncached + cache reads + cache writes; cached = cache reads."""
    body = {
        "id": "msg_1",
        "model": "claude",
        "content": [{"type": "text", "text": "hi"}, {"type": "tool_use", "id": "t"}],
        "stop_reason": "end_turn",
        "usage": {
            "input_tokens": 10,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 5,
            "output_tokens": 7,
        },
    }
    provider = mock_provider("anthropic", lambda r: httpx2.Response(200, json=body), stream=False)
    response = await provider.complete(chat())
    await provider.aclose()
    assert response.text == "hi"
    assert response.usage == Usage(input_tokens=115, output_tokens=7, cached_input_tokens=100)


async def test_openai_stream_error_chunk_is_transient_status() -> None:
    """An error object inside an OpenAI stream becomes a transient status error."""
    provider = mock_provider(
        "openai", sse('data: {"error": {"message": "server had an error"}}\n\n')
    )
    error = await fails(provider)
    await provider.aclose()
    assert isinstance(error, ProviderStatusError)
    assert error.transient


async def test_openai_stream_without_done_or_finish_is_malformed() -> None:
    """A stream cut short without [DONE] or a finish reason is malformed."""
    chunk = {
        "id": "c",
        "choices": [{"index": 0, "delta": {"content": "par"}, "finish_reason": None}],
    }
    provider = mock_provider("openai", sse(f"data: {orjson.dumps(chunk).decode()}\n\n"))
    assert isinstance(await fails(provider), MalformedResponse)
    await provider.aclose()


async def test_groq_stream_usage_under_x_groq() -> None:
    """Groq puts stream usage in ``x_groq.usage``; it is read like OpenAI's."""
    chunks = [
        {
            "id": "c",
            "model": "llama",
            "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
        },
        {
            "id": "c",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "x_groq": {"usage": {"prompt_tokens": 9, "completion_tokens": 2}},
        },
    ]
    events = [f"data: {orjson.dumps(c).decode()}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
    provider = mock_provider("openai", sse(*events))
    response = await provider.complete(chat())
    await provider.aclose()
    assert (response.text, response.model, response.usage) == ("hi", "llama", Usage(9, 2))


async def test_server_ignoring_stream_flag_is_parsed_as_json() -> None:
    """A server that answers a stream request with one JSON body still works."""
    body = {
        "choices": [{"message": {"content": "whole"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }
    provider = mock_provider("openai", lambda r: httpx2.Response(200, json=body))
    response = await provider.complete(chat())
    await provider.aclose()
    assert (response.text, response.usage) == ("whole", Usage(3, 1))


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": "3", "completion_tokens": 1},
        {"prompt_tokens": 3},
        {"prompt_tokens": True, "completion_tokens": 1},
        "n/a",
    ],
    ids=["string", "missing", "bool", "not-an-object"],
)
async def test_openai_unusable_usage_is_none(usage: Any) -> None:
    """Usage that is not a pair of non-negative integers is reported as missing."""
    body = {"choices": [{"message": {"content": "x"}}], "usage": usage}
    provider = mock_provider("openai", lambda r: httpx2.Response(200, json=body), stream=False)
    response = await provider.complete(chat())
    await provider.aclose()
    assert response.usage is None


async def test_redirect_is_a_permanent_status_error() -> None:
    """Redirects are not followed: a 3xx is a permanent status error."""
    provider = mock_provider(
        "openai",
        lambda r: httpx2.Response(307, headers={"location": "https://evil.example"}),
        stream=False,
    )
    error = await fails(provider)
    await provider.aclose()
    assert isinstance(error, ProviderStatusError)
    assert (error.status, error.transient) == (307, False)


async def test_unserialisable_extra_is_permanent() -> None:
    """A request whose extra parameters are not JSON fails permanently, before any I/O."""
    provider = mock_provider("openai", lambda r: httpx2.Response(500), stream=False)
    error = await fails(provider, chat(extra={"bad": object()}))
    await provider.aclose()
    assert type(error) is ProviderError
    assert not error.transient


async def test_timeouts_come_from_config() -> None:
    """The client uses the config's per-phase timeouts."""
    cfg = ProviderConfig(
        base_url="http://x", timeouts=TimeoutsConfig(connect=1, read=2, write=3, pool=4)
    )
    provider = build_provider("p", cfg, None, FakeClock(NOW))
    assert isinstance(provider, OpenAIProvider)
    assert provider._client.timeout == httpx2.Timeout(connect=1, read=2, write=3, pool=4)
    await provider.aclose()


async def test_max_connections_caps_concurrent_connections(wire: Wire) -> None:
    """Concurrent calls beyond max_connections wait for a pooled connection."""
    wire.srv.enqueue(*[Fault.stall(0.1)] * 6)
    provider = wire.provider(max_connections=2)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(provider.complete, chat())
    assert wire.srv.count() == 6
    assert wire.srv.connections_opened == 2


async def test_build_provider_picks_kind_and_satisfies_protocol() -> None:
    """build_provider returns the implementation for config.kind, a ``Provider``."""
    openai = build_provider("a", ProviderConfig(base_url="http://x"), None, FakeClock())
    anthropic = build_provider(
        "b", ProviderConfig(kind="anthropic", base_url="http://x"), None, FakeClock()
    )
    assert type(openai) is OpenAIProvider and openai.name == "a"
    assert type(anthropic) is AnthropicProvider and anthropic.name == "b"
    assert isinstance(openai, Provider) and isinstance(anthropic, Provider)
    await openai.aclose()
    await anthropic.aclose()


async def test_sequential_calls_reuse_one_connection(wire: Wire) -> None:
    """Ten calls in a row share one keep-alive connection, streamed or not."""
    provider = wire.provider()
    for _ in range(10):
        await provider.complete(chat())
    assert wire.srv.connections_opened == 1
