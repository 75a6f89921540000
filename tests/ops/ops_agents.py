"""Agents for the operations tests (the Prometheus stack and the systemd boot test)."""

from __future__ import annotations

import os
import time
from typing import Any

import anyio

from supervisor import RunContext


async def succeed_then_hang(ctx: RunContext) -> str:
    """Succeeds on its first run, then every later run hangs: a silent failure."""
    ctx.step("work")
    if ctx.state.get("succeeded"):
        await anyio.sleep_forever()
    ctx.state["succeeded"] = True
    return "ok"


async def block_loop_once(ctx: RunContext, params: dict[str, Any]) -> str:
    """While ``params['flag']`` exists: delete it and block the whole event loop (a sync
    sleep in async code, the classic bug), so the daemon stops pinging the watchdog."""
    ctx.step("check")
    try:
        os.unlink(str(params["flag"]))
    except FileNotFoundError:
        return "not blocked"
    time.sleep(3600)  # noqa: ASYNC251  # on purpose: the loop must block
    return "blocked"


async def sleeper(ctx: RunContext, params: dict[str, Any]) -> dict[str, int]:
    """Works for ``params['seconds']``, one step per tenth of a second."""
    ticks = int(float(params.get("seconds", 3)) * 10)
    for i in range(ticks):
        with ctx.step("tick"):
            await anyio.sleep(0.1)
            ctx.partial({"ticks": i + 1})
    return {"ticks": ticks}


async def credentials(ctx: RunContext) -> list[str]:
    """The names of the credentials systemd passed in ``$CREDENTIALS_DIRECTORY``."""
    ctx.step("list")
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    return sorted(os.listdir(directory)) if directory else []
