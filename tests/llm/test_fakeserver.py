"""The fake LLM server itself: recording, scripting, wire formats, faults, lifecycle."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import httpx2
import pytest

from supervisor.llm.fakeserver import (
    ANTHROPIC_PATH,
    OPENAI_PATH,
    FakeLLMServer,
    Fault,
    FaultKind,
    estimate_tokens,
)


def body(model: str = "m", text: str = "hi", **kw: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 100,
        **kw,
    }


def sse_data(response: httpx2.Response) -> list[Any]:
    """The JSON payloads of an SSE body ([DONE] kept as a string)."""
    out: list[Any] = []
    for line in response.text.split("\n"):
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


@pytest.fixture
def client(fake_llm: FakeLLMServer) -> Any:
    """A sync httpx2 client on the fake server (the server runs in its own thread)."""
    with httpx2.Client(base_url=fake_llm.base_url, timeout=5) as c:
        yield c


def test_urls(fake_llm: FakeLLMServer) -> None:
    """base_url is loopback with a real port; SDK-style URLs derive from it."""
    assert fake_llm.base_url.startswith("http://127.0.0.1:")
    assert fake_llm.openai_base_url == fake_llm.base_url + "/v1"
    assert fake_llm.anthropic_base_url == fake_llm.base_url


def test_not_started_has_no_url() -> None:
    """A server that is not started says so instead of returning a bogus URL."""
    with pytest.raises(RuntimeError):
        _ = FakeLLMServer().base_url


def test_records_every_request(fake_llm: FakeLLMServer, client: httpx2.Client) -> None:
    """Each request is recorded with time, method, path, lowercase headers and parsed body."""
    before = time.monotonic()
    client.post(OPENAI_PATH + "?x=1", json=body("a"), headers={"X-Custom": "One"})
    client.post(ANTHROPIC_PATH, json=body("b"))
    client.post(ANTHROPIC_PATH, json=body("b"))
    first, *_ = fake_llm.requests
    assert before <= first.time <= time.monotonic()
    assert (first.method, first.path, first.body) == ("POST", OPENAI_PATH, body("a"))
    assert first.headers["x-custom"] == "One"
    assert fake_llm.count() == 3
    assert fake_llm.count(ANTHROPIC_PATH) == 2
    assert fake_llm.count(model="a") == 1
    assert fake_llm.count(OPENAI_PATH, model="b") == 0


def test_wait_for_requests_is_bounded(fake_llm: FakeLLMServer, client: httpx2.Client) -> None:
    """wait_for_requests returns once enough arrived and raises TimeoutError otherwise."""
    client.post(OPENAI_PATH, json=body())
    fake_llm.wait_for_requests(1, timeout=1)
    with pytest.raises(TimeoutError):
        fake_llm.wait_for_requests(2, timeout=0.05)


def test_default_reply_and_usage_rule(client: httpx2.Client) -> None:
    """Default reply echoes the last user message; usage is ceil(chars / 4) each way."""
    request = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "abc"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "second"}]},
        ],
    }
    data = client.post(OPENAI_PATH, json=request).json()
    assert data["choices"][0]["message"]["content"] == "echo: second"
    assert data["usage"]["prompt_tokens"] == estimate_tokens("abcfirstoksecond") == 4
    assert data["usage"]["completion_tokens"] == estimate_tokens("echo: second") == 3
    assert data["usage"]["total_tokens"] == 7


def test_reply_per_model_text_and_callable(fake_llm: FakeLLMServer, client: httpx2.Client) -> None:
    """reply() sets a text or a callable per model; None applies to every other model."""
    fake_llm.reply("a", "from a")
    fake_llm.reply(None, lambda b: f"{b['model']} said {len(b['messages'])}")

    def text(model: str) -> str:
        return str(
            client.post(OPENAI_PATH, json=body(model)).json()["choices"][0]["message"]["content"]
        )

    assert text("a") == "from a"
    assert text("b") == "b said 1"


def test_usage_override_on_both_wires(fake_llm: FakeLLMServer, client: httpx2.Client) -> None:
    """Overrides replace counts; Anthropic reports input minus cached plus cache reads."""
    fake_llm.usage_override(input_tokens=100, output_tokens=9, cached_tokens=60, reasoning_tokens=4)
    openai = client.post(OPENAI_PATH, json=body()).json()["usage"]
    anthropic = client.post(ANTHROPIC_PATH, json=body()).json()["usage"]
    assert openai["prompt_tokens"] == 100
    assert openai["prompt_tokens_details"] == {"cached_tokens": 60}
    assert openai["completion_tokens_details"] == {"reasoning_tokens": 4}
    assert anthropic == {
        "input_tokens": 40,
        "output_tokens": 9,
        "cache_read_input_tokens": 60,
        "cache_creation_input_tokens": 0,
    }


def test_openai_stream_with_and_without_usage(client: httpx2.Client) -> None:
    """SSE chunks end with [DONE]; a usage chunk comes only with include_usage."""
    with_usage = sse_data(
        client.post(
            OPENAI_PATH, json=body(text="a b", stream=True, stream_options={"include_usage": True})
        )
    )
    assert with_usage[-1] == "[DONE]"
    assert with_usage[-2]["choices"] == [] and with_usage[-2]["usage"]["completion_tokens"] == 3
    assert with_usage[-3]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in with_usage[:-2])
    assert text == "echo: a b"
    without = sse_data(client.post(OPENAI_PATH, json=body(stream=True)))
    assert without[-1] == "[DONE]"
    assert all("usage" not in c for c in without[:-1])


def test_anthropic_stream_event_sequence(client: httpx2.Client) -> None:
    """Anthropic SSE: the documented event order, usage in message_start and message_delta."""
    response = client.post(ANTHROPIC_PATH, json=body(text="x y", stream=True))
    assert response.headers["content-type"] == "text/event-stream"
    names = [
        line.removeprefix("event: ")
        for line in response.text.split("\n")
        if line.startswith("event: ")
    ]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    events = sse_data(response)
    assert events[0]["message"]["usage"]["input_tokens"] == 1
    assert events[-2]["usage"] == {"output_tokens": 3}


def test_fault_queue_order_then_normal(fake_llm: FakeLLMServer, client: httpx2.Client) -> None:
    """Faults are used one per request in order; an empty queue answers normally."""
    fake_llm.enqueue(Fault.status(500), Fault.status(429, retry_after=3))
    fake_llm.enqueue(Fault.status(503, retry_after="Wed, 21 Oct 2015 07:28:00 GMT"))
    responses = [client.post(OPENAI_PATH, json=body()) for _ in range(4)]
    assert [r.status_code for r in responses] == [500, 429, 503, 200]
    assert responses[1].headers["retry-after"] == "3"
    assert responses[2].headers["retry-after"] == "Wed, 21 Oct 2015 07:28:00 GMT"
    assert responses[0].json()["error"]["type"] == "server_error"


def test_model_queue_before_global_queue(fake_llm: FakeLLMServer, client: httpx2.Client) -> None:
    """A model's own queue is used first; other models only see the global queue."""
    fake_llm.enqueue(Fault.status(401), model="a")
    fake_llm.enqueue(Fault.status(502))
    assert client.post(OPENAI_PATH, json=body("b")).status_code == 502
    assert client.post(OPENAI_PATH, json=body("a")).status_code == 401
    assert client.post(OPENAI_PATH, json=body("a")).status_code == 200


def test_script_replaces_queue_and_clear_forgets(
    fake_llm: FakeLLMServer, client: httpx2.Client
) -> None:
    """script() replaces a queue; clear() drops queues, replies and recorded requests."""
    fake_llm.enqueue(Fault.status(500), Fault.status(500))
    fake_llm.script(faults=[Fault.status(418)])
    assert client.post(OPENAI_PATH, json=body()).status_code == 418
    assert client.post(OPENAI_PATH, json=body()).status_code == 200
    fake_llm.enqueue(Fault.status(500))
    fake_llm.reply(None, "x")
    fake_llm.clear()
    assert fake_llm.requests == []
    response = client.post(OPENAI_PATH, json=body())
    assert response.json()["choices"][0]["message"]["content"] == "echo: hi"


def test_status_fault_with_custom_body_and_headers(
    fake_llm: FakeLLMServer, client: httpx2.Client
) -> None:
    """A status fault sends the given body and extra headers."""
    fake_llm.enqueue(Fault.status(400, body="plain words", headers={"x-why": "because"}))
    response = client.post(ANTHROPIC_PATH, json=body())
    assert (response.status_code, response.text, response.headers["x-why"]) == (
        400,
        "plain words",
        "because",
    )


def test_anthropic_error_body_shape(fake_llm: FakeLLMServer, client: httpx2.Client) -> None:
    """Anthropic errors use its ``{"type": "error", "error": {...}}`` shape."""
    fake_llm.enqueue(Fault.status(529))
    response = client.post(ANTHROPIC_PATH, json=body())
    assert response.json()["error"]["type"] == "overloaded_error"


def test_malformed_and_no_usage(fake_llm: FakeLLMServer, client: httpx2.Client) -> None:
    """malformed() is a 200 that is not JSON; no_usage() drops usage and nothing else."""
    fake_llm.enqueue(Fault.malformed(), Fault.no_usage())
    broken = client.post(OPENAI_PATH, json=body())
    assert broken.status_code == 200
    with pytest.raises(ValueError):
        broken.json()
    clean = client.post(OPENAI_PATH, json=body()).json()
    assert "usage" not in clean and clean["choices"][0]["message"]["content"] == "echo: hi"


@pytest.mark.parametrize("before", [False, True], ids=["after-request", "before-request"])
def test_reset_sends_rst(fake_llm: FakeLLMServer, before: bool) -> None:
    """reset() aborts with RST: the client sees ECONNRESET, not an orderly close."""
    fake_llm.enqueue(Fault.reset(before_request=before))
    payload = json.dumps(body()).encode()
    request = (
        f"POST {OPENAI_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    host, port = fake_llm.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass
    assert fake_llm.count() == (0 if before else 1)


def test_reset_before_request_needs_global_queue(fake_llm: FakeLLMServer) -> None:
    """The model is unknown before the request is read, so no model queue may hold one."""
    with pytest.raises(ValueError):
        fake_llm.enqueue(Fault.reset(before_request=True), model="m")
    fake_llm.enqueue(Fault.reset(), model="m")


def test_stall_then_answers(fake_llm: FakeLLMServer, client: httpx2.Client) -> None:
    """stall() reads the request, waits, then answers normally."""
    fake_llm.enqueue(Fault.stall(0.2))
    started = time.monotonic()
    assert client.post(OPENAI_PATH, json=body()).status_code == 200
    assert time.monotonic() - started >= 0.2


def test_slow_body_spaces_the_pieces(fake_llm: FakeLLMServer, client: httpx2.Client) -> None:
    """slow_body() sends the body in pieces, chunk_delay apart."""
    fake_llm.enqueue(Fault.slow_body(0.05, chunks=4))
    arrivals: list[float] = []
    with client.stream("POST", OPENAI_PATH, json=body()) as response:
        started = time.monotonic()
        data = b""
        for piece in response.iter_raw():
            arrivals.append(time.monotonic() - started)
            data += piece
    assert json.loads(data)["choices"][0]["message"]["content"] == "echo: hi"
    assert len(arrivals) == 4
    assert arrivals[-1] >= 0.14


def test_keep_alive_reuses_connections(fake_llm: FakeLLMServer, client: httpx2.Client) -> None:
    """An httpx2 client making 10 calls, streamed and not, uses at most 2 connections."""
    for i in range(10):
        path = OPENAI_PATH if i % 2 else ANTHROPIC_PATH
        client.post(path, json=body(stream=i % 3 == 0))
    assert fake_llm.count() == 10
    assert fake_llm.connections_opened <= 2


async def test_async_client_keep_alive(fake_llm: FakeLLMServer) -> None:
    """From an async test too: one pooled connection for sequential calls."""
    async with httpx2.AsyncClient(base_url=fake_llm.base_url, timeout=5) as c:
        for _ in range(10):
            assert (await c.post(OPENAI_PATH, json=body())).status_code == 200
    assert fake_llm.connections_opened == 1


def test_concurrent_clients_from_threads(fake_llm: FakeLLMServer) -> None:
    """Requests from many threads at once are all answered and recorded."""
    statuses: list[int] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        with httpx2.Client(base_url=fake_llm.base_url, timeout=5) as c:
            status = c.post(OPENAI_PATH, json=body(f"m{i}")).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert statuses == [200] * 20
    assert fake_llm.count() == 20
    assert {fake_llm.count(model=f"m{i}") for i in range(20)} == {1}


@pytest.mark.parametrize(
    ("method", "path", "payload", "status"),
    [
        ("GET", OPENAI_PATH, None, 404),
        ("POST", "/v1/embeddings", body(), 404),
        ("POST", OPENAI_PATH, "not json", 400),
        ("POST", ANTHROPIC_PATH, {"messages": []}, 400),
    ],
    ids=["wrong-method", "unknown-path", "not-json", "no-model"],
)
def test_bad_requests(
    client: httpx2.Client, method: str, path: str, payload: Any, status: int
) -> None:
    """Unknown routes are 404 and bodies without a model are 400; both are recorded."""
    content = payload if isinstance(payload, str) else None
    data = None if isinstance(payload, str) else payload
    response = client.request(method, path, json=data, content=content)
    assert response.status_code == status


@pytest.mark.integration
def test_stop_is_bounded_with_a_stalled_connection() -> None:
    """stop() closes connections even while a request is stalled, within a bound."""
    srv = FakeLLMServer().start()
    srv.enqueue(Fault.stall(60))
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with httpx2.Client(base_url=srv.base_url, timeout=10) as c:
                c.post(OPENAI_PATH, json=body())
        except httpx2.HTTPError as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    srv.wait_for_requests(1)
    started = time.monotonic()
    srv.stop()
    caller.join(5)
    assert time.monotonic() - started < 3
    assert not caller.is_alive()
    assert len(errors) == 1  # the stalled client saw its connection close
    assert srv.errors == []


@pytest.mark.integration
def test_start_twice_is_an_error() -> None:
    """A server starts once; stop() is idempotent."""
    with FakeLLMServer() as srv, pytest.raises(RuntimeError):
        srv.start()
    srv.stop()


def test_fault_constructors_validate() -> None:
    """Fault builders reject nonsense and build the documented kinds."""
    with pytest.raises(ValueError):
        Fault.status(99)
    with pytest.raises(ValueError):
        Fault.slow_body(0.1, chunks=0)
    assert Fault.ok().kind is FaultKind.OK
    assert Fault.stall(2).seconds == 2
    assert Fault.no_usage().kind is FaultKind.NO_USAGE
