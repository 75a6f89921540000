"""Agents that loop or stall on purpose, for end-to-end tests of the loop detectors."""

from __future__ import annotations

import anyio
import anyio.lowlevel

from supervisor import RunContext


async def ask_forever(ctx: RunContext) -> None:
    """Asks the model the same question again and again."""
    while True:
        await ctx.llm.complete("local", [{"role": "user", "content": "are we there yet?"}])


async def empty_steps(ctx: RunContext) -> None:
    """Makes steps that change nothing."""
    while True:
        ctx.step("spin")
        await anyio.lowlevel.checkpoint()


async def dead_socket(ctx: RunContext, params: dict[str, int]) -> None:
    """Connects to a peer that never answers and waits for a reply."""
    ctx.step("connect")
    stream = await anyio.connect_tcp("127.0.0.1", int(params["port"]))
    async with stream:
        ctx.step("wait-for-reply")
        await stream.receive()
