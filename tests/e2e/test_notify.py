"""systemd notifications from the real daemon, received on a real datagram socket."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import fleet_config

pytestmark = pytest.mark.e2e


class NotifySocket:
    """What systemd would listen on: a Unix datagram socket collecting messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, needle: str, timeout: float = 10.0, after: int = 0) -> str:
        """The first message from index ``after`` on that contains ``needle``."""
        deadline = time.monotonic() + timeout
        for msg in self.messages[after:]:
            if needle in msg:
                return msg
        while time.monotonic() < deadline:
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(msg)
            if needle in msg:
                return msg
        raise AssertionError(f"no {needle!r} in {self.messages!r}")

    def close(self) -> None:
        self.sock.close()


def test_ready_reloading_stopping_and_watchdog(daemon_factory, tmp_path) -> None:
    """READY=1 after start, RELOADING=1 with MONOTONIC_USEC then READY=1 on SIGHUP,
    WATCHDOG=1 pings at half the watchdog interval, STOPPING=1 on SIGTERM."""
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        config = fleet_config(
            """
agents:
  - {name: ok, run: "fleet_agents:ok", schedule: every 1s}
"""
        )
        d = daemon_factory(
            config,
            env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"},
        )
        ready = notify.wait_for("READY=1")
        assert "STATUS=running 1 agents" in ready
        # WATCHDOG_USEC=0.4 s: a ping every 0.2 s, so at least 3 in 0.8 s.
        t0 = time.monotonic()
        pings = 0
        while time.monotonic() - t0 < 0.8:
            notify.wait_for("WATCHDOG=1", after=len(notify.messages))
            pings += 1
        assert pings >= 3
        d.signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING=1")
        usec = int(next(x for x in reloading.split("\n") if x.startswith("MONOTONIC_USEC="))[15:])
        assert abs(usec / 1e6 - time.monotonic()) < 60
        notify.wait_for("READY=1", after=notify.messages.index(reloading) + 1)
        d.signal(signal.SIGTERM)
        assert "STOPPING=1" in notify.wait_for("STOPPING=1")
        assert d.wait(15) == 0
    finally:
        notify.close()
