"""Helpers shared by the benchmarks: statistics, machine facts, temp fleets, a daemon handle.

Nothing here is a test. The daemon handle starts the real ``python -m supervisor run`` as a
subprocess, reads its JSON log lines from stdout in a thread (so the daemon never blocks on a
full pipe), and always stops it: SIGINT, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import http.client
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

#: the no-op agent every benchmark runs; importing it imports nothing
NOOP_MODULE = "benchnoop"
NOOP_SOURCE = '''"""A no-op agent for the benchmarks."""


async def noop(ctx):
    return None
'''

#: the same agent written the way real agents are: importing the supervisor's contract
NOOP_SUPERVISOR_MODULE = "benchnoop_typed"
NOOP_SUPERVISOR_SOURCE = '''"""A no-op agent importing the supervisor's contract, as agents do."""

from supervisor import RunContext


async def noop(ctx: RunContext) -> None:
    return None
'''


# -- statistics ---------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linearly interpolated; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class Spread:
    """Median and spread of repeated measurements."""

    median: float
    p10: float
    p90: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        v = list(values)
        return cls(
            statistics.median(v) if v else float("nan"),
            quantile(v, 0.10),
            quantile(v, 0.90),
            min(v, default=float("nan")),
            max(v, default=float("nan")),
            len(v),
        )

    def fmt(self, digits: int = 1, scale: float = 1.0) -> str:
        """``median (p10-p90)`` with ``scale`` applied (e.g. 1e6 for µs)."""
        f = f"{{:.{digits}f}}"
        return (
            f"{f.format(self.median * scale)} "
            f"({f.format(self.p10 * scale)}–{f.format(self.p90 * scale)})"
        )


# -- machine -------------------------------------------------------------------------------------


def machine_facts() -> dict[str, str]:
    """nproc, CPU model, Python, kernel, and the filesystem the temp dirs live on."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": mem,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": platform.release(),
        "loadavg (1/5/15 min, at start)": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def package_versions(names: Iterable[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


# -- fleets ---------------------------------------------------------------------------------------


def write_agent_modules(directory: Path) -> Path:
    """Write the no-op agent modules into ``directory/agents``; returns that path."""
    agents = directory / "agents"
    agents.mkdir(parents=True, exist_ok=True)
    (agents / f"{NOOP_MODULE}.py").write_text(NOOP_SOURCE)
    (agents / f"{NOOP_SUPERVISOR_MODULE}.py").write_text(NOOP_SUPERVISOR_SOURCE)
    return agents


def write_fleet_config(
    directory: Path,
    *,
    agents: int,
    schedule: str,
    max_concurrent_runs: int | None = None,
    state_dir: Path | None = None,
    name: str = "fleet.yaml",
) -> Path:
    """A config of ``agents`` no-op agents on ``schedule`` (a YAML flow value), metrics on :0."""
    write_agent_modules(directory)
    lines = [
        f"state_dir: {state_dir or directory / 'state'}",
        "log_level: info",
        "agent_paths: [agents]",
    ]
    if max_concurrent_runs is not None:
        lines.append(f"max_concurrent_runs: {max_concurrent_runs}")
    lines += ["metrics:", "  listen: 127.0.0.1:0", "agents:"]
    for i in range(agents):
        lines += [
            f"  - name: agent-{i:04d}",
            f"    run: {NOOP_MODULE}:noop",
            f"    schedule: {schedule}",
        ]
    path = directory / name
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the real daemon -------------------------------------------------------------------------------


def daemon_env() -> dict[str, str]:
    """The environment for a spawned supervisor: the caller's, minus two things.

    No config or metrics override from the caller's shell (``AGENT_SUPERVISOR_*``). And no
    ``PYTHONDONTWRITEBYTECODE``: an installed supervisor runs from compiled bytecode, so the
    spawned processes may cache theirs in ``__pycache__`` (ignored by git); the benchmark's
    own shell often sets it, and then every start compiles the supervisor's ~100 modules.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_SUPERVISOR_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


class DaemonProcess:
    """``python -m supervisor run --config X`` as a subprocess, with its log lines parsed.

    ``on_line(event_dict, received_monotonic)`` runs in the reader thread for every line.
    """

    def __init__(
        self,
        config: Path,
        *,
        on_line: Callable[[dict[str, Any], float], None] | None = None,
    ) -> None:
        self.config = config
        self.on_line = on_line
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0
        self.events: dict[str, tuple[dict[str, Any], float]] = {}
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self.bad_lines = 0
        self.stderr_tail: list[str] = []

    def start(self) -> DaemonProcess:
        env = daemon_env()
        self.spawned_at = time.monotonic()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "supervisor", "run", "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, name="daemon-stdout", daemon=True)
        self._reader.start()
        threading.Thread(target=self._read_stderr, name="daemon-stderr", daemon=True).start()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            now = time.monotonic()
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                self.bad_lines += 1
                continue
            event = doc.get("event")
            if self.on_line is not None:
                self.on_line(doc, now)
            if event not in self.events:
                with self._cond:
                    self.events[event] = (doc, now)
                    self._cond.notify_all()
        with self._cond:
            self.events.setdefault("<eof>", ({}, time.monotonic()))
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr_tail = [*self.stderr_tail[-20:], raw.decode(errors="replace").rstrip()]

    def wait_event(self, event: str, timeout: float) -> tuple[dict[str, Any], float]:
        """The first line with ``event`` and when it was read. Raises TimeoutError/RuntimeError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while event not in self.events:
                if "<eof>" in self.events:
                    raise RuntimeError(
                        f"daemon exited before {event!r}: " + " | ".join(self.stderr_tail[-5:])
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {event!r} line within {timeout} s")
                self._cond.wait(left)
            return self.events[event]

    def metrics_port(self, timeout: float = 30.0) -> int:
        doc, _ = self.wait_event("metrics.listening", timeout)
        return int(doc["port"])

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS line")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGINT, wait up to ``timeout`` s, then SIGKILL. Returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        finally:
            if self._reader is not None:
                self._reader.join(5)
        return proc.returncode

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def scrape(port: int, path: str = "/metrics", timeout: float = 10.0) -> tuple[float, int]:
    """One GET on loopback with a fresh connection: (seconds to the last body byte, body bytes).

    Raises ``RuntimeError`` unless the status is 200.
    """
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        took = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {response.status}")
    finally:
        conn.close()
    return took, len(body)


def verdict(ok: bool) -> str:
    return "**pass**" if ok else "**MISS**"
