"""Run traces: each run's record and its steps, calls and effects, as bounded JSON lines.

One file per agent, ``<state_dir>/traces/<agent>.jsonl``, one line per run, newest last. When a
file passes ``max_bytes`` it is rewritten with its newest half (temp file + rename), so disk use
stays bounded. Traces are diagnostics, not state: ``add`` only queues the line, a writer thread
appends everything queued every ``flush_interval`` seconds (one open and write per agent, no
fsync), and the reads flush first. A crash loses at most the lines of the last interval, and a
torn last line is skipped when read. The thread ends when nothing is queued; it is not a daemon
thread, so the interpreter writes the last lines before it exits.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import orjson

from supervisor.state.jsonfile import check_agent_name


class TraceStore:
    """Appends and reads run traces for every agent."""

    def __init__(
        self, directory: Path, *, max_bytes: int = 1 << 20, flush_interval: float = 0.2
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.flush_interval = flush_interval
        # Guards the queue and the writer handle; ``_io`` serialises the file writes.
        self._lock = threading.Lock()
        self._io = threading.Lock()
        self._queued: dict[str, list[bytes]] = {}
        self._writer: threading.Thread | None = None

    def _path(self, agent: str) -> Path:
        check_agent_name(agent)
        return self.directory / f"{agent}.jsonl"

    def add(self, agent: str, entry: dict[str, Any]) -> None:
        """Queue one run's trace for the writer thread. Raises ``StateError`` for an unsafe name.

        What JSON cannot encode is written as its ``repr``; a failed write is logged there.
        """
        check_agent_name(agent)
        line = orjson.dumps(entry, default=repr) + b"\n"
        with self._lock:
            queued = self._queued.get(agent)
            if queued is None:
                self._queued[agent] = [line]
            else:
                queued.append(line)
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name="trace-writer")
                self._writer.start()

    async def flush(self) -> None:
        """Write everything queued. Raises ``OSError`` when the disk refuses it."""
        await anyio.to_thread.run_sync(self._flush)

    def _run(self) -> None:
        while True:
            time.sleep(self.flush_interval)  # a background thread: batching is the point
            try:
                self._flush()
            except OSError as exc:  # traces are diagnostics: log and drop, never fail a run
                from supervisor.logging import get_logger

                get_logger().warning("trace.write_failed", error=str(exc))
            with self._lock:
                if not self._queued:
                    self._writer = None
                    return

    def _flush(self) -> None:
        with self._io:
            with self._lock:
                queued, self._queued = self._queued, {}
            failed: OSError | None = None
            for agent, lines in queued.items():
                try:
                    self._append(self._path(agent), b"".join(lines))
                except OSError as exc:
                    failed = failed or exc
            if failed is not None:
                raise failed

    def _flush_quietly(self) -> None:
        # Before a read: a disk that refuses the queued lines must not fail the read too.
        try:
            self._flush()
        except OSError:
            pass

    def _append(self, path: Path, lines: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        with open(path, "ab") as f:
            f.write(lines)
            size = f.tell()
        if size > self.max_bytes:
            self._trim(path)

    def _trim(self, path: Path) -> None:
        lines = path.read_bytes().splitlines(keepends=True)
        keep: list[bytes] = []
        total = 0
        for line in reversed(lines):
            total += len(line)
            if total > self.max_bytes // 2 and keep:
                break
            keep.append(line)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_bytes(b"".join(reversed(keep)))
        os.replace(tmp, path)

    def _read(self, agent: str) -> Iterator[dict[str, Any]]:
        path = self._path(agent)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        for line in data.splitlines():
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a torn last line after a crash

    async def runs(self, agent: str, limit: int = 20) -> list[dict[str, Any]]:
        """The newest ``limit`` run records of ``agent`` (without their events), newest first."""

        def read() -> list[dict[str, Any]]:
            self._flush_quietly()
            rows = [{k: v for k, v in e.items() if k != "events"} for e in self._read(agent)]
            return rows[::-1][:limit]

        return await anyio.to_thread.run_sync(read)

    async def find(self, run_id: str, agents: list[str]) -> dict[str, Any] | None:
        """The whole trace of ``run_id`` (record and events), or None."""

        def read() -> dict[str, Any] | None:
            self._flush_quietly()
            for agent in agents:
                for entry in self._read(agent):
                    if entry.get("run_id") == run_id:
                        return entry
            return None

        return await anyio.to_thread.run_sync(read)
