"""The real daemon as a subprocess, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
E2E_DIR = Path(__file__).resolve().parent

Line = dict[str, Any]


class Daemon:
    """A running ``agent-supervisor run`` process whose JSON log lines are collected."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_SUPERVISOR_")}
        full_env.update(env or {})
        full_env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "run", "--config", str(config)],
            cwd=config.parent,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: list[Line] = []
        self.raw: list[bytes] = []
        self.stderr = b""
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()
        self.port: int | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.raw.append(raw)
                try:
                    self.lines.append(orjson.loads(raw))
                except orjson.JSONDecodeError:
                    self.lines.append({"event": "<not json>", "raw": raw.decode(errors="replace")})
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def wait_for(
        self, pred: Callable[[Line], bool], timeout: float = 10.0, count: int = 1
    ) -> list[Line]:
        """Wait until ``count`` log lines match ``pred``; fails the test on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in self.lines if pred(line)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"waited {timeout}s for {count} matching log lines, found {len(found)}; "
                        f"exit={self.proc.poll()} stderr={self.stderr[-2000:]!r} "
                        f"last lines={self.lines[-5:]!r}"
                    )
                self._cond.wait(min(left, 0.2))

    def event(self, name: str, timeout: float = 10.0, count: int = 1, **match: Any) -> list[Line]:
        return self.wait_for(
            lambda line: (
                line.get("event") == name and all(line.get(k) == v for k, v in match.items())
            ),
            timeout,
            count,
        )

    def ready(self, timeout: float = 15.0) -> Daemon:
        self.event("daemon.ready", timeout)
        listening = [line for line in self.lines if line.get("event") == "metrics.listening"]
        if listening:
            self.port = int(listening[-1]["port"])
        return self

    def runs(self, agent: str) -> list[Line]:
        with self._cond:
            return [
                line
                for line in self.lines
                if line.get("event") == "run.finished" and line.get("agent") == agent
            ]

    def metrics_text(self) -> str:
        assert self.port is not None
        r = httpx2.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5)
        r.raise_for_status()
        return r.text

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        out = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def sample(self, name: str, **labels: str) -> float | None:
        return self.samples().get((name, tuple(sorted(labels.items()))))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        self._err_reader.join(5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._reader.join(5)
        self._err_reader.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start daemons on a config text; every one is killed at the end of the test."""
    started: list[Daemon] = []

    def start(
        config_text: str, env: dict[str, str] | None = None, name: str = "config.yaml"
    ) -> Daemon:
        path = tmp_path / name
        path.write_text(config_text)
        d = Daemon(path, env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def fleet_config(agents: str, **settings: Any) -> str:
    """A config with the misbehaving test agents importable and metrics on a free port."""
    head = {
        "state_dir": "state",
        "agent_paths": [str(E2E_DIR)],
        "metrics": {"listen": "127.0.0.1:0"},
        "shutdown_grace": "5s",
    }
    head.update(settings)
    return yaml.safe_dump(head, sort_keys=False) + agents
