"""A loopback HTTP target for effect tests: a "platform" that records every request.

It runs in the test process (threads), so it outlives every daemon the test kills. It does
NOT dedupe by ``Idempotency-Key``: each POST it receives counts, so the tests see every
delivery the supervisor made, not what a careful platform would have kept.

    POST <any path>        recorded, then answered (201 + the stored post), unless the
                           first delivery of its Idempotency-Key is set to fail after it
                           was recorded: ``reset`` (TCP RST, no response) or ``500``
    GET  /posts?key=K      "do you have post K?" -> {"found": bool, "count": n}
                           (what a ``reconcile`` asks); recorded too

``response_delay`` sleeps between recording a POST and answering it, which widens the
window in which a killed daemon has delivered an effect but not recorded its result.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import orjson

__all__ = ["EffectTarget", "Request", "running_target"]

Failure = Literal["reset", "500"]


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the target received it (complete: headers and body)."""

    method: str
    path: str
    query: dict[str, str]
    #: header names lower-cased
    headers: dict[str, str]
    body: bytes
    #: time.monotonic() when it was recorded
    at: float
    #: the answer the target gave: a status code, or "reset"
    answer: str = ""

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")


@dataclass
class EffectTarget:
    """The recording server; ``start()`` binds 127.0.0.1 on a free port."""

    #: first delivery of each Idempotency-Key to ``fail_path`` fails after it was recorded
    fail_first: Failure | None = None
    fail_path: str = "/posts"
    #: seconds between recording a POST and answering it
    response_delay: float = 0.0
    requests: list[Request] = field(default_factory=list)
    #: TCP connections accepted, requests or not (egress tests: "no connection at all")
    connections: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> EffectTarget:
        target = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # the record is the log

            def do_GET(self) -> None:
                target._get(self)

            def do_POST(self) -> None:
                target._post(self)

        class Server(ThreadingHTTPServer):
            def verify_request(self, request: Any, client_address: Any) -> bool:
                with target._lock:
                    target.connections += 1
                return True

        server = Server(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # -- what the tests read -------------------------------------------------------------------

    def received(self, path: str = "/posts", method: str = "POST") -> list[Request]:
        """Requests to ``path`` with ``method``, in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.path == path and r.method == method]

    def deliveries(self, path: str = "/posts") -> Counter[str]:
        """POSTs to ``path`` per Idempotency-Key (``"-"`` for a POST without one)."""
        return Counter(r.idempotency_key or "-" for r in self.received(path))

    def wait_for(self, path: str, count: int, timeout: float = 10.0) -> list[Request]:
        """Wait (bounded) until ``count`` POSTs to ``path`` arrived; fails on timeout."""
        deadline = time.monotonic() + timeout
        while len(found := self.received(path)) < count:
            if time.monotonic() >= deadline:
                raise AssertionError(f"{len(found)} of {count} POSTs to {path} in {timeout}s")
            time.sleep(0.02)
        return found

    # -- the server side -----------------------------------------------------------------------

    def _read(self, handler: BaseHTTPRequestHandler) -> Request:
        url = urlsplit(handler.path)
        length = int(handler.headers.get("content-length") or 0)
        body = handler.rfile.read(length) if length else b""
        return Request(
            method=handler.command,
            path=url.path,
            query={k: v[-1] for k, v in parse_qs(url.query).items()},
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
            at=time.monotonic(),
        )

    def _post(self, handler: BaseHTTPRequestHandler) -> None:
        request = self._read(handler)
        if len(request.body) < int(handler.headers.get("content-length") or 0):
            return  # cut off mid-body (the sender died): not a delivery
        with self._lock:
            first = request.idempotency_key is not None and not any(
                r.idempotency_key == request.idempotency_key and r.path == request.path
                for r in self.requests
            )
            fail = self.fail_first if first and request.path == self.fail_path else None
            index = len(self.requests)
            self.requests.append(request)
            stored = sum(1 for r in self.requests if r.path == request.path)
        if self.response_delay:
            time.sleep(self.response_delay)
        if fail == "reset":
            self._answered(index, "reset")
            _reset(handler)
            return
        status = 500 if fail == "500" else 201
        doc = {"error": "internal error"} if fail else {"id": stored, **(request.json() or {})}
        self._answered(index, str(status))
        _send(handler, status, doc)

    def _get(self, handler: BaseHTTPRequestHandler) -> None:
        request = self._read(handler)
        with self._lock:
            self.requests.append(request)
            key = request.query.get("key")
            count = sum(
                1
                for r in self.requests
                if r.method == "POST"
                and r.path == request.path
                and (r.json() or {}).get("key") == key
            )
        _send(handler, 200, {"found": count > 0, "count": count})

    def _answered(self, index: int, answer: str) -> None:
        with self._lock:
            r = self.requests[index]
            self.requests[index] = Request(
                r.method, r.path, r.query, r.headers, r.body, r.at, answer
            )


def _send(handler: BaseHTTPRequestHandler, status: int, doc: Any) -> None:
    body = orjson.dumps(doc)
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    except OSError:
        pass  # the client died (a killed daemon): the request was recorded all the same


def _reset(handler: BaseHTTPRequestHandler) -> None:
    """Abort the connection with a TCP RST: the client gets no response at all."""
    sock: socket.socket = handler.connection
    handler.close_connection = True
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


@contextmanager
def running_target(**options: Any) -> Iterator[EffectTarget]:
    """An ``EffectTarget`` started for the block and closed after it."""
    target = EffectTarget(**options).start()
    try:
        yield target
    finally:
        target.close()
