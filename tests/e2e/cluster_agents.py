"""Agents for the cluster end-to-end tests (several daemons on one PostgreSQL).

Each run says which fire it served (``planned_at``) and where: the tests compare what every
node logged with the fire claims in the database.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx2

from supervisor import RunContext


async def tick(ctx: RunContext, params: dict[str, Any]) -> dict[str, Any]:
    """Counts its runs in its state and works ``params.work`` seconds (default 10 ms)."""
    ctx.step("tick")
    ctx.state["runs"] = int(ctx.state.get("runs", 0)) + 1
    await anyio.sleep(float(params.get("work", 0.01)))
    return {"runs": ctx.state["runs"]}


async def poster(ctx: RunContext, params: dict[str, Any]) -> Any:
    """Works ``params.work`` seconds, then posts once per fire (the effect's key is the fire's
    planned time), then asks the LLM once if ``params.llm`` (a budget to overshoot)."""
    assert ctx.planned_at is not None
    key = f"{ctx.agent}@{ctx.planned_at.isoformat()}"
    ctx.step("work")
    await anyio.sleep(float(params.get("work", 0.5)))
    ctx.step("post")

    async def post(idempotency_key: str) -> Any:
        async with httpx2.AsyncClient(timeout=5.0) as client:
            response = await client.post(
                f"{params['url']}/posts",
                json={"key": key},
                headers={"Idempotency-Key": idempotency_key},
            )
            response.raise_for_status()
            return response.json()

    posted = await ctx.effect("post", key, post)
    if params.get("llm"):
        ctx.step("ask")
        await ctx.llm.complete("writer", [{"role": "user", "content": f"summarise {key}"}])
    ctx.state["posts"] = int(ctx.state.get("posts", 0)) + 1
    return {"posted": bool(posted)}
