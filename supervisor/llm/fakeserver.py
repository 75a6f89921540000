"""A real HTTP/1.1 server on loopback that speaks the OpenAI and Anthropic wire formats.

For tests (ours and agent authors'): it runs in a background thread with its own asyncio
loop, so sync tests, async tests and a daemon subprocess can all call it::

    with FakeLLMServer() as srv:
        srv.reply("m", "hello")
        srv.enqueue(Fault.status(429, retry_after=2), Fault.reset())
        ...  # point a provider at srv.openai_base_url or srv.anthropic_base_url
        assert srv.count("/v1/chat/completions") == 3

Routes: ``POST /v1/chat/completions`` (OpenAI Chat Completions, JSON or SSE) and
``POST /v1/messages`` (Anthropic Messages, JSON or SSE); anything else is a 404.

Replies are deterministic: ``"echo: <last user message>"`` unless ``reply()`` set a text or
a callable (given the parsed request body) for the model. A reply longer than the request's
``max_tokens`` is cut to ``max_tokens * 4`` characters with finish reason ``length``
(Anthropic: ``max_tokens``).

Usage rule: ``tokens(text) = ceil(len(text) / 4)``; prompt tokens are ``tokens`` of the
concatenated text of every message (and Anthropic's ``system``), completion tokens are
``tokens(reply)``. ``usage_override()`` replaces any of these and sets cached and reasoning
tokens. ``input_tokens`` always means the whole prompt: on the Anthropic wire it is reported
as ``input_tokens = prompt - cached`` plus ``cache_read_input_tokens = cached``, as Anthropic
does.

Faults are consumed one per request, first from the request's model's queue, then from the
global queue; an empty queue means a normal answer. A ``Fault.reset(before_request=True)``
is taken from the global queue as soon as a request's first bytes arrive (the model is not
known yet), and that request is not recorded.
"""

from __future__ import annotations

import asyncio
import enum
import http
import json
import math
import re
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple, NoReturn

import h11

__all__ = [
    "ANTHROPIC_PATH",
    "OPENAI_PATH",
    "FakeLLMServer",
    "Fault",
    "FaultKind",
    "RecordedRequest",
    "estimate_tokens",
]

OPENAI_PATH = "/v1/chat/completions"
ANTHROPIC_PATH = "/v1/messages"

_START_TIMEOUT = 5.0
_STOP_TIMEOUT = 5.0  # for the thread to end; closing connections gets _CLOSE_TIMEOUT of it
_CLOSE_TIMEOUT = 3.0
_READ_TIMEOUT = 30.0  # a client that stops sending mid-request
_KEEPALIVE_IDLE = 60.0  # an idle keep-alive connection is closed after this
_MAX_BODY = 16 * 1024 * 1024

Reply = str | Callable[[dict[str, Any]], str]


def estimate_tokens(text: str) -> int:
    """The fake server's token count: ``ceil(len(text) / 4)``."""
    return math.ceil(len(text) / 4)


class FaultKind(enum.Enum):
    """What the server does with one request."""

    #: a normal answer
    OK = "ok"
    #: an error status with a provider-shaped JSON body
    STATUS = "status"
    #: abort the TCP connection with RST (SO_LINGER 0), before or after reading the request
    RESET = "reset"
    #: read the request, send nothing for ``seconds``, then answer normally
    STALL = "stall"
    #: a normal answer whose body is sent in ``chunks`` pieces, ``seconds`` apart
    SLOW_BODY = "slow_body"
    #: 200 with a body (or stream events) that is not valid JSON
    MALFORMED = "malformed"
    #: a normal answer without any usage
    NO_USAGE = "no_usage"


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted behaviour; build with the class methods (``Fault.status(429)``)."""

    kind: FaultKind
    code: int = 200
    body: str | None = None
    retry_after: float | str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0
    chunks: int = 1
    before_request: bool = False

    @classmethod
    def ok(cls) -> Fault:
        return cls(FaultKind.OK)

    @classmethod
    def status(
        cls,
        code: int,
        *,
        body: str | None = None,
        retry_after: float | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Fault:
        """An error status; ``retry_after`` is seconds or an HTTP-date string, sent as is."""
        if not 100 <= code <= 599:
            raise ValueError(f"not an HTTP status: {code}")
        return cls(
            FaultKind.STATUS,
            code=code,
            body=body,
            retry_after=retry_after,
            headers=tuple((headers or {}).items()),
        )

    @classmethod
    def reset(cls, *, before_request: bool = False) -> Fault:
        return cls(FaultKind.RESET, before_request=before_request)

    @classmethod
    def stall(cls, seconds: float) -> Fault:
        return cls(FaultKind.STALL, seconds=seconds)

    @classmethod
    def slow_body(cls, chunk_delay: float, chunks: int = 5) -> Fault:
        if chunks < 1:
            raise ValueError("chunks must be >= 1")
        return cls(FaultKind.SLOW_BODY, seconds=chunk_delay, chunks=chunks)

    @classmethod
    def malformed(cls, body: str | None = None) -> Fault:
        """200 with invalid JSON, or with ``body`` (e.g. valid JSON of the wrong shape)."""
        return cls(FaultKind.MALFORMED, body=body)

    @classmethod
    def no_usage(cls) -> Fault:
        return cls(FaultKind.NO_USAGE)


class RecordedRequest(NamedTuple):
    """One request as the server saw it."""

    time: float  # time.monotonic() when the request was fully read
    method: str
    path: str
    headers: dict[str, str]  # lowercase names
    body: Any  # the parsed JSON body, or None when it was not JSON


@dataclass(frozen=True, slots=True)
class _UsageOverride:
    input_tokens: int | None
    output_tokens: int | None
    cached_tokens: int
    reasoning_tokens: int


@dataclass(slots=True)
class _Answer:
    """Everything needed to render one successful answer in either wire format."""

    model: str
    text: str
    finish: str  # "stop" or "length"
    prompt: int
    completion: int
    cached: int
    reasoning: int
    usage: bool
    stream: bool
    include_usage: bool
    seq: int
    pieces: list[str] = field(default_factory=list)


class _Abort(Exception):
    """The connection was reset on purpose."""


class FakeLLMServer:
    """A scripted OpenAI/Anthropic-compatible HTTP server on 127.0.0.1 (see module doc)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._port: int | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._replies: dict[str | None, Reply] = {}
        self._usage: dict[str | None, _UsageOverride] = {}
        self._queues: dict[str | None, deque[Fault]] = {}
        self._requests: list[RecordedRequest] = []
        self._errors: list[str] = []
        self._connections_opened = 0
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeLLMServer:
        """Start serving; returns once the port is bound. Raises ``RuntimeError`` on failure."""
        if self._thread is not None:
            raise RuntimeError("FakeLLMServer already started")
        self._thread = threading.Thread(target=self._run, name="fake-llm-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT) or self._port is None:
            raise RuntimeError("FakeLLMServer did not start") from self._start_error
        return self

    def stop(self) -> None:
        """Close the listener and every connection; waits a bounded time for the thread."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None:
            with suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(stopping.set)
        thread.join(_STOP_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError(f"FakeLLMServer did not stop within {_STOP_TIMEOUT}s")

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError("FakeLLMServer is not started")
        return f"http://{self._host}:{self._port}"

    @property
    def openai_base_url(self) -> str:
        """Base URL as the OpenAI SDK spells it (paths are relative to ``/v1``)."""
        return self.base_url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        """Base URL as the Anthropic SDK spells it (paths start with ``/v1``)."""
        return self.base_url

    # -- scripting ---------------------------------------------------------------------------

    def reply(self, model: str | None, reply: Reply) -> None:
        """Answer ``model`` (``None``: every model) with a text or ``reply(body) -> str``."""
        with self._lock:
            self._replies[model] = reply

    def usage_override(
        self,
        model: str | None = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        cached_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> None:
        """Report these counts instead of the computed ones (``None`` keeps the computed)."""
        with self._lock:
            self._usage[model] = _UsageOverride(
                input_tokens, output_tokens, cached_tokens, reasoning_tokens
            )

    def enqueue(self, *faults: Fault, model: str | None = None) -> None:
        """Append faults to the queue of ``model`` (``None``: the global queue)."""
        self._check(faults, model)
        with self._lock:
            self._queues.setdefault(model, deque()).extend(faults)

    def script(self, model: str | None = None, faults: Iterable[Fault] = ()) -> None:
        """Replace the queue of ``model`` (``None``: the global queue) with ``faults``."""
        faults = tuple(faults)
        self._check(faults, model)
        with self._lock:
            self._queues[model] = deque(faults)

    def clear(self) -> None:
        """Forget replies, usage overrides, queued faults and recorded requests."""
        with self._lock:
            self._replies.clear()
            self._usage.clear()
            self._queues.clear()
            self._requests.clear()

    @staticmethod
    def _check(faults: Iterable[Fault], model: str | None) -> None:
        for fault in faults:
            if not isinstance(fault, Fault):
                raise TypeError(f"not a Fault: {fault!r}")
            if model is not None and fault.kind is FaultKind.RESET and fault.before_request:
                raise ValueError("a reset before the request is read cannot know the model")

    # -- inspection --------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request recorded so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def count(self, path: str | None = None, model: str | None = None) -> int:
        """How many recorded requests match ``path`` and ``model`` (``None``: any)."""
        with self._lock:
            return sum(
                1
                for r in self._requests
                if (path is None or r.path == path)
                and (model is None or _model_of(r.body) == model)
            )

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> None:
        """Block until ``n`` requests were recorded. Raises ``TimeoutError``."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._requests) >= n, timeout):
                raise TimeoutError(f"{len(self._requests)} of {n} requests after {timeout}s")

    @property
    def connections_opened(self) -> int:
        with self._lock:
            return self._connections_opened

    @property
    def errors(self) -> list[str]:
        """Unexpected exceptions inside the server (a test should find this empty)."""
        with self._lock:
            return list(self._errors)

    # -- the server thread -------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by start(), or recorded
            self._start_error = exc
            with self._lock:
                self._errors.append(repr(exc))
        finally:
            with suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._ready.set()

    async def _serve(self) -> None:
        # Accepting is a reader callback of our own rather than asyncio.start_server: on
        # Python 3.11 a connection accepted just before Server.close() fails an assertion
        # in Server._attach and leaks its socket, and a cancelled sock_accept() can drop
        # a socket it already accepted. A callback either ran (and made the handler) or not.
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        listener = socket.create_server((self._host, 0))
        listener.setblocking(False)
        self._port = listener.getsockname()[1]
        loop.add_reader(listener.fileno(), self._accept, listener)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            loop.remove_reader(listener.fileno())
            listener.close()
            await self._close_connections()
            # let transports run their connection_lost callbacks, which close the sockets
            for _ in range(3):
                await asyncio.sleep(0)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:  # BlockingIOError: nothing more to accept now
                return
            sock.setblocking(False)
            # asyncio sets TCP_NODELAY only when proto == IPPROTO_TCP, and sockets from
            # create_server() say proto 0; without it every answer waits for a delayed ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._connections_opened += 1
            # the ready queue holds the new task until its first step, then _tasks does
            asyncio.get_running_loop().create_task(self._on_connection(sock))

    async def _close_connections(self) -> None:
        """Cancel every connection handler, including ones accepted a moment ago."""
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        deadline = loop.time() + _CLOSE_TIMEOUT
        while loop.time() < deadline:
            # Only a handler that has started is cancelled: one cancelled before its first
            # step would never run the code that closes its socket. A loop turn starts
            # any handler accepted just before the listener closed. Cancelling again each
            # round is harmless and covers a cancellation lost in a race.
            await asyncio.sleep(0)
            pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
            if not pending:
                return
            for task in self._tasks:
                task.cancel()
            await asyncio.wait(pending, timeout=0.05)

    async def _on_connection(self, sock: socket.socket) -> None:
        task = asyncio.current_task()
        assert task is not None
        # strong references to running handlers live here (the loop only keeps weak ones)
        self._tasks.add(task)
        try:
            try:
                reader, writer = await asyncio.open_connection(sock=sock)
            except BaseException:
                sock.close()
                raise
            try:
                await self._serve_connection(reader, writer)
            except (_Abort, ConnectionError, TimeoutError, h11.ProtocolError):
                pass
            except Exception as exc:  # a bug in the fake: record it, never kill the thread
                with self._lock:
                    self._errors.append(repr(exc))
            finally:
                writer.close()
                with suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await writer.wait_closed()
        finally:
            self._tasks.discard(task)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            if not conn.trailing_data[0]:
                # wait for the next request's first bytes on this (keep-alive) connection
                async with asyncio.timeout(_KEEPALIVE_IDLE):
                    data = await reader.read(65536)
                if not data:
                    return
                if self._take_early_reset():
                    _abort(writer)
                conn.receive_data(data)
            request, body = await _read_request(conn, reader)
            if request is None:
                return
            await self._handle(conn, writer, request, body)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _handle(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, request: h11.Request, raw: bytes
    ) -> None:
        method = request.method.decode("ascii", "replace")
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        headers: dict[str, str] = {}
        for name, value in request.headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        model = _model_of(body)
        with self._changed:
            self._requests.append(RecordedRequest(time.monotonic(), method, path, headers, body))
            self._changed.notify_all()
        if method != "POST" or path not in (OPENAI_PATH, ANTHROPIC_PATH):
            await _send(conn, writer, 404, _error_body(path, 404, f"no route {method} {path}"))
            return
        if not isinstance(body, dict) or not isinstance(model, str):
            await _send(conn, writer, 400, _error_body(path, 400, "body must be JSON with a model"))
            return
        fault = self._take_fault(model)
        if fault.kind is FaultKind.RESET:
            _abort(writer)
        if fault.kind is FaultKind.STALL:
            await asyncio.sleep(fault.seconds)
        if fault.kind is FaultKind.STATUS:
            await self._send_status(conn, writer, path, fault)
            return
        answer = self._answer(body, model, usage=fault.kind is not FaultKind.NO_USAGE)
        render = _openai if path == OPENAI_PATH else _anthropic
        if fault.kind is FaultKind.MALFORMED:
            pieces = [fault.body] if fault.body is not None else _malformed(path, answer.stream)
        else:
            pieces = render(answer)
        slow = fault.kind is FaultKind.SLOW_BODY
        await _send(
            conn,
            writer,
            200,
            pieces,
            stream=answer.stream,
            delay=fault.seconds if slow else 0.0,
            chunks=fault.chunks if slow else 1,
        )

    async def _send_status(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, path: str, fault: Fault
    ) -> None:
        headers = list(fault.headers)
        if fault.retry_after is not None:
            value = fault.retry_after
            headers.append(("retry-after", value if isinstance(value, str) else f"{value:g}"))
        body = [fault.body] if fault.body is not None else _error_body(path, fault.code, None)
        await _send(conn, writer, fault.code, body, extra=headers)

    def _take_early_reset(self) -> bool:
        with self._lock:
            queue = self._queues.get(None)
            if queue and queue[0].kind is FaultKind.RESET and queue[0].before_request:
                queue.popleft()
                return True
            return False

    def _take_fault(self, model: str | None) -> Fault:
        with self._lock:
            for key in (model, None) if model is not None else (None,):
                queue = self._queues.get(key)
                if queue:
                    return queue.popleft()
            return Fault.ok()

    def _answer(self, body: dict[str, Any], model: str, *, usage: bool) -> _Answer:
        messages = body.get("messages")
        messages = messages if isinstance(messages, list) else []
        prompt_text = _text(body.get("system")) + "".join(
            _text(m.get("content")) for m in messages if isinstance(m, dict)
        )
        with self._lock:
            reply = self._replies.get(model, self._replies.get(None))
            override = self._usage.get(model, self._usage.get(None))
            self._seq += 1
            seq = self._seq
        if reply is None:
            last_user = next(
                (
                    _text(m.get("content"))
                    for m in reversed(messages)
                    if isinstance(m, dict) and m.get("role") == "user"
                ),
                "",
            )
            text = f"echo: {last_user}"
        else:
            text = reply if isinstance(reply, str) else str(reply(body))
        finish = "stop"
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if isinstance(limit, int) and estimate_tokens(text) > limit:
            text, finish = text[: limit * 4], "length"
        prompt, completion = estimate_tokens(prompt_text), estimate_tokens(text)
        cached = reasoning = 0
        if override is not None:
            prompt = prompt if override.input_tokens is None else override.input_tokens
            completion = completion if override.output_tokens is None else override.output_tokens
            cached, reasoning = override.cached_tokens, override.reasoning_tokens
        options = body.get("stream_options")
        return _Answer(
            model=model,
            text=text,
            finish=finish,
            prompt=prompt,
            completion=completion,
            cached=cached,
            reasoning=reasoning,
            usage=usage,
            stream=body.get("stream") is True,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            seq=seq,
            pieces=re.findall(r"\S+\s*|\s+", text),
        )


# -- wire formats ------------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    # ensure_ascii=False on purpose: raw U+2028 and friends reach the client's line splitter
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _openai(a: _Answer) -> list[str]:
    created = int(time.time())
    rid = f"chatcmpl-fake-{a.seq}"
    usage = {
        "prompt_tokens": a.prompt,
        "completion_tokens": a.completion,
        "total_tokens": a.prompt + a.completion,
        "prompt_tokens_details": {"cached_tokens": a.cached},
        "completion_tokens_details": {"reasoning_tokens": a.reasoning},
    }
    if not a.stream:
        doc: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": a.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": a.text},
                    "finish_reason": a.finish,
                }
            ],
        }
        if a.usage:
            doc["usage"] = usage
        return [_dumps(doc)]
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": a.model}
    if a.usage and a.include_usage:
        head["usage"] = None  # like OpenAI: every chunk carries usage: null but the last
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    deltas += [{"content": piece} for piece in a.pieces]
    events = [
        {**head, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas
    ]
    events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": a.finish}]})
    if a.usage and a.include_usage:
        events.append({**head, "choices": [], "usage": usage})
    return [f"data: {_dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]


def _anthropic(a: _Answer) -> list[str]:
    rid = f"msg_fake_{a.seq}"
    stop = "end_turn" if a.finish == "stop" else "max_tokens"
    usage = {
        "input_tokens": max(0, a.prompt - a.cached),
        "output_tokens": a.completion,
        "cache_read_input_tokens": a.cached,
        "cache_creation_input_tokens": 0,
    }
    message: dict[str, Any] = {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": a.model,
        "content": [{"type": "text", "text": a.text}],
        "stop_reason": stop,
        "stop_sequence": None,
    }
    if not a.stream:
        if a.usage:
            message["usage"] = usage
        return [_dumps(message)]
    start = {**message, "content": [], "stop_reason": None}
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
    }
    if a.usage:
        start["usage"] = {**usage, "output_tokens": 1}
        delta["usage"] = {"output_tokens": a.completion}
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
    ]
    events += [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}
        for p in a.pieces
    ]
    events += [{"type": "content_block_stop", "index": 0}, delta, {"type": "message_stop"}]
    return [f"event: {e['type']}\ndata: {_dumps(e)}\n\n" for e in events]


def _malformed(path: str, stream: bool) -> list[str]:
    if not stream:
        return ['{"id": "broken", "choices": [']
    if path == OPENAI_PATH:
        return ['data: {"id": "broken", "choices": [\n\n', "data: [DONE]\n\n"]
    return ['event: message_start\ndata: {"type": "message_start", "message": \n\n']


_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _error_body(path: str, code: int, message: str | None) -> list[str]:
    text = message or f"fake error {code}"
    if path == ANTHROPIC_PATH:
        kind = _ANTHROPIC_ERRORS.get(code, "api_error")
        return [_dumps({"type": "error", "error": {"type": kind, "message": text}})]
    kind = "rate_limit_exceeded" if code == 429 else "server_error" if code >= 500 else "invalid"
    return [_dumps({"error": {"message": text, "type": kind, "param": None, "code": None}})]


# -- HTTP plumbing -----------------------------------------------------------------------------


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader
) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            async with asyncio.timeout(_READ_TIMEOUT):
                conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > _MAX_BODY:
                raise h11.RemoteProtocolError("request body too large")
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        else:  # ConnectionClosed or PAUSED: nothing more to serve here
            return None, b""


async def _send(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    pieces: list[str],
    *,
    stream: bool = False,
    delay: float = 0.0,
    chunks: int = 1,
    extra: list[tuple[str, str]] | None = None,
) -> None:
    data = [p.encode() for p in pieces]
    if chunks > 1:  # split the whole body evenly, whatever the event boundaries
        whole = b"".join(data)
        size = max(1, math.ceil(len(whole) / chunks))
        data = [whole[i : i + size] for i in range(0, len(whole), size)]
    headers = [
        ("content-type", "text/event-stream" if stream else "application/json"),
        ("x-request-id", "req_fake"),
    ]
    if stream:
        headers.append(("cache-control", "no-cache"))
    else:
        headers.append(("content-length", str(sum(len(d) for d in data))))
    headers += extra or []
    try:
        reason = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b""
    out = conn.send(h11.Response(status_code=status, headers=headers, reason=reason))
    for i, piece in enumerate(data):
        if delay and i:
            writer.write(out)
            await writer.drain()
            out = b""
            await asyncio.sleep(delay)
        out += conn.send(h11.Data(data=piece))
    writer.write(out + conn.send(h11.EndOfMessage()))
    await writer.drain()


def _abort(writer: asyncio.StreamWriter) -> NoReturn:
    """Close with RST rather than FIN: SO_LINGER on with a zero timeout, then close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    raise _Abort


def _text(content: Any) -> str:
    """The text of a message content: a string, or a list of text parts/blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _model_of(body: Any) -> str | None:
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None
