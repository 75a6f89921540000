"""A real crash test: SIGKILL a process mid-commit, many times, and check every record.

A fork server (``crash_writer.py``) starts writers that commit alternating ~25 KB records A
and B for three agents, concurrently. Each writer is killed with SIGKILL at a random moment
up to 0.2 s after it is ready. Then every state file that exists must parse, validate and
equal record A or record B of its agent exactly (files are written behind the journal, so a
young writer may have none yet); the store must open cleanly, replaying the journal (torn
tail dropped) and removing temp files; and afterwards every agent's file and ``load`` must be
record A or B, with the journal emptied.

This tests atomicity against a process crash, not durability against power loss: the page
cache outlives a killed process. ``CRASH_KILLS`` sets the number of kills (default 50; raise
pytest's ``--timeout`` too for large values), ``CRASH_SEED`` replays a sequence of delays.
"""

from __future__ import annotations

import importlib.util
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import anyio
import orjson
import pytest

from supervisor.state import AgentState, JsonFileStore

HELPER = Path(__file__).with_name("crash_writer.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_KILL_DELAY_S = 0.2
LINE_TIMEOUT_S = 15.0


def load_helper() -> ModuleType:
    """Import ``crash_writer.py`` by path, whatever pytest's import mode."""
    spec = importlib.util.spec_from_file_location("crash_writer", HELPER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ForkServer:
    """Talks to the running ``crash_writer.py``: start a writer, kill it, reap it."""

    def __init__(self, process: subprocess.Popen[bytes], stderr: Path) -> None:
        assert process.stdin is not None and process.stdout is not None
        self._process = process
        self._stdin = process.stdin
        self._stdout = process.stdout.fileno()
        self._stderr = stderr
        self._buffer = b""
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._stdout, selectors.EVENT_READ)

    def close(self) -> None:
        """Stop the server (closing its stdin ends its loop) and release the selector."""
        self._selector.close()
        self._stdin.close()

    def _line(self) -> list[str]:
        # Bounded: a hung or crashed server fails the test instead of hanging it.
        deadline = time.monotonic() + LINE_TIMEOUT_S
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._selector.select(remaining):
                pytest.fail(f"no line from the writer in {LINE_TIMEOUT_S} s; {self._errors()}")
            chunk = os.read(self._stdout, 4096)
            if not chunk:
                pytest.fail(f"the fork server exited; {self._errors()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode().split()

    def _errors(self) -> str:
        return f"its stderr: {self._stderr.read_text()!r}"

    def start_writer(self, directory: Path) -> int:
        """Fork a writer on ``directory``; return its pid once every agent has a state file."""
        self._stdin.write(f"{directory}\n".encode())
        self._stdin.flush()
        pid, ready = None, False
        while pid is None or not ready:
            words = self._line()
            if words[0] == "pid":
                pid = int(words[1])
            elif words[0] == "ready":
                ready = True
            else:
                pytest.fail(f"the writer died before it was ready: {words}; {self._errors()}")
        return pid

    def kill_writer(self, pid: int) -> None:
        """SIGKILL the writer and return once it has been reaped (so it can write no more)."""
        os.kill(pid, signal.SIGKILL)
        words = self._line()
        assert words[:2] == ["exit", str(pid)], words
        status = int(words[2])
        assert os.WIFSIGNALED(status), f"writer exited by itself: {self._errors()}"
        assert os.WTERMSIG(status) == signal.SIGKILL


@contextmanager
def fork_server(tmp_path: Path) -> Iterator[ForkServer]:
    """Run ``crash_writer.py`` with the repository importable; always stop it afterwards."""
    stderr = tmp_path / "writer.stderr"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, str(HELPER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            bufsize=0,
        )
    server = ForkServer(process, stderr)
    try:
        yield server
    finally:
        server.close()
        try:
            process.wait(timeout=LINE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


def temp_files(directory: Path) -> list[str]:
    """Commit temp files in ``directory``."""
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


async def _reopen(store: JsonFileStore) -> dict[str, AgentState]:
    """Open ``store`` (replaying its journal) and load every agent."""
    await store.open()
    return {agent: await store.load(agent) for agent in await store.agents()}


@pytest.mark.integration
def test_sigkill_mid_commit_leaves_old_or_new_record_never_a_mix(tmp_path: Path) -> None:
    """After each of many SIGKILLs every file and load is exactly record A or B; open() replays."""
    kills = int(os.environ.get("CRASH_KILLS", "50"))
    seed = int(os.environ.get("CRASH_SEED", str(random.randrange(2**32))))
    rng = random.Random(seed)
    helper = load_helper()
    expected: dict[str, dict[str, AgentState]] = {
        agent: {variant: helper.record(agent, variant) for variant in "AB"}
        for agent in helper.AGENTS
    }
    directory = tmp_path / "state"
    seen: set[str] = set()
    kills_with_temp_files = 0

    with fork_server(tmp_path) as server:
        for kill in range(kills):
            context = f"kill {kill + 1}/{kills}, CRASH_SEED={seed}"
            pid = server.start_writer(directory)
            time.sleep(rng.uniform(0, MAX_KILL_DELAY_S))
            server.kill_writer(pid)

            for agent, variants in expected.items():
                path = directory / f"{agent}.json"
                if path.exists():
                    state = AgentState.model_validate(orjson.loads(path.read_bytes()))
                    assert state in variants.values(), f"{path.name} is a mix ({context})"

            kills_with_temp_files += bool(temp_files(directory))
            store = JsonFileStore(directory)
            loaded = anyio.run(_reopen, store)
            assert temp_files(directory) == [], context
            assert anyio.run(store.agents) == sorted(expected), context
            assert (directory / "journal.log").stat().st_size == 0, context
            for agent, variants in expected.items():
                matches = [v for v, record in variants.items() if loaded[agent] == record]
                assert matches, f"{agent} loads as neither record A nor B ({context})"
                on_disk = AgentState.model_validate_json((directory / f"{agent}.json").read_bytes())
                assert on_disk == loaded[agent], f"{agent}.json is not what loads ({context})"
                seen.update(matches)

    # Both records were on disk at some kill: the kills landed at different moments.
    assert seen == {"A", "B"}, f"CRASH_SEED={seed}, kills with temp files {kills_with_temp_files}"
