"""The control API: JSON lines over a Unix socket, for the CLI.

A client connects, sends one request line ``{"op": "...", "args": {...}}`` and reads answer
lines: zero or more ``{"event": ...}`` progress lines (``trigger`` with ``wait``), then one
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "...", "code": "..."}``.

Access control is the socket file's owner, group and mode (0660 by default). On top of that,
every state-changing call checks the peer's uid (``SO_PEERCRED``): root, the daemon's own user
and members of the socket's group may change things; everyone's calls are logged with their
uid. Hand-written because it is small and must carry exactly these checks.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import orjson
from anyio.abc import SocketAttribute

from supervisor.logging import get_logger

_log = get_logger()

#: operations that change something: the peer's uid is checked and logged
MUTATING = frozenset({"trigger", "pause", "resume", "reload", "approve", "reject", "resolve"})
MAX_REQUEST = 64 * 1024

Emit = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], Emit], Awaitable[Any]]


class ControlError(Exception):
    """A request the daemon refuses; ``code`` is machine-readable (unknown_agent, ...)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _peer_groups(pid: int, gid: int) -> set[int]:
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return groups


class ControlServer:
    """Serves the control API on a Unix socket until cancelled."""

    def __init__(self, path: Path, handlers: dict[str, Handler], *, mode: int = 0o660) -> None:
        self.path = path
        self.handlers = handlers
        self.mode = mode

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind (replacing a stale socket file), then serve. Raises ``OSError`` if it cannot."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise OSError(f"{self.path} exists and is not a socket")
            self.path.unlink()  # stale: the state dir lock says no other daemon runs
        listener = await anyio.create_unix_listener(self.path)
        os.chmod(self.path, self.mode)
        _log.info("control.listening", socket=str(self.path), mode=oct(self.mode))
        task_status.started()
        try:
            async with listener:
                await listener.serve(self._handle)
        finally:
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            raw_sock = stream.extra(SocketAttribute.raw_socket)
            pid, uid, gid = peer_credentials(raw_sock)

            async def emit(doc: dict[str, Any]) -> None:
                await stream.send(orjson.dumps(doc, default=str) + b"\n")

            try:
                with anyio.fail_after(10):
                    request = await _read_line(stream)
                op = str(request.get("op", ""))
                args = request.get("args") or {}
                if not isinstance(args, dict):
                    raise ControlError("bad_request", "args must be an object")
                handler = self.handlers.get(op)
                if handler is None:
                    raise ControlError("unknown_op", f"unknown operation {op!r}")
                if op in MUTATING:
                    self._authorise(op, pid, uid, gid)
                result = await handler(args, emit)
                await emit({"ok": True, "result": result})
            except ControlError as exc:
                await _safe_emit(emit, {"ok": False, "code": exc.code, "error": str(exc)})
            except TimeoutError:
                await _safe_emit(emit, {"ok": False, "code": "timeout", "error": "no request"})
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return  # the client went away
            except Exception as exc:  # a bug must not take the daemon down with one client
                _log.exception("control.error", op=locals().get("op"))
                await _safe_emit(emit, {"ok": False, "code": "internal", "error": str(exc)})

    def _authorise(self, op: str, pid: int, uid: int, gid: int) -> None:
        sock_gid = os.stat(self.path).st_gid
        allowed = uid in (0, os.getuid()) or sock_gid in _peer_groups(pid, gid)
        _log.info("control.request", op=op, peer_uid=uid, peer_pid=pid, allowed=allowed)
        if not allowed:
            raise ControlError("forbidden", f"uid {uid} may not {op}")


async def _read_line(stream: anyio.abc.SocketStream) -> dict[str, Any]:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive(65536)
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ControlError("bad_request", "request too large")
    try:
        doc = orjson.loads(buf.split(b"\n", 1)[0])
    except orjson.JSONDecodeError as exc:
        raise ControlError("bad_request", f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ControlError("bad_request", "the request must be a JSON object")
    return doc


async def _safe_emit(emit: Emit, doc: dict[str, Any]) -> None:
    try:
        await emit(doc)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass


class ControlClient:
    """The CLI's side: one request, answer lines back (blocking; the CLI is not async)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout

    def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any:
        """Send ``op``; return its result. Raises ``ControlError`` (codes: ``not_running``,
        ``permission``, and the daemon's own codes)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError):
                raise ControlError(
                    "not_running", f"the daemon is not running (no control socket at {self.path})"
                ) from None
            except PermissionError:
                raise ControlError(
                    "permission",
                    f"permission denied on {self.path}: run as the daemon's user or join the "
                    "socket's group",
                ) from None
            sock.sendall(orjson.dumps({"op": op, "args": args or {}}) + b"\n")
            with sock.makefile("rb") as f:
                for line in f:
                    doc = orjson.loads(line)
                    if "event" in doc:
                        if on_event is not None:
                            on_event(doc)
                        continue
                    if doc.get("ok"):
                        return doc.get("result")
                    raise ControlError(doc.get("code", "error"), doc.get("error", "failed"))
            raise ControlError("protocol", "the daemon closed the connection without an answer")
        except TimeoutError:
            raise ControlError(
                "timeout", f"no answer from the daemon within {self.timeout:g}s"
            ) from None
        finally:
            sock.close()
