"""Run traces: each run's record and its steps, calls and effects, as bounded JSON lines.

One file per agent, ``<state_dir>/traces/<agent>.jsonl``, one line per run, newest last. When a
file passes ``max_bytes`` it is rewritten with its newest half (temp file + rename), so disk use
stays bounded. Traces are diagnostics, not state: they are written without fsync, and a torn
last line after a crash is skipped when read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import orjson

from supervisor.state.jsonfile import check_agent_name


class TraceStore:
    """Appends and reads run traces for every agent."""

    def __init__(self, directory: Path, *, max_bytes: int = 1 << 20) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._locks: dict[str, anyio.Lock] = {}

    def _path(self, agent: str) -> Path:
        check_agent_name(agent)
        return self.directory / f"{agent}.jsonl"

    async def append(self, agent: str, entry: dict[str, Any]) -> None:
        """Add one run's trace. Raises ``OSError`` when the disk refuses it."""
        line = orjson.dumps(entry, default=repr) + b"\n"
        lock = self._locks.setdefault(agent, anyio.Lock())
        async with lock:
            await anyio.to_thread.run_sync(self._append, self._path(agent), line)

    def _append(self, path: Path, line: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        with open(path, "ab") as f:
            f.write(line)
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
            rows = [{k: v for k, v in e.items() if k != "events"} for e in self._read(agent)]
            return rows[::-1][:limit]

        return await anyio.to_thread.run_sync(read)

    async def find(self, run_id: str, agents: list[str]) -> dict[str, Any] | None:
        """The whole trace of ``run_id`` (record and events), or None."""

        def read() -> dict[str, Any] | None:
            for agent in agents:
                for entry in self._read(agent):
                    if entry.get("run_id") == run_id:
                        return entry
            return None

        return await anyio.to_thread.run_sync(read)
