"""Agents that call the model through ``ctx.llm``, for end-to-end tests of the real daemon."""

from __future__ import annotations

from typing import Any

from supervisor import RunContext


async def runaway(ctx: RunContext) -> None:
    """Writes one post after another with the model and never stops on its own (the
    47-posts scenario): only a guard (steps or budget) ends the run."""
    posts = int(ctx.state.get("posts", 0))
    while True:
        posts += 1
        prompt = f"write post #{posts} about the weekend"
        await ctx.llm.complete("writer", [{"role": "user", "content": prompt}])
        ctx.state["posts"] = posts
        ctx.partial({"posts": posts})


async def ask(ctx: RunContext) -> dict[str, Any]:
    """One model call; the run's result says which tier answered."""
    result = await ctx.llm.complete("writer", [{"role": "user", "content": "one line, please"}])
    return {
        "tier": result.tier,
        "provider": result.provider,
        "model": result.model,
        "degraded": result.degraded,
        "text": result.text,
    }
