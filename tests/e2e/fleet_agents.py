"""Agents that misbehave on purpose, for end-to-end tests of the real daemon."""

from __future__ import annotations

import anyio
import anyio.lowlevel

from supervisor import PermanentError, RunContext, TransientError


async def hang(ctx: RunContext) -> None:
    """Never returns: the timeout guard must end it."""
    ctx.step("wait-forever")
    ctx.partial({"waited": True})
    try:
        await anyio.sleep_forever()
    finally:
        with ctx.cleanup():
            ctx.state["cleaned_up"] = int(ctx.state.get("cleaned_up", 0)) + 1


async def spin(ctx: RunContext) -> None:
    """Steps forever: the max-steps guard must end it at exactly the limit."""
    n = 0
    while True:
        ctx.step("spin")
        n += 1
        ctx.partial({"spun": n})
        await anyio.lowlevel.checkpoint()


async def flaky(ctx: RunContext) -> dict[str, int]:
    """Fails twice with a transient error, then succeeds (pattern repeats every 3 attempts)."""
    ctx.step("try")
    tries = int(ctx.state.get("tries", 0)) + 1
    ctx.state["tries"] = tries
    if tries % 3 != 0:
        raise TransientError(f"transient failure on try {tries}")
    return {"tries": tries}


async def broken(ctx: RunContext) -> None:
    """Always fails: the circuit breaker must open."""
    ctx.step("fail")
    raise PermanentError("the target is gone")


async def slow(ctx: RunContext) -> None:
    """Works for a long time, recording progress in its state each tick."""
    for i in range(10_000):
        with ctx.step("tick"):
            ctx.state["progress"] = i
            ctx.partial({"progress": i})
            await anyio.sleep(0.05)


async def ok(ctx: RunContext) -> str:
    """Succeeds at once."""
    ctx.step("ok")
    ctx.state["runs"] = int(ctx.state.get("runs", 0)) + 1
    return "ok"


async def writer(ctx: RunContext, params: dict[str, object]) -> None:
    """Commits a large state payload that alternates between two complete versions."""
    ctx.step("write")
    gen = int(ctx.state.get("gen", 0)) + 1
    size = int(params.get("size", 20000))  # type: ignore[call-overload]
    ctx.state.clear()
    ctx.state["gen"] = gen
    ctx.state["payload"] = str(gen % 10) * size
    ctx.state["check"] = gen * 7
