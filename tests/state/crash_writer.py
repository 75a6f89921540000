"""Helper for ``test_crash.py``: a fork server whose children commit state until SIGKILLed.

Run as ``python crash_writer.py``. The server imports everything once (so a writer starts in
milliseconds, not the 0.3 s an interpreter takes), then for each directory read on stdin it
forks a writer and prints ``pid <pid>``, and prints ``exit <pid> <status>`` once it has reaped
it. A writer commits record A for every agent, prints ``ready <pid>``, then each agent's task
commits B, A, B, ... until killed.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import anyio

from supervisor.state.base import AgentState
from supervisor.state.jsonfile import JsonFileStore

AGENTS = ("alpha", "beta", "gamma")
PAYLOAD_CHARS = 20_000


def record(agent: str, variant: str) -> AgentState:
    """The complete record ``variant`` ("A" or "B") of ``agent``: about 25 KB on disk."""
    chunk = f"{variant}:{agent}:"
    blob = (chunk * (PAYLOAD_CHARS // len(chunk) + 1))[:PAYLOAD_CHARS]
    return AgentState(
        agent=agent,
        data={"variant": variant, "blob": blob, "rows": [[i, variant] for i in range(300)]},
        totals={f"variant_{variant}": 1},
        paused=variant == "B",
    )


async def write_forever(directory: Path) -> None:
    """Commit A for every agent, say ready, then alternate B and A per agent forever."""
    store = JsonFileStore(directory)
    await store.open()
    records = {agent: (record(agent, "A"), record(agent, "B")) for agent in AGENTS}
    async with anyio.create_task_group() as tg:
        for agent in AGENTS:
            tg.start_soon(store.commit, records[agent][0])
    print(f"ready {os.getpid()}", flush=True)

    async def alternate(agent: str) -> None:
        a, b = records[agent]
        while True:
            await store.commit(b)
            await store.commit(a)

    async with anyio.create_task_group() as tg:
        for agent in AGENTS:
            tg.start_soon(alternate, agent)


def serve() -> None:
    """Fork one writer per directory named on stdin, one at a time, reaping each."""
    # Import anyio's event loop backend now, once, rather than in every writer.
    anyio.run(anyio.sleep, 0)
    for line in sys.stdin:
        directory = Path(line.strip())
        pid = os.fork()
        if pid == 0:
            # The child must never return into this loop or run the server's exit handlers.
            try:
                anyio.run(write_forever, directory)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {status}", flush=True)


if __name__ == "__main__":
    serve()
